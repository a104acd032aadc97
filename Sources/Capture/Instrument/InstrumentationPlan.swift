// What meshtrace adds to a pod's netns: an NFLOG twin right before every rule of the ambient chains (and of
// the built-in chains that jump into them), with the identical match, so each hit of the rule is reported
// without changing any verdict (NFLOG is non-terminating); plus observation points at the top of PREROUTING
// and OUTPUT so packets that never match an ambient rule are still seen.
//
// The plan is pure: it is computed from the ruleset model and rendered as the exact input of
// `iptables-restore --noflush` / `nft -f`, one transaction per table. `meshtrace plan` prints it,
// `Instrumenter` applies it.

/// Settings of the NFLOG rules meshtrace writes.
public struct InstrumentationSettings: Sendable, Hashable {
    /// The NFLOG group every twin logs to. Never 0: legacy TRACE lands there.
    public var group: UInt16 = 5153
    /// Bytes of each packet copied to userspace: headers only by default (IPv6 + TCP with options fit in 128).
    public var snaplen: Int = 128
    /// Add observation points (PREROUTING/OUTPUT `in`/`out`) besides the twins.
    public var observe: Bool = true
    /// `--nflog-threshold` / `queue-threshold` on each twin: 1 sends every event at once (what `plan` writes,
    /// for tcpdump, whose NFLOG instance would otherwise wait up to a second); nil leaves batching to the
    /// listener's instance settings (what `trace` uses: up to 256 events or 64 KiB per message, 10 ms at most).
    public var perRuleThreshold: Int? = 1

    public init(group: UInt16 = 5153, snaplen: Int = 128, observe: Bool = true) {
        self.group = group; self.snaplen = snaplen; self.observe = observe
    }

    /// The comment every rule meshtrace adds carries; removal finds rules by it (and by the `mt:` prefix).
    public static let comment = "meshtrace"
}

/// One NFLOG rule meshtrace adds.
public struct TwinRule: Sendable, Hashable {
    public var home: RuleHome
    public var table: String
    public var chain: String
    public var tag: RuleTag
    /// The rule it twins (nil for an observation point).
    public var twinned: Rule?
    /// Insert before the original rule at this 1-based position (1 for observation points).
    public var position: Int
    /// nft: the handle of the rule to insert before (nil: insert at the top of the chain, or by index).
    public var beforeHandle: UInt64?
    /// The match part, verbatim from the twinned rule ("" for an unconditional rule or an observation point).
    public var matchText: String

    public var isObservation: Bool { twinned == nil }
}

/// Every rule meshtrace adds to one table of one home: applied as one transaction.
public struct TableChange: Sendable {
    public var home: RuleHome
    public var table: String
    /// nft: the table's family keyword (ip, ip6, inet).
    public var nftFamily: String
    /// In the order the transaction applies them.
    public var twins: [TwinRule]
}

/// A rule meshtrace leaves without a twin: its match changes state other rules (and the rule itself) read, so a
/// copy evaluated before it would change the pod's verdicts.
public struct UntwinnedRule: Sendable, Hashable {
    public var home: RuleHome
    public var table: String
    public var chain: String
    public var position: Int
    public var text: String
    /// The match that has the side effect ("-m hashlimit", "update @set", ...).
    public var reason: String

    /// One line for people: where, why, what.
    public var said: String {
        "\(home) \(table) \(chain) #\(position) has no twin (its match `\(reason)` changes shared state: a copy would change the pod's verdicts, so its hits are not seen): \(text)"
    }
}

public struct InstrumentationPlan: Sendable {
    public var settings: InstrumentationSettings
    public var changes: [TableChange]
    /// Homes that hold ambient rules, whether or not they got twins (for messages: "ambient rules found in ...").
    public var ambientHomes: [RuleHome]
    /// Rules of the instrumented chains left without a twin (`sideEffect`).
    public var untwinned: [UntwinnedRule] = []

    public var twins: [TwinRule] { changes.flatMap(\.twins) }

    /// Plans twins and observation points for every home whose tables hold ambient chains.
    /// Rules meshtrace added earlier are skipped (they are leftovers; the caller decides what to do about them).
    public static func make(tables: [(home: RuleHome, table: Table)], settings: InstrumentationSettings) throws -> InstrumentationPlan {
        var changes: [TableChange] = []
        var homes: [RuleHome] = []
        var untwinned: [UntwinnedRule] = []
        for (home, table) in tables {
            let chains = AmbientChains(table: table, home: home)
            guard !chains.ambient.isEmpty else { continue }
            if !homes.contains(home) { homes.append(home) }
            var twins: [TwinRule] = []
            for chain in table.chains where chains.instrumented.contains(chain.name) {
                let originals = chain.rules.filter { !$0.isMeshtraceRule }
                // Inserting from the last rule up keeps every earlier position valid within one transaction.
                for (index, rule) in originals.enumerated().reversed() {
                    let position = index + 1
                    if let effect = sideEffect(rule.matchText, home: home) {
                        untwinned.append(UntwinnedRule(home: home, table: table.name, chain: chain.name, position: position,
                                                       text: rule.text, reason: effect))
                        continue
                    }
                    let match = try twinMatch(rule, home: home)
                    let tag = RuleTag(family: home.tagFamily, table: table.name, chain: chain.name,
                                      position: .rule(position), textHash: RuleTag.textHash(rule.canonicalText))
                    twins.append(TwinRule(home: home, table: table.name, chain: chain.name, tag: tag, twinned: rule,
                                          position: position, beforeHandle: rule.handle, matchText: match))
                }
            }
            changes.append(TableChange(home: home, table: table.name, nftFamily: nftFamilyKeyword(table.family), twins: twins))
        }
        if settings.observe {
            for home in homes { addObservationPoints(home: home, tables: tables, changes: &changes) }
        }
        changes.removeAll { $0.twins.isEmpty }
        return InstrumentationPlan(settings: settings, changes: changes, ambientHomes: homes,
                                   untwinned: untwinned.sorted { ($0.table, $0.chain, $0.position) < ($1.table, $1.chain, $1.position) })
    }

    /// Observation points go at the top of the base chains of PREROUTING and OUTPUT in the mangle table
    /// (every packet passes mangle, unlike nat which sees only a connection's first packet). A home without
    /// a mangle table gets them in the table that has the ambient chains, and says so by the tag's table.
    private static func addObservationPoints(home: RuleHome, tables: [(home: RuleHome, table: Table)], changes: inout [TableChange]) {
        let own = tables.filter { $0.home == home }.map(\.table)
        let preferred = home.isNftables
            ? (own.first { $0.name.hasSuffix("mangle") && $0.name.hasPrefix("istio") } ?? own.first { $0.name.hasPrefix("istio") })
            : (own.first { $0.name == "mangle" } ?? own.first { $0.name == "raw" } ?? own.first { $0.name == "nat" })
        guard let table = preferred else { return }
        var points: [TwinRule] = []
        for chain in table.chains {
            let hook: NetfilterHook? = chain.hook ?? builtinHook(chain.name)
            let position: RuleTag.Position
            switch hook {
            case .prerouting?: position = .observeIn
            case .output?: position = .observeOut
            default: continue
            }
            // A chain whose first rule matches everything (the unconditional jump Istio puts there) already has
            // an observer: that rule's twin sees every packet at this hook. A second would double the events.
            if let first = chain.rules.first(where: { !$0.isMeshtraceRule }),
               first.matchText.trimmingCharacters(in: .whitespaces).isEmpty { continue }
            // nft: an observation point is inserted at the top of the base chain (no handle, no index).
            let tag = RuleTag(family: home.tagFamily, table: table.name, chain: chain.name, position: position)
            points.append(TwinRule(home: home, table: table.name, chain: chain.name, tag: tag, twinned: nil,
                                   position: 1, beforeHandle: nil, matchText: ""))
        }
        guard !points.isEmpty else { return }
        if let i = changes.firstIndex(where: { $0.home == home && $0.table == table.name }) {
            changes[i].twins.append(contentsOf: points)
        } else {
            changes.append(TableChange(home: home, table: table.name, nftFamily: nftFamilyKeyword(table.family), twins: points))
        }
    }

    static func builtinHook(_ chain: String) -> NetfilterHook? {
        switch chain {
        case "PREROUTING": return .prerouting
        case "INPUT": return .input
        case "FORWARD": return .forward
        case "OUTPUT": return .output
        case "POSTROUTING": return .postrouting
        default: return nil
        }
    }

    static func nftFamilyKeyword(_ f: RuleFamily) -> String {
        switch f {
        case .inet: return "inet"
        case .ipv4: return "ip"
        case .ipv6: return "ip6"
        }
    }

    /// A match whose evaluation changes state shared with other rules or with the rule itself: a twin evaluated
    /// right before the rule would change what the rule then decides (a hashlimit bucket drained twice, a recent
    /// list set or removed before the rule reads it, an nft dynamic set updated with its per-element limit, a named
    /// limit or quota). Returns the match, for messages; nil for a pure match.
    static func sideEffect(_ matchText: String, home: RuleHome) -> String? {
        let words = matchText.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        if home.isNftables {
            for (i, w) in words.enumerated() {
                let next = i + 1 < words.count ? words[i + 1] : ""
                if ["add", "update", "delete"].contains(w) && next.hasPrefix("@") { return "\(w) \(next)" }
                if w == "meter" { return "meter \(next)" }
                // A named stateful object is shared by every rule that names it (an anonymous one is the twin's own).
                if ["limit", "quota", "counter"].contains(w), next == "name" { return "\(w) name" }
            }
            return nil
        }
        var module: String?
        for (i, w) in words.enumerated() {
            if w == "-m" || w == "--match", i + 1 < words.count { module = words[i + 1]; continue }
            switch module {
            case "hashlimit"?, "quota2"?, "psd"?, "pknock"?:
                return "-m \(module!)"
            case "recent"? where ["--set", "--update", "--remove", "--reap"].contains(w):
                return "-m recent \(w)"
            default:
                continue
            }
        }
        return nil
    }

    /// The match part a twin may carry. A twin must never change a packet, so anything that is not a pure
    /// match (a target, an nft statement such as `ct mark set`, a counter) is cut off or refused.
    static func twinMatch(_ rule: Rule, home: RuleHome) throws -> String {
        let text = rule.matchText.trimmingCharacters(in: .whitespaces)
        if home.isNftables {
            var kept: [Substring] = []
            let words = text.split(separator: " ")
            var i = 0
            while i < words.count {
                let w = words[i]
                if w == "counter" {
                    // `counter` or `counter packets N bytes M`: meshtrace adds its own.
                    i += 1
                    if i < words.count, words[i] == "packets" { i += 4 }
                    continue
                }
                if nftStatementWords.contains(String(w)) || (i + 1 < words.count && words[i + 1] == "set") && (w == "mark" || w == "zone") {
                    throw MeshtraceError(.kernelRefused, "cannot twin nft rule in \(rule.table) \(rule.chain) #\(rule.position): its match part has a statement ('\(text)')")
                }
                kept.append(w)
                i += 1
            }
            return kept.joined(separator: " ")
        }
        let padded = " " + text + " "
        for target in [" -j ", " -g ", " --jump ", " --goto "] where padded.contains(target) {
            throw MeshtraceError(.kernelRefused, "cannot twin rule in \(rule.table) \(rule.chain) #\(rule.position): its match part has a target ('\(text)')")
        }
        return text
    }

    private static let nftStatementWords: Set<String> = [
        "accept", "drop", "reject", "return", "jump", "goto", "redirect", "tproxy", "dnat", "snat", "masquerade",
        "log", "queue", "notrack", "dup", "fwd",
    ]

    // MARK: - Rendering

    /// The comment and NFLOG target of an iptables twin (after its match part).
    func xtablesTarget(_ twin: TwinRule, withComment: Bool) -> String {
        let comment = withComment ? "-m comment --comment \(InstrumentationSettings.comment) " : ""
        let threshold = settings.perRuleThreshold.map { " --nflog-threshold \($0)" } ?? ""
        return "\(comment)-j NFLOG --nflog-group \(settings.group) --nflog-prefix \"\(twin.tag.prefix)\" --nflog-size \(settings.snaplen)\(threshold)"
    }

    /// The spec of an iptables twin as it follows `-I CHAIN POS` / `-D CHAIN`.
    public func xtablesSpec(_ twin: TwinRule) -> String {
        // iptables allows one comment per rule in nf_tables mode; a rule that already has one keeps it and
        // the twin is found by its `mt:` prefix alone.
        let hasComment = twin.matchText.contains("--comment")
        let target = xtablesTarget(twin, withComment: !hasComment)
        return twin.matchText.isEmpty ? target : "\(twin.matchText) \(target)"
    }

    /// The nft statements of a twin after its match part.
    public func nftStatements(_ twin: TwinRule) -> String {
        let threshold = settings.perRuleThreshold.map { " queue-threshold \($0)" } ?? ""
        let log = "counter log prefix \"\(twin.tag.prefix)\" group \(settings.group) snaplen \(settings.snaplen)\(threshold) comment \"\(InstrumentationSettings.comment)\""
        return twin.matchText.isEmpty ? log : "\(twin.matchText) \(log)"
    }

    /// The transaction that adds one table's twins: `iptables-restore --noflush` input or an `nft -f` script.
    public func applyScript(_ change: TableChange) -> String {
        if change.home.isNftables {
            var lines: [String] = []
            // Twins planned without handles (from a file) go by index, last first, so earlier indexes stay valid.
            for t in change.twins {
                let head = "insert rule \(change.nftFamily) \(change.table) \(t.chain)"
                if t.isObservation {
                    lines.append("\(head) \(nftStatements(t))")
                } else if let h = t.beforeHandle {
                    lines.append("\(head) position \(h) \(nftStatements(t))")
                } else {
                    lines.append("\(head) index \(t.position - 1) \(nftStatements(t))")
                }
            }
            return lines.joined(separator: "\n") + "\n"
        }
        var lines = ["*\(change.table)"]
        for t in change.twins { lines.append("-I \(t.chain) \(t.position) \(xtablesSpec(t))") }
        lines.append("COMMIT")
        return lines.joined(separator: "\n") + "\n"
    }

    /// The `iptables-restore --noflush` input that removes one table's twins by their exact spec.
    /// (nft twins are removed by handle, which only the live ruleset knows: see `RemovalPlan`.)
    public func xtablesRemovalScript(_ change: TableChange) -> String {
        var lines = ["*\(change.table)"]
        for t in change.twins { lines.append("-D \(t.chain) \(xtablesSpec(t))") }
        lines.append("COMMIT")
        return lines.joined(separator: "\n") + "\n"
    }
}

/// Which chains of a table are ambient, and which get twins.
struct AmbientChains {
    /// Istio's own chains (ISTIO_*; every chain of an `istio-*` nft table) and chains they jump to.
    var ambient: Set<String> = []
    /// ambient chains plus the built-in chains that jump into them (so a foreign rule ahead of the jump is seen).
    var instrumented: Set<String> = []

    init(table: Table, home: RuleHome) {
        let byName = Dictionary(table.chains.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var work: [String]
        if home.isNftables {
            work = table.name.lowercased().hasPrefix("istio") ? table.chains.map(\.name) : []
        } else {
            work = table.chains.map(\.name).filter { $0.uppercased().hasPrefix("ISTIO") }
        }
        while let name = work.popLast() {
            guard !ambient.contains(name) else { continue }
            ambient.insert(name)
            for r in byName[name]?.rules ?? [] {
                switch r.target {
                case .jump(let to), .goto(let to): if byName[to] != nil { work.append(to) }
                default: break
                }
            }
        }
        instrumented = ambient
        for c in table.chains where !ambient.contains(c.name) {
            let jumpsIn = c.rules.contains { r in
                switch r.target {
                case .jump(let to), .goto(let to): return ambient.contains(to)
                default: return false
                }
            }
            if jumpsIn { instrumented.insert(c.name) }
        }
    }
}
