import Foundation

// The ruleset drawn as the kernel walks it: one row per netfilter hook; in each row the base chains of
// every table at that hook, in priority order (raw -300, mangle -150, nat -100, filter 0 for iptables;
// the chain's own priority for nft), joined by arrows; below each base chain the chains it jumps to.
// Every rule shows its position, a short form of its text (the whole text on hover), its ambient role,
// and how often it was hit in this run.

/// Identifies a rule across the ruleset and the run's hit counts.
struct RuleKey: Hashable {
    var table: String, chain: String, position: Int, family: RuleFamily
    init(_ r: Rule) { table = r.table; chain = r.chain; position = r.position; family = r.family }
}

struct RuleFlowDiagram {
    static let hookOrder: [NetfilterHook] = [.prerouting, .input, .forward, .output, .postrouting]
    static let columnWidth = 380
    static let columnGap = 36
    static let left = 130
    static let lineHeight = 16
    static let headerHeight = 24

    /// Hits per rule from the run's summary (by the rule the correlator named, else by the NFLOG prefix).
    static func hitCounts(_ summary: AnalysisSummary, ruleset: Ruleset) -> [RuleKey: Int] {
        var out: [RuleKey: Int] = [:]
        for h in summary.ruleHits {
            let rule = h.rule ?? h.tag.flatMap { ruleset.rule(for: $0) }
            if let rule { out[RuleKey(rule), default: 0] += h.count }
        }
        return out
    }

    static func priority(table: Table, chain: Chain) -> Int {
        if let p = chain.priority { return p }
        switch table.name {
        case "raw": return -300
        case "mangle": return -150
        case "nat": return chain.hook == .postrouting || chain.hook == .input ? 100 : -100
        case "security": return 50
        default: return 0
        }
    }

    struct Box {
        var table: Table
        var chain: Chain
        var depth: Int
        var y = 0
        var height: Int { RuleFlowDiagram.headerHeight + max(1, chain.rules.count) * RuleFlowDiagram.lineHeight + 8 }
    }

    /// `hits` nil: no counts (a static view, as in verify).
    static func render(_ ruleset: Ruleset, hits: [RuleKey: Int]?) -> String {
        struct Row { var hook: NetfilterHook; var columns: [[Box]] }
        var rows: [Row] = []
        for hook in hookOrder {
            var bases: [(Table, Chain, Int)] = []
            for t in ruleset.tables { for c in t.chains where c.hook == hook && !c.rules.isEmpty { bases.append((t, c, priority(table: t, chain: c))) } }
            if bases.isEmpty { continue }
            bases.sort { $0.2 < $1.2 }
            var columns: [[Box]] = []
            for (t, c, _) in bases {
                var column = [Box(table: t, chain: c, depth: 0)]
                var seen: Set<String> = [c.name]
                var queue = [c]
                // The chains this base chain reaches by jump/goto, in the order their jumps appear.
                while !queue.isEmpty {
                    let chain = queue.removeFirst()
                    for r in chain.rules {
                        var target: String? = nil
                        if case .jump(let n) = r.target { target = n }
                        if case .goto(let n) = r.target { target = n }
                        if let n = target, !seen.contains(n), let user = t.chain(n) {
                            seen.insert(n); column.append(Box(table: t, chain: user, depth: 1)); queue.append(user)
                        }
                    }
                }
                columns.append(column)
            }
            rows.append(Row(hook: hook, columns: columns))
        }
        guard !rows.isEmpty else { return "<p class=\"muted\">The ruleset has no rules in any base chain.</p>" }

        let maxColumns = rows.map(\.columns.count).max() ?? 1
        let width = left + maxColumns * (columnWidth + columnGap)
        var body = ""
        var y = 10
        for row in rows {
            var rowHeight = 0
            for (ci, column) in row.columns.enumerated() {
                let x = left + ci * (columnWidth + columnGap)
                var by = y
                var rowOfRule: [String: Int] = [:]  // chain name → y of the first rule jumping to it
                for box in column {
                    if box.depth > 0, let jy = rowOfRule[box.chain.name] {
                        body += "<path class=\"edge jump\" d=\"M\(x + 8),\(jy) h-14 V\(by + 12) h14\" marker-end=\"url(#rah)\"/>"
                    }
                    body += chainBox(box, x: x, y: by, hits: hits) { name, ry in if rowOfRule[name] == nil { rowOfRule[name] = ry } }
                    by += box.height + 14
                }
                rowHeight = max(rowHeight, by - y)
                if ci > 0 {
                    body += "<line class=\"edge\" x1=\"\(x - columnGap + 2)\" y1=\"\(y + 12)\" x2=\"\(x - 3)\" y2=\"\(y + 12)\" marker-end=\"url(#rah)\"/>"
                }
            }
            body += "<rect class=\"hook\" x=\"8\" y=\"\(y)\" width=\"\(left - 30)\" height=\"24\" rx=\"12\"/>"
            body += "<text class=\"hookname\" x=\"\(8 + (left - 30) / 2)\" y=\"\(y + 16)\" text-anchor=\"middle\">\(row.hook)</text>"
            body += "<line class=\"edge\" x1=\"\(left - 22)\" y1=\"\(y + 12)\" x2=\"\(left - 3)\" y2=\"\(y + 12)\" marker-end=\"url(#rah)\"/>"
            y += rowHeight + 12
        }
        let height = y
        var s = "<svg class=\"rules\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(width)\" height=\"\(height)\" viewBox=\"0 0 \(width) \(height)\" role=\"img\" aria-label=\"ruleset flow\">"
        s += "<defs><marker id=\"rah\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#7a8699\"/></marker></defs>"
        return s + body + "</svg>"
    }

    static func chainBox(_ box: Box, x: Int, y: Int, hits: [RuleKey: Int]?, jumpRow: (String, Int) -> Void) -> String {
        var s = "<rect class=\"chain\" x=\"\(x)\" y=\"\(y)\" width=\"\(columnWidth)\" height=\"\(box.height)\" rx=\"5\"/>"
        s += "<rect class=\"chainhead\" x=\"\(x + 1)\" y=\"\(y + 1)\" width=\"\(columnWidth - 2)\" height=\"\(headerHeight - 2)\" rx=\"4\"/>"
        var head = "\(box.table.name) · \(box.chain.name)"
        if let p = box.chain.policy, box.depth == 0 { head += " (policy \(targetText(p)))" }
        s += "<text class=\"chainname\" x=\"\(x + 8)\" y=\"\(y + 16)\">\(HTML.escape(head))</text>"
        if box.chain.rules.isEmpty {
            s += "<text class=\"note\" x=\"\(x + 8)\" y=\"\(y + headerHeight + 12)\">no rules</text>"
        }
        for (i, r) in box.chain.rules.enumerated() {
            let ry = y + headerHeight + i * lineHeight + 12
            let n = hits?[RuleKey(r)] ?? 0
            var line = "#\(r.position) \(short(r))"
            if line.count > 27 { line = String(line.prefix(26)) + "…" }
            let roleText = r.role == .other ? "" : r.role.rawValue
            let cls: String
            switch r.role {
            case .foreign: cls = "rule foreign"
            case .outboundCapture, .inboundCapture, .inboundCaptureTproxy, .inboundHboneTproxy, .dnsCapture, .virtualInterfaceCapture:
                cls = n > 0 ? "rule capture hot" : "rule capture"
            default: cls = n > 0 ? "rule hot" : "rule"
            }
            s += "<g><title>\(HTML.escape(r.text + "\n" + r.role.rawValue + ": " + r.role.summary + (hits == nil ? "" : "\n\(n) hits in this run")))</title>"
            s += "<text class=\"\(cls)\" x=\"\(x + 8)\" y=\"\(ry)\">\(HTML.escape(line))</text>"
            s += "<text class=\"note\" x=\"\(x + 214)\" y=\"\(ry)\">\(HTML.escape(roleText))</text>"
            if hits != nil {
                s += "<text class=\"\(n > 0 ? "rule hot" : "note")\" x=\"\(x + columnWidth - 8)\" y=\"\(ry)\" text-anchor=\"end\">\(n)</text>"
            }
            s += "</g>"
            if case .jump(let c) = r.target { jumpRow(c, ry - 4) }
            if case .goto(let c) = r.target { jumpRow(c, ry - 4) }
        }
        return s
    }

    /// "REDIRECT :15001 ! -d 127.0.0.1/32 -p tcp ...": the verdict first, then the match (cut in the box).
    static func short(_ r: Rule) -> String {
        let match = r.matchText.replacingOccurrences(of: " -m tcp", with: "").replacingOccurrences(of: "-m tcp ", with: "")
        return targetText(r.target) + (match.isEmpty ? "" : " " + match)
    }

    static func targetText(_ t: RuleTarget) -> String {
        switch t {
        case .accept: return "ACCEPT"
        case .drop: return "DROP"
        case .reject: return "REJECT"
        case .return: return "RETURN"
        case .jump(let c): return "→ \(c)"
        case .goto(let c): return "goto \(c)"
        case .redirect(let p): return "REDIRECT" + (p.map { " :\($0)" } ?? "")
        case .tproxy(let p, _, _, _): return "TPROXY :\(p)"
        case .dnat(let s): return "DNAT \(s)"
        case .snat(let s): return "SNAT \(s)"
        case .masquerade: return "MASQUERADE"
        case .setMark(let v, let m): return "MARK 0x\(String(v, radix: 16))/0x\(String(m, radix: 16))"
        case .connmarkSet(let v, let m): return "CONNMARK 0x\(String(v, radix: 16))/0x\(String(m, radix: 16))"
        case .connmarkRestore: return "CONNMARK restore"
        case .connmarkSave: return "CONNMARK save"
        case .ctZone(let z): return "CT zone \(z)"
        case .nflog(let g, _): return "NFLOG group \(g)"
        case .log: return "LOG"
        case .trace: return "TRACE"
        case .counterOnly: return "counter"
        case .unknown(let s): return s
        }
    }
}
