import Foundation

// Gives every rule its ambient role (see AmbientRole and the shared reference AMBIENT.md).
//
// Roles come from what a rule does, not from its position, so a reordered or partly rewritten ruleset is still
// labelled: a REDIRECT to 15001 is the outbound capture wherever it sits. Istio has changed the exact spelling of
// its rules between versions (e.g. `-p tcp -m tcp` vs `-p tcp`, `--to-port` vs `--to-ports`, the nft `ct mark`
// rewrite), so matching is on the parsed meaning.

public enum AmbientLabeler {
    public static let ztunnelMark: UInt32 = 0x539
    public static let connMark: UInt32 = 0x111
    public static let markMask: UInt32 = 0xfff
    public static let defaultProbeV4 = IPAddress("169.254.7.127")!
    public static let defaultProbeV6 = IPAddress("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")!

    public static func label(_ rs: inout Ruleset) {
        for ti in rs.tables.indices {
            let table = rs.tables[ti]
            for ci in table.chains.indices {
                let chain = table.chains[ci]
                let ambient = isAmbientChain(table: table, chain: chain.name)
                // Rules ahead of the jump into the ambient chain see every packet first.
                let jumpIndex = chain.rules.firstIndex { r in
                    switch r.target {
                    // The host's ISTIO_POSTRT sits among the node's own rules; only the pod's jumps are guarded.
                    case .jump(let n), .goto(let n): return isAmbientChain(table: table, chain: n) && n != "ISTIO_POSTRT"
                    default: return false
                    }
                }
                for ri in chain.rules.indices {
                    var r = rs.tables[ti].chains[ci].rules[ri]
                    if let m = meshtraceRole(r) {
                        r.role = m
                    } else if case .jump(let n) = r.target, isAmbientChain(table: table, chain: n) {
                        r.role = .jumpToAmbientChain
                    } else if case .goto(let n) = r.target, isAmbientChain(table: table, chain: n) {
                        r.role = .jumpToAmbientChain
                    } else if ambient {
                        r.role = role(of: r, table: table, chain: chain)
                    } else if chain.hook != nil, let j = jumpIndex, ri < j {
                        r.role = .foreign
                    } else {
                        r.role = .other
                    }
                    rs.tables[ti].chains[ci].rules[ri] = r
                }
            }
        }
    }

    /// Istio's chains: `ISTIO_PRERT`, `ISTIO_OUTPUT`, `ISTIO_POSTRT` (host), and every chain of the native nft
    /// tables `istio-ambient-*` (their base chains only jump into `istio-prerouting` / `istio-output`).
    public static func isAmbientChain(table: Table, chain: String) -> Bool {
        if table.name.hasPrefix("istio-ambient") { return !["prerouting", "output", "postrouting", "input"].contains(chain) }
        return chain == "ISTIO_PRERT" || chain == "ISTIO_OUTPUT" || chain == "ISTIO_POSTRT"
    }

    public static func meshtraceRole(_ r: Rule) -> AmbientRole? {
        var prefix: String? = nil
        switch r.target {
        case .nflog(_, let p), .log(let p): prefix = p
        default: break
        }
        let tagged = r.matches.contains { if case .comment(let c) = $0 { return c.contains("meshtrace") }; return false }
        if let p = prefix, let tag = RuleTag(prefix: p) {
            if case .rule = tag.position { return .meshtraceTwin }
            return .meshtraceObservation
        }
        if tagged || prefix?.hasPrefix("mt:") == true {
            if case .trace = r.target { return .meshtraceObservation }
            return .meshtraceTwin
        }
        return nil
    }

    static func isInbound(_ chain: Chain, table: Table) -> Bool {
        chain.name == "ISTIO_PRERT" || chain.name == "istio-prerouting" || chain.hook == .prerouting
    }

    static func role(of r: Rule, table: Table, chain: Chain) -> AmbientRole {
        let inbound = isInbound(chain, table: table)
        let m = r.matches
        func has(_ p: (RuleMatch) -> Bool) -> Bool { m.contains(where: p) }
        let marksZtunnel = has { if case .mark(let v, let k, false) = $0 { return v & k == ztunnelMark & k && k & markMask != 0 }; return false }
        let marksConn = has { if case .mark(let v, let k, false) = $0 { return v & k == connMark & k && k & markMask != 0 }; return false }
        let connmarkConn = has { if case .connmark(let v, let k, false) = $0 { return v & k == connMark & k }; return false }
        let tcp = has { if case .protocolIs(6, false) = $0 { return true }; return false }
        let inIf = has { if case .inInterface(let n, false) = $0 { return n != "lo" }; return false }
        let inLo = has { if case .inInterface("lo", false) = $0 { return true }; return false }
        let outLo = has { if case .outInterface("lo", false) = $0 { return true }; return false }
        let notToLoopback = has { if case .destination(let c, true) = $0 { return c.address.isLoopback }; return false }
        let established = has { if case .ctstate(let s, false) = $0 { return s.contains("ESTABLISHED") || s.contains("RELATED") }; return false }
        let hostSource = m.compactMap { (x: RuleMatch) -> CIDR? in if case .source(let c, false) = x, isHost(c) { return c }; return nil }.first
        let hostDest = m.compactMap { (x: RuleMatch) -> CIDR? in if case .destination(let c, false) = x, isHost(c), !c.address.isLoopback { return c }; return nil }.first

        switch r.target {
        case .connmarkSet(let v, let k) where v & k & markMask == connMark:
            return marksZtunnel || r.matches.isEmpty ? .connmarkFromZtunnel : .foreign
        case .connmarkRestore:
            return connmarkConn ? .connmarkRestore : .foreign
        case .ctZone:
            return .dnsConntrackZone
        case .redirect(let p):
            switch p {
            case 15001?: return inbound && inIf ? .virtualInterfaceCapture : (inbound ? .foreign : .outboundCapture)
            case 15006?: return inbound ? .inboundCapture : .foreign
            case 15053?: return .dnsCapture
            default: return .foreign
            }
        case .tproxy(let p, _, _, _):
            switch p {
            case 15006: return .inboundCaptureTproxy
            case 15008: return .inboundHboneTproxy
            default: return .foreign
            }
        case .return:
            if inIf { return .virtualInterfaceReturn }
            if marksZtunnel { return .ztunnelPacketBypass }
            return .foreign
        case .accept:
            if inbound, hostSource != nil, tcp { return .probeBypassInbound }
            if !inbound, hostDest != nil, tcp { return .probeBypassOutbound }
            if marksConn, tcp || !inbound { return .ztunnelReplyBypass }
            if outLo, notToLoopback { return .localBypass }
            if inLo { return .loopbackAccept }
            if established { return .establishedAccept }
            if marksZtunnel { return .ztunnelPacketBypass }
            return .foreign
        case .snat:
            return chain.name == "ISTIO_POSTRT" ? .hostProbeSNAT : .foreign
        default:
            return .foreign
        }
    }

    static func isHost(_ c: CIDR) -> Bool { c.prefixLength == (c.address.family == .v4 ? 32 : 128) }
}

extension Ruleset {
    /// The backends whose tables hold Istio's ambient chains with at least one rule. More than one is a finding
    /// (a known Istio bug writes a second full ruleset into the other backend).
    public var ambientBackends: [RulesetBackend] {
        var out: [RulesetBackend] = []
        for t in tables where t.chains.contains(where: { AmbientLabeler.isAmbientChain(table: t, chain: $0.name) && !$0.rules.isEmpty }) {
            if !out.contains(t.backend) { out.append(t.backend) }
        }
        return out
    }

    /// Every rule with the table it belongs to, in file order.
    public var rulesWithTables: [(Table, Chain, Rule)] {
        tables.flatMap { t in t.chains.flatMap { c in c.rules.map { (t, c, $0) } } }
    }
}
