import XCTest
@testable import Capture

/// Keeps what the correlator emits.
final class CollectingSink: ReportSink {
    var timelines: [ConnectionTimeline] = []
    var findings: [EscapeFinding] = []
    var keepTimelines = true
    var connectionsSeen = 0
    var summary: AnalysisSummary?
    func connection(_ timeline: ConnectionTimeline) {
        connectionsSeen += 1
        if keepTimelines { timelines.append(timeline) }
    }
    func finding(_ finding: EscapeFinding) { findings.append(finding) }
    func finish(_ summary: AnalysisSummary) throws { self.summary = summary }

    func timeline(_ kind: ConnectionKind) -> ConnectionTimeline? { timelines.first { $0.kind == kind } }
}

/// Runs packets through a correlator, as `analyze` does, into a sink that keeps what it emits.
func correlate(_ packets: [PacketRecord], tags: RuleTagTable, ruleset: Ruleset? = nil,
               options: CorrelatorOptions = CorrelatorOptions()) -> (CollectingSink, AnalysisSummary) {
    let sink = CollectingSink()
    let c = Correlator(tags: tags, ruleset: ruleset, options: options, sink: sink)
    for p in packets { c.ingest(p) }
    return (sink, c.finish())
}

/// Runs packets through a correlator into one printer (`makeSink` gets the file descriptor it writes to) and
/// returns what it printed, summary included.
func renderReport(_ packets: [PacketRecord], tags: RuleTagTable, ruleset: Ruleset? = nil,
                  options: CorrelatorOptions = CorrelatorOptions(), _ makeSink: (Int32) -> ReportSink) throws -> String {
    try written(by: { fd in
        let sink = makeSink(fd)
        let c = Correlator(tags: tags, ruleset: ruleset, options: options, sink: sink)
        for p in packets { c.ingest(p) }
        try sink.finish(c.finish())
    })
}

/// What `body` writes to the file descriptor it is given (a scratch file, removed after).
func written(by body: (Int32) throws -> Void) throws -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("mt-render-\(UUID().uuidString)").path
    defer { try? FileManager.default.removeItem(atPath: path) }
    XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: nil), "cannot create a scratch file")
    let fd = open(path, O_WRONLY | O_TRUNC)
    XCTAssertGreaterThanOrEqual(fd, 0)
    do { defer { close(fd) }; try body(fd) }
    return try String(contentsOfFile: path, encoding: .utf8)
}

/// Builds packets the way the decoders fill them, with the ground truth decided by the test.
struct PacketFactory {
    let tags = RuleTagTable()
    var frame: UInt64 = 0
    var clock: Int64 = 1_700_000_000_000_000_000

    static func ep(_ s: String, _ port: UInt16) -> Endpoint { Endpoint(IPAddress(s)!, port) }

    mutating func advance(micros: Int64) { clock += micros * 1_000 }

    mutating func packet(_ src: Endpoint, _ dst: Endpoint, proto: UInt8 = IPProto.tcp, flags: TCPFlags = [.ack],
                         seq: UInt32 = 0, ack: UInt32 = 0, payload: UInt32 = 0,
                         on point: CapturePoint, direction: PacketDirection = .unknown, source: UInt16 = 0) -> PacketRecord {
        frame += 1
        var r = PacketRecord()
        r.ref = FrameRef(source: source, frame: frame)
        r.time = Timestamp(seconds: clock / 1_000_000_000, nanoseconds: Int32(clock % 1_000_000_000))
        r.point = point
        r.direction = direction
        r.tuple = FiveTuple(proto: proto, src: src, dst: dst)
        r.tcpFlags = proto == IPProto.tcp ? flags : []
        r.tcpSeq = seq
        r.tcpAck = ack
        r.payloadLength = payload
        r.ipLength = 40 + payload
        r.wireLength = r.ipLength + 16
        return r
    }

    /// An NFLOG record as `tcpdump -i nflog:G` stores it: hook, prefix, mark, interfaces, optional conntrack.
    mutating func nflog(_ src: Endpoint, _ dst: Endpoint, proto: UInt8 = IPProto.tcp, flags: TCPFlags = [.ack],
                        seq: UInt32 = 0, ack: UInt32 = 0, hook: NetfilterHook, prefix: String, mark: UInt32? = nil,
                        inIf: UInt32? = nil, outIf: UInt32? = nil, ct: ConntrackInfo? = nil) -> PacketRecord {
        var r = packet(src, dst, proto: proto, flags: flags, seq: seq, ack: ack, on: .netfilter(hook), source: 1)
        var m = NflogMeta()
        m.group = 42
        m.hook = hook
        m.prefixID = tags.intern(prefix)
        m.mark = mark
        m.inputIfindex = inIf
        m.outputIfindex = outIf
        m.conntrack = ct
        r.nflog = m
        r.direction = (hook == .output || hook == .postrouting) ? .outbound : .inbound
        return r
    }

    /// An app's SYN redirected to ztunnel: the REDIRECT twin's NFLOG record (pre-NAT) and the packet on lo.
    mutating func redirectedSYN(_ app: Endpoint, to dst: Endpoint, seq: UInt32) -> [PacketRecord] {
        [nflog(app, dst, flags: [.syn], seq: seq, hook: .output, prefix: twin("nat", "ISTIO_OUTPUT", 4), outIf: 2),
         packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.syn], seq: seq, on: lo, direction: .inbound)]
    }

    /// ztunnel's SYN out of the pod carrying its mark: the observation point's NFLOG record and the packet on eth0.
    mutating func markedSYN(_ src: Endpoint, to dst: Endpoint, seq: UInt32) -> [PacketRecord] {
        [nflog(src, dst, flags: [.syn], seq: seq, hook: .postrouting,
               prefix: RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix,
               mark: 0x539, outIf: 2),
         packet(src, dst, flags: [.syn], seq: seq, on: eth0, direction: .outbound)]
    }
}

/// A service with an endpoint in the mesh (a tunnel to its :15008) and one outside it (a passthrough), and two app
/// connections to it from one pod, for the VIP order tests.
enum MixedService {
    static let vip = PacketFactory.ep("10.96.0.40", 80)
    static let inMesh = PacketFactory.ep("10.0.2.2", 15008), outside = PacketFactory.ep("10.0.9.9", 80)
    static let first = PacketFactory.ep("10.0.1.5", 41000), second = PacketFactory.ep("10.0.1.5", 41001)
    static let tunnel = PacketFactory.ep("10.0.1.5", 50000), passthrough = PacketFactory.ep("10.0.1.5", 50002)
    /// Each connection's initial sequence number: the app connections', ztunnel's tunnel's and passthrough's.
    static let isn: [Endpoint: UInt32] = [first: 1000, second: 2000, tunnel: 7000, passthrough: 8000]

    /// Both app connections dial the VIP, the second 60 µs after the first.
    static func bothDial(_ f: inout PacketFactory) -> [PacketRecord] {
        var p = f.redirectedSYN(first, to: vip, seq: isn[first]!)
        f.advance(micros: 60)
        p += f.redirectedSYN(second, to: vip, seq: isn[second]!)
        return p
    }

    /// A RST ending each of `ends`, in that order, at the factory's time: an app connection's on lo (towards ztunnel's
    /// 15001), ztunnel's tunnel or passthrough out of the pod.
    static func resets(_ ends: [Endpoint], _ f: inout PacketFactory) -> [PacketRecord] {
        ends.map { e in
            switch e {
            case first, second:
                f.packet(e, CorrelatorTests.capture15001, flags: [.rst], seq: isn[e]! + 1, on: lo, direction: .inbound)
            default:
                f.packet(e, e == tunnel ? inMesh : outside, flags: [.rst], seq: isn[e]! + 1, on: eth0, direction: .outbound)
            }
        }
    }

    /// No escape, and each app connection joined, low, to the connection of ztunnel's whose source is paired with it.
    @discardableResult
    static func assertJoined(_ p: [PacketRecord], tags: RuleTagTable, _ pairs: [(app: Endpoint, inner: Endpoint)],
                             file: StaticString = #filePath, line: UInt = #line) throws -> CollectingSink {
        let (sink, summary) = correlate(p, tags: tags)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "), file: file, line: line)
        for (app, inner) in pairs {
            let conn = try XCTUnwrap(sink.timelines.first { $0.original.src == app }, file: file, line: line)
            let hop = try XCTUnwrap(conn.hops.first, "\(app) without a tunnel", file: file, line: line)
            XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.src, inner, "\(app)", file: file, line: line)
            XCTAssertEqual(hop.confidence, .low, file: file, line: line)
        }
        return sink
    }
}

let lo = CapturePoint(kind: .interface, interface: "lo", isLoopback: true)
let eth0 = CapturePoint.interface("eth0")

/// The seed ruleset's nat rules, built by hand (positions as in seed-ambient-pod.iptables-save.txt).
func seedNatRuleset() -> Ruleset {
    func rule(_ chain: String, _ pos: Int, _ text: String, _ target: RuleTarget, _ role: AmbientRole, table: String = "nat") -> Rule {
        Rule(table: table, chain: chain, position: pos, family: .ipv4, backend: .iptablesNft, text: text,
             matchText: text, matches: [], target: target, role: role)
    }
    let natOut = Chain(name: "ISTIO_OUTPUT", rules: [
        rule("ISTIO_OUTPUT", 1, "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT", .accept, .probeBypassOutbound),
        rule("ISTIO_OUTPUT", 2, "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT", .accept, .ztunnelReplyBypass),
        rule("ISTIO_OUTPUT", 3, "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT", .accept, .localBypass),
        rule("ISTIO_OUTPUT", 4, "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
             .redirect(toPort: 15001), .outboundCapture),
    ])
    let natPre = Chain(name: "ISTIO_PRERT", rules: [
        rule("ISTIO_PRERT", 1, "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT", .accept, .probeBypassInbound),
        rule("ISTIO_PRERT", 2, "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
             .redirect(toPort: 15006), .inboundCapture),
    ])
    let manglePre = Chain(name: "ISTIO_PRERT", rules: [
        rule("ISTIO_PRERT", 1, "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
             .connmarkSet(value: 0x111, mask: 0xfff), .connmarkFromZtunnel, table: "mangle"),
    ])
    return Ruleset(tables: [Table(name: "nat", family: .ipv4, backend: .iptablesNft, chains: [natOut, natPre]),
                            Table(name: "mangle", family: .ipv4, backend: .iptablesNft, chains: [manglePre])],
                   origin: "test")
}

func twin(_ table: String, _ chain: String, _ pos: Int, ruleset: Ruleset? = nil) -> String {
    let rule = ruleset?.tables.first { $0.name == table }?.chain(chain)?.rules[pos - 1]
    return RuleTag(family: .v4, table: table, chain: chain, position: .rule(pos),
                   textHash: rule.map { RuleTag.textHash($0.canonicalText) }).prefix
}

final class CorrelatorTests: XCTestCase {
    static let app = PacketFactory.ep("10.0.1.5", 40000)
    static let service = PacketFactory.ep("10.0.2.2", 80)
    static let ztunnelOut = PacketFactory.ep("10.0.1.5", 50000)
    static let peerHBONE = PacketFactory.ep("10.0.2.2", 15008)
    static let capture15001 = PacketFactory.ep("127.0.0.1", 15001)
    let app = CorrelatorTests.app
    let service = CorrelatorTests.service
    let ztunnelOut = CorrelatorTests.ztunnelOut
    let peerHBONE = CorrelatorTests.peerHBONE
    let capture15001 = CorrelatorTests.capture15001

    /// The app's connection to S:80: pre-NAT at nat OUTPUT, post-NAT on lo, replies de-NATed on lo; then
    /// ztunnel's 0x539 connection to S:15008 on eth0. Returns the packets in capture order.
    static func outboundScenario(_ f: inout PacketFactory, ruleset: Ruleset?, destination: Endpoint? = nil,
                                 hboneTo: Endpoint? = nil) -> [PacketRecord] {
        let dst = destination ?? service
        let inner = hboneTo ?? peerHBONE
        var out: [PacketRecord] = []
        out.append(f.nflog(app, dst, flags: [.syn], seq: 1000, hook: .output,
                           prefix: twin("nat", "ISTIO_OUTPUT", 4, ruleset: ruleset), outIf: 2))
        f.advance(micros: 5)
        out.append(f.packet(app, capture15001, flags: [.syn], seq: 1000, on: lo, direction: .outbound))
        out.append(f.packet(app, capture15001, flags: [.syn], seq: 1000, on: lo, direction: .inbound))
        f.advance(micros: 20)
        out.append(f.packet(dst, app, flags: [.syn, .ack], seq: 5000, ack: 1001, on: lo, direction: .outbound))
        f.advance(micros: 20)
        out.append(f.packet(app, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .outbound))
        f.advance(micros: 300)
        out.append(f.nflog(ztunnelOut, inner, flags: [.syn], seq: 7000, hook: .postrouting,
                           prefix: RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix,
                           mark: 0x539, outIf: 2))
        out.append(f.packet(ztunnelOut, inner, flags: [.syn], seq: 7000, on: eth0, direction: .outbound))
        f.advance(micros: 400)
        out.append(f.packet(inner, ztunnelOut, flags: [.syn, .ack], seq: 9000, ack: 7001, on: eth0, direction: .inbound))
        out.append(f.packet(ztunnelOut, inner, flags: [.ack], seq: 7001, ack: 9001, on: eth0, direction: .outbound))
        f.advance(micros: 100)
        out.append(f.packet(app, capture15001, flags: [.ack, .psh], seq: 1001, ack: 5001, payload: 100, on: lo, direction: .outbound))
        f.advance(micros: 50)
        out.append(f.packet(ztunnelOut, inner, flags: [.ack, .psh], seq: 7001, ack: 9001, payload: 180, on: eth0, direction: .outbound))
        f.advance(micros: 900)
        out.append(f.packet(inner, ztunnelOut, flags: [.ack, .psh], seq: 9001, ack: 7181, payload: 400, on: eth0, direction: .inbound))
        f.advance(micros: 50)
        out.append(f.packet(dst, app, flags: [.ack, .psh], seq: 5001, ack: 1101, payload: 300, on: lo, direction: .outbound))
        f.advance(micros: 50)
        out.append(f.packet(app, capture15001, flags: [.fin, .ack], seq: 1101, ack: 5301, on: lo, direction: .outbound))
        out.append(f.packet(dst, app, flags: [.fin, .ack], seq: 5301, ack: 1102, on: lo, direction: .outbound))
        out.append(f.packet(ztunnelOut, inner, flags: [.fin, .ack], seq: 7181, ack: 9401, on: eth0, direction: .outbound))
        out.append(f.packet(inner, ztunnelOut, flags: [.fin, .ack], seq: 9401, ack: 7182, on: eth0, direction: .inbound))
        return out
    }

    func testTheThreeNATViewsOfAnOutboundConnectionFormOneTimeline() throws {
        var f = PacketFactory()
        let packets = Self.outboundScenario(&f, ruleset: nil)
        let (sink, summary) = correlate(packets, tags: f.tags)
        let appConn = try XCTUnwrap(sink.timeline(.appOutbound))
        XCTAssertEqual(appConn.original, FiveTuple(proto: IPProto.tcp, src: app, dst: service))
        XCTAssertEqual(appConn.aliases, [FiveTuple(proto: IPProto.tcp, src: app, dst: capture15001)])
        XCTAssertEqual(appConn.redirect, .redirected(toPort: 15001, originalDestination: service))
        // pre-NAT NFLOG + 2 SYN copies + SYN-ACK + ACK + data both ways + 2 FINs
        XCTAssertEqual(appConn.events.count, 9)
        XCTAssertEqual(appConn.events.filter(\.isReply).count, 3)
        XCTAssertEqual(Set(appConn.events.map { FlowKey($0.tuple) }).count, 2, "two distinct tuples, one connection")
        XCTAssertTrue(appConn.closed)
        XCTAssertEqual(summary.connections, 2)
        XCTAssertEqual(sink.timelines.count, 2)
        XCTAssertEqual(summary.escapes, 0)
    }

    func testOutboundHopIsJoinedWithHighConfidenceAndItsEvidence() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let (sink, summary) = correlate(Self.outboundScenario(&f, ruleset: rules), tags: f.tags, ruleset: rules)
        let appConn = try XCTUnwrap(sink.timeline(.appOutbound))
        let hbone = try XCTUnwrap(sink.timeline(.hboneOutbound))
        XCTAssertEqual(hbone.original, FiveTuple(proto: IPProto.tcp, src: ztunnelOut, dst: peerHBONE))
        XCTAssertEqual(summary.hops, 1)
        let hop = try XCTUnwrap(appConn.hops.first)
        XCTAssertEqual(hop.direction, .outbound)
        XCTAssertEqual(hop.outer, appConn.id)
        XCTAssertEqual(hop.inner, hbone.id)
        XCTAssertEqual(hop.confidence, .high)
        let kinds = Set(hop.evidence.map(\.kind))
        XCTAssertTrue(kinds.isSuperset(of: ["ztunnel-mark", "original-destination", "timing", "unique", "bytes"]), "\(kinds)")
        XCTAssertEqual(hbone.hops.first?.outer, appConn.id)
        // With the ruleset the pre-NAT hit names the rule, its role and the original destination.
        let hitEvent = try XCTUnwrap(appConn.events.first { $0.hit != nil })
        XCTAssertEqual(hitEvent.hit?.role, .outboundCapture)
        XCTAssertEqual(hitEvent.hit?.action, .redirected(toPort: 15001, originalDestination: service))
        XCTAssertEqual(hitEvent.point, .netfilter(.output))
        XCTAssertEqual(hbone.marks, [0x539])
        XCTAssertEqual(summary.ruleHits.count, 2)
    }

    func testAServiceVIPResolvedElsewhereStillJoinsButOnlyWithLowConfidence() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let (sink, _) = correlate(Self.outboundScenario(&f, ruleset: nil, destination: vip), tags: f.tags)
        let appConn = try XCTUnwrap(sink.timeline(.appOutbound))
        let hop = try XCTUnwrap(appConn.hops.first)
        XCTAssertEqual(hop.confidence, .low)
        XCTAssertFalse(hop.evidence.contains { $0.kind == "original-destination" })
    }

    func testAServiceVIPWithTwoTunnelsThatCouldBeItsTakesOneAndSaysSo() throws {
        // The app dials a VIP; ztunnel opens two marked tunnels to two peers' :15008 at the same moment: which one
        // carries the app's connection cannot be told. It takes one, at low confidence, saying there were two; the
        // other is explained by no app connection in the capture, and says so. (It took neither: both read as
        // forged marks, and under concurrency every VIP tunnel but a lone one did.)
        var f = PacketFactory()
        var p = Self.outboundScenario(&f, ruleset: nil, destination: PacketFactory.ep("10.96.0.20", 80))
        let otherTunnel = PacketFactory.ep("10.0.1.5", 50002), otherPeer = PacketFactory.ep("10.0.3.3", 15008)
        let firstTunnelPacket = try XCTUnwrap(p.firstIndex { $0.tuple.dst == peerHBONE })
        // The second tunnel's SYN, at the same time as the first's.
        var second = f.nflog(otherTunnel, otherPeer, flags: [.syn], seq: 3000, hook: .postrouting,
                             prefix: RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix,
                             mark: 0x539, outIf: 2)
        second.time = p[firstTunnelPacket].time
        p.insert(second, at: firstTunnelPacket + 1)
        let (sink, summary) = correlate(p, tags: f.tags)
        let appConn = try XCTUnwrap(sink.timeline(.appOutbound))
        let hop = try XCTUnwrap(appConn.hops.first, "joined to neither of two tunnels that fit equally")
        XCTAssertEqual(hop.confidence, .low)
        let text = try renderReport(p, tags: f.tags) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("one of 2 marked connections no other connection explains that began while this one ran"), text)
        XCTAssertEqual(sink.timelines.filter { $0.original.dst.port == 15008 }.count, 2)
        XCTAssertEqual(summary.escapes, 1)
        XCTAssertEqual(sink.findings.filter(\.isEscape).map(\.findingClass), [.forgedZtunnelMark])
    }

    /// Thousands of VIP connections one after another, each with its tunnel: the outbound candidate index is pruned
    /// every few thousand filings, all its lists at once. That pruning ran inside the access to the list being filed
    /// into and the tests' debug build stopped on the exclusivity violation (a live test, after 4096 filings); and
    /// every connection still gets its tunnel, none left to read as a forged mark.
    func testManyVIPConnectionsKeepTheCandidateIndexPrunedAndEachGetItsTunnel() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let n = 2200   // two filings each: past the first pruning, at 4096
        var p: [PacketRecord] = []
        p.reserveCapacity(n * 5)
        for i in 0..<n {
            let app = Endpoint(IPAddress(v4: 0x0A00_0105), UInt16(20_000 + i))
            let tunnel = Endpoint(IPAddress(v4: 0x0A00_0105), UInt16(40_000 + i))
            p += f.redirectedSYN(app, to: vip, seq: 1000)
            f.advance(micros: 300)
            p += f.markedSYN(tunnel, to: endpoint, seq: 7000)
            f.advance(micros: 200)
            p.append(f.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.rst], seq: 1001, on: lo, direction: .inbound))
            f.advance(micros: 500)
        }
        let (sink, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(summary.escapes, 0, sink.findings.prefix(3).map(\.summary).joined(separator: "; "))
        XCTAssertEqual(summary.hops, n)
        let byID = Dictionary(sink.timelines.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        var right = 0
        for t in sink.timelines where t.kind == .appOutbound {
            let hop = try XCTUnwrap(t.hops.first, "\(t.original) without a tunnel")
            if byID[hop.inner]?.original.src.port == t.original.src.port &+ 20_000 { right += 1 }
        }
        XCTAssertEqual(right, n, "one after another, each takes its own")
    }

    /// Many connections to a service VIP at once, as any pod calling a service makes them: ztunnel's tunnels go to
    /// the endpoint pod, matching no app connection's destination. Each app connection takes the first tunnel opened
    /// after it, in the order the connections began, whatever order they end (and are emitted) in: no tunnel is
    /// left to read as a forged mark. Live, 300 such connections gave 299 forged-mark escapes and 1 hop.
    func testConcurrentConnectionsToAServiceVIPEachTakeATunnelInTheOrderTheyBegan() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let n = 3
        var p: [PacketRecord] = []
        // n app SYNs 100 µs apart, redirected; then ztunnel's n tunnels in the same order, 400 µs after each.
        for i in 0..<n {
            let app = PacketFactory.ep("10.0.1.5", UInt16(41000 + i))
            p += f.redirectedSYN(app, to: vip, seq: UInt32(1000 * (i + 1)))
            f.advance(micros: 100)
        }
        f.advance(micros: 300)
        for i in 0..<n {
            let tunnel = PacketFactory.ep("10.0.1.5", UInt16(50000 + i))
            p += f.markedSYN(tunnel, to: endpoint, seq: UInt32(7000 + i))
            f.advance(micros: 100)
        }
        // The app connections end in the reverse order, each emitted (a close linger later) before the next ends:
        // the last one begun is emitted first.
        f.advance(micros: 5_000)
        for i in (0..<n).reversed() {
            let app = PacketFactory.ep("10.0.1.5", UInt16(41000 + i))
            p.append(f.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.rst], seq: UInt32(1000 * (i + 1) + 1), on: lo, direction: .inbound))
            f.advance(micros: 2_100_000)
        }
        let (sink, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "))
        XCTAssertEqual(summary.hops, n)
        for i in 0..<n {
            let app = try XCTUnwrap(sink.timelines.first { $0.original.src.port == UInt16(41000 + i) && $0.original.dst == vip })
            let hop = try XCTUnwrap(app.hops.first, "app \(i) without a tunnel")
            let tunnel = try XCTUnwrap(sink.timelines.first { $0.id == hop.inner })
            XCTAssertEqual(tunnel.original.src.port, UInt16(50000 + i), "app \(i) took another's tunnel")
            XCTAssertEqual(hop.confidence, .low)
        }
    }

    /// A VIP connection's tunnel emitted before the app's connection is: ztunnel closed it and reused its port for
    /// the next connection's tunnel, so the tuple's new SYN emits the old tunnel at once. The app connections join
    /// only when they are emitted (no tunnel names the VIP), so the first tunnel read as a forged mark and the first
    /// app took the second tunnel, leaving the second app none (an offline capture of 5000 VIP connections: 62
    /// forged marks, 88 % of the joins shifted by one).
    func testAVIPTunnelEmittedBeforeItsAppConnectionIsStillItsTunnel() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let tunnel = PacketFactory.ep("10.0.1.5", 50000)
        let first = PacketFactory.ep("10.0.1.5", 41000), second = PacketFactory.ep("10.0.1.5", 41001)
        var p = f.redirectedSYN(first, to: vip, seq: 1000)
        f.advance(micros: 300)
        p += f.markedSYN(tunnel, to: endpoint, seq: 7000)
        f.advance(micros: 500)
        p.append(f.packet(endpoint, tunnel, flags: [.rst], seq: 9000, on: eth0, direction: .inbound))
        f.advance(micros: 1_000)
        p += f.redirectedSYN(second, to: vip, seq: 2000)
        f.advance(micros: 300)
        p += f.markedSYN(tunnel, to: endpoint, seq: 8000)   // the same tuple again: the first tunnel is emitted now
        f.advance(micros: 500)
        p.append(f.packet(first, capture15001, flags: [.rst], seq: 1001, on: lo, direction: .inbound))
        p.append(f.packet(second, capture15001, flags: [.rst], seq: 2001, on: lo, direction: .inbound))
        let (sink, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "))
        XCTAssertEqual(summary.hops, 2)
        let tunnels = sink.timelines.filter { $0.original.src == tunnel }.sorted { $0.firstSeen < $1.firstSeen }
        XCTAssertEqual(tunnels.count, 2)
        for (i, app) in [first, second].enumerated() {
            let conn = try XCTUnwrap(sink.timelines.first { $0.original.src == app })
            let hop = try XCTUnwrap(conn.hops.first, "app \(i) without a tunnel")
            XCTAssertEqual(hop.inner, tunnels[i].id, "app \(i) took another's tunnel")
        }
    }

    /// A tunnel that began after a VIP connection had ended did not carry it: an earlier app connection left without
    /// a tunnel of its own (ztunnel refused it) does not take the next connection's tunnel, which began up to the hop
    /// window (2 s) later and was taken by the earliest connection without a tunnel, whatever their times.
    func testAVIPConnectionDoesNotTakeATunnelThatBeganAfterItEnded() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let refused = PacketFactory.ep("10.0.1.5", 41000), served = PacketFactory.ep("10.0.1.5", 41001)
        var p = f.redirectedSYN(refused, to: vip, seq: 1000)
        f.advance(micros: 200)
        p.append(f.packet(refused, capture15001, flags: [.rst], seq: 1001, on: lo, direction: .inbound))
        f.advance(micros: 5_000)
        p += f.redirectedSYN(served, to: vip, seq: 2000)
        f.advance(micros: 300)
        p += f.markedSYN(ztunnelOut, to: endpoint, seq: 7000)
        f.advance(micros: 500)
        p.append(f.packet(served, capture15001, flags: [.rst], seq: 2001, on: lo, direction: .inbound))
        let hop = try assertOnlyTheServedOneGetsTheTunnel(p, tags: f.tags, refused: refused, served: served)
        XCTAssertTrue(hop.evidence.contains { $0.detail.contains("the only marked connection no other connection explains") },
                      "\(hop.evidence.map(\.detail))")
    }

    /// The same when the last packet of the connection without a tunnel is placed after a record stamped later (a
    /// live trace's NFLOG records are stamped on receipt, up to a flush late): the correlator's clock is then ahead
    /// of the packet, and by that clock the connection seemed to end after the next one's tunnel began, and took it.
    /// Its end is when its last packet was, by the packets' own clock.
    func testAVIPConnectionDoesNotTakeATunnelThatBeganAfterItsLastPacketThoughTheClockRanAhead() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let refused = PacketFactory.ep("10.0.1.5", 41000), served = PacketFactory.ep("10.0.1.5", 41001)
        let t0 = f.clock
        var p = f.redirectedSYN(refused, to: vip, seq: 1000)
        f.advance(micros: 1_000)
        p += f.redirectedSYN(served, to: vip, seq: 2000)
        f.advance(micros: 300)
        p += f.markedSYN(ztunnelOut, to: endpoint, seq: 7000)
        // A record stamped 9 ms in (a local connection of the pod's, on lo), then the refused connection's RST from
        // 200 µs in and the served one's from 1.8 ms, placed after it.
        f.clock = t0 + 9_000_000
        p.append(f.packet(PacketFactory.ep("127.0.0.1", 42000), PacketFactory.ep("127.0.0.1", 8080), flags: [.syn], seq: 1, on: lo,
                          direction: .outbound))
        f.clock = t0 + 200_000
        p.append(f.packet(refused, capture15001, flags: [.rst], seq: 1001, on: lo, direction: .inbound))
        f.clock = t0 + 1_800_000
        p.append(f.packet(served, capture15001, flags: [.rst], seq: 2001, on: lo, direction: .inbound))
        try assertOnlyTheServedOneGetsTheTunnel(p, tags: f.tags, refused: refused, served: served)
    }

    /// Three connections to a service VIP and ztunnel's three tunnels, the first connection's opened last (its thread
    /// starved): by the order the first took the second's tunnel and the second the third's, and the third, short,
    /// ended before the one tunnel left began. None could take it back from the one before (that one ended before
    /// the tunnel left too), so it read as a forged mark on a healthy pod. The tunnel left now goes to the first
    /// connection, which began before it and was still running, and each tunnel after it one step down the chain.
    func testATunnelLeftAtTheEndOfAShiftByTheOrderMovesTheChainAlong() throws {
        let s = ShiftByTheOrder(pooledTunnel: false)
        let (sink, summary) = correlate(s.packets, tags: s.tags)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "))
        for i in 0..<3 {
            let hop = try s.hop(of: i, in: sink)
            XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.src, s.tunnels[i], "app \(i)")
            XCTAssertEqual(hop.confidence, .low)
            XCTAssertTrue(hop.evidence.contains { $0.detail.contains("moved with 2 others along a chain") }, "\(hop.evidence.map(\.detail))")
        }
    }

    /// The same, the third connection gone to a tunnel ztunnel had open already (pooled), which carried nothing else:
    /// the chain does not end there, since moving it would leave that tunnel to no connection instead (the mixed-
    /// service live test failed so once in 60 runs). The tunnel the order left stays the one unexplained.
    func testAChainDoesNotEndOnAPooledConnectionWhoseTunnelItWouldLeaveWithNone() throws {
        let s = ShiftByTheOrder(pooledTunnel: true)
        let (sink, summary) = correlate(s.packets, tags: s.tags)
        let pooled = try XCTUnwrap(sink.timelines.first { $0.original.src == ShiftByTheOrder.pooled })
        XCTAssertEqual(try s.hop(of: 2, in: sink).inner, pooled.id, "the third connection left its pooled tunnel")
        XCTAssertEqual(pooled.hops.count, 1, "the pooled tunnel left with \(pooled.hops.count) connections")
        XCTAssertEqual(summary.escapes, 1, sink.findings.map(\.summary).joined(separator: "; "))
        let left = try XCTUnwrap(sink.timelines.first { $0.original.src == s.tunnels[0] })
        XCTAssertEqual(left.hops.count, 0)
        for i in 0..<2 {
            XCTAssertEqual(sink.timelines.first { $0.id == (try? s.hop(of: i, in: sink))?.inner }?.original.src,
                           s.tunnels[i + 1], "app \(i) moved")
        }
    }

    /// The plain shift again, with a fourth connection to the VIP still open across it that went through a tunnel
    /// ztunnel kept (pooled, with two other connections), chosen when a later connection was emitted, long before:
    /// that tunnel closed and was printed, listing the open connection as carried, in a batch before the shift's.
    /// The open connection began before the tunnel left and ran past it, so the chain could end there (its tunnel
    /// keeps two others); it does not, since a moved join would contradict what was printed. The chain runs on
    /// along the shift as in the plain case, and the open connection stays with the printed tunnel.
    func testAChainDoesNotEndOnAPooledConnectionWhoseTunnelIsPrintedAlready() throws {
        let s = ShiftByTheOrder(pooledTunnel: false, printedPool: true)
        var options = CorrelatorOptions()
        options.sweepIntervalNanos = 50_000
        options.closeLingerNanos = 100_000_000
        let (sink, summary) = correlate(s.packets, tags: s.tags, options: options)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "))
        let order = sink.timelines.map(\.original.src)
        let pool = try XCTUnwrap(sink.timelines.first { $0.original.src == ShiftByTheOrder.printedPool })
        XCTAssertLessThan(try XCTUnwrap(order.firstIndex(of: pool.original.src)),
                          try XCTUnwrap(order.firstIndex(of: s.tunnels[0])), "the pooled tunnel was not printed first")
        XCTAssertEqual(pool.hops.count, 3, "the printed tunnel did not list the three connections it carried")
        let open = try XCTUnwrap(sink.timelines.first { $0.original.src == ShiftByTheOrder.openOnPool })
        XCTAssertEqual(try XCTUnwrap(open.hops.first, "the open connection without a tunnel").inner, pool.id,
                       "the open connection left the tunnel printed with it")
        for i in 0..<3 {
            let hop = try s.hop(of: i, in: sink)
            XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.src, s.tunnels[i], "app \(i)")
        }
    }

    /// The longest chain the search follows (`Correlator.orderChainSteps`), on a thread with the live reader's stack
    /// (`NetnsThread.stackSize`, 1 MB). Written recursively (a call per move), the search ran this on 1 MB in the debug
    /// build and crashed on 512 KB; it keeps its own stack now, and runs it on 64 KB. 510 connections a millisecond
    /// apart, each but the first taking the next one's tunnel by the order.
    func testTheLongestChainRunsOnTheLiveReadersStack() throws {
        let s = ShiftByTheOrder(count: 510, pooledTunnel: false)
        final class Result: @unchecked Sendable { var value: (CollectingSink, AnalysisSummary)? }
        let result = Result(), done = DispatchSemaphore(value: 0)
        let thread = Thread {
            result.value = correlate(s.packets, tags: s.tags)
            done.signal()
        }
        thread.stackSize = NetnsThread.stackSize
        thread.start()
        done.wait()
        let (sink, summary) = try XCTUnwrap(result.value)
        XCTAssertEqual(summary.escapes, 0, sink.findings.prefix(3).map(\.summary).joined(separator: "; "))
        for i in [0, 1, 255, 509] {
            let hop = try s.hop(of: i, in: sink)
            XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.src, s.tunnels[i], "app \(i)")
            XCTAssertTrue(hop.evidence.contains { $0.detail.contains("moved with 509 others along a chain") }, "\(hop.evidence.map(\.detail))")
        }
    }

    /// The chain tests' capture: `count` connections to a service VIP, the first from 0 to 1.5 s, the others one a
    /// millisecond, each ending after the next one's tunnel began but the last (its own begins 100 µs after it); the
    /// first one's tunnel at `count` ms. With `pooledTunnel`, a tunnel of ztunnel's open from before the first
    /// connection, carrying data while the last one ran. With `printedPool`, before them all (from -1 s) another
    /// tunnel of ztunnel's (`printedPool`) that carried three connections to the VIP without tunnels of their own:
    /// one that ended soon, one (`openOnPool`) that runs on to 60 ms, and one that began after it and ended at once,
    /// at whose emission the open one chose the pooled tunnel; the first connection ends at 50 ms. Read with a
    /// 100 ms linger and a 50 µs sweep, the pooled tunnel (closed at -0.6 s) is printed at the first connection's
    /// SYN, in a batch before the shift's, which all come out at the end.
    struct ShiftByTheOrder {
        static let vip = PacketFactory.ep("10.96.0.20", 80)
        static let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        static let pooled = PacketFactory.ep("10.0.1.5", 60000)
        static let printedPool = PacketFactory.ep("10.0.1.5", 60001)
        static let openOnPool = PacketFactory.ep("10.0.1.5", 19997)
        let apps: [Endpoint]
        let tunnels: [Endpoint]
        let packets: [PacketRecord]
        let tags: RuleTagTable

        init(count n: Int = 3, pooledTunnel: Bool, printedPool: Bool = false) {
            apps = (0..<n).map { PacketFactory.ep("10.0.1.5", UInt16(20000 + $0)) }
            tunnels = (0..<n).map { PacketFactory.ep("10.0.1.5", UInt16(40000 + $0)) }
            var f = PacketFactory()
            let t0 = f.clock
            // (µs from the start, packets): the apps' SYNs and RSTs, the tunnels' SYNs.
            var timed: [(Int64, [PacketRecord])] = []
            func at(_ micros: Int64, _ make: (inout PacketFactory) -> [PacketRecord]) {
                f.clock = t0 + micros * 1_000
                timed.append((micros, make(&f)))
            }
            // A connection to the VIP, redirected: its SYN and, refused, its RST.
            func vipCall(_ app: Endpoint, from: Int64, to: Int64, seq: UInt32) {
                at(from) { $0.redirectedSYN(app, to: Self.vip, seq: seq) }
                at(to) { [$0.packet(app, CorrelatorTests.capture15001, flags: [.rst], seq: seq + 1, on: lo, direction: .inbound)] }
            }
            let firstEnds: Int64 = printedPool ? 50_000 : 1_500_000
            for i in 0..<n {
                let tunnel = tunnels[i], k = Int64(i)
                let (from, to) = i == 0 ? (Int64(0), firstEnds) : (k * 1_000, i == n - 1 ? k * 1_000 + 500 : k * 1_000 + 1_500)
                vipCall(apps[i], from: from, to: to, seq: UInt32(1000 * (i + 1)))
                at(i == 0 ? Int64(n) * 1_000 : k * 1_000 + 100) { $0.markedSYN(tunnel, to: Self.endpoint, seq: UInt32(7000 + i)) }
            }
            if pooledTunnel {
                at(-1_000) { $0.markedSYN(Self.pooled, to: Self.endpoint, seq: 9000) }
                at(Int64(n - 1) * 1_000 + 200) {
                    [$0.packet(Self.pooled, Self.endpoint, flags: [.ack, .psh], seq: 9001, payload: 100, on: eth0, direction: .outbound)]
                }
            }
            if printedPool {
                at(-1_000_000) { $0.markedSYN(Self.printedPool, to: Self.endpoint, seq: 9500) }
                vipCall(PacketFactory.ep("10.0.1.5", 19998), from: -950_000, to: -770_000, seq: 300)
                vipCall(Self.openOnPool, from: -900_000, to: 60_000, seq: 400)
                vipCall(PacketFactory.ep("10.0.1.5", 19999), from: -800_000, to: -799_000, seq: 500)
                at(-780_000) {
                    [$0.packet(Self.printedPool, Self.endpoint, flags: [.ack, .psh], seq: 9501, payload: 100, on: eth0, direction: .outbound)]
                }
                at(-600_000) { [$0.packet(Self.printedPool, Self.endpoint, flags: [.rst], seq: 9601, on: eth0, direction: .outbound)] }
            }
            packets = timed.sorted { $0.0 < $1.0 }.flatMap(\.1)
            tags = f.tags
        }

        func hop(of i: Int, in sink: CollectingSink) throws -> ZtunnelHop {
            let conn = try XCTUnwrap(sink.timelines.first { $0.original.src == apps[i] })
            return try XCTUnwrap(conn.hops.first, "app \(i) without a tunnel")
        }
    }

    /// The two tests above: no escape, the refused connection without a tunnel, the served one joined to ztunnel's.
    /// Returns the served one's hop.
    @discardableResult
    func assertOnlyTheServedOneGetsTheTunnel(_ p: [PacketRecord], tags: RuleTagTable, refused: Endpoint, served: Endpoint,
                                             file: StaticString = #filePath, line: UInt = #line) throws -> ZtunnelHop {
        let (sink, summary) = correlate(p, tags: tags)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "), file: file, line: line)
        let first = try XCTUnwrap(sink.timelines.first { $0.original.src == refused }, file: file, line: line)
        XCTAssertEqual(first.hops.count, 0, "took a tunnel that began after its last packet", file: file, line: line)
        let second = try XCTUnwrap(sink.timelines.first { $0.original.src == served }, file: file, line: line)
        let hop = try XCTUnwrap(second.hops.first, "the tunnel went to neither", file: file, line: line)
        XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.src, ztunnelOut, file: file, line: line)
        return hop
    }

    /// A connection to a service VIP that lasts longer than the hop window (a gRPC or keep-alive connection to a
    /// service, minutes long): joined only when it is emitted, it and its tunnel had aged out of the candidates by
    /// then, and the tunnel read as a forged mark.
    func testALongLivedVIPConnectionKeepsItsTunnel() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        var p = f.redirectedSYN(app, to: vip, seq: 1000)
        f.advance(micros: 20)
        p.append(f.packet(vip, app, flags: [.syn, .ack], seq: 5000, ack: 1001, on: lo, direction: .inbound))
        p.append(f.packet(app, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .inbound))
        f.advance(micros: 300)
        p += f.markedSYN(ztunnelOut, to: endpoint, seq: 7000)
        f.advance(micros: 100)
        p.append(f.packet(endpoint, ztunnelOut, flags: [.syn, .ack], seq: 9000, ack: 7001, on: eth0, direction: .inbound))
        p.append(f.packet(ztunnelOut, endpoint, flags: [.ack], seq: 7001, ack: 9001, on: eth0, direction: .outbound))
        // A request and its reply every second for a minute, through the tunnel.
        var appSeq: UInt32 = 1001, vipSeq: UInt32 = 5001, outSeq: UInt32 = 7001, inSeq: UInt32 = 9001
        func data(_ src: Endpoint, _ dst: Endpoint, _ seq: inout UInt32, ack: UInt32, _ bytes: UInt32, on point: CapturePoint,
                  _ direction: PacketDirection, after micros: Int64) {
            f.advance(micros: micros)
            p.append(f.packet(src, dst, flags: [.ack, .psh], seq: seq, ack: ack, payload: bytes, on: point, direction: direction))
            seq &+= bytes
        }
        for _ in 0..<60 {
            data(app, capture15001, &appSeq, ack: vipSeq, 100, on: lo, .inbound, after: 1_000_000)
            data(ztunnelOut, endpoint, &outSeq, ack: inSeq, 140, on: eth0, .outbound, after: 60)
            data(endpoint, ztunnelOut, &inSeq, ack: outSeq, 340, on: eth0, .inbound, after: 400)
            data(vip, app, &vipSeq, ack: appSeq, 300, on: lo, .inbound, after: 60)
        }
        f.advance(micros: 1_000)
        p.append(f.packet(app, capture15001, flags: [.fin, .ack], seq: appSeq, ack: vipSeq, on: lo, direction: .inbound))
        p.append(f.packet(vip, app, flags: [.fin, .ack], seq: vipSeq, ack: appSeq &+ 1, on: lo, direction: .inbound))
        f.advance(micros: 100)
        p.append(f.packet(ztunnelOut, endpoint, flags: [.fin, .ack], seq: outSeq, ack: inSeq, on: eth0, direction: .outbound))
        p.append(f.packet(endpoint, ztunnelOut, flags: [.fin, .ack], seq: inSeq, ack: outSeq &+ 1, on: eth0, direction: .inbound))
        try assertVIPJoined(p, tags: f.tags, vip: vip, to: ztunnelOut, "a minute-long VIP connection without its tunnel")
    }

    /// The capture has no escape, and the connection to `vip` is joined, low, to ztunnel's connection from or to `inner`.
    private func assertVIPJoined(_ p: [PacketRecord], tags: RuleTagTable, vip: Endpoint, to inner: Endpoint, _ what: String) throws {
        let (sink, summary) = correlate(p, tags: tags)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "))
        let conn = try XCTUnwrap(sink.timelines.first { $0.original.dst == vip })
        let hop = try XCTUnwrap(conn.hops.first, what)
        let joined = try XCTUnwrap(sink.timelines.first { $0.id == hop.inner })
        XCTAssertTrue(joined.original.src == inner || joined.original.dst == inner, "joined to \(joined.original)")
        XCTAssertEqual(hop.confidence, .low)
    }

    /// Candidates joined at emission wait in the start-order indexes however old they are, and an index's front is
    /// dropped only up to the oldest one still waiting: behind a long-lived connection that no tunnel explains,
    /// 5000 VIP connections come and go. The indexes stay bounded by what is open (here a handful, compacted every
    /// 4096 entries at most), not by what went through.
    func testTheStartOrderIndexesStayBoundedBehindALongLivedConnection() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let sink = CollectingSink()
        let c = Correlator(tags: f.tags, ruleset: nil, options: CorrelatorOptions(), sink: sink)
        let stayer = PacketFactory.ep("10.0.1.5", 19999)
        for r in f.redirectedSYN(stayer, to: PacketFactory.ep("10.96.0.99", 80), seq: 1) { c.ingest(r) }
        f.advance(micros: 3_000_000)   // past the hop window: no tunnel below can be its
        var largest = (apps: 0, tunnels: 0)
        let n = 5000
        for i in 0..<n {
            let app = Endpoint(IPAddress(v4: 0x0A00_0105), UInt16(20_000 + i))
            let tunnel = Endpoint(IPAddress(v4: 0x0A00_0105), UInt16(40_000 + i))
            f.advance(micros: 5_000)   // 200 connections a second: ~600 open at a time (2 s linger)
            for r in f.redirectedSYN(app, to: vip, seq: UInt32(1000 + i)) { c.ingest(r) }
            f.advance(micros: 300)
            for r in f.markedSYN(tunnel, to: endpoint, seq: UInt32(7000 + i)) { c.ingest(r) }
            f.advance(micros: 200)
            c.ingest(f.packet(app, capture15001, flags: [.rst], seq: UInt32(1001 + i), on: lo, direction: .inbound))
            c.ingest(f.packet(endpoint, tunnel, flags: [.rst], seq: 9000, on: eth0, direction: .inbound))
            if i % 250 == 249 {
                // The long-lived connection stays open (data every 1.4 s).
                c.ingest(f.packet(stayer, capture15001, flags: [.ack, .psh], seq: 2, payload: 10, on: lo, direction: .inbound))
                let n = c.startOrderEntries
                largest = (max(largest.apps, n.apps), max(largest.tunnels, n.tunnels))
            }
        }
        let summary = c.finish()
        XCTAssertEqual(summary.hops, n)
        XCTAssertLessThan(largest.apps, 4500, "app entries kept behind the long-lived connection")
        XCTAssertLessThan(largest.tunnels, 4500, "tunnel entries kept")
    }

    /// A connection to a service VIP open before the capture began (first seen mid-stream, as a live trace started
    /// on a busy pod sees its long-lived connections) went through a tunnel open before it too. Joined by the order
    /// connections began in, it took the first new tunnel after it was seen, another connection's, and under a VIP
    /// load every join after it shifted by one (live: 41 % right instead of 90 %, in one run of four).
    func testAVIPConnectionOpenBeforeTheCaptureDoesNotTakeANewTunnel() throws {
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let held = PacketFactory.ep("10.0.1.5", 41000), fresh = PacketFactory.ep("10.0.1.5", 41001)
        let heldTunnel = PacketFactory.ep("10.0.1.5", 50000), freshTunnel = PacketFactory.ep("10.0.1.5", 50001)
        let observeOut = RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix
        // Two orders: the held connection first seen before the new connection and its tunnel (the order would take
        // the new tunnel), and after them (the newest open tunnel, as for a pooled one, would be the new one).
        for heldFirst in [true, false] {
            var f = PacketFactory()
            var p: [PacketRecord] = []
            func heldRequest() {
                p.append(f.packet(held, capture15001, flags: [.ack, .psh], seq: 1000, ack: 5000, payload: 100, on: lo, direction: .inbound))
            }
            func heldTunnelRequest() {
                p.append(f.nflog(heldTunnel, endpoint, flags: [.ack, .psh], seq: 8000, ack: 9000, hook: .postrouting, prefix: observeOut,
                                 mark: 0x539, outIf: 2))
                p.append(f.packet(heldTunnel, endpoint, flags: [.ack, .psh], seq: 8000, ack: 9000, payload: 140, on: eth0, direction: .outbound))
            }
            if heldFirst { heldRequest() } else { p += f.redirectedSYN(fresh, to: vip, seq: 2000) }
            f.advance(micros: 100)
            if heldFirst { p += f.redirectedSYN(fresh, to: vip, seq: 2000) } else { heldTunnelRequest() }
            f.advance(micros: 100)
            p += f.markedSYN(freshTunnel, to: endpoint, seq: 7000)
            f.advance(micros: 100)
            if heldFirst { heldTunnelRequest() } else { heldRequest() }
            // The reply (its tunnel's side left out: relay timing, which would pick the held tunnel by it, is not
            // what this is about).
            f.advance(micros: 460)
            p.append(f.packet(vip, held, flags: [.ack, .psh], seq: 5000, ack: 1100, payload: 300, on: lo, direction: .inbound))
            p.append(f.packet(heldTunnel, endpoint, flags: [.ack], seq: 8140, ack: 9340, on: eth0, direction: .outbound))
            p.append(f.packet(endpoint, freshTunnel, flags: [.syn, .ack], seq: 9900, ack: 7001, on: eth0, direction: .inbound))
            p.append(f.packet(held, capture15001, flags: [.rst], seq: 1100, on: lo, direction: .inbound))
            // The new connection ends after the held one was emitted.
            f.advance(micros: 3_000_000)
            p.append(f.packet(fresh, capture15001, flags: [.rst], seq: 2001, on: lo, direction: .inbound))
            let (sink, summary) = correlate(p, tags: f.tags)
            XCTAssertEqual(summary.escapes, 0, "held first \(heldFirst): " + sink.findings.map(\.summary).joined(separator: "; "))
            for (app, tunnel) in [(held, heldTunnel), (fresh, freshTunnel)] {
                let conn = try XCTUnwrap(sink.timelines.first { $0.original.src == app })
                let hop = try XCTUnwrap(conn.hops.first, "held first \(heldFirst): \(app) without a tunnel")
                XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.src, tunnel,
                               "held first \(heldFirst): \(app) took another's tunnel")
            }
        }
    }

    /// A service whose endpoints are not in the mesh (a namespace not in ambient yet): ztunnel resolves the VIP and
    /// connects to the endpoint directly, in plaintext, with its mark (passthrough). That connection names neither
    /// the VIP nor :15008, and read as a forged mark at high confidence: an escape on every call to such a service.
    func testAVIPResolvedToAnEndpointOutsideTheMeshIsJoinedToItsPassthrough() throws {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.30", 80)
        let endpoint = PacketFactory.ep("10.0.9.9", 8080)
        let observeOut = RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix
        var p = f.redirectedSYN(app, to: vip, seq: 1000)
        f.advance(micros: 300)
        p.append(f.nflog(ztunnelOut, endpoint, flags: [.syn], seq: 7000, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2))
        p.append(f.packet(ztunnelOut, endpoint, flags: [.syn], seq: 7000, on: eth0, direction: .outbound))
        f.advance(micros: 100)
        p.append(f.packet(endpoint, ztunnelOut, flags: [.syn, .ack], seq: 9000, ack: 7001, on: eth0, direction: .inbound))
        f.advance(micros: 500)
        p.append(f.packet(app, capture15001, flags: [.rst], seq: 1001, on: lo, direction: .inbound))
        p.append(f.packet(ztunnelOut, endpoint, flags: [.rst], seq: 7001, on: eth0, direction: .outbound))
        try assertVIPJoined(p, tags: f.tags, vip: vip, to: endpoint, "the VIP connection without its passthrough")
    }

    /// Two VIP connections whose tunnels ztunnel opened the other way round: the second began later and ended sooner,
    /// and its connection (a passthrough: the service has an endpoint outside the mesh) opened first. By the order the
    /// first took it; the second then had none that began while it ran, and the first's own tunnel, opened after the
    /// second had ended, read as a forged-mark escape (one in 5000 connections to a service with two endpoints, in the
    /// lab, offline and live). The second takes it back, and the first takes its own.
    func testAVIPConnectionTakesBackATunnelThatAnEarlierOneHadByTheOrder() throws {
        var f = PacketFactory()
        let (inMesh, outside) = (MixedService.inMesh, MixedService.outside)
        let (first, second, tunnel, passthrough) = (MixedService.first, MixedService.second, MixedService.tunnel, MixedService.passthrough)
        var p = MixedService.bothDial(&f)
        f.advance(micros: 130)
        p += f.markedSYN(passthrough, to: outside, seq: 8000)
        f.advance(micros: 300)
        p += MixedService.resets([second], &f)
        f.advance(micros: 200)
        p += f.markedSYN(tunnel, to: inMesh, seq: 7000)
        f.advance(micros: 200)
        p += MixedService.resets([first, passthrough, tunnel], &f)
        let sink = try MixedService.assertJoined(p, tags: f.tags, [(first, tunnel), (second, passthrough)])
        let firstConn = try XCTUnwrap(sink.timelines.first { $0.original.src == first })
        let hop = try XCTUnwrap(sink.timelines.first { $0.original.src == second }?.hops.first)
        let unique = try XCTUnwrap(hop.evidence.first { $0.kind == "unique" }).detail
        XCTAssertTrue(unique.hasSuffix("the only marked connection no other connection explains that began while this one ran, taken back from #\(firstConn.id), which began earlier and had it by the order, and took another that began while it ran"), unique)
    }

    /// A live trace reads the capture a ring block at a time: the first records of several tunnels can come in
    /// together, NFLOG's stamped on receipt, and the capture's SYNs with their own times after them. The order the
    /// VIP rule follows is when the tunnels began, not the order their records were read in: by that, under a load
    /// to a service with two endpoints, a tunnel listed before a passthrough that began earlier took its place, the
    /// passthrough read as a forged mark, and every join after shifted by one (2-6 % right of 5000, live).
    func testVIPConnectionsTakeTunnelsInTheOrderTheyBeganNotTheOrderTheirRecordsCameIn() throws {
        var f = PacketFactory()
        let (inMesh, outside) = (MixedService.inMesh, MixedService.outside)
        let (first, second, tunnel, passthrough) = (MixedService.first, MixedService.second, MixedService.tunnel, MixedService.passthrough)
        let observeOut = RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix
        var p = MixedService.bothDial(&f)
        f.advance(micros: 900)
        // Read together, the tunnel's record first: both stamped on receipt.
        p.append(f.nflog(tunnel, inMesh, flags: [.syn], seq: 7000, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2))
        p.append(f.nflog(passthrough, outside, flags: [.syn], seq: 8000, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2))
        // Then the capture's block: the passthrough began first.
        f.advance(micros: -760)
        p.append(f.packet(passthrough, outside, flags: [.syn], seq: 8000, on: eth0, direction: .outbound))
        f.advance(micros: 100)
        p.append(f.packet(tunnel, inMesh, flags: [.syn], seq: 7000, on: eth0, direction: .outbound))
        f.advance(micros: 900)
        p += MixedService.resets([first, second, passthrough, tunnel], &f)
        try MixedService.assertJoined(p, tags: f.tags, [(first, passthrough), (second, tunnel)])
    }

    func testAForgedMarkJustBeforeAnAppConnectionIsNotTakenForItsTunnel() throws {
        // A process forges 0x539 to 10.0.9.9:80; right after, the app dials a VIP whose tunnel goes to 10.0.2.2:15008.
        var f = PacketFactory()
        let forger = PacketFactory.ep("10.0.1.5", 40500)
        let target = PacketFactory.ep("10.0.9.9", 80)
        var p: [PacketRecord] = []
        p.append(f.nflog(forger, target, flags: [.syn], seq: 1, hook: .postrouting,
                         prefix: RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix,
                         mark: 0x539, outIf: 2))
        p.append(f.packet(forger, target, flags: [.syn], seq: 1, on: eth0, direction: .outbound))
        f.advance(micros: 200_000)
        p += Self.outboundScenario(&f, ruleset: nil, destination: PacketFactory.ep("10.96.0.20", 80))
        let (sink, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(sink.findings.filter(\.isEscape).map(\.findingClass), [.forgedZtunnelMark])
        XCTAssertEqual(summary.escapes, 1)
        let appConn = try XCTUnwrap(sink.timeline(.appOutbound))
        let hop = try XCTUnwrap(appConn.hops.first)
        XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.dst, peerHBONE, "joined to its own tunnel")
        XCTAssertEqual(hop.confidence, .low)
    }

    func testTimeAloneNeverJoins() throws {
        // A connection to :15008 that starts right after the app's, but carries no mark and goes elsewhere,
        // among two candidates: no join.
        var f = PacketFactory()
        var packets = Self.outboundScenario(&f, ruleset: nil, destination: PacketFactory.ep("10.96.0.20", 80))
        packets.removeAll { $0.nflog?.mark == 0x539 }
        let (sink, summary) = correlate(packets, tags: f.tags)
        XCTAssertEqual(summary.hops, 0)
        XCTAssertTrue(sink.timelines.allSatisfy { $0.hops.isEmpty })
    }

    func testPassthroughToANonMeshDestination() throws {
        var f = PacketFactory()
        let external = PacketFactory.ep("93.184.216.34", 443)
        let (sink, summary) = correlate(Self.outboundScenario(&f, ruleset: nil, destination: external, hboneTo: external), tags: f.tags)
        let pass = try XCTUnwrap(sink.timeline(.ztunnelPassthrough))
        XCTAssertEqual(pass.original.dst, external)
        let hop = try XCTUnwrap(pass.hops.first)
        XCTAssertEqual(hop.confidence, .high)
        XCTAssertTrue(hop.evidence.contains { $0.kind == "original-destination" && $0.detail.contains("passthrough") })
        XCTAssertEqual(summary.escapes, 0)
    }

    func testConntrackTuplesLinkTheViewsExactly() throws {
        var f = PacketFactory()
        let ct = ConntrackInfo(original: FiveTuple(proto: IPProto.tcp, src: app, dst: service),
                               reply: FiveTuple(proto: IPProto.tcp, src: capture15001, dst: app))
        var packets: [PacketRecord] = []
        // lo first, then a later NFLOG record carrying NFULA_CT (records are stamped late, in batches).
        packets.append(f.packet(app, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .outbound))
        packets.append(f.packet(service, app, flags: [.ack], seq: 5001, ack: 1001, on: lo, direction: .outbound))
        packets.append(f.nflog(app, capture15001, flags: [.ack], seq: 1001, ack: 5001, hook: .postrouting,
                               prefix: RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix,
                               outIf: 1, ct: ct))
        let (sink, _) = correlate(packets, tags: f.tags)
        XCTAssertEqual(sink.timelines.count, 1)
        let t = try XCTUnwrap(sink.timelines.first)
        XCTAssertEqual(t.original, ct.original)
        XCTAssertEqual(t.kind, .appOutbound)
        XCTAssertEqual(t.events.count, 3)
    }

    /// An inbound HBONE connection: a peer's ztunnel to the pod's :15008, and the app's port it will reach.
    static let hbonePeer = PacketFactory.ep("10.0.2.2", 41000)
    static let podHBONE = PacketFactory.ep("10.0.1.5", 15008)
    static let appPort = PacketFactory.ep("10.0.1.5", 8080)

    /// The inbound tunnel's handshake on eth0.
    static func inboundHandshake(_ f: inout PacketFactory) -> [PacketRecord] {
        [f.packet(hbonePeer, podHBONE, flags: [.syn], seq: 1, on: eth0, direction: .inbound),
         f.packet(podHBONE, hbonePeer, flags: [.syn, .ack], seq: 100, ack: 2, on: eth0, direction: .outbound),
         f.packet(hbonePeer, podHBONE, flags: [.ack], seq: 2, ack: 101, on: eth0, direction: .inbound)]
    }

    func testInboundHBONEHopIsJoinedToZtunnelsConnectionIntoTheApp() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let peer = Self.hbonePeer, podHBONE = Self.podHBONE, appPort = Self.appPort
        let ztunnelAsPeer = PacketFactory.ep("10.0.2.2", 42000)
        let connmarkTwin = twin("mangle", "ISTIO_PRERT", 1, ruleset: rules)
        var p = Self.inboundHandshake(&f)
        // The tunnel's request (HTTP/2 CONNECT under TLS), which ztunnel reads before it connects into the app.
        f.advance(micros: 100)
        p.append(f.packet(peer, podHBONE, flags: [.ack, .psh], seq: 2, ack: 101, payload: 120, on: eth0, direction: .inbound))
        f.advance(micros: 700)
        p.append(f.nflog(ztunnelAsPeer, appPort, flags: [.syn], seq: 500, hook: .prerouting, prefix: connmarkTwin, mark: 0x539, inIf: 1))
        p.append(f.packet(ztunnelAsPeer, appPort, flags: [.syn], seq: 500, on: lo, direction: .outbound))
        p.append(f.packet(appPort, ztunnelAsPeer, flags: [.syn, .ack], seq: 900, ack: 501, on: lo, direction: .outbound))
        p.append(f.nflog(appPort, ztunnelAsPeer, flags: [.syn, .ack], seq: 900, ack: 501, hook: .output,
                         prefix: twin("nat", "ISTIO_OUTPUT", 2, ruleset: rules), mark: 0x111))
        p.append(f.packet(ztunnelAsPeer, appPort, flags: [.rst], seq: 501, on: lo, direction: .outbound))
        p.append(f.packet(peer, podHBONE, flags: [.rst], seq: 122, on: eth0, direction: .inbound))
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        let outer = try XCTUnwrap(sink.timeline(.hboneInbound))
        let inner = try XCTUnwrap(sink.timeline(.ztunnelToApp))
        XCTAssertEqual(summary.hops, 1)
        let hop = try XCTUnwrap(outer.hops.first)
        XCTAssertEqual(hop.direction, .inbound)
        XCTAssertEqual(hop.inner, inner.id)
        XCTAssertEqual(hop.confidence, .high)
        XCTAssertTrue(Set(hop.evidence.map(\.kind)).isSuperset(of: ["client-address", "ztunnel-mark", "ztunnel-connmark", "unique"]))
        XCTAssertEqual(Set(inner.marks), [0x539, 0x111])
        XCTAssertEqual(inner.events.first { $0.hit?.role == .connmarkFromZtunnel }?.hit?.action, .connmarkSet(0x111))
        XCTAssertEqual(summary.podAddresses, [IPAddress("10.0.1.5")!])
        XCTAssertEqual(summary.escapes, 0)
    }

    func testInboundPlaintextRedirectTo15006AndItsHop() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let client = PacketFactory.ep("10.0.3.3", 43000)
        let pod80 = PacketFactory.ep("10.0.1.5", 80)
        let pod15006 = PacketFactory.ep("10.0.1.5", 15006)
        let ztunnelAsClient = PacketFactory.ep("10.0.3.3", 43999)
        var p: [PacketRecord] = []
        p.append(f.packet(client, pod80, flags: [.syn], seq: 10, on: eth0, direction: .inbound))
        p.append(f.nflog(client, pod80, flags: [.syn], seq: 10, hook: .prerouting, prefix: twin("nat", "ISTIO_PRERT", 2, ruleset: rules), inIf: 2))
        p.append(f.nflog(client, pod15006, flags: [.syn], seq: 10, hook: .input,
                         prefix: RuleTag(family: .v4, table: "mangle", chain: "INPUT", position: .observeIn).prefix, inIf: 2))
        p.append(f.packet(pod80, client, flags: [.syn, .ack], seq: 70, ack: 11, on: eth0, direction: .outbound))
        f.advance(micros: 500)
        p.append(f.packet(ztunnelAsClient, pod80, flags: [.syn], seq: 300, on: lo, direction: .outbound))
        p.append(f.packet(pod80, ztunnelAsClient, flags: [.syn, .ack], seq: 800, ack: 301, on: lo, direction: .outbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let outer = try XCTUnwrap(sink.timeline(.inboundPlaintext))
        XCTAssertEqual(outer.original.dst, pod80)
        XCTAssertEqual(outer.aliases.first?.dst, pod15006)
        XCTAssertEqual(outer.redirect, .redirected(toPort: 15006, originalDestination: pod80))
        let hop = try XCTUnwrap(outer.hops.first)
        XCTAssertTrue(hop.evidence.contains { $0.kind == "original-port" })
        XCTAssertTrue(hop.evidence.contains { $0.kind == "client-address" })
        XCTAssertNotNil(sink.timeline(.ztunnelToApp))
    }

    /// Istio 1.21-1.23 (and opt-in 1.24) capture inbound TCP with TPROXY in mangle ISTIO_PRERT: the packet keeps
    /// its destination, so only the rule's hit tells that it was captured.
    func testInboundPlaintextTPROXYedTo15006IsSaidEvenWhenZtunnelNeverConnectsToTheApp() throws {
        var f = PacketFactory()
        let text = "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff"
        let tproxy = Rule(table: "mangle", chain: "ISTIO_PRERT", position: 1, family: .ipv4, backend: .iptablesNft, text: text,
                          matchText: text, matches: [], target: .tproxy(onPort: 15006, onIP: IPAddress("0.0.0.0"), mark: 0x111, mask: 0xfff),
                          role: .inboundCaptureTproxy)
        let rules = Ruleset(tables: [Table(name: "mangle", family: .ipv4, backend: .iptablesNft,
                                           chains: [Chain(name: "ISTIO_PRERT", rules: [tproxy])])], origin: "test")
        let client = PacketFactory.ep("10.0.3.3", 43000)
        let pod80 = PacketFactory.ep("10.0.1.5", 80)
        var p: [PacketRecord] = []
        p.append(f.packet(client, pod80, flags: [.syn], seq: 10, on: eth0, direction: .inbound))
        p.append(f.nflog(client, pod80, flags: [.syn], seq: 10, hook: .prerouting, prefix: twin("mangle", "ISTIO_PRERT", 1, ruleset: rules), inIf: 2))
        p.append(f.packet(pod80, client, flags: [.syn, .ack], seq: 70, ack: 11, on: eth0, direction: .outbound))
        p.append(f.packet(client, pod80, flags: [.ack], seq: 11, ack: 71, on: eth0, direction: .inbound))
        // ztunnel refuses it (an authorization policy): no connection into the app, a RST to the client.
        f.advance(micros: 900)
        p.append(f.packet(pod80, client, flags: [.rst, .ack], seq: 71, ack: 11, on: eth0, direction: .outbound))
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        XCTAssertEqual(summary.connections, 1)
        let t = try XCTUnwrap(sink.timelines.first)
        XCTAssertEqual(t.kind, .inboundPlaintext)
        XCTAssertEqual(t.redirect, .tproxied(toPort: 15006, mark: 0x111))
        XCTAssertEqual(t.original.dst, pod80)
        XCTAssertTrue(t.aliases.isEmpty, "TPROXY makes no NAT view")
    }

    /// The probe address is the one the pod's rules let bypass: Istio's ipv6 golden names another than the default
    /// fd16:9254:7127:1337:ffff:ffff:ffff:ffff. From it a probe bypasses; from the default, a client is captured
    /// like any other and its connection joined to ztunnel's leg into the app.
    func testTheProbeAddressIsTheOneTheRulesetLetsBypass() throws {
        let rules = try RulesetLoader.load(text: """
            *nat
            :PREROUTING ACCEPT [0:0]
            :ISTIO_PRERT - [0:0]
            -A PREROUTING -j ISTIO_PRERT
            -A ISTIO_PRERT -s e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164/128 -p tcp -m tcp -j ACCEPT
            -A ISTIO_PRERT ! -d ::1/128 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
            COMMIT

            """, origin: "ip6tables-save")
        func twin6(_ pos: Int) throws -> String {
            let rule = try XCTUnwrap(rules.tables.first { $0.name == "nat" }?.chain("ISTIO_PRERT")?.rules[pos - 1])
            return RuleTag(family: .v6, table: "nat", chain: "ISTIO_PRERT", position: .rule(pos),
                           textHash: RuleTag.textHash(rule.canonicalText)).prefix
        }
        var f = PacketFactory()
        let pod80 = PacketFactory.ep("fd00:10:244::210", 80)
        let probe = PacketFactory.ep("e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164", 47045)
        let client = PacketFactory.ep("fd16:9254:7127:1337:ffff:ffff:ffff:ffff", 41335)
        let ztunnelAsClient = PacketFactory.ep("fd16:9254:7127:1337:ffff:ffff:ffff:ffff", 59889)
        var p: [PacketRecord] = []
        p.append(f.packet(probe, pod80, flags: [.syn], seq: 10, on: eth0, direction: .inbound))
        p.append(f.nflog(probe, pod80, flags: [.syn], seq: 10, hook: .prerouting, prefix: try twin6(1), inIf: 2))
        p.append(f.packet(pod80, probe, flags: [.syn, .ack], seq: 70, ack: 11, on: eth0, direction: .outbound))
        f.advance(micros: 3_000)
        p.append(f.packet(client, pod80, flags: [.syn], seq: 20, on: eth0, direction: .inbound))
        p.append(f.nflog(client, pod80, flags: [.syn], seq: 20, hook: .prerouting, prefix: try twin6(2), inIf: 2))
        p.append(f.packet(pod80, client, flags: [.syn, .ack], seq: 90, ack: 21, on: eth0, direction: .outbound))
        f.advance(micros: 500)
        p.append(f.packet(ztunnelAsClient, pod80, flags: [.syn], seq: 300, on: lo, direction: .outbound))
        p.append(f.packet(pod80, ztunnelAsClient, flags: [.syn, .ack], seq: 800, ack: 301, on: lo, direction: .outbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let kinds = Dictionary(sink.timelines.map { ($0.original.src, $0.kind) }, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(kinds[probe], .probe)
        XCTAssertEqual(kinds[client], .inboundPlaintext)
        XCTAssertEqual(kinds[ztunnelAsClient], .ztunnelToApp)
        let outer = try XCTUnwrap(sink.timelines.first { $0.original.src == client })
        XCTAssertEqual(outer.hops.count, 1, "the captured client's connection is joined to ztunnel's leg")
    }

    /// ztunnel's DNS proxy retries a truncated answer over TCP from its own 0x539 socket (hickory's resolver): that
    /// connection to the resolver's :53, right after an app query captured to 15053, is ztunnel's, not a forged mark.
    /// The same connection with no captured query before it still is one.
    func testZtunnelsTCPRetryOfAnAppsDNSQueryIsNotAForgedMark() throws {
        var f = PacketFactory()
        let resolver = PacketFactory.ep("10.96.0.10", 53)
        let appQuery = PacketFactory.ep("10.0.1.5", 41000)
        let proxy = PacketFactory.ep("127.0.0.1", 15053)
        let upstreamUDP = PacketFactory.ep("10.0.1.5", 52000)
        var p: [PacketRecord] = []
        p.append(f.nflog(appQuery, resolver, proto: IPProto.udp, hook: .output,
                         prefix: RuleTag(family: .v4, table: "nat", chain: "OUTPUT", position: .rule(1)).prefix, outIf: 2))
        p.append(f.packet(appQuery, proxy, proto: IPProto.udp, on: lo, direction: .outbound))
        f.advance(micros: 200)
        p.append(f.nflog(upstreamUDP, resolver, proto: IPProto.udp, hook: .output,
                         prefix: RuleTag(family: .v4, table: "raw", chain: "OUTPUT", position: .rule(1)).prefix, mark: 0x539, outIf: 2))
        p.append(f.packet(upstreamUDP, resolver, proto: IPProto.udp, on: eth0, direction: .outbound))
        p.append(f.packet(resolver, upstreamUDP, proto: IPProto.udp, on: eth0, direction: .inbound))
        func tcpUpstream(_ port: UInt16, isn: UInt32, to resolver: Endpoint = resolver) {
            let z = PacketFactory.ep("10.0.1.5", port)
            p.append(f.nflog(z, resolver, flags: [.syn], seq: isn, hook: .output,
                             prefix: RuleTag(family: .v4, table: "nat", chain: "OUTPUT", position: .rule(1)).prefix, mark: 0x539, outIf: 2))
            p.append(f.packet(z, resolver, flags: [.syn], seq: isn, on: eth0, direction: .outbound))
            f.advance(micros: 100)
            p.append(f.packet(resolver, z, flags: [.syn, .ack], seq: 900, ack: isn + 1, on: eth0, direction: .inbound))
            p.append(f.packet(z, resolver, flags: [.fin, .ack], seq: isn + 1, ack: 901, on: eth0, direction: .outbound))
            p.append(f.packet(resolver, z, flags: [.fin, .ack], seq: 901, ack: isn + 2, on: eth0, direction: .inbound))
        }
        f.advance(micros: 300)
        tcpUpstream(53000, isn: 7000)
        // The same right after, to another host's :53: no query to it explains ztunnel's mark there.
        tcpUpstream(53002, isn: 9000, to: PacketFactory.ep("203.0.113.53", 53))
        f.advance(micros: 5_000_000)
        tcpUpstream(53001, isn: 8000)
        let (sink, summary) = correlate(p, tags: f.tags)
        let retry = try XCTUnwrap(sink.timelines.first { $0.original.src.port == 53000 })
        XCTAssertEqual(retry.kind, .dns)
        XCTAssertEqual(sink.timelines.first { $0.original.src == appQuery }?.redirect,
                       .redirected(toPort: 15053, originalDestination: resolver))
        XCTAssertEqual(sink.findings.map(\.findingClass), [.forgedZtunnelMark, .forgedZtunnelMark])
        XCTAssertEqual(Set(sink.findings.map(\.tuple.src.port)), [53002, 53001],
                       "no query to 203.0.113.53 was captured, and none before the later one")
        XCTAssertEqual(summary.escapes, 2)
    }

    func testALateNflogCopyOfAMissedSYNJoinsItsConnectionInsteadOfStartingANewOne() throws {
        // The interface capture missed ztunnel's handshake; its NFLOG copy (mark 0x539) arrives last, stamped a
        // second late as libpcap stamps NFLOG batches. It belongs to the HBONE connection already seen.
        var f = PacketFactory()
        var packets = Self.outboundScenario(&f, ruleset: nil)
        let isHandshake: (PacketRecord) -> Bool = { ($0.tuple.src == self.ztunnelOut || $0.tuple.dst == self.ztunnelOut)
            && ($0.tcpFlags.contains(.syn) || ($0.tcpFlags == [.ack] && $0.tcpSeq == 7001)) }
        var lateSYN = try XCTUnwrap(packets.first { $0.nflog != nil && isHandshake($0) })
        packets.removeAll(where: isHandshake)
        lateSYN.time = Timestamp(seconds: packets.last!.time.seconds + 1, nanoseconds: packets.last!.time.nanoseconds)
        packets.append(lateSYN)
        let (sink, summary) = correlate(packets, tags: f.tags)
        XCTAssertEqual(summary.escapes, 0, "\(sink.findings.map(\.summary))")
        XCTAssertEqual(sink.timelines.filter { $0.original.src == ztunnelOut || $0.original.dst == ztunnelOut }.count, 1)
        let hbone = try XCTUnwrap(sink.timeline(.hboneOutbound))
        XCTAssertTrue(hbone.marks.contains(0x539))
        XCTAssertEqual(summary.hops, 1)

        // A SYN far from the sequence space seen is a new connection on a reused tuple, as before.
        var g = PacketFactory()
        var reuse = Self.outboundScenario(&g, ruleset: nil)
        reuse.removeAll(where: isHandshake)
        g.advance(micros: 1_000_000)
        reuse.append(g.packet(ztunnelOut, peerHBONE, flags: [.syn], seq: 0x8000_0000, on: eth0, direction: .outbound))
        let (sink2, _) = correlate(reuse, tags: g.tags)
        XCTAssertEqual(sink2.timelines.filter { $0.original.src == ztunnelOut }.count, 2)
    }

    func testAConnectionCarryingAForgedZtunnelMarkIsAFinding() throws {
        var f = PacketFactory()
        let app2 = PacketFactory.ep("10.0.1.5", 40100)
        let target = PacketFactory.ep("10.0.9.9", 80)
        var p: [PacketRecord] = []
        p.append(f.nflog(app2, target, flags: [.syn], seq: 1, hook: .postrouting,
                         prefix: RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix,
                         mark: 0x539, outIf: 2))
        p.append(f.packet(app2, target, flags: [.syn], seq: 1, on: eth0, direction: .outbound))
        p.append(f.packet(target, app2, flags: [.syn, .ack], seq: 9, ack: 2, on: eth0, direction: .inbound))
        let (sink, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(summary.escapes, 1)
        let finding = try XCTUnwrap(sink.findings.first)
        XCTAssertEqual(finding.findingClass, .forgedZtunnelMark)
        XCTAssertEqual(finding.tuple.dst, target)
        XCTAssertEqual(finding.confidence, .high)
        XCTAssertTrue(finding.frames.contains(FrameRef(source: 1, frame: 1)))
        XCTAssertTrue(finding.frames.contains(FrameRef(source: 0, frame: 2)))
    }

    /// The pod's address is inferred from what leaves and reaches it through its interface, but never a multicast,
    /// link-local, unspecified or broadcast one: a capture of a pod with little IPv6 hears more MLD and neighbour
    /// discovery (from fe80::, to ff02::) than its own IPv6 traffic, and named ff02::16 the pod's address.
    func testThePodsInferredAddressIsNeverMulticastOrLinkLocal() throws {
        var f = PacketFactory()
        let v6 = PacketFactory.ep("fd00:10:244::5", 41000), peer6 = PacketFactory.ep("fd00:10:244::9", 80)
        var p: [PacketRecord] = []
        for i in 0..<5 {
            p.append(f.packet(PacketFactory.ep("fe80::dc33:baff:fe04:d784", UInt16(143 << 8)), PacketFactory.ep("ff02::16", 0),
                              proto: IPProto.icmpv6, on: eth0, direction: .inbound))
            p.append(f.packet(PacketFactory.ep("::", UInt16(135 << 8)), PacketFactory.ep("ff02::1:ff04:d784", 0),
                              proto: IPProto.icmpv6, on: eth0, direction: .outbound))
            p.append(f.packet(PacketFactory.ep("fe80::1", UInt16(133 << 8)), PacketFactory.ep("ff02::2", 0),
                              proto: IPProto.icmpv6, on: eth0, direction: .outbound))
            p.append(f.packet(PacketFactory.ep("10.0.1.5", UInt16(68)), PacketFactory.ep("255.255.255.255", 67),
                              proto: IPProto.udp, on: eth0, direction: .outbound))
            p.append(f.packet(PacketFactory.ep("10.0.9.9", 5353), PacketFactory.ep("224.0.0.251", 5353),
                              proto: IPProto.udp, on: eth0, direction: .inbound))
            f.advance(micros: Int64(100 + i))
        }
        p.append(f.packet(v6, peer6, flags: [.syn], seq: 1, on: eth0, direction: .outbound))
        let (_, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(summary.podAddresses, [IPAddress("10.0.1.5")!, IPAddress("fd00:10:244::5")!])
        for bad in ["ff02::16", "fe80::1", "::", "::1", "224.0.0.251", "255.255.255.255", "0.0.0.0", "127.0.0.1", "169.254.7.127"] {
            XCTAssertFalse(Correlator.couldBePodAddress(IPAddress(bad)!), bad)
        }
        for good in ["10.244.1.10", "fd00:10:244::5", "2001:db8::1", "192.0.2.1"] {
            XCTAssertTrue(Correlator.couldBePodAddress(IPAddress(good)!), good)
        }
    }

    func testUncapturedAppTCPIsAnEscapeButTrafficToItsOwnPodIPIsNot() throws {
        var f = PacketFactory()
        var opts = CorrelatorOptions()
        opts.podAddresses = [IPAddress("10.0.1.5")!]
        let escaping = PacketFactory.ep("10.0.1.5", 40200)
        var p: [PacketRecord] = []
        p.append(f.packet(escaping, PacketFactory.ep("10.0.9.9", 443), flags: [.syn], seq: 1, on: eth0))
        p.append(f.packet(PacketFactory.ep("10.0.1.5", 40300), PacketFactory.ep("10.0.1.5", 8080), flags: [.syn], seq: 1, on: lo))
        p.append(f.packet(PacketFactory.ep("10.0.1.5", 40400), PacketFactory.ep("169.254.7.127", 9000), flags: [.syn], seq: 1, on: eth0))
        let (sink, summary) = correlate(p, tags: f.tags, options: opts)
        XCTAssertEqual(summary.escapes, 1)
        XCTAssertEqual(sink.findings.map(\.findingClass), [.uncapturedTCP])
        XCTAssertEqual(sink.findings.first?.frames, [FrameRef(source: 0, frame: 1)])
        XCTAssertEqual(sink.timelines.map(\.kind), [.unknown, .local, .probe])
    }

    /// A SYN answered by a RST (no SYN-ACK anywhere) is refused; redirected, the words name ztunnel's port. A
    /// connection reset after its handshake is not.
    func testAConnectionWhoseSYNIsAnsweredByARSTIsRefused() throws {
        let rules = seedNatRuleset()
        var f = PacketFactory()
        var p = [f.nflog(Self.app, Self.service, flags: [.syn], seq: 1000, hook: .output,
                         prefix: twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules), outIf: 2)]
        f.advance(micros: 5)
        p.append(f.packet(Self.app, Self.capture15001, flags: [.syn], seq: 1000, on: lo, direction: .inbound))
        f.advance(micros: 10)
        p.append(f.packet(Self.service, Self.app, flags: [.rst, .ack], seq: 0, ack: 1001, on: lo, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let t = try XCTUnwrap(sink.timelines.first)
        XCTAssertEqual(sink.timelines.count, 1)
        XCTAssertTrue(t.refused)
        XCTAssertTrue(t.closed)
        XCTAssertEqual(t.redirect, .redirected(toPort: 15001, originalDestination: Self.service))
        let text = try renderReport(p, tags: f.tags, ruleset: rules) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("tcp 10.0.1.5:40000 > 10.0.2.2:80  refused, 3 events"), text)
        XCTAssertTrue(text.contains("  refused   the SYN, redirected to :15001, was answered by a RST: nothing listens on :15001 in this pod (ztunnel's port)\n"), text)
        XCTAssertTrue(text.contains("  1 connection refused (SYN answered by a RST)\n"), text)
        let json = try renderReport(p, tags: f.tags, ruleset: rules) { JSONReport(fileDescriptor: $0) }
        XCTAssertTrue(json.contains(#""closed":true,"refused":true,"#), json)
        XCTAssertTrue(json.contains(#""refused":1,"#), json)
        XCTAssertTrue(try renderHTML(p, tags: f.tags, ruleset: rules).contains("#1: refused (its SYN was answered by a RST)"))

        // Reset after the handshake: closed, not refused.
        var g = PacketFactory()
        let peer = PacketFactory.ep("10.0.9.9", 443)
        let q = [g.packet(Self.app, peer, flags: [.syn], seq: 1, on: eth0, direction: .outbound),
                 g.packet(peer, Self.app, flags: [.syn, .ack], seq: 50, ack: 2, on: eth0, direction: .inbound),
                 g.packet(Self.app, peer, flags: [.ack], seq: 2, ack: 51, on: eth0, direction: .outbound),
                 g.packet(peer, Self.app, flags: [.rst], seq: 51, on: eth0, direction: .inbound)]
        let (sink2, _) = correlate(q, tags: g.tags)
        XCTAssertEqual(sink2.timelines.map(\.refused), [false])
        XCTAssertEqual(sink2.timelines.map(\.closed), [true])
        let json2 = try renderReport(q, tags: g.tags) { JSONReport(fileDescriptor: $0) }
        XCTAssertFalse(json2.contains("refused"), json2)
        let text2 = try renderReport(q, tags: g.tags) { TextReport(fileDescriptor: $0) }
        XCTAssertFalse(text2.contains("refused"), text2)

        // The SYN-ACK missed by the capture (dropped, or it took another path): the initiator's ACK and the two
        // sides' data say the handshake happened, so the reset that ends it is no refusal.
        for dataFrom in ["initiator", "responder", "neither"] {
            var h = PacketFactory()
            var r = [h.packet(Self.app, peer, flags: [.syn], seq: 1, on: eth0, direction: .outbound)]
            switch dataFrom {
            case "initiator": r.append(h.packet(Self.app, peer, flags: [.ack, .psh], seq: 2, ack: 51, payload: 20, on: eth0, direction: .outbound))
            case "responder": r.append(h.packet(peer, Self.app, flags: [.ack, .psh], seq: 51, ack: 2, payload: 20, on: eth0, direction: .inbound))
            default: r.append(h.packet(Self.app, peer, flags: [.ack], seq: 2, ack: 51, on: eth0, direction: .outbound))
            }
            r.append(h.packet(peer, Self.app, flags: [.rst], seq: 51, on: eth0, direction: .inbound))
            let (sink3, summary3) = correlate(r, tags: h.tags)
            XCTAssertEqual(sink3.timelines.map(\.refused), [false], dataFrom)
            XCTAssertEqual(summary3.refusedConnections, 0, dataFrom)
        }
    }

    func testNonDNSUDPAndICMPAreReportedAsByDesign() throws {
        var f = PacketFactory()
        let a = PacketFactory.ep("10.0.1.5", 5000)
        var p: [PacketRecord] = []
        p.append(f.packet(a, PacketFactory.ep("10.0.9.9", 9999), proto: IPProto.udp, on: eth0, direction: .outbound))
        // An echo request (src port = type 8 << 8, dst port = identifier; see TransportDecoder.icmp).
        p.append(f.packet(PacketFactory.ep("10.0.1.5", 8 << 8), PacketFactory.ep("10.0.9.9", 1), proto: IPProto.icmp, on: eth0, direction: .outbound))
        p.append(f.packet(PacketFactory.ep("10.0.1.5", 5353), PacketFactory.ep("10.96.0.10", 53), proto: IPProto.udp, on: eth0, direction: .outbound))
        let (sink, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(summary.escapes, 0)
        XCTAssertEqual(sink.findings.map(\.findingClass), [.byDesign, .byDesign])
        XCTAssertEqual(sink.timelines.map(\.kind), [.uncapturedByDesign, .uncapturedByDesign, .dns])
    }

    func testClosedAndIdleConnectionsAreEmittedSoTheOpenTableStaysSmall() {
        var f = PacketFactory()
        let sink = CollectingSink()
        sink.keepTimelines = false
        var opts = CorrelatorOptions()
        opts.tcpIdleTimeoutNanos = 10_000_000_000
        let c = Correlator(tags: f.tags, ruleset: nil, options: opts, sink: sink)
        let server = PacketFactory.ep("10.0.9.9", 80)
        var maxOpen = 0
        for i in 0..<100_000 {
            let client = Endpoint(IPAddress(v4: 0x0A00_0105), UInt16(10_000 + i % 50_000))
            let isn = UInt32(i) &* 7919
            c.ingest(f.packet(client, server, flags: [.syn], seq: isn, on: eth0, direction: .outbound))
            c.ingest(f.packet(server, client, flags: [.syn, .ack], seq: 1, ack: isn &+ 1, on: eth0, direction: .inbound))
            if i % 10 != 0 {
                // Every tenth connection never closes: it must idle out instead.
                c.ingest(f.packet(client, server, flags: [.fin, .ack], seq: isn &+ 1, ack: 2, on: eth0, direction: .outbound))
                c.ingest(f.packet(server, client, flags: [.fin, .ack], seq: 2, ack: isn &+ 2, on: eth0, direction: .inbound))
            }
            f.advance(micros: 1_000)
            maxOpen = max(maxOpen, c.openConnectionCount)
        }
        // 2 s linger + 1 s sweep at 1000 connections/s, plus the unclosed tenth for the 10 s idle timeout.
        XCTAssertLessThan(maxOpen, 3_200 + 1_100)
        XCTAssertGreaterThan(sink.connectionsSeen, 80_000, "most were emitted before the end")
        let summary = c.finish()
        XCTAssertEqual(summary.connections, 100_000)
        XCTAssertEqual(sink.connectionsSeen, 100_000)
        XCTAssertEqual(c.openConnectionCount, 0)
    }

    func testEventsPerConnectionAreCappedAndTheRestCounted() {
        var f = PacketFactory()
        var opts = CorrelatorOptions()
        opts.maxEventsPerConnection = 10
        let a = PacketFactory.ep("10.0.1.5", 40000)
        let p = (0..<25).map { i in f.packet(a, capture15001, flags: [.ack], seq: UInt32(i), on: lo) }
        let (sink, _) = correlate(p, tags: f.tags, options: opts)
        XCTAssertEqual(sink.timelines.first?.events.count, 10)
        XCTAssertEqual(sink.timelines.first?.droppedEvents, 15)
        XCTAssertEqual(sink.timelines.first?.packets, 25)
    }

    // MARK: - Showing only selected connections (`trace --filter`)

    /// The outbound scenario plus a DNS query, with `selected` set as a filter on `which` would set it.
    func selectedScenario(showsOnlySelected: Bool = true, _ which: (PacketRecord) -> Bool) -> (CollectingSink, AnalysisSummary) {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var packets = Self.outboundScenario(&f, ruleset: rules)
        let resolver = PacketFactory.ep("10.96.0.10", 53), client = PacketFactory.ep("10.0.1.5", 33333)
        packets.append(f.packet(client, resolver, proto: IPProto.udp, payload: 30, on: eth0, direction: .outbound))
        f.advance(micros: 200)
        packets.append(f.packet(resolver, client, proto: IPProto.udp, payload: 60, on: eth0, direction: .inbound))
        for i in packets.indices { packets[i].selected = which(packets[i]) }
        var options = CorrelatorOptions()
        options.showsOnlySelected = showsOnlySelected
        return correlate(packets, tags: f.tags, ruleset: rules, options: options)
    }

    func testAFilterShowsTheMatchingConnectionWholeWithItsHopAndHidesTheRest() throws {
        // `port 80` matches only the app's pre-NAT event: its lo leg (to 127.0.0.1:15001) and ztunnel's HBONE
        // connection do not match, and are shown all the same.
        let (sink, summary) = selectedScenario { $0.tuple.dst.port == 80 || $0.tuple.src.port == 80 }
        let app = try XCTUnwrap(sink.timeline(.appOutbound))
        XCTAssertTrue(app.events.contains { $0.point.isLoopback && $0.tuple.dst == capture15001 }, "the lo leg is part of the shown connection")
        let hbone = try XCTUnwrap(sink.timeline(.hboneOutbound), "the hop's inner connection is shown with the app's")
        // Shown whole: the same events as without a filter.
        let (unfiltered, _) = selectedScenario(showsOnlySelected: false) { _ in false }
        XCTAssertEqual(app.events.map(\.frame), unfiltered.timeline(.appOutbound)?.events.map(\.frame))
        XCTAssertEqual(hbone.events.map(\.frame), unfiltered.timeline(.hboneOutbound)?.events.map(\.frame))
        XCTAssertEqual(unfiltered.timelines.count, 3)
        XCTAssertFalse(sink.timelines.contains { $0.original.proto == IPProto.udp }, "the DNS query matched nothing")
        XCTAssertEqual(summary.connections, 2)
        XCTAssertEqual(summary.connectionsFilteredOut, 1)
        XCTAssertEqual(summary.hops, 1)
        // Every record is still counted: the rule hits stay whole.
        XCTAssertEqual(summary.packets, 19)
    }

    func testAFilterMatchingZtunnelsLegShowsTheAppConnectionItCarries() throws {
        let (sink, summary) = selectedScenario { $0.tuple.dst.port == 15008 || $0.tuple.src.port == 15008 }
        XCTAssertNotNil(sink.timeline(.hboneOutbound))
        XCTAssertNotNil(sink.timeline(.appOutbound))
        XCTAssertEqual(summary.connections, 2)
        XCTAssertEqual(summary.connectionsFilteredOut, 1)
    }

    func testAFilterMatchingNothingShowsNothingAndCountsWhatItHid() throws {
        let (sink, summary) = selectedScenario { _ in false }
        XCTAssertTrue(sink.timelines.isEmpty)
        XCTAssertEqual(summary.connections, 0)
        XCTAssertEqual(summary.connectionsFilteredOut, 3)
        XCTAssertEqual(summary.hops, 0)
        XCTAssertEqual(summary.packets, 19)
        // Without the option the same records show every connection, and the summary says nothing of a filter.
        var f = PacketFactory()
        var packets = Self.outboundScenario(&f, ruleset: nil)
        for i in packets.indices { packets[i].selected = false }
        let (all, plain) = correlate(packets, tags: f.tags)
        XCTAssertEqual(all.timelines.count, 2)
        XCTAssertNil(plain.connectionsFilteredOut)
    }


    /// Both views say how many connections the filter left out, and say nothing of a filter without one.
    func testTheSummariesCountWhatTheFilterLeftOut() throws {
        func render(showsOnlySelected: Bool, _ makeSink: (Int32) -> ReportSink) throws -> String {
            var f = PacketFactory()
            var packets = Self.outboundScenario(&f, ruleset: nil)
            for i in packets.indices { packets[i].selected = false }
            var options = CorrelatorOptions()
            options.showsOnlySelected = showsOnlySelected
            return try renderReport(packets, tags: f.tags, options: options, makeSink)
        }
        let text = try render(showsOnlySelected: true) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("0 connections (2 more not matching --filter), "), text)
        XCTAssertFalse(try render(showsOnlySelected: false) { TextReport(fileDescriptor: $0) }.contains("--filter"))
        let json = try render(showsOnlySelected: true) { JSONReport(fileDescriptor: $0) }
        let summary = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.split(separator: "\n").last!.utf8)) as? [String: Any])
        XCTAssertEqual(summary["connections"] as? Int, 0)
        XCTAssertEqual(summary["connections_filtered_out"] as? Int, 2)
        let plain = try render(showsOnlySelected: false) { JSONReport(fileDescriptor: $0) }
        XCTAssertFalse(plain.contains("connections_filtered_out"))
    }

}
