import Foundation

// Reads native nftables text into the one model: `nft list ruleset` (with or without `-a` handles) and
// `nft -f` input made of `add table/chain/rule` commands (Istio's nft goldens, `cni/pkg/nftables/testdata`).
// Rule statements are parsed by `NftStatementParser`; the text of each rule is kept (counters dropped) so a
// twin `matchText log group G prefix "P"` is valid nft.

struct NftToken: Equatable {
    enum Kind: Equatable { case word, string, lbrace, rbrace, semicolon, newline, comma }
    var kind: Kind
    var text: String
    var line: Int
}

enum NftLexer {
    /// Words, quoted strings, braces, `;`, `,` and newlines. `# handle N` comments become the word pair
    /// `#handle N` so rules keep their handles; other comments are dropped.
    static func lex(_ text: String, origin: String) throws -> [NftToken] {
        var out: [NftToken] = []
        var line = 1
        let s = Array(text.unicodeScalars)
        var i = 0
        func isWordChar(_ c: Unicode.Scalar) -> Bool {
            !(c == " " || c == "\t" || c == "\n" || c == "\r" || c == "{" || c == "}" || c == ";" || c == "," || c == "\"" || c == "#")
        }
        while i < s.count {
            let c = s[i]
            switch c {
            case " ", "\t", "\r": i += 1
            case "\n": out.append(NftToken(kind: .newline, text: "\n", line: line)); line += 1; i += 1
            case "{": out.append(NftToken(kind: .lbrace, text: "{", line: line)); i += 1
            case "}": out.append(NftToken(kind: .rbrace, text: "}", line: line)); i += 1
            case ";": out.append(NftToken(kind: .semicolon, text: ";", line: line)); i += 1
            case ",": out.append(NftToken(kind: .comma, text: ",", line: line)); i += 1
            case "#":
                var j = i + 1
                var comment = ""
                while j < s.count, s[j] != "\n" { comment.unicodeScalars.append(s[j]); j += 1 }
                let words = comment.split(separator: " ")
                if words.count == 2, words[0] == "handle", UInt64(words[1]) != nil {
                    out.append(NftToken(kind: .word, text: "#handle", line: line))
                    out.append(NftToken(kind: .word, text: String(words[1]), line: line))
                }
                i = j
            case "\"":
                var j = i + 1
                var str = ""
                var closed = false
                while j < s.count {
                    if s[j] == "\\", j + 1 < s.count { str.unicodeScalars.append(s[j + 1]); j += 2; continue }
                    if s[j] == "\"" { closed = true; j += 1; break }
                    if s[j] == "\n" { break }
                    str.unicodeScalars.append(s[j]); j += 1
                }
                guard closed else { throw MeshtraceError.badInput("\(origin) line \(line): unterminated string") }
                out.append(NftToken(kind: .string, text: str, line: line))
                i = j
            default:
                guard c.value >= 0x20, c.value != 0x7f else {
                    throw MeshtraceError.badInput("\(origin) line \(line): control character in nft text")
                }
                var j = i
                var w = ""
                while j < s.count, isWordChar(s[j]) { w.unicodeScalars.append(s[j]); j += 1 }
                out.append(NftToken(kind: .word, text: w, line: line))
                i = j
            }
        }
        return out
    }
}

struct NftTextParser {
    let origin: String
    var backend: RulesetBackend = .nftables

    private var tokens: [NftToken] = []
    private var pos = 0
    private var tables: [Table] = []
    private var tableOrder: [String] = []

    init(origin: String) { self.origin = origin }

    mutating func parse(_ text: String) throws -> Ruleset {
        tokens = try NftLexer.lex(text, origin: origin)
        pos = 0
        tables = []
        while true {
            skipSeparators()
            guard let t = peek() else { break }
            guard t.kind == .word else { throw err(t, "unexpected '\(t.text)'") }
            switch t.text {
            case "table": try parseTableBlock()
            case "add", "create", "insert", "flush", "delete", "destroy": try parseCommand()
            case "define", "include":
                throw err(t, "'\(t.text)' is not supported: give meshtrace the output of `nft list ruleset`")
            default: throw err(t, "unexpected '\(IptablesParser.excerpt(t.text))' (expected 'table' or an nft command)")
            }
        }
        guard !tables.isEmpty else { throw MeshtraceError.badInput("\(origin): no nftables tables found") }
        for ti in tables.indices { try checkJumps(tables[ti]) }
        return Ruleset(tables: tables, origin: origin)
    }

    // MARK: token helpers

    private func peek(_ k: Int = 0) -> NftToken? { pos + k < tokens.count ? tokens[pos + k] : nil }
    private mutating func next() -> NftToken? { defer { pos += 1 }; return peek() }
    /// Newlines, `;`, and the `# handle N` comments `nft -a` puts after a table's or chain's `{`.
    private mutating func skipSeparators() {
        while let t = peek() {
            if t.kind == .newline || t.kind == .semicolon { pos += 1; continue }
            if t.kind == .word, t.text == "#handle" { pos += 2; continue }
            break
        }
    }
    private func err(_ t: NftToken?, _ m: String) -> MeshtraceError {
        MeshtraceError.badInput("\(origin) line \(t?.line ?? (tokens.last?.line ?? 1)): \(m)")
    }
    private mutating func word(_ what: String) throws -> NftToken {
        guard let t = next(), t.kind == .word || t.kind == .string else { throw err(peek(-1), "expected \(what)") }
        return t
    }
    private mutating func expect(_ kind: NftToken.Kind, _ what: String) throws {
        guard let t = next(), t.kind == kind else { throw err(peek(-1), "expected \(what)") }
    }

    private static let families: [String: RuleFamily] = ["ip": .ipv4, "ip6": .ipv6, "inet": .inet]
    private static let otherFamilies: Set<String> = ["arp", "bridge", "netdev"]

    /// `[family] name`; family defaults to ip. Tables of families meshtrace does not evaluate are skipped (nil).
    private mutating func familyAndName() throws -> (RuleFamily?, String) {
        let first = try word("a table name")
        if let f = NftTextParser.families[first.text], let n = peek(), n.kind == .word || n.kind == .string, n.text != "{" {
            pos += 1
            return (f, n.text)
        }
        if NftTextParser.otherFamilies.contains(first.text), let n = peek(), n.kind == .word || n.kind == .string {
            pos += 1
            return (nil, n.text)
        }
        return (.ipv4, first.text)
    }

    private func tableIndex(_ family: RuleFamily, _ name: String) -> Int? {
        tables.firstIndex { $0.family == family && $0.name == name }
    }

    private mutating func ensureTable(_ family: RuleFamily, _ name: String) -> Int {
        if let i = tableIndex(family, name) { return i }
        tables.append(Table(name: name, family: family, backend: backend))
        return tables.count - 1
    }

    private mutating func skipBlock() throws {
        // Positioned after a `{`: skip to its matching `}`.
        var depth = 1
        let start = peek(-1)
        while depth > 0 {
            guard let t = next() else { throw err(start, "'{' is never closed (truncated input?)") }
            if t.kind == .lbrace { depth += 1 } else if t.kind == .rbrace { depth -= 1 }
        }
    }

    // MARK: `table FAMILY NAME { ... }`

    private mutating func parseTableBlock() throws {
        let kw = next()!
        let (family, name) = try familyAndName()
        if peek()?.kind == .word, peek()?.text == "#handle" { pos += 2 }
        guard let open = next(), open.kind == .lbrace else { throw err(kw, "expected '{' after table \(name)") }
        _ = open
        guard let family else { try skipBlock(); return }
        let ti = ensureTable(family, name)
        while true {
            skipSeparators()
            guard let t = next() else { throw err(kw, "table \(name) is not closed (truncated input?)") }
            if t.kind == .rbrace { break }
            guard t.kind == .word else { throw err(t, "unexpected '\(t.text)' in table \(name)") }
            switch t.text {
            case "chain":
                let cname = try word("a chain name").text
                if peek()?.text == "#handle" { pos += 2 }
                try expect(.lbrace, "'{' after chain \(cname)")
                try parseChainBody(tableIndex: ti, chain: cname, openLine: t.line)
            case "flags", "comment":
                while let n = peek(), n.kind != .newline && n.kind != .semicolon && n.kind != .rbrace { pos += 1 }
            default:
                // set, map, flowtable, counter, quota, ct helper, ...: not part of the walk; skip their bodies.
                while let n = peek(), n.kind != .lbrace && n.kind != .newline && n.kind != .rbrace { pos += 1 }
                if peek()?.kind == .lbrace { pos += 1; try skipBlock() }
            }
        }
    }

    private mutating func parseChainBody(tableIndex ti: Int, chain name: String, openLine: Int) throws {
        var chain = tables[ti].chain(name) ?? Chain(name: name)
        while true {
            skipSeparators()
            guard let t = peek() else { throw MeshtraceError.badInput("\(origin) line \(openLine): chain \(name) is not closed (truncated input?)") }
            if t.kind == .rbrace { pos += 1; break }
            if t.kind == .word, t.text == "type" {
                try parseChainSpec(&chain)
                continue
            }
            if t.kind == .word, t.text == "policy" {
                pos += 1
                chain.policy = try policy(try word("a policy"))
                continue
            }
            if t.kind == .word, t.text == "comment", peek(1)?.kind == .string {
                pos += 2
                continue
            }
            let stmt = readStatementTokens(stopAtBrace: true)
            guard !stmt.isEmpty else { throw err(t, "empty rule") }
            var rule = try NftStatementParser.parse(stmt, family: tables[ti].family, origin: origin)
            rule.table = tables[ti].name
            rule.chain = name
            rule.backend = backend
            chain.rules.append(rule)
        }
        chain.renumberOriginalRules()
        upsert(chain, in: ti)
    }

    private func policy(_ t: NftToken) throws -> RuleTarget {
        switch t.text {
        case "accept": return .accept
        case "drop": return .drop
        default: throw err(t, "bad policy '\(t.text)'")
        }
    }

    /// `type nat hook output priority -100; policy accept;` (priority may be a name, or `name + n`).
    private mutating func parseChainSpec(_ chain: inout Chain) throws {
        pos += 1
        chain.type = try word("a chain type").text
        let hk = try word("'hook'")
        guard hk.text == "hook" else { throw err(hk, "expected 'hook'") }
        let hookTok = try word("a hook")
        guard let hook = NftTextParser.hook(hookTok.text) else { throw err(hookTok, "unknown hook '\(hookTok.text)'") }
        chain.hook = hook
        if peek()?.text == "device" { pos += 2 }
        let pr = try word("'priority'")
        guard pr.text == "priority" else { throw err(pr, "expected 'priority'") }
        var words: [String] = []
        while let n = peek(), n.kind == .word, n.text != "policy" { words.append(n.text); pos += 1 }
        guard let p = NftTextParser.priority(words.joined(separator: " ")) else { throw err(pr, "bad priority '\(words.joined(separator: " "))'") }
        chain.priority = p
        if chain.policy == nil { chain.policy = .accept }
    }

    static func hook(_ s: String) -> NetfilterHook? {
        switch s {
        case "prerouting": return .prerouting
        case "input": return .input
        case "forward": return .forward
        case "output": return .output
        case "postrouting": return .postrouting
        case "ingress": return .ingress
        default: return nil
        }
    }

    /// nft's named priorities (`nft(8)`, "PRIORITY"), optionally with `+ n` / `- n`.
    static func priority(_ text: String) -> Int? {
        let names = ["raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100, "out": 100, "bridge": -200]
        let compact = text.replacingOccurrences(of: " ", with: "")
        if let n = Int(compact) { return n }
        var name = "", rest = Substring("")
        if let k = compact.firstIndex(where: { $0 == "+" || $0 == "-" }) {
            name = String(compact[..<k]); rest = compact[k...]
        } else {
            name = compact
        }
        guard let base = names[name] else { return nil }
        if rest.isEmpty { return base }
        let sign = rest.first == "-" ? -1 : 1
        guard let v = Int(rest.dropFirst()) else { return nil }
        return base + sign * v
    }

    /// The tokens of one statement: up to a newline or `;` outside braces (or the chain's closing brace).
    private mutating func readStatementTokens(stopAtBrace: Bool) -> [NftToken] {
        var out: [NftToken] = []
        var depth = 0
        while let t = peek() {
            if depth == 0 && (t.kind == .newline || t.kind == .semicolon) { break }
            if depth == 0 && stopAtBrace && t.kind == .rbrace { break }
            if t.kind == .lbrace { depth += 1 }
            if t.kind == .rbrace { depth -= 1 }
            out.append(t)
            pos += 1
        }
        return out
    }

    private mutating func upsert(_ chain: Chain, in ti: Int) {
        if let ci = tables[ti].chains.firstIndex(where: { $0.name == chain.name }) {
            tables[ti].chains[ci] = chain
        } else {
            tables[ti].chains.append(chain)
        }
    }

    private func checkJumps(_ t: Table) throws {
        for c in t.chains { for r in c.rules {
            switch r.target {
            case .jump(let n), .goto(let n):
                guard t.chain(n) != nil else {
                    throw MeshtraceError.badInput("\(origin) line \(r.line): rule jumps to chain '\(n)', which table \(t.name) does not have")
                }
            default: break
            }
        } }
    }

    // MARK: `add table|chain|rule ...` (nft -f input)

    private mutating func parseCommand() throws {
        let verb = next()!
        let objTok = try word("an object after '\(verb.text)'")
        switch (verb.text, objTok.text) {
        case (_, "ruleset") where verb.text == "flush":
            tables.removeAll()
        case (_, "table"):
            let (family, name) = try familyAndName()
            guard let family else { _ = readStatementTokens(stopAtBrace: false); return }
            switch verb.text {
            case "add", "create": _ = ensureTable(family, name)
                if peek()?.kind == .lbrace { pos -= 0; try parseInlineTableBody(family: family, name: name) }
            case "flush":
                if let i = tableIndex(family, name) { for c in tables[i].chains.indices { tables[i].chains[c].rules.removeAll() } }
            case "delete", "destroy":
                if let i = tableIndex(family, name) { tables.remove(at: i) }
            default: throw err(verb, "'\(verb.text) table' is not supported")
            }
        case (_, "chain"):
            let (family, tname) = try familyAndName()
            let cname = try word("a chain name").text
            guard let family else { _ = readStatementTokens(stopAtBrace: false); return }
            guard let ti = tableIndex(family, tname) else { throw err(objTok, "table \(tname) does not exist") }
            switch verb.text {
            case "add", "create":
                var chain = tables[ti].chain(cname) ?? Chain(name: cname)
                if peek()?.kind == .lbrace {
                    pos += 1
                    skipSeparators()
                    if peek()?.text == "type" { try parseChainSpec(&chain) }
                    skipSeparators()
                    if peek()?.text == "policy" { pos += 1; chain.policy = try policy(try word("a policy")) }
                    skipSeparators()
                    try expect(.rbrace, "'}' closing the chain spec")
                }
                upsert(chain, in: ti)
            case "flush":
                if let ci = tables[ti].chains.firstIndex(where: { $0.name == cname }) { tables[ti].chains[ci].rules.removeAll() }
            case "delete", "destroy":
                tables[ti].chains.removeAll { $0.name == cname }
            default: throw err(verb, "'\(verb.text) chain' is not supported")
            }
        case ("add", "rule"), ("insert", "rule"):
            let (family, tname) = try familyAndName()
            let cnameTok = try word("a chain name")
            var at: (kind: String, handle: UInt64)? = nil
            if let k = peek()?.text, k == "position" || k == "handle" || k == "index" {
                pos += 1
                guard let h = UInt64(try word("a number").text) else { throw err(cnameTok, "bad \(k)") }
                at = (k, h)
            }
            let stmt = readStatementTokens(stopAtBrace: false)
            guard let family else { return }
            guard let ti = tableIndex(family, tname) else { throw err(cnameTok, "table \(tname) does not exist") }
            guard let ci = tables[ti].chains.firstIndex(where: { $0.name == cnameTok.text }) else {
                throw err(cnameTok, "chain \(cnameTok.text) does not exist in table \(tname)")
            }
            guard !stmt.isEmpty else { throw err(cnameTok, "empty rule") }
            var rule = try NftStatementParser.parse(stmt, family: family, origin: origin)
            rule.table = tname
            rule.chain = cnameTok.text
            rule.backend = backend
            var rules = tables[ti].chains[ci].rules
            if verb.text == "insert" {
                if let at, at.kind == "index" { rules.insert(rule, at: min(Int(at.handle), rules.count)) }
                else if let at, let k = rules.firstIndex(where: { $0.handle == at.handle }) { rules.insert(rule, at: k) }
                else { rules.insert(rule, at: 0) }
            } else {
                if let at, at.kind == "index" { rules.insert(rule, at: min(Int(at.handle) + 1, rules.count)) }
                else if let at, let k = rules.firstIndex(where: { $0.handle == at.handle }) { rules.insert(rule, at: k + 1) }
                else { rules.append(rule) }
            }
            tables[ti].chains[ci].rules = rules
            tables[ti].chains[ci].renumberOriginalRules()
        case (_, "set"), (_, "map"), (_, "element"), (_, "flowtable"), (_, "counter"), (_, "quota"):
            _ = readStatementTokens(stopAtBrace: false)
            if peek()?.kind == .lbrace { pos += 1; try skipBlock() }
        default:
            throw err(verb, "'\(verb.text) \(objTok.text)' is not supported")
        }
    }

    /// `add table inet t { ... }` with a body, as `nft -f` allows.
    private mutating func parseInlineTableBody(family: RuleFamily, name: String) throws {
        // Re-use the block parser by rewinding to a synthetic `table` keyword position.
        let save = pos
        tokens.insert(contentsOf: [NftToken(kind: .word, text: "table", line: tokens[save].line),
                                   NftToken(kind: .word, text: family == .inet ? "inet" : (family == .ipv6 ? "ip6" : "ip"), line: tokens[save].line),
                                   NftToken(kind: .word, text: name, line: tokens[save].line)], at: save)
        try parseTableBlock()
    }
}
