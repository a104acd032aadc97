import XCTest
@testable import Capture

/// The reports of a real lab run (root: `meshtrace lab` builds the ambient pods from network namespaces and
/// removes them): the outbound scenario's captures — `tcpdump -i any` and `tcpdump -i nflog:G` in the client
/// pod, with meshtrace's NFLOG twins installed — analysed with the pod's ruleset into HTML and pcapng.
final class LabReportTests: KernelTestCase {
    var dir: URL!
    var meshtrace: String { ProjectPaths.root.appendingPathComponent(".build/debug/meshtrace").path }

    override func setUpWithError() throws {
        try super.setUpWithError()
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: meshtrace), "build the CLI first (swift build)")
        try XCTSkipUnless(Command.which("tcpdump") != nil && Command.which("tshark") != nil, "needs tcpdump and tshark")
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-labreport-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDown() {
        if let dir { try? FileManager.default.removeItem(at: dir) }
        super.tearDown()
    }

    func testALabRunsReportsShowEveryConnectionAndRoundTrip() throws {
        let captures = dir.appendingPathComponent("captures").path
        let group = 5000 + Int(getpid() % 500)
        let lab = try Command.run(["timeout", "240", meshtrace, "lab", "--scenario", "outbound", "--capture-dir", captures,
                                   "--nflog-group", String(group)])
        XCTAssertTrue(lab.ok, lab.stdout + lab.stderr)
        let any = "\(captures)/outbound-client-any.pcap", nflog = "\(captures)/outbound-client-nflog.pcap"
        let rules = "\(captures)/outbound-client-rules.txt"
        for f in [any, nflog, rules] { XCTAssertTrue(FileManager.default.fileExists(atPath: f), "\(f) recorded by the lab") }

        let html = dir.appendingPathComponent("outbound.html").path
        let pcapng = dir.appendingPathComponent("outbound.pcapng").path
        let run = try Command.run([meshtrace, "analyze", any, nflog, "--rules", rules, "--json", "--quiet", "--html", html, "--pcapng", pcapng])
        XCTAssertEqual(run.status, 0, run.stderr)
        let records = run.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        let connections = records.filter { $0["type"] as? String == "connection" }
        let ids = connections.compactMap { ($0["id"] as? NSNumber)?.uint32Value }.sorted()
        XCTAssertGreaterThanOrEqual(ids.count, 2, "the app's connection and ztunnel's HBONE connection")
        let hopPairs = connections.flatMap { c in (c["hops"] as? [[String: Any]] ?? []).compactMap { h -> [UInt32]? in
            guard let o = (h["outer"] as? NSNumber)?.uint32Value, let i = (h["inner"] as? NSNumber)?.uint32Value else { return nil }
            return [o, i]
        } }
        XCTAssertFalse(hopPairs.isEmpty, "the outbound hop was joined: \(run.stdout.prefix(2000))")

        // HTML, in a real browser: every connection drawn exactly once, each hop's two connections in one diagram.
        guard Command.which("chromium") != nil else { throw XCTSkip("chromium is not installed (scripts/setup --test)") }
        let profile = dir.appendingPathComponent("profile").path
        let chromium = ["timeout", "90", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--no-first-run", "--user-data-dir=\(profile)", "--virtual-time-budget=3000"]
        let dom = try Command.run(chromium + ["--dump-dom", "file://\(html)"])
        XCTAssertTrue(dom.ok, dom.stderr)
        let drawn = BrowserChecks.shownDiagrams(in: dom.stdout)
        XCTAssertEqual(drawn.flatMap { $0 }.sorted(), ids, "one diagram per connection, none twice")
        for pair in hopPairs { XCTAssertTrue(drawn.contains(pair), "hop \(pair) drawn together: \(drawn)") }
        XCTAssertTrue(dom.stdout.contains("REDIRECT → :15001 (original destination"), "the redirect on the arrow")
        let png = dir.appendingPathComponent("shot.png").path
        let shot = try Command.run(chromium + ["--screenshot=\(png)", "--window-size=1280,1400", "file://\(html)"])
        XCTAssertTrue(shot.ok, shot.stderr)
        let stats = try BrowserChecks.pngStatistics(png)
        XCTAssertGreaterThan(stats.distinctColors, 50)
        XCTAssertGreaterThan(stats.variance, 200)

        // pcapng: tshark reads it without a word, every packet commented, the hop named on the app's packets.
        let t = try Command.run(["tshark", "-r", pcapng, "-T", "fields", "-e", "frame.interface_name", "-e", "frame.comment"])
        XCTAssertTrue(t.ok, t.stderr)
        XCTAssertEqual(t.stderr.split(separator: "\n").filter { !$0.contains("could be dangerous") }, [])
        let rows = t.stdout.split(separator: "\n").map { $0.split(separator: "\t", omittingEmptySubsequences: false) }
        let framesRead = try Command.run(["tcpdump", "-r", any]).stdout.split(separator: "\n").count
            + (try Command.run(["tcpdump", "-r", nflog]).stdout.split(separator: "\n").count)
        XCTAssertEqual(rows.count, framesRead, "every packet and NFLOG record written")
        XCTAssertTrue(rows.allSatisfy { $0.count == 2 && !$0[1].isEmpty }, "every packet carries a comment")
        XCTAssertTrue(rows.contains { $0[0].hasPrefix("nf:") && $0[1].contains("outbound-capture") && $0[1].contains("ztunnel hop outbound") })
        XCTAssertTrue(rows.contains { $0[0] == "lo" })

        // The annotated file mixes link types (LINUX_SLL and NFLOG): meshtrace's own pcapng reader reads it back to
        // the same analysis. Only the frame references differ: one file now, numbered in the order written.
        let again = try Command.run([meshtrace, "analyze", pcapng, "--rules", rules, "--json", "--quiet"])
        XCTAssertEqual(again.status, run.status, again.stderr)
        XCTAssertEqual(LabReportTests.withoutFrameReferences(again.stdout), LabReportTests.withoutFrameReferences(run.stdout))

        // Each capture alone has one link type, so libpcap reads the annotated file back: the same analysis.
        for input in [any, nflog] {
            let outDir = dir.appendingPathComponent("rt-\(URL(fileURLWithPath: input).lastPathComponent)")
            try FileManager.default.createDirectory(at: outDir, withIntermediateDirectories: true)
            let annotated = outDir.appendingPathComponent(URL(fileURLWithPath: input).deletingPathExtension().lastPathComponent + ".pcapng").path
            let first = try Command.run([meshtrace, "analyze", input, "--rules", rules, "--json", "--quiet", "--pcapng", annotated])
            let second = try Command.run([meshtrace, "analyze", annotated, "--rules", rules, "--json", "--quiet"])
            XCTAssertEqual(second.status, first.status, second.stderr)
            XCTAssertFalse(first.stdout.isEmpty)
            XCTAssertEqual(second.stdout, first.stdout, "\(input): same timelines from the annotated file")
        }
    }

    func testALiveTracedLabRunWritesItsPageAndPcapngPerScenario() throws {
        guard Command.which("chromium") != nil else { throw XCTSkip("chromium is not installed (scripts/setup --test)") }
        let html = dir.appendingPathComponent("lab.html").path, pcapng = dir.appendingPathComponent("lab.pcapng").path
        let lab = try Command.run(["timeout", "240", meshtrace, "lab", "--scenario", "outbound", "--html", html, "--pcapng", pcapng])
        XCTAssertTrue(lab.ok, lab.stdout + lab.stderr)
        let page = dir.appendingPathComponent("lab-outbound.html").path
        let text = try String(contentsOfFile: page, encoding: .utf8)
        XCTAssertTrue(text.contains("class=\"rules\""), "the live ruleset is drawn")
        let profile = dir.appendingPathComponent("profile-live").path
        let dom = try Command.run(["timeout", "90", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                   "--user-data-dir=\(profile)", "--virtual-time-budget=3000", "--dump-dom", "file://\(page)"])
        XCTAssertTrue(dom.ok, dom.stderr)
        // Every connection of the index is drawn exactly once, and the app's connection shares its diagram with
        // ztunnel's HBONE connection.
        let indexed = dom.stdout.components(separatedBy: "<td class=\"num\">#").dropFirst().compactMap { ConnectionID($0.prefix { $0.isNumber }) }
        let drawn = BrowserChecks.shownDiagrams(in: dom.stdout)
        XCTAssertFalse(indexed.isEmpty)
        XCTAssertEqual(drawn.flatMap { $0 }.sorted(), indexed.sorted())
        XCTAssertTrue(drawn.contains { $0.count == 2 }, "the outbound hop joined in one diagram: \(drawn)")
        let t = try Command.run(["tshark", "-r", dir.appendingPathComponent("lab-outbound.pcapng").path, "-T", "fields", "-e", "frame.comment"])
        XCTAssertTrue(t.ok, t.stderr)
        XCTAssertTrue(t.stdout.contains("outbound-capture") && t.stdout.contains("ztunnel hop outbound"))
    }

    static func withoutFrameReferences(_ json: String) -> String {
        var s = json
        for pattern in [#""frame":\[[0-9]+,[0-9]+\]"#, #"frame [0-9]+:[0-9]+"#, #""frames":\[[^\]]*\]"#] {
            s = s.replacingOccurrences(of: pattern, with: "", options: .regularExpression)
        }
        return s
    }
}
