import Foundation
#if canImport(Glibc)
import Glibc
#endif

// `--html FILE`: one self-contained page. Escape findings first, then the totals and per-rule hits, the
// ruleset as a flow, a connection index and one sequence diagram per flow (a connection, or the two
// connections of a ztunnel hop drawn together).
//
// Memory stays bounded as the run grows: each flow's diagram is drawn as soon as its connections are
// finished and spooled to a temporary file; only a short index entry per connection stays in memory.
// The page is assembled in `finish`. Paging keeps a 10k-connection page usable: the first page of
// diagrams and of the index is in the markup, the other pages are stored in the page (diagrams as inert
// markup, the index as JSON) and shown page by page; past `maxDiagrams` connections are listed, not drawn.
// A connection whose hop partner has not finished yet waits (at most `maxPendingHops` of them) so that
// both sides of the hop land in one diagram.

public final class HTMLReport: ReportSink {
    public static let flowsPerPage = 10
    public static let connectionsPerPage = 100
    public static let maxPendingHops = 256
    /// Diagrams kept for the page (escapes drawn past it). Beyond it connections are listed, not drawn:
    /// a diagram is 5-15 kB, and a page of tens of megabytes is no longer one a browser opens quickly.
    public static let defaultMaxDiagrams = 2000
    public let maxDiagrams: Int

    public let path: String
    private let title: String
    /// Drawn as the rule flow; settable until `finish` (a live trace knows its ruleset only once it ran).
    public var ruleset: Ruleset?
    private let spoolPath: String
    private var spool: BufferedFileOutput?
    private var flows: [Flow] = []
    private var index: [IndexEntry] = []
    fileprivate var flowOfConnection: [ConnectionID: Int] = [:]
    private var pending: [ConnectionID: ConnectionTimeline] = [:]
    private var pendingOrder: [ConnectionID] = []
    private var findings: [EscapeFinding] = []
    private var escapeConnections: Set<ConnectionID> = []
    private var finished = false

    struct Flow {
        var offset: UInt64
        /// 0: over the diagram budget, not drawn.
        var length: Int
        var connections: [ConnectionID]
        var heading: String
        var details: [String]
        var hops: [ZtunnelHop]
    }

    struct IndexEntry {
        var id: ConnectionID
        var kind: ConnectionKind
        var tuple: String
        var packets: Int
        var hop: String
        var flow: Int
    }

    public init(path: String, title: String = "meshtrace report", ruleset: Ruleset? = nil,
                maxDiagrams: Int = HTMLReport.defaultMaxDiagrams) throws {
        self.path = path; self.title = title; self.ruleset = ruleset; self.maxDiagrams = max(1, maxDiagrams)
        spoolPath = path + ".meshtrace-spool-\(getpid())"
        // Fail now, not after an hour of tracing, when the report cannot be written (and name the report, not
        // the spool beside it, when its directory is missing).
        let probe = try BufferedFileOutput(path: path)
        try probe.close()
        spool = try BufferedFileOutput(path: spoolPath)
    }

    deinit { if !finished { unlink(spoolPath) } }

    public func finding(_ finding: EscapeFinding) {
        findings.append(finding)
        if finding.isEscape, let c = finding.connection { escapeConnections.insert(c) }
    }

    public func connection(_ timeline: ConnectionTimeline) {
        let partners = timeline.hops.flatMap { [$0.outer, $0.inner] }.filter { $0 != timeline.id }
        if let p = partners.first(where: { pending[$0] != nil }), let other = pending.removeValue(forKey: p) {
            pendingOrder.removeAll { $0 == p }
            let outerFirst = timeline.hops.contains { $0.outer == timeline.id }
            draw(outerFirst ? [timeline, other] : [other, timeline])
        } else if !partners.isEmpty, partners.allSatisfy({ flowOfConnection[$0] == nil }) {
            if pending.count >= HTMLReport.maxPendingHops, let oldest = pendingOrder.first {
                pendingOrder.removeFirst()
                if let t = pending.removeValue(forKey: oldest) { draw([t]) }
            }
            pending[timeline.id] = timeline
            pendingOrder.append(timeline.id)
        } else {
            draw([timeline])
        }
    }

    public func finish(_ summary: AnalysisSummary) throws {
        guard !finished else { return }
        defer { finished = true; unlink(spoolPath) }
        for id in pendingOrder { if let t = pending[id] { draw([t]) } }
        pending.removeAll(); pendingOrder.removeAll()
        if let spoolError { throw MeshtraceError.badInput("HTML report \(path) not written: \(spoolError)") }
        try spool?.close()
        spool = nil
        let allFindings = summary.findings.isEmpty ? findings : summary.findings
        try HTMLReportPage(report: self, summary: summary, findings: allFindings).write()
    }

    // MARK: drawing flows

    private var spoolError: Error?
    private var drawnFlows = 0

    private func draw(_ timelines: [ConnectionTimeline]) {
        guard let spool else { return }
        let offset = spool.bytesWritten
        var length = 0
        if drawnFlows < maxDiagrams || timelines.contains(where: { escapeConnections.contains($0.id) }) {
            let bytes = Array(SequenceDiagram.render(timelines: timelines, escapes: escapeConnections).utf8)
            do { try spool.append(bytes) } catch { spoolError = error; self.spool = nil; return }
            length = bytes.count
            drawnFlows += 1
        }
        let flowIndex = flows.count
        var hops: [ZtunnelHop] = []
        var details: [String] = []
        for t in timelines {
            for h in t.hops where !hops.contains(where: { $0.outer == h.outer && $0.inner == h.inner }) { hops.append(h) }
            if let r = t.redirect { details.append("#\(t.id): " + SequenceDiagram.actionText(r)) }
            if !t.marks.isEmpty { details.append("#\(t.id) marks " + t.marks.map { "0x" + String($0, radix: 16) }.joined(separator: ", ")) }
            for e in t.icmpErrors { details.append("#\(t.id): ICMP \(e.message) from \(e.from)") }
            if t.refused { details.append("#\(t.id): refused (its SYN was answered by a RST)") }
            if t.endedEarly { details.append("#\(t.id): ended early (more connections were open than --max-open keeps)") }
            details.append("#\(t.id): \(t.packets) events, \(t.bytes) bytes captured, \(t.closed ? "closed" : "not closed")")
            for h in t.hops {
                let other = h.outer == t.id ? h.inner : h.outer
                if !timelines.contains(where: { $0.id == other }) {
                    details.append("#\(t.id) is joined to #\(other) (\(h.direction.rawValue) hop), drawn in its own diagram")
                }
            }
        }
        let heading = timelines.map { "#\($0.id) \($0.kind.rawValue)  \($0.original)" }.joined(separator: "   ⇄   ")
        // An undrawn flow keeps only what the index needs.
        flows.append(Flow(offset: offset, length: length, connections: timelines.map(\.id),
                          heading: length > 0 ? heading : "", details: length > 0 ? details : [], hops: length > 0 ? hops : []))
        for t in timelines {
            flowOfConnection[t.id] = flowIndex
            let hop = t.hops.map { h in
                let other = h.outer == t.id ? h.inner : h.outer
                return "ztunnel hop ⇄ #\(other) (\(h.direction.rawValue), \(h.confidence.rawValue))"
            }.joined(separator: "; ")
            index.append(IndexEntry(id: t.id, kind: t.kind, tuple: t.original.description, packets: t.packets, hop: hop, flow: flowIndex))
        }
    }

    // What the page writer reads.
    var pageTitle: String { title }
    var pageRuleset: Ruleset? { ruleset }
    var pageFlows: [Flow] { flows }
    var pageIndex: [IndexEntry] { index }
    var pageSpoolPath: String { spoolPath }
}

/// Writes the page of one `HTMLReport` run.
struct HTMLReportPage {
    static let findingsListed = 50
    let report: HTMLReport
    let summary: AnalysisSummary
    let findings: [EscapeFinding]

    func write() throws {
        let out = try BufferedFileOutput(path: report.path)
        func put(_ s: String) throws { try out.append(Array(s.utf8)) }
        var findingsOf: [ConnectionID: [EscapeFinding]] = [:]
        for f in findings { if let c = f.connection { findingsOf[c, default: []].append(f) } }
        let escapeConns = Set(findings.filter(\.isEscape).compactMap(\.connection))
        // Escape flows first, then the rest in the order they finished.
        let flows = report.pageFlows
        let drawn = flows.indices.filter { flows[$0].length > 0 }
        let order = drawn.filter { flows[$0].connections.contains(where: escapeConns.contains) }
            + drawn.filter { !flows[$0].connections.contains(where: escapeConns.contains) }
        // Position of each flow among the diagrams; -1 when it was not drawn.
        var position = [Int](repeating: -1, count: flows.count)
        for (p, f) in order.enumerated() { position[f] = p }

        try put(HTML.head(title: report.pageTitle))
        try put("<header class=\"top\"><h1>\(HTML.escape(report.pageTitle))</h1><div class=\"sub\">meshtrace report · generated \(HTML.escape(HTMLReportPage.now()))")
        if let r = report.pageRuleset { try put(" · rules from \(HTML.escape(r.origin))") }
        try put("</div></header><main>\n")

        try put(summarySection(findings: findings, position: { c in report.flowIndex(of: c).map { position[$0] }.flatMap { $0 >= 0 ? $0 : nil } }))
        try put(ruleHitsSection())
        if let r = report.pageRuleset {
            try put("<section id=\"rules\"><h2>Rules as the kernel walks them</h2><p class=\"muted\">One row per netfilter hook; base chains in priority order, the chains they jump to below them. Numbers are this run's hits. Hover a rule for its text and role.</p><div class=\"scroll\">")
            try put(RuleFlowDiagram.render(r, hits: RuleFlowDiagram.hitCounts(summary, ruleset: r)))
            try put("</div></section>\n")
        }

        // The connection index: escapes first, then by id.
        let entries = report.pageIndex.sorted { a, b in
            let ea = escapeConns.contains(a.id), eb = escapeConns.contains(b.id)
            return ea != eb ? ea : a.id < b.id
        }
        func findingLabel(_ id: ConnectionID) -> String {
            findingsOf[id]?.first(where: \.isEscape)?.findingClass.rawValue ?? ""
        }
        try put("<section id=\"connections\"><h2>Connections</h2>")
        try put("<div class=\"pager\"><button id=\"mt-conn-prev\" disabled>‹ prev</button><span id=\"mt-conn-page\">page 1 of \(max(1, (entries.count + HTMLReport.connectionsPerPage - 1) / HTMLReport.connectionsPerPage)) (\(entries.count) connections)</span><button id=\"mt-conn-next\"\(entries.count > HTMLReport.connectionsPerPage ? "" : " disabled")>next ›</button><input id=\"mt-conn-filter\" placeholder=\"filter: address, port, kind…\" aria-label=\"filter connections\"></div>")
        try put("<table><thead><tr><th>conn</th><th>kind</th><th>tuple (as the app sent it)</th><th>events</th><th>ztunnel hop</th><th></th></tr></thead><tbody id=\"mt-conn-rows\">")
        for e in entries.prefix(HTMLReport.connectionsPerPage) {
            let label = findingLabel(e.id)
            try put("<tr class=\"\(label.isEmpty ? "" : "esc")\"><td class=\"num\">#\(e.id)</td><td>\(e.kind.rawValue)</td><td class=\"mono\">\(HTML.escape(e.tuple))</td><td class=\"num\">\(e.packets)</td><td>\(HTML.escape(e.hop))</td><td>\(position[e.flow] >= 0 ? "<a href=\"#flow=\(position[e.flow])\" data-flow=\"\(position[e.flow])\">diagram</a>" : "<span class=\"muted\">not drawn</span>")\(label.isEmpty ? "" : " <span class=\"pill esc\">\(HTML.escape(label))</span>")</td></tr>")
        }
        try put("</tbody></table>")
        try put("<script type=\"application/json\" id=\"mt-conns\">[")
        for (i, e) in entries.enumerated() {
            try put((i == 0 ? "" : ",") + "[\(e.id),\(HTML.jsonString(e.kind.rawValue)),\(HTML.jsonString(e.tuple)),\(e.packets),\(HTML.jsonString(e.hop)),\(position[e.flow]),\(HTML.jsonString(findingLabel(e.id)))]")
        }
        try put("]</script></section>\n")

        // The diagrams: the first page in the markup, each further page as raw markup in an inert
        // `<script type="text/html">` (no JSON escaping: labels are HTML-escaped, so no "</script" can occur).
        let pages = max(1, (order.count + HTMLReport.flowsPerPage - 1) / HTMLReport.flowsPerPage)
        try put("<section id=\"diagrams\"><h2>Sequence diagrams</h2><p class=\"muted\">One diagram per connection; the two connections of a ztunnel hop share one. Lifelines: the app, netfilter (each arrow into it is a rule hit), ztunnel, and the peer. Replies are dashed; packets carrying a mark are orange; escapes are red.</p>")
        let undrawn = flows.count - order.count
        if undrawn > 0 {
            try put("<p class=\"muted\">\(formatCount(undrawn)) more flows are listed in the index but not drawn: the page keeps at most \(formatCount(report.maxDiagrams)) diagrams (escapes are always drawn). Analyse a narrower capture to see them.</p>")
        }
        try put("<div class=\"pager\"><button id=\"mt-flow-prev\" disabled>‹ prev</button><span id=\"mt-flow-page\">page 1 of \(pages) (\(order.count) diagrams)</span><button id=\"mt-flow-next\"\(pages > 1 ? "" : " disabled")>next ›</button></div>")
        try put("<div id=\"mt-diagrams\" data-flows=\"\(order.count)\">")
        let spool = try FileHandle(forReadingFrom: URL(fileURLWithPath: report.pageSpoolPath))
        defer { try? spool.close() }
        func flowHTML(_ f: Int) throws -> String {
            let flow = flows[f]
            try spool.seek(toOffset: flow.offset)
            let svg = String(decoding: spool.readData(ofLength: flow.length), as: UTF8.self)
            let isEscape = flow.connections.contains(where: escapeConns.contains)
            var h = "<div class=\"flow\(isEscape ? " escape" : "")\" id=\"flow-\(position[f])\" data-conns=\"\(flow.connections.map(String.init).joined(separator: " "))\">"
            h += "<h3>\(isEscape ? "<span class=\"pill esc\">ESCAPE</span> " : "")\(HTML.escape(flow.heading))</h3>"
            let hopText = flow.hops.map { "ztunnel hop \($0.direction.rawValue) #\($0.outer) → #\($0.inner), confidence \($0.confidence.rawValue)" }
            h += "<div class=\"muted\">\(HTML.escape((hopText + flow.details).joined(separator: " · ")))</div>"
            for c in flow.connections {
                for finding in findingsOf[c] ?? [] {
                    h += "<div class=\"finding\(finding.isEscape ? "" : " bydesign")\"><span class=\"cls\">\(finding.findingClass.rawValue)</span> \(HTML.escape(finding.summary))</div>"
                }
            }
            h += "<div class=\"scroll\">\(svg)</div>"
            let evidence = flow.hops.flatMap { $0.evidence }
            if !evidence.isEmpty {
                h += "<ul class=\"evidence\">" + evidence.map { "<li><b>\(HTML.escape($0.kind))</b>: \(HTML.escape($0.detail))</li>" }.joined() + "</ul>"
            }
            return h + "</div>"
        }
        for f in order.prefix(HTMLReport.flowsPerPage) { try put(try flowHTML(f)) }
        if flows.isEmpty { try put("<p class=\"muted\">No connections.</p>") }
        try put("</div>")
        for page in 1..<pages {
            try put("<script type=\"text/html\" id=\"mt-page-\(page + 1)\">")
            for f in order[(page * HTMLReport.flowsPerPage)..<min(order.count, (page + 1) * HTMLReport.flowsPerPage)] {
                try put(try flowHTML(f))
            }
            try put("</script>")
        }
        try put("</section>\n</main>\n<script>")
        try put(HTML.pagerScript.replacingOccurrences(of: "__FLOWS_PER_PAGE__", with: String(HTMLReport.flowsPerPage))
            .replacingOccurrences(of: "__CONNS_PER_PAGE__", with: String(HTMLReport.connectionsPerPage)))
        try put("</script>\n</body></html>\n")
        try out.close()
    }

    func summarySection(findings: [EscapeFinding], position: (ConnectionID) -> Int?) -> String {
        let escapes = findings.filter(\.isEscape), byDesign = findings.filter { !$0.isEscape }
        var s = "<section id=\"summary\"><h2>Summary</h2>"
        // A run with thousands of findings lists the first ones here; the index marks every one.
        let listed = Array(escapes.prefix(HTMLReportPage.findingsListed)) + Array(byDesign.prefix(max(0, HTMLReportPage.findingsListed - escapes.count)))
        for f in listed {
            s += "<div class=\"finding\(f.isEscape ? "" : " bydesign")\"><span class=\"cls\">\(f.isEscape ? "escape" : "by design") · \(f.findingClass.rawValue)</span> "
            s += HTML.escape(f.summary)
            s += "<div class=\"mono muted\">\(HTML.escape(f.tuple.description)) · confidence \(f.confidence.rawValue)"
            if !f.frames.isEmpty {
                let shown = f.frames.prefix(8).map { "input \($0.source) frame \($0.frame)" }.joined(separator: ", ")
                s += " · proof: \(HTML.escape(shown))\(f.frames.count > 8 ? " and \(f.frames.count - 8) more" : "")"
            }
            if let c = f.connection, let p = position(c) { s += " · <a href=\"#flow=\(p)\">connection #\(c)</a>" }
            s += "</div></div>"
        }
        if findings.count > listed.count {
            s += "<p class=\"muted\">\(findings.count - listed.count) more findings are not listed here; the connection index marks every escape.</p>"
        }
        if escapes.isEmpty { s += "<div class=\"clean\">No escape found: every connection seen either passed ztunnel or bypassed it by design.</div>" }
        s += "<div class=\"stats\" style=\"margin-top:12px\">"
        func stat(_ label: String, _ v: Int, _ cls: String = "") { s += "<div class=\"stat \(cls)\"><b>\(formatCount(v))</b>\(label)</div>" }
        stat("escapes", escapes.count, escapes.isEmpty ? "ok" : "esc")
        stat("by design", byDesign.count)
        stat("connections", summary.connections)
        stat("ztunnel hops", summary.hops)
        stat("frames read", summary.packets)
        stat("of them NFLOG records", summary.nflogRecords)
        if summary.traceSteps > 0 { stat("of them TRACE steps", summary.traceSteps) }
        if summary.damagedPackets > 0 { stat("damaged packets", summary.damagedPackets, "esc") }
        if summary.lateRecords > 0 { stat("records out of time order", summary.lateRecords, "esc") }
        if summary.connectionsEndedEarly > 0 { stat("connections ended early (too many open)", summary.connectionsEndedEarly, "esc") }
        if summary.eventsLost > 0 { stat("events lost", summary.eventsLost, "esc") }
        s += "</div>"
        if !summary.fileDamage.isEmpty {
            s += "<ul>" + summary.fileDamage.map { "<li>\(HTML.escape($0))</li>" }.joined() + "</ul>"
        }
        return s + "</section>\n"
    }

    func ruleHitsSection() -> String {
        guard !summary.ruleHits.isEmpty else { return "" }
        var s = "<section id=\"hits\"><h2>Rule hits</h2><table><thead><tr><th>rule</th><th>role</th><th>hits</th>"
        let live = summary.live
        if live { s += "<th>kernel counter</th>" }
        s += "</tr></thead><tbody>"
        for h in summary.ruleHits.sorted(by: { $0.count > $1.count }) {
            let rule = h.rule ?? h.tag.flatMap { t in report.pageRuleset?.rule(for: t) }
            let name = rule.map { "\(h.tag?.backendWord ?? "")\($0.table) \($0.text)" } ?? h.prefix
            var role = rule?.role.rawValue ?? ""
            if rule == nil, let tag = h.tag {
                switch tag.position {
                case .observeIn: role = "observation point (every packet in)"
                case .observeOut: role = "observation point (every packet out)"
                case .rule: break
                }
            }
            s += "<tr><td class=\"mono\" title=\"\(HTML.escape(h.prefix))\">\(HTML.escape(name))</td><td>\(HTML.escape(role))</td><td class=\"num\">\(formatCount(h.count))</td>"
            if live {
                let k = summary.kernelCounters[h.prefix]
                let differs = k.map { Int($0) != h.count } ?? false
                s += "<td class=\"num\"\(differs ? " style=\"color:var(--esc)\"" : "")>\(k.map { formatCount(Int($0)) } ?? "–")</td>"
            }
            s += "</tr>"
        }
        return s + "</tbody></table></section>\n"
    }

    static func now() -> String {
        let f = ISO8601DateFormatter()
        return f.string(from: Date())
    }
}

extension HTMLReport {
    func flowIndex(of connection: ConnectionID) -> Int? { flowOfConnection[connection] }
}
