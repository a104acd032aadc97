// The classes of packet `meshtrace verify` evaluates: family × protocol × path × port class × mark, plus the
// probe address. Each class is one concrete first packet of a new connection, built from `PodParameters`.

public struct PodParameters: Sendable {
    public var podIPv4 = IPAddress("10.244.0.10")!
    public var podIPv6 = IPAddress("fd00:10:244::10")!
    public var remoteIPv4 = IPAddress("10.96.0.10")!
    public var remoteIPv6 = IPAddress("fd00:10:96::10")!
    public var interface = "eth0"
    public var appPort: UInt16 = 8080
    public var otherPort: UInt16 = 443
    /// Probe addresses; empty: the ones the ruleset names, else Istio's defaults.
    public var probeIPv4: IPAddress? = nil
    public var probeIPv6: IPAddress? = nil
    /// The pod has IPv6 (dual-stack): IPv6 classes are evaluated even when no rule mentions IPv6.
    public var dualStack = false
    /// istio-cni's `ip rule fwmark 0x111/0xfff lookup 100` + `local default dev lo table 100` are in place.
    public var policyRouting = true
    public init() {}

    /// True when `ip rule show` lists istio-cni's `fwmark 0x111/0xfff lookup 100`.
    public static func hasIstioPolicyRouting(ipRuleShow: String) -> Bool {
        ipRuleShow.split(separator: "\n").contains { $0.contains("fwmark 0x111/0xfff") && $0.contains("lookup 100") }
    }
}

public struct PacketClass: Hashable, Sendable, CustomStringConvertible {
    public enum Proto: String, Sendable, CaseIterable { case tcp, udp, icmp, sctp }
    public enum Path: String, Sendable, CaseIterable {
        case appToRemote = "app-remote"
        case appToOwnPodIP = "app-own-ip"
        case appToLoopback = "app-loopback"
        case inbound = "inbound"
        case inboundViaLo = "inbound-lo"
        case ztunnel = "ztunnel"

        public var summary: String {
            switch self {
            case .appToRemote: return "app → remote"
            case .appToOwnPodIP: return "app → own pod IP"
            case .appToLoopback: return "app → loopback"
            case .inbound: return "inbound from the pod's interface"
            case .inboundViaLo: return "inbound via lo (to the pod IP)"
            case .ztunnel: return "ztunnel-originated"
            }
        }
        var isAppOriginated: Bool { self == .appToRemote || self == .appToOwnPodIP || self == .appToLoopback }
    }
    public enum PortClass: String, Sendable, CaseIterable {
        case dns = "53", outbound = "15001", inbound = "15006", hbone = "15008", app = "app", other = "other", none = "-"
    }
    public enum MarkClass: String, Sendable, CaseIterable {
        case none, ztunnel = "0x539", connmark = "0x111", otherBits = "other"
        /// The concrete marks tried for the class; "other bits" tries several so a widened exclusion shows.
        public var samples: [UInt32] {
            switch self {
            case .none: return [0]
            case .ztunnel: return [0x539]
            case .connmark: return [0x111]
            case .otherBits: return [0x1000, 0x538, 0x500, 0x039, 0x100, 0x5ff, 0x4000_0000]
            }
        }
    }

    public var family: RuleFamily
    public var proto: Proto
    public var path: Path
    public var port: PortClass
    public var mark: MarkClass
    public var probe: Bool

    public init(family: RuleFamily, proto: Proto, path: Path, port: PortClass, mark: MarkClass, probe: Bool = false) {
        self.family = family; self.proto = proto; self.path = path; self.port = port; self.mark = mark; self.probe = probe
    }

    /// `v4/tcp/app-remote/other/none`, `v4/tcp/inbound/app/none/probe`: what a policy file names.
    public var id: String {
        "\(family == .ipv6 ? "v6" : "v4")/\(proto.rawValue)/\(path.rawValue)/\(port.rawValue)/\(mark == .none ? "none" : "mark-" + mark.rawValue)\(probe ? "/probe" : "")"
    }
    public var description: String { id }

    /// Every class meshtrace evaluates for one family. Marks apply to packets a local process sends; a packet
    /// arriving from the pod's interface carries none (the mark is scrubbed when a packet crosses netns).
    public static func all(family: RuleFamily) -> [PacketClass] {
        var out: [PacketClass] = []
        for proto in Proto.allCases {
            let ports: [PortClass] = proto == .icmp ? [.none] : [.dns, .outbound, .inbound, .hbone, .app, .other]
            for path in Path.allCases {
                let marks: [MarkClass]
                switch path {
                case .appToRemote, .appToOwnPodIP, .appToLoopback: marks = MarkClass.allCases
                case .inbound: marks = [.none]
                case .inboundViaLo: marks = [.none, .ztunnel]
                case .ztunnel: marks = [.ztunnel]
                }
                for port in ports { for mark in marks {
                    out.append(PacketClass(family: family, proto: proto, path: path, port: port, mark: mark))
                } }
                if path == .appToRemote || path == .inbound {
                    for port in ports { out.append(PacketClass(family: family, proto: proto, path: path, port: port, mark: .none, probe: true)) }
                }
            }
        }
        return out
    }
}

/// One concrete packet: what the rules see.
struct PacketState: Hashable {
    var family: RuleFamily
    var proto: UInt8
    var src: IPAddress
    var dst: IPAddress
    var sport: UInt16
    var dport: UInt16
    var iif: String?
    var oif: String?
    var mark: UInt32
    var ctmark: UInt32
    var ctState: String = "NEW"
    var untracked = false
    var zone: UInt16 = 0
}
