import Foundation

/// How a connection's journey through a pod's rules ended, in the terms `meshtrace verify` and the correlator use.
public enum LabVerdict: String, Sendable, Codable {
    /// The connection went through ztunnel (a listener on 15001/15006/15008/15053 handled it).
    case captured
    /// It passed uncaptured, as the ambient design intends (probe, non-DNS UDP, DNS capture off, ...).
    case bypass = "bypass by design"
    /// It left (or entered) the pod without ztunnel, and nothing in the design says it should.
    case escape
    /// The rules captured it, but nothing listened on ztunnel's port: the kernel answered its SYN with a RST
    /// (ztunnel down, its rules still in place). Not an escape: the app's connection failed, none left.
    case refused = "refused"
}

/// What the truth of a scenario is: the verdict and, in words, why.
public struct ScenarioExpectation: Sendable {
    public var verdict: LabVerdict
    public var because: String
}

/// One thing the lab makes happen in the pods, with its known truth.
public enum Scenario: String, Sendable, CaseIterable {
    case outbound = "outbound"
    case service = "service"
    case serviceOutside = "service-outside"
    case inboundHBONE = "inbound-hbone"
    case inboundPlaintext = "inbound-plaintext"
    case probe = "probe"
    case passthrough = "passthrough"
    case dns = "dns"
    case udp = "udp"
    case markEscape = "mark-escape"
    case outboundIPv6 = "outbound-ipv6"
    case ipv6Escape = "ipv6-escape"
    case ruleDeleted = "rule-deleted"
    case foreignAccept = "foreign-accept"
    case ztunnelDown = "ztunnel-down"

    public static func named(_ name: String) throws -> Scenario {
        guard let s = Scenario(rawValue: name) else {
            throw MeshtraceError(.usage, "unknown scenario '\(name)': one of \(allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return s
    }

    public var summary: String {
        switch self {
        case .outbound: return "client app -> server:80, through the client's ztunnel (15001) and HBONE to the server's :15008"
        case .service: return "client app -> service VIP 10.96.0.20:80: the client's ztunnel resolves it to the server pod and tunnels to its :15008"
        case .serviceOutside: return "client app -> service VIP 10.96.0.30:80, whose endpoint (the peer) is outside the mesh: ztunnel passes it through, 0x539-marked"
        case .inboundHBONE: return "the same request seen in the server pod: HBONE in on :15008, ztunnel's 0x539 leg into the app, 0x111 replies"
        case .inboundPlaintext: return "peer outside the mesh -> server:80, redirected (or TPROXYed) to the server's ztunnel on 15006"
        case .probe: return "kubelet-style probe from 169.254.7.127 -> server:80"
        case .passthrough: return "client app -> peer:80 (outside the mesh): ztunnel passes it through, 0x539-marked"
        case .dns: return "client app -> DNS 10.244.0.1:53 over UDP"
        case .udp: return "client app -> peer:9999 over UDP (not DNS)"
        case .markEscape: return "client app sets SO_MARK 0x539 on its own socket, then -> server:80"
        case .outboundIPv6: return "dual-stack: client app -> server [IPv6]:80, through ztunnel where the ruleset has IPv6 rules"
        case .ipv6Escape: return "dual-stack client pod without ip6tables rules: app -> server [IPv6]:80"
        case .ruleDeleted: return "the client's 15001 REDIRECT rule deleted, then app -> server:80"
        case .foreignAccept: return "another tool's ACCEPT inserted ahead of the 15001 rule, then app -> server:80"
        case .ztunnelDown: return "the client's ztunnel stopped (its rules stay), then app -> server:80"
        }
    }

    /// The pod whose network namespace is traced for this scenario.
    public var tracedRole: LabPod.Role {
        switch self {
        case .inboundHBONE, .inboundPlaintext, .probe: return .server
        default: return .client
        }
    }

    public var needsDualStack: Bool { self == .ipv6Escape || self == .outboundIPv6 }

    /// The scenarios `meshtrace lab` runs when none is named: all of them, the rule mutations last.
    public static var defaultSet: [Scenario] { allCases }

    public func expectation(ruleset: LabRuleset) -> ScenarioExpectation {
        switch self {
        case .outbound: return .init(verdict: .captured, because: "nat ISTIO_OUTPUT REDIRECTs app TCP to 15001; ztunnel tunnels it to server:15008")
        case .service: return .init(verdict: .captured, because: "nat ISTIO_OUTPUT REDIRECTs app TCP to 15001 whatever its destination; ztunnel tunnels the VIP's connection to the server pod's :15008")
        case .serviceOutside: return .init(verdict: .captured, because: "redirected to 15001; ztunnel resolves the VIP to an endpoint outside the mesh and connects to it directly")
        case .inboundHBONE: return .init(verdict: .captured, because: "dport 15008 is not redirected and lands on ztunnel, which connects to the app from the client's address")
        case .inboundPlaintext:
            return .init(verdict: .captured, because: ruleset.text.contains("TPROXY")
                ? "mangle ISTIO_PRERT TPROXYs inbound TCP to 15006 (mark 0x111, delivered by table 100)"
                : "nat ISTIO_PRERT REDIRECTs inbound TCP (not 15008) to 15006")
        case .probe: return .init(verdict: .bypass, because: "the probe source 169.254.7.127 is ACCEPTed before the 15006 REDIRECT")
        case .passthrough: return .init(verdict: .captured, because: "redirected to 15001; the destination is outside the mesh, so ztunnel connects to it directly")
        case .dns:
            return ruleset.capturesDNS
                ? .init(verdict: .captured, because: "DNS capture is on: UDP/53 is REDIRECTed to ztunnel's 15053")
                : .init(verdict: .bypass, because: "this ruleset has DNS capture off: DNS goes straight to the resolver")
        case .udp: return .init(verdict: .bypass, because: "the rules capture TCP (and DNS) only: other UDP passes by design")
        case .markEscape: return .init(verdict: .escape, because: "a socket marked 0x539 matches '! --mark 0x539' nowhere: the app passes as ztunnel")
        case .outboundIPv6:
            if ruleset.form == .iptables && ruleset.ipv6Text != nil {
                return .init(verdict: .captured, because: "ip6tables nat ISTIO_OUTPUT REDIRECTs to 15001 as for IPv4; HBONE to [server]:15008")
            }
            return .init(verdict: .escape, because: ruleset.form == .nftables
                ? "this nft ruleset matches 'ip daddr' (IPv4 only): IPv6 TCP is not redirected"
                : "this ruleset has no ip6tables rules: IPv6 TCP is not redirected")
        case .ipv6Escape: return .init(verdict: .escape, because: "no ip6tables rules: IPv6 TCP is never redirected")
        case .ruleDeleted: return .init(verdict: .escape, because: "without the 15001 REDIRECT nothing captures outbound TCP")
        case .foreignAccept: return .init(verdict: .escape, because: "the foreign ACCEPT ends the nat walk before the 15001 REDIRECT")
        case .ztunnelDown: return .init(verdict: .refused, because: "the 15001 REDIRECT still captures app TCP, and nothing listens on 15001: the kernel answers the SYN with a RST")
        }
    }
}
