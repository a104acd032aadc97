import Foundation

// `meshtrace verify --html FILE`: the static verdicts as a page. Escapes first (with the rule path that
// proves each), then bypasses by design, then the classes ztunnel captures; and the ruleset drawn as a
// flow. It takes plain rows, so any verifier result maps onto it without this file knowing its types.

/// One class of packet and what the ruleset does with it.
public struct VerdictRow: Sendable {
    public enum Outcome: String, Sendable, CaseIterable {
        /// Leaves the pod without passing ztunnel, and no design reason explains it.
        case escape
        /// Passes uncaptured for a reason Istio intends (probe, loopback, non-DNS UDP, ...).
        case bypass
        /// Redirected to ztunnel (15001, 15006, 15008, 15053).
        case captured
    }
    /// "IPv4 TCP app → remote, dport other, no mark".
    public var packetClass: String
    public var outcome: Outcome
    /// "captured by ztunnel (15001)", "bypass by design (kubelet probe)", "escape".
    public var verdict: String
    /// The rules walked, in kernel order: "nat OUTPUT #1 -j ISTIO_OUTPUT", "nat ISTIO_OUTPUT #4 REDIRECT :15001".
    public var path: [String]
    /// True when a site policy accepts this class (it still shows, marked as accepted).
    public var acceptedByPolicy: Bool

    public init(packetClass: String, outcome: Outcome, verdict: String, path: [String], acceptedByPolicy: Bool = false) {
        self.packetClass = packetClass; self.outcome = outcome; self.verdict = verdict; self.path = path
        self.acceptedByPolicy = acceptedByPolicy
    }
}

public enum HTMLVerificationReport {
    public static func write(path: String, title: String, ruleset: Ruleset?, rows: [VerdictRow], notes: [String] = []) throws {
        let out = try BufferedFileOutput(path: path)
        func put(_ s: String) throws { try out.append(Array(s.utf8)) }
        func rank(_ r: VerdictRow) -> Int {
            switch r.outcome {
            case .escape: return r.acceptedByPolicy ? 1 : 0
            case .bypass: return 2
            case .captured: return 3
            }
        }
        let sorted = rows.enumerated().sorted { a, b in
            rank(a.element) != rank(b.element) ? rank(a.element) < rank(b.element) : a.offset < b.offset
        }.map(\.element)
        let escapes = rows.filter { $0.outcome == .escape && !$0.acceptedByPolicy }
        let accepted = rows.filter { $0.outcome == .escape && $0.acceptedByPolicy }

        try put(HTML.head(title: title))
        try put("<header class=\"top\"><h1>\(HTML.escape(title))</h1><div class=\"sub\">meshtrace verify · generated \(HTML.escape(HTMLReportPage.now()))")
        if let r = ruleset { try put(" · rules from \(HTML.escape(r.origin))") }
        try put("</div></header><main>\n<section id=\"summary\"><h2>Summary</h2>")
        for e in escapes.prefix(HTMLReportPage.findingsListed) {
            try put("<div class=\"finding\"><span class=\"cls\">escape</span> \(HTML.escape(e.packetClass))<div>\(HTML.escape(e.verdict))</div><div class=\"mono muted\">\(HTML.escape(e.path.joined(separator: "  →  ")))</div></div>")
        }
        if escapes.count > HTMLReportPage.findingsListed {
            try put("<p class=\"muted\">\(escapes.count - HTMLReportPage.findingsListed) more escapes in the table below.</p>")
        }
        if escapes.isEmpty {
            try put("<div class=\"clean\">No escape: every class of packet is captured by ztunnel or bypasses it by design\(accepted.isEmpty ? "" : " or by the site policy").</div>")
        }
        try put("<div class=\"stats\" style=\"margin-top:12px\">")
        func stat(_ label: String, _ v: Int, _ cls: String = "") throws { try put("<div class=\"stat \(cls)\"><b>\(formatCount(v))</b>\(label)</div>") }
        try stat("escapes", escapes.count, escapes.isEmpty ? "ok" : "esc")
        if !accepted.isEmpty { try stat("accepted by policy", accepted.count) }
        try stat("bypass by design", rows.filter { $0.outcome == .bypass }.count)
        try stat("captured by ztunnel", rows.filter { $0.outcome == .captured }.count)
        try stat("classes", rows.count)
        try put("</div>")
        if !notes.isEmpty { try put("<ul>" + notes.map { "<li>\(HTML.escape($0))</li>" }.joined() + "</ul>") }
        try put("</section>\n")

        try put("<section id=\"verdicts\"><h2>Verdict per class of packet</h2><table><thead><tr><th>class</th><th>verdict</th><th>rule path</th></tr></thead><tbody>")
        for r in sorted {
            let cls = r.outcome == .escape && !r.acceptedByPolicy ? "esc" : (r.outcome == .bypass || r.acceptedByPolicy ? "bypass" : "")
            let pill = r.outcome == .escape ? (r.acceptedByPolicy ? "warn" : "esc") : (r.outcome == .bypass ? "warn" : "ok")
            try put("<tr class=\"\(cls)\" data-outcome=\"\(r.outcome.rawValue)\"><td>\(HTML.escape(r.packetClass))</td><td><span class=\"pill \(pill)\">\(HTML.escape(r.verdict))\(r.acceptedByPolicy ? " (accepted by policy)" : "")</span></td><td class=\"mono\">\(HTML.escape(r.path.joined(separator: "  →  ")))</td></tr>")
        }
        try put("</tbody></table></section>\n")
        if let r = ruleset {
            try put("<section id=\"rules\"><h2>Rules as the kernel walks them</h2><div class=\"scroll\">")
            try put(RuleFlowDiagram.render(r, hits: nil))
            try put("</div></section>\n")
        }
        try put("</main></body></html>\n")
        try out.close()
    }
}

// The verifier's result as rows: the smallest adapter, so the page does not depend on the verifier's types.
extension VerdictRow {
    public init(_ v: ClassVerdict) {
        let outcome: Outcome
        switch v.verdict {
        case .escape, .loop: outcome = .escape
        case .bypass, .dropped: outcome = .bypass
        case .captured: outcome = .captured
        }
        let assumed = v.uncertainty.map { "assumed: \($0)" }
        self.init(packetClass: "\(v.packetClass)  (\(v.packet))", outcome: outcome, verdict: v.verdict.summary,
                  path: v.path + assumed, acceptedByPolicy: v.verdict.isFailure && v.acceptedBy != nil)
    }
}

extension Reporter {
    /// `meshtrace verify --html FILE` from the verifier's report.
    public static func writeVerificationHTML(config: OutputConfig, report: VerifyReport, ruleset: Ruleset?,
                                             title: String? = nil) throws {
        let notes = report.findings.map { "\($0.severity.rawValue): \($0.message)" }
        try writeVerificationHTML(config: config, ruleset: ruleset, rows: report.results.map(VerdictRow.init),
                                  title: title ?? "meshtrace verify \(report.origin)", notes: notes)
    }
}
