// Static escape verification: for every packet class, walk the ruleset the way the kernel would and say where
// the first packet of a new connection ends: captured by ztunnel, passed by design, or an escape.
//
// Kernel facts the walk follows (verified on this machine; see NETFILTER.md):
//  - Base chains of one hook run in priority order (raw -300, mangle -150, nat -100, filter 0; nft by priority).
//    ACCEPT ends only the current base chain; the next one at the hook still runs. DROP ends the packet.
//  - nat chains see only the first packet of a connection. Several nat chains at one hook run in order until one
//    of them NATs (nf_nat_inet_fn): an ACCEPT in one nat table does not stop a REDIRECT in the next.
//  - A packet a local process sends to a local address loops through lo: OUTPUT/POSTROUTING, then PREROUTING on lo
//    with its conntrack entry already confirmed, so nat PREROUTING does not run for it again.
//  - mangle OUTPUT (and nft `type route` chains) re-route when the mark changed; with istio-cni's
//    `ip rule fwmark 0x111/0xfff lookup 100` a packet marked 0x111 is routed to lo.

public enum VerifyVerdict: Sendable, Equatable {
    case captured(port: UInt16)
    case bypass(reason: String)
    /// `code` names the escape class for policies and JSON (uncaptured-tcp, forged-mark-0x539, ...).
    case escape(code: String, reason: String)
    case dropped(reason: String)
    /// ztunnel's own traffic sent back to ztunnel: not an escape, but the pod cannot work.
    case loop(reason: String)

    public var kind: String {
        switch self {
        case .captured: return "captured"
        case .bypass: return "bypass"
        case .escape: return "escape"
        case .dropped: return "dropped"
        case .loop: return "loop"
        }
    }
    public var isFailure: Bool { kind == "escape" || kind == "loop" }
    var severity: Int {
        switch self {
        case .escape: return 4
        case .loop: return 3
        case .dropped: return 2
        case .bypass: return 1
        case .captured: return 0
        }
    }
    public var summary: String {
        switch self {
        case .captured(let p): return "captured by ztunnel (\(p))"
        case .bypass(let r): return "bypass by design (\(r))"
        case .escape(let c, let r): return "ESCAPE [\(c)]: \(r)"
        case .dropped(let r): return "dropped (\(r))"
        case .loop(let r): return "LOOP: \(r)"
        }
    }
    public var code: String? {
        switch self {
        case .escape(let c, _): return c
        case .loop: return "ztunnel-loop"
        default: return nil
        }
    }
}

public struct ClassVerdict: Sendable {
    public var packetClass: PacketClass
    public var verdict: VerifyVerdict
    /// The rules that decided, in the order the packet met them.
    public var path: [String]
    /// Set when the verdict depends on a match meshtrace does not model (it assumed the worst).
    public var uncertainty: [String]
    /// The concrete packet the class was evaluated with.
    public var packet: String
    /// The policy line that accepts this failure, if any.
    public var acceptedBy: String?
    public var isEscape: Bool { verdict.isFailure && acceptedBy == nil }
}

public struct VerifyReport: Sendable {
    public var origin: String
    public var variant: RulesetVariant
    public var findings: [RulesetFinding]
    public var results: [ClassVerdict]
    public var families: [RuleFamily]
    public var escapes: [ClassVerdict] { results.filter(\.isEscape) }
    public var accepted: [ClassVerdict] { results.filter { $0.verdict.isFailure && $0.acceptedBy != nil } }
    public var exitStatus: ExitStatus { escapes.isEmpty ? .ok : .escapeFound }
}

public struct Verifier {
    public let ruleset: Ruleset
    public var pod: PodParameters
    public var policy: VerifyPolicy?
    /// With `strict`, the class every correct ruleset has (a process that sets ztunnel's mark itself) is an escape
    /// like any other; without it, it is accepted by `inherentAcceptance` and listed, not counted.
    public var strict: Bool = false
    let analysis: RulesetAnalysis
    static let ztunnelPorts: Set<UInt16> = [15001, 15006, 15008, 15053]
    static let maxWalks = 512
    /// Rules whose not matching is part of the proof of an escape.
    static let decisiveRoles: Set<AmbientRole> = [.outboundCapture, .inboundCapture, .inboundCaptureTproxy, .inboundHboneTproxy,
                                                  .dnsCapture, .virtualInterfaceCapture, .connmarkFromZtunnel, .connmarkRestore]

    /// Why `forged-mark-0x539` is accepted unless `strict`: the mark exclusion is how ztunnel's own packets avoid
    /// being captured again, so no ruleset can close it; only the pod's capabilities can (no CAP_NET_ADMIN/NET_RAW).
    public static let inherentAcceptance = "built-in: inherent to ambient's mark exclusion; a pod without CAP_NET_ADMIN/CAP_NET_RAW cannot set 0x539 (--strict counts it)"

    public init(ruleset: Ruleset, pod: PodParameters = PodParameters(), policy: VerifyPolicy? = nil, strict: Bool = false) {
        self.ruleset = ruleset; self.pod = pod; self.policy = policy; self.strict = strict
        self.analysis = RulesetAnalysis(ruleset, dualStack: pod.dualStack)
        (self.namedPorts, self.namedSourcePorts, self.namedAddresses, self.namedCombinations) = Verifier.namedSamples(ruleset)
    }

    // MARK: the values a class is tried with

    /// Destination ports the rules name (a port inside each range they match, one outside each range they match
    /// negated), tried besides `otherPort` for the "other" port class; and addresses they name the same way, tried
    /// besides the remote address. One sample port and one sample address cannot exercise a foreign
    /// `--dport 5432 -j RETURN` or `-d 192.168.0.0/16 -j RETURN`: the class would be called captured while that
    /// traffic escapes. (The mark class "other" tries several marks for the same reason.)
    let namedPorts: [UInt16]
    let namedAddresses: [IPAddress]
    /// Source ports the rules name, sampled the same way: any process can bind a source port (above 1023 without
    /// privileges), so a foreign `--sport 8080 -j RETURN` ahead of the capture is an escape for a connection made
    /// from that port, and a `--sport 53 -j ACCEPT` in PREROUTING one for inbound traffic sent from it.
    let namedSourcePorts: [UInt16]
    /// A rule that names two or more of them at once (`-p tcp --sport 8080 -d 192.168.0.0/16 -j RETURN`) matches only
    /// a packet with all of them: its values are tried together too. Each value alone is tried with the class's
    /// other values, one dimension at a time; every combination of every named value (marks × ports × addresses ×
    /// source ports, up to 32 each) took 32 s on a ruleset with 96 foreign rules.
    let namedCombinations: [NamedCombination]
    struct NamedCombination: Hashable { var dport: UInt16?; var sport: UInt16?; var address: IPAddress? }
    static let maxNamedSamples = 32

    /// Destination ports, source ports and addresses the rules name (see `namedPorts`).
    static func namedSamples(_ rs: Ruleset) -> ([UInt16], [UInt16], [IPAddress], [NamedCombination]) {
        var ports: [UInt16] = [], sourcePorts: [UInt16] = [], addresses: [IPAddress] = []
        var combinations: [NamedCombination] = []
        func sample(_ p: PortRange, _ negated: Bool, into xs: inout [UInt16]) {
            if !negated { xs.append(p.low) }
            else if p.low > 1 { xs.append(p.low - 1) }
            else if p.high < UInt16.max { xs.append(p.high + 1) }
        }
        func add(_ m: RuleMatch) {
            switch m {
            case .destinationPort(let p, let negated):
                sample(p, negated, into: &ports)
            case .sourcePort(let p, let negated):
                sample(p, negated, into: &sourcePorts)
            case .source(let c, let negated), .destination(let c, let negated):
                if let a = negated ? c.firstAddressAfter : c.sampleInside { addresses.append(a) }
            case .anyOf(let items, _):
                items.forEach(add)
            default:
                break
            }
        }
        for r in rs.allRules where !r.isMeshtraceRule {
            let (p0, s0, a0) = (ports.count, sourcePorts.count, addresses.count)
            r.matches.forEach(add)
            // The rule's own values (the first of each it named), when it named more than one kind.
            let combination = NamedCombination(dport: ports.count > p0 ? ports[p0] : nil, sport: sourcePorts.count > s0 ? sourcePorts[s0] : nil,
                                               address: addresses.count > a0 ? addresses[a0] : nil)
            if [combination.dport != nil, combination.sport != nil, combination.address != nil].filter({ $0 }).count >= 2 {
                combinations.append(combination)
            }
        }
        func unique<T: Hashable>(_ xs: [T]) -> [T] {
            var seen = Set<T>()
            return Array(xs.filter { seen.insert($0).inserted }.prefix(maxNamedSamples))
        }
        return (unique(ports.filter { $0 != 0 }), unique(sourcePorts.filter { $0 != 0 }), unique(addresses.filter { !$0.isLoopback }),
                unique(combinations))
    }

    /// The destination ports a class is tried with: its own port, or for "other" `otherPort` first and then every
    /// port the rules name that belongs to no other class.
    func portSamples(_ c: PacketClass) -> [UInt16] {
        let base = packet(for: c, mark: 0).dport
        guard c.port == .other else { return [base] }
        let classPorts: Set<UInt16> = [53, 15001, 15006, 15008, pod.appPort]
        return [base] + namedPorts.filter { $0 != base && !classPorts.contains($0) }
    }

    /// The source ports a class is tried with: the ephemeral port first, then every source port the rules name.
    func sourcePortSamples(_ c: PacketClass) -> [UInt16] {
        let base = packet(for: c, mark: 0).sport
        guard c.proto != .icmp else { return [base] }
        return [base] + namedSourcePorts.filter { $0 != base }
    }

    /// The remote addresses a class is tried with: the remote address first, then the addresses the rules name of
    /// the class's family (never the pod's own, a probe address or loopback: those are classes of their own).
    func remoteSamples(_ c: PacketClass) -> [IPAddress] {
        let base = packet(for: c, mark: 0)
        let remote: IPAddress
        switch c.path {
        case .appToRemote, .ztunnel: remote = base.dst
        case .inbound, .inboundViaLo: remote = base.src
        case .appToOwnPodIP, .appToLoopback: return [base.dst]
        }
        if c.probe { return [remote] }
        let fam: IPAddress.Family = c.family == .ipv6 ? .v6 : .v4
        let excluded: Set<IPAddress> = [remote, pod.podIPv4, pod.podIPv6, probeAddress(.ipv4), probeAddress(.ipv6)]
        let probes = Set(analysis.variant.probeAddresses)
        return [remote] + namedAddresses.filter { $0.family == fam && !excluded.contains($0) && !probes.contains($0) }
    }

    /// The families to evaluate: IPv4 unless the ruleset is IPv6 only; IPv6 when the pod is dual-stack or the
    /// ruleset has IPv6 rules.
    public var families: [RuleFamily] {
        let fams = Set(ruleset.tables.map(\.family))
        var out: [RuleFamily] = []
        if fams.contains(.ipv4) || fams.contains(.inet) || !fams.contains(.ipv6) { out.append(.ipv4) }
        // An IPv6 table, even an empty one, says the pod has IPv6.
        let v6Rules = ruleset.tables.contains { $0.family == .ipv6 } || ruleset.allRules.contains { $0.family == .inet && RulesetAnalysis.families(of: $0) == [.ipv6] }
        if pod.dualStack || v6Rules { out.append(.ipv6) }
        return out
    }

    public func run() -> VerifyReport {
        var results: [ClassVerdict] = []
        for fam in families {
            for c in PacketClass.all(family: fam) {
                var r = evaluate(c)
                if r.verdict.isFailure, let p = policy, let line = p.accepts(r) {
                    r.acceptedBy = line
                } else if !strict, r.verdict.code == "forged-mark-0x539" {
                    r.acceptedBy = Verifier.inherentAcceptance
                }
                results.append(r)
            }
        }
        return VerifyReport(origin: ruleset.origin, variant: analysis.variant, findings: analysis.findings,
                            results: results, families: families)
    }

    // MARK: one class

    func probeAddress(_ fam: RuleFamily) -> IPAddress {
        if fam == .ipv6 {
            return pod.probeIPv6 ?? analysis.variant.probeAddresses.first { $0.family == .v6 } ?? AmbientLabeler.defaultProbeV6
        }
        return pod.probeIPv4 ?? analysis.variant.probeAddresses.first { $0.family == .v4 } ?? AmbientLabeler.defaultProbeV4
    }

    func packet(for c: PacketClass, mark: UInt32) -> PacketState {
        let v6 = c.family == .ipv6
        let podIP = v6 ? pod.podIPv6 : pod.podIPv4
        let remote = c.probe ? probeAddress(c.family) : (v6 ? pod.remoteIPv6 : pod.remoteIPv4)
        let loopback = v6 ? IPAddress("::1")! : IPAddress("127.0.0.1")!
        let proto: UInt8
        switch c.proto {
        case .tcp: proto = 6
        case .udp: proto = 17
        case .sctp: proto = 132
        case .icmp: proto = v6 ? 58 : 1
        }
        let dport: UInt16
        switch c.port {
        case .dns: dport = 53
        case .outbound: dport = 15001
        case .inbound: dport = 15006
        case .hbone: dport = 15008
        case .app: dport = pod.appPort
        case .other: dport = pod.otherPort
        case .none: dport = 0
        }
        let sport: UInt16 = c.proto == .icmp ? 0 : 40000
        var s = PacketState(family: c.family, proto: proto, src: podIP, dst: remote, sport: sport, dport: dport,
                            iif: nil, oif: nil, mark: mark, ctmark: 0)
        switch c.path {
        case .appToRemote, .ztunnel: break
        case .appToOwnPodIP: s.dst = podIP
        case .appToLoopback: s.src = loopback; s.dst = loopback
        case .inbound: s.src = remote; s.dst = podIP; s.iif = pod.interface
        case .inboundViaLo: s.src = remote; s.dst = podIP
        }
        return s
    }

    /// The (destination port, remote address, source port) a class is tried with: its own values; each value the
    /// rules name, one dimension at a time, with the class's own for the others; and each rule's named values
    /// together (`namedCombinations`) where they apply to the class.
    func packetVariants(_ c: PacketClass) -> [(UInt16, IPAddress, UInt16)] {
        let ports = portSamples(c), remotes = remoteSamples(c), sports = sourcePortSamples(c)
        let (port, remote, sport) = (ports[0], remotes[0], sports[0])
        var out = [(port, remote, sport)]
        out += ports.dropFirst().map { ($0, remote, sport) }
        out += remotes.dropFirst().map { (port, $0, sport) }
        out += sports.dropFirst().map { (port, remote, $0) }
        for k in namedCombinations {
            if let p = k.dport, !ports.contains(p) { continue }
            if let a = k.address, !remotes.contains(a) { continue }
            if let s = k.sport, !sports.contains(s) { continue }
            out.append((k.dport ?? port, k.address ?? remote, k.sport ?? sport))
        }
        return out
    }

    func evaluate(_ c: PacketClass) -> ClassVerdict {
        var worst: ClassVerdict? = nil
        for m in c.mark.samples { for (port, remote, sport) in packetVariants(c) {
            var start = packet(for: c, mark: m)
            start.dport = port
            start.sport = sport
            switch c.path {
            case .appToRemote, .ztunnel: start.dst = remote
            case .inbound, .inboundViaLo: start.src = remote
            case .appToOwnPodIP, .appToLoopback: break
            }
            for w in walkPacket(start, path: c.path) {
                let v = verdict(for: c, walk: w, mark: m)
                var steps = w.steps
                if case .escape = v, w.nat == nil, w.replyEscape == nil {
                    steps.append(c.path == .inbound ? "end: no rule redirected it; delivered to the app on port \(w.state.dport)"
                                                    : "end: no rule redirected it; routed out \(w.state.oif ?? pod.interface)")
                }
                let cv = ClassVerdict(packetClass: c, verdict: v, path: steps, uncertainty: w.uncertain,
                                      packet: describe(start), acceptedBy: nil)
                if worst == nil || v.severity > worst!.verdict.severity { worst = cv }
            }
        } }
        // A marked packet that escapes is only the mark's fault when the unmarked one is captured.
        if c.mark != .none, case .escape = worst!.verdict {
            let plain = evaluate(PacketClass(family: c.family, proto: c.proto, path: c.path, port: c.port, mark: .none, probe: c.probe))
            if case .escape = plain.verdict {
                var r = plain
                r.packetClass = c
                return r
            }
        }
        return worst!
    }

    /// `verify` is about a pod's netns; the node's own rules (probe SNAT) say nothing about a pod's escapes.
    public static func checkVerifiable(_ rs: Ruleset) throws {
        let roles = Set(rs.allRules.map(\.role))
        if roles.contains(.hostProbeSNAT) && roles.isDisjoint(with: [.outboundCapture, .inboundCapture, .inboundCaptureTproxy, .connmarkFromZtunnel, .connmarkRestore]) {
            throw MeshtraceError.badInput("\(rs.origin) holds the node's probe SNAT rules (ISTIO_POSTRT), not a pod's: verify a pod's netns (--netns/--pid) or its iptables-save")
        }
    }

    func describe(_ s: PacketState) -> String {
        let proto = [6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"][Int(s.proto)] ?? "\(s.proto)"
        func ep(_ a: IPAddress, _ p: UInt16) -> String {
            s.proto == 1 || s.proto == 58 ? a.description : (a.family == .v6 ? "[\(a)]:\(p)" : "\(a):\(p)")
        }
        var d = "\(proto) \(ep(s.src, s.sport)) → \(ep(s.dst, s.dport))"
        if let i = s.iif { d += " in \(i)" }
        if s.mark != 0 { d += " mark 0x\(String(s.mark, radix: 16))" }
        return d
    }

    // MARK: the walk

    enum NatResult: Equatable { case redirect(UInt16), tproxy(UInt16), dnat(String) }

    struct Walk {
        var state: PacketState
        var steps: [String] = []
        var uncertain: [String] = []
        var nat: NatResult? = nil
        var natAtHook = false
        var dropped: String? = nil
        var replyEscape: String? = nil
    }

    /// Base chains for a hook and family, in priority order.
    func baseChains(_ hook: NetfilterHook, _ fam: RuleFamily) -> [(Table, Chain)] {
        var out: [(Int, Int, Table, Chain)] = []
        for (ti, t) in ruleset.tables.enumerated() where t.family == fam || t.family == .inet {
            for c in t.chains where c.hook == hook {
                out.append((c.priority ?? 0, ti, t, c))
            }
        }
        return out.sorted { ($0.0, $0.1) < ($1.0, $1.1) }.map { ($0.2, $0.3) }
    }

    static func isNat(_ t: Table, _ c: Chain) -> Bool { c.type == "nat" || (c.type == nil && t.name == "nat") }
    static func isRoute(_ t: Table, _ c: Chain) -> Bool { c.type == "route" || (t.name == "mangle" && t.backend != .nftables) }

    func isLocal(_ a: IPAddress) -> Bool { a.isLoopback || a == pod.podIPv4 || a == pod.podIPv6 }

    func route(_ s: inout PacketState) {
        if pod.policyRouting && s.mark & AmbientLabeler.markMask == AmbientLabeler.connMark { s.oif = "lo"; return }
        s.oif = isLocal(s.dst) ? "lo" : pod.interface
    }

    func runHook(_ hook: NetfilterHook, _ walks: [Walk], natAllowed: Bool) -> [Walk] {
        var current = walks
        for w in current.indices { current[w].natAtHook = false }
        for (t, c) in baseChains(hook, walks.first?.state.family ?? .ipv4) {
            let nat = Verifier.isNat(t, c)
            var next: [Walk] = []
            for w in current {
                if w.dropped != nil { next.append(w); continue }
                if nat && (!natAllowed || w.natAtHook || w.state.untracked || w.state.ctState != "NEW") { next.append(w); continue }
                let before = w.state.mark
                for (var r, end) in walkChain(t, c, w, depth: 0) {
                    switch end {
                    case .verdict(let v):
                        switch v {
                        case .drop, .reject: r.dropped = "\(t.name) \(c.name): \(RulesetReport.targetWord(v))"
                        // TPROXY (mangle) is not NAT: the nat chains after it still run for the packet.
                        case .redirect, .dnat: r.natAtHook = Verifier.isNat(t, c)
                        default: break
                        }
                    case .returned, .fellThrough:
                        if c.policy == .drop {
                            r.dropped = "policy DROP of \(t.name) \(c.name)"
                            r.steps.append("\(t.name) \(c.name): policy DROP")
                        }
                    }
                    if Verifier.isRoute(t, c), r.state.mark != before, r.state.iif == nil { route(&r.state) }
                    next.append(r)
                }
            }
            current = Array(next.prefix(Verifier.maxWalks))
        }
        return current
    }

    enum ChainEnd { case fellThrough, returned, verdict(RuleTarget) }

    func walkChain(_ t: Table, _ c: Chain, _ w: Walk, depth: Int) -> [(Walk, ChainEnd)] {
        guard depth < 32 else {
            var x = w
            x.uncertain.append("\(t.name) \(c.name): jumps nest deeper than 32; the walk stops there")
            return [(x, .fellThrough)]
        }
        return walkRules(t, c, from: 0, w, depth: depth)
    }

    private func walkRules(_ t: Table, _ c: Chain, from start: Int, _ w0: Walk, depth: Int) -> [(Walk, ChainEnd)] {
        var w = w0
        var i = start
        while i < c.rules.count {
            let r = c.rules[i]
            let m = matches(r, w.state)
            if m == .no {
                if Verifier.decisiveRoles.contains(r.role) { w.steps.append("\(t.name) \(c.name) #\(r.position) (\(r.role.rawValue)) does not match: \(r.text)") }
                i += 1
                continue
            }
            var results: [(Walk, ChainEnd)] = []
            if m == .maybe {
                // Assume both: the rule matches for some packets of the class and not for others.
                var unmatched = w
                let why = uncertainText(r, w.state)
                unmatched.uncertain.append("\(t.name) \(c.name) rule \(r.position) may match (\(why))")
                results += walkRules(t, c, from: i + 1, unmatched, depth: depth)
                w.uncertain.append("\(t.name) \(c.name) rule \(r.position) assumed to match (\(why))")
            }
            if results.count > Verifier.maxWalks { return Array(results.prefix(Verifier.maxWalks)) }
            let step = "\(t.name) \(c.name) #\(r.position): \(r.text)"
            w.steps.append(step)
            switch r.target {
            case .accept, .drop, .reject:
                return results + [(w, .verdict(r.target))]
            case .return:
                return results + [(w, .returned)]
            case .jump(let name), .goto(let name):
                guard let sub = t.chain(name) else { i += 1; continue }
                for (sw, end) in walkChain(t, sub, w, depth: depth + 1) {
                    switch end {
                    case .verdict: results.append((sw, end))
                    case .returned, .fellThrough:
                        if case .goto = r.target { results.append((sw, .returned)) }
                        else { results += walkRules(t, c, from: i + 1, sw, depth: depth) }
                    }
                }
                return results
            case .redirect(let p):
                guard let port = p else { w.nat = .redirect(w.state.dport); return results + [(w, .verdict(r.target))] }
                w.nat = .redirect(port)
                let v6 = w.state.family == .ipv6
                w.state.dst = w.state.iif == nil ? (v6 ? IPAddress("::1")! : IPAddress("127.0.0.1")!)
                                                 : (v6 ? pod.podIPv6 : pod.podIPv4)
                w.state.dport = port
                if w.state.iif == nil { w.state.oif = "lo" }
                return results + [(w, .verdict(r.target))]
            case .tproxy(let port, _, let mark, let mask):
                w.nat = .tproxy(port)
                if let mark { w.state.mark = (w.state.mark & ~(mask ?? 0xffff_ffff)) ^ mark }
                return results + [(w, .verdict(r.target))]
            case .dnat(let to):
                w.nat = .dnat(to)
                return results + [(w, .verdict(r.target))]
            case .snat, .masquerade:
                return results + [(w, .verdict(.accept))]
            case .setMark(let v, let mask):
                w.state.mark = (w.state.mark & ~mask) ^ v
            case .connmarkSet(let v, let mask):
                w.state.ctmark = (w.state.ctmark & ~mask) ^ v
            case .connmarkRestore(let nfmask, let ctmask):
                w.state.mark = (w.state.mark & ~nfmask) ^ (w.state.ctmark & ctmask)
            case .connmarkSave:
                w.state.ctmark = w.state.mark
            case .ctZone(let z):
                w.state.zone = z
            case .nflog, .log, .trace, .counterOnly:
                break
            case .unknown(let text):
                let lower = text.lowercased()
                if lower.contains("notrack") { w.state.untracked = true }
                else { w.uncertain.append("\(t.name) \(c.name) rule \(r.position): target '\(text)' is not modelled (treated as continue)") }
            }
            if !results.isEmpty { return results + walkRules(t, c, from: i + 1, w, depth: depth) }
            i += 1
        }
        return [(w, .fellThrough)]
    }

    enum Tri { case yes, no, maybe }

    /// What makes a rule "may match" for this packet: every match part the walk cannot decide (an owner or set
    /// match, or one meshtrace does not model), as the operator would recognise it.
    func uncertainText(_ r: Rule, _ s: PacketState) -> String {
        func describe(_ m: RuleMatch) -> [String] {
            guard match(m, s) == .maybe else { return [] }
            switch m {
            case .owner(let uid, let gid, let socketExists, let neg):
                var parts: [String] = []
                if let u = uid { parts.append("uid \(u)") }
                if let g = gid { parts.append("gid \(g)") }
                if socketExists { parts.append("socket exists") }
                let what = "owner" + (parts.isEmpty ? "" : " " + parts.joined(separator: ", "))
                return [(neg ? "not " : "") + what + ": the sending process is not known"]
            case .set(let name, let direction, let neg):
                return [(neg ? "not in" : "in") + " set \(name) \(direction): its members are not known"]
            case .unknown(let text):
                return [text]
            case .anyOf(let items, _):
                return items.flatMap(describe)
            default:
                return []
            }
        }
        let parts = r.matches.flatMap(describe)
        return parts.isEmpty ? "a match meshtrace cannot decide" : parts.joined(separator: "; ")
    }

    func matches(_ r: Rule, _ s: PacketState) -> Tri {
        var result = Tri.yes
        for m in r.matches {
            switch match(m, s) {
            case .no: return .no
            case .maybe: result = .maybe
            case .yes: break
            }
        }
        return result
    }

    func match(_ m: RuleMatch, _ s: PacketState) -> Tri {
        func tri(_ b: Bool, _ neg: Bool) -> Tri { (b != neg) ? .yes : .no }
        let fam: IPAddress.Family = s.family == .ipv6 ? .v6 : .v4
        switch m {
        case .source(let c, let neg):
            guard c.address.family == fam else { return .no }
            return tri(c.contains(s.src), neg)
        case .destination(let c, let neg):
            guard c.address.family == fam else { return .no }
            return tri(c.contains(s.dst), neg)
        case .protocolIs(let p, let neg):
            return tri(p == s.proto || (p == 1 && s.proto == 58 && s.family == .ipv6), neg)
        case .inInterface(let n, let neg):
            guard let i = s.iif else { return neg ? .yes : .no }
            return tri(Verifier.ifaceMatches(n, i), neg)
        case .outInterface(let n, let neg):
            guard let o = s.oif else { return neg ? .yes : .no }
            return tri(Verifier.ifaceMatches(n, o), neg)
        case .sourcePort(let p, let neg):
            guard [6, 17, 132, 136].contains(s.proto) else { return .no }
            return tri(p.contains(s.sport), neg)
        case .destinationPort(let p, let neg):
            guard [6, 17, 132, 136].contains(s.proto) else { return .no }
            return tri(p.contains(s.dport), neg)
        case .mark(let v, let mask, let neg):
            return tri(s.mark & mask == v, neg)
        case .connmark(let v, let mask, let neg):
            return tri(s.ctmark & mask == v, neg)
        case .ctstate(let states, let neg):
            let st = s.untracked ? "UNTRACKED" : s.ctState
            return tri(states.contains(st), neg)
        case .owner(_, _, let socketExists, let neg):
            if socketExists, s.iif == nil { return tri(true, neg) }
            return .maybe
        case .set:
            return .maybe
        case .comment:
            return .yes
        case .unknown:
            return .maybe
        case .family(let f, let neg):
            return tri(f == s.family, neg)
        case .anyOf(let items, let neg):
            var any = false, maybe = false
            for x in items {
                switch match(x, s) {
                case .yes: any = true
                case .maybe: maybe = true
                case .no: break
                }
            }
            if any { return tri(true, neg) }
            if maybe { return .maybe }
            return tri(false, neg)
        }
    }

    static func ifaceMatches(_ pattern: String, _ name: String) -> Bool {
        pattern.hasSuffix("+") ? name.hasPrefix(pattern.dropLast()) : pattern == name
    }

    /// OUTPUT → POSTROUTING (→ PREROUTING/INPUT on lo for local destinations) for a locally sent packet;
    /// PREROUTING → INPUT for one arriving on the pod's interface.
    func walkPacket(_ start: PacketState, path: PacketClass.Path) -> [Walk] {
        var s = start
        if path == .inbound {
            var walks = runHook(.prerouting, [Walk(state: s)], natAllowed: true)
            walks = runHook(.input, walks, natAllowed: true)
            return walks
        }
        route(&s)
        var walks = runHook(.output, [Walk(state: s)], natAllowed: true)
        walks = runHook(.postrouting, walks, natAllowed: true)
        var looped: [Walk] = []
        for var w in walks {
            guard w.dropped == nil, w.state.oif == "lo" else { looped.append(w); continue }
            // Through lo and back in: conntrack is confirmed now, so nat does not run again.
            w.state.iif = "lo"
            let outOif = w.state.oif
            w.state.oif = nil
            var back = runHook(.prerouting, [w], natAllowed: false)
            back = runHook(.input, back, natAllowed: false)
            for var b in back { b.state.oif = outOif; looped.append(b) }
        }
        if path == .inboundViaLo && start.proto == 6 && start.mark & AmbientLabeler.markMask == AmbientLabeler.ztunnelMark {
            looped = looped.map { replyCheck($0) }
        }
        return looped
    }

    /// The app's reply on a connection ztunnel opened into the pod must come back to ztunnel: the connmark set on
    /// the way in (0x111) is restored as packet mark, and istio-cni's ip rule routes mark 0x111 to lo.
    func replyCheck(_ w: Walk) -> Walk {
        guard w.dropped == nil else { return w }
        var out = w
        var reply = PacketState(family: w.state.family, proto: w.state.proto, src: w.state.dst, dst: start(w).src,
                                sport: w.state.dport, dport: start(w).sport, iif: nil, oif: nil, mark: 0,
                                ctmark: w.state.ctmark, ctState: "ESTABLISHED", untracked: w.state.untracked, zone: w.state.zone)
        route(&reply)
        let back = runHook(.output, [Walk(state: reply)], natAllowed: false)
        for b in back {
            if b.state.oif != "lo" {
                let got = "0x\(String(b.state.mark, radix: 16))"
                if b.state.mark & AmbientLabeler.markMask == AmbientLabeler.connMark {
                    // The connmark was restored: what is missing is the ip rule that routes 0x111 to lo.
                    out.replyEscape = "the app's reply (\(describe(reply))) gets mark \(got), but no ip rule (istio-cni's fwmark 0x111/0xfff lookup 100) routes it to lo: it leaves via \(b.state.oif ?? "?") instead of returning to ztunnel"
                } else {
                    out.replyEscape = "the app's reply (\(describe(reply))) gets mark \(got), not 0x111: it leaves via \(b.state.oif ?? "?") instead of returning to ztunnel"
                }
                out.steps += b.steps.map { "reply: " + $0 }
                if b.steps.isEmpty { out.steps.append("reply: no rule restores connmark 0x111 as the packet mark") }
            }
        }
        return out
    }

    private func start(_ w: Walk) -> (src: IPAddress, sport: UInt16) {
        // The original source survives NAT in OUTPUT (REDIRECT only rewrites the destination).
        (w.state.src, w.state.sport)
    }

    func verdict(for c: PacketClass, walk w: Walk, mark: UInt32) -> VerifyVerdict {
        if let d = w.dropped { return .dropped(reason: d) }
        if let e = w.replyEscape { return .escape(code: "reply-uncaptured", reason: e) }
        let famHasRules = ruleset.tables.contains { ($0.family == c.family || $0.family == .inet) && $0.chains.contains { !$0.rules.isEmpty } }
        let markText = "0x" + String(mark, radix: 16)
        switch w.nat {
        case .redirect(let p)?, .tproxy(let p)?:
            if c.path == .ztunnel { return .loop(reason: "ztunnel's own packet (mark 0x539) is redirected back to ztunnel :\(p)") }
            if Verifier.ztunnelPorts.contains(p) { return .captured(port: p) }
            return .escape(code: "redirect-not-ztunnel", reason: "redirected to local port \(p), where no ztunnel listener is")
        case .dnat(let to)?:
            if c.path == .ztunnel { return .bypass(reason: "ztunnel's own traffic, DNATed to \(to)") }
            return .escape(code: "dnat", reason: "DNATed to \(to) instead of ztunnel")
        case nil:
            break
        }
        let tcp = c.proto == .tcp
        switch c.path {
        case .ztunnel:
            if c.proto == .udp && c.port == .dns { return .bypass(reason: "ztunnel's upstream DNS (mark 0x539\(w.state.zone != 0 ? ", conntrack zone \(w.state.zone)" : ""))") }
            return .bypass(reason: "ztunnel's own traffic (mark 0x539) leaves directly")
        case .appToLoopback:
            return .bypass(reason: "loopback traffic stays in the pod")
        case .appToOwnPodIP:
            return .bypass(reason: "app → own pod IP stays local (lo)")
        case .inboundViaLo:
            return .bypass(reason: mark == AmbientLabeler.ztunnelMark ? "ztunnel's delivery into the app via lo" : "a local connection to the pod IP via lo")
        case .appToRemote:
            if w.state.oif == "lo" {
                return .bypass(reason: "mark \(markText) is routed to lo by istio-cni's ip rule (table 100): it never leaves the pod")
            }
            if c.proto == .udp && c.port == .dns {
                if !analysis.variant.dnsCapture { return .bypass(reason: "DNS capture is off: DNS goes directly to the resolver") }
                if mark == 0 { return .escape(code: "dns-uncaptured", reason: "UDP DNS is not redirected to ztunnel's DNS proxy although DNS capture is on") }
            } else if !tcp {
                return .bypass(reason: "\(c.proto == .udp ? "non-DNS UDP" : c.proto.rawValue.uppercased()) is not captured by design")
            }
            if c.probe { return .bypass(reason: "traffic to the kubelet probe address \(probeAddress(c.family)) bypasses ztunnel") }
            if !famHasRules {
                return .escape(code: c.family == .ipv6 ? "ipv6-uncaptured" : "ipv4-uncaptured",
                               reason: "no \(c.family == .ipv6 ? "IPv6" : "IPv4") rules at all: \(c.proto.rawValue.uppercased()) leaves via \(w.state.oif ?? pod.interface) without ztunnel")
            }
            switch mark {
            case 0: return .escape(code: "uncaptured-\(c.proto.rawValue)", reason: "leaves via \(w.state.oif ?? pod.interface) without passing ztunnel")
            case AmbientLabeler.ztunnelMark:
                return .escape(code: "forged-mark-0x539", reason: "a process able to set mark 0x539 (CAP_NET_ADMIN, or CAP_NET_RAW on newer kernels) sends it past ztunnel")
            case AmbientLabeler.connMark:
                return .escape(code: "forged-mark-0x111", reason: "a process able to set mark 0x111 sends it past ztunnel")
            default:
                return .escape(code: "mark-exclusion-wide", reason: "mark \(markText) exempts it from capture: the exclusion is wider than ztunnel's 0x539/0xfff")
            }
        case .inbound:
            if !tcp { return .bypass(reason: "inbound \(c.proto.rawValue.uppercased()) is not captured by design") }
            if c.probe { return .bypass(reason: "kubelet probe from \(probeAddress(c.family)) bypasses ztunnel") }
            if Verifier.ztunnelPorts.contains(w.state.dport) && w.state.dport != 15053 {
                return .captured(port: w.state.dport)
            }
            if !famHasRules {
                return .escape(code: c.family == .ipv6 ? "ipv6-uncaptured" : "ipv4-uncaptured",
                               reason: "no \(c.family == .ipv6 ? "IPv6" : "IPv4") rules at all: inbound TCP reaches the app without ztunnel")
            }
            if analysis.variant.ingressMode { return .bypass(reason: "ingress mode: inbound capture is off for this pod") }
            return .escape(code: "inbound-uncaptured", reason: "inbound TCP reaches the app without ztunnel (no policy, no mTLS)")
        }
    }
}

/// A site's list of failure classes it accepts (docs/VERIFY.md):
///
///     # comment
///     allow v4/tcp/app-remote/*/mark-0x539     # glob over class ids
///     allow reason forged-mark-0x539           # every class with this escape code
public struct VerifyPolicy: Sendable {
    struct Entry: Sendable { var glob: String?; var reason: String?; var line: Int; var text: String }
    var entries: [Entry] = []
    public let origin: String

    public init(text: String, origin: String) throws {
        self.origin = origin
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
            if words.isEmpty { continue }
            guard words[0] == "allow" else {
                throw MeshtraceError.badInput("\(origin) line \(i + 1): expected 'allow CLASS-GLOB' or 'allow reason CODE', got '\(IptablesParser.excerpt(words[0]))'")
            }
            if words.count == 3, words[1] == "reason" {
                entries.append(Entry(glob: nil, reason: words[2], line: i + 1, text: raw.trimmingCharacters(in: .whitespaces)))
            } else if words.count == 2 {
                guard words[1].split(separator: "/").count >= 2 || words[1] == "*" else {
                    throw MeshtraceError.badInput("\(origin) line \(i + 1): '\(IptablesParser.excerpt(words[1]))' is not a class glob like v4/tcp/app-remote/*/mark-0x539")
                }
                entries.append(Entry(glob: words[1], reason: nil, line: i + 1, text: raw.trimmingCharacters(in: .whitespaces)))
            } else {
                throw MeshtraceError.badInput("\(origin) line \(i + 1): expected 'allow CLASS-GLOB' or 'allow reason CODE'")
            }
        }
    }

    public static func load(file: String) throws -> VerifyPolicy {
        guard let d = FileManager.default.contents(atPath: file), let t = String(data: d, encoding: .utf8) else {
            throw MeshtraceError.badInput("\(file): cannot read the policy file")
        }
        return try VerifyPolicy(text: t, origin: (file as NSString).lastPathComponent)
    }

    /// "policy.txt line 3: allow ..." when an entry accepts this failure.
    func accepts(_ r: ClassVerdict) -> String? {
        for e in entries {
            if let reason = e.reason, reason == r.verdict.code { return "\(origin) line \(e.line): \(e.text)" }
            if let g = e.glob, VerifyPolicy.glob(g, r.packetClass.id) { return "\(origin) line \(e.line): \(e.text)" }
        }
        return nil
    }

    /// Shell-style: `*` matches any run of characters (slashes included), `?` one character.
    static func glob(_ pattern: String, _ s: String) -> Bool {
        let p = Array(pattern.utf8), t = Array(s.utf8)
        var pi = 0, ti = 0, star = -1, mark = 0
        while ti < t.count {
            if pi < p.count && (p[pi] == t[ti] || p[pi] == UInt8(ascii: "?")) { pi += 1; ti += 1 }
            else if pi < p.count && p[pi] == UInt8(ascii: "*") { star = pi; mark = ti; pi += 1 }
            else if star >= 0 { pi = star + 1; mark += 1; ti = mark }
            else { return false }
        }
        while pi < p.count && p[pi] == UInt8(ascii: "*") { pi += 1 }
        return pi == p.count
    }
}

import Foundation
