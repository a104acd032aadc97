import XCTest
@testable import Capture

/// What a process that forges ztunnel's mark costs the order chains (`Correlator.explainByOrderChain`) while the pod
/// calls a service VIP: every forged connection is a marked connection no app connection explains, so each one
/// searches for a chain of joins to move. Counted in tunnels the searches looked for connections to take, not
/// timed. Before, each forged connection searched its whole neighbourhood again: 3000 VIP connections with 3000
/// forged ones among them took 131 s instead of 1.7 s in the debug build.
final class OrderChainCostTests: XCTestCase {
    /// `n` VIP connections 300 µs apart, each 3 ms long with its tunnel 200 µs after it (~10 at once), and every
    /// `forgedEvery`-th a connection from the pod to 10.0.9.9:80 carrying the mark, 100 µs after that VIP connection
    /// began; with `lateEnd`, one more VIP connection without a tunnel 5 ms after the last. All are emitted in one
    /// batch (at the end).
    private func flood(n: Int, forgedEvery: Int, lateEnd: Bool = false) -> (steps: Int, summary: AnalysisSummary) {
        var f = PacketFactory()
        let vip = PacketFactory.ep("10.96.0.20", 80)
        let endpoint = PacketFactory.ep("10.0.2.2", 15008)
        let target = PacketFactory.ep("10.0.9.9", 80)
        let base = f.clock
        var timed: [(time: Int64, order: Int, record: PacketRecord)] = []
        func at(_ t: Int64, _ records: [PacketRecord]) {
            for var r in records {
                r.time = Timestamp(seconds: t / 1_000_000_000, nanoseconds: Int32(t % 1_000_000_000))
                timed.append((t, timed.count, r))
            }
        }
        let pod = IPAddress(v4: 0x0A00_0105)
        for i in 0..<n {
            let t0 = base + Int64(i) * 300_000
            let app = Endpoint(pod, UInt16(10_000 + i)), tunnel = Endpoint(pod, UInt16(40_000 + i))
            at(t0, f.redirectedSYN(app, to: vip, seq: UInt32(1000 + i)))
            at(t0 + 200_000, f.markedSYN(tunnel, to: endpoint, seq: UInt32(7000 + i)))
            at(t0 + 3_100_000, [f.packet(tunnel, endpoint, flags: [.rst], seq: UInt32(7001 + i), on: eth0, direction: .outbound)])
            at(t0 + 3_000_000, [f.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.rst], seq: UInt32(1001 + i),
                                         on: lo, direction: .inbound)])
            if forgedEvery > 0 && i % forgedEvery == 0 {
                let forger = Endpoint(pod, UInt16(30_000 + i))
                at(t0 + 100_000, f.markedSYN(forger, to: target, seq: UInt32(90_000 + i)))
                at(t0 + 2_000_000, [f.packet(forger, target, flags: [.rst], seq: UInt32(90_001 + i), on: eth0, direction: .outbound)])
            }
        }
        if lateEnd {
            // One more VIP connection after all the others, without a tunnel: a chain could end on it, but no tunnel
            // began after it to be moved to it.
            let t0 = base + Int64(n) * 300_000 + 5_000_000
            let app = Endpoint(pod, UInt16(10_000 + n))
            at(t0, f.redirectedSYN(app, to: vip, seq: 999))
            at(t0 + 3_000_000, [f.packet(app, PacketFactory.ep("127.0.0.1", 15001), flags: [.rst], seq: 1000, on: lo, direction: .inbound)])
        }
        timed.sort { ($0.time, $0.order) < ($1.time, $1.order) }
        let correlator = Correlator(tags: f.tags, ruleset: nil, options: CorrelatorOptions(), sink: CollectingSink())
        for t in timed { correlator.ingest(t.record) }
        let summary = correlator.finish()
        return (correlator.orderChainStepsInAll, summary)
    }

    /// Every VIP connection has its tunnel: no chain can end anywhere, so no forged connection searches at all.
    func testForgedMarksAmongVIPConnectionsThatAllHaveTunnelsCostNoSearch() {
        let (steps, summary) = flood(n: 600, forgedEvery: 2)
        XCTAssertEqual(summary.escapes, 300, "each forged connection is a finding")
        XCTAssertEqual(summary.hops, 600)
        XCTAssertEqual(steps, 0)
        // Not because the searches are off: with one connection a chain could end on, the same forged marks search.
        XCTAssertGreaterThan(flood(n: 600, forgedEvery: 2, lateEnd: true).steps, 0)
    }

    /// One VIP connection without a tunnel after all the others (a chain could end on it, so the forged connections
    /// search, but none reaches it: no tunnel began after it): each search goes through what the ones before it
    /// found leads nowhere only once, so 600 forged connections cost about two tunnels looked at each (the forged
    /// one's own and a neighbour's), where each used to go through all of its neighbourhood again (137 700 in all
    /// for these 600, 24 s in the debug build, against 1200).
    func testManyForgedMarksDoNotSearchWhatEarlierSearchesWentThrough() {
        let one = flood(n: 600, forgedEvery: 600, lateEnd: true)
        let many = flood(n: 600, forgedEvery: 1, lateEnd: true)
        XCTAssertEqual(one.summary.escapes, 1)
        XCTAssertEqual(many.summary.escapes, 600, "each forged connection is a finding")
        XCTAssertGreaterThan(one.steps, 0, "the lone forged connection searched")
        XCTAssertLessThanOrEqual(many.steps, 4 * 600, "one search: \(one.steps) tunnels looked at; 600: \(many.steps)")
    }
}
