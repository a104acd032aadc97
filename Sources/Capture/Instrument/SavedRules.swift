// The live rules of one home as text: what `iptables-save` / `nft -a list ruleset` print. meshtrace's own
// rules are recognised here by their tag alone (comment `meshtrace`, or an NFLOG prefix starting `mt:`),
// never by position, so they are found and removed even after istio-cni re-applied its rules and every
// position moved. Everything else in the text is compared, never interpreted: the ruleset model
// (`RulesetLoader`) does the understanding.

public struct SavedRules: Sendable {
    public var home: RuleHome
    public var text: String

    public init(home: RuleHome, text: String) { self.home = home; self.text = text }

    /// One rule meshtrace added, as found in the live text.
    public struct OwnRule: Sendable, Hashable {
        public var table: String
        /// nft: the table's family keyword; "" for iptables.
        public var nftFamily: String
        public var chain: String
        /// iptables: everything after `-A CHAIN ` (what `-D CHAIN` takes back). nft: the rule's text.
        public var spec: String
        /// nft rule handle.
        public var handle: UInt64?
        /// The NFLOG prefix it logs with.
        public var prefix: String?
        /// The kernel's packet counter for it, when the text has counters.
        public var packets: UInt64?
        /// The NFLOG group it logs to (`--nflog-group N`, nft `group N`).
        public var group: UInt16? {
            let n = SavedRules.number(after: "--nflog-group ", in: spec) ?? SavedRules.number(after: " group ", in: " " + spec)
            return n.flatMap { UInt16(exactly: $0) }
        }
    }

    static func isOwn(_ line: Substring) -> Bool {
        line.contains("--comment meshtrace") || line.contains("--comment \"meshtrace\"")
            || line.contains("--nflog-prefix \"mt:") || line.contains("--nflog-prefix mt:")
            || line.contains("comment \"meshtrace\"") || line.contains("prefix \"mt:")
    }

    /// Tables the nft text marks as iptables-nft's: the nftables home never touches them.
    var xtablesManagedTables: Set<String> {
        var out: Set<String> = []
        for line in text.split(separator: "\n") {
            guard let r = line.range(of: "# Warning: table ") else { continue }
            let rest = line[r.upperBound...].split(separator: " ")
            if rest.count >= 2 { out.insert("\(rest[0]) \(rest[1])") }
        }
        return out
    }

    /// meshtrace's rules in this text.
    public var ownRules: [OwnRule] {
        var out: [OwnRule] = []
        if home.isNftables {
            let managed = xtablesManagedTables
            var family = "", table = "", chain = ""
            for raw in text.split(separator: "\n") {
                let line = raw.trimmingCharacters(in: .whitespaces)
                if line.hasPrefix("table ") {
                    let w = line.split(separator: " ")
                    if w.count >= 3 { family = String(w[1]); table = String(w[2]) }
                    continue
                }
                if line.hasPrefix("chain ") {
                    let w = line.split(separator: " ")
                    if w.count >= 2 { chain = String(w[1]) }
                    continue
                }
                guard !managed.contains("\(family) \(table)"), SavedRules.isOwn(Substring(line)) else { continue }
                out.append(OwnRule(table: table, nftFamily: family, chain: chain, spec: SavedRules.stripHandle(line),
                                   handle: SavedRules.number(after: "# handle ", in: line),
                                   prefix: SavedRules.quoted(after: "prefix \"", in: line),
                                   packets: SavedRules.number(after: "counter packets ", in: line)))
            }
            return out
        }
        var table = ""
        for raw in text.split(separator: "\n") {
            var line = Substring(raw)
            if line.hasPrefix("*") { table = String(line.dropFirst()); continue }
            var packets: UInt64? = nil
            if line.hasPrefix("["), let close = line.firstIndex(of: "]") {
                let counts = line[line.index(after: line.startIndex)..<close].split(separator: ":")
                packets = counts.first.flatMap { UInt64($0) }
                line = line[line.index(after: close)...].drop(while: { $0 == " " })
            }
            guard line.hasPrefix("-A "), SavedRules.isOwn(line) else { continue }
            let words = line.split(separator: " ", maxSplits: 2)
            guard words.count == 3 else { continue }
            var prefix = SavedRules.quoted(after: "--nflog-prefix \"", in: String(line))
            if prefix == nil, let r = line.range(of: "--nflog-prefix ") {
                prefix = line[r.upperBound...].split(separator: " ").first.map(String.init)
            }
            out.append(OwnRule(table: table, nftFamily: "", chain: String(words[1]), spec: String(words[2]),
                               handle: nil, prefix: prefix, packets: packets))
        }
        return out
    }

    /// nft: the handles of each chain's original rules in order, keyed "family table chain". Read from the
    /// text itself (`# handle N` at the end of each rule line), so a twin is inserted before exactly the
    /// rule it twins even if the rule model did not keep handles.
    public var nftRuleHandles: [String: [UInt64]] {
        var out: [String: [UInt64]] = [:]
        var family = "", table = "", chain = ""
        for raw in text.split(separator: "\n") {
            let line = raw.trimmingCharacters(in: .whitespaces)
            let words = line.split(separator: " ")
            if line.hasPrefix("table "), words.count >= 3 { family = String(words[1]); table = String(words[2]); continue }
            if line.hasPrefix("chain "), words.count >= 2 { chain = String(words[1]); continue }
            if line.hasPrefix("type ") || SavedRules.isOwn(Substring(line)) { continue }
            if let h = SavedRules.number(after: "# handle ", in: line) { out["\(family) \(table) \(chain)", default: []].append(h) }
        }
        return out
    }

    /// The text with meshtrace's rules, counters, handles, dates and comments taken out: two texts are equal
    /// exactly when the original rules are the same in content and order.
    public var normalized: String {
        var out: [String] = []
        for raw in text.split(separator: "\n", omittingEmptySubsequences: true) {
            var line = Substring(raw)
            if home.isNftables {
                if SavedRules.isOwn(line) { continue }
                let stripped = SavedRules.stripCounters(SavedRules.stripHandle(String(line)))
                // iptables-nft's warning trails the closing brace; it says nothing about the rules.
                let noWarning = stripped.components(separatedBy: "# Warning:").first ?? stripped
                let t = noWarning.trimmingCharacters(in: .whitespaces)
                if !t.isEmpty { out.append(t) }
                continue
            }
            if line.hasPrefix("#") { continue }
            if line.hasPrefix("["), let close = line.firstIndex(of: "]") {
                line = line[line.index(after: close)...].drop(while: { $0 == " " })
            }
            if SavedRules.isOwn(line) { continue }
            if line.hasPrefix(":"), let open = line.lastIndex(of: "[") {
                line = line[..<open].dropLast(while: { $0 == " " })
            }
            out.append(String(line))
        }
        return out.joined(separator: "\n")
    }

    /// Checks that every twin sits right before the rule whose position its tag names, and every observation
    /// point before the chain's first original rule. Returns a message for the first misplaced one.
    public func misplacedTwin() -> String? {
        guard !home.isNftables else { return nil }   // nft twins are inserted by handle, before the rule itself
        var table = ""
        var originalsSeen: [String: Int] = [:]
        var pending: [String: RuleTag] = [:]
        for raw in text.split(separator: "\n") {
            var line = Substring(raw)
            if line.hasPrefix("*") { table = String(line.dropFirst()); pending = [:]; continue }
            if line.hasPrefix("["), let close = line.firstIndex(of: "]") {
                line = line[line.index(after: close)...].drop(while: { $0 == " " })
            }
            guard line.hasPrefix("-A ") else { continue }
            let chain = String(line.split(separator: " ")[1])
            let key = "\(table) \(chain)"
            if SavedRules.isOwn(line) {
                let prefix = SavedRules.quoted(after: "--nflog-prefix \"", in: String(line)) ?? ""
                guard let tag = RuleTag(prefix: prefix) else { continue }
                if case .rule = tag.position { pending[key] = tag }
                else if originalsSeen[key, default: 0] > 0 { return "observation point \(prefix) is not first in \(key)" }
                continue
            }
            let n = originalsSeen[key, default: 0] + 1
            originalsSeen[key] = n
            if let tag = pending.removeValue(forKey: key), case .rule(let p) = tag.position, p != n {
                return "twin \(tag.prefix) sits before rule \(n) of \(key)"
            }
        }
        if let (key, tag) = pending.first { return "twin \(tag.prefix) is not followed by a rule in \(key)" }
        return nil
    }

    static func stripHandle(_ line: String) -> String {
        guard let r = line.range(of: " # handle ") else { return line }
        return String(line[..<r.lowerBound])
    }

    static func stripCounters(_ line: String) -> String {
        guard let r = line.range(of: "counter packets ") else { return line }
        let rest = line[r.upperBound...].split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
        // "counter packets N bytes M rest"
        guard rest.count >= 3 else { return line }
        let tail = rest.count == 4 ? " " + rest[3] : ""
        return String(line[..<r.lowerBound]) + "counter" + tail
    }

    static func number(after marker: String, in line: String) -> UInt64? {
        guard let r = line.range(of: marker) else { return nil }
        return UInt64(line[r.upperBound...].prefix(while: \.isNumber))
    }

    static func quoted(after marker: String, in line: String) -> String? {
        guard let r = line.range(of: marker) else { return nil }
        return String(line[r.upperBound...].prefix(while: { $0 != "\"" }))
    }
}

extension Substring {
    fileprivate func dropLast(while predicate: (Character) -> Bool) -> Substring {
        var s = self
        while let c = s.last, predicate(c) { s = s.dropLast() }
        return s
    }
}
