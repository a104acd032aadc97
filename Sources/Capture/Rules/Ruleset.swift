// The one model of a pod's netfilter rules, whatever form they were read from
// (iptables-save / ip6tables-save in nf_tables or legacy render, iptables-restore input,
// Istio golden files, `nft list ruleset`, `nft -j list ruleset`).
//
// Parsers live beside this file and fill these types; the verifier, the instrumentation (NFLOG twins),
// the correlator (rule text and role of a hit) and the reports all read them.

/// Which program holds the rules. A netns can hold more than one (a known Istio bug writes both).
public enum RulesetBackend: String, Sendable, Codable, CaseIterable {
    case iptablesNft = "iptables-nft"
    case iptablesLegacy = "iptables-legacy"
    case nftables = "nftables"
    /// Read from a file whose render does not say (iptables-restore input, goldens).
    case unknown = "unknown"
}

/// The address family a table applies to.
public enum RuleFamily: String, Sendable, Codable {
    case ipv4, ipv6
    /// nft `inet` tables: both.
    case inet
}

/// One match of a rule, parsed. Anything meshtrace does not model is `.unknown` with its text
/// kept verbatim, and the evaluator treats it conservatively (it may match).
public indirect enum RuleMatch: Hashable, Sendable {
    case source(CIDR, negated: Bool)
    case destination(CIDR, negated: Bool)
    case protocolIs(UInt8, negated: Bool)
    case inInterface(String, negated: Bool)     // "eth+" wildcards kept as written
    case outInterface(String, negated: Bool)
    case sourcePort(PortRange, negated: Bool)
    case destinationPort(PortRange, negated: Bool)
    case mark(value: UInt32, mask: UInt32, negated: Bool)
    case connmark(value: UInt32, mask: UInt32, negated: Bool)
    case ctstate(Set<String>, negated: Bool)    // NEW, ESTABLISHED, RELATED, INVALID, UNTRACKED, DNAT, SNAT
    case owner(uid: UInt32?, gid: UInt32?, socketExists: Bool, negated: Bool)
    case set(name: String, direction: String, negated: Bool)
    case comment(String)
    case unknown(String)
    /// nft `meta nfproto ipv4` (and what `ip ...` / `ip6 ...` imply in an inet table).
    case family(RuleFamily, negated: Bool)
    /// Any one of these: nft anonymous sets `{ 53, 80 }`, `-m multiport --dports`, comma lists in `-s`.
    case anyOf([RuleMatch], negated: Bool)
}

public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var prefixLength: Int
    public init(address: IPAddress, prefixLength: Int) { self.address = address; self.prefixLength = prefixLength }

    public func contains(_ a: IPAddress) -> Bool {
        guard a.family == address.family else { return false }
        let bits = address.family == .v4 ? 32 : 128
        if prefixLength <= 0 { return true }
        if address.family == .v4 {
            let m: UInt32 = prefixLength >= 32 ? .max : ~(UInt32.max >> UInt32(prefixLength))
            return (a.v4Value & m) == (address.v4Value & m)
        }
        _ = bits
        let hiBits = min(64, prefixLength), loBits = max(0, prefixLength - 64)
        let hm: UInt64 = hiBits >= 64 ? .max : (hiBits == 0 ? 0 : ~(UInt64.max >> UInt64(hiBits)))
        let lm: UInt64 = loBits >= 64 ? .max : (loBits == 0 ? 0 : ~(UInt64.max >> UInt64(loBits)))
        return (a.hi & hm) == (address.hi & hm) && (a.lo & lm) == (address.lo & lm)
    }

    public var description: String { "\(address)/\(prefixLength)" }

    /// An address the prefix contains: the address itself for a host prefix, else the first one after the network
    /// address (a host, not the network).
    public var sampleInside: IPAddress? {
        let bits = address.family == .v4 ? 32 : 128
        guard address.family != .none, prefixLength >= 0, prefixLength <= bits else { return nil }
        if prefixLength >= bits - 1 { return address }
        return CIDR.offset(network, by: 1)
    }

    /// The first address after the prefix (nil when it ends the address space).
    public var firstAddressAfter: IPAddress? {
        let bits = address.family == .v4 ? 32 : 128
        guard address.family != .none, prefixLength > 0, prefixLength <= bits else { return nil }
        let hostBits = bits - prefixLength
        var last = network
        if address.family == .v4 {
            last.lo |= hostBits >= 32 ? 0xffff_ffff : (UInt64(1) << UInt64(hostBits)) - 1
            return last.lo >= 0xffff_ffff ? nil : CIDR.offset(last, by: 1)
        }
        if hostBits >= 64 { last.lo = .max; last.hi |= hostBits >= 128 ? .max : (UInt64(1) << UInt64(hostBits - 64)) - 1 }
        else { last.lo |= hostBits == 0 ? 0 : (UInt64(1) << UInt64(hostBits)) - 1 }
        return last.hi == .max && last.lo == .max ? nil : CIDR.offset(last, by: 1)
    }

    /// The network address (host bits cleared).
    var network: IPAddress {
        var a = address
        if a.family == .v4 {
            let m: UInt64 = prefixLength >= 32 ? 0xffff_ffff : (prefixLength <= 0 ? 0 : 0xffff_ffff & ~(UInt64(0xffff_ffff) >> UInt64(prefixLength)))
            a.lo &= m
            return a
        }
        let hiBits = min(64, max(0, prefixLength)), loBits = max(0, prefixLength - 64)
        a.hi &= hiBits >= 64 ? .max : (hiBits == 0 ? 0 : ~(UInt64.max >> UInt64(hiBits)))
        a.lo &= loBits >= 64 ? .max : (loBits == 0 ? 0 : ~(UInt64.max >> UInt64(loBits)))
        return a
    }

    private static func offset(_ a: IPAddress, by n: UInt64) -> IPAddress {
        var b = a
        let (lo, carry) = b.lo.addingReportingOverflow(n)
        b.lo = lo
        if carry { b.hi &+= 1 }
        if b.family == .v4 { b.lo &= 0xffff_ffff }
        return b
    }
}

public struct PortRange: Hashable, Sendable, CustomStringConvertible {
    public var low: UInt16
    public var high: UInt16
    public init(_ low: UInt16, _ high: UInt16? = nil) { self.low = low; self.high = high ?? low }
    public func contains(_ p: UInt16) -> Bool { p >= low && p <= high }
    public var description: String { low == high ? "\(low)" : "\(low):\(high)" }
}

/// What a rule does when it matches.
public indirect enum RuleTarget: Hashable, Sendable {
    case accept, drop, reject, `return`
    case jump(String)
    case goto(String)
    case redirect(toPort: UInt16?)
    case tproxy(onPort: UInt16, onIP: IPAddress?, mark: UInt32?, mask: UInt32?)
    case dnat(String)
    case snat(String)
    case masquerade
    case setMark(value: UInt32, mask: UInt32)              // MARK --set-xmark
    case connmarkSet(value: UInt32, mask: UInt32)          // CONNMARK --set-xmark / nft ct mark set
    case connmarkRestore(nfmask: UInt32, ctmask: UInt32)   // CONNMARK --restore-mark / nft meta mark set ct mark
    case connmarkSave
    case ctZone(UInt16)
    case nflog(group: UInt16, prefix: String)
    case log(prefix: String)
    case trace
    case counterOnly                                       // nft rule with no verdict
    case unknown(String)

    /// Terminating verdicts end the walk of the base chain (ACCEPT, DROP, REDIRECT, ...).
    public var isTerminal: Bool {
        switch self {
        case .accept, .drop, .reject, .redirect, .tproxy, .dnat, .snat, .masquerade: return true
        default: return false
        }
    }
}

/// One rule. `position` is 1-based within its chain, counting only rules meshtrace did not add.
public struct Rule: Hashable, Sendable {
    public var table: String
    public var chain: String
    public var position: Int
    public var family: RuleFamily
    public var backend: RulesetBackend
    /// The line as read (iptables-save `-A ...`, or the nft rule statement text), for people and for `--rules`.
    public var text: String
    /// The match part verbatim, without the target (`-p tcp -m mark ! --mark 0x539/0xfff`, or nft statements
    /// before the verdict). An NFLOG twin is this text with `-j NFLOG ...` / `log group ...` appended.
    public var matchText: String
    public var matches: [RuleMatch]
    public var target: RuleTarget
    public var role: AmbientRole
    /// 1-based line in the file it came from (0 when read live).
    public var line: Int
    /// nft rule handle when known (live nft reads, `nft -a`), for precise removal and TRACE mapping.
    public var handle: UInt64?

    public init(table: String, chain: String, position: Int, family: RuleFamily, backend: RulesetBackend,
                text: String, matchText: String, matches: [RuleMatch], target: RuleTarget,
                role: AmbientRole = .other, line: Int = 0, handle: UInt64? = nil) {
        self.table = table; self.chain = chain; self.position = position; self.family = family
        self.backend = backend; self.text = text; self.matchText = matchText; self.matches = matches
        self.target = target; self.role = role; self.line = line; self.handle = handle
    }

    /// Text that identifies the rule independent of counters and whitespace: what `RuleTag.textHash` hashes.
    public var canonicalText: String {
        text.split(whereSeparator: { $0 == " " || $0 == "\t" }).joined(separator: " ")
    }

    /// True for rules meshtrace itself added (NFLOG twins, observation points, TRACE rules).
    public var isMeshtraceRule: Bool {
        role == .meshtraceTwin || role == .meshtraceObservation || matches.contains(.comment("meshtrace"))
    }
}

/// A chain: built-in (with a hook and policy) or user-defined.
public struct Chain: Hashable, Sendable {
    public var name: String
    /// For base chains: the netfilter hook (prerouting, input, output, ...); nil for user chains.
    public var hook: NetfilterHook?
    /// nft base-chain priority (iptables built-ins get their table's fixed priority).
    public var priority: Int?
    /// nft chain type (filter, nat, route) where known.
    public var type: String?
    public var policy: RuleTarget?
    public var rules: [Rule]
    public init(name: String, hook: NetfilterHook? = nil, priority: Int? = nil, type: String? = nil,
                policy: RuleTarget? = nil, rules: [Rule] = []) {
        self.name = name; self.hook = hook; self.priority = priority; self.type = type; self.policy = policy; self.rules = rules
    }
}

public struct Table: Hashable, Sendable {
    public var name: String
    public var family: RuleFamily
    public var backend: RulesetBackend
    public var chains: [Chain]
    public init(name: String, family: RuleFamily, backend: RulesetBackend, chains: [Chain] = []) {
        self.name = name; self.family = family; self.backend = backend; self.chains = chains
    }
    public func chain(_ name: String) -> Chain? { chains.first { $0.name == name } }
}

extension Chain {
    /// Positions count only rules meshtrace did not add (see `RuleTag`): a twin shares the number of the rule before it.
    mutating func renumberOriginalRules() {
        var n = 0
        for k in rules.indices {
            if rules[k].isMeshtraceRule || IptablesParser.isMeshtraceNflog(rules[k].target) {
                rules[k].position = max(n, 1)
            } else {
                n += 1
                rules[k].position = n
            }
        }
    }
}

/// Every table read from one source (a file, or one backend/family of a live netns).
public struct Ruleset: Sendable {
    public var tables: [Table]
    /// Where it came from, for messages ("iptables-save of netns pod-a", "rules.txt").
    public var origin: String
    public init(tables: [Table], origin: String) { self.tables = tables; self.origin = origin }

    public var allRules: [Rule] { tables.flatMap { $0.chains.flatMap(\.rules) } }

    /// The rule a meshtrace NFLOG prefix names: by table, chain and position, confirmed by the text hash;
    /// when the hash disagrees (rules moved), the rule in that chain whose text hash matches. An iptables tag
    /// looks in its own backend's tables first (l4/l6: iptables-legacy; 4/6: the others), then in the other
    /// backend's (a prefix written before l4/l6 existed, or a rules file that does not say its backend).
    public func rule(for tag: RuleTag) -> Rule? {
        guard case .rule(let pos) = tag.position else { return nil }
        let fam: [RuleFamily]
        var legacy: Bool? = nil
        switch tag.family {
        case .v4: fam = [.ipv4]; legacy = false
        case .v6: fam = [.ipv6]; legacy = false
        case .legacyV4: fam = [.ipv4]; legacy = true
        case .legacyV6: fam = [.ipv6]; legacy = true
        case .nft: fam = [.inet, .ipv4, .ipv6]
        }
        let candidates = tables.filter { fam.contains($0.family) && tag.matches(table: $0.name) }
        let ordered = legacy.map { wantsLegacy in
            candidates.filter { ($0.backend == .iptablesLegacy) == wantsLegacy }
                + candidates.filter { ($0.backend == .iptablesLegacy) != wantsLegacy }
        } ?? candidates
        for t in ordered {
            for c in t.chains where tag.matches(chain: c.name) {
                let original = c.rules.filter { !$0.isMeshtraceRule }
                if pos <= original.count {
                    let r = original[pos - 1]
                    if tag.textHash == nil || RuleTag.textHash(r.canonicalText) == tag.textHash { return r }
                }
                if let h = tag.textHash, let r = original.first(where: { RuleTag.textHash($0.canonicalText) == h }) {
                    return r
                }
            }
        }
        return nil
    }
}
