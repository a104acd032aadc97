// Where a set of rules lives in a netns: one backend and one address family. A pod netns can hold
// several at once (Istio's legacy-vs-nft bug writes two full rulesets; IPv6 adds ip6tables), and
// meshtrace instruments each one that holds ambient chains, with that backend's own tools.

public struct RuleHome: Hashable, Sendable, CustomStringConvertible {
    public var backend: RulesetBackend
    /// ipv4 / ipv6 for the iptables backends; inet for native nftables (its tables carry their own family).
    public var family: RuleFamily

    public init(backend: RulesetBackend, family: RuleFamily) {
        self.backend = backend; self.family = family
    }

    /// Every home a live netns is looked at for, in the order they are reported.
    public static let all: [RuleHome] = [
        RuleHome(backend: .iptablesNft, family: .ipv4), RuleHome(backend: .iptablesNft, family: .ipv6),
        RuleHome(backend: .iptablesLegacy, family: .ipv4), RuleHome(backend: .iptablesLegacy, family: .ipv6),
        RuleHome(backend: .nftables, family: .inet),
    ]

    public var isNftables: Bool { backend == .nftables }

    /// The tag family in NFLOG prefixes.
    public var tagFamily: RuleTag.Family {
        if isNftables { return .nft }
        if backend == .iptablesLegacy { return family == .ipv6 ? .legacyV6 : .legacyV4 }
        return family == .ipv6 ? .v6 : .v4
    }

    private var xtablesBase: String {
        let base = family == .ipv6 ? "ip6tables" : "iptables"
        switch backend {
        case .iptablesNft: return base + "-nft"
        case .iptablesLegacy: return base + "-legacy"
        // A file that does not say which backend wrote it is applied with whatever the host's default is.
        case .unknown, .nftables: return base
        }
    }

    /// The program that prints this home's rules (`iptables-nft-save`, `nft`).
    public var saveTool: String { isNftables ? "nft" : xtablesBase + "-save" }
    /// The program that applies a transaction to this home.
    public var restoreTool: String { isNftables ? "nft" : xtablesBase + "-restore" }

    /// argv that prints the rules without counters (what the "unchanged" check compares).
    public var saveCommand: [String] { isNftables ? ["nft", "-a", "list", "ruleset"] : [saveTool] }
    /// argv that prints the rules with counters (kernel hit counts of the twins).
    public var saveWithCountersCommand: [String] { isNftables ? ["nft", "-a", "list", "ruleset"] : [saveTool, "-c"] }
    /// argv that applies a transaction read from stdin. `-w`: wait for the xtables lock, so meshtrace never
    /// races istio-cni's own iptables-restore. nft transactions are atomic in the kernel.
    public var applyCommand: [String] { isNftables ? ["nft", "-f", "-"] : [restoreTool, "--noflush", "--wait=5"] }

    public var description: String {
        isNftables ? "nftables" : "\(xtablesBase)"
    }
}
