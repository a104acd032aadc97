import XCTest
@testable import Capture

/// The JSON printer writes a timeline from the correlator's compact events (what analyze and trace use) and
/// from materialized `TimelineEvent`s (what the `ReportSink` protocol offers every sink): both must be the
/// same bytes. The compact path copies cached pieces (hit objects, tuples, the seconds of timestamps), so
/// this is what catches a cache that goes stale.
final class JSONReportTests: XCTestCase {
    /// Forwards timelines the way a sink that does not read compact events gets them.
    private final class Materializing: ReportSink {
        let inner: JSONReport
        var timelines: [ConnectionTimeline] = []
        init(_ inner: JSONReport) { self.inner = inner }
        func connection(_ timeline: ConnectionTimeline) { inner.connection(timeline); timelines.append(timeline) }
        func finding(_ finding: EscapeFinding) { inner.finding(finding) }
        func finish(_ summary: AnalysisSummary) throws { try inner.finish(summary) }
    }

    private func samplesDir() -> URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("samples")
    }

    func testCompactAndMaterializedEventsAreWrittenAlike() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-json-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        var compared = 0
        for sample in ["outbound-client", "inbound-hbone-server", "mark-escape-client"] {
            for withRules in [false, true] {
                let samples = samplesDir()
                let paths = ["any", "nflog"].map { samples.appendingPathComponent("\(sample)-\($0).pcap").path }
                let ruleset = withRules ? try RulesetLoader.load(file: samples.appendingPathComponent("\(sample)-rules.txt").path) : nil
                let compactPath = dir.appendingPathComponent("\(sample)-\(withRules)-compact.json").path
                let fullPath = dir.appendingPathComponent("\(sample)-\(withRules)-full.json").path
                var timelines: [ConnectionTimeline] = []
                let compactFD = open(compactPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
                let fullFD = open(fullPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
                XCTAssertGreaterThanOrEqual(compactFD, 0); XCTAssertGreaterThanOrEqual(fullFD, 0)
                do {
                    let tags = RuleTagTable()
                    let source = try MergedSource(paths: paths, tags: tags)
                    let compact = JSONReport(fileDescriptor: compactFD)
                    let full = JSONReport(fileDescriptor: fullFD)
                    XCTAssertTrue(compact.readsCompactEvents)
                    let materializing = Materializing(full)
                    let reporter = Reporter(sinks: [compact, materializing])
                    let correlator = Correlator(tags: tags, ruleset: ruleset, sink: reporter)
                    var record = PacketRecord()
                    while source.next(into: &record) != nil { correlator.ingest(record) }
                    try reporter.finish(correlator.finish())
                    timelines = materializing.timelines
                }
                close(compactFD); close(fullFD)
                let a = try Data(contentsOf: URL(fileURLWithPath: compactPath))
                let b = try Data(contentsOf: URL(fileURLWithPath: fullPath))
                XCTAssertGreaterThan(a.count, 1000, sample)
                XCTAssertEqual(a, b, "\(sample) rules: \(withRules): the compact and the materialized JSON differ")
                // Checked field by field against the timelines themselves (both writers share the caches,
                // so comparing their bytes alone would not catch a stale one).
                let records = try a.split(separator: UInt8(ascii: "\n")).compactMap {
                    try XCTUnwrap(try JSONSerialization.jsonObject(with: Data($0)) as? [String: Any])
                }.filter { $0["type"] as? String == "connection" }
                XCTAssertEqual(records.count, timelines.count, sample)
                for (record, timeline) in zip(records, timelines) {
                    let events = try XCTUnwrap(record["events"] as? [[String: Any]])
                    XCTAssertEqual(events.count, timeline.events.count)
                    for (j, (event, e)) in zip(events, timeline.events).enumerated() {
                        let tuple = try XCTUnwrap(event["tuple"] as? [String: Any])
                        XCTAssertEqual(event["time"] as? String, e.time.description, "\(sample) event \(j)")
                        XCTAssertEqual(event["point"] as? String, e.point.description, "\(sample) event \(j)")
                        XCTAssertEqual(tuple["src"] as? String, e.tuple.src.addr.description, "\(sample) event \(j)")
                        XCTAssertEqual(tuple["dst"] as? String, e.tuple.dst.addr.description, "\(sample) event \(j)")
                        XCTAssertEqual(tuple["sport"] as? Int, Int(e.tuple.src.port), "\(sample) event \(j)")
                        XCTAssertEqual(tuple["dport"] as? Int, Int(e.tuple.dst.port), "\(sample) event \(j)")
                        XCTAssertEqual(tuple["proto"] as? String, IPProto.name(e.tuple.proto))
                        XCTAssertEqual(event["len"] as? Int, Int(e.length))
                        XCTAssertEqual(event["mark"] as? Int, e.mark.map { Int($0) })
                        let hit = event["hit"] as? [String: Any]
                        XCTAssertEqual(hit?["prefix"] as? String, e.hit?.prefixText, "\(sample) event \(j)")
                        let action = hit?["action"] as? [String: Any]
                        XCTAssertEqual(action == nil, e.hit?.action == nil, "\(sample) event \(j)")
                        if case .redirected(let port, let original)? = e.hit?.action {
                            XCTAssertEqual(action?["to_port"] as? Int, Int(port))
                            XCTAssertEqual(action?["original_dst"] as? String, original?.description)
                        }
                        if let point = event["point"] as? String, point.hasPrefix("nf:") {
                            XCTAssertTrue(["nf:OUTPUT", "nf:PREROUTING", "nf:INPUT", "nf:POSTROUTING", "nf:FORWARD"].contains(point), point)
                        }
                    }
                }
                compared += 1
            }
        }
        XCTAssertEqual(compared, 6)
    }

    /// Timestamps keep their seconds' digits between events: a change of second, a zero and a short value
    /// must each be written afresh.
    func testTimestampsAcrossSecondsAreWrittenInFull() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-json-ts-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.path, contents: nil), "cannot create a scratch file")
        let fd = open(dir.path, O_WRONLY | O_TRUNC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        // A negative second first: the cache's initial key must not be taken for it.
        let times = [Timestamp(seconds: -1, nanoseconds: 5), Timestamp(seconds: 1_795_823_585, nanoseconds: 5), Timestamp(seconds: 1_795_823_585, nanoseconds: 999_999_999),
                     Timestamp(seconds: 1_795_823_586, nanoseconds: 0), Timestamp(seconds: 7, nanoseconds: 120_000_000),
                     Timestamp(seconds: 0, nanoseconds: 1), Timestamp(seconds: 1_795_823_586, nanoseconds: 42)]
        do {
            let buffer = ReportBuffer(fileDescriptor: fd)
            for t in times { buffer.timestamp(t); buffer.byte(0x0a) }
        }
        close(fd)
        let text = try String(contentsOfFile: dir.path, encoding: .utf8)
        XCTAssertEqual(text, times.map { "\($0)\n" }.joined())
    }

    /// `--mode trace` says how many TRACE steps were lost, 0 included; any other run has no such key.
    func testTraceStepsLostIsWrittenForTraceRunsOnly() throws {
        func summaryJSON(_ lost: Int?) throws -> String {
            var summary = AnalysisSummary()
            summary.traceSteps = 40
            summary.traceStepsLost = lost
            return try written { try JSONReport(fileDescriptor: $0).finish(summary) }
        }
        let lost = try summaryJSON(3)
        XCTAssertTrue(lost.contains("\"trace_steps\":40,\"trace_steps_lost\":3"), lost)
        XCTAssertTrue(try summaryJSON(0).contains("\"trace_steps_lost\":0"))
        XCTAssertFalse(try summaryJSON(nil).contains("trace_steps_lost"))
    }

    /// A live trace's summary says how many events the kernel dropped (0 included) and its twins' counters; an
    /// analysis of files has no such keys, since it cannot know (it said `"events_lost":0,"kernel_counters":{}`).
    func testEventsLostAndKernelCountersAreWrittenForLiveTracesOnly() throws {
        func summaryJSON(live: Bool) throws -> String {
            var summary = AnalysisSummary()
            summary.live = live
            if live { summary.kernelCounters = ["mt:4:nat:OUTPUT:1:45fb": 7] }
            return try written { try JSONReport(fileDescriptor: $0).finish(summary) }
        }
        let live = try summaryJSON(live: true)
        XCTAssertTrue(live.contains(#""events_lost":0,"kernel_counters":{"mt:4:nat:OUTPUT:1:45fb":7}"#), live)
        let offline = try summaryJSON(live: false)
        XCTAssertFalse(offline.contains("events_lost") || offline.contains("kernel_counters"), offline)
        // And `analyze` of real files.
        let json = try Command.run([LiveTracerTests.executable, "analyze", ProjectPaths.samples.appendingPathComponent("outbound-client-any.pcap").path,
                                    ProjectPaths.samples.appendingPathComponent("outbound-client-nflog.pcap").path, "--json", "--quiet"]).stdout
        XCTAssertTrue(json.contains(#""type":"summary""#), json)
        XCTAssertFalse(json.contains("events_lost"), json)
    }

    /// How often a live trace's reader was raised and the CPU it used raised: written when it was raised, absent
    /// otherwise (and from files).
    func testTheReadersRaisesAreWrittenWhenThereWereAny() throws {
        func summaryJSON(live: Bool, raises: Int) throws -> String {
            var summary = AnalysisSummary()
            summary.live = live
            summary.readerRaises = raises
            summary.readerRaisedCPUNanos = UInt64(raises) * 12_000_000 + 999_999
            return try written { try JSONReport(fileDescriptor: $0).finish(summary) }
        }
        let raised = try summaryJSON(live: true, raises: 3)
        XCTAssertTrue(raised.contains(#""reader_raises":3,"reader_raised_cpu_ms":36"#), raised)
        XCTAssertFalse(try summaryJSON(live: true, raises: 0).contains("reader_raise"))
        XCTAssertFalse(try summaryJSON(live: false, raises: 3).contains("reader_raise"))
    }
}
