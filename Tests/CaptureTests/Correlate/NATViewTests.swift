import XCTest
@testable import Capture

/// One connection across its NAT views when the kernel changed more than the destination: conntrack gives a
/// REDIRECTed connection another source port when its reply tuple (127.0.0.1:15001 to the app's port) would clash
/// with an entry it still holds (the same app port redirected earlier for another destination). Both views start
/// with the same SYN (same ISN); the correlator joins them on it. And ICMP echoes: a request and its reply are one
/// connection, begun by the request's sender whatever its identifier.
final class NATViewTests: XCTestCase {
    let app = PacketFactory.ep("10.0.1.5", 40000)
    let remapped = PacketFactory.ep("10.0.1.5", 6839)
    let service = PacketFactory.ep("10.0.2.2", 80)
    let capture15001 = PacketFactory.ep("127.0.0.1", 15001)
    let redirectTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: seedNatRuleset())

    private func assertOneRemappedConnection(_ sink: CollectingSink, file: StaticString = #filePath, line: UInt = #line) {
        let tcp = sink.timelines.filter { $0.original.proto == IPProto.tcp }
        XCTAssertEqual(tcp.count, 1, "connections: \(tcp.map(\.original))", file: file, line: line)
        guard let c = tcp.first else { return }
        XCTAssertEqual(c.original, FiveTuple(proto: IPProto.tcp, src: app, dst: service), file: file, line: line)
        XCTAssertEqual(c.aliases, [FiveTuple(proto: IPProto.tcp, src: remapped, dst: capture15001)], file: file, line: line)
        XCTAssertEqual(c.redirect, .redirected(toPort: 15001, originalDestination: service), file: file, line: line)
        // Direction from either view: the app's packets (as app or as the remapped port) are not replies.
        for e in c.events {
            let fromApp = e.tuple.src == app || e.tuple.src == remapped
            XCTAssertEqual(e.isReply, !fromApp, "\(e.tuple)", file: file, line: line)
        }
    }

    /// `analyze` of a capture: the redirected SYN on lo comes first (the NFLOG file's OUTPUT events carry their
    /// receipt time), then the reply de-NATed on lo starts the app's view, then the twins' pre-NAT SYN.
    func testARedirectedViewFirstThenTheAppsViewAreOneConnection() {
        var f = PacketFactory()
        let ruleset = seedNatRuleset()
        var p: [PacketRecord] = []
        p.append(f.packet(remapped, capture15001, flags: [.syn], seq: 1000, on: lo, direction: .inbound))
        f.advance(micros: 20)
        p.append(f.packet(service, app, flags: [.syn, .ack], seq: 5000, ack: 1001, on: lo, direction: .inbound))
        f.advance(micros: 60)
        p.append(f.nflog(app, service, flags: [.syn], seq: 1000, hook: .output, prefix: redirectTwin))
        p.append(f.packet(remapped, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .inbound))
        p.append(f.packet(remapped, capture15001, flags: [.fin, .ack], seq: 1001, ack: 5001, on: lo, direction: .inbound))
        p.append(f.packet(service, app, flags: [.fin, .ack], seq: 5001, ack: 1002, on: lo, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: ruleset)
        assertOneRemappedConnection(sink)
    }

    /// Live (records placed in the order read: NFLOG first), the app's pre-NAT SYN comes before the lo copy.
    func testTheAppsViewFirstThenTheRedirectedViewAreOneConnection() {
        var f = PacketFactory()
        let ruleset = seedNatRuleset()
        var p: [PacketRecord] = []
        p.append(f.nflog(app, service, flags: [.syn], seq: 1000, hook: .output, prefix: redirectTwin))
        p.append(f.packet(remapped, capture15001, flags: [.syn], seq: 1000, on: lo, direction: .inbound))
        f.advance(micros: 20)
        p.append(f.packet(service, app, flags: [.syn, .ack], seq: 5000, ack: 1001, on: lo, direction: .inbound))
        p.append(f.packet(remapped, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: ruleset)
        assertOneRemappedConnection(sink)
    }

    /// Only a capture (no twins): the app's view is just the de-NATed replies; the SYN-ACK acknowledges the
    /// redirected SYN.
    func testWithOnlyACaptureTheDeNATedReplyJoinsTheRedirectedView() {
        var f = PacketFactory()
        var p: [PacketRecord] = []
        p.append(f.packet(remapped, capture15001, flags: [.syn], seq: 1000, on: lo, direction: .inbound))
        f.advance(micros: 20)
        p.append(f.packet(service, app, flags: [.syn, .ack], seq: 5000, ack: 1001, on: lo, direction: .inbound))
        p.append(f.packet(remapped, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .inbound))
        p.append(f.packet(service, app, flags: [.ack, .psh], seq: 5001, ack: 1001, payload: 10, on: lo, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: seedNatRuleset())
        assertOneRemappedConnection(sink)
    }

    /// The app's view begun by a reply that is not the SYN-ACK (the capture missed it), before the twins' pre-NAT
    /// SYN: two connections exist by then, and the SYN joins them.
    func testAnAppViewBegunWithoutTheHandshakeIsJoinedWhenItsSYNComes() {
        var f = PacketFactory()
        var p: [PacketRecord] = []
        p.append(f.packet(remapped, capture15001, flags: [.syn], seq: 1000, on: lo, direction: .inbound))
        f.advance(micros: 20)
        p.append(f.packet(service, app, flags: [.ack, .psh], seq: 5001, ack: 1001, payload: 10, on: lo, direction: .inbound))
        f.advance(micros: 60)
        p.append(f.nflog(app, service, flags: [.syn], seq: 1000, hook: .output, prefix: redirectTwin))
        p.append(f.packet(remapped, capture15001, flags: [.ack], seq: 1001, ack: 5011, on: lo, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: seedNatRuleset())
        assertOneRemappedConnection(sink)
    }

    /// Live, the REDIRECT twin's hit gets the conntrack entry, whose reply tuple names the remapped port: the lo
    /// view is registered from it, and the app's packets through the remapped port read as the app's.
    func testTheConntrackEntryNamesTheRemappedPort() {
        var f = PacketFactory()
        let ct = ConntrackInfo(original: FiveTuple(proto: IPProto.tcp, src: app, dst: service),
                               reply: FiveTuple(proto: IPProto.tcp, src: capture15001, dst: remapped))
        var p: [PacketRecord] = []
        p.append(f.nflog(app, service, flags: [.syn], seq: 1000, hook: .output, prefix: redirectTwin, ct: ct))
        p.append(f.packet(remapped, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .inbound))
        p.append(f.packet(service, app, flags: [.ack, .psh], seq: 5001, ack: 1001, payload: 10, on: lo, direction: .inbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: seedNatRuleset())
        assertOneRemappedConnection(sink)
    }

    /// An app connection from the source port of one of ztunnel's tunnels that is open (Linux shares an ephemeral port
    /// between connections to different destinations; ztunnel's multiplexed tunnels live for minutes). The tunnel
    /// was first seen mid-stream (open before the capture: no handshake to compare), and the app's redirected SYN on
    /// lo came before its pre-NAT twin (stamped on receipt): taken for the tunnel's other NAT view, the lo leg made the
    /// tunnel an app connection redirected to 15001 "from 10.0.2.2:15008", and the app's own view a connection of its
    /// own with no hop (1 in 20 000 connections through several multiplexed tunnels, `MESHTRACE_BENCH_STREAMS=2`).
    /// A connection seen established cannot take a SYN: it begins another.
    func testARedirectedSYNFromAnOpenTunnelsPortIsNotTheTunnelsOtherView() throws {
        var f = PacketFactory()
        let ruleset = seedNatRuleset()
        let peerHBONE = PacketFactory.ep("10.0.2.2", 15008)
        let observeOut = RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix
        var p: [PacketRecord] = []
        // The tunnel from the app's port, carrying bytes (marked), first seen mid-stream.
        for i in 0..<3 {
            p.append(f.nflog(app, peerHBONE, flags: [.ack, .psh], seq: 7001 + UInt32(i) * 90, ack: 9001, hook: .postrouting,
                             prefix: observeOut, mark: 0x539, outIf: 2))
            p.append(f.packet(app, peerHBONE, flags: [.ack, .psh], seq: 7001 + UInt32(i) * 90, ack: 9001, payload: 90, on: eth0, direction: .outbound))
            f.advance(micros: 100)
        }
        // The app's connection from the same port to the service: its redirected SYN on lo first, then the reply
        // de-NATed, then the twin's pre-NAT SYN.
        p.append(f.packet(app, capture15001, flags: [.syn], seq: 1000, on: lo, direction: .inbound))
        f.advance(micros: 20)
        p.append(f.packet(service, app, flags: [.syn, .ack], seq: 5000, ack: 1001, on: lo, direction: .inbound))
        p.append(f.packet(app, capture15001, flags: [.ack], seq: 1001, ack: 5001, on: lo, direction: .inbound))
        f.advance(micros: 60)
        p.append(f.nflog(app, service, flags: [.syn], seq: 1000, hook: .output, prefix: redirectTwin))
        p.append(f.packet(app, peerHBONE, flags: [.ack, .psh], seq: 7271, ack: 9001, payload: 90, on: eth0, direction: .outbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: ruleset)
        let tunnel = try XCTUnwrap(sink.timelines.first { $0.original.dst == peerHBONE }, "\(sink.timelines.map(\.original))")
        XCTAssertEqual(tunnel.kind, .hboneOutbound)
        XCTAssertNil(tunnel.redirect)
        XCTAssertEqual(tunnel.aliases, [])
        let apps = sink.timelines.filter { $0.original.dst == service }
        XCTAssertEqual(apps.count, 1, "\(sink.timelines.map { "\($0.kind) \($0.original) \($0.aliases)" })")
        XCTAssertEqual(apps.first?.aliases, [FiveTuple(proto: IPProto.tcp, src: app, dst: capture15001)])
        XCTAssertEqual(apps.first?.redirect, .redirected(toPort: 15001, originalDestination: service))
    }

    /// Linux shares an ephemeral port between sockets to different destinations: here ztunnel's passthrough to an
    /// endpoint outside the mesh begins from the app's port between the app's two views, and takes that endpoint in
    /// the lookup by initiator. The views still pair up by the SYN's ISN: the app's pre-NAT SYN read first and its
    /// redirected SYN after, or its redirected SYN first and the de-NATed SYN-ACK after (a mixed-service benchmark
    /// round split one app connection so in 20 000).
    func testAnAppsViewsPairUpWhenAnotherSocketOnItsPortBeganBetweenThem() {
        let outside = PacketFactory.ep("10.0.9.9", 80)
        for appViewFirst in [true, false] {
            var f = PacketFactory()
            var p: [PacketRecord] = []
            let preNAT = f.nflog(app, service, flags: [.syn], seq: 9000, hook: .output, prefix: redirectTwin, outIf: 2)
            if appViewFirst { p.append(preNAT) } else {
                p.append(f.packet(app, capture15001, flags: [.syn], seq: 9000, on: lo, direction: .inbound))
            }
            p.append(f.packet(app, outside, flags: [.syn], seq: 5000, on: eth0, direction: .outbound))
            f.advance(micros: 4)
            if appViewFirst { p.append(f.packet(app, capture15001, flags: [.syn], seq: 9000, on: lo, direction: .inbound)) }
            f.advance(micros: 9)
            p.append(f.packet(outside, app, flags: [.syn, .ack], seq: 100, ack: 5001, on: eth0, direction: .inbound))
            f.advance(micros: 3)
            p.append(f.packet(service, app, flags: [.syn, .ack], seq: 700, ack: 9001, on: lo, direction: .inbound))
            p.append(f.packet(app, outside, flags: [.ack], seq: 5001, ack: 101, on: eth0, direction: .outbound))
            p.append(f.packet(app, capture15001, flags: [.ack], seq: 9001, ack: 701, on: lo, direction: .inbound))
            if !appViewFirst { p.append(preNAT) }
            let (sink, _) = correlate(p, tags: f.tags, ruleset: seedNatRuleset())
            let connections = sink.timelines.map { "\($0.original) \($0.aliases)" }
            XCTAssertEqual(sink.timelines.count, 2, "app's view first: \(appViewFirst): \(connections)")
            let appConnection = sink.timelines.first { $0.original == FiveTuple(proto: IPProto.tcp, src: app, dst: service) }
            XCTAssertEqual(appConnection?.aliases, [FiveTuple(proto: IPProto.tcp, src: app, dst: capture15001)], "\(connections)")
            XCTAssertEqual(appConnection?.redirect, .redirected(toPort: 15001, originalDestination: service))
            XCTAssertEqual(appConnection?.packets, 4)
        }
    }

    /// Another app socket that happens to reuse the ISN's value from another address, or the same address on a
    /// connection that was not redirected, is not joined: only a redirected view and an app view pair up.
    func testSameISNOnTwoPlainConnectionsIsNotJoined() {
        var f = PacketFactory()
        var p: [PacketRecord] = []
        p.append(f.packet(app, service, flags: [.syn], seq: 1000, on: eth0, direction: .outbound))
        p.append(f.packet(remapped, PacketFactory.ep("10.0.2.3", 80), flags: [.syn], seq: 1000, on: eth0, direction: .outbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: seedNatRuleset())
        XCTAssertEqual(sink.timelines.count, 2, "\(sink.timelines.map(\.original))")
    }

    /// The real thing, recorded in a scratch pod (Fixtures/captures/SOURCES.md): before, each app connection came
    /// out as two (the redirected view with no original destination, and the app's view with no lo leg), the
    /// ztunnel hops paired the wrong connections, and the IPv6 HBONE leg read as a forged-mark escape.
    func testARecordedCaptureWithRemappedPortsGivesOneConnectionPerAppConnection() throws {
        let dir = ProjectPaths.fixtures.appendingPathComponent("captures")
        let files = ["remapped-port-any.pcap", "remapped-port-nflog.pcap"].map { dir.appendingPathComponent($0).path }
        for onlyCapture in [false, true] {
            let r = try Command.run([ProjectPaths.meshtrace, "analyze"] + (onlyCapture ? [files[0]] : files)
                                    + ["--rules", dir.appendingPathComponent("remapped-port-rules.txt").path, "--json", "--quiet"])
            XCTAssertEqual(r.status, 0, r.stderr)
            let lines = r.stdout.split(separator: "\n").compactMap {
                try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
            }
            let connections = lines.filter { $0["type"] as? String == "connection" }
            func connection(_ src: String, _ sport: Int, _ dport: Int) -> [String: Any]? {
                connections.first {
                    let o = $0["original"] as? [String: Any]
                    return o?["src"] as? String == src && (o?["sport"] as? NSNumber)?.intValue == sport
                        && (o?["dport"] as? NSNumber)?.intValue == dport
                }
            }
            for (src, sport, dport, natPort, hbone) in [("10.244.1.10", 36010, 80, 6839, "10.244.1.20"),
                                                       ("fd00::10", 52216, 8080, 48775, "fd00::20")] {
                let c = try XCTUnwrap(connection(src, sport, dport), "no connection from \(src):\(sport) (capture only: \(onlyCapture))")
                let aliases = c["aliases"] as? [[String: Any]] ?? []
                XCTAssertEqual(aliases.compactMap { ($0["sport"] as? NSNumber)?.intValue }, [natPort])
                XCTAssertEqual((c["redirect"] as? [String: Any])?["to_port"] as? Int, 15001)
                XCTAssertNil(connection(src, natPort, 15001), "the redirected view is still a connection of its own")
                let hop = try XCTUnwrap((c["hops"] as? [[String: Any]])?.first, "no hop for \(src):\(sport)")
                XCTAssertEqual(hop["confidence"] as? String, "high")
                let inner = try XCTUnwrap(connections.first { ($0["id"] as? NSNumber)?.intValue == (hop["inner"] as? NSNumber)?.intValue })
                XCTAssertEqual((inner["original"] as? [String: Any])?["dst"] as? String, hbone)
                XCTAssertEqual(((inner["original"] as? [String: Any])?["dport"] as? NSNumber)?.intValue, 15008)
            }
            let summary = try XCTUnwrap(lines.last { $0["type"] as? String == "summary" })
            XCTAssertEqual((summary["escapes"] as? NSNumber)?.intValue, 0, "capture only: \(onlyCapture)")
        }
    }

    /// A file whose packets go back in time by more than the close linger (pcapng files joined with `cat`, the
    /// second older than the first) splits connections: the records that came late are counted and said, in the
    /// text summary and the JSON one (`late_records`), instead of printing split connections without a word.
    func testRecordsFarBehindTheCapturesClockAreCountedAndSaid() throws {
        var f = PacketFactory()
        var p: [PacketRecord] = []
        p.append(f.packet(app, service, flags: [.syn], seq: 1000, on: eth0, direction: .outbound))
        f.advance(micros: 5_000_000)
        p.append(f.packet(PacketFactory.ep("10.0.1.5", 40001), service, flags: [.syn], seq: 7000, on: eth0, direction: .outbound))
        f.advance(micros: -4_000_000)   // a second section, older: 4 s behind
        p.append(f.packet(service, app, flags: [.syn, .ack], seq: 5000, ack: 1001, on: eth0, direction: .inbound))
        f.advance(micros: 2_500_000)     // 1.5 s behind: within the 2 s linger
        p.append(f.packet(app, service, flags: [.ack], seq: 1001, ack: 5001, on: eth0, direction: .outbound))
        let (_, summary) = correlate(p, tags: f.tags)
        XCTAssertEqual(summary.lateRecords, 1)
        let text = try renderReport(p, tags: f.tags) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("1 records out of time order"), text)
        // Live, the same count says the reader fell behind (no file to fix).
        var live = summary
        live.live = true
        let liveText = try written { fd in try TextReport(fileDescriptor: fd).finish(live) }
        XCTAssertTrue(liveText.contains("1 records read more than the close linger after later ones (the reader fell behind"), liveText)
        XCTAssertFalse(liveText.contains("mergecap"), liveText)
        let json = try renderReport(p, tags: f.tags) { JSONReport(fileDescriptor: $0) }
        XCTAssertTrue(json.contains("\"late_records\":1"), json)
        // In time order, nothing is said (and the JSON key is absent).
        let inOrder = try renderReport(Array(p.prefix(2)), tags: f.tags) { JSONReport(fileDescriptor: $0) }
        XCTAssertFalse(inOrder.contains("late_records"))
    }

    /// An echo request's src port is its type (8 << 8 = 2048), which "looks like a listener" below 10000: with an
    /// identifier of 10000 or more the request's sender was taken for the responder, and the reply was a second
    /// connection (its type differs). Now one connection per echo, begun by the requester, for ICMP and ICMPv6.
    func testAnEchoRequestAndItsReplyAreOneConnectionBegunByTheRequester() {
        let pod = IPAddress("10.0.1.5")!, peer = IPAddress("10.0.2.2")!
        let pod6 = IPAddress("fd00::10")!, peer6 = IPAddress("fd00::20")!
        for (proto, request, reply, a, b) in [(IPProto.icmp, UInt16(8 << 8), UInt16(0), pod, peer),
                                              (IPProto.icmpv6, UInt16(128 << 8), UInt16(129 << 8), pod6, peer6)] {
            for id: UInt16 in [713, 17009] {
                var f = PacketFactory()
                let p = [f.packet(Endpoint(a, request), Endpoint(b, id), proto: proto, on: eth0, direction: .outbound),
                         f.packet(Endpoint(b, reply), Endpoint(a, id), proto: proto, on: eth0, direction: .inbound)]
                let (sink, _) = correlate(p, tags: f.tags)
                XCTAssertEqual(sink.timelines.count, 1, "proto \(proto) id \(id): \(sink.timelines.map(\.original))")
                guard let c = sink.timelines.first else { continue }
                XCTAssertEqual(c.original, FiveTuple(proto: proto, src: Endpoint(a, request), dst: Endpoint(b, id)), "id \(id)")
                XCTAssertEqual(c.events.map(\.isReply), [false, true], "id \(id)")
            }
        }
        // A reply seen without its request (the capture began in between) still names the requester.
        var f = PacketFactory()
        let (sink, _) = correlate([f.packet(Endpoint(peer, 0), Endpoint(pod, 17009), proto: IPProto.icmp, on: eth0, direction: .inbound)], tags: f.tags)
        XCTAssertEqual(sink.timelines.first?.original, FiveTuple(proto: IPProto.icmp, src: Endpoint(pod, 8 << 8), dst: Endpoint(peer, 17009)))
    }
}
