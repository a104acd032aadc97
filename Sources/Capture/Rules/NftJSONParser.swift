import Foundation

// `nft -j list ruleset` → the one model. The JSON is sturdier than the text (no wrapping, explicit operators,
// handles always present); each rule's expressions are rendered back to nft syntax so `text`/`matchText` read the
// same as from `nft list ruleset`, and then parsed by the one statement parser (one grammar, one place).

struct NftJSONParser {
    let origin: String
    var backend: RulesetBackend = .nftables

    func parse(_ text: String) throws -> Ruleset {
        let obj: Any
        do {
            obj = try JSONSerialization.jsonObject(with: Data(text.utf8), options: [])
        } catch {
            throw MeshtraceError.badInput("\(origin): not valid JSON (\((error as NSError).localizedDescription))")
        }
        guard let root = obj as? [String: Any], let items = root["nftables"] as? [Any] else {
            throw MeshtraceError.badInput("\(origin): JSON has no \"nftables\" array (expected `nft -j list ruleset` output)")
        }
        var tables: [Table] = []
        func tableIndex(_ fam: RuleFamily, _ name: String) -> Int? { tables.firstIndex { $0.family == fam && $0.name == name } }
        let families: [String: RuleFamily] = ["ip": .ipv4, "ip6": .ipv6, "inet": .inet]

        for (n, item) in items.enumerated() {
            let where_ = "\(origin) item \(n + 1)"
            guard let dict = item as? [String: Any], let (kind, body) = dict.first, dict.count == 1 else {
                throw MeshtraceError.badInput("\(where_): expected an object with one key")
            }
            guard let b = body as? [String: Any] else { continue }
            let famName = b["family"] as? String ?? ""
            switch kind {
            case "table":
                guard let fam = families[famName], let name = b["name"] as? String else { continue }
                if tableIndex(fam, name) == nil { tables.append(Table(name: name, family: fam, backend: backend)) }
            case "chain":
                guard let fam = families[famName] else { continue }
                guard let tname = b["table"] as? String, let name = b["name"] as? String, let ti = tableIndex(fam, tname) else {
                    throw MeshtraceError.badInput("\(where_): chain of an unknown table")
                }
                var chain = Chain(name: name)
                if let hook = b["hook"] as? String {
                    guard let h = NftTextParser.hook(hook) else { throw MeshtraceError.badInput("\(where_): unknown hook '\(hook)'") }
                    chain.hook = h
                    chain.type = b["type"] as? String
                    if let p = b["prio"] as? Int { chain.priority = p }
                    else if let p = b["prio"] as? String { chain.priority = NftTextParser.priority(p) }
                    chain.policy = (b["policy"] as? String) == "drop" ? .drop : .accept
                }
                tables[ti].chains.append(chain)
            case "rule":
                guard let fam = families[famName] else { continue }
                guard let tname = b["table"] as? String, let cname = b["chain"] as? String, let ti = tableIndex(fam, tname),
                      let ci = tables[ti].chains.firstIndex(where: { $0.name == cname }) else {
                    throw MeshtraceError.badInput("\(where_): rule of an unknown chain")
                }
                guard let exprs = b["expr"] as? [Any] else { throw MeshtraceError.badInput("\(where_): rule without \"expr\"") }
                var pieces: [String] = []
                for e in exprs { pieces.append(try NftJSONParser.statement(e, where_)) }
                if let c = b["comment"] as? String { pieces.append("comment " + NftJSONParser.quoted(c)) }
                let ruleText = pieces.joined(separator: " ")
                let toks = try NftLexer.lex(ruleText, origin: where_)
                var rule = try NftStatementParser.parse(toks, family: fam, origin: where_)
                rule.table = tname
                rule.chain = cname
                rule.backend = backend
                rule.line = 0
                if let h = b["handle"] as? Int { rule.handle = UInt64(h) }
                tables[ti].chains[ci].rules.append(rule)
            default:
                continue
            }
        }
        guard !tables.isEmpty else { throw MeshtraceError.badInput("\(origin): no nftables tables found") }
        for ti in tables.indices {
            for ci in tables[ti].chains.indices {
                var n = 0
                for k in tables[ti].chains[ci].rules.indices {
                    let r = tables[ti].chains[ci].rules[k]
                    if r.isMeshtraceRule || IptablesParser.isMeshtraceNflog(r.target) { tables[ti].chains[ci].rules[k].position = max(n, 1) }
                    else { n += 1; tables[ti].chains[ci].rules[k].position = n }
                }
            }
        }
        return Ruleset(tables: tables, origin: origin)
    }

    static func quoted(_ s: String) -> String { "\"" + s.replacingOccurrences(of: "\"", with: "\\\"") + "\"" }

    /// One JSON statement as nft text.
    static func statement(_ e: Any, _ where_: String) throws -> String {
        guard let d = e as? [String: Any], let (key, v) = d.first else { throw MeshtraceError.badInput("\(where_): bad statement") }
        switch key {
        case "match":
            guard let m = v as? [String: Any], let left = m["left"], let right = m["right"] else {
                throw MeshtraceError.badInput("\(where_): bad match")
            }
            let op = m["op"] as? String ?? "=="
            let opText = op == "in" ? "" : (op + " ")
            return "\(try expr(left, where_)) \(opText)\(try expr(right, where_))"
        case "counter": return "counter"
        case "accept", "drop", "return", "continue": return key
        case "jump", "goto":
            guard let t = (v as? [String: Any])?["target"] as? String else { throw MeshtraceError.badInput("\(where_): \(key) without target") }
            return "\(key) \(t)"
        case "reject": return "reject"
        case "masquerade": return "masquerade"
        case "notrack": return "notrack"
        case "redirect":
            if let p = (v as? [String: Any])?["port"] { return "redirect to :\(try expr(p, where_))" }
            return "redirect"
        case "tproxy":
            let t = v as? [String: Any] ?? [:]
            let addr = t["addr"].map { "\($0)" } ?? ""
            let port = t["port"].map { "\($0)" } ?? "0"
            let fam = (t["family"] as? String).map { $0 + " " } ?? ""
            return "tproxy \(fam)to \(addr.contains(":") ? "[\(addr)]" : addr):\(port)"
        case "dnat", "snat":
            let t = v as? [String: Any] ?? [:]
            var s = "\(key) to \(t["addr"].map { "\($0)" } ?? "")"
            if let p = t["port"] { s += ":\(p)" }
            return s
        case "mangle":
            guard let m = v as? [String: Any], let k = m["key"], let val = m["value"] else { throw MeshtraceError.badInput("\(where_): bad mangle") }
            return "\(try expr(k, where_)) set \(try expr(val, where_))"
        case "log":
            let l = v as? [String: Any] ?? [:]
            var s = "log"
            if let p = l["prefix"] as? String { s += " prefix " + quoted(p) }
            if let g = l["group"] { s += " group \(g)" }
            if let n = l["snaplen"] { s += " snaplen \(n)" }
            return s
        case "xt":
            // iptables-nft compat expressions: only iptables-nft-save can render them; they are read from there.
            let x = v as? [String: Any] ?? [:]
            return "xt_\(x["type"] as? String ?? "")_\(x["name"] as? String ?? "")"
        default:
            return "json_\(key)"
        }
    }

    static func expr(_ e: Any, _ where_: String) throws -> String {
        if let s = e as? String { return s.hasPrefix("@") || !s.contains(" ") ? s : quoted(s) }
        if let n = e as? NSNumber { return n.stringValue }
        if let a = e as? [Any] { return "{ " + (try a.map { try expr($0, where_) }).joined(separator: ", ") + " }" }
        guard let d = e as? [String: Any], let (key, v) = d.first else { throw MeshtraceError.badInput("\(where_): bad expression") }
        switch key {
        case "meta":
            let k = (v as? [String: Any])?["key"] as? String ?? "?"
            return ["iifname", "oifname", "iif", "oif"].contains(k) ? k : "meta \(k)"
        case "payload":
            let p = v as? [String: Any] ?? [:]
            return "\(p["protocol"] as? String ?? "?") \(p["field"] as? String ?? "?")"
        case "ct":
            return "ct \((v as? [String: Any])?["key"] as? String ?? "?")"
        case "&", "|", "^":
            guard let a = v as? [Any], a.count == 2 else { throw MeshtraceError.badInput("\(where_): bad '\(key)'") }
            let rhs = a[1] as? NSNumber
            let r = try rhs.map { "0x" + String($0.uint32Value, radix: 16) } ?? expr(a[1], where_)
            return "\(try expr(a[0], where_)) \(key) \(r)"
        case "prefix":
            let p = v as? [String: Any] ?? [:]
            return "\(p["addr"] as? String ?? "?")/\(p["len"] as? Int ?? 0)"
        case "set":
            if let a = v as? [Any] { return "{ " + (try a.map { try expr($0, where_) }).joined(separator: ", ") + " }" }
            return try expr(v, where_)
        case "range":
            guard let a = v as? [Any], a.count == 2 else { throw MeshtraceError.badInput("\(where_): bad range") }
            return "\(try expr(a[0], where_))-\(try expr(a[1], where_))"
        default:
            return "json_\(key)"
        }
    }
}
