// What correlation produces: per-connection timelines, the ztunnel hops that join them, and escape
// findings. Every printer (text, JSON, pcapng, HTML) consumes these same records.

/// Stable within one analysis: assigned in order of first sight.
public typealias ConnectionID = UInt32

/// What kind of connection a timeline is, as far as the evidence tells.
public enum ConnectionKind: String, Sendable, Codable {
    /// The app's outbound connection, redirected to ztunnel's 15001.
    case appOutbound = "app-outbound"
    /// ztunnel's connection to a peer's :15008 (HBONE), packets marked 0x539.
    case hboneOutbound = "hbone-outbound"
    /// A peer's HBONE connection arriving on this pod's :15008.
    case hboneInbound = "hbone-inbound"
    /// An inbound plaintext connection redirected to 15006.
    case inboundPlaintext = "inbound-plaintext"
    /// ztunnel's connection into the app (0x539, connmark 0x111), from the original client address.
    case ztunnelToApp = "ztunnel-to-app"
    /// ztunnel's plaintext connection to a destination outside the mesh (passthrough), 0x539.
    case ztunnelPassthrough = "ztunnel-passthrough"
    /// A kubelet probe from 169.254.7.127 (bypasses ztunnel by design).
    case probe = "probe"
    /// DNS redirected to 15053, or ztunnel's upstream DNS.
    case dns = "dns"
    /// Traffic that stays inside the pod (127.0.0.1, app → own pod IP via lo).
    case local = "local"
    /// Not captured by design (non-DNS UDP, ICMP, SCTP).
    case uncapturedByDesign = "uncaptured-by-design"
    /// None of the above could be established.
    case unknown = "unknown"
}

/// What a rule did to a packet, when the rule's target is known.
public enum RuleAction: Hashable, Sendable {
    case redirected(toPort: UInt16, originalDestination: Endpoint?)
    case tproxied(toPort: UInt16, mark: UInt32?)
    case markSet(UInt32)
    case connmarkSet(UInt32)
    case connmarkRestored(UInt32?)
    case accepted
    case returned
    case jumped(String)
    case ctZone(UInt16)
    case dropped
    case observed
    case other(String)
}

/// One rule hit on one packet: the NFLOG twin's tag and, with `--rules` or live, the rule itself.
public struct RuleHit: Hashable, Sendable {
    public var tag: RuleTag?
    /// The prefix as logged, when it is not a meshtrace tag (another tool's NFLOG rule, legacy TRACE).
    public var prefixText: String
    /// The rule is shared by reference: every packet's event carries its hit, and a `Rule` by value would make
    /// each event several times larger (and every copy retain its strings).
    private var ruleRef: SharedRule?
    public var rule: Rule? {
        get { ruleRef?.rule }
        set { ruleRef = newValue.map(SharedRule.init) }
    }
    /// `rule?.canonicalText`, computed once per rule rather than once per packet.
    public var ruleCanonicalText: String? { ruleRef?.canonicalText }
    public var role: AmbientRole?
    public var action: RuleAction?
    public init(tag: RuleTag?, prefixText: String, rule: Rule? = nil, role: AmbientRole? = nil, action: RuleAction? = nil) {
        self.tag = tag; self.prefixText = prefixText; self.ruleRef = rule.map(SharedRule.init); self.role = role; self.action = action
    }
}

/// One rule, held once for all the events that hit it.
final class SharedRule: Hashable, Sendable {
    let rule: Rule
    let canonicalText: String
    init(_ rule: Rule) { self.rule = rule; canonicalText = rule.canonicalText }
    static func == (a: SharedRule, b: SharedRule) -> Bool { a === b || a.rule == b.rule }
    func hash(into h: inout Hasher) { h.combine(rule) }
}

/// One line of a timeline: a packet seen at one capture point, with what the rules did to it.
public struct TimelineEvent: Sendable {
    public var time: Timestamp
    public var frame: FrameRef
    public var point: CapturePoint
    public var direction: PacketDirection
    /// The tuple as seen at that point (pre-NAT at nat OUTPUT, post-NAT on lo, ...).
    public var tuple: FiveTuple
    /// True when the packet travels in the reply direction of the connection.
    public var isReply: Bool
    public var tcpFlags: TCPFlags
    public var length: UInt32
    public var mark: UInt32?
    public var hit: RuleHit?
    public var notes: DecodeNotes
    public init(time: Timestamp, frame: FrameRef, point: CapturePoint, direction: PacketDirection, tuple: FiveTuple,
                isReply: Bool, tcpFlags: TCPFlags, length: UInt32, mark: UInt32?, hit: RuleHit?, notes: DecodeNotes) {
        self.time = time; self.frame = frame; self.point = point; self.direction = direction; self.tuple = tuple
        self.isReply = isReply; self.tcpFlags = tcpFlags; self.length = length; self.mark = mark; self.hit = hit; self.notes = notes
    }
}

public enum Confidence: String, Sendable, Codable, Comparable {
    case low, medium, high
    public static func < (a: Confidence, b: Confidence) -> Bool {
        let order: [Confidence] = [.low, .medium, .high]
        return order.firstIndex(of: a)! < order.firstIndex(of: b)!
    }
}

/// One piece of evidence for joining two connections through ztunnel. Time alone is never enough.
///
/// The correlator's evidence is kept as its fact and numbers (`Fact`) and worded only when read or printed:
/// a trace joins a hop for every connection, and wording each piece through String interpolation when the hop
/// was emitted cost ~5 % of an analysis. `kind` and `detail` read (and compare) as the words.
public struct HopEvidence: Hashable, Sendable {
    /// "ztunnel-mark", "original-destination", "client-address", "timing", "unique", "bytes"
    public var kind: String {
        get { fact.kindText }
        set { fact = .worded(kind: newValue, detail: detail) }
    }
    /// For people: "HBONE dst 10.0.2.2 equals original destination 10.0.2.2"
    public var detail: String {
        get {
            if case .worded(_, let d) = fact { return d }
            var words = EvidenceString()
            fact.word(into: &words)
            return words.text
        }
        set { fact = .worded(kind: kind, detail: newValue) }
    }
    public init(kind: String, detail: String) { fact = .worded(kind: kind, detail: detail) }
    init(_ fact: Fact) { self.fact = fact }

    var fact: Fact

    public static func == (a: HopEvidence, b: HopEvidence) -> Bool { a.kind == b.kind && a.detail == b.detail }
    public func hash(into h: inout Hasher) { h.combine(kind); h.combine(detail) }
}

/// The app's connection joined to ztunnel's connection on the other side of the proxy.
public struct ZtunnelHop: Sendable {
    public enum Direction: String, Sendable, Codable { case outbound, inbound }
    public var direction: Direction
    /// Outbound: the app's redirected connection. Inbound: the HBONE (or plaintext 15006) connection.
    public var outer: ConnectionID
    /// Outbound: ztunnel's 0x539 connection to :15008 (or passthrough). Inbound: ztunnel's connection into the app.
    public var inner: ConnectionID
    public var evidence: [HopEvidence]
    public var confidence: Confidence
    public init(direction: Direction, outer: ConnectionID, inner: ConnectionID, evidence: [HopEvidence], confidence: Confidence) {
        self.direction = direction; self.outer = outer; self.inner = inner; self.evidence = evidence; self.confidence = confidence
    }
}

/// Traffic that left the pod without passing ztunnel.
public struct EscapeFinding: Sendable {
    public enum Class: String, Sendable, Codable {
        /// Not captured by the rules' own design (non-DNS UDP, ICMP, ...): reported, not an error.
        case byDesign = "by-design"
        /// App TCP left through a non-lo interface with no redirect and no ztunnel hop.
        case uncapturedTCP = "uncaptured-tcp"
        /// A connection carried ztunnel's mark 0x539 but no ztunnel hop explains it (a process forging the mark).
        case forgedZtunnelMark = "forged-ztunnel-mark"
        /// IPv6 traffic that no ip6tables/nft rule saw in a dual-stack pod.
        case ipv6Uncaptured = "ipv6-uncaptured"
        case other = "other"
    }
    public var findingClass: Class
    public var connection: ConnectionID?
    public var tuple: FiveTuple
    public var summary: String
    /// The packets that prove it.
    public var frames: [FrameRef]
    public var confidence: Confidence
    public init(findingClass: Class, connection: ConnectionID?, tuple: FiveTuple, summary: String, frames: [FrameRef], confidence: Confidence) {
        self.findingClass = findingClass; self.connection = connection; self.tuple = tuple; self.summary = summary
        self.frames = frames; self.confidence = confidence
    }
    /// By-design classes do not make the exit code 1.
    public var isEscape: Bool { findingClass != .byDesign }
}

/// One logical connection across capture points, NAT views and both directions.
public struct ConnectionTimeline: Sendable {
    public var id: ConnectionID
    public var kind: ConnectionKind
    /// The tuple as the initiator sent it, before any NAT (the app's view).
    public var original: FiveTuple
    /// Every other tuple this connection was seen under (post-REDIRECT on lo, replies).
    public var aliases: [FiveTuple]
    /// The REDIRECT/TPROXY applied, with the original destination.
    public var redirect: RuleAction?
    /// Packet marks and connmarks seen on it.
    public var marks: [UInt32]
    public var events: [TimelineEvent]
    /// Events not kept once a timeline reached its cap (counts still add up).
    public var droppedEvents: Int
    public var firstSeen: Timestamp
    public var lastSeen: Timestamp
    public var packets: Int
    public var bytes: UInt64
    /// TCP: saw FIN/RST from both sides (or RST). Others: idle timeout.
    public var closed: Bool
    /// TCP: its SYN was answered by a RST and no SYN-ACK was seen (connection refused: nothing listened there;
    /// redirected, nothing on ztunnel's port in the pod).
    public var refused: Bool = false
    /// Finished before it closed or idled out, because more connections were open than the correlator keeps
    /// (`CorrelatorOptions.maxOpenConnections`): its later packets, if any, make a connection of their own.
    public var endedEarly: Bool = false
    /// Hops this connection is part of (outer or inner side).
    public var hops: [ZtunnelHop]
    /// ICMP errors about its packets (each kind once, first seen first; their packets are among the events).
    public var icmpErrors: [IcmpError]
    public init(id: ConnectionID, kind: ConnectionKind, original: FiveTuple) {
        self.id = id; self.kind = kind; self.original = original; self.aliases = []; self.redirect = nil
        self.marks = []; self.events = []; self.droppedEvents = 0; self.firstSeen = .zero; self.lastSeen = .zero
        self.packets = 0; self.bytes = 0; self.closed = false; self.hops = []; self.icmpErrors = []
    }
}

/// An ICMP error about a connection's packet: a port unreachable (nothing listening, e.g. on ztunnel's 15053),
/// a host unreachable, fragmentation needed / packet too big (path MTU), a time exceeded.
public struct IcmpError: Hashable, Sendable {
    /// When it was first seen.
    public var time: Timestamp
    /// Its sender as first seen: a router, the peer, or the pod's own stack (an error the pod sends answers a
    /// packet that came in). Seen before NAT at an OUTPUT hook, after it on an interface.
    public var from: IPAddress
    /// `IPProto.icmp` or `IPProto.icmpv6`.
    public var proto: UInt8
    public var type: UInt8
    public var code: UInt8
    public init(time: Timestamp, from: IPAddress, proto: UInt8, type: UInt8, code: UInt8) {
        self.time = time; self.from = from; self.proto = proto; self.type = type; self.code = code
    }
    /// "port unreachable", "packet too big", ...
    public var message: String { IcmpMessage.name(proto: proto, type: type, code: code) }
}

/// Totals at the end of an analysis or trace.
public struct AnalysisSummary: Sendable {
    public var packets: Int = 0
    public var nflogRecords: Int = 0
    public var connections: Int = 0
    public var hops: Int = 0
    public var findings: [EscapeFinding] = []
    /// Hits per rule (by prefix text), with the prefix's meshtrace tag (nil for another tool's prefix) and the rule
    /// when known.
    public var ruleHits: [(prefix: String, tag: RuleTag?, rule: Rule?, count: Int)] = []
    /// Packets decoded only partly, by note.
    public var damagedPackets: Int = 0
    /// Of those, NFLOG records the capture's snaplen cut (`tcpdump -i nflog:G -s N`: a twin's record is its
    /// attributes plus the packet copy, up to ~270 bytes): their connection is unknown.
    public var nflogRecordsCut: Int = 0
    /// Live `--mode trace`: the kernel's TRACE steps joined into the timelines (they reach the correlator as
    /// NFLOG-like records, and are not counted among `nflogRecords`).
    public var traceSteps: Int = 0
    /// Live `--mode trace`: TRACE steps the kernel dropped before meshtrace read them (nil: not a TRACE run).
    public var traceStepsLost: Int?
    /// Records that came more than the close linger behind the capture's clock (the latest time read so far): a file
    /// not in time order (pcapng files joined with `cat`), or a live reader that fell far behind. Their connections
    /// may have been finished already, and split.
    public var lateRecords: Int = 0
    public var fileDamage: [String] = []
    /// Live only: the kernel's counters for the twin rules, and events lost.
    public var kernelCounters: [String: UInt64] = [:]
    public var eventsLost: Int = 0
    /// Live only: times the reading thread stood still for more than half the close linger (`StallGate`); the
    /// connections around each were finished only after what came meanwhile had been read.
    public var readerStalls: Int = 0
    /// Live only: times the reading thread was raised to real-time priority because it had fallen behind, and the
    /// CPU it used raised (ns): what the trace took from the pod's share (`ReaderPriority`).
    public var readerRaises: Int = 0
    public var readerRaisedCPUNanos: UInt64 = 0
    /// A live trace's summary (the two above are known): the JSON writes them only then, since a file cannot say
    /// what the kernel dropped before it was written.
    public var live = false
    /// Findings sent to the sinks but not kept in `findings` (the summary keeps a bounded number).
    public var findingsOmitted: Int = 0
    /// The pod's addresses the analysis used (given with `--pod-ip`, or inferred from the traffic).
    public var podAddresses: [IPAddress] = []
    /// Connections not shown because no packet of theirs matched `--filter` (nil without a filter); `connections`
    /// counts the shown ones.
    public var connectionsFilteredOut: Int? = nil
    /// Shown connections whose SYN a RST answered (`ConnectionTimeline.refused`), and those with ICMP errors.
    public var refusedConnections: Int = 0
    public var connectionsWithIcmpErrors: Int = 0
    /// Connections finished early because more were open than the correlator keeps (`ConnectionTimeline.endedEarly`).
    public var connectionsEndedEarly: Int = 0
    public init() {}
    public var escapes: Int { findings.filter(\.isEscape).count }
}
