import Foundation

// `meshtrace rules` output: the ruleset as a person reads it (text), and the same as one JSON object.
// The schema is in docs/RULES.md.

public enum RulesetReport {
    public static func text(_ rs: Ruleset, _ a: RulesetAnalysis) -> String {
        var out = "ruleset: \(rs.origin)\n"
        out += "variant: \(a.variant.summary)\n"
        if !a.variant.probeAddresses.isEmpty {
            out += "probe address: \(a.variant.probeAddresses.map(\.description).joined(separator: ", "))\n"
        }
        let flagged = Dictionary(grouping: a.findings.filter { $0.rule != nil }, by: { ruleKey($0.rule!) })
        for t in rs.tables {
            let hasRules = t.chains.contains { !$0.rules.isEmpty }
            guard hasRules else { continue }
            out += "\n\(familyLabel(t)) table \(t.name) [\(t.backend.rawValue)]\n"
            for c in t.chains where !c.rules.isEmpty || AmbientLabeler.isAmbientChain(table: t, chain: c.name) {
                var head = "  chain \(c.name)"
                if let h = c.hook { head += " (hook \(h.description.lowercased())" + (c.priority.map { ", priority \($0)" } ?? "") + (c.policy.map { ", policy \(targetWord($0))" } ?? "") + ")" }
                out += head + "\n"
                if c.rules.isEmpty { out += "    (empty)\n" }
                for r in c.rules {
                    let mark = r.isMeshtraceRule ? "·" : (flagged[ruleKey(r)] != nil ? "!" : " ")
                    out += "  \(mark)\(pad(String(r.position), 3)) \(pad(r.role.rawValue, 26)) \(r.text)\n"
                    if r.role != .other && r.role != .foreign && !r.isMeshtraceRule {
                        out += "      \(String(repeating: " ", count: 26)) → \(r.role.summary)\n"
                    }
                }
            }
        }
        out += "\n"
        if a.findings.isEmpty {
            out += "findings: none — the ruleset is what ambient writes for this variant\n"
        } else {
            out += "findings (\(a.problems.count) problem(s), \(a.findings.count - a.problems.count) note(s)):\n"
            for f in a.findings.sorted(by: { ($0.severity == .problem ? 0 : 1) < ($1.severity == .problem ? 0 : 1) }) {
                let loc = f.rule.map { $0.line > 0 ? " (line \($0.line))" : "" } ?? ""
                out += "  \(f.severity == .problem ? "PROBLEM" : "note   ") [\(f.kind.rawValue)] \(f.message)\(loc)\n"
            }
        }
        return out
    }

    public static func json(_ rs: Ruleset, _ a: RulesetAnalysis) -> String {
        let v = a.variant
        var root: [String: Any] = [
            "origin": rs.origin,
            "variant": [
                "ambient": v.isAmbient, "era": v.era.rawValue, "dnsCapture": v.dnsCapture, "ingressMode": v.ingressMode,
                "virtualInterfaces": v.virtualInterfaces, "ipv4": v.ipv4, "ipv6": v.ipv6,
                "backends": v.backends.map(\.rawValue), "hostProbeRules": v.hostProbeRules,
                "probeAddresses": v.probeAddresses.map(\.description), "summary": v.summary,
            ] as [String: Any],
        ]
        root["tables"] = rs.tables.map { t -> [String: Any] in
            [
                "name": t.name, "family": t.family.rawValue, "backend": t.backend.rawValue,
                "chains": t.chains.map { c -> [String: Any] in
                    var d: [String: Any] = ["name": c.name, "ambient": AmbientLabeler.isAmbientChain(table: t, chain: c.name)]
                    if let h = c.hook { d["hook"] = h.description.lowercased() }
                    if let p = c.priority { d["priority"] = p }
                    if let p = c.policy { d["policy"] = targetWord(p) }
                    d["rules"] = c.rules.map { ruleJSON($0) }
                    return d
                },
            ]
        }
        root["findings"] = a.findings.map { f -> [String: Any] in
            var d: [String: Any] = ["kind": f.kind.rawValue, "severity": f.severity.rawValue, "message": f.message]
            if let r = f.rule { d["rule"] = ["table": r.table, "chain": r.chain, "position": r.position, "line": r.line] as [String: Any] }
            return d
        }
        return serialize(root)
    }

    public static func ruleJSON(_ r: Rule) -> [String: Any] {
        var d: [String: Any] = [
            "position": r.position, "role": r.role.rawValue, "roleSummary": r.role.summary, "text": r.text,
            "match": r.matchText, "target": targetWord(r.target), "family": r.family.rawValue, "meshtrace": r.isMeshtraceRule,
        ]
        if r.line > 0 { d["line"] = r.line }
        if let h = r.handle { d["handle"] = h }
        return d
    }

    public static func serialize(_ obj: Any) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys, .withoutEscapingSlashes]) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    static func ruleKey(_ r: Rule) -> String { "\(r.table)|\(r.family.rawValue)|\(r.backend.rawValue)|\(r.chain)|\(r.position)|\(r.text)" }

    static func familyLabel(_ t: Table) -> String {
        switch (t.backend, t.family) {
        case (.nftables, _): return "nft \(t.family == .inet ? "inet" : (t.family == .ipv6 ? "ip6" : "ip"))"
        case (_, .ipv6): return "ip6tables"
        default: return "iptables"
        }
    }

    /// A short name for a target: ACCEPT, REDIRECT :15001, CONNMARK set 0x111/0xfff, ...
    public static func targetWord(_ t: RuleTarget) -> String {
        func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }
        switch t {
        case .accept: return "ACCEPT"
        case .drop: return "DROP"
        case .reject: return "REJECT"
        case .return: return "RETURN"
        case .jump(let c): return "jump \(c)"
        case .goto(let c): return "goto \(c)"
        case .redirect(let p): return "REDIRECT" + (p.map { " :\($0)" } ?? "")
        case .tproxy(let p, _, let m, let k): return "TPROXY :\(p)" + (m.map { " mark \(hex($0))/\(hex(k ?? 0xffff_ffff))" } ?? "")
        case .dnat(let s): return "DNAT \(s)"
        case .snat(let s): return "SNAT \(s)"
        case .masquerade: return "MASQUERADE"
        case .setMark(let v, let m): return "MARK set \(hex(v))/\(hex(m))"
        case .connmarkSet(let v, let m): return "CONNMARK set \(hex(v))/\(hex(m))"
        case .connmarkRestore(let n, let c): return "CONNMARK restore nfmask \(hex(n)) ctmask \(hex(c))"
        case .connmarkSave: return "CONNMARK save"
        case .ctZone(let z): return "CT zone \(z)"
        case .nflog(let g, let p): return "NFLOG group \(g) prefix \"\(p)\""
        case .log(let p): return "LOG prefix \"\(p)\""
        case .trace: return "TRACE"
        case .counterOnly: return "(no verdict)"
        case .unknown(let s): return s
        }
    }

    static func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
}

/// The chain flow as Graphviz DOT: hooks → base chains (in priority order) → rules with their roles → jumps.
public enum RulesetGraph {
    public static func dot(_ rs: Ruleset) -> String {
        var out = "digraph meshtrace_rules {\n  rankdir=LR;\n  node [fontname=\"monospace\", fontsize=10, shape=box];\n"
        func id(_ s: String) -> String {
            "n" + String(RuleTag.fnv1a32(s), radix: 16)
        }
        func esc(_ s: String) -> String {
            s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
                .replacingOccurrences(of: "<", with: "\\<").replacingOccurrences(of: ">", with: "\\>")
                .replacingOccurrences(of: "{", with: "\\{").replacingOccurrences(of: "}", with: "\\}")
                .replacingOccurrences(of: "|", with: "\\|")
        }
        var hooks: [NetfilterHook: [(Int, String, String)]] = [:]
        for t in rs.tables {
            let tk = "\(t.backend.rawValue)/\(t.family.rawValue)/\(t.name)"
            out += "  subgraph \"cluster_\(esc(tk))\" {\n    label=\"\(esc(RulesetReport.familyLabel(t))) \(esc(t.name)) [\(t.backend.rawValue)]\";\n"
            for c in t.chains where !(c.rules.isEmpty && c.hook != nil) {
                let ck = tk + "/" + c.name
                var label = "<h>\(esc(c.name))"
                for (i, r) in c.rules.enumerated() {
                    label += "|<r\(i)>\(r.position). \(esc(r.role.rawValue)): \(esc(String(r.text.prefix(90))))"
                }
                let ambient = AmbientLabeler.isAmbientChain(table: t, chain: c.name)
                out += "    \(id(ck)) [shape=record, label=\"\(label)\"\(ambient ? ", style=filled, fillcolor=\"#e8f0ff\"" : "")];\n"
                if let h = c.hook { hooks[h, default: []].append((c.priority ?? 0, ck, "\(t.name) \(c.name)")) }
            }
            out += "  }\n"
            for c in t.chains {
                let ck = tk + "/" + c.name
                for (i, r) in c.rules.enumerated() {
                    switch r.target {
                    case .jump(let n), .goto(let n):
                        out += "  \(id(ck)):r\(i) -> \(id(tk + "/" + n)):h\(r.target == .goto(n) ? " [style=dashed]" : "");\n"
                    default: break
                    }
                }
            }
        }
        for h in [NetfilterHook.prerouting, .input, .forward, .output, .postrouting, .ingress] {
            guard let list = hooks[h]?.sorted(by: { $0.0 < $1.0 }) else { continue }
            let hid = "hook_\(h.description)"
            out += "  \(hid) [shape=ellipse, style=filled, fillcolor=\"#ffe9b0\", label=\"\(h.description)\"];\n"
            var prev = hid
            for (prio, ck, _) in list {
                out += "  \(prev) -> \(id(ck)):h [label=\"\(prio)\"];\n"
                prev = id(ck) + ":h"
            }
        }
        out += "}\n"
        return out
    }

    /// Writes DOT, or SVG through `dot -Tsvg` when the name ends in .svg.
    public static func write(dot: String, to path: String) throws {
        if path.hasSuffix(".svg") {
            let r = try Command.run(["dot", "-Tsvg", "-o", path], input: dot)
            guard r.ok else { throw MeshtraceError(.kernelRefused, "dot -Tsvg failed: \(r.stderr)") }
        } else {
            do { try dot.write(toFile: path, atomically: true, encoding: .utf8) }
            catch { throw MeshtraceError.badInput("cannot write \(path): \(error.localizedDescription)") }
        }
    }
}
