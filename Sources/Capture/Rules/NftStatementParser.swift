// One nft rule (its statements, as `nft list ruleset` prints them or as `add rule` gives them) → matches + target.
//
// Matches keep nft's implied conditions: `tcp dport 53` also means "protocol tcp", and `ip daddr X` in an inet
// table only ever matches IPv4 (the address family of the CIDR carries that). Expressions meshtrace does not model
// (`fib`, `icmp type`, `tcp flags`, ...) stay verbatim as `.unknown`.

enum NftStatementParser {
    private static let statementStarts: Set<String> = [
        "meta", "mark", "ip", "ip6", "tcp", "udp", "sctp", "udplite", "th", "ct", "counter", "log", "iifname", "oifname",
        "iif", "oif", "accept", "drop", "reject", "return", "jump", "goto", "redirect", "tproxy", "dnat", "snat",
        "masquerade", "comment", "notrack", "continue", "queue", "l4proto", "nfproto", "skuid", "skgid",
    ]
    private static let operators: Set<String> = ["==", "!=", "eq", "ne", "<", ">", "<=", ">=", "lt", "gt", "le", "ge"]

    static func parse(_ input: [NftToken], family: RuleFamily, origin: String) throws -> Rule {
        var toks = input
        var handle: UInt64? = nil
        if let k = toks.firstIndex(where: { $0.kind == .word && $0.text == "#handle" }) {
            if k + 1 < toks.count { handle = UInt64(toks[k + 1].text) }
            toks.removeSubrange(k..<min(toks.count, k + 2))
        }
        let line = input.first?.line ?? 0
        func fail(_ m: String) -> MeshtraceError { MeshtraceError.badInput("\(origin) line \(line): \(m)") }
        guard toks.count <= 2000 else { throw fail("rule is too long") }

        var matches: [RuleMatch] = []
        var matchTokens: [NftToken] = []
        var textTokens: [NftToken] = []
        var action: RuleTarget? = nil
        var verdict: RuleTarget? = nil
        var logTarget: RuleTarget? = nil
        var i = 0

        func tok(_ k: Int) -> NftToken? { k < toks.count ? toks[k] : nil }
        func word(_ k: Int) -> String? { tok(k).map(\.text) }

        /// A relational expression after its left side: `[& MASK] [OP] VALUE`, VALUE a word, string, `{ set }`
        /// or comma list. Returns the end index, the mask, negation and the value words.
        func relational(from k0: Int) throws -> (end: Int, mask: UInt32?, negated: Bool, values: [String], isSet: Bool) {
            var k = k0
            var mask: UInt32? = nil
            if let w = word(k), w == "&" || w == "and" {
                guard let m = word(k + 1).flatMap(IptablesRuleParser.parseNumber) else { throw fail("bad mask after '&'") }
                mask = m
                k += 2
            }
            var negated = false
            if let w = word(k), tok(k)?.kind == .word, operators.contains(w) {
                negated = w == "!=" || w == "ne"
                if !["==", "!=", "eq", "ne"].contains(w) {
                    // Ordered comparisons are not modelled: keep the value, the caller makes it unknown.
                    return (min(k + 2, toks.count), mask, negated, ["<cmp>"], false)
                }
                k += 1
            }
            guard let v = tok(k) else { throw fail("missing value") }
            if v.kind == .lbrace {
                var vals: [String] = []
                var depth = 0
                while let t = tok(k) {
                    if t.kind == .lbrace { depth += 1 } else if t.kind == .rbrace { depth -= 1 }
                    else if t.kind == .word || t.kind == .string { vals.append(t.text) }
                    k += 1
                    if depth == 0 { break }
                }
                guard depth == 0 else { throw fail("'{' not closed") }
                return (k, mask, negated, vals, true)
            }
            guard v.kind == .word || v.kind == .string else { throw fail("missing value") }
            var vals = [v.text]
            k += 1
            while tok(k)?.kind == .comma, let n = tok(k + 1), n.kind == .word { vals.append(n.text); k += 2 }
            return (k, mask, negated, vals, vals.count > 1)
        }

        func anyOf(_ items: [RuleMatch], negated: Bool) -> RuleMatch {
            if items.count == 1 {
                switch items[0] {
                case .source(let c, _): return .source(c, negated: negated)
                case .destination(let c, _): return .destination(c, negated: negated)
                case .destinationPort(let p, _): return .destinationPort(p, negated: negated)
                case .sourcePort(let p, _): return .sourcePort(p, negated: negated)
                case .protocolIs(let p, _): return .protocolIs(p, negated: negated)
                case .inInterface(let n, _): return .inInterface(n, negated: negated)
                case .outInterface(let n, _): return .outInterface(n, negated: negated)
                default: break
                }
            }
            return .anyOf(items, negated: negated)
        }

        func port(_ s: String) -> PortRange? {
            let named = ["domain": "53", "http": "80", "https": "443", "ssh": "22"]
            let v = named[s] ?? s
            let parts = v.split(separator: "-")
            guard parts.count == 1 || parts.count == 2, let lo = UInt16(parts[0]) else { return nil }
            let hi = parts.count == 2 ? UInt16(parts[1]) : lo
            guard let h = hi, lo <= h else { return nil }
            return PortRange(lo, h)
        }

        func unknownUntilNextStatement(_ start: Int) -> Int {
            var k = start + 1
            var depth = 0
            while let t = tok(k) {
                if t.kind == .lbrace { depth += 1 }
                if t.kind == .rbrace { depth -= 1 }
                if depth == 0, t.kind == .word, statementStarts.contains(t.text) { break }
                k += 1
            }
            return k
        }

        while i < toks.count {
            let t = toks[i]
            let start = i
            var isMatch = true
            guard t.kind == .word else { throw fail("unexpected '\(IptablesParser.excerpt(t.text))' in rule") }
            switch t.text {
            case "counter":
                isMatch = false
                i += 1
                if word(i) == "packets" { i = min(i + 4, toks.count) }
                textTokens.append(t)
                continue
            case "comment":
                guard let c = tok(i + 1), c.kind == .string || c.kind == .word else { throw fail("comment needs text") }
                matches.append(.comment(c.text))
                textTokens.append(contentsOf: toks[i..<(i + 2)])
                i += 2
                continue
            case "accept": verdict = .accept; i += 1; isMatch = false
            case "drop": verdict = .drop; i += 1; isMatch = false
            case "return": verdict = .return; i += 1; isMatch = false
            case "continue": verdict = .counterOnly; i += 1; isMatch = false
            case "jump", "goto":
                guard let n = tok(i + 1), n.kind == .word || n.kind == .string else { throw fail("\(t.text) needs a chain") }
                verdict = t.text == "jump" ? .jump(n.text) : .goto(n.text)
                i += 2; isMatch = false
            case "reject", "queue":
                verdict = t.text == "reject" ? .reject : .unknown("queue")
                i = toks.count; isMatch = false
            case "notrack", "masquerade":
                action = t.text == "notrack" ? .unknown("notrack") : .masquerade
                i = unknownUntilNextStatement(i); isMatch = false
            case "redirect":
                var k = i + 1
                if word(k) == "to" { k += 1 }
                var p: UInt16? = nil
                if let w = word(k), let pr = port(w.hasPrefix(":") ? String(w.dropFirst()) : w) { p = pr.low; k += 1 }
                action = .redirect(toPort: p)
                i = k; isMatch = false
            case "tproxy":
                var k = i + 1
                if let w = word(k), w == "ip" || w == "ip6" { k += 1 }
                guard word(k) == "to", let dest = word(k + 1) else { throw fail("tproxy needs 'to [ADDR]:PORT'") }
                k += 2
                guard let colon = dest.lastIndex(of: ":"), let p = UInt16(dest[dest.index(after: colon)...]) else { throw fail("bad tproxy destination '\(dest)'") }
                let host = dest[..<colon].trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
                action = .tproxy(onPort: p, onIP: host.isEmpty ? nil : IPAddress(host), mark: nil, mask: nil)
                i = k; isMatch = false
            case "dnat", "snat":
                var k = i + 1
                if let w = word(k), w == "ip" || w == "ip6" { k += 1 }
                guard word(k) == "to", let dest = word(k + 1) else { throw fail("\(t.text) needs 'to ADDR'") }
                action = t.text == "dnat" ? .dnat(dest) : .snat(dest)
                i = unknownUntilNextStatement(k + 1); isMatch = false
            case "log":
                var k = i + 1
                var prefix = "", group: UInt16? = nil
                while let w = word(k), ["prefix", "group", "snaplen", "queue-threshold", "level", "flags"].contains(w) {
                    guard let v = tok(k + 1) else { throw fail("log \(w) needs a value") }
                    if w == "prefix" { prefix = v.text }
                    if w == "group" { guard let g = UInt16(v.text) else { throw fail("bad log group '\(v.text)'") }; group = g }
                    k += 2
                    while w == "flags", tok(k)?.kind == .comma { k += 2 }
                }
                logTarget = group.map { .nflog(group: $0, prefix: prefix) } ?? .log(prefix: prefix)
                i = k; isMatch = false
            case "meta", "mark", "iifname", "oifname", "iif", "oif", "l4proto", "nfproto", "skuid", "skgid":
                var k = i
                if t.text == "meta" { k += 1 }
                guard let key = word(k) else { throw fail("meta needs a key") }
                if word(k + 1) == "set" {
                    isMatch = false
                    let (end, target) = try setStatement(key: key, ct: false, from: k + 2, toks: toks, fail: fail)
                    action = combine(action, target)
                    i = end
                    break
                }
                let r = try relational(from: k + 1)
                i = r.end
                if r.values == ["<cmp>"] { matches.append(.unknown(render(toks[start..<i]))); break }
                switch key {
                case "mark":
                    guard !r.isSet, let v = IptablesRuleParser.parseNumber(r.values[0]) else { matches.append(.unknown(render(toks[start..<i]))); break }
                    matches.append(.mark(value: v, mask: r.mask ?? 0xffff_ffff, negated: r.negated))
                case "iifname", "iif", "oifname", "oif":
                    let items: [RuleMatch] = r.values.map { key.hasPrefix("i") ? .inInterface(nftWildcard($0), negated: false) : .outInterface(nftWildcard($0), negated: false) }
                    matches.append(anyOf(items, negated: r.negated))
                case "l4proto":
                    var items: [RuleMatch] = []
                    for v in r.values { guard let p = IptablesRuleParser.protocolNumber(v) else { throw fail("unknown protocol '\(v)'") }; items.append(.protocolIs(p, negated: false)) }
                    matches.append(anyOf(items, negated: r.negated))
                case "nfproto":
                    guard r.values.count == 1, let f = ["ipv4": RuleFamily.ipv4, "ipv6": .ipv6][r.values[0]] else { matches.append(.unknown(render(toks[start..<i]))); break }
                    matches.append(.family(f, negated: r.negated))
                case "skuid", "skgid":
                    guard r.values.count == 1, let n = UInt32(r.values[0]) else { matches.append(.unknown(render(toks[start..<i]))); break }
                    matches.append(key == "skuid" ? .owner(uid: n, gid: nil, socketExists: false, negated: r.negated)
                                                  : .owner(uid: nil, gid: n, socketExists: false, negated: r.negated))
                default:
                    matches.append(.unknown(render(toks[start..<i])))
                }
            case "ip", "ip6":
                guard let field = word(i + 1) else { throw fail("\(t.text) needs a field") }
                let fam: RuleFamily = t.text == "ip" ? .ipv4 : .ipv6
                let r = try relational(from: i + 2)
                i = r.end
                if family == .inet { matches.append(.family(fam, negated: false)) }
                switch field {
                case "saddr", "daddr":
                    if r.values.count == 1, r.values[0].hasPrefix("@") {
                        matches.append(.set(name: String(r.values[0].dropFirst()), direction: field == "saddr" ? "src" : "dst", negated: r.negated))
                        break
                    }
                    var items: [RuleMatch] = []
                    for v in r.values {
                        guard let c = IptablesRuleParser.parseCIDR(Substring(v), family: fam), c.address.family == (fam == .ipv4 ? .v4 : .v6) else {
                            throw fail("bad \(t.text) address '\(IptablesParser.excerpt(v))'")
                        }
                        items.append(field == "saddr" ? .source(c, negated: false) : .destination(c, negated: false))
                    }
                    matches.append(anyOf(items, negated: r.negated))
                case "protocol", "nexthdr":
                    var items: [RuleMatch] = []
                    for v in r.values { guard let p = IptablesRuleParser.protocolNumber(v) else { throw fail("unknown protocol '\(v)'") }; items.append(.protocolIs(p, negated: false)) }
                    matches.append(anyOf(items, negated: r.negated))
                default:
                    matches.append(.unknown(render(toks[start..<i])))
                }
            case "tcp", "udp", "sctp", "udplite", "th":
                guard let field = word(i + 1) else { throw fail("\(t.text) needs a field") }
                if field == "dport" || field == "sport" {
                    let r = try relational(from: i + 2)
                    i = r.end
                    if t.text != "th" { matches.append(.protocolIs(IptablesRuleParser.protocolNumber(t.text)!, negated: false)) }
                    if r.values == ["<cmp>"] || (r.values.count == 1 && r.values[0].hasPrefix("@")) {
                        matches.append(.unknown(render(toks[start..<i]))); break
                    }
                    var items: [RuleMatch] = []
                    for v in r.values {
                        guard let p = port(v) else { throw fail("bad port '\(IptablesParser.excerpt(v))'") }
                        items.append(field == "dport" ? .destinationPort(p, negated: false) : .sourcePort(p, negated: false))
                    }
                    matches.append(anyOf(items, negated: r.negated))
                } else {
                    if t.text != "th" { matches.append(.protocolIs(IptablesRuleParser.protocolNumber(t.text)!, negated: false)) }
                    i = unknownUntilNextStatement(i + 1)
                    matches.append(.unknown(render(toks[start..<i])))
                }
            case "ct":
                guard let key = word(i + 1) else { throw fail("ct needs a key") }
                if word(i + 2) == "set" {
                    isMatch = false
                    let (end, target) = try setStatement(key: key, ct: true, from: i + 3, toks: toks, fail: fail)
                    action = combine(action, target)
                    i = end
                    break
                }
                let r = try relational(from: i + 2)
                i = r.end
                switch key {
                case "mark" where !r.isSet && r.values != ["<cmp>"]:
                    guard let v = IptablesRuleParser.parseNumber(r.values[0]) else { throw fail("bad ct mark '\(r.values[0])'") }
                    matches.append(.connmark(value: v, mask: r.mask ?? 0xffff_ffff, negated: r.negated))
                case "state":
                    matches.append(.ctstate(Set(r.values.map { $0.uppercased() }), negated: r.negated))
                default:
                    matches.append(.unknown(render(toks[start..<i])))
                }
            default:
                if t.text.hasPrefix("xt_target_") {
                    // An iptables-nft compat target rendered from JSON: only iptables-nft-save can show what it does.
                    action = .unknown(String(t.text.dropFirst(10)))
                    i += 1; isMatch = false
                    break
                }
                i = unknownUntilNextStatement(i)
                matches.append(.unknown(render(toks[start..<i])))
            }
            if isMatch { matchTokens.append(contentsOf: toks[start..<i]) }
            textTokens.append(contentsOf: toks[start..<min(i, toks.count)])
        }

        let target = action ?? verdict ?? logTarget ?? .counterOnly
        return Rule(table: "", chain: "", position: 0, family: family, backend: .nftables,
                    text: render(textTokens[...]), matchText: render(matchTokens[...]),
                    matches: matches, target: target, line: line, handle: handle)
    }

    /// The first action decides, except that `tproxy ... meta mark set M` is one TPROXY with its mark.
    private static func combine(_ first: RuleTarget?, _ next: RuleTarget) -> RuleTarget {
        guard let first else { return next }
        if case .tproxy(let p, let ip, nil, nil) = first, case .setMark(let v, let m) = next { return .tproxy(onPort: p, onIP: ip, mark: v, mask: m) }
        return first
    }

    /// `meta mark set ...`, `ct mark set ...`, `ct zone set N`, `meta nftrace set 1`.
    private static func setStatement(key: String, ct: Bool, from k0: Int, toks: [NftToken],
                                     fail: (String) -> MeshtraceError) throws -> (Int, RuleTarget) {
        var k = k0
        var words: [String] = []
        var expectOperand = true
        while k < toks.count, toks[k].kind == .word {
            let w = toks[k].text
            if expectOperand {
                if w == "ct" || w == "meta" { words.append(w); k += 1; continue }
                if w == "mark" || IptablesRuleParser.parseNumber(w) != nil { words.append(w); k += 1; expectOperand = false; continue }
                break
            }
            guard ["&", "|", "and", "or", "^", "xor"].contains(w) else { break }
            words.append(w); k += 1; expectOperand = true
        }
        guard !words.isEmpty else { throw fail("'\(key) set' needs a value") }
        let expr = words.joined(separator: " ").replacingOccurrences(of: " and ", with: " & ").replacingOccurrences(of: " or ", with: " | ")
        let verbatim = (ct ? "ct " : "meta ") + key + " set " + words.joined(separator: " ")
        let parts = expr.split(separator: " ").map(String.init)
        // Recognise `[ct|meta] mark [& A] [| B]` and plain numbers.
        func markExpr() -> (source: String, and: UInt32, or: UInt32)? {
            var p = parts[...]
            var source = "value"
            if p.first == "ct", p.dropFirst().first == "mark" { source = "ct"; p = p.dropFirst(2) }
            else if p.first == "meta", p.dropFirst().first == "mark" { source = "meta"; p = p.dropFirst(2) }
            else if p.first == "mark" { source = "meta"; p = p.dropFirst(1) }
            else if let v = p.first.flatMap(IptablesRuleParser.parseNumber), p.count == 1 { return ("value", 0, v) }
            else { return nil }
            var andMask: UInt32 = 0xffff_ffff, orValue: UInt32 = 0
            while let op = p.first, let v = p.dropFirst().first.flatMap(IptablesRuleParser.parseNumber) {
                if op == "&" { andMask &= v; orValue &= v } else if op == "|" { orValue |= v } else { return nil }
                p = p.dropFirst(2)
            }
            guard p.isEmpty else { return nil }
            return (source, andMask, orValue)
        }
        switch (ct, key) {
        case (true, "zone"):
            guard parts.count == 1, let z = UInt16(parts[0]) else { return (k, .unknown(verbatim)) }
            return (k, .ctZone(z))
        case (false, "nftrace"):
            return (k, .trace)
        case (false, "mark"):
            guard let e = markExpr() else { return (k, .unknown(verbatim)) }
            switch e.source {
            case "ct": return (k, .connmarkRestore(nfmask: 0xffff_ffff, ctmask: e.and))
            // mark = (mark & A) | B is xmark value B, mask ~A | B.
            case "meta": return (k, .setMark(value: e.or, mask: ~e.and | e.or))
            default: return (k, .setMark(value: e.or, mask: 0xffff_ffff))
            }
        case (true, "mark"):
            guard let e = markExpr() else { return (k, .unknown(verbatim)) }
            switch e.source {
            case "meta": return (k, e.and == 0xffff_ffff && e.or == 0 ? .connmarkSave : .unknown(verbatim))
            case "ct": return (k, .connmarkSet(value: e.or, mask: ~e.and | e.or))
            default: return (k, .connmarkSet(value: e.or, mask: 0xffff_ffff))
            }
        default:
            return (k, .unknown(verbatim))
        }
    }

    /// nft writes iptables' `eth+` as `eth*`; the model keeps iptables' spelling.
    private static func nftWildcard(_ s: String) -> String { s.hasSuffix("*") ? String(s.dropLast()) + "+" : s }

    static func render(_ toks: ArraySlice<NftToken>) -> String {
        var out = ""
        for t in toks {
            let piece: String
            switch t.kind {
            case .string: piece = "\"" + t.text.replacingOccurrences(of: "\"", with: "\\\"") + "\""
            default: piece = t.text
            }
            if t.kind == .comma { out += ","; continue }
            if !out.isEmpty { out += " " }
            out += piece
        }
        return out
    }
}

import Foundation
