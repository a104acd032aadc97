import Foundation

// `meshtrace verify` output: escapes first with the rule path that proves each, then what is captured and what
// passes by design, grouped. `--json` gives the same as one object (schema in docs/VERIFY.md).

extension VerifyReport {
    public func text(showAll: Bool = false) -> String {
        var out = "ruleset: \(origin)\n"
        out += "variant: \(variant.summary)\n"
        out += "families evaluated: \(families.map { $0 == .ipv6 ? "IPv6" : "IPv4" }.joined(separator: ", ")); \(results.count) packet classes\n"
        let problems = findings.filter { $0.severity == .problem }
        if !problems.isEmpty {
            out += "\nstructural problems (meshtrace rules shows them in place):\n"
            for f in problems { out += "  [\(f.kind.rawValue)] \(f.message)\n" }
        }
        let failures = results.filter { $0.verdict.isFailure }
        if failures.isEmpty {
            out += "\nno escape: every class is captured by ztunnel or passes by design\n"
        } else {
            // One block per escape code and verdict text; the classes listed under it.
            out += "\n\(escapes.count) ESCAPE class(es)\(accepted.isEmpty ? "" : ", \(accepted.count) accepted (policy or built-in)"):\n"
            let groups = Dictionary(grouping: failures, by: { "\($0.acceptedBy == nil ? 0 : 1)|\($0.verdict.summary)" })
            for key in groups.keys.sorted() {
                let list = groups[key]!
                let first = list[0]
                out += "\n  \(first.acceptedBy == nil ? "✗" : "✓ accepted") \(first.verdict.summary)\n"
                if let a = first.acceptedBy { out += "    by \(a)\n" }
                out += "    classes (\(list.count)): \(list.prefix(8).map(\.packetClass.id).joined(separator: ", "))\(list.count > 8 ? ", …" : "")\n"
                out += "    e.g. \(first.packet)\n"
                out += "    rule path:\(first.path.isEmpty ? " no rule matched (chain policies ACCEPT)" : "")\n"
                for s in first.path { out += "      \(s)\n" }
                for u in first.uncertainty { out += "    uncertain: \(u)\n" }
            }
        }
        out += "\nverdicts by kind:\n"
        let byVerdict = Dictionary(grouping: results.filter { !$0.verdict.isFailure }, by: { $0.verdict.summary })
        for key in byVerdict.keys.sorted() {
            let list = byVerdict[key]!
            out += "  \(String(format: "%4d", list.count))  \(key)\n"
            if showAll {
                for r in list { out += "          \(r.packetClass.id)\n" }
            } else {
                out += "          e.g. \(list.prefix(3).map(\.packetClass.id).joined(separator: ", "))\(list.count > 3 ? ", …" : "")\n"
            }
        }
        out += escapes.isEmpty ? "\nresult: clean\n" : "\nresult: \(escapes.count) escape class(es)\n"
        return out
    }

    public func json() -> String {
        let root: [String: Any] = [
            "origin": origin,
            "variant": variant.summary,
            "families": families.map { $0 == .ipv6 ? "ipv6" : "ipv4" },
            "escapes": escapes.count,
            "accepted": accepted.count,
            "result": escapes.isEmpty ? "clean" : "escape",
            "findings": findings.map { ["kind": $0.kind.rawValue, "severity": $0.severity.rawValue, "message": $0.message] },
            "classes": results.map { r -> [String: Any] in
                var d: [String: Any] = [
                    "class": r.packetClass.id, "verdict": r.verdict.kind, "summary": r.verdict.summary,
                    "packet": r.packet, "path": r.path,
                ]
                switch r.verdict {
                case .captured(let p): d["port"] = Int(p)
                case .bypass(let why), .dropped(let why), .loop(let why): d["reason"] = why
                case .escape(let code, let why): d["code"] = code; d["reason"] = why
                }
                if let c = r.verdict.code, case .loop = r.verdict { d["code"] = c }
                if !r.uncertainty.isEmpty { d["uncertain"] = r.uncertainty }
                if let a = r.acceptedBy { d["acceptedBy"] = a }
                return d
            },
        ]
        return RulesetReport.serialize(root)
    }
}
