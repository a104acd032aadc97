import XCTest
@testable import Capture

/// The outbound identity join reads only the candidates that began within the hop window of the connection looking
/// (`CandidateList`): a tunnel may begin up to `hopWindowNanos` after its app connection, or `hopSlackNanos` before.
final class CandidateWindowTests: XCTestCase {
    static let app = PacketFactory.ep("10.0.1.5", 40000)
    static let tunnel = PacketFactory.ep("10.0.1.5", 50000)

    /// Feeds `records` one by one and returns how many hops were joined after each; the timelines and the summary.
    private func joins(_ records: [PacketRecord], tags: RuleTagTable) -> (after: [Int], sink: CollectingSink, summary: AnalysisSummary) {
        let sink = CollectingSink()
        let c = Correlator(tags: tags, ruleset: nil, options: CorrelatorOptions(), sink: sink)
        var after: [Int] = []
        for r in records { c.ingest(r); after.append(c.hopsJoined) }
        let summary = c.finish()
        XCTAssertEqual(sink.findings.map(\.summary), [])
        return (after, sink, summary)
    }

    private func isTunnelSYN(_ r: PacketRecord) -> Bool { r.tuple.src == Self.tunnel && r.tcpFlags == [.syn] }

    /// The app connection and the tunnel are joined by identity, when record `index` came (not before), and once.
    private func assertJoined(_ records: [PacketRecord], tags: RuleTagTable, at index: Int, _ message: String,
                              line: UInt = #line) throws {
        let j = joins(records, tags: tags)
        XCTAssertEqual(j.after[index - 1], 0, line: line)
        XCTAssertEqual(j.after[index], 1, message, line: line)
        let a = try XCTUnwrap(j.sink.timelines.first { $0.original.src == Self.app }, line: line)
        let t = try XCTUnwrap(j.sink.timelines.first { $0.original.src == Self.tunnel }, line: line)
        XCTAssertEqual(a.hops.map(\.inner), [t.id], line: line)
        XCTAssertTrue(a.hops.first?.evidence.map(\.kind).contains("original-destination") == true, line: line)
        XCTAssertEqual(j.summary.hops, 1, line: line)
    }

    /// ztunnel connects 1.5 s after it accepted the app's connection (within the 2 s window, beyond the 1 s slack):
    /// the tunnel, looking when its first record comes, finds the app connection that began 1.5 s before it.
    func testATunnelThatBeganWellAfterItsAppConnectionFindsIt() throws {
        var f = PacketFactory()
        let x = PortReuseTests.exchange(&f, app: Self.app, tunnel: Self.tunnel, appISN: 1000, tunISN: 7000, tunnelAfter: 1_500_000)
        let records = (x.pcap + x.nflog).sorted { $0.time < $1.time }
        let first = try XCTUnwrap(records.firstIndex(where: isTunnelSYN))
        try assertJoined(records, tags: f.tags, at: first, "joined when the tunnel's first record came")
    }

    /// The same, with the app's original destination read only after the tunnel began: the capture has what the pod
    /// sends only (`tcpdump 'src host 10.0.1.5'`: not the replies on lo, whose source is the original destination
    /// again), and the NFLOG records are 1.6 s behind it (as a file from `tcpdump -i nflog` may be). Now the app
    /// connection looks when its REDIRECT twin's record comes, and finds the tunnel that began 1.5 s after it.
    func testAnAppConnectionWhoseDestinationCameLateFindsATunnelThatBeganWellAfterIt() throws {
        var f = PacketFactory()
        let x = PortReuseTests.exchange(&f, app: Self.app, tunnel: Self.tunnel, appISN: 1000, tunISN: 7000, tunnelAfter: 1_500_000)
        let records = PortReuseTests.read(x.pcap.filter { $0.tuple.src.addr == Self.app.addr }, x.nflog, lag: 1_600_000)
        let redirect = try XCTUnwrap(records.firstIndex { $0.hasNflog && $0.tuple.src == Self.app })
        XCTAssertLessThan(try XCTUnwrap(records.firstIndex(where: isTunnelSYN)), redirect)
        try assertJoined(records, tags: f.tags, at: redirect, "joined when the app's original destination came")
    }

    /// A tunnel that began 2.5 s after the app connection (beyond the window) was not opened for it: no identity join.
    func testATunnelBeyondTheWindowIsNotJoinedByIdentity() throws {
        var f = PacketFactory()
        let x = PortReuseTests.exchange(&f, app: Self.app, tunnel: Self.tunnel, appISN: 1000, tunISN: 7000, tunnelAfter: 2_500_000)
        let (sink, _) = correlate((x.pcap + x.nflog).sorted { $0.time < $1.time }, tags: f.tags)
        let a = try XCTUnwrap(sink.timelines.first { $0.original.src == Self.app })
        XCTAssertFalse(a.hops.contains { $0.evidence.map(\.kind).contains("original-destination") })
    }

    /// The list keeps its entries in the order their connections began, whatever order they are filed in, so the
    /// halving finds a window's start; a prune drops what it is told to and waits for the list to double again.
    func testTheListIsInStartOrderAndPrunesAsItDoubles() {
        func conn(_ id: UInt64, first: Int64) -> ConnectionState {
            let c = ConnectionState(id: ConnectionID(id), tuple: FiveTuple(proto: IPProto.tcp, src: Self.app, dst: Self.tunnel),
                                    initiator: Self.app, responder: Self.tunnel)
            c.firstSeenNanos = first
            return c
        }
        var list = CandidateList()
        let starts: [Int64] = [100, 300, 200, 300, 50, 400, 250]
        let conns = starts.enumerated().map { conn(UInt64($0.offset), first: $0.element) }
        for c in conns { list.insert(c) }
        XCTAssertEqual(list.entries.map(\.first), [50, 100, 200, 250, 300, 300, 400])
        XCTAssertTrue(list.entries[4].conn === conns[1] && list.entries[5].conn === conns[3], "equal starts in the order filed")
        XCTAssertEqual(list.lowerBound(0), 0)
        XCTAssertEqual(list.lowerBound(200), 2)
        XCTAssertEqual(list.lowerBound(201), 3)
        XCTAssertEqual(list.lowerBound(300), 4)
        XCTAssertEqual(list.lowerBound(401), 7)
        list.remove(conns[2])
        XCTAssertEqual(list.entries.map(\.first), [50, 100, 250, 300, 300, 400])
        XCTAssertEqual(list.pruneAt, 16)
        for i in 0..<20 { list.insert(conn(UInt64(100 + i), first: 500 + Int64(i))) }
        list.prune { $0.firstSeenNanos < 510 }
        XCTAssertEqual(list.entries.map(\.first), (510...519).map { Int64($0) })
        XCTAssertEqual(list.pruneAt, 20)
    }
}
