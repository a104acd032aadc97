import XCTest
@testable import Capture

/// ztunnel pools HBONE connections: a second app connection to a destination it already has a tunnel to goes
/// through that tunnel as another HTTP/2 stream, with no new connection to :15008 for a fresh join to find.
final class PooledTunnelTests: XCTestCase {
    let app = PacketFactory.ep("10.0.1.5", 40000)
    let app2 = PacketFactory.ep("10.0.1.5", 40001)
    let service = PacketFactory.ep("10.0.2.2", 80)
    let ztunnelOut = PacketFactory.ep("10.0.1.5", 50000)
    let peerHBONE = PacketFactory.ep("10.0.2.2", 15008)
    let capture15001 = PacketFactory.ep("127.0.0.1", 15001)
    let observeOut = RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix

    /// The app's first connection and the tunnel ztunnel opens for it (the tunnel is left open), then, `gap`
    /// later, a second app connection from `app2` to `second` while the tunnel carries its bytes; then the tunnel
    /// closes. `tunnelClosesFirst` closes the tunnel before the second connection instead.
    func pooledScenario(_ f: inout PacketFactory, rules: Ruleset, second: Endpoint, gapMicros: Int64 = 5_000_000,
                        firstApp: Bool = true, tunnelClosesFirst: Bool = false, tunnelStaysOpen: Bool = false) -> [PacketRecord] {
        var out: [PacketRecord] = []
        if firstApp {
            out += CorrelatorTests.outboundScenario(&f, ruleset: rules)
            // outboundScenario ends with the tunnel's two FINs: this tunnel stays open.
            out.removeLast(2)
        } else {
            // A tunnel opened before the capture: seen mid-stream, with ztunnel's mark on its NFLOG copy.
            out.append(f.nflog(ztunnelOut, peerHBONE, flags: [.ack, .psh], seq: 7001, ack: 9001, hook: .postrouting,
                               prefix: observeOut, mark: 0x539, outIf: 2))
            out.append(f.packet(ztunnelOut, peerHBONE, flags: [.ack, .psh], seq: 7001, ack: 9001, payload: 90, on: eth0, direction: .outbound))
            out.append(f.packet(peerHBONE, ztunnelOut, flags: [.ack], seq: 9001, ack: 7091, on: eth0, direction: .inbound))
        }
        if tunnelClosesFirst {
            out.append(f.packet(ztunnelOut, peerHBONE, flags: [.fin, .ack], seq: 7181, ack: 9401, on: eth0, direction: .outbound))
            out.append(f.packet(peerHBONE, ztunnelOut, flags: [.fin, .ack], seq: 9401, ack: 7182, on: eth0, direction: .inbound))
        }
        f.advance(micros: gapMicros)
        out += carried(&f, rules: rules, from: app2, to: second, throughTunnel: !tunnelClosesFirst)
        if !tunnelClosesFirst && !tunnelStaysOpen {
            // ztunnel closes the idle pool later.
            f.advance(micros: 3_000_000)
            out.append(f.packet(ztunnelOut, peerHBONE, flags: [.fin, .ack], seq: 7331, ack: 9751, on: eth0, direction: .outbound))
            out.append(f.packet(peerHBONE, ztunnelOut, flags: [.fin, .ack], seq: 9751, ack: 7332, on: eth0, direction: .inbound))
        }
        return out
    }

    /// A connection to a service VIP that ztunnel sends through a tunnel it kept open to the pod it resolved the VIP
    /// to (pooled; here open before the capture began, seen mid-stream): no new tunnel, and none names the VIP. It is
    /// joined to the open marked tunnel, pooled and low; the tunnel read as a forged mark (the lab's `service`
    /// scenario after `outbound` with --pool-tunnels said "escape").
    func testAServiceVIPThroughAPooledTunnelIsJoinedToIt() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        // The kept tunnel, first seen mid-stream (a keepalive-sized packet), then the app's connection through it.
        var p = [f.nflog(ztunnelOut, peerHBONE, flags: [.ack], seq: 7181, ack: 9401, hook: .postrouting, prefix: observeOut,
                         mark: 0x539, outIf: 2),
                 f.packet(ztunnelOut, peerHBONE, flags: [.ack], seq: 7181, ack: 9401, on: eth0, direction: .outbound)]
        f.advance(micros: 1_000)
        p += carried(&f, rules: rules, from: app, to: vip, throughTunnel: true)
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        XCTAssertEqual(summary.escapes, 0, sink.findings.map(\.summary).joined(separator: "; "))
        let appConn = try XCTUnwrap(sink.timeline(.appOutbound))
        let hop = try XCTUnwrap(appConn.hops.first, "no hop")
        XCTAssertEqual(hop.confidence, .low)
        XCTAssertTrue(hop.evidence.contains { $0.kind == "pooled-tunnel" }, "\(hop.evidence.map(\.detail))")
        XCTAssertEqual(sink.timelines.first { $0.id == hop.inner }?.original.dst, peerHBONE)
    }

    /// One app connection from `app` to `dst`, redirected to 15001 and closed; with `throughTunnel`, the open tunnel
    /// carries bytes while it runs (no SYN to :15008: it reuses the tunnel).
    func carried(_ f: inout PacketFactory, rules: Ruleset, from app: Endpoint, to dst: Endpoint, throughTunnel: Bool) -> [PacketRecord] {
        var out: [PacketRecord] = []
        out.append(f.nflog(app, dst, flags: [.syn], seq: 3000, hook: .output,
                           prefix: twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules), outIf: 2))
        f.advance(micros: 5)
        out.append(f.packet(app, capture15001, flags: [.syn], seq: 3000, on: lo, direction: .outbound))
        f.advance(micros: 20)
        out.append(f.packet(dst, app, flags: [.syn, .ack], seq: 6000, ack: 3001, on: lo, direction: .outbound))
        out.append(f.packet(app, capture15001, flags: [.ack], seq: 3001, ack: 6001, on: lo, direction: .outbound))
        f.advance(micros: 100)
        out.append(f.packet(app, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound))
        if throughTunnel {
            f.advance(micros: 50)
            out.append(f.packet(ztunnelOut, peerHBONE, flags: [.ack, .psh], seq: 7181, ack: 9401, payload: 150, on: eth0, direction: .outbound))
            f.advance(micros: 700)
            out.append(f.packet(peerHBONE, ztunnelOut, flags: [.ack, .psh], seq: 9401, ack: 7331, payload: 350, on: eth0, direction: .inbound))
        }
        f.advance(micros: 50)
        out.append(f.packet(dst, app, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound))
        out.append(f.packet(app, capture15001, flags: [.fin, .ack], seq: 3101, ack: 6301, on: lo, direction: .outbound))
        out.append(f.packet(dst, app, flags: [.fin, .ack], seq: 6301, ack: 3102, on: lo, direction: .outbound))
        return out
    }

    /// Packets placed at µs offsets from where the factory's clock stood: scenarios of several connections at once.
    struct Schedule {
        var f: PacketFactory
        let t0: Int64
        var packets: [PacketRecord] = []
        init(_ f: PacketFactory) { self.f = f; t0 = f.clock }
        mutating func at(_ micros: Int64, _ make: (inout PacketFactory) -> PacketRecord) {
            f.clock = t0 + micros * 1_000
            packets.append(make(&f))
        }
        /// An app connection's handshake, redirected to 15001 (its NAT twin's hit on the SYN).
        mutating func appOpens(_ app: Endpoint, to dst: Endpoint, at start: Int64, natTwin: String) {
            at(start) { $0.nflog(app, dst, flags: [.syn], seq: 3000, hook: .output, prefix: natTwin, outIf: 2) }
            at(start + 5) { $0.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.syn], seq: 3000, on: lo, direction: .outbound) }
            at(start + 20) { $0.packet(dst, app, flags: [.syn, .ack], seq: 6000, ack: 3001, on: lo, direction: .outbound) }
            at(start + 25) { $0.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.ack], seq: 3001, ack: 6001, on: lo, direction: .outbound) }
        }
        /// ztunnel's new tunnel to `peer`, its SYN marked 0x539.
        mutating func tunnelOpens(_ tunnel: Endpoint, to peer: Endpoint, at start: Int64, observeOut: String) {
            at(start) { $0.nflog(tunnel, peer, flags: [.syn], seq: 1, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2) }
            at(start) { $0.packet(tunnel, peer, flags: [.syn], seq: 1, on: eth0, direction: .outbound) }
            at(start + 30) { $0.packet(peer, tunnel, flags: [.syn, .ack], seq: 50, ack: 2, on: eth0, direction: .inbound) }
            at(start + 35) { $0.packet(tunnel, peer, flags: [.ack], seq: 2, ack: 51, on: eth0, direction: .outbound) }
        }
        /// An app connection's 100-byte request to 15001 on lo.
        mutating func appRequests(_ app: Endpoint, at t: Int64) {
            at(t) { $0.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        }
        /// The 300-byte reply it gets from `dst` on lo.
        mutating func appGetsReply(_ app: Endpoint, from dst: Endpoint, at t: Int64) {
            at(t) { $0.packet(dst, app, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        }
        /// An app connection that sent 100 bytes and got 300 closes (its FIN to 15001 on lo, then the reply's).
        mutating func appCloses(_ app: Endpoint, from dst: Endpoint, at t: Int64) {
            at(t) { $0.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.fin, .ack], seq: 3101, ack: 6301, on: lo, direction: .outbound) }
            at(t + 10) { $0.packet(dst, app, flags: [.fin, .ack], seq: 6301, ack: 3102, on: lo, direction: .outbound) }
        }
        /// ztunnel's connection into the app from `leg` (the client's address), 0x539-marked (the connmark twin's hit
        /// on its SYN), begun at `start`: with `data`, a 100-byte request and a 300-byte reply before its close at
        /// `start + 320` (or `closesAt`); without, the app closes it at once.
        mutating func legRuns(_ leg: Endpoint, into app: Endpoint, at start: Int64, isn: UInt32, connmarkTwin: String,
                              data: Bool = true, closesAt: Int64? = nil) {
            at(start) { $0.nflog(leg, app, flags: [.syn], seq: isn, hook: .prerouting, prefix: connmarkTwin, mark: 0x539, inIf: 1) }
            at(start) { $0.packet(leg, app, flags: [.syn], seq: isn, on: lo, direction: .outbound) }
            at(start + 8) { $0.packet(app, leg, flags: [.syn, .ack], seq: 900, ack: isn + 1, on: lo, direction: .outbound) }
            let sent: UInt32 = data ? 100 : 0, got: UInt32 = data ? 300 : 0
            if data {
                at(start + 30) { $0.packet(leg, app, flags: [.ack, .psh], seq: isn + 1, ack: 901, payload: 100, on: lo, direction: .outbound) }
                at(start + 300) { $0.packet(app, leg, flags: [.ack, .psh], seq: 901, ack: isn + 101, payload: 300, on: lo, direction: .outbound) }
            }
            let end = closesAt ?? (data ? start + 320 : start + 20)
            at(end) { $0.packet(leg, app, flags: [.fin, .ack], seq: isn + 1 + sent, ack: 901 + got, on: lo, direction: .outbound) }
            at(end + 10) { $0.packet(app, leg, flags: [.fin, .ack], seq: 901 + got, ack: isn + 2 + sent, on: lo, direction: .outbound) }
        }
        /// A tunnel from `client` into the pod's HBONE port: its handshake at `start`, its request (120 bytes) at
        /// `requestAt`; closed (no reply) at `closesAt` when given.
        mutating func tunnelComesIn(_ client: Endpoint, to hbone: Endpoint, at start: Int64, requestAt: Int64, closesAt: Int64? = nil) {
            at(start) { $0.packet(client, hbone, flags: [.syn], seq: 1, on: eth0, direction: .inbound) }
            at(start + 10) { $0.packet(hbone, client, flags: [.syn, .ack], seq: 100, ack: 2, on: eth0, direction: .outbound) }
            at(requestAt) { $0.packet(client, hbone, flags: [.ack, .psh], seq: 2, ack: 101, payload: 120, on: eth0, direction: .inbound) }
            if let end = closesAt {
                at(end) { $0.packet(hbone, client, flags: [.fin, .ack], seq: 101, ack: 122, on: eth0, direction: .outbound) }
                at(end + 10) { $0.packet(client, hbone, flags: [.fin, .ack], seq: 122, ack: 102, on: eth0, direction: .inbound) }
            }
        }
        /// ztunnel closes a tunnel whose next sequence numbers are `seq` (its own) and `peerSeq`; the peer answers in 40 µs.
        mutating func tunnelCloses(_ tunnel: Endpoint, to peer: Endpoint, at t: Int64, seq: UInt32, peerSeq: UInt32) {
            at(t) { $0.packet(tunnel, peer, flags: [.fin, .ack], seq: seq, ack: peerSeq, on: eth0, direction: .outbound) }
            at(t + 40) { $0.packet(peer, tunnel, flags: [.fin, .ack], seq: peerSeq, ack: seq + 1, on: eth0, direction: .inbound) }
        }
    }

    /// A schedule on the server side (the seed ruleset), and the connmark twin's prefix that ztunnel's connections
    /// into the app hit.
    func serverSide() -> (Schedule, String) {
        (Schedule(PacketFactory()), twin("mangle", "ISTIO_PRERT", 1, ruleset: seedNatRuleset()))
    }

    /// A schedule's packets correlated in time order, with the seed ruleset.
    func correlated(_ s: Schedule) -> CollectingSink {
        correlate(s.packets.sorted { $0.time < $1.time }, tags: s.f.tags, ruleset: seedNatRuleset()).0
    }

    /// Each connection's hop is low, and its relay-timing evidence passes `check`.
    func assertLowRelayTiming(of sources: [Endpoint], in sink: CollectingSink, _ check: (String) -> Void) throws {
        for src in sources {
            let hop = try XCTUnwrap(try connection(from: src, in: sink).hops.first, "\(src)")
            XCTAssertEqual(hop.confidence, .low, "\(src)")
            check(try XCTUnwrap(hop.evidence.first { $0.kind == "relay-timing" }?.detail, "\(src)"))
        }
    }

    func connection(from src: Endpoint, in sink: CollectingSink) throws -> ConnectionTimeline {
        try XCTUnwrap(sink.timelines.first { $0.original.src == src }, "no connection from \(src)")
    }

    func testALaterAppConnectionIsJoinedToTheTunnelItReused() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let (sink, summary) = correlate(pooledScenario(&f, rules: rules, second: service), tags: f.tags, ruleset: rules)
        let first = try connection(from: app, in: sink)
        let second = try connection(from: app2, in: sink)
        let tunnel = try connection(from: ztunnelOut, in: sink)
        XCTAssertEqual(first.kind, .appOutbound)
        XCTAssertEqual(second.kind, .appOutbound)
        XCTAssertEqual(tunnel.kind, .hboneOutbound)
        XCTAssertEqual(summary.hops, 2)
        XCTAssertEqual(first.hops.first?.inner, tunnel.id, "the first connection's tunnel, opened for it")
        XCTAssertFalse(first.hops.first?.evidence.contains { $0.kind == "pooled-tunnel" } ?? true)

        let hop = try XCTUnwrap(second.hops.first)
        XCTAssertEqual(second.hops.count, 1)
        XCTAssertEqual(hop.direction, .outbound)
        XCTAssertEqual(hop.outer, second.id)
        XCTAssertEqual(hop.inner, tunnel.id)
        XCTAssertEqual(hop.confidence, .medium, "mark, destination and a lone tunnel; never high for a pooled join")
        let kinds = hop.evidence.map(\.kind)
        XCTAssertEqual(Set(kinds), ["ztunnel-mark", "original-destination", "pooled-tunnel", "unique", "bytes"])
        XCTAssertFalse(kinds.contains("timing"), "timing says nothing about a reused tunnel")
        let pooled = try XCTUnwrap(hop.evidence.first { $0.kind == "pooled-tunnel" })
        XCTAssertTrue(pooled.detail.hasPrefix("inner connection (the tunnel) was open already, since 5."), pooled.detail)
        XCTAssertEqual(hop.evidence.first { $0.kind == "unique" }?.detail, "the only open tunnel that fits")

        // The tunnel lists both connections it carried.
        XCTAssertEqual(tunnel.hops.map(\.outer), [first.id, second.id])
        XCTAssertEqual(summary.escapes, 0)
        XCTAssertTrue(sink.findings.isEmpty)
    }

    /// `--filter` over a pooled tunnel: the tunnel is shown with the carried connection that matched, the other
    /// carried connection is not, and the summary counts one hop, the shown one.
    func testAFilterShowsATunnelWithTheCarriedConnectionThatMatchedOnly() throws {
        for (selectedApp, hiddenApp) in [(app2, app), (app, app2)] {
            var f = PacketFactory()
            let rules = seedNatRuleset()
            var packets = pooledScenario(&f, rules: rules, second: service)
            for i in packets.indices {
                packets[i].selected = packets[i].tuple.src == selectedApp || packets[i].tuple.dst == selectedApp
            }
            var options = CorrelatorOptions()
            options.showsOnlySelected = true
            let (sink, summary) = correlate(packets, tags: f.tags, ruleset: rules, options: options)
            let shown = try connection(from: selectedApp, in: sink)
            let tunnel = try connection(from: ztunnelOut, in: sink)
            XCTAssertTrue(shown.hops.contains { $0.inner == tunnel.id })
            XCTAssertFalse(sink.timelines.contains { $0.original.src == hiddenApp }, "\(hiddenApp) matched nothing")
            XCTAssertEqual(summary.connections, 2)
            XCTAssertEqual(summary.connectionsFilteredOut, 1)
            XCTAssertEqual(summary.hops, 1, "the hidden connection's hop to the tunnel is not counted")
        }
    }

    func testATunnelStillOpenWhenTheCaptureEndsIsJoinedToo() throws {
        // At the end every open connection is emitted at once, the tunnel (an older id) first: the join must have
        // been made before.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let (sink, summary) = correlate(pooledScenario(&f, rules: rules, second: service, tunnelStaysOpen: true), tags: f.tags, ruleset: rules)
        let second = try connection(from: app2, in: sink)
        let tunnel = try connection(from: ztunnelOut, in: sink)
        XCTAssertFalse(tunnel.closed)
        XCTAssertEqual(second.hops.first?.inner, tunnel.id)
        XCTAssertEqual(tunnel.hops.map(\.outer).count, 2)
        XCTAssertEqual(summary.hops, 2)
    }

    func testATunnelListsTheFirst16ConnectionsItCarriedAndEachListsTheTunnel() throws {
        // Memory stays bounded on a tunnel that carries thousands: it keeps 16 pooled links, the rest only on their side.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var p = pooledScenario(&f, rules: rules, second: service, tunnelStaysOpen: true)
        let apps = (0..<20).map { PacketFactory.ep("10.0.1.5", 41000 + UInt16($0)) }
        for app in apps {
            f.advance(micros: 3_000_000)
            p += carried(&f, rules: rules, from: app, to: service, throughTunnel: true)
        }
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        let tunnel = try connection(from: ztunnelOut, in: sink)
        XCTAssertEqual(summary.hops, 22, "the first, app2's and 20 more")
        for app in apps { XCTAssertEqual(try connection(from: app, in: sink).hops.map(\.inner), [tunnel.id], "\(app)") }
        XCTAssertEqual(tunnel.hops.count, 1 + Correlator.maxPooledLinksListed)
        XCTAssertEqual(tunnel.hops.first?.outer, try connection(from: app, in: sink).id, "the one it was opened for first")
    }

    func testTwoConcurrentStreamsOfOneTunnelAreEachJoinedToIt() throws {
        // ztunnel multiplexes: two app connections that overlap in time both go through the one open tunnel.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let app3 = PacketFactory.ep("10.0.1.5", 40002)
        var p = pooledScenario(&f, rules: rules, second: service, tunnelStaysOpen: true)
        // The second connection (from app2) is the scenario's; a third starts 60 µs after it, while it runs.
        let secondStart = try XCTUnwrap(p.first { $0.tuple.src == app2 }).time.totalNanoseconds
        let end = f.clock
        f.clock = secondStart + 60_000
        let third = carried(&f, rules: rules, from: app3, to: service, throughTunnel: true)
        f.clock = max(end, f.clock)
        XCTAssertLessThan(third[0].time, try XCTUnwrap(p.last { $0.tuple.src == app2 || $0.tuple.dst == app2 }).time, "the streams overlap")
        p = (p + third).enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        let tunnel = try connection(from: ztunnelOut, in: sink)
        let first = try connection(from: app, in: sink)
        let second = try connection(from: app2, in: sink), thirdConnection = try connection(from: app3, in: sink)
        XCTAssertEqual(summary.hops, 3)
        for c in [second, thirdConnection] {
            let hop = try XCTUnwrap(c.hops.first, "\(c.original.src) has no hop")
            XCTAssertEqual(c.hops.count, 1)
            XCTAssertEqual(hop.inner, tunnel.id)
            XCTAssertEqual(hop.confidence, .medium)
            XCTAssertTrue(hop.evidence.contains { $0.kind == "pooled-tunnel" })
        }
        XCTAssertEqual(Set(tunnel.hops.map(\.outer)), [first.id, second.id, thirdConnection.id])
        XCTAssertEqual(summary.escapes, 0)
    }

    /// A connection to another address than the open tunnel's, with no tunnel of its own: it was refused this tunnel
    /// until the eighteenth round ("a tunnel to 10.0.2.2 does not carry a connection to 10.0.3.3"). But that is what a
    /// service VIP looks like (ztunnel resolves 10.0.3.3 to the pod 10.0.2.2 and reuses its kept tunnel), and a
    /// connection with bytes and no tunnel at all is no likelier. It is joined, low (no identity), as pooled, after every
    /// join with identity (a tunnel opened for it, a kept one to its own address) had its chance.
    func testATunnelToAnotherDestinationIsTakenOnlyLowAsForAServiceVIP() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let elsewhere = PacketFactory.ep("10.0.3.3", 80)
        let (sink, summary) = correlate(pooledScenario(&f, rules: rules, second: elsewhere), tags: f.tags, ruleset: rules)
        let second = try connection(from: app2, in: sink)
        let tunnel = try connection(from: ztunnelOut, in: sink)
        XCTAssertEqual(second.kind, .appOutbound)
        let hop = try XCTUnwrap(second.hops.first, "no hop")
        XCTAssertEqual(hop.inner, tunnel.id)
        XCTAssertEqual(hop.confidence, .low)
        XCTAssertTrue(hop.evidence.contains { $0.kind == "pooled-tunnel" })
        XCTAssertFalse(hop.evidence.contains { $0.kind == "original-destination" })
        XCTAssertEqual(summary.hops, 2)
        XCTAssertEqual(summary.escapes, 0)
    }

    func testATunnelClosedBeforeTheConnectionBeganIsNotTaken() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let (sink, summary) = correlate(pooledScenario(&f, rules: rules, second: service, tunnelClosesFirst: true),
                                  tags: f.tags, ruleset: rules)
        XCTAssertTrue(try connection(from: app2, in: sink).hops.isEmpty)
        XCTAssertEqual(summary.hops, 1)
    }

    func testATunnelOpenedBeforeTheCaptureIsExplainedByTheConnectionItCarries() throws {
        // Without the pooled join the tunnel's 0x539 is unexplained: a (low-confidence) forged-mark finding.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let (sink, summary) = correlate(pooledScenario(&f, rules: rules, second: service, firstApp: false),
                                  tags: f.tags, ruleset: rules)
        let second = try connection(from: app2, in: sink)
        let tunnel = try connection(from: ztunnelOut, in: sink)
        XCTAssertEqual(second.hops.first?.inner, tunnel.id)
        XCTAssertTrue(second.hops.first?.evidence.contains { $0.kind == "pooled-tunnel" } ?? false)
        XCTAssertEqual(tunnel.kind, .hboneOutbound)
        XCTAssertEqual(tunnel.hops.map(\.outer), [second.id])
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map { "\($0.connection.map(String.init) ?? "-") \($0.findingClass) \($0.summary)" })")
        XCTAssertEqual(summary.escapes, 0)
    }

    func testATunnelSeenMidStreamJustBeforeTheConnectionIsPooledNotFresh() throws {
        // 100 ms before the app's connection, inside the window a fresh tunnel may precede it by: still a tunnel
        // that was there already (no SYN), so the join says pooled, not timing.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let (sink, _) = correlate(pooledScenario(&f, rules: rules, second: service, gapMicros: 100_000, firstApp: false),
                            tags: f.tags, ruleset: rules)
        let hop = try XCTUnwrap(try connection(from: app2, in: sink).hops.first)
        XCTAssertEqual(hop.inner, try connection(from: ztunnelOut, in: sink).id)
        XCTAssertEqual(Set(hop.evidence.map(\.kind)), ["ztunnel-mark", "original-destination", "pooled-tunnel", "unique", "bytes"])
    }

    func testATunnelFirstSeenMidStreamAfterTheConnectionBeganIsPooledNotFresh() throws {
        // A live trace started while ztunnel's pooled tunnel sat idle: the tunnel's first packet in the capture is
        // the app's request it carries, 150 µs after the app's SYN, with no SYN of its own. It was open before the
        // capture (so before the app's connection, whose SYN was captured): pooled, not opened for it. It was
        // joined as a fresh hop ("starts 150 µs after", "the only candidate"), high confidence with the mark.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var p = carried(&f, rules: rules, from: app2, to: service, throughTunnel: true)
        p.insert(f.nflog(ztunnelOut, peerHBONE, flags: [.ack, .psh], seq: 7181, ack: 9401, hook: .postrouting,
                         prefix: observeOut, mark: 0x539, outIf: 2), at: p.firstIndex { $0.tuple.src == ztunnelOut }!)
        f.advance(micros: 3_000_000)
        p.append(f.packet(ztunnelOut, peerHBONE, flags: [.fin, .ack], seq: 7331, ack: 9751, on: eth0, direction: .outbound))
        p.append(f.packet(peerHBONE, ztunnelOut, flags: [.fin, .ack], seq: 9751, ack: 7332, on: eth0, direction: .inbound))
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        let tunnel = try connection(from: ztunnelOut, in: sink)
        let hop = try XCTUnwrap(try connection(from: app2, in: sink).hops.first)
        XCTAssertEqual(hop.inner, tunnel.id)
        XCTAssertEqual(Set(hop.evidence.map(\.kind)), ["ztunnel-mark", "original-destination", "pooled-tunnel", "unique", "bytes"])
        XCTAssertEqual(hop.confidence, .medium)
        let words = try XCTUnwrap(hop.evidence.first { $0.kind == "pooled-tunnel" }?.detail)
        XCTAssertTrue(words.contains("before the capture"), words)
        XCTAssertEqual(summary.escapes, 0)
    }

    func testAFreshTunnelJoinSaysATunnelOpenAlreadyCouldHaveCarriedIt() throws {
        // Concurrent app connections with --pool-tunnels: one went through the open tunnel, and a new tunnel to the
        // same peer, opened 200 µs after it began for another connection, was joined to it as 'the only candidate',
        // high confidence. Which of the two carried it is not visible: one of them was open already and carried
        // packets while it ran, so the fresh join is not unique (medium) and says why.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var p = pooledScenario(&f, rules: rules, second: service, tunnelStaysOpen: true)
        let fresh = PacketFactory.ep("10.0.1.5", 50002), opener = PacketFactory.ep("10.0.1.5", 40003)
        let at = try XCTUnwrap(p.firstIndex { $0.tuple.src == app2 })
        var g = f
        g.frame = 10_000
        g.clock = p[at].time.totalNanoseconds
        var s = Schedule(g)
        // The connection the new tunnel was opened for: begun 150 µs after the pooled one, its request relayed
        // through the new tunnel 40 µs after it was sent 3 ms later, its reply likewise.
        s.appOpens(opener, to: service, at: 150, natTwin: twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules))
        s.tunnelOpens(fresh, to: peerHBONE, at: 200, observeOut: observeOut)
        s.at(3_000) { $0.packet(opener, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        s.at(3_040) { $0.packet(fresh, peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 150, on: eth0, direction: .outbound) }
        s.at(4_000) { $0.packet(peerHBONE, fresh, flags: [.ack, .psh], seq: 51, ack: 152, payload: 350, on: eth0, direction: .inbound) }
        s.at(4_040) { $0.packet(service, opener, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        s.at(4_100) { $0.packet(opener, capture15001, flags: [.fin, .ack], seq: 3101, ack: 6301, on: lo, direction: .outbound) }
        s.at(4_110) { $0.packet(service, opener, flags: [.fin, .ack], seq: 6301, ack: 3102, on: lo, direction: .outbound) }
        p += s.packets
        p = p.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let hop = try XCTUnwrap(try connection(from: app2, in: sink).hops.first)
        // The open tunnel relayed its request 50 µs after the app sent it, and its reply 50 µs before the app got it;
        // the new tunnel carried nothing then: relay timing moves the join there (it was on the new tunnel, medium),
        // and the new tunnel goes to the connection whose bytes it relayed.
        XCTAssertEqual(hop.inner, try connection(from: ztunnelOut, in: sink).id)
        XCTAssertEqual(hop.confidence, .medium)
        XCTAssertTrue(hop.evidence.contains { $0.kind == "pooled-tunnel" })
        let words = try XCTUnwrap(hop.evidence.first { $0.kind == "relay-timing" }?.detail)
        XCTAssertTrue(words.hasPrefix("2 of 2 data packets of the outer connection have a twin in the tunnel"), words)
        XCTAssertTrue(words.hasSuffix("of 2 open tunnels that could have carried it, the next best could have matched 0"), words)
        XCTAssertEqual(try connection(from: fresh, in: sink).hops.map(\.outer), [try connection(from: opener, in: sink).id])
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
        // The first app connection's own tunnel was the only one: still high.
        XCTAssertEqual(try connection(from: app, in: sink).hops.first?.confidence, .high)
    }

    func testATunnelWhoseConnectionIsNotInTheCaptureKeepsTheOneTimingPointsAway() throws {
        // The same without the connection the new tunnel was opened for (it cannot happen in a whole capture: that
        // connection's SYN comes before the tunnel's). Moving the pooled connection to the open tunnel would leave
        // the new one with no connection, read as a forged mark: the join stays, low, and says the timing disagreed.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var p = pooledScenario(&f, rules: rules, second: service, tunnelStaysOpen: true)
        let fresh = PacketFactory.ep("10.0.1.5", 50002)
        let at = try XCTUnwrap(p.firstIndex { $0.tuple.src == app2 })
        var g = f
        g.frame = 10_000
        g.clock = p[at].time.totalNanoseconds + 200_000
        p.insert(contentsOf: [
            g.nflog(fresh, peerHBONE, flags: [.syn], seq: 1, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2),
            g.packet(fresh, peerHBONE, flags: [.syn], seq: 1, on: eth0, direction: .outbound),
        ], at: at + 5)
        p = p.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        let hop = try XCTUnwrap(try connection(from: app2, in: sink).hops.first)
        XCTAssertEqual(hop.inner, try connection(from: fresh, in: sink).id)
        XCTAssertEqual(hop.confidence, .low)
        XCTAssertEqual(hop.evidence.first { $0.kind == "relay-timing" }?.detail,
                       "0 of 2 data packets of the outer connection have a twin in this tunnel within 2.0 ms, another of the 2 open tunnels matched 2: "
                       + "the timing points elsewhere, but under load it is noisy, and the join stands on the order the tunnels opened in "
                       + "(no tunnel is taken from the connection it was opened for, or left with none, on timing alone)")
        XCTAssertEqual(summary.escapes, 0)
    }

    /// Live, the correlator's clock runs ahead of the packets: an NFLOG record is stamped when it is read, up to the
    /// instance's flush timeout after its packet. A connection whose last record came so (here its final ACK's copy,
    /// read 2.7 ms late) seemed, by that clock, to run into the next connection's life, and relay timing counted the
    /// next connection's tunnel among those that could have carried it ("of 34 open tunnels" where ~6 were). By
    /// the packets' own times that tunnel opened after the first connection's last packet: it carried none of it.
    /// And the other way round: the first tunnel's close, known first from the NFLOG copy of the peer's FIN read late
    /// (the capture's copy placed after it), seemed by that clock to come during the second connection's life; its
    /// packets had all come before the second connection's first, so relay timing leaves it out there too.
    /// (`pooledTunnel` still counts it by the correlator's clock in the second join's evidence, "1 tunnel ... may
    /// have carried it instead (pooled)", medium: moved to the packets' times, CI's debug build got a forged mark in
    /// the reader-behind live test, and that was reverted.)
    func testATunnelOpenedAfterAConnectionsLastPacketIsNoCandidateThoughALateRecordStretchedItsLife() throws {
        var s = Schedule(PacketFactory())
        let rules = seedNatRuleset(), natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        let first = PacketFactory.ep("10.0.1.5", 50001), second = PacketFactory.ep("10.0.1.5", 50002)
        for (src, tunnel, t0) in [(app, first, Int64(0)), (app2, second, Int64(3_000))] {
            s.appOpens(src, to: service, at: t0, natTwin: natTwin)
            s.tunnelOpens(tunnel, to: peerHBONE, at: t0 + 50, observeOut: observeOut)
            s.at(t0 + 100) { $0.packet(src, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
            s.at(t0 + 140) { $0.packet(tunnel, peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 150, on: eth0, direction: .outbound) }
            s.at(t0 + 700) { $0.packet(peerHBONE, tunnel, flags: [.ack, .psh], seq: 51, ack: 152, payload: 350, on: eth0, direction: .inbound) }
            s.at(t0 + 740) { $0.packet(service, src, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
            s.appCloses(src, from: service, at: t0 + 800)
            s.tunnelCloses(tunnel, to: peerHBONE, at: t0 + 900, seq: 152, peerSeq: 401)
        }
        // The first connection's last ACK (at 820 µs), its NFLOG copy stamped when read: during the second's life.
        s.at(3_500) { $0.nflog(app, capture15001, flags: [.ack], seq: 3102, ack: 6302, hook: .postrouting, prefix: observeOut, outIf: 1) }
        // The peer's FIN closing the first tunnel (at 940 µs), its NFLOG copy read at 3.2 ms and placed first.
        let observeIn = RuleTag(family: .v4, table: "mangle", chain: "PREROUTING", position: .observeIn).prefix
        s.at(3_200) { $0.nflog(peerHBONE, first, flags: [.fin, .ack], seq: 401, ack: 153, hook: .prerouting, prefix: observeIn, inIf: 2) }
        var p = s.packets.sorted { $0.time < $1.time }
        func peerFIN(_ r: PacketRecord) -> Bool { r.tuple.src == peerHBONE && r.tuple.dst == first && r.tcpFlags.contains(.fin) }
        let captured = p.remove(at: try XCTUnwrap(p.firstIndex(where: peerFIN)))
        p.insert(captured, at: try XCTUnwrap(p.firstIndex(where: peerFIN)) + 1)
        let sink = correlate(p, tags: s.f.tags, ruleset: rules).0
        let hop = try XCTUnwrap(try connection(from: app, in: sink).hops.first)
        XCTAssertEqual(hop.inner, try connection(from: first, in: sink).id)
        XCTAssertNil(hop.evidence.first { $0.kind == "relay-timing" }, "\(hop.evidence.map(\.detail))")
        XCTAssertEqual(hop.evidence.first { $0.kind == "unique" }?.detail, "the only candidate within 2.0 s")
        XCTAssertEqual(hop.confidence, .high)
        let secondHop = try XCTUnwrap(try connection(from: app2, in: sink).hops.first)
        XCTAssertEqual(secondHop.inner, try connection(from: second, in: sink).id)
        XCTAssertNil(secondHop.evidence.first { $0.kind == "relay-timing" }, "\(secondHop.evidence.map(\.detail))")
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    func testOfTwoOpenTunnelsToTheDestinationTheOneThatRelayedTheBytesIsChosen() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var p = pooledScenario(&f, rules: rules, second: service)
        // A second tunnel to the same peer, opened 4 s before the second app connection (too early to be opened
        // for it) for a connection that ended then, and carrying bytes while the second one runs.
        let secondTunnel = PacketFactory.ep("10.0.1.5", 50001), opener = PacketFactory.ep("10.0.1.5", 40003)
        let at = try XCTUnwrap(p.firstIndex { $0.tuple.src == app2 })
        var g = f
        g.frame = 10_000
        g.clock = p[at].time.totalNanoseconds - 4_000_300_000
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        var extra = [
            g.nflog(opener, service, flags: [.syn], seq: 3000, hook: .output, prefix: natTwin, outIf: 2),
            g.packet(opener, capture15001, flags: [.syn], seq: 3000, on: lo, direction: .outbound),
            g.packet(service, opener, flags: [.syn, .ack], seq: 6000, ack: 3001, on: lo, direction: .outbound),
            g.packet(opener, capture15001, flags: [.ack], seq: 3001, ack: 6001, on: lo, direction: .outbound),
        ]
        g.clock += 300_000
        extra += [
            g.nflog(secondTunnel, peerHBONE, flags: [.syn], seq: 1, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2),
            g.packet(secondTunnel, peerHBONE, flags: [.syn], seq: 1, on: eth0, direction: .outbound),
            g.packet(peerHBONE, secondTunnel, flags: [.syn, .ack], seq: 50, ack: 2, on: eth0, direction: .inbound),
        ]
        g.clock += 1_000_000
        extra += [
            g.packet(opener, capture15001, flags: [.fin, .ack], seq: 3001, ack: 6001, on: lo, direction: .outbound),
            g.packet(service, opener, flags: [.fin, .ack], seq: 6001, ack: 3002, on: lo, direction: .outbound),
        ]
        p.insert(contentsOf: extra, at: at)
        var h = f
        h.frame = 20_000
        h.clock = p[at + 12].time.totalNanoseconds + 1
        p.insert(h.packet(secondTunnel, peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 40, on: eth0, direction: .outbound),
                 at: at + 13)
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let second = try connection(from: app2, in: sink)
        let hop = try XCTUnwrap(second.hops.first)
        // It was the newest (low, 'the newest was chosen'); the older one relayed the app's request 50 µs after it and
        // its reply 50 µs before, where the newer one's only packet is shorter than the request.
        XCTAssertEqual(hop.inner, try connection(from: ztunnelOut, in: sink).id)
        XCTAssertEqual(hop.confidence, .medium)
        XCTAssertNil(hop.evidence.first { $0.kind == "unique" })
        XCTAssertEqual(hop.evidence.first { $0.kind == "relay-timing" }?.detail,
                       "2 of 2 data packets of the outer connection have a twin in the tunnel within 2.0 ms (the largest gap 50 µs); of 2 open tunnels that could have carried it, the next best could have matched 0")
    }

    func testAFreshInboundTunnelJoinSaysATunnelOpenAlreadyCouldHaveCarriedIt() throws {
        // The server side of concurrent requests with --pool-tunnels: ztunnel's connection into the app came through
        // a tunnel from the client open for seconds, while the client's ztunnel opened a second tunnel for another
        // request. The app leg was joined to the new tunnel as 'the only candidate within 2.0 s', high confidence
        // (in a lab run, 3 of 8 app legs were so joined, all wrongly); the outbound side already said better.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let peer = CorrelatorTests.hbonePeer, podHBONE = CorrelatorTests.podHBONE, appPort = CorrelatorTests.appPort
        let connmarkTwin = twin("mangle", "ISTIO_PRERT", 1, ruleset: rules)
        let secondTunnel = PacketFactory.ep("10.0.2.2", 41001)
        let ztunnelAsPeer = PacketFactory.ep("10.0.2.2", 42000)
        var p = CorrelatorTests.inboundHandshake(&f)
        f.advance(micros: 5_000_000)
        p.append(f.packet(secondTunnel, podHBONE, flags: [.syn], seq: 1, on: eth0, direction: .inbound))
        p.append(f.packet(podHBONE, secondTunnel, flags: [.syn, .ack], seq: 100, ack: 2, on: eth0, direction: .outbound))
        f.advance(micros: 100)
        p.append(f.packet(peer, podHBONE, flags: [.ack, .psh], seq: 2, ack: 101, payload: 120, on: eth0, direction: .inbound))
        // ztunnel's connection into the app for a request: handshake and the request (60 bytes); then its close.
        func legOpens(_ leg: Endpoint, isn: UInt32, appISN: UInt32) {
            p.append(f.nflog(leg, appPort, flags: [.syn], seq: isn, hook: .prerouting, prefix: connmarkTwin, mark: 0x539, inIf: 1))
            p.append(f.packet(leg, appPort, flags: [.syn], seq: isn, on: lo, direction: .outbound))
            p.append(f.packet(appPort, leg, flags: [.syn, .ack], seq: appISN, ack: isn + 1, on: lo, direction: .outbound))
            p.append(f.packet(leg, appPort, flags: [.ack, .psh], seq: isn + 1, ack: appISN + 1, payload: 60, on: lo, direction: .outbound))
        }
        func legCloses(_ leg: Endpoint, isn: UInt32, appISN: UInt32) {
            p.append(f.packet(leg, appPort, flags: [.fin, .ack], seq: isn + 61, ack: appISN + 1, on: lo, direction: .outbound))
            p.append(f.packet(appPort, leg, flags: [.fin, .ack], seq: appISN + 1, ack: isn + 62, on: lo, direction: .outbound))
        }
        f.advance(micros: 200)
        legOpens(ztunnelAsPeer, isn: 500, appISN: 900)
        f.advance(micros: 300)
        p.append(f.packet(podHBONE, peer, flags: [.ack, .psh], seq: 101, ack: 122, payload: 200, on: eth0, direction: .outbound))
        legCloses(ztunnelAsPeer, isn: 500, appISN: 900)
        // The request the second tunnel was opened for, 600 µs on, and ztunnel's connection into the app for it.
        let secondLeg = PacketFactory.ep("10.0.2.2", 42001)
        f.advance(micros: 600)
        p.append(f.packet(secondTunnel, podHBONE, flags: [.ack, .psh], seq: 2, ack: 101, payload: 120, on: eth0, direction: .inbound))
        f.advance(micros: 100)
        legOpens(secondLeg, isn: 700, appISN: 1900)
        legCloses(secondLeg, isn: 700, appISN: 1900)
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let leg = try XCTUnwrap(sink.timelines.first { $0.kind == .ztunnelToApp && $0.original.src == ztunnelAsPeer })
        let hop = try XCTUnwrap(leg.hops.first)
        // The open tunnel's 120 bytes came in 200 µs before ztunnel wrote the request into the app; the new tunnel
        // carried nothing: relay timing joins the leg to the open one (it was on the new one, medium).
        XCTAssertEqual(hop.outer, try connection(from: peer, in: sink).id)
        XCTAssertNotEqual(hop.confidence, .high)
        XCTAssertTrue(hop.evidence.contains { $0.kind == "pooled-tunnel" })
        let words = try XCTUnwrap(hop.evidence.first { $0.kind == "relay-timing" }?.detail)
        XCTAssertEqual(words, "1 of 1 data packets of the inner connection have a twin in the tunnel within 2.0 ms (the largest gap 200 µs); of 2 open tunnels that could have carried it, the next best could have matched 0")
        let second = try XCTUnwrap(sink.timelines.first { $0.kind == .ztunnelToApp && $0.original.src == secondLeg })
        XCTAssertEqual(second.hops.map(\.outer), [try connection(from: secondTunnel, in: sink).id], "the request it was opened for")
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    func testALaterStreamOfAnInboundTunnelIsJoinedToIt() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let peer = CorrelatorTests.hbonePeer, podHBONE = CorrelatorTests.podHBONE, appPort = CorrelatorTests.appPort
        let connmarkTwin = twin("mangle", "ISTIO_PRERT", 1, ruleset: rules)
        var p = CorrelatorTests.inboundHandshake(&f)
        // Two streams, each ztunnel's own connection into the app from the client's address, 5 s apart.
        var seq: UInt32 = 2
        for (i, gap) in [Int64(800), 5_000_000].enumerated() {
            f.advance(micros: gap)
            let ztunnelAsPeer = PacketFactory.ep("10.0.2.2", 42000 + UInt16(i))
            p.append(f.packet(peer, podHBONE, flags: [.ack, .psh], seq: seq, ack: 101, payload: 120, on: eth0, direction: .inbound))
            seq += 120
            p.append(f.nflog(ztunnelAsPeer, appPort, flags: [.syn], seq: 500, hook: .prerouting, prefix: connmarkTwin, mark: 0x539, inIf: 1))
            p.append(f.packet(ztunnelAsPeer, appPort, flags: [.syn], seq: 500, on: lo, direction: .outbound))
            p.append(f.packet(appPort, ztunnelAsPeer, flags: [.syn, .ack], seq: 900, ack: 501, on: lo, direction: .outbound))
            p.append(f.packet(ztunnelAsPeer, appPort, flags: [.ack, .psh], seq: 501, ack: 901, payload: 60, on: lo, direction: .outbound))
            p.append(f.packet(ztunnelAsPeer, appPort, flags: [.fin, .ack], seq: 561, ack: 901, on: lo, direction: .outbound))
            p.append(f.packet(appPort, ztunnelAsPeer, flags: [.fin, .ack], seq: 901, ack: 562, on: lo, direction: .outbound))
        }
        f.advance(micros: 3_000_000)
        p.append(f.packet(peer, podHBONE, flags: [.fin, .ack], seq: seq, ack: 101, on: eth0, direction: .inbound))
        p.append(f.packet(podHBONE, peer, flags: [.fin, .ack], seq: 101, ack: seq + 1, on: eth0, direction: .outbound))
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        let tunnel = try XCTUnwrap(sink.timeline(.hboneInbound))
        let streams = sink.timelines.filter { $0.kind == .ztunnelToApp }.sorted { $0.id < $1.id }
        XCTAssertEqual(streams.count, 2)
        XCTAssertEqual(summary.hops, 2)
        XCTAssertEqual(streams.map { $0.hops.first?.outer }, [tunnel.id, tunnel.id])
        XCTAssertFalse(streams[0].hops[0].evidence.contains { $0.kind == "pooled-tunnel" }, "the first stream joins fresh")
        let pooled = try XCTUnwrap(streams[1].hops.first)
        XCTAssertEqual(pooled.direction, .inbound)
        XCTAssertEqual(pooled.confidence, .medium)
        XCTAssertEqual(Set(pooled.evidence.map(\.kind)), ["ztunnel-mark", "ztunnel-connmark", "client-address", "pooled-tunnel", "unique", "bytes"])
        XCTAssertTrue(pooled.evidence.contains { $0.detail.hasPrefix("outer connection (the tunnel) was open already, since 5.") })
        XCTAssertEqual(tunnel.hops.map(\.inner), streams.map(\.id))
        XCTAssertEqual(summary.escapes, 0)
    }

    func testAConnectionIntoTheAppIsNeverJoinedToATunnelThatOpenedAfterIt() throws {
        // From a lab run of the server side, 4 requests at a time: ztunnel's connections into the app began in
        // another order than their tunnels came in, and a connection whose own tunnel was not free was joined to the
        // next tunnel, which opened 78 µs after it, at high confidence (by then the only candidate); that tunnel's
        // own connection was then joined elsewhere. 77 % of that run's inbound joins were wrong so. With both SYNs
        // captured the order is exact, and ztunnel connects into the app only after it read the tunnel's request.
        // Through HBONE the request rule alone refuses this join (a tunnel's request comes after its SYN): the test
        // fails only with both halves of `inCausalOrder` off; the start rule alone is the outbound test's.
        var (s, connmarkTwin) = serverSide()
        let podHBONE = CorrelatorTests.podHBONE, appPort = CorrelatorTests.appPort
        let kept = PacketFactory.ep("10.0.2.2", 41005), tunnel = PacketFactory.ep("10.0.2.2", 41001)
        let earlyLeg = PacketFactory.ep("10.0.2.2", 42000), leg = PacketFactory.ep("10.0.2.2", 42001)
        // A tunnel open since before the capture brings a request; ztunnel connects into the app for it.
        s.at(0) { $0.packet(kept, podHBONE, flags: [.ack, .psh], seq: 7000, ack: 800, payload: 120, on: eth0, direction: .inbound) }
        s.legRuns(earlyLeg, into: appPort, at: 300, isn: 500, connmarkTwin: connmarkTwin)
        s.at(650) { $0.packet(podHBONE, kept, flags: [.ack, .psh], seq: 800, ack: 7120, payload: 330, on: eth0, direction: .outbound) }
        // 80 µs after that connection began, a new tunnel comes in; its request, and ztunnel's connection for it.
        s.tunnelComesIn(tunnel, to: podHBONE, at: 380, requestAt: 420)
        s.legRuns(leg, into: appPort, at: 700, isn: 2500, connmarkTwin: connmarkTwin)
        s.at(1050) { $0.packet(podHBONE, tunnel, flags: [.ack, .psh], seq: 101, ack: 122, payload: 330, on: eth0, direction: .outbound) }
        s.tunnelCloses(podHBONE, to: tunnel, at: 1100, seq: 431, peerSeq: 122)
        s.tunnelCloses(podHBONE, to: kept, at: 3_000_000, seq: 1130, peerSeq: 7120)
        let sink = correlated(s)
        let newTunnel = try connection(from: tunnel, in: sink)
        let early = try connection(from: earlyLeg, in: sink)
        XCTAssertNotEqual(early.hops.first?.outer, newTunnel.id, "it began before that tunnel")
        XCTAssertEqual(early.hops.first?.outer, try connection(from: kept, in: sink).id)
        let later = try connection(from: leg, in: sink)
        XCTAssertEqual(later.hops.first?.outer, newTunnel.id, "the connection the tunnel was opened for")
        XCTAssertFalse(later.hops.first?.evidence.contains { $0.kind == "pooled-tunnel" } ?? true, "joined fresh, not as a stream of a tunnel it found open")
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    func testAnAppConnectionIsNeverJoinedFreshToATunnelThatOpenedBeforeIt() throws {
        // Outbound the mirror: ztunnel opens a connection's tunnel only after it accepted it. A tunnel whose SYN came
        // 200 µs before the app's (opened for a connection the capture does not have) was joined to it by the slack
        // for receipt-stamped times, and the tunnel opened for it then had none. Neither carries data here.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        let before = PacketFactory.ep("10.0.1.5", 50001), own = PacketFactory.ep("10.0.1.5", 50002)
        var s = Schedule(f)
        s.tunnelOpens(before, to: peerHBONE, at: 0, observeOut: observeOut)
        s.appOpens(app, to: service, at: 200, natTwin: natTwin)
        s.tunnelOpens(own, to: peerHBONE, at: 300, observeOut: observeOut)
        s.appCloses(app, from: service, at: 2_000)
        s.tunnelCloses(own, to: peerHBONE, at: 2_100, seq: 2, peerSeq: 51)
        s.tunnelCloses(before, to: peerHBONE, at: 2_200, seq: 2, peerSeq: 51)
        f = s.f
        let (sink, _) = correlate(s.packets.sorted { $0.time < $1.time }, tags: f.tags, ruleset: rules)
        XCTAssertEqual(try connection(from: app, in: sink).hops.first?.inner, try connection(from: own, in: sink).id,
                       "the tunnel opened after it, not the one before")
    }

    func testATunnelsLastPacketsReadAfterItWasEmittedAreNoForgedMark() throws {
        // A live reader seconds behind (the tests' debug build under load: tens of thousands of late records) gets a
        // tunnel's last ACK and its NFLOG copy after the tunnel was emitted. They make a connection of their own, no
        // SYN and no join, and it read as a forged ztunnel mark: 1-5 escapes in 2 of 8 runs of the catch-up test.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var p = CorrelatorTests.outboundScenario(&f, ruleset: rules)
        let lastFIN = try XCTUnwrap(p.last).time
        // The clock moves on (other traffic: a local connection 3 s later), past the tunnel's close linger.
        f.advance(micros: 3_000_000)
        let here = PacketFactory.ep("127.0.0.1", 5000), there = PacketFactory.ep("127.0.0.1", 6000)
        p.append(f.packet(here, there, flags: [.syn], seq: 1, on: lo, direction: .outbound))
        // Then the tunnel's final ACK, 40 µs after its last FIN, and its NFLOG copy with ztunnel's mark.
        f.clock = lastFIN.totalNanoseconds + 40_000
        p.append(f.nflog(ztunnelOut, peerHBONE, flags: [.ack], seq: 7182, ack: 9402, hook: .postrouting, prefix: observeOut,
                         mark: 0x539, outIf: 2))
        p.append(f.packet(ztunnelOut, peerHBONE, flags: [.ack], seq: 7182, ack: 9402, on: eth0, direction: .outbound))
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        XCTAssertEqual(sink.timelines.filter { $0.original.src == ztunnelOut }.count, 2, "the tail is a connection of its own")
        XCTAssertGreaterThan(summary.lateRecords, 0)
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
        // The same packets 5 s after the tunnel's end are no tail of it: the finding stays.
        var g = f
        var q = CorrelatorTests.outboundScenario(&g, ruleset: rules)
        let end = try XCTUnwrap(q.last).time
        g.advance(micros: 8_000_000)
        q.append(g.packet(here, there, flags: [.syn], seq: 1, on: lo, direction: .outbound))
        g.clock = end.totalNanoseconds + 5_000_000_000
        q.append(g.nflog(ztunnelOut, peerHBONE, flags: [.ack], seq: 7182, ack: 9402, hook: .postrouting, prefix: observeOut,
                         mark: 0x539, outIf: 2))
        q.append(g.packet(ztunnelOut, peerHBONE, flags: [.ack], seq: 7182, ack: 9402, on: eth0, direction: .outbound))
        XCTAssertEqual(correlate(q, tags: g.tags, ruleset: rules).0.findings.map(\.findingClass), [.forgedZtunnelMark])
    }

    /// The same for a passthrough (ztunnel's plain connection to an endpoint outside the mesh), its final ACK read
    /// late from the capture alone: with no twin's copy it carries no mark, and it read as app TCP that left the pod
    /// without a redirect (4 uncaptured-tcp escapes in one of 9 rounds of 20 000 connections to a service half in
    /// the mesh, multiplexed; the tunnels' tails never did: an unmarked packet to :15008 is taken for a tunnel's).
    func testAPassthroughsLastPacketReadLateFromTheCaptureAloneIsNoEscape() throws {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let outside = PacketFactory.ep("10.0.9.9", 80)
        var p = CorrelatorTests.outboundScenario(&f, ruleset: rules, destination: outside, hboneTo: outside)
        let lastFIN = try XCTUnwrap(p.last).time
        f.advance(micros: 3_000_000)
        let here = PacketFactory.ep("127.0.0.1", 5000), there = PacketFactory.ep("127.0.0.1", 6000)
        p.append(f.packet(here, there, flags: [.syn], seq: 1, on: lo, direction: .outbound))
        f.clock = lastFIN.totalNanoseconds + 40_000
        p.append(f.packet(ztunnelOut, outside, flags: [.ack], seq: 7182, ack: 9402, on: eth0, direction: .outbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let passthroughs = sink.timelines.filter { $0.original.src == ztunnelOut }
        XCTAssertEqual(passthroughs.map(\.kind), [.ztunnelPassthrough, .ztunnelPassthrough], "the passthrough and its tail")
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    /// The memory of emitted tunnels is bounded (`emittedTunnelsKept`, oldest out first): a tail of a tunnel
    /// pushed out of it keeps its finding. And a tuple emitted again (a reused port) is remembered until its own
    /// newer entry goes, not when its older slot is overwritten.
    func testTheMemoryOfEmittedTunnelsIsBoundedAndATupleEmittedAgainOutlivesItsOlderEntry() throws {
        let rules = seedNatRuleset()
        let second = PacketFactory.ep("10.0.3.3", 15008), third = PacketFactory.ep("10.0.4.4", 15008)
        /// Outbound connections through tunnels to `targets` one after another (each emitted before the next), then
        /// a late tail of the last tunnel to the peer: the findings.
        func tailFindings(kept: Int, _ targets: [Endpoint]) throws -> [EscapeFinding.Class] {
            var f = PacketFactory()
            var options = CorrelatorOptions()
            options.emittedTunnelsKept = kept
            var p: [PacketRecord] = []
            var lastFIN = Timestamp.zero
            let here = PacketFactory.ep("127.0.0.1", 5000)
            for (i, to) in targets.enumerated() {
                let scenario = CorrelatorTests.outboundScenario(&f, ruleset: rules, hboneTo: to)
                if to == peerHBONE { lastFIN = try XCTUnwrap(scenario.last).time }
                p += scenario
                // The clock moves past the close linger: the scenario's connections are emitted.
                f.advance(micros: 3_000_000)
                p.append(f.packet(here, PacketFactory.ep("127.0.0.1", 6000 + UInt16(i)), flags: [.syn], seq: 1, on: lo, direction: .outbound))
            }
            f.clock = lastFIN.totalNanoseconds + 40_000
            p.append(f.nflog(ztunnelOut, peerHBONE, flags: [.ack], seq: 7182, ack: 9402, hook: .postrouting, prefix: observeOut,
                             mark: 0x539, outIf: 2))
            p.append(f.packet(ztunnelOut, peerHBONE, flags: [.ack], seq: 7182, ack: 9402, on: eth0, direction: .outbound))
            let (sink, _) = correlate(p, tags: f.tags, ruleset: rules, options: options)
            return sink.findings.map(\.findingClass)
        }
        XCTAssertEqual(try tailFindings(kept: 2, [peerHBONE, second]), [], "both remembered")
        XCTAssertEqual(try tailFindings(kept: 1, [peerHBONE, second]), [.forgedZtunnelMark], "the first one pushed out")
        XCTAssertEqual(try tailFindings(kept: 0, [peerHBONE]), [.forgedZtunnelMark], "nothing remembered")
        // Ring of 3: the peer's tunnel, another, the peer's tuple again, a third: the third overwrites the first
        // entry's slot, and the peer's tuple is still remembered by its second entry.
        XCTAssertEqual(try tailFindings(kept: 3, [peerHBONE, second, peerHBONE, third]), [])
    }

    func testAConnectionIntoTheAppIsNotJoinedToATunnelThatHadNotBroughtItsRequestYet() throws {
        // Two tunnels come in 100 µs apart; the first one's client is slow to send its request (in the lab, a thread
        // that had not run yet). ztunnel connects into the app for the second tunnel's request before the first
        // tunnel carried a byte: by the order the tunnels opened in, that connection took the first tunnel. The
        // connections into the app carry no data here (the app closed them at once), so relay timing cannot tell.
        var (s, connmarkTwin) = serverSide()
        let podHBONE = CorrelatorTests.podHBONE, appPort = CorrelatorTests.appPort
        let slow = PacketFactory.ep("10.0.2.2", 41001), quick = PacketFactory.ep("10.0.2.2", 41002)
        let quickLeg = PacketFactory.ep("10.0.2.2", 42001), slowLeg = PacketFactory.ep("10.0.2.2", 42002)
        s.tunnelComesIn(slow, to: podHBONE, at: 0, requestAt: 500, closesAt: 1020)
        s.tunnelComesIn(quick, to: podHBONE, at: 100, requestAt: 130, closesAt: 650)
        s.legRuns(quickLeg, into: appPort, at: 300, isn: 500, connmarkTwin: connmarkTwin, data: false)
        s.legRuns(slowLeg, into: appPort, at: 650, isn: 2500, connmarkTwin: connmarkTwin, data: false)
        let sink = correlated(s)
        XCTAssertEqual(try connection(from: quickLeg, in: sink).hops.first?.outer, try connection(from: quick, in: sink).id,
                       "the tunnel whose request came in before it")
        XCTAssertEqual(try connection(from: slowLeg, in: sink).hops.first?.outer, try connection(from: slow, in: sink).id)
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    func testOfTwoConcurrentInboundJoinsThatCouldBeSwappedNeitherIsHigh() throws {
        // Two tunnels bring their requests, then ztunnel connects into the app twice. The first connection is joined
        // to the first tunnel (one of two candidates); the second then had only the other tunnel left and read as
        // "the only candidate", high, though either tunnel could have carried either connection: in a concurrent
        // lab capture 3 of 7 such high joins were wrong (the other tunnel had been emitted by then, so it did not
        // count as open). The connections carry no data: timing cannot tell.
        var (s, connmarkTwin) = serverSide()
        let podHBONE = CorrelatorTests.podHBONE, appPort = CorrelatorTests.appPort
        let tunnels = [PacketFactory.ep("10.0.2.2", 41001), PacketFactory.ep("10.0.2.2", 41002)]
        let legs = [PacketFactory.ep("10.0.2.2", 42001), PacketFactory.ep("10.0.2.2", 42002)]
        // The second tunnel and connection run for seconds: the first pair is emitted long before them.
        s.tunnelComesIn(tunnels[0], to: podHBONE, at: 0, requestAt: 30, closesAt: 900)
        s.tunnelComesIn(tunnels[1], to: podHBONE, at: 50, requestAt: 80, closesAt: 3_000_000)
        s.legRuns(legs[0], into: appPort, at: 300, isn: 500, connmarkTwin: connmarkTwin, data: false)
        s.legRuns(legs[1], into: appPort, at: 320, isn: 1500, connmarkTwin: connmarkTwin, data: false, closesAt: 2_900_000)
        let sink = correlated(s)
        let hops = try legs.map { try XCTUnwrap(connection(from: $0, in: sink).hops.first) }
        XCTAssertEqual(Set(hops.map(\.outer)).count, 2, "each tunnel carried one")
        for hop in hops {
            XCTAssertEqual(hop.confidence, .medium, "\(hop.evidence.map(\.detail))")
            XCTAssertFalse(hop.evidence.contains { $0.detail.hasPrefix("the only candidate") }, "\(hop.evidence.map(\.detail))")
        }
        // One at a time, a join stays high (CorrelatorTests' inbound test).
    }

    /// Two app connections begun 100 µs apart while a tunnel to their peer sits open: the first goes through the open
    /// tunnel, and ztunnel opens a new one for the second. Only relay timing tells which carried which: each app data
    /// packet has its twin in the tunnel that carried it a few hundred µs later (replies: the tunnel's first).
    /// `interleaved`: each tunnel relays within 20 µs of the other, so every packet has a twin in both.
    func concurrentStreams(_ f: inout PacketFactory, rules: Ruleset, pooledApp: Endpoint, freshApp: Endpoint,
                           freshTunnel: Endpoint, interleaved: Bool = false) -> [PacketRecord] {
        var p = CorrelatorTests.outboundScenario(&f, ruleset: rules)
        p.removeLast(2)   // the tunnel (ztunnelOut) stays open
        f.advance(micros: 3_000_000)
        let t0 = f.clock
        var out: [PacketRecord] = []
        func at(_ micros: Int64, _ make: (inout PacketFactory) -> PacketRecord) {
            f.clock = t0 + micros * 1_000
            out.append(make(&f))
        }
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        for (start, app) in [(Int64(0), pooledApp), (100, freshApp)] {
            at(start) { $0.nflog(app, service, flags: [.syn], seq: 3000, hook: .output, prefix: natTwin, outIf: 2) }
            at(start + 5) { $0.packet(app, capture15001, flags: [.syn], seq: 3000, on: lo, direction: .outbound) }
            at(start + 20) { $0.packet(service, app, flags: [.syn, .ack], seq: 6000, ack: 3001, on: lo, direction: .outbound) }
            at(start + 25) { $0.packet(app, capture15001, flags: [.ack], seq: 3001, ack: 6001, on: lo, direction: .outbound) }
        }
        // ztunnel opens the new tunnel for the second connection once it has accepted both.
        at(300) { $0.nflog(freshTunnel, peerHBONE, flags: [.syn], seq: 1, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2) }
        at(300) { $0.packet(freshTunnel, peerHBONE, flags: [.syn], seq: 1, on: eth0, direction: .outbound) }
        at(340) { $0.packet(peerHBONE, freshTunnel, flags: [.syn, .ack], seq: 50, ack: 2, on: eth0, direction: .inbound) }
        at(345) { $0.packet(freshTunnel, peerHBONE, flags: [.ack], seq: 2, ack: 51, on: eth0, direction: .outbound) }
        // Requests: the pooled connection's at 200 µs, relayed at 350 µs; the fresh one's at 500 µs, relayed at 900 µs.
        let (freshRequest, freshRelayed, freshReplied, freshReply): (Int64, Int64, Int64, Int64) =
            interleaved ? (250, 370, 2_010, 2_070) : (500, 900, 2_500, 2_560)
        at(200) { $0.packet(pooledApp, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        at(350) { $0.packet(ztunnelOut, peerHBONE, flags: [.ack, .psh], seq: 7181, ack: 9401, payload: 150, on: eth0, direction: .outbound) }
        at(freshRequest) { $0.packet(freshApp, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        at(freshRelayed) { $0.packet(freshTunnel, peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 150, on: eth0, direction: .outbound) }
        // Replies: each tunnel's first, then the app's 50-60 µs later.
        at(2_000) { $0.packet(peerHBONE, ztunnelOut, flags: [.ack, .psh], seq: 9401, ack: 7331, payload: 350, on: eth0, direction: .inbound) }
        at(2_050) { $0.packet(service, pooledApp, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        at(freshReplied) { $0.packet(peerHBONE, freshTunnel, flags: [.ack, .psh], seq: 51, ack: 152, payload: 350, on: eth0, direction: .inbound) }
        at(freshReply) { $0.packet(service, freshApp, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        for (end, app) in [(Int64(2_700), pooledApp), (2_800, freshApp)] {
            at(end) { $0.packet(app, capture15001, flags: [.fin, .ack], seq: 3101, ack: 6301, on: lo, direction: .outbound) }
            at(end + 10) { $0.packet(service, app, flags: [.fin, .ack], seq: 6301, ack: 3102, on: lo, direction: .outbound) }
        }
        at(3_000) { $0.packet(freshTunnel, peerHBONE, flags: [.fin, .ack], seq: 152, ack: 401, on: eth0, direction: .outbound) }
        at(3_040) { $0.packet(peerHBONE, freshTunnel, flags: [.fin, .ack], seq: 401, ack: 153, on: eth0, direction: .inbound) }
        f.clock = t0 + 3_040_000
        return p + out.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
    }

    func testConcurrentConnectionsAreJoinedToTheTunnelsThatRelayedTheirBytes() throws {
        // Before relay timing the new tunnel went to the earlier connection (the earliest candidate) and the later
        // connection to the open tunnel (pooled): both wrong, as in a --pool-tunnels lab under concurrency.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let pooledApp = PacketFactory.ep("10.0.1.5", 40002), freshTunnel = PacketFactory.ep("10.0.1.5", 50001)
        let p = concurrentStreams(&f, rules: rules, pooledApp: pooledApp, freshApp: app2, freshTunnel: freshTunnel)
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        let kept = try connection(from: ztunnelOut, in: sink), fresh = try connection(from: freshTunnel, in: sink)
        let pooled = try connection(from: pooledApp, in: sink), second = try connection(from: app2, in: sink)
        XCTAssertEqual(pooled.hops.map(\.inner), [kept.id], "the connection whose bytes the open tunnel relayed")
        XCTAssertEqual(second.hops.map(\.inner), [fresh.id], "the connection the new tunnel was opened for")
        XCTAssertEqual(fresh.hops.map(\.outer), [second.id])
        XCTAssertEqual(summary.hops, 3, "the first connection's, and one each")
        for (c, how) in [(pooled, "pooled-tunnel"), (second, "timing")] {
            let hop = try XCTUnwrap(c.hops.first)
            XCTAssertNotEqual(hop.confidence, .high, "another open tunnel could have carried \(c.original.src)")
            XCTAssertEqual(hop.confidence, .medium, "every data packet matched, the other tunnel only one")
            let kinds = hop.evidence.map(\.kind)
            XCTAssertTrue(kinds.contains(how), "\(kinds)")
            XCTAssertFalse(kinds.contains("unique"), "the relay timing says why this tunnel, not 'the newest' or 'the earliest'")
            XCTAssertEqual(hop.evidence.first { $0.kind == "relay-timing" }?.detail,
                           "2 of 2 data packets of the outer connection have a twin in the tunnel within 2.0 ms (the largest gap "
                           + (c.id == pooled.id ? "150 µs" : "400 µs")
                           + "); of 2 open tunnels that could have carried it, the next best could have matched 1")
        }
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    /// Two multiplexed tunnels to one pod (ztunnel opens another when one carries as many streams as it may): the
    /// older one (`ztunnelOut`) and a newer one, opened for another connection (`newerOpensFor`), or first seen
    /// mid-stream (open before the capture). Then 20 connections, 1 ms apart, each joined first to the newest open
    /// tunnel (pooled): the older one relays those not in `relayedByNewer`, each request 50 µs after the app sent it
    /// and each reply 50 µs before the app got it, while the newer one relays packets 300 µs from theirs; the newer
    /// one relays the others so, the older one 300 µs off. Returns the sink, the 20 apps and the two tunnels.
    func busyTunnels(newerOpensFor: Bool, relayedByNewer: Set<Int> = []) throws
        -> (sink: CollectingSink, summary: AnalysisSummary, apps: [Endpoint], older: ConnectionTimeline, newer: ConnectionTimeline) {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        var p = CorrelatorTests.outboundScenario(&f, ruleset: rules)
        p.removeLast(2)   // the older tunnel (ztunnelOut) stays open
        f.advance(micros: 1_000_000)
        var s = Schedule(f)
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        let newer = PacketFactory.ep("10.0.1.5", 50001), opener = PacketFactory.ep("10.0.1.5", 40099)
        if newerOpensFor {
            s.appOpens(opener, to: service, at: 0, natTwin: natTwin)
            s.tunnelOpens(newer, to: peerHBONE, at: 60, observeOut: observeOut)
            s.appCloses(opener, from: service, at: 400)
        } else {
            s.at(60) { $0.nflog(newer, self.peerHBONE, flags: [.ack], seq: 2, ack: 51, hook: .postrouting, prefix: self.observeOut, mark: 0x539, outIf: 2) }
            s.at(60) { $0.packet(newer, self.peerHBONE, flags: [.ack], seq: 2, ack: 51, on: eth0, direction: .outbound) }
        }
        let apps = (0..<20).map { PacketFactory.ep("10.0.1.5", 41000 + UInt16($0)) }
        for (i, app) in apps.enumerated() {
            let t = 1_000 + Int64(i) * 1_000
            let (near, far) = relayedByNewer.contains(i) ? (newer, ztunnelOut) : (ztunnelOut, newer)
            s.appOpens(app, to: service, at: t, natTwin: natTwin)
            s.at(t + 100) { $0.packet(app, self.capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
            s.at(t + 150) { $0.packet(near, self.peerHBONE, flags: [.ack, .psh], seq: 7181, ack: 9401, payload: 150, on: eth0, direction: .outbound) }
            s.at(t + 400) { $0.packet(far, self.peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 150, on: eth0, direction: .outbound) }
            s.at(t + 500) { $0.packet(self.peerHBONE, far, flags: [.ack, .psh], seq: 51, ack: 152, payload: 350, on: eth0, direction: .inbound) }
            s.at(t + 700) { $0.packet(self.peerHBONE, near, flags: [.ack, .psh], seq: 9401, ack: 7331, payload: 350, on: eth0, direction: .inbound) }
            s.at(t + 750) { $0.packet(self.service, app, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
            s.appCloses(app, from: service, at: t + 800)
        }
        let (sink, summary) = correlate(p + s.packets.sorted { $0.time < $1.time }, tags: s.f.tags, ruleset: rules)
        if newerOpensFor {
            XCTAssertEqual(try connection(from: opener, in: sink).hops.map(\.inner), [try connection(from: newer, in: sink).id],
                           "the one it was opened for")
        }
        return (sink, summary, apps, try connection(from: ztunnelOut, in: sink), try connection(from: newer, in: sink))
    }

    /// The 20 connections of `busyTunnels` are joined to the tunnel that relayed their bytes. A tunnel lists only 16
    /// of the connections it carried (`maxPooledLinksListed`), and counted by those, a batch of more than 16
    /// connections leaving it looked as if it would leave it with none: the moves were held back until 16 were left
    /// behind, on the tunnel that carried none of them (with 300 connections over 3-4 such tunnels in the lab, 198).
    func testMoreConnectionsThanATunnelListsAllLeaveItForTheTunnelThatRelayedThem() throws {
        let (sink, summary, apps, older, _) = try busyTunnels(newerOpensFor: true)
        XCTAssertEqual(summary.escapes, 0, "\(sink.findings.map(\.summary))")
        var onOlder = 0
        for app in apps {
            let hops = try connection(from: app, in: sink).hops
            XCTAssertEqual(hops.count, 1, "\(app)")
            if hops.first?.inner == older.id { onOlder += 1 }
        }
        XCTAssertEqual(onOlder, 20, "joined to the tunnel that relayed their bytes")
    }

    /// The same with the newer tunnel open before the capture (no connection it was opened for), relaying the last 4
    /// of the 20 itself: the 16 it lists leave it and the 4 it does not list stay. Counted by every connection it
    /// carried, it keeps some; but what explains a tunnel when it is emitted is the joins it lists, so one of those
    /// is put back (low, against the timing), or the tunnel that carried 4 connections reads as a forged mark (a
    /// tunnel taken as joined while it still counted connections it does not list: 1 live run in 12).
    func testATunnelKeepsAConnectionItListsWhenTheOnesItDoesNotListStay() throws {
        let (sink, summary, apps, older, newer) = try busyTunnels(newerOpensFor: false, relayedByNewer: [16, 17, 18, 19])
        XCTAssertEqual(summary.escapes, 0, "\(sink.findings.map(\.summary))")
        XCTAssertFalse(newer.hops.isEmpty, "the newer tunnel lists a connection it carried")
        var onOlder = 0
        for (i, app) in apps.enumerated() {
            let hops = try connection(from: app, in: sink).hops
            XCTAssertEqual(hops.count, 1, "\(app)")
            if i >= 16 { XCTAssertEqual(hops.first?.inner, newer.id, "\(app)") }
            if hops.first?.inner == older.id { onOlder += 1 }
        }
        XCTAssertEqual(onOlder, 15, "all but the one the newer tunnel keeps")
    }

    func testAConnectionWhoseBytesNoTunnelRelayedInTimeSaysTimingCannotTell() throws {
        // The same two connections with the tunnels' packets 5 ms later: no pairing within the window, so the joins
        // stay as the other evidence has them, at low confidence, saying why.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let pooledApp = PacketFactory.ep("10.0.1.5", 40002), freshTunnel = PacketFactory.ep("10.0.1.5", 50001)
        var p = concurrentStreams(&f, rules: rules, pooledApp: pooledApp, freshApp: app2, freshTunnel: freshTunnel)
        let start = try XCTUnwrap(p.first { $0.tuple.src == pooledApp }).time.totalNanoseconds
        for i in p.indices where p[i].time.totalNanoseconds >= start && !p[i].point.isLoopback && !p[i].tcpFlags.contains(.syn) {
            // The tunnels' packets 5 ms late: requests relayed after the window, replies after the app had them.
            let t = p[i].time.totalNanoseconds + 5_000_000
            p[i].time = Timestamp(seconds: t / 1_000_000_000, nanoseconds: Int32(t % 1_000_000_000))
        }
        p = p.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        try assertLowRelayTiming(of: [pooledApp, app2], in: sink) { words in
            XCTAssertEqual(words, "none of 2 data packets of the outer connection has a twin within 2.0 ms in any of 2 open tunnels that could have carried it: timing cannot tell which did")
        }
    }

    /// `concurrentStreams` after the open tunnel had carried enough to reach an event limit of 10 (ten earlier data
    /// packets a second before the pooled connection), correlated with that limit (and `relayDataKept` when given).
    func correlatePastTheEventLimit(relayDataKept: Int? = nil) throws -> (sink: CollectingSink, pooledApp: Endpoint) {
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let pooledApp = PacketFactory.ep("10.0.1.5", 40002), freshTunnel = PacketFactory.ep("10.0.1.5", 50001)
        var p = concurrentStreams(&f, rules: rules, pooledApp: pooledApp, freshApp: app2, freshTunnel: freshTunnel)
        let at = try XCTUnwrap(p.firstIndex { $0.tuple.src == pooledApp })
        var g = f
        g.frame = 30_000
        g.clock = p[at].time.totalNanoseconds - 1_000_000_000
        let earlier = (0..<10).map { i in
            g.packet(ztunnelOut, peerHBONE, flags: [.ack, .psh], seq: 7001 + UInt32(i), ack: 9401, payload: 1, on: eth0, direction: .outbound)
        }
        p.insert(contentsOf: earlier, at: at)
        var options = CorrelatorOptions()
        options.maxEventsPerConnection = 10
        if let relayDataKept { options.relayDataKept = relayDataKept }
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules, options: options)
        XCTAssertGreaterThan(try connection(from: ztunnelOut, in: sink).droppedEvents, 0, "the tunnel reached the limit")
        return (sink, pooledApp)
    }

    func testATunnelPastTheEventLimitStillShowsWhichConnectionsItRelayed() throws {
        // A long-lived pooled tunnel stops keeping events at --max-events, but not the data packets relay timing
        // reads: the pooled connection is still joined to it, as without the limit. (Before, relay timing was blind
        // past the limit: in a --pool-tunnels lab run 1694 of 3000 connections, and 30 % of pooled joins wrong.)
        let (sink, pooledApp) = try correlatePastTheEventLimit()
        let kept = try connection(from: ztunnelOut, in: sink)
        let pooled = try connection(from: pooledApp, in: sink)
        XCTAssertEqual(pooled.hops.map(\.inner), [kept.id], "the connection whose bytes the open tunnel relayed")
        let hop = try XCTUnwrap(pooled.hops.first)
        XCTAssertEqual(hop.confidence, .medium)
        XCTAssertEqual(hop.evidence.first { $0.kind == "relay-timing" }?.detail,
                       "2 of 2 data packets of the outer connection have a twin in the tunnel within 2.0 ms (the largest gap 150 µs); of 2 open tunnels that could have carried it, the next best could have matched 1")
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    func testATunnelThatNoLongerKeptTheConnectionsPacketsMakesRelayTimingLowAndSaysSo() throws {
        // Past the event limit the tunnel keeps only its latest data packets (here one): the relaying of the pooled
        // connection's request is gone, so nothing shows it carried it, and a match is no better than low.
        let (sink, pooledApp) = try correlatePastTheEventLimit(relayDataKept: 1)
        try assertLowRelayTiming(of: [pooledApp, app2], in: sink) { words in
            XCTAssertTrue(words.hasSuffix("; 1 of them no longer kept packets from its time (a tunnel past --max-events keeps only its latest data packets): those were not compared"), words)
        }
    }

    func testTwoTunnelsRelayingWithinMicrosecondsOfEachOtherGiveLowConfidence() throws {
        // Both tunnels relay within 20 µs of each other, so every data packet of each connection has a twin in both:
        // the shorter pairings decide, but the other tunnel could as well have carried it. In a lab run two such
        // connections were joined the wrong way round at medium ('the next best matched 0': the other tunnel's
        // packets had gone to the other connection).
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let pooledApp = PacketFactory.ep("10.0.1.5", 40002), freshTunnel = PacketFactory.ep("10.0.1.5", 50001)
        let p = concurrentStreams(&f, rules: rules, pooledApp: pooledApp, freshApp: app2, freshTunnel: freshTunnel, interleaved: true)
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        try assertLowRelayTiming(of: [pooledApp, app2], in: sink) { words in
            XCTAssertTrue(words.hasSuffix("of 2 open tunnels that could have carried it, the next best could have matched 2 (counting twins nearer other connections' packets)"), words)
        }
    }

    func testAFreshJoinToATunnelOpenedAfterTheConnectionEndedIsMovedToTheTunnelThatCarriedIt() throws {
        // A connection that lost its own tunnel to another's fresh join, then, still lingering, took a tunnel opened
        // 500 ms later within the hop window (medium, 'the earliest was chosen'; seen in a lab run): that tunnel
        // carried nothing while it ran.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let pooledApp = PacketFactory.ep("10.0.1.5", 40002), freshTunnel = PacketFactory.ep("10.0.1.5", 50001)
        var p = concurrentStreams(&f, rules: rules, pooledApp: pooledApp, freshApp: app2, freshTunnel: freshTunnel)
        let late = PacketFactory.ep("10.0.1.5", 50009), lateApp = PacketFactory.ep("10.0.1.5", 40009)
        f.advance(micros: 500_000)
        p.append(f.nflog(lateApp, service, flags: [.syn], seq: 3000, hook: .output, prefix: twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules), outIf: 2))
        f.advance(micros: 5)
        p.append(f.packet(lateApp, capture15001, flags: [.syn], seq: 3000, on: lo, direction: .outbound))
        f.advance(micros: 300)
        p.append(f.nflog(late, peerHBONE, flags: [.syn], seq: 1, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2))
        p.append(f.packet(late, peerHBONE, flags: [.syn], seq: 1, on: eth0, direction: .outbound))
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let kept = try connection(from: ztunnelOut, in: sink), fresh = try connection(from: freshTunnel, in: sink)
        XCTAssertEqual(try connection(from: pooledApp, in: sink).hops.map(\.inner), [kept.id])
        XCTAssertEqual(try connection(from: app2, in: sink).hops.map(\.inner), [fresh.id])
        XCTAssertEqual(try connection(from: late, in: sink).hops.map(\.outer), [try connection(from: lateApp, in: sink).id])
    }

    func testRelayTimingNeverLeavesATunnelOpenedForAConnectionWithNone() throws {
        // Two connections 50 µs apart, each through a tunnel ztunnel opens for it (no pooling), under load: ztunnel
        // relays the first one's bytes 400-600 µs late, and the second tunnel's packets, the second connection's,
        // fall nearer. The first connection is emitted while the second still runs, so its packets are matched alone
        // and all go to the second tunnel. Moving it there left its own tunnel with no connection, which read as a
        // forged mark: 465 such escapes in 3000 connections of a lab run at 3200 connections a second, where the
        // order the tunnels opened in was right for 91 % of them and relay timing for 52 %.
        let f = PacketFactory()
        let rules = seedNatRuleset()
        let appA = PacketFactory.ep("10.0.1.5", 40010), appB = PacketFactory.ep("10.0.1.5", 40011)
        let tunnelA = PacketFactory.ep("10.0.1.5", 50010), tunnelB = PacketFactory.ep("10.0.1.5", 50011)
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        var s = Schedule(f)
        func at(_ micros: Int64, _ make: (inout PacketFactory) -> PacketRecord) { s.at(micros, make) }
        s.appOpens(appA, to: service, at: 0, natTwin: natTwin)
        s.appOpens(appB, to: service, at: 50, natTwin: natTwin)
        s.tunnelOpens(tunnelA, to: peerHBONE, at: 150, observeOut: observeOut)
        s.tunnelOpens(tunnelB, to: peerHBONE, at: 200, observeOut: observeOut)
        // Requests: A's at 300 µs, relayed at 900; B's at 330, relayed at 350.
        at(300) { $0.packet(appA, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        at(330) { $0.packet(appB, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        at(350) { $0.packet(tunnelB, peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 150, on: eth0, direction: .outbound) }
        at(900) { $0.packet(tunnelA, peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 150, on: eth0, direction: .outbound) }
        // Replies: A's tunnel brings its reply at 1000, written to A at 1400; B's tunnel brings B's at 1350.
        at(1_000) { $0.packet(peerHBONE, tunnelA, flags: [.ack, .psh], seq: 51, ack: 152, payload: 350, on: eth0, direction: .inbound) }
        at(1_350) { $0.packet(peerHBONE, tunnelB, flags: [.ack, .psh], seq: 51, ack: 152, payload: 350, on: eth0, direction: .inbound) }
        at(1_400) { $0.packet(service, appA, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        at(1_410) { $0.packet(service, appB, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        s.appCloses(appA, from: service, at: 1_500)
        s.tunnelCloses(tunnelA, to: peerHBONE, at: 1_600, seq: 152, peerSeq: 401)
        // B runs on past A's emission (2 s after it closed).
        s.appCloses(appB, from: service, at: 2_500_000)
        s.tunnelCloses(tunnelB, to: peerHBONE, at: 2_500_100, seq: 152, peerSeq: 401)
        let (sink, summary) = correlate(s.packets, tags: f.tags, ruleset: rules)
        let a = try connection(from: appA, in: sink), b = try connection(from: appB, in: sink)
        let ta = try connection(from: tunnelA, in: sink), tb = try connection(from: tunnelB, in: sink)
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
        XCTAssertEqual(summary.escapes, 0)
        XCTAssertEqual(a.hops.map(\.inner), [ta.id], "the tunnel opened for it keeps it: the timing alone is not enough")
        XCTAssertEqual(ta.hops.map(\.outer), [a.id])
        XCTAssertEqual(b.hops.map(\.inner), [tb.id])
        let hop = try XCTUnwrap(a.hops.first)
        XCTAssertEqual(hop.confidence, .low, "the timing pointed at the other tunnel")
        XCTAssertEqual(hop.evidence.first { $0.kind == "relay-timing" }?.detail,
                       "0 of 2 data packets of the outer connection have a twin in this tunnel within 2.0 ms, another of the 2 open tunnels matched 2: "
                       + "the timing points elsewhere, but under load it is noisy, and the join stands on the order the tunnels opened in "
                       + "(no tunnel is taken from the connection it was opened for, or left with none, on timing alone)")
    }

    func testATunnelOpenedBeforeTheCaptureThatCouldHaveCarriedAConnectionIsNoEscape() throws {
        // ztunnel's kept tunnel K was opened before the capture (no SYN in it) and relayed A's bytes; a tunnel F opened
        // just after A began takes A by the order the tunnels opened in, and relay timing may not move A to K (that
        // would leave F, opened for a connection, with none). K is left with no join. In live traces of a
        // --pool-tunnels lab, 4 connections at a time, that read as a forged ztunnel mark, an escape, at the start of
        // one trace in two: the tunnel ztunnel had kept from before carried the first connections.
        let f = PacketFactory()
        let rules = seedNatRuleset()
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        let a = PacketFactory.ep("10.0.1.5", 40030), k = ztunnelOut, fresh = PacketFactory.ep("10.0.1.5", 50031)
        var s = Schedule(f)
        func at(_ micros: Int64, _ make: (inout PacketFactory) -> PacketRecord) { s.at(micros, make) }
        s.appOpens(a, to: service, at: 0, natTwin: natTwin)
        s.tunnelOpens(fresh, to: peerHBONE, at: 100, observeOut: observeOut)
        // A's request at 200 µs, relayed by K at 350; K brings the reply at 2000, written to A at 2050.
        at(200) { $0.packet(a, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        at(350) { $0.nflog(k, peerHBONE, flags: [.ack, .psh], seq: 7181, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2) }
        at(350) { $0.packet(k, peerHBONE, flags: [.ack, .psh], seq: 7181, ack: 9401, payload: 150, on: eth0, direction: .outbound) }
        at(2_000) { $0.packet(peerHBONE, k, flags: [.ack, .psh], seq: 9401, ack: 7331, payload: 350, on: eth0, direction: .inbound) }
        at(2_050) { $0.packet(service, a, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        s.appCloses(a, from: service, at: 2_700)
        s.tunnelCloses(fresh, to: peerHBONE, at: 3_000, seq: 2, peerSeq: 51)
        let (sink, summary) = correlate(s.packets, tags: f.tags, ruleset: rules)
        let kept = try connection(from: k, in: sink)
        XCTAssertEqual(kept.kind, .hboneOutbound)
        XCTAssertEqual(kept.hops.count, 0, "the case at hand: no connection is joined to it")
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
        XCTAssertEqual(summary.escapes, 0)
        // Without the relay evidence (its packets 5 ms late, nothing lines up) it stays unexplained: a low finding.
        let late = s.packets.map { p -> PacketRecord in
            guard p.tuple.src == k || p.tuple.dst == k else { return p }
            var q = p
            let t = p.time.totalNanoseconds + 5_000_000
            q.time = Timestamp(seconds: t / 1_000_000_000, nanoseconds: Int32(t % 1_000_000_000))
            return q
        }.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
        let (sink2, _) = correlate(late, tags: f.tags, ruleset: rules)
        XCTAssertEqual(sink2.findings.map(\.findingClass), [.forgedZtunnelMark])
        XCTAssertEqual(sink2.findings.first?.confidence, .low)
    }

    func testAChainOfFreshJoinsEndingAtAPooledTunnelIsUndoneByRelayTiming() throws {
        // --pool-tunnels under concurrency: P went through the tunnel ztunnel kept open (O), Q1 and Q2 through the
        // tunnels opened for them (N1, N2). Joined by the order the tunnels opened in, P took N1, Q1 took N2, and Q2
        // the open tunnel O (pooled). Relay timing puts each where its bytes went; P's move off the tunnel opened
        // after it is part of a ring (P to O, Q2 to N2, Q1 to N1), which a pooled connection's move anchors: not a
        // swap of new tunnels on timing alone, so it stands.
        let f = PacketFactory()
        let rules = seedNatRuleset()
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        let p1 = PacketFactory.ep("10.0.1.5", 40020), q1 = PacketFactory.ep("10.0.1.5", 40021), q2 = PacketFactory.ep("10.0.1.5", 40022)
        let o = ztunnelOut, n1 = PacketFactory.ep("10.0.1.5", 50021), n2 = PacketFactory.ep("10.0.1.5", 50022)
        var s = Schedule(f)
        func at(_ micros: Int64, _ make: (inout PacketFactory) -> PacketRecord) { s.at(micros, make) }
        // O, open before the capture: seen mid-stream with ztunnel's mark.
        at(0) { $0.nflog(o, peerHBONE, flags: [.ack, .psh], seq: 7001, ack: 9001, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2) }
        at(0) { $0.packet(o, peerHBONE, flags: [.ack, .psh], seq: 7001, ack: 9001, payload: 90, on: eth0, direction: .outbound) }
        at(40) { $0.packet(peerHBONE, o, flags: [.ack], seq: 9001, ack: 7091, on: eth0, direction: .inbound) }
        for (start, app) in [(Int64(1_000), p1), (1_100, q1), (1_200, q2)] { s.appOpens(app, to: service, at: start, natTwin: natTwin) }
        s.tunnelOpens(n1, to: peerHBONE, at: 1_300, observeOut: observeOut)
        s.tunnelOpens(n2, to: peerHBONE, at: 1_400, observeOut: observeOut)
        // Each request relayed 50 µs later by its own tunnel, each reply 50 µs before the app gets it.
        for (k, (app, tunnel)) in [(p1, o), (q1, n1), (q2, n2)].enumerated() {
            let seq: UInt32 = tunnel == o ? 7091 : 2, ack: UInt32 = tunnel == o ? 9001 : 51
            let request = 1_500 + Int64(k) * 100, reply = 2_500 + Int64(k) * 100
            at(request) { $0.packet(app, capture15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
            at(request + 50) { $0.packet(tunnel, peerHBONE, flags: [.ack, .psh], seq: seq, ack: ack, payload: 150, on: eth0, direction: .outbound) }
            at(reply) { $0.packet(peerHBONE, tunnel, flags: [.ack, .psh], seq: ack, ack: seq &+ 150, payload: 350, on: eth0, direction: .inbound) }
            at(reply + 50) { $0.packet(service, app, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        }
        for (k, app) in [p1, q1, q2].enumerated() {
            at(3_000 + Int64(k) * 10) { $0.packet(app, capture15001, flags: [.fin, .ack], seq: 3101, ack: 6301, on: lo, direction: .outbound) }
            at(3_005 + Int64(k) * 10) { $0.packet(service, app, flags: [.fin, .ack], seq: 6301, ack: 3102, on: lo, direction: .outbound) }
        }
        for tunnel in [n1, n2] {
            at(3_500) { $0.packet(tunnel, peerHBONE, flags: [.fin, .ack], seq: 152, ack: 401, on: eth0, direction: .outbound) }
            at(3_540) { $0.packet(peerHBONE, tunnel, flags: [.fin, .ack], seq: 401, ack: 153, on: eth0, direction: .inbound) }
        }
        at(6_000_000) { $0.packet(o, peerHBONE, flags: [.fin, .ack], seq: 7391, ack: 9351, on: eth0, direction: .outbound) }
        at(6_000_040) { $0.packet(peerHBONE, o, flags: [.fin, .ack], seq: 9351, ack: 7392, on: eth0, direction: .inbound) }
        let p = s.packets.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
        let (sink, summary) = correlate(p, tags: f.tags, ruleset: rules)
        for (app, tunnel) in [(p1, o), (q1, n1), (q2, n2)] {
            XCTAssertEqual(try connection(from: app, in: sink).hops.map(\.inner), [try connection(from: tunnel, in: sink).id],
                           "\(app) went through \(tunnel)")
        }
        XCTAssertEqual(summary.escapes, 0, "\(sink.findings.map(\.summary))")
    }

    func testATunnelClosedBeforeAConnectionBeganIsNotItsFreshTunnel() throws {
        // A tunnel that opened and closed, then 400 ms later (within the 1 s the fresh join allows a tunnel to be
        // stamped before its connection) a connection with no tunnel of its own: it cannot have gone through it.
        var f = PacketFactory()
        let rules = seedNatRuleset()
        let tunnel = PacketFactory.ep("10.0.1.5", 50030), late = PacketFactory.ep("10.0.1.5", 40030)
        let t0 = f.clock
        var p: [PacketRecord] = []
        func at(_ micros: Int64, _ make: (inout PacketFactory) -> PacketRecord) {
            f.clock = t0 + micros * 1_000
            p.append(make(&f))
        }
        at(0) { $0.nflog(tunnel, peerHBONE, flags: [.syn], seq: 1, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2) }
        at(0) { $0.packet(tunnel, peerHBONE, flags: [.syn], seq: 1, on: eth0, direction: .outbound) }
        at(30) { $0.packet(peerHBONE, tunnel, flags: [.syn, .ack], seq: 50, ack: 2, on: eth0, direction: .inbound) }
        at(35) { $0.packet(tunnel, peerHBONE, flags: [.ack], seq: 2, ack: 51, on: eth0, direction: .outbound) }
        at(1_000) { $0.packet(tunnel, peerHBONE, flags: [.fin, .ack], seq: 2, ack: 51, on: eth0, direction: .outbound) }
        at(1_040) { $0.packet(peerHBONE, tunnel, flags: [.fin, .ack], seq: 51, ack: 3, on: eth0, direction: .inbound) }
        at(400_000) { $0.nflog(late, service, flags: [.syn], seq: 3000, hook: .output, prefix: twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules), outIf: 2) }
        at(400_005) { $0.packet(late, capture15001, flags: [.syn], seq: 3000, on: lo, direction: .outbound) }
        at(400_020) { $0.packet(service, late, flags: [.syn, .ack], seq: 6000, ack: 3001, on: lo, direction: .outbound) }
        at(400_025) { $0.packet(late, capture15001, flags: [.ack], seq: 3001, ack: 6001, on: lo, direction: .outbound) }
        at(401_000) { $0.packet(late, capture15001, flags: [.fin, .ack], seq: 3001, ack: 6001, on: lo, direction: .outbound) }
        at(401_010) { $0.packet(service, late, flags: [.fin, .ack], seq: 6001, ack: 3002, on: lo, direction: .outbound) }
        let (sink, _) = correlate(p, tags: f.tags, ruleset: rules)
        let app = try connection(from: late, in: sink)
        XCTAssertTrue(app.hops.isEmpty, "\(app.hops)")
        XCTAssertTrue(try connection(from: tunnel, in: sink).hops.isEmpty)
    }

    /// ztunnel multiplexes the connections to a destination as HTTP/2 streams over one HBONE connection, and a
    /// connection that comes while that connection is being opened for another waits for it and goes through it too:
    /// `second` begins 100 µs after `first`, the tunnel 300 µs after `first`, and both connections' bytes go through
    /// it, interleaved. `dst`: what both apps dialled; `secondEndsAt`: when the second one closes.
    func sharedScenario(dst: Endpoint, secondEndsAt: Int64 = 2_100, secondSends: Bool = true) -> (Schedule, Endpoint) {
        let rules = seedNatRuleset()
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: rules)
        let lo15001 = PacketFactory.ep("127.0.0.1", 15001)
        var s = Schedule(PacketFactory())
        s.appOpens(app, to: dst, at: 0, natTwin: natTwin)
        s.appOpens(app2, to: dst, at: 100, natTwin: natTwin)
        s.tunnelOpens(ztunnelOut, to: peerHBONE, at: 300, observeOut: observeOut)
        s.at(400) { $0.packet(self.app, lo15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
        s.at(450) { $0.packet(self.ztunnelOut, self.peerHBONE, flags: [.ack, .psh], seq: 2, ack: 51, payload: 150, on: eth0, direction: .outbound) }
        if secondSends {
            s.at(500) { $0.packet(self.app2, lo15001, flags: [.ack, .psh], seq: 3001, ack: 6001, payload: 100, on: lo, direction: .outbound) }
            s.at(550) { $0.packet(self.ztunnelOut, self.peerHBONE, flags: [.ack, .psh], seq: 152, ack: 51, payload: 150, on: eth0, direction: .outbound) }
        }
        s.at(1_200) { $0.packet(self.peerHBONE, self.ztunnelOut, flags: [.ack, .psh], seq: 51, ack: 302, payload: 350, on: eth0, direction: .inbound) }
        s.at(1_250) { $0.packet(dst, self.app, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        if secondSends {
            s.at(1_300) { $0.packet(self.peerHBONE, self.ztunnelOut, flags: [.ack, .psh], seq: 401, ack: 302, payload: 350, on: eth0, direction: .inbound) }
            s.at(1_350) { $0.packet(dst, self.app2, flags: [.ack, .psh], seq: 6001, ack: 3101, payload: 300, on: lo, direction: .outbound) }
        }
        s.appCloses(app, from: dst, at: 2_000)
        s.appCloses(app2, from: dst, at: secondEndsAt)
        s.tunnelCloses(ztunnelOut, to: peerHBONE, at: 900_000, seq: 302, peerSeq: 751)
        return (s, dst)
    }

    func testAConnectionThatCameWhileItsMultiplexedTunnelWasOpenedForAnotherIsJoinedToIt() throws {
        for dst in [service, PacketFactory.ep("10.96.0.20", 80)] {
            let (s, _) = sharedScenario(dst: dst)
            let sink = correlated(s)
            let tunnel = try connection(from: ztunnelOut, in: sink)
            let first = try XCTUnwrap(try connection(from: app, in: sink).hops.first, "\(dst)")
            XCTAssertEqual(first.inner, tunnel.id, "\(dst)")
            XCTAssertFalse(first.evidence.contains { $0.kind == "pooled-tunnel" }, "the tunnel was opened for the first: \(dst)")
            // Left with no hop before: the tunnel began after it, and was opened for another connection.
            let second = try XCTUnwrap(try connection(from: app2, in: sink).hops.first, "\(dst): no hop")
            XCTAssertEqual(second.inner, tunnel.id, "\(dst)")
            let shared = try XCTUnwrap(second.evidence.first { $0.kind == "pooled-tunnel" }, "\(dst): \(second.evidence.map(\.detail))")
            XCTAssertEqual(shared.detail, "inner connection (the tunnel) was opened 200 µs after the outer one began, for a connection that began with it, and carried packets while it ran: a pooled HBONE connection both shared")
            XCTAssertEqual(second.confidence, dst == service ? .medium : .low, "\(dst)")
            XCTAssertEqual(Set(tunnel.hops.map(\.outer)), Set(sink.timelines.filter { $0.kind == .appOutbound }.map(\.id)), "\(dst)")
            XCTAssertTrue(sink.findings.isEmpty, "\(dst): \(sink.findings.map(\.summary))")
        }
    }

    func testAConnectionThatEndedBeforeATunnelOpenedDidNotShareIt() throws {
        // The second connection closes at 250 µs, before the tunnel's SYN at 300 µs: whatever carried it (nothing
        // here: ztunnel may have refused it), not that tunnel.
        let (s, _) = sharedScenario(dst: service, secondEndsAt: 250, secondSends: false)
        let sink = correlated(s)
        XCTAssertEqual(try connection(from: app, in: sink).hops.first?.inner, try connection(from: ztunnelOut, in: sink).id)
        XCTAssertNil(try connection(from: app2, in: sink).hops.first, "joined to a tunnel opened after it had ended")
    }

    /// A server-side schedule whose first packets are ztunnel's multiplexed tunnel (`ztunnelOut`), open before the
    /// capture: seen mid-stream, marked.
    func multiplexedTunnelOpenBeforeTheCapture() -> Schedule {
        var (s, _) = serverSide()
        s.at(0) { $0.nflog(self.ztunnelOut, self.peerHBONE, flags: [.ack, .psh], seq: 7001, ack: 9001, hook: .postrouting,
                           prefix: self.observeOut, mark: 0x539, outIf: 2) }
        s.at(0) { $0.packet(self.ztunnelOut, self.peerHBONE, flags: [.ack, .psh], seq: 7001, ack: 9001, payload: 90, on: eth0, direction: .outbound) }
        s.at(40) { $0.packet(self.peerHBONE, self.ztunnelOut, flags: [.ack], seq: 9001, ack: 7091, on: eth0, direction: .inbound) }
        return s
    }

    /// The two tests below: app connections (source, start in µs) to the service half in the mesh (`MixedService`),
    /// beside ztunnel's multiplexed tunnel open before the capture, and ztunnel's passthrough to the endpoint outside
    /// the mesh opening at `passthroughAt`.
    func mixedServiceOpens(_ apps: [(Endpoint, Int64)], passthroughAt: Int64) -> Schedule {
        var s = multiplexedTunnelOpenBeforeTheCapture()
        let natTwin = twin("nat", "ISTIO_OUTPUT", 4, ruleset: seedNatRuleset())
        for (src, start) in apps { s.appOpens(src, to: MixedService.vip, at: start, natTwin: natTwin) }
        s.tunnelOpens(MixedService.passthrough, to: MixedService.outside, at: passthroughAt, observeOut: observeOut)
        return s
    }

    /// A service with one endpoint in the mesh and one outside it, through ztunnel's multiplexed tunnel: of two
    /// connections to its VIP, the first goes through the tunnel open already (no new connection), the second through
    /// a passthrough ztunnel opens to the endpoint outside (a plain copy). By the order the marked connections began
    /// in, the first took the passthrough and the second the tunnel (pooled): both wrong, 62-74 of 300 right in a
    /// lab under load. Relay timing pairs each passthrough packet with one connection's: the passthrough relayed the
    /// second's request 30 µs after it and its reply 20 µs before it; the tunnel, the first's.
    func testOfTwoConnectionsToAServiceHalfInTheMeshThePassthroughGoesToTheOneWhoseBytesItCopied() throws {
        let vip = MixedService.vip, outside = MixedService.outside, passthrough = MixedService.passthrough
        var s = mixedServiceOpens([(app, 1_000), (app2, 1_100)], passthroughAt: 1_300)
        // Requests: the first's at 1400 µs, relayed by the tunnel at 1700 µs; the second's at 1500 µs, copied at 1530 µs.
        s.appRequests(app, at: 1_400)
        s.appRequests(app2, at: 1_500)
        s.at(1_530) { $0.packet(passthrough, outside, flags: [.ack, .psh], seq: 2, ack: 51, payload: 100, on: eth0, direction: .outbound) }
        s.at(1_700) { $0.packet(self.ztunnelOut, self.peerHBONE, flags: [.ack, .psh], seq: 7091, ack: 9001, payload: 150, on: eth0, direction: .outbound) }
        // Replies: the passthrough's at 2500 µs, the second app's at 2520 µs; the tunnel's at 2600 µs, the first's at 2650 µs.
        s.at(2_500) { $0.packet(outside, passthrough, flags: [.ack, .psh], seq: 51, ack: 102, payload: 300, on: eth0, direction: .inbound) }
        s.appGetsReply(app2, from: vip, at: 2_520)
        s.at(2_600) { $0.packet(self.peerHBONE, self.ztunnelOut, flags: [.ack, .psh], seq: 9001, ack: 7241, payload: 350, on: eth0, direction: .inbound) }
        s.appGetsReply(app, from: vip, at: 2_650)
        s.appCloses(app, from: vip, at: 3_000)
        s.appCloses(app2, from: vip, at: 3_100)
        s.tunnelCloses(passthrough, to: outside, at: 3_050, seq: 102, peerSeq: 351)
        let sink = correlated(s)
        let tunnel = try connection(from: ztunnelOut, in: sink), copy = try connection(from: passthrough, in: sink)
        XCTAssertEqual(copy.kind, .ztunnelPassthrough)
        let first = try XCTUnwrap(try connection(from: app, in: sink).hops.first, "the first connection has no hop")
        let second = try XCTUnwrap(try connection(from: app2, in: sink).hops.first, "the second connection has no hop")
        XCTAssertEqual(first.inner, tunnel.id, "the first went through the tunnel: \(first.evidence.map(\.detail))")
        XCTAssertEqual(second.inner, copy.id, "the passthrough copied the second's bytes: \(second.evidence.map(\.detail))")
        XCTAssertEqual(copy.hops.map(\.outer), [second.outer])
        let compared = "of 2 connections of ztunnel's (1 open tunnel, 1 passthrough) that could have carried it, the next best could have matched"
        for (hop, said) in [(first, "2 of 2 data packets of the outer connection have a twin in the tunnel within 2.0 ms (the largest gap 300 µs); "
                                    + compared + " 2 (counting twins nearer other connections' packets)"),
                            (second, "2 of 2 data packets of the outer connection have a twin in the passthrough within 2.0 ms (the largest gap 30 µs); "
                                     + compared + " 1")] {
            XCTAssertEqual(hop.confidence, .low, "no identity: a VIP")
            XCTAssertEqual(hop.evidence.first { $0.kind == "relay-timing" }?.detail, said)
        }
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }

    /// A passthrough carries one connection. Here its own connection's packets and another's both line up with its
    /// packets (the other's request 15 µs before the passthrough's, its own 20 µs; its reply 10 µs after, the other's
    /// 20 µs): relay timing points both at it. The one joined to it stays, so the other is not moved onto it (it
    /// stays on the multiplexed tunnel, low): joined to both, the passthrough would say it carried two connections.
    func testAPassthroughIsNeverGivenASecondConnectionByRelayTiming() throws {
        let vip = MixedService.vip, outside = MixedService.outside, passthrough = MixedService.passthrough
        // The passthrough's connection (`app2`) begins first and is joined to it by the order; `app` and `third` go
        // through the tunnel (so it keeps one should `app` leave it).
        let third = PacketFactory.ep("10.0.1.5", 40002)
        var s = mixedServiceOpens([(app2, 1_000), (app, 1_100), (third, 1_150)], passthroughAt: 1_200)
        s.appRequests(app2, at: 1_400)
        s.appRequests(app, at: 1_405)
        s.at(1_420) { $0.packet(passthrough, outside, flags: [.ack, .psh], seq: 2, ack: 51, payload: 100, on: eth0, direction: .outbound) }
        s.appRequests(third, at: 1_600)
        s.at(1_650) { $0.packet(self.ztunnelOut, self.peerHBONE, flags: [.ack, .psh], seq: 7091, ack: 9001, payload: 150, on: eth0, direction: .outbound) }
        s.at(1_700) { $0.packet(self.ztunnelOut, self.peerHBONE, flags: [.ack, .psh], seq: 7241, ack: 9001, payload: 150, on: eth0, direction: .outbound) }
        s.at(2_450) { $0.packet(self.peerHBONE, self.ztunnelOut, flags: [.ack, .psh], seq: 9001, ack: 7391, payload: 350, on: eth0, direction: .inbound) }
        s.at(2_600) { $0.packet(self.peerHBONE, self.ztunnelOut, flags: [.ack, .psh], seq: 9351, ack: 7391, payload: 350, on: eth0, direction: .inbound) }
        s.appGetsReply(third, from: vip, at: 2_650)
        s.at(2_500) { $0.packet(outside, passthrough, flags: [.ack, .psh], seq: 51, ack: 102, payload: 300, on: eth0, direction: .inbound) }
        s.appGetsReply(app2, from: vip, at: 2_510)
        s.appGetsReply(app, from: vip, at: 2_520)
        s.appCloses(app2, from: vip, at: 3_000)
        s.appCloses(app, from: vip, at: 3_100)
        s.appCloses(third, from: vip, at: 3_150)
        s.tunnelCloses(passthrough, to: outside, at: 3_050, seq: 102, peerSeq: 351)
        let sink = correlated(s)
        let tunnel = try connection(from: ztunnelOut, in: sink), copy = try connection(from: passthrough, in: sink)
        let own = try connection(from: app2, in: sink), other = try connection(from: app, in: sink)
        XCTAssertEqual(copy.hops.map(\.outer), [own.id], "one connection: the one joined to it")
        XCTAssertEqual(other.hops.map(\.inner), [tunnel.id])
        XCTAssertEqual(try connection(from: third, in: sink).hops.map(\.inner), [tunnel.id])
        let kept = try XCTUnwrap(other.hops.first?.evidence.first { $0.kind == "relay-timing" }?.detail, "\(other.hops)")
        XCTAssertTrue(kept.contains("the timing points elsewhere"), kept)
        XCTAssertTrue(sink.findings.isEmpty, "\(sink.findings.map(\.summary))")
    }
}
