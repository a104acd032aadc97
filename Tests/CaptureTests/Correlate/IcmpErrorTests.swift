import XCTest
@testable import Capture

/// An ICMP error goes on the connection of the packet it quotes: a port unreachable answering a datagram, one
/// answering DNS redirected to a 15053 nobody listens on (ztunnel's DNS proxy down), a fragmentation needed on a
/// tunnel. Before, each was a connection of its own, one per NAT view.
/// Runs packets through a correlator into an HTML report and returns the page.
func renderHTML(_ packets: [PacketRecord], tags: RuleTagTable, ruleset: Ruleset? = nil) throws -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("mt-html-\(UUID().uuidString).html").path
    defer { try? FileManager.default.removeItem(atPath: path) }
    let sink = try HTMLReport(path: path, ruleset: ruleset)
    let c = Correlator(tags: tags, ruleset: ruleset, options: CorrelatorOptions(), sink: sink)
    for p in packets { c.ingest(p) }
    try sink.finish(c.finish())
    return try String(contentsOfFile: path, encoding: .utf8)
}

final class IcmpErrorTests: XCTestCase {
    private let pod = PacketFactory.ep("10.0.1.5", 5353)

    /// An ICMP error record as the decoder fills it (`TransportDecoder.icmp`).
    private func icmpError(_ f: inout PacketFactory, from: String, to: String, type: UInt8, code: UInt8, quoting q: FiveTuple,
                           on point: CapturePoint, direction: PacketDirection) -> PacketRecord {
        var r = f.packet(PacketFactory.ep(from, UInt16(type) << 8 | UInt16(code)), PacketFactory.ep(to, 0), proto: IPProto.icmp,
                         on: point, direction: direction)
        r.icmpType = type
        r.icmpCode = code
        r.quoted = q
        r.hasQuoted = true
        r.ipLength = 56
        return r
    }

    func testAPortUnreachableIsPartOfTheDatagramsConnection() throws {
        var f = PacketFactory()
        let peer = PacketFactory.ep("10.0.9.9", 9998)
        let sent = FiveTuple(proto: IPProto.udp, src: pod, dst: peer)
        var p = [f.packet(pod, peer, proto: IPProto.udp, payload: 5, on: eth0, direction: .outbound)]
        f.advance(micros: 40)
        p.append(icmpError(&f, from: "10.0.9.9", to: "10.0.1.5", type: 3, code: 3, quoting: sent, on: eth0, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags)
        XCTAssertEqual(sink.timelines.count, 1, sink.timelines.map { "\($0.original)" }.joined(separator: "; "))
        let t = try XCTUnwrap(sink.timelines.first)
        XCTAssertEqual(t.original, sent)
        XCTAssertEqual(t.kind, .uncapturedByDesign)
        XCTAssertEqual(t.icmpErrors.map(\.message), ["port unreachable"])
        XCTAssertEqual(t.icmpErrors.first?.from, IPAddress("10.0.9.9"))
        XCTAssertEqual(t.events.map(\.tuple.proto), [IPProto.udp, IPProto.icmp])
        XCTAssertEqual(t.events.map(\.isReply), [false, true])

        let text = try renderReport(p, tags: f.tags) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("  icmp      port unreachable from 10.0.9.9, 40 µs after the first packet\n"), text)
        XCTAssertTrue(text.contains("eth0           in   10.0.9.9 > 10.0.1.5  icmp port unreachable  len 56\n"), text)
        let json = try renderReport(p, tags: f.tags) { JSONReport(fileDescriptor: $0) }
        XCTAssertTrue(json.contains(#""icmp_errors":[{"time":"1700000000.000040000","from":"10.0.9.9","type":3,"code":3,"message":"port unreachable"}]"#), json)
        XCTAssertTrue(json.contains(#""icmp":"port unreachable","len":56"#), json)
        XCTAssertTrue(json.contains(#""with_icmp_errors":1,"#), json)
        XCTAssertTrue(text.contains("  1 connection with ICMP errors\n"), text)
        let html = try renderHTML(p, tags: f.tags)
        XCTAssertTrue(html.contains("#1: ICMP port unreachable from 10.0.9.9"), html)
    }

    /// DNS redirected to 15053 with nothing listening there: the pod's stack answers port unreachable from
    /// 127.0.0.1 (NFLOG at OUTPUT, before NAT), and conntrack de-NATs it, so on lo it comes from the resolver and
    /// quotes the query's original destination. Captured on lo only, the query is seen only redirected: the error
    /// names its original destination.
    func testADNSQueryRefusedAt15053KeepsItsErrorAndLearnsItsOriginalDestination() throws {
        var f = PacketFactory()
        let resolver = PacketFactory.ep("10.96.0.10", 53)
        let redirected = FiveTuple(proto: IPProto.udp, src: pod, dst: PacketFactory.ep("127.0.0.1", 15053))
        let original = FiveTuple(proto: IPProto.udp, src: pod, dst: resolver)
        var p = [f.packet(pod, redirected.dst, proto: IPProto.udp, payload: 30, on: lo, direction: .inbound)]
        f.advance(micros: 25)
        p.append(icmpError(&f, from: "10.96.0.10", to: "10.0.1.5", type: 3, code: 3, quoting: original, on: lo, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags)
        XCTAssertEqual(sink.timelines.count, 1, sink.timelines.map { "\($0.original)" }.joined(separator: "; "))
        let t = try XCTUnwrap(sink.timelines.first)
        XCTAssertEqual(t.kind, .dns)
        XCTAssertEqual(t.original, original)
        XCTAssertEqual(t.aliases, [redirected])
        XCTAssertEqual(t.redirect, .redirected(toPort: 15053, originalDestination: resolver))
        XCTAssertEqual(t.icmpErrors.map(\.message), ["port unreachable"])

        // With the twins: the error's copy at OUTPUT (before NAT, from 127.0.0.1, quoting the redirected view)
        // joins the same connection, and each kind of error is listed once.
        var g = PacketFactory()
        var q = [g.nflog(pod, resolver, proto: IPProto.udp, hook: .output, prefix: "mt:4:nat:ISTIO_OUTPUT:1:0000", outIf: 1)]
        q.append(g.packet(pod, redirected.dst, proto: IPProto.udp, payload: 30, on: lo, direction: .inbound))
        g.advance(micros: 25)
        let sent = g.clock
        // The error's NFLOG copy at OUTPUT has no kernel stamp (a locally sent packet): read first, stamped on
        // receipt 11 ms later than lo captured it.
        g.advance(micros: 11_000)
        var pre = icmpError(&g, from: "127.0.0.1", to: "10.0.1.5", type: 3, code: 3, quoting: redirected, on: .netfilter(.output), direction: .outbound)
        var m = NflogMeta(); m.group = 42; m.hook = .output; m.prefixID = g.tags.intern("mt:4:mangle:OUTPUT:1:0000")
        pre.nflog = m
        q.append(pre)
        g.clock = sent
        q.append(icmpError(&g, from: "10.96.0.10", to: "10.0.1.5", type: 3, code: 3, quoting: original, on: lo, direction: .inbound))
        let (sink2, _) = correlate(q, tags: g.tags)
        XCTAssertEqual(sink2.timelines.count, 1, sink2.timelines.map { "\($0.original)" }.joined(separator: "; "))
        let t2 = try XCTUnwrap(sink2.timelines.first)
        XCTAssertEqual(t2.original, original)
        XCTAssertEqual(t2.icmpErrors.count, 1)
        XCTAssertEqual(t2.icmpErrors.first?.from, IPAddress("127.0.0.1"))
        XCTAssertEqual(t2.icmpErrors.first?.time.totalNanoseconds, sent, "the earliest copy's time, not the receipt-stamped one read first")
        XCTAssertEqual(t2.events.filter { $0.tuple.proto == IPProto.icmp }.count, 2)
    }

    func testAnErrorQuotingNoKnownPacketIsItsOwnConnection() throws {
        var f = PacketFactory()
        let unseen = FiveTuple(proto: IPProto.udp, src: pod, dst: PacketFactory.ep("10.0.9.9", 7))
        // The same socket's datagram to another destination, not redirected: no view of the quoted packet.
        let other = f.packet(pod, PacketFactory.ep("10.0.8.8", 9998), proto: IPProto.udp, payload: 5, on: eth0, direction: .outbound)
        let p = [other, icmpError(&f, from: "10.0.9.9", to: "10.0.1.5", type: 3, code: 3, quoting: unseen, on: eth0, direction: .inbound)]
        let (sink, _) = correlate(p, tags: f.tags)
        XCTAssertEqual(sink.timelines.map(\.original.proto), [IPProto.udp, IPProto.icmp])
        XCTAssertEqual(sink.timelines.map(\.kind), [.uncapturedByDesign, .uncapturedByDesign])
        XCTAssertEqual(sink.timelines.map(\.icmpErrors.count), [0, 0])
        let text = try renderReport(p, tags: f.tags) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("uncaptured-by-design  icmp 10.0.9.9 > 10.0.1.5 port unreachable  open at end or idle"), text)
        XCTAssertFalse(text.contains("with ICMP errors"), text)
    }
}
