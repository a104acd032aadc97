import Foundation

// What `meshtrace rules` tells a person besides the rules themselves: which variant of Istio's ruleset this is,
// and what is foreign, missing, duplicated or out of order. Rules meshtrace added are ignored throughout.

/// The variant of Istio's ambient ruleset, detected from the rules' roles (AMBIENT.md, "Variants").
public struct RulesetVariant: Sendable, Equatable {
    public enum Era: String, Sendable {
        /// Istio 1.24+: inbound capture by nat REDIRECT to 15006.
        case redirect
        /// Istio 1.21-1.23 (opt-in in 1.24): inbound capture by mangle TPROXY to 15006/15008.
        case tproxy
        /// No inbound capture rule at all (ingress mode, or not ambient).
        case none
    }
    public var isAmbient = false
    public var era: Era = .none
    public var dnsCapture = false
    /// `ambient.istio.io/bypass-inbound-capture`: no inbound capture and no inbound probe bypass.
    public var ingressMode = false
    public var virtualInterfaces: [String] = []
    public var ipv4 = false
    public var ipv6 = false
    public var backends: [RulesetBackend] = []
    /// Host-netns rules (nat ISTIO_POSTRT SNAT of kubelet probes), not a pod's.
    public var hostProbeRules = false
    public var probeAddresses: [IPAddress] = []

    public var summary: String {
        guard isAmbient else { return "no Istio ambient rules" }
        if hostProbeRules && era == .none && !dnsCapture { return "host netns probe rules (\(backends.map(\.rawValue).joined(separator: ", ")))" }
        var parts: [String] = []
        switch era {
        case .redirect: parts.append("REDIRECT era (Istio 1.24+)")
        case .tproxy: parts.append("TPROXY era (Istio 1.21-1.23)")
        case .none: parts.append(ingressMode ? "ingress mode (no inbound capture)" : "no inbound capture")
        }
        if ingressMode, era != .none { parts.append("ingress mode") }
        parts.append(dnsCapture ? "DNS capture on" : "DNS capture off")
        if !virtualInterfaces.isEmpty { parts.append("virtual interfaces \(virtualInterfaces.joined(separator: ","))") }
        parts.append([ipv4 ? "IPv4" : nil, ipv6 ? "IPv6" : nil].compactMap { $0 }.joined(separator: "+"))
        parts.append(backends.map(\.rawValue).joined(separator: " + "))
        if hostProbeRules { parts.append("host probe rules") }
        return parts.joined(separator: ", ")
    }
}

/// One structural problem (or note) in a ruleset.
public struct RulesetFinding: Sendable, Equatable {
    public enum Kind: String, Sendable {
        case foreign, missing, duplicate, outOfOrder = "out-of-order", bothBackends = "both-backends"
        case missingIPv6 = "missing-ipv6", unknownMatch = "unknown-match", notAmbient = "not-ambient"
    }
    public enum Severity: String, Sendable { case problem, note }
    public var kind: Kind
    public var severity: Severity
    public var message: String
    public var rule: Rule?
    public init(kind: Kind, severity: Severity, message: String, rule: Rule? = nil) {
        self.kind = kind; self.severity = severity; self.message = message; self.rule = rule
    }
}

public struct RulesetAnalysis: Sendable {
    public var variant = RulesetVariant()
    public var findings: [RulesetFinding] = []
    public var problems: [RulesetFinding] { findings.filter { $0.severity == .problem } }

    /// `dualStack`: the pod has IPv6 (the user says so); then missing IPv6 rules are a problem.
    public init(_ rs: Ruleset, dualStack: Bool = false) {
        let all = rs.rulesWithTables.filter { !$0.2.isMeshtraceRule }
        let ambientRules = all.filter { AmbientLabeler.isAmbientChain(table: $0.0, chain: $0.1.name) }
        variant.isAmbient = !ambientRules.isEmpty
        variant.backends = rs.ambientBackends
        guard variant.isAmbient else {
            findings.append(RulesetFinding(kind: .notAmbient, severity: .problem,
                                           message: "no Istio ambient chains (ISTIO_PRERT/ISTIO_OUTPUT or istio-ambient-* tables) hold any rule: nothing redirects this pod's traffic to ztunnel"))
            return
        }
        let roles = ambientRules.map(\.2.role)
        variant.hostProbeRules = roles.contains(.hostProbeSNAT)
        let tproxy = roles.contains(.inboundCaptureTproxy) || roles.contains(.inboundHboneTproxy)
        variant.era = tproxy ? .tproxy : (roles.contains(.inboundCapture) ? .redirect : .none)
        variant.dnsCapture = roles.contains(.dnsCapture)
        let podRules = roles.contains { $0 != .hostProbeSNAT }
        variant.ingressMode = podRules && variant.era == .none && !roles.contains(.probeBypassInbound)
        for (_, _, r) in ambientRules where r.role == .virtualInterfaceCapture {
            for m in r.matches { if case .inInterface(let n, false) = m, !variant.virtualInterfaces.contains(n) { variant.virtualInterfaces.append(n) } }
        }
        for (t, _, r) in ambientRules {
            switch t.family {
            case .ipv4: variant.ipv4 = true
            case .ipv6: variant.ipv6 = true
            case .inet:
                // Only what a rule names explicitly: mark rules of an inet table apply to both families.
                let fams = RulesetAnalysis.families(of: r)
                if fams == [.ipv4] { variant.ipv4 = true }
                if fams == [.ipv6] { variant.ipv6 = true }
            }
            if r.role == .probeBypassInbound || r.role == .probeBypassOutbound {
                for m in r.matches {
                    switch m {
                    case .source(let c, false), .destination(let c, false):
                        if !variant.probeAddresses.contains(c.address) { variant.probeAddresses.append(c.address) }
                    default: break
                    }
                }
            }
        }

        if variant.backends.count > 1 {
            findings.append(RulesetFinding(kind: .bothBackends, severity: .problem,
                message: "ambient rules are in more than one backend (\(variant.backends.map(\.rawValue).joined(separator: " and "))): the kernel runs both rulesets, and a stale or partial one decides the packet first or last (Istio #49279, #56983)"))
        }

        // Per scope (backend × family table group): foreign, duplicate, missing, order.
        var scopes: [String: [Table]] = [:]
        for t in rs.tables { scopes["\(t.backend.rawValue)/\(t.family.rawValue)", default: []].append(t) }
        var rolesByFamily: [RuleFamily: [RulesetBackend: [AmbientRole: Int]]] = [:]
        for key in scopes.keys.sorted() {
            let tables = scopes[key]!
            let scopeRules = tables.flatMap { t in t.chains.flatMap { c in c.rules.map { (t, c, $0) } } }.filter { !$0.2.isMeshtraceRule }
            let scopeAmbient = scopeRules.filter { AmbientLabeler.isAmbientChain(table: $0.0, chain: $0.1.name) }
            guard !scopeAmbient.isEmpty else { continue }
            let fam = tables[0].family
            let scopeName = RulesetAnalysis.scopeName(tables[0])
            for (_, _, r) in scopeAmbient {
                if fam == .inet {
                    // An inet table serves both families; a rule counts for the families its matches allow. The
                    // comparison below only runs for IPv6 when the pod is dual-stack or the table names IPv6 itself.
                    let explicitV6 = scopeAmbient.contains { RulesetAnalysis.families(of: $0.2) == [.ipv6] }
                    for f in RulesetAnalysis.families(of: r) where f == .ipv4 || dualStack || explicitV6 {
                        rolesByFamily[f, default: [:]][tables[0].backend, default: [:]][r.role, default: 0] += 1
                    }
                } else {
                    rolesByFamily[fam, default: [:]][tables[0].backend, default: [:]][r.role, default: 0] += 1
                }
            }
            checkForeign(scopeRules)
            checkDuplicates(tables)
            checkMissing(tables, scopeAmbient.map(\.2.role), scopeName: scopeName)
            checkOrder(tables)
            for (_, _, r) in scopeAmbient where r.matches.contains(where: { if case .unknown = $0 { return true }; return false }) {
                findings.append(RulesetFinding(kind: .unknownMatch, severity: .note,
                    message: "\(r.table) \(r.chain) rule \(r.position) has a match meshtrace does not model (\(RulesetAnalysis.unknownText(r))): verify treats it as 'may match'", rule: r))
            }
        }

        // IPv6: each backend that has IPv4 ambient rules needs the same roles for IPv6 in a dual-stack pod.
        if let v4 = rolesByFamily[.ipv4] {
            for (backend, v4roles) in v4 {
                let v6roles = rolesByFamily[.ipv6]?[backend] ?? [:]
                if v6roles.isEmpty {
                    if dualStack {
                        findings.append(RulesetFinding(kind: .missingIPv6, severity: .problem,
                            message: "\(backend.rawValue): IPv4 has ambient rules but ip6tables has none: in a dual-stack pod all IPv6 TCP leaves without ztunnel"))
                    }
                    continue
                }
                for (role, n) in v4roles.sorted(by: { $0.key.rawValue < $1.key.rawValue }) where (v6roles[role] ?? 0) < n && role != .foreign && role != .other {
                    findings.append(RulesetFinding(kind: .missingIPv6, severity: .problem,
                        message: "\(backend.rawValue): IPv4 has \(n) '\(role.rawValue)' rule(s), IPv6 has \(v6roles[role] ?? 0): the IPv6 twin is missing (\(role.summary))"))
                }
            }
        }
        if dualStack, !variant.ipv6, rolesByFamily[.ipv4] == nil {
            findings.append(RulesetFinding(kind: .missingIPv6, severity: .problem,
                message: "the pod is dual-stack but no rule captures IPv6: all IPv6 TCP leaves without ztunnel"))
        }
    }

    static func scopeName(_ t: Table) -> String {
        switch t.backend {
        case .nftables: return "nftables"
        default: return "\(t.family == .ipv6 ? "ip6tables" : "iptables") (\(t.backend.rawValue))"
        }
    }

    static func unknownText(_ r: Rule) -> String {
        r.matches.compactMap { if case .unknown(let s) = $0 { return s }; return nil }.joined(separator: " ")
    }

    /// The families a rule of an inet table can match.
    static func families(of r: Rule) -> Set<RuleFamily> {
        for m in r.matches {
            switch m {
            case .family(let f, false): return [f]
            case .source(let c, _), .destination(let c, _): return [c.address.family == .v4 ? .ipv4 : .ipv6]
            default: continue
            }
        }
        return [.ipv4, .ipv6]
    }

    private mutating func checkForeign(_ rules: [(Table, Chain, Rule)]) {
        for (t, c, r) in rules where r.role == .foreign {
            let affects: Bool
            switch r.target {
            case .nflog, .log, .counterOnly, .trace: affects = false
            default: affects = true
            }
            let whereText = AmbientLabeler.isAmbientChain(table: t, chain: c.name)
                ? "in Istio's chain \(t.name) \(c.name)" : "in \(t.name) \(c.name) ahead of the jump into Istio's chain"
            findings.append(RulesetFinding(kind: .foreign, severity: affects ? .problem : .note,
                message: "rule \(r.position) \(whereText) is not one Istio writes: \(r.text)", rule: r))
        }
    }

    private mutating func checkDuplicates(_ tables: [Table]) {
        for t in tables { for c in t.chains where AmbientLabeler.isAmbientChain(table: t, chain: c.name) || c.hook != nil {
            var seen: [String: Rule] = [:]
            for r in c.rules where !r.isMeshtraceRule {
                let key = RulesetAnalysis.semanticKey(r)
                if let first = seen[key] {
                    findings.append(RulesetFinding(kind: .duplicate, severity: r.role == .other ? .note : .problem,
                        message: "\(t.name) \(c.name) rule \(r.position) repeats rule \(first.position) (\(r.role.rawValue)): Istio applied its rules twice, or a reconcile went wrong", rule: r))
                } else {
                    seen[key] = r
                }
            }
        } }
    }

    static func semanticKey(_ r: Rule) -> String {
        "\(r.matches.filter { if case .comment = $0 { return false }; return true })|\(r.target)"
    }

    private mutating func checkMissing(_ tables: [Table], _ roles: [AmbientRole], scopeName: String) {
        let present = Set(roles)
        let isPod = roles.contains { $0 != .hostProbeSNAT && $0 != .foreign }
        guard isPod else { return }
        var expected: [AmbientRole] = [.connmarkFromZtunnel, .connmarkRestore, .probeBypassOutbound, .ztunnelReplyBypass, .localBypass, .outboundCapture]
        switch variant.era {
        case .redirect: expected += [.inboundCapture, .probeBypassInbound]
        case .tproxy: expected += [.inboundCaptureTproxy, .inboundHboneTproxy, .probeBypassInbound, .loopbackAccept, .establishedAccept]
        case .none: break
        }
        if variant.dnsCapture { expected.append(.dnsCapture) }
        for role in expected where !present.contains(role) {
            findings.append(RulesetFinding(kind: .missing, severity: .problem,
                message: "\(scopeName): no '\(role.rawValue)' rule (\(role.summary))\(role == .connmarkFromZtunnel && variant.ingressMode ? " — ingress mode losing it is Istio #58546" : "")"))
        }
        if variant.dnsCapture {
            let n = roles.filter { $0 == .dnsCapture }.count
            if n < 2 {
                findings.append(RulesetFinding(kind: .missing, severity: .problem,
                    message: "\(scopeName): DNS capture has \(n) of its 2 rules (UDP and TCP port 53 → 15053)"))
            }
        }
        // The jumps: every Istio chain with rules must be reachable from its hook.
        for t in tables {
            for c in t.chains where AmbientLabeler.isAmbientChain(table: t, chain: c.name) && !c.rules.isEmpty {
                let reached = t.chains.contains { $0.rules.contains { r in
                    if case .jump(c.name) = r.target { return true }
                    if case .goto(c.name) = r.target { return true }
                    return false
                } }
                if !reached {
                    findings.append(RulesetFinding(kind: .missing, severity: .problem,
                        message: "\(scopeName): nothing jumps to \(t.name) \(c.name): its \(c.rules.count) rule(s) never run"))
                }
            }
        }
    }

    /// Istio's own order within each chain, as ranks; a rule before one of lower rank changes what wins.
    /// Virtual-interface capture/return pairs repeat per interface, so they share a rank.
    private static let expectedOrder: [[AmbientRole: Int]] = [
        [.probeBypassOutbound: 0, .dnsCapture: 1, .ztunnelReplyBypass: 2, .localBypass: 3, .outboundCapture: 4],
        [.virtualInterfaceCapture: 0, .virtualInterfaceReturn: 0, .probeBypassInbound: 1, .inboundCapture: 2],
        [.connmarkFromZtunnel: 0, .loopbackAccept: 1, .inboundHboneTproxy: 2, .establishedAccept: 3, .inboundCaptureTproxy: 4],
    ]
    private static let captureRoles: Set<AmbientRole> = [.outboundCapture, .inboundCapture, .inboundCaptureTproxy, .inboundHboneTproxy, .dnsCapture]

    private mutating func checkOrder(_ tables: [Table]) {
        for t in tables { for c in t.chains where AmbientLabeler.isAmbientChain(table: t, chain: c.name) {
            let rules = c.rules.filter { !$0.isMeshtraceRule }
            for order in RulesetAnalysis.expectedOrder {
                var highest: (Int, Rule)? = nil
                for r in rules {
                    guard let k = order[r.role] else { continue }
                    if let h = highest, k < h.0 {
                        findings.append(RulesetFinding(kind: .outOfOrder, severity: .problem,
                            message: "\(t.name) \(c.name): '\(r.role.rawValue)' (rule \(r.position)) comes after '\(h.1.role.rawValue)' (rule \(h.1.position)); Istio puts it first", rule: r))
                    }
                    if highest == nil || k > highest!.0 { highest = (k, r) }
                }
            }
            // A foreign rule ahead of a capture rule can decide before Istio does.
            for (k, f) in rules.enumerated() where f.role == .foreign {
                let decides: Bool
                switch f.target {
                case .return, .jump, .goto, .setMark, .unknown: decides = true
                default: decides = f.target.isTerminal
                }
                guard decides, let r = rules[(k + 1)...].first(where: { RulesetAnalysis.captureRoles.contains($0.role) }) else { continue }
                findings.append(RulesetFinding(kind: .outOfOrder, severity: .problem,
                    message: "\(t.name) \(c.name): foreign rule \(f.position) (\(f.text)) sits ahead of the '\(r.role.rawValue)' rule \(r.position) and decides first", rule: f))
            }
        } }
    }
}
