// The one record every source is decoded into and every later stage consumes.
//
// A `PacketRecord` is a plain value with no reference-counted storage in it, so a decoder can fill
// one in place for every packet of a capture without allocating (the gopacket "decode into a
// preallocated struct" fast path). Strings that would allocate (NFLOG prefixes) are interned into
// `RuleTag` ids by the decoder; interface names fit Swift's inline small-string storage.

/// An IPv4 or IPv6 address held inline: IPv4 lives in the low 32 bits of `lo`.
public struct IPAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public enum Family: UInt8, Sendable { case none = 0, v4 = 4, v6 = 6 }
    public var family: Family
    public var hi: UInt64
    public var lo: UInt64

    public static let none = IPAddress(family: .none, hi: 0, lo: 0)

    public init(family: Family, hi: UInt64, lo: UInt64) {
        self.family = family; self.hi = hi; self.lo = lo
    }

    /// IPv4 from the 32-bit value in network order read as a big-endian integer (10.0.0.1 = 0x0A000001).
    public init(v4 value: UInt32) {
        self.init(family: .v4, hi: 0, lo: UInt64(value))
    }

    public init(v6 hi: UInt64, _ lo: UInt64) {
        self.init(family: .v6, hi: hi, lo: lo)
    }

    public var v4Value: UInt32 { UInt32(truncatingIfNeeded: lo) }

    public var isLoopback: Bool {
        switch family {
        case .v4: return (v4Value >> 24) == 127
        case .v6: return hi == 0 && lo == 1
        case .none: return false
        }
    }

    public static func < (a: IPAddress, b: IPAddress) -> Bool {
        if a.family.rawValue != b.family.rawValue { return a.family.rawValue < b.family.rawValue }
        if a.hi != b.hi { return a.hi < b.hi }
        return a.lo < b.lo
    }

    /// Parses dotted IPv4 or RFC 4291 text IPv6 (with `::`, and an embedded dotted tail). No prefix length.
    public init?(_ text: Substring) {
        if text.contains(":") {
            guard let v = IPAddress.parseV6(text) else { return nil }
            self = v
        } else {
            guard let v = IPAddress.parseV4(text) else { return nil }
            self.init(v4: v)
        }
    }

    public init?(_ text: String) { self.init(Substring(text)) }

    static func parseV4(_ text: Substring) -> UInt32? {
        var value: UInt32 = 0
        var parts = 0
        for part in text.split(separator: ".", omittingEmptySubsequences: false) {
            guard !part.isEmpty, part.count <= 3, let n = UInt32(part), n <= 255 else { return nil }
            value = value << 8 | n
            parts += 1
        }
        return parts == 4 ? value : nil
    }

    static func parseV6(_ text: Substring) -> IPAddress? {
        var groups: [UInt16] = []
        var tail: [UInt16] = []
        var sawDouble = false
        let halves = text.components(separatedBy: "::")
        if halves.count > 2 { return nil }
        func parseGroups(_ s: String, into out: inout [UInt16]) -> Bool {
            if s.isEmpty { return true }
            let items = s.split(separator: ":", omittingEmptySubsequences: false)
            for (i, item) in items.enumerated() {
                if i == items.count - 1, item.contains(".") {
                    guard let v4 = parseV4(item) else { return false }
                    out.append(UInt16(v4 >> 16)); out.append(UInt16(v4 & 0xffff))
                    continue
                }
                guard !item.isEmpty, item.count <= 4, let g = UInt16(item, radix: 16) else { return false }
                out.append(g)
            }
            return true
        }
        guard parseGroups(halves[0], into: &groups) else { return nil }
        if halves.count == 2 {
            sawDouble = true
            guard parseGroups(halves[1], into: &tail) else { return nil }
        }
        let missing = 8 - groups.count - tail.count
        if sawDouble { if missing < 1 { return nil } } else if missing != 0 { return nil }
        let all = groups + Array(repeating: 0, count: sawDouble ? missing : 0) + tail
        var hi: UInt64 = 0, lo: UInt64 = 0
        for i in 0..<4 { hi = hi << 16 | UInt64(all[i]) }
        for i in 4..<8 { lo = lo << 16 | UInt64(all[i]) }
        return IPAddress(v6: hi, lo)
    }

    public var description: String {
        switch family {
        case .none: return "-"
        case .v4:
            let v = v4Value
            return "\(v >> 24).\((v >> 16) & 0xff).\((v >> 8) & 0xff).\(v & 0xff)"
        case .v6:
            var g = [UInt16](repeating: 0, count: 8)
            for i in 0..<4 { g[i] = UInt16(truncatingIfNeeded: hi >> (48 - 16 * UInt64(i))) }
            for i in 0..<4 { g[4 + i] = UInt16(truncatingIfNeeded: lo >> (48 - 16 * UInt64(i))) }
            // RFC 5952: compress the longest run (length >= 2) of zero groups.
            var bestStart = -1, bestLen = 0, i = 0
            while i < 8 {
                if g[i] == 0 {
                    var j = i
                    while j < 8 && g[j] == 0 { j += 1 }
                    if j - i > bestLen && j - i >= 2 { bestStart = i; bestLen = j - i }
                    i = j
                } else { i += 1 }
            }
            func hex(_ r: Range<Int>) -> String { r.map { String(g[$0], radix: 16) }.joined(separator: ":") }
            if bestStart < 0 { return hex(0..<8) }
            return hex(0..<bestStart) + "::" + hex((bestStart + bestLen)..<8)
        }
    }
}

/// IP protocol numbers meshtrace names.
public enum IPProto {
    public static let icmp: UInt8 = 1
    public static let tcp: UInt8 = 6
    public static let udp: UInt8 = 17
    public static let icmpv6: UInt8 = 58
    public static let sctp: UInt8 = 132

    public static func name(_ p: UInt8) -> String {
        switch p {
        case icmp: return "icmp"
        case tcp: return "tcp"
        case udp: return "udp"
        case icmpv6: return "icmpv6"
        case sctp: return "sctp"
        default: return "proto\(p)"
        }
    }
}

public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    public var addr: IPAddress
    public var port: UInt16
    public init(_ addr: IPAddress, _ port: UInt16) { self.addr = addr; self.port = port }
    public var description: String {
        addr.family == .v6 ? "[\(addr)]:\(port)" : "\(addr):\(port)"
    }
}

/// A directed 5-tuple as seen on the wire. For ICMP the ports hold (type<<8|code, id) of echo, else 0.
public struct FiveTuple: Hashable, Sendable, CustomStringConvertible {
    public var proto: UInt8
    public var src: Endpoint
    public var dst: Endpoint
    public init(proto: UInt8, src: Endpoint, dst: Endpoint) {
        self.proto = proto; self.src = src; self.dst = dst
    }
    public var reversed: FiveTuple { FiveTuple(proto: proto, src: dst, dst: src) }
    public var description: String { "\(IPProto.name(proto)) \(src) > \(dst)" }
}

/// Capture time. Nanosecond resolution; pcap µs files are scaled up.
public struct Timestamp: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var seconds: Int64
    public var nanoseconds: Int32
    public init(seconds: Int64, nanoseconds: Int32) { self.seconds = seconds; self.nanoseconds = nanoseconds }
    /// A classic pcap record's time: the seconds field is unsigned (the format runs to 2106, not 2038), and a
    /// fraction of a second or more (a writer's bug; tcpdump prints it "invalid") is carried into the seconds,
    /// so `nanoseconds` stays within 0..<1e9, which every printer of a time relies on.
    @inline(__always)
    init(pcapSeconds: UInt32, fractionNanoseconds: UInt64) {
        if _fastPath(fractionNanoseconds < 1_000_000_000) {
            self.init(seconds: Int64(pcapSeconds), nanoseconds: Int32(truncatingIfNeeded: fractionNanoseconds))
        } else {
            self.init(seconds: Int64(pcapSeconds) + Int64(fractionNanoseconds / 1_000_000_000),
                      nanoseconds: Int32(truncatingIfNeeded: fractionNanoseconds % 1_000_000_000))
        }
    }
    public static let zero = Timestamp(seconds: 0, nanoseconds: 0)
    public var totalNanoseconds: Int64 { seconds &* 1_000_000_000 &+ Int64(nanoseconds) }
    public static func < (a: Timestamp, b: Timestamp) -> Bool {
        a.seconds != b.seconds ? a.seconds < b.seconds : a.nanoseconds < b.nanoseconds
    }
    /// Seconds since the epoch with 9 decimals, the form JSON output uses.
    public var description: String {
        let ns = String(nanoseconds)
        return "\(seconds).\(String(repeating: "0", count: max(0, 9 - ns.count)))\(ns)"
    }
}

/// The netfilter hook an NFLOG record was emitted from (NFULA_PACKET_HDR hook, NF_INET_*).
public enum NetfilterHook: UInt8, Sendable, CustomStringConvertible {
    case prerouting = 0, input = 1, forward = 2, output = 3, postrouting = 4, ingress = 5, unknown = 255
    /// The hook's name as a literal (printers copy its bytes without making a String).
    public var name: StaticString {
        switch self {
        case .prerouting: return "PREROUTING"
        case .input: return "INPUT"
        case .forward: return "FORWARD"
        case .output: return "OUTPUT"
        case .postrouting: return "POSTROUTING"
        case .ingress: return "INGRESS"
        case .unknown: return "?"
        }
    }
    public var description: String { "\(name)" }
}

/// Which way a packet was going at its capture point, relative to the host (pod) that captured it.
public enum PacketDirection: UInt8, Sendable {
    case unknown = 0, inbound = 1, outbound = 2
}

/// Where a packet was seen: a libpcap interface (lo, eth0, ...) or a netfilter hook via NFLOG.
public struct CapturePoint: Hashable, Sendable, CustomStringConvertible {
    public enum Kind: UInt8, Sendable { case interface = 0, netfilter = 1, unknown = 2 }
    public var kind: Kind
    /// The interface name as its number in the process-wide name table: a record is copied and compared per
    /// packet, and a `String` in it (even an inline small one) costs a retain and a release at every copy.
    public var interfaceName: InterfaceName
    /// Interface name when known ("lo", "eth0"; "any" for a cooked capture without names).
    public var interface: String {
        get { interfaceName.string }
        set { interfaceName = InterfaceName(newValue) }
    }
    /// For `.netfilter`: the hook the record came from.
    public var hook: NetfilterHook
    /// True when the interface is a loopback device (from the name, or ARPHRD_LOOPBACK in SLL headers).
    public var isLoopback: Bool

    public init(kind: Kind, interface: String, hook: NetfilterHook = .unknown, isLoopback: Bool = false) {
        self.init(kind: kind, interfaceName: InterfaceName(interface), hook: hook, isLoopback: isLoopback)
    }
    public init(kind: Kind, interfaceName: InterfaceName, hook: NetfilterHook = .unknown, isLoopback: Bool = false) {
        self.kind = kind; self.interfaceName = interfaceName; self.hook = hook; self.isLoopback = isLoopback
    }
    public static var unknown: CapturePoint { CapturePoint(kind: .unknown, interfaceName: .questionMark) }
    public static func interface(_ name: String) -> CapturePoint {
        CapturePoint(kind: .interface, interface: name, isLoopback: name == "lo")
    }
    public static func netfilter(_ hook: NetfilterHook) -> CapturePoint {
        CapturePoint(kind: .netfilter, interfaceName: .empty, hook: hook)
    }
    public var description: String {
        switch kind {
        case .interface: return interface
        case .netfilter: return "nf:\(hook)"
        case .unknown: return "?"
        }
    }
}

/// Conntrack's view of a connection, from NFULA_CT (nested ctnetlink attributes).
public struct ConntrackInfo: Hashable, Sendable {
    /// The tuple as the connection was first seen (before NAT): for a REDIRECT this holds the original destination.
    public var original: FiveTuple
    /// The tuple replies carry (after NAT): for an OUTPUT REDIRECT, src 127.0.0.1:15001.
    public var reply: FiveTuple
    public var mark: UInt32
    public var status: UInt32
    public var zone: UInt16
    public var id: UInt32
    public init(original: FiveTuple, reply: FiveTuple, mark: UInt32 = 0, status: UInt32 = 0, zone: UInt16 = 0, id: UInt32 = 0) {
        self.original = original; self.reply = reply; self.mark = mark; self.status = status; self.zone = zone; self.id = id
    }
    /// True when conntrack rewrote the destination (DNAT/REDIRECT): reply.src != original.dst.
    public var isDestinationNATed: Bool { reply.src != original.dst }
}

/// What NFLOG adds to a packet. Every field is optional in the protocol; absent ones are nil.
public struct NflogMeta: Hashable, Sendable {
    public var group: UInt16 = 0
    public var hook: NetfilterHook = .unknown
    public var hwProtocol: UInt16 = 0
    public var mark: UInt32? = nil
    /// The interned prefix: look it up with `RuleTagTable.tag(for:)`. 0 = empty prefix.
    public var prefixID: UInt32 = 0
    public var inputIfindex: UInt32? = nil
    public var outputIfindex: UInt32? = nil
    public var uid: UInt32? = nil
    public var gid: UInt32? = nil
    /// NFULA_SEQ (per-instance sequence, with NFULNL_CFG_F_SEQ).
    public var sequence: UInt32? = nil
    /// True when NFULA_TIMESTAMP was present (it is missing on locally generated packets).
    public var hadKernelTimestamp: Bool = false
    /// NFULA_CT (or, live, conntrack's answer for a REDIRECT/DNAT twin's hit). Stored beside a presence flag:
    /// the record's hot paths ask only whether there is one, and testing the ~160-byte optional itself copied it.
    public var conntrack: ConntrackInfo? {
        get { storedConntrack }
        set {
            if case .some = newValue { hasConntrack = true } else { hasConntrack = false }
            storedConntrack = newValue
        }
    }
    private var storedConntrack: ConntrackInfo? = nil
    public private(set) var hasConntrack = false
    /// NFULA_TIMESTAMP itself (the skb's time), when present; the record's `time` stays the capture's.
    public var kernelTime: Timestamp? = nil
    /// NFULA_SEQ_GLOBAL (sequence across all NFLOG instances, with NFULNL_CFG_F_SEQ_GLOBAL).
    public var globalSequence: UInt32? = nil
    /// NFULA_CT_INFO: the packet's ctinfo (IP_CT_ESTABLISHED 0, RELATED 1, NEW 2, +3 for the reply direction).
    public var conntrackState: UInt32? = nil
    /// NFULA_IFINDEX_PHYSINDEV / PHYSOUTDEV (bridge ports).
    public var physInputIfindex: UInt32? = nil
    public var physOutputIfindex: UInt32? = nil
    public init() {}

    /// Back to `NflogMeta()` field by field, in place: assigning a fresh value builds all ~270 bytes and
    /// copies them, for every NFLOG record decoded.
    @inline(__always)
    public mutating func reset() {
        group = 0; hook = .unknown; hwProtocol = 0; mark = nil; prefixID = 0
        inputIfindex = nil; outputIfindex = nil; uid = nil; gid = nil; sequence = nil
        // The ~160-byte conntrack optional is written only when set: clearing it unconditionally copied a whole
        // empty value in, for every record (almost none carries one).
        hadKernelTimestamp = false; kernelTime = nil; globalSequence = nil; conntrackState = nil
        if hasConntrack { conntrack = nil }
        physInputIfindex = nil; physOutputIfindex = nil
    }
}

/// Reasons a packet was only partly decoded. A bitset so recording one never allocates.
public struct DecodeNotes: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let truncatedLink = DecodeNotes(rawValue: 1 << 0)
    public static let truncatedIP = DecodeNotes(rawValue: 1 << 1)
    public static let truncatedTransport = DecodeNotes(rawValue: 1 << 2)
    public static let badIPHeader = DecodeNotes(rawValue: 1 << 3)
    public static let fragment = DecodeNotes(rawValue: 1 << 4)
    public static let nonFirstFragment = DecodeNotes(rawValue: 1 << 5)
    public static let badNflogTLV = DecodeNotes(rawValue: 1 << 6)
    public static let truncatedNflog = DecodeNotes(rawValue: 1 << 7)
    public static let unknownLinkPayload = DecodeNotes(rawValue: 1 << 8)
    public static let ipOptions = DecodeNotes(rawValue: 1 << 9)
    public static let ipv6ExtensionHeaders = DecodeNotes(rawValue: 1 << 10)
    public static let snaplenCut = DecodeNotes(rawValue: 1 << 11)
    public static let badConntrack = DecodeNotes(rawValue: 1 << 12)
    public static let notIP = DecodeNotes(rawValue: 1 << 13)
    public static let badTransportHeader = DecodeNotes(rawValue: 1 << 14)

    /// Human words for each note, as printed in timelines ("truncated TCP header").
    public var descriptions: [String] {
        var out: [String] = []
        if contains(.truncatedLink) { out.append("truncated link-layer header") }
        if contains(.truncatedIP) { out.append("truncated IP header") }
        if contains(.truncatedTransport) { out.append("truncated transport header") }
        if contains(.badIPHeader) { out.append("bad IP header") }
        if contains(.fragment) { out.append("IP fragment") }
        if contains(.nonFirstFragment) { out.append("non-first fragment (no ports)") }
        if contains(.badNflogTLV) { out.append("bad NFLOG TLV length") }
        if contains(.truncatedNflog) { out.append("truncated NFLOG record") }
        if contains(.unknownLinkPayload) { out.append("unknown link payload") }
        if contains(.ipOptions) { out.append("IP options") }
        if contains(.ipv6ExtensionHeaders) { out.append("IPv6 extension headers") }
        if contains(.snaplenCut) { out.append("cut by snaplen") }
        if contains(.badConntrack) { out.append("bad NFULA_CT attribute") }
        if contains(.notIP) { out.append("not IP") }
        if contains(.badTransportHeader) { out.append("bad transport header") }
        return out
    }
}

/// Identifies one packet in its input: which source (file or live stream) and its 1-based frame number there.
public struct FrameRef: Hashable, Sendable, Comparable, Codable {
    public var source: UInt16
    public var frame: UInt64
    public init(source: UInt16, frame: UInt64) { self.source = source; self.frame = frame }
    public static func < (a: FrameRef, b: FrameRef) -> Bool {
        a.source != b.source ? a.source < b.source : a.frame < b.frame
    }
}

/// TCP flag bits as on the wire.
public struct TCPFlags: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let fin = TCPFlags(rawValue: 0x01)
    public static let syn = TCPFlags(rawValue: 0x02)
    public static let rst = TCPFlags(rawValue: 0x04)
    public static let psh = TCPFlags(rawValue: 0x08)
    public static let ack = TCPFlags(rawValue: 0x10)
    public static let urg = TCPFlags(rawValue: 0x20)
    /// tcpdump's letters: S F R P . U
    public var description: String {
        var s = ""
        if contains(.syn) { s += "S" }
        if contains(.fin) { s += "F" }
        if contains(.rst) { s += "R" }
        if contains(.psh) { s += "P" }
        if contains(.urg) { s += "U" }
        if contains(.ack) { s += "." }
        return s.isEmpty ? "none" : s
    }
}

/// One decoded packet, from a pcap interface capture or an NFLOG record.
public struct PacketRecord: Sendable {
    public var ref: FrameRef = FrameRef(source: 0, frame: 0)
    public var time: Timestamp = .zero
    public var point: CapturePoint = .unknown
    public var direction: PacketDirection = .unknown
    /// Bytes on the wire (pcap orig_len), and of the IP packet when known.
    public var wireLength: UInt32 = 0
    public var ipLength: UInt32 = 0
    public var tuple: FiveTuple = FiveTuple(proto: 0, src: Endpoint(.none, 0), dst: Endpoint(.none, 0))
    /// IPv4 identification, or the IPv6 fragment header's identification (0 when absent).
    public var ipID: UInt32 = 0
    public var ttl: UInt8 = 0
    public var tcpFlags: TCPFlags = []
    public var tcpSeq: UInt32 = 0
    public var tcpAck: UInt32 = 0
    /// Transport payload bytes carried (TCP/UDP data length from the headers, not what was captured).
    public var payloadLength: UInt32 = 0
    public var icmpType: UInt8 = 0
    public var icmpCode: UInt8 = 0
    /// An ICMP error's quoted packet (the start of the packet it reports on, RFC 792 / RFC 4443), in the tuple
    /// convention: meaningful only when `hasQuoted`. The correlator places the error on that packet's connection.
    public var quoted: FiveTuple = FiveTuple(proto: 0, src: Endpoint(.none, 0), dst: Endpoint(.none, 0))
    public var hasQuoted = false
    /// Present for NFLOG records only. Stored as `nflogFields` plus `hasNflog`: an optional of this ~270-byte
    /// struct is copied whole even to be tested for nil, so per-packet code reads the stored fields.
    public var nflog: NflogMeta? {
        get { hasNflog ? nflogFields : nil }
        set {
            if let m = newValue { nflogFields = m; hasNflog = true } else { hasNflog = false; nflogFields = NflogMeta() }
        }
    }
    /// The NFLOG fields; meaningful only when `hasNflog`.
    public var nflogFields = NflogMeta()
    /// True for NFLOG records.
    public var hasNflog = false
    /// Whether the packet selects its connection for showing (`trace --filter`). True unless a filter said no:
    /// without a filter every connection is shown.
    public var selected = true
    public var notes: DecodeNotes = []
    /// Interface index from the link layer when it carries one (LINUX_SLL2), else 0.
    public var ifindex: UInt32 = 0

    public init() {}

    public var isIP: Bool { tuple.src.addr.family != .none }
}
