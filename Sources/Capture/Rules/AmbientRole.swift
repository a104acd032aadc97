// What a rule is for in Istio ambient's in-pod redirection (see docs/AMBIENT-ROLES.md and
// shared reference AMBIENT.md). The ruleset model assigns one to every rule it reads; the correlator
// prints it next to every hit.

public enum AmbientRole: String, Sendable, CaseIterable, Codable {
    /// `-A PREROUTING -j ISTIO_PRERT`, `-A OUTPUT -j ISTIO_OUTPUT`, nft `jump istio-*`.
    case jumpToAmbientChain = "jump"
    /// mangle ISTIO_PRERT: packet mark 0x539 → connmark 0x111 (ztunnel's connections into the pod).
    case connmarkFromZtunnel = "connmark-set"
    /// mangle ISTIO_OUTPUT: connmark 0x111 → packet mark on the app's replies.
    case connmarkRestore = "connmark-restore"
    /// nat ISTIO_PRERT `-s 169.254.7.127 -p tcp -j ACCEPT` (or the IPv6 probe address).
    case probeBypassInbound = "probe-bypass-in"
    /// nat ISTIO_OUTPUT `-d 169.254.7.127 -p tcp -j ACCEPT`.
    case probeBypassOutbound = "probe-bypass-out"
    /// nat ISTIO_PRERT REDIRECT --to-ports 15006 (inbound plaintext → ztunnel).
    case inboundCapture = "inbound-capture"
    /// TPROXY era: mangle ISTIO_PRERT TPROXY --on-port 15006.
    case inboundCaptureTproxy = "inbound-capture-tproxy"
    /// TPROXY era: mangle ISTIO_PRERT TPROXY --on-port 15008 (HBONE).
    case inboundHboneTproxy = "inbound-hbone-tproxy"
    /// nat ISTIO_OUTPUT REDIRECT --to-ports 15001 (all other outbound TCP → ztunnel).
    case outboundCapture = "outbound-capture"
    /// nat ISTIO_OUTPUT REDIRECT 53 → 15053 (UDP or TCP).
    case dnsCapture = "dns-capture"
    /// raw ISTIO_OUTPUT / ISTIO_PRERT CT --zone 1 for ztunnel's upstream DNS.
    case dnsConntrackZone = "dns-ct-zone"
    /// nat ISTIO_OUTPUT `-p tcp -m mark --mark 0x111/0xfff -j ACCEPT`.
    case ztunnelReplyBypass = "ztunnel-reply-bypass"
    /// nat ISTIO_OUTPUT `! -d 127.0.0.1/32 -o lo -j ACCEPT` (app → its own pod IP).
    case localBypass = "local-bypass"
    /// virtual interfaces: `-i IF -p tcp -j REDIRECT --to-ports 15001`.
    case virtualInterfaceCapture = "virtual-interface-capture"
    /// virtual interfaces: `-i IF -j RETURN`.
    case virtualInterfaceReturn = "virtual-interface-return"
    /// TPROXY era: `-i lo ... ACCEPT` and conntrack RELATED,ESTABLISHED ACCEPT in mangle ISTIO_PRERT.
    case loopbackAccept = "loopback-accept"
    case establishedAccept = "established-accept"
    /// TPROXY era: mark-based ACCEPT / RETURN in mangle that skips ztunnel's own packets.
    case ztunnelPacketBypass = "ztunnel-packet-bypass"
    /// Host netns: nat ISTIO_POSTRT SNAT of kubelet probes to 169.254.7.127.
    case hostProbeSNAT = "host-probe-snat"
    /// meshtrace's own NFLOG twins and observation points.
    case meshtraceTwin = "meshtrace-twin"
    case meshtraceObservation = "meshtrace-observe"
    /// A rule in an ambient chain (or ahead of its jump) that Istio does not write.
    case foreign = "foreign"
    /// A built-in chain's policy or a rule outside the ambient chains that does not affect them.
    case other = "other"

    /// What the role means, for a person.
    public var summary: String {
        switch self {
        case .jumpToAmbientChain: return "jump into the ambient chain"
        case .connmarkFromZtunnel: return "ztunnel's packet (mark 0x539) → connmark 0x111"
        case .connmarkRestore: return "connmark 0x111 → packet mark (reply to ztunnel via table 100)"
        case .probeBypassInbound: return "kubelet probe from 169.254.7.127 bypasses ztunnel"
        case .probeBypassOutbound: return "reply to kubelet probe bypasses ztunnel"
        case .inboundCapture: return "inbound TCP → ztunnel 15006"
        case .inboundCaptureTproxy: return "inbound TCP → ztunnel 15006 (TPROXY)"
        case .inboundHboneTproxy: return "inbound HBONE → ztunnel 15008 (TPROXY)"
        case .outboundCapture: return "outbound TCP → ztunnel 15001"
        case .dnsCapture: return "DNS → ztunnel 15053"
        case .dnsConntrackZone: return "ztunnel's upstream DNS → conntrack zone 1"
        case .ztunnelReplyBypass: return "reply on a ztunnel-opened connection (mark 0x111) is not captured"
        case .localBypass: return "app → own pod IP via lo is not captured"
        case .virtualInterfaceCapture: return "TCP from a virtual interface → ztunnel 15001"
        case .virtualInterfaceReturn: return "other traffic from a virtual interface returns"
        case .loopbackAccept: return "traffic on lo is not captured"
        case .establishedAccept: return "established connections are not captured again"
        case .ztunnelPacketBypass: return "ztunnel's own packets are not captured"
        case .hostProbeSNAT: return "host: kubelet probe SNAT to 169.254.7.127"
        case .meshtraceTwin: return "meshtrace NFLOG twin"
        case .meshtraceObservation: return "meshtrace observation point"
        case .foreign: return "not written by Istio"
        case .other: return "outside the ambient chains"
        }
    }
}
