import XCTest
@testable import Capture

/// The HTML report, rendered by a real browser (Debian's chromium, headless): the page is not blank, its
/// DOM holds exactly one sequence diagram per connection on the page, escapes come first, and nothing is
/// fetched from the network.
final class HTMLReportTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-html-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    func writeReport(_ scenario: ReportScenario, name: String = "report.html") throws -> String {
        let path = dir.appendingPathComponent(name).path
        var config = OutputConfig()
        config.htmlPath = path
        let reporter = try Reporter.make(config: config, ruleset: scenario.ruleset, tags: scenario.tags,
                                         title: "meshtrace analyze lab-outbound.pcapng")
        try scenario.play(into: reporter)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".meshtrace-spool-\(getpid())"), "spool removed")
        return path
    }

    func chromium(_ args: [String]) throws -> Command.Result {
        guard Command.which("chromium") != nil else { throw XCTSkip("chromium is not installed (scripts/setup --test)") }
        // A private profile directory: a root chromium refuses the default one, and runs must not share state.
        let profile = dir.appendingPathComponent("profile-\(UUID().uuidString.prefix(6))").path
        return try Command.run(["timeout", "90", "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                "--hide-scrollbars", "--no-first-run", "--user-data-dir=\(profile)",
                                "--virtual-time-budget=3000"] + args)
    }

    func dumpDOM(_ url: String) throws -> String {
        let r = try chromium(["--dump-dom", url])
        XCTAssertTrue(r.ok, r.stderr)
        return r.stdout
    }

    func diagrams(in dom: String) -> [[ConnectionID]] { BrowserChecks.diagrams(in: dom) }
    func pngStatistics(_ path: String) throws -> (width: Int, distinctColors: Int, variance: Double) {
        try BrowserChecks.pngStatistics(path)
    }

    func testChromiumShowsOneDiagramPerConnectionWithTheHopsJoinedAndEscapesFirst() throws {
        let scenario = ReportScenario.standard()
        let path = try writeReport(scenario)
        let dom = try dumpDOM("file://\(path)")

        let drawn = BrowserChecks.shownDiagrams(in: dom)
        XCTAssertEqual(diagrams(in: dom).count, drawn.count, "a single page stores no other pages")
        // 7 connections: two hops (drawn as one diagram each), the probe, the forged mark, the UDP flow.
        XCTAssertEqual(drawn.count, 5, "one diagram per flow on the page")
        let ids = drawn.flatMap { $0 }
        XCTAssertEqual(ids.sorted(), scenario.timelines.map(\.id).sorted(), "every connection in exactly one diagram")
        for t in scenario.timelines where !t.hops.isEmpty {
            let hop = t.hops[0]
            XCTAssertTrue(drawn.contains([hop.outer, hop.inner]), "hop #\(hop.outer) → #\(hop.inner) joined in one diagram")
        }
        let forged = scenario.findings.first { $0.isEscape }!.connection!
        XCTAssertEqual(drawn.first, [forged], "the escape's diagram comes first")

        // The summary names the escape before the by-design finding, and before everything else.
        let escapeAt = dom.range(of: "forged-ztunnel-mark")!.lowerBound
        XCTAssertLessThan(escapeAt, dom.range(of: "non-DNS UDP")!.lowerBound)
        XCTAssertLessThan(escapeAt, dom.range(of: "Rules as the kernel walks them")!.lowerBound)
        // The index the script built holds every connection.
        for t in scenario.timelines { XCTAssertTrue(dom.contains(">#\(t.id)</td>"), "index row for #\(t.id)") }
        // The rule flow shows the redirect with its hit count (one SYN per outbound connection).
        XCTAssertTrue(dom.contains("REDIRECT :15001"), "rule flow drawn")
        // Redirect and original destination on the arrows.
        XCTAssertTrue(dom.contains("REDIRECT → :15001 (original destination \(ReportScenario.service):80)"))
        XCTAssertTrue(dom.contains("mark 0x539"))
    }

    func testPagingKeepsManyConnectionsUsable() throws {
        let scenario = ReportScenario.standard(extraOutbound: 40)
        let path = try writeReport(scenario)
        let flowsTotal = 5 + 40
        let firstDOM = try dumpDOM("file://\(path)")
        // The whole document holds every diagram exactly once: page 1 live, the other pages as stored markup.
        XCTAssertEqual(diagrams(in: firstDOM).flatMap { $0 }.sorted(), scenario.timelines.map(\.id).sorted())
        let first = BrowserChecks.shownDiagrams(in: firstDOM)
        XCTAssertEqual(first.count, HTMLReport.flowsPerPage)
        let last = BrowserChecks.shownDiagrams(in: try dumpDOM("file://\(path)#page=\((flowsTotal + HTMLReport.flowsPerPage - 1) / HTMLReport.flowsPerPage)"))
        XCTAssertEqual(last.count, flowsTotal % HTMLReport.flowsPerPage == 0 ? HTMLReport.flowsPerPage : flowsTotal % HTMLReport.flowsPerPage)
        XCTAssertTrue(Set(first.flatMap { $0 }).isDisjoint(with: last.flatMap { $0 }))
        XCTAssertTrue(last.flatMap { $0 }.contains(scenario.timelines.last!.id))
    }

    func testALongConnectionIsCappedAndSaysHowManyArrowsWereElided() throws {
        var scenario = ReportScenario.standard()
        var t = scenario.timelines[0]
        let template = t.events
        while t.events.count < 500 { t.events += template }
        t.droppedEvents = 1234
        scenario.timelines[0] = t
        let svg = SequenceDiagram.render(timelines: [t], escapes: [])
        let arrows = svg.components(separatedBy: "<line class=\"arrow").count - 1 + svg.components(separatedBy: "<path class=\"arrow").count - 1
        XCTAssertEqual(arrows, SequenceDiagram.maxArrows)
        XCTAssertTrue(svg.contains("… \(t.events.count - SequenceDiagram.maxArrows) more events of this flow not drawn"), svg)
        XCTAssertTrue(svg.contains("1234 events counted but not kept"))
    }

    func testScreenshotIsNotBlank() throws {
        let scenario = ReportScenario.standard()
        let path = try writeReport(scenario)
        let png = dir.appendingPathComponent("shot.png").path
        let r = try chromium(["--screenshot=\(png)", "--window-size=1280,1600", "file://\(path)"])
        XCTAssertTrue(r.ok, r.stderr)
        let stats = try pngStatistics(png)
        XCTAssertEqual(stats.width, 1280)
        XCTAssertGreaterThan(stats.distinctColors, 50, "a rendered page has text and diagrams, not one colour")
        XCTAssertGreaterThan(stats.variance, 200, "luminance varies across the page")
        if let keep = ProcessInfo.processInfo.environment["MESHTRACE_KEEP_SCREENSHOT"] {
            try? FileManager.default.removeItem(atPath: keep)
            try FileManager.default.copyItem(atPath: png, toPath: keep)
            try? FileManager.default.removeItem(atPath: keep + ".html")
            try FileManager.default.copyItem(atPath: path, toPath: keep + ".html")
        }
    }

    func testThePageFetchesNothing() throws {
        let path = try writeReport(ReportScenario.standard())
        let html = try String(contentsOfFile: path, encoding: .utf8)
        // The SVG namespace is a name, not a fetch (it also appears JSON-escaped in the embedded pages).
        let withoutSVGNamespace = html.replacingOccurrences(of: "http://www.w3.org/2000/svg", with: "")
        XCTAssertFalse(withoutSVGNamespace.contains("http://"))
        XCTAssertFalse(withoutSVGNamespace.contains("https://"))
        XCTAssertFalse(html.contains("<link"))
        XCTAssertFalse(html.contains(" src="))
        XCTAssertFalse(html.contains("@import"))
    }

    func testHostileNamesAreEscaped() throws {
        var scenario = ReportScenario.standard()
        scenario.findings[0].summary = "</script><script>alert(1)</script> & <b>"
        let path = try writeReport(scenario)
        let html = try String(contentsOfFile: path, encoding: .utf8)
        XCTAssertFalse(html.contains("<script>alert(1)"))
        XCTAssertTrue(html.contains("&lt;/script&gt;&lt;script&gt;alert(1)"))
    }

}

final class HTMLVerificationReportTests: XCTestCase {
    func testVerdictPageListsEscapesFirstWithTheirRulePath() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-verify-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("verify.html").path
        let rows = [
            VerdictRow(packetClass: "IPv4 TCP app → remote, dport other, no mark", outcome: .captured,
                       verdict: "captured by ztunnel (15001)", path: ["nat OUTPUT #1 → ISTIO_OUTPUT", "nat ISTIO_OUTPUT #4 REDIRECT :15001"]),
            VerdictRow(packetClass: "IPv4 UDP app → remote, dport other", outcome: .bypass, verdict: "bypass by design (non-DNS UDP)",
                       path: ["nat OUTPUT policy ACCEPT"]),
            VerdictRow(packetClass: "IPv4 TCP app → remote, mark 0x539", outcome: .escape, verdict: "escape",
                       path: ["nat ISTIO_OUTPUT #4 does not match (mark 0x539)", "nat OUTPUT policy ACCEPT"]),
            VerdictRow(packetClass: "IPv6 TCP app → remote", outcome: .escape, verdict: "escape", path: ["no ip6tables rules"],
                       acceptedByPolicy: true),
        ]
        var config = OutputConfig(); config.htmlPath = path
        try Reporter.writeVerificationHTML(config: config, ruleset: ReportScenario.seedRuleset(), rows: rows)
        let html = try String(contentsOfFile: path, encoding: .utf8)
        let order = ["mark 0x539</td>", "IPv6 TCP app → remote</td>", "non-DNS UDP", "dport other, no mark</td>"]
            .map { html.range(of: $0)!.lowerBound }
        XCTAssertEqual(order, order.sorted(), "escape, accepted escape, bypass, captured")
        XCTAssertTrue(html.contains("nat ISTIO_OUTPUT #4 does not match (mark 0x539)  →  nat OUTPUT policy ACCEPT"))
        XCTAssertTrue(html.contains("<b>1</b>escapes"), "the accepted escape is not counted as one")
        XCTAssertTrue(html.contains("class=\"rules\""), "ruleset flow drawn")
        XCTAssertEqual(html.components(separatedBy: "<tr class=").count - 1, rows.count)
    }

    func testNoHTMLFlagWritesNothing() throws {
        try Reporter.writeVerificationHTML(config: OutputConfig(), ruleset: nil, rows: [])
        let r = try Reporter.make(config: OutputConfig())
        XCTAssertTrue(r.sinks.isEmpty)
        XCTAssertFalse(r.wantsPackets)
    }
}

/// `meshtrace verify --html` on a real ruleset: the page holds every class the JSON lists, escapes first.
final class VerifyHTMLCommandTests: XCTestCase {
    func testVerifyWritesOneRowPerClassWithTheEscapesOnTop() throws {
        let meshtrace = ProjectPaths.root.appendingPathComponent(".build/debug/meshtrace").path
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: meshtrace), "build the CLI first (swift build)")
        let rules = ProjectPaths.root.appendingPathComponent("samples/rulesets/seed-ambient-pod.iptables-save.txt").path
        let html = FileManager.default.temporaryDirectory.appendingPathComponent("mt-verify-\(getpid()).html").path
        defer { try? FileManager.default.removeItem(atPath: html) }
        // --strict: the forged-0x539 class counts as an escape instead of being accepted as inherent.
        let json = try Command.run([meshtrace, "verify", "--rules", rules, "--strict", "--json"])
        let page = try Command.run([meshtrace, "verify", "--rules", rules, "--strict", "--html", html])
        XCTAssertEqual(page.status, json.status)
        let object = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as! [String: Any]
        let classes = object["classes"] as! [[String: Any]]
        let text = try String(contentsOfFile: html, encoding: .utf8)
        let rows = text.components(separatedBy: "<tr class=").dropFirst()
        XCTAssertEqual(rows.count, classes.count)
        let escapes = classes.filter { ($0["verdict"] as? String) == "escape" || (($0["verdict"] as? [String: Any])?["kind"] as? String) == "escape" }
        XCTAssertGreaterThan(escapes.count, 0, "the seed ruleset lets a forged 0x539 mark escape")
        let escapeRows = rows.filter { $0.hasPrefix("\"esc\"") }
        XCTAssertEqual(escapeRows.count, escapes.count, "escape rows match the JSON")
        XCTAssertEqual(Array(rows.prefix(escapeRows.count)).map { $0.hasPrefix("\"esc\"") }, Array(repeating: true, count: escapeRows.count))
        for c in escapes { XCTAssertTrue(text.contains(HTML.escape(c["class"] as! String)), "\(c["class"]!)") }
    }
}

/// What the browser tests read back: the diagrams in a DOM, and whether a screenshot is blank.
enum BrowserChecks {
    /// The diagrams on the page shown: inside `#mt-diagrams`, not the stored markup of other pages.
    static func shownDiagrams(in dom: String) -> [[ConnectionID]] {
        guard let start = dom.range(of: "id=\"mt-diagrams\"") else { return [] }
        let rest = dom[start.upperBound...]
        let end = [rest.range(of: "<script type=\"text/html\"")?.lowerBound, rest.range(of: "</section>")?.lowerBound]
            .compactMap { $0 }.min() ?? rest.endIndex
        return diagrams(in: String(rest[..<end]))
    }

    /// `data-conns` of every `<svg class="seq" ...>` in the DOM, in order.
    static func diagrams(in dom: String) -> [[ConnectionID]] {
        var out: [[ConnectionID]] = []
        var rest = dom[...]
        while let r = rest.range(of: "<svg class=\"seq\"") {
            let tagEnd = rest[r.upperBound...].firstIndex(of: ">") ?? rest.endIndex
            let tag = rest[r.upperBound..<tagEnd]
            if let a = tag.range(of: "data-conns=\"") {
                let value = tag[a.upperBound...].prefix { $0 != "\"" }
                out.append(value.split(separator: " ").compactMap { ConnectionID($0) })
            } else {
                out.append([])
            }
            rest = rest[tagEnd...]
        }
        return out
    }

    /// Width, number of distinct colours and luminance variance of a PNG, decoded by Python's zlib
    /// (the test has no PNG decoder of its own; python3 is part of Debian's base).
    static func pngStatistics(_ path: String) throws -> (width: Int, distinctColors: Int, variance: Double) {
        guard Command.which("python3") != nil else { throw XCTSkip("python3 is not installed") }
        let script = """
        import struct, sys, zlib
        data = open(sys.argv[1], 'rb').read()
        assert data[:8] == b'\\x89PNG\\r\\n\\x1a\\n'
        pos, idat = 8, b''
        while pos < len(data):
            n, kind = struct.unpack('>I4s', data[pos:pos+8]); body = data[pos+8:pos+8+n]; pos += 12 + n
            if kind == b'IHDR': w, h, depth, ctype = struct.unpack('>IIBB', body[:10])
            if kind == b'IDAT': idat += body
        bpp = {2: 3, 6: 4}[ctype]; stride = w * bpp; raw = zlib.decompress(idat)
        prev = bytearray(stride); colors = set(); total = 0.0; total2 = 0.0; count = 0
        for y in range(h):
            f = raw[y * (stride + 1)]; line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0; b = prev[i]; c = prev[i - bpp] if i >= bpp else 0
                if f == 1: line[i] = (line[i] + a) & 255
                elif f == 2: line[i] = (line[i] + b) & 255
                elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
                elif f == 4:
                    p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    line[i] = (line[i] + (a if pa <= pb and pa <= pc else (b if pb <= pc else c))) & 255
            if y % 4 == 0:
                for x in range(0, w, 2):
                    r, g, bl = line[x * bpp:x * bpp + 3]; colors.add((r, g, bl))
                    lum = 0.299 * r + 0.587 * g + 0.114 * bl; total += lum; total2 += lum * lum; count += 1
            prev = line
        mean = total / count
        print(w, len(colors), total2 / count - mean * mean)
        """
        let r = try Command.run(["python3", "-c", script, path])
        XCTAssertTrue(r.ok, r.stderr)
        let parts = r.stdout.split(separator: " ").map { String($0).trimmingCharacters(in: .whitespacesAndNewlines) }
        guard parts.count == 3, let w = Int(parts[0]), let c = Int(parts[1]), let v = Double(parts[2]) else {
            XCTFail("png statistics: \(r.stdout) \(r.stderr)"); return (0, 0, 0)
        }
        return (w, c, v)
    }
}

final class HTMLDiagramBudgetTests: XCTestCase {
    func testPastTheBudgetConnectionsAreListedNotDrawnButEscapesAlwaysAre() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("mt-budget-\(getpid()).html").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        var scenario = ReportScenario.standard(extraOutbound: 6)
        // Move the escape to the end, past the budget.
        let escape = scenario.timelines.remove(at: scenario.timelines.firstIndex { $0.id == scenario.findings[0].connection }!)
        scenario.timelines.append(escape)
        let sink = try HTMLReport(path: path, ruleset: scenario.ruleset, maxDiagrams: 3)
        for f in scenario.findings { sink.finding(f) }
        try scenario.play(into: sink)
        let html = try String(contentsOfFile: path, encoding: .utf8)
        let drawn = BrowserChecks.diagrams(in: html)
        XCTAssertEqual(drawn.count, 4, "three within the budget, and the escape past it")
        XCTAssertEqual(drawn.first, [escape.id], "escape first")
        let flows = 5 + 6
        XCTAssertTrue(html.contains("\(flows - 4) more flows are listed in the index but not drawn"), html)
        let rows = html.components(separatedBy: "not drawn</span></td>").count - 1
        XCTAssertEqual(rows, scenario.timelines.count - drawn.flatMap { $0 }.count, "every undrawn connection says so in the index")
    }

    /// The rule-hit table has a kernel-counter column for a live trace, even when no twin was left to read a counter
    /// from (each row says "–"), and none for files. The page decided "live" by the counters being there, the JSON by
    /// `AnalysisSummary.live`: one notion now.
    func testTheKernelCounterColumnIsForLiveTracesEvenWithNoCounterLeft() throws {
        func page(live: Bool, counters: [String: UInt64]) throws -> String {
            let path = FileManager.default.temporaryDirectory.appendingPathComponent("mt-live-\(getpid())-\(live).html").path
            defer { try? FileManager.default.removeItem(atPath: path) }
            let scenario = ReportScenario.standard(extraOutbound: 0)
            var summary = scenario.summary
            summary.ruleHits = [(prefix: "mt:4:nat:OUTPUT:1:45fb", tag: nil, rule: nil, count: 7)]
            summary.live = live
            summary.kernelCounters = counters
            let sink = try HTMLReport(path: path, ruleset: scenario.ruleset)
            for t in scenario.timelines { sink.connection(t) }
            try sink.finish(summary)
            return try String(contentsOfFile: path, encoding: .utf8)
        }
        XCTAssertTrue(try page(live: true, counters: ["mt:4:nat:OUTPUT:1:45fb": 7]).contains("<th>kernel counter</th>"))
        let gone = try page(live: true, counters: [:])
        XCTAssertTrue(gone.contains("<th>kernel counter</th>"), "a live trace whose twins were all gone")
        XCTAssertTrue(gone.contains(">–</td>"))
        XCTAssertFalse(try page(live: false, counters: [:]).contains("kernel counter"))
    }
}
