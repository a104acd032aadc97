import XCTest
@testable import Capture

/// Memory stays bounded under a flood of connections nobody answers: the correlator keeps at most
/// `CorrelatorOptions.maxOpenConnections` open, finishing the ones seen least lately first (printed as ended early,
/// counted), and its inbound candidate lists drop connections that are gone instead of keeping them to the end.
final class OpenConnectionCapTests: XCTestCase {
    static let pod = PacketFactory.ep("10.0.1.5", 80)
    static let client = PacketFactory.ep("10.0.7.7", 41000)
    static let podServer = PacketFactory.ep("10.0.1.5", 8080)

    /// A SYN from outside to the pod's port 80 that nobody answers (a scan, a flood), the `n`-th of them.
    private static func flood(_ f: inout PacketFactory, _ n: Int) -> PacketRecord {
        let src = Endpoint(IPAddress("93.184.\(216 + n / 60000).\(1 + (n / 250) % 240)")!, UInt16(1024 + n % 250))
        return f.packet(src, pod, flags: [.syn], seq: UInt32(n), on: eth0, direction: .inbound)
    }

    /// The pod's address given, and at most `maxOpen` connections open.
    private static func options(maxOpen: Int = CorrelatorOptions().maxOpenConnections) -> CorrelatorOptions {
        var o = CorrelatorOptions()
        o.podAddresses = [pod.addr]
        o.maxOpenConnections = maxOpen
        return o
    }

    /// What feeding a correlator left: its sink and summary, the largest `watch` it showed after any record, and how
    /// many timelines were out before `finish`.
    private struct Fed { let sink: CollectingSink; let summary: AnalysisSummary; let largest: Int; let beforeEnd: Int }

    /// Feeds the records `step` makes for each of `count` steps, `micros` apart, to a correlator with `options`.
    private func feed(_ options: CorrelatorOptions, _ f: inout PacketFactory, count: Int, micros: Int64 = 10,
                      watch: (Correlator) -> Int = { $0.openConnectionCount },
                      _ step: (inout PacketFactory, Int) -> [PacketRecord]) -> Fed {
        let sink = CollectingSink()
        let c = Correlator(tags: f.tags, ruleset: nil, options: options, sink: sink)
        var largest = 0
        for n in 0..<count {
            f.advance(micros: micros)
            for r in step(&f, n) {
                c.ingest(r)
                largest = max(largest, watch(c))
            }
        }
        let beforeEnd = sink.timelines.count
        return Fed(sink: sink, summary: c.finish(), largest: largest, beforeEnd: beforeEnd)
    }

    /// 32 open at most: past that the SYNs seen least lately end first, while a connection that keeps sending (the pod's
    /// own, a packet after every ten SYNs) stays whole; every connection is printed once, those ended early marked and
    /// counted; the table never holds more than the cap.
    func testPastTheCapTheConnectionsSeenLeastLatelyEndEarly() throws {
        var f = PacketFactory()
        let o = Self.options(maxOpen: 32)
        let fed = feed(o, &f, count: 300) { f, n in
            var records: [PacketRecord] = []
            if n == 0 {
                records.append(f.packet(Self.client, Self.podServer, flags: [.syn], seq: 100, on: eth0, direction: .inbound))
                records.append(f.packet(Self.podServer, Self.client, flags: [.syn, .ack], seq: 500, ack: 101, on: eth0, direction: .outbound))
            }
            records.append(Self.flood(&f, n))
            if n % 10 == 9 {
                records.append(f.packet(Self.podServer, Self.client, seq: 501, ack: 101, payload: 10, on: eth0, direction: .outbound))
            }
            return records
        }
        XCTAssertLessThanOrEqual(fed.largest, 32)
        let timelines = fed.sink.timelines
        XCTAssertEqual(timelines.count, 301, "every connection printed once")
        let early = timelines.filter(\.endedEarly)
        XCTAssertEqual(fed.summary.connectionsEndedEarly, early.count)
        XCTAssertGreaterThanOrEqual(early.count, 300 - 32)
        // The oldest SYNs went first, in the order they came; the latest ones are still open at the end.
        XCTAssertEqual(early.map(\.id), early.map(\.id).sorted())
        XCTAssertEqual(Array(timelines.prefix(early.count).map(\.id)), early.map(\.id), "the ended-early ones printed first")
        let server = try XCTUnwrap(timelines.first { $0.original.src == Self.client })
        XCTAssertFalse(server.endedEarly, "the connection that kept sending is not one of them")
        XCTAssertEqual(server.packets, 2 + 30)
        XCTAssertFalse(timelines.filter { $0.original.dst == Self.pod }.suffix(16).contains(where: \.endedEarly),
                       "the latest SYNs stayed open")
    }

    /// A port reused over and over (100 SYNs on one tuple, each with its own ISN): each new SYN retires the connection
    /// before it (closed, lingering for late records). Pushed out by the cap, those lose only the rest of their
    /// linger: none is marked ended early or counted; the one still open at the end is not either.
    func testClosedConnectionsPushedOutAreNotEndedEarly() {
        var f = PacketFactory()
        let o = Self.options(maxOpen: 16)
        let fed = feed(o, &f, count: 100) { f, n in
            [f.packet(Self.client, Self.pod, flags: [.syn], seq: UInt32(1000 * n), on: eth0, direction: .inbound)]
        }
        XCTAssertLessThanOrEqual(fed.largest, 16)
        XCTAssertGreaterThan(fed.beforeEnd, 50, "pushed out before the end")
        XCTAssertEqual(fed.sink.timelines.count, 100)
        XCTAssertEqual(fed.summary.connectionsEndedEarly, 0)
        XCTAssertFalse(fed.sink.timelines.contains(where: \.endedEarly))
    }

    /// Without the cap reached, nothing ends early.
    func testBelowTheCapNothingEndsEarly() {
        var f = PacketFactory()
        let o = Self.options(maxOpen: 301)
        let fed = feed(o, &f, count: 300) { f, n in [Self.flood(&f, n)] }
        XCTAssertEqual(fed.summary.connectionsEndedEarly, 0)
        XCTAssertFalse(fed.sink.timelines.contains(where: \.endedEarly))
    }

    /// 20 000 SYNs from outside over 20 s, each idle out after 1 s: each was a candidate for an inbound hop (the
    /// outside's side), and that list, pruned only when a ztunnel leg into the pod looked (none here), kept every one of
    /// them to the end, emitted or not. It is pruned as it doubles now: what it holds follows the connections open.
    func testInboundCandidatesGoWithTheirConnections() {
        var f = PacketFactory()
        var o = Self.options()
        o.tcpIdleTimeoutNanos = 1_000_000_000
        let fed = feed(o, &f, count: 20_000, micros: 1000, watch: { $0.inboundCandidatesListed }) { f, n in [Self.flood(&f, n)] }
        XCTAssertGreaterThan(fed.largest, 1000, "the control: a second's SYNs are candidates")
        XCTAssertLessThan(fed.largest, 8000, "the list kept connections long gone")
    }

    /// The selection the cap uses finds the k-th smallest whatever the order and the repeats.
    func testSelectionFindsTheKthSmallest() {
        var g = SystemRandomNumberGenerator()
        for size in [1, 2, 3, 10, 100, 1000] {
            for _ in 0..<20 {
                let values = (0..<size).map { _ in Int64.random(in: 0..<Int64(max(2, size / 3)), using: &g) }
                let sorted = values.sorted()
                let k = Int.random(in: 0..<size, using: &g)
                var scratch = values
                XCTAssertEqual(Correlator.select(&scratch, k), sorted[k], "size \(size) k \(k)")
            }
        }
    }

    /// What the reports say of it: the timeline's `ended_early` and the summary's count in the JSON, the text's header
    /// and warning.
    func testReportsSayWhichConnectionsEndedEarly() throws {
        var f = PacketFactory()
        let o = Self.options(maxOpen: 16)
        let records = (0..<40).map { n in f.advance(micros: 10); return Self.flood(&f, n) }
        let json = try renderReport(records, tags: f.tags, options: o) { JSONReport(fileDescriptor: $0) }
        let lines = json.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        let connections = lines.filter { $0["type"] as? String == "connection" }
        XCTAssertEqual(connections.count, 40)
        let early = connections.filter { $0["ended_early"] as? Bool == true }.count
        XCTAssertGreaterThanOrEqual(early, 40 - 16)
        XCTAssertEqual(lines.last?["connections_ended_early"] as? Int, early)
        let text = try renderReport(records, tags: f.tags, options: o) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("ended early (too many open)"), text)
        XCTAssertTrue(text.contains("\(early) connections printed early: more were open at once than --max-open keeps"), text)
    }
}
