// The correlator's working state for one open connection. The `ConnectionTimeline` it carries is what
// the sinks finally receive; the rest is evidence gathered on the way (NAT views, marks, where it left).

/// A 5-tuple without direction: both directions of a connection (and its replies) hash the same.
struct FlowKey: Hashable {
    // The two endpoints, the lower one (by address, then port) first, packed into 40 bytes: as two `Endpoint`s
    // with their padding a key took 72, two cache lines, and the flow table compares one per probe.
    var aHi: UInt64
    var aLo: UInt64
    var bHi: UInt64
    var bLo: UInt64
    var aPort: UInt16
    var bPort: UInt16
    var aFamily: UInt8
    var bFamily: UInt8
    var proto: UInt8

    @inline(__always)
    init(_ t: FiveTuple) {
        proto = t.proto
        var src = t.src
        // An ICMP echo's src port is its type (see `TransportDecoder.icmp`), which differs between the request
        // and the reply: keyed on the identifier at both ends, the two are one connection.
        if FlowKey.isEcho(t) { src.port = t.dst.port }
        let (a, b) = FlowKey.endpointLess(src, t.dst) ? (src, t.dst) : (t.dst, src)
        aHi = a.addr.hi; aLo = a.addr.lo; aPort = a.port; aFamily = a.addr.family.rawValue
        bHi = b.addr.hi; bLo = b.addr.lo; bPort = b.port; bFamily = b.addr.family.rawValue
    }

    /// An ICMP or ICMPv6 echo request or reply (the tuple's src port is type << 8 | code, its dst port the identifier).
    @inline(__always)
    static func isEcho(_ t: FiveTuple) -> Bool {
        if t.proto == IPProto.icmp { return t.src.port == 8 << 8 || t.src.port == 0 }
        if t.proto == IPProto.icmpv6 { return t.src.port == 128 << 8 || t.src.port == 129 << 8 }
        return false
    }

    /// An echo reply: its receiver sent the request.
    static func isEchoReply(_ t: FiveTuple) -> Bool {
        (t.proto == IPProto.icmp && t.src.port == 0) || (t.proto == IPProto.icmpv6 && t.src.port == 129 << 8)
    }

    /// The order of `IPAddress.<`, then the port, compared word by word (made once per packet).
    @inline(__always)
    static func endpointLess(_ x: Endpoint, _ y: Endpoint) -> Bool {
        let xf = x.addr.family.rawValue, yf = y.addr.family.rawValue
        if xf != yf { return xf < yf }
        if x.addr.hi != y.addr.hi { return x.addr.hi < y.addr.hi }
        if x.addr.lo != y.addr.lo { return x.addr.lo < y.addr.lo }
        return x.port < y.port
    }

    func hash(into h: inout Hasher) {
        // One mixed word instead of every field: the table is probed once per packet.
        var w = aLo &* 0x9E37_79B9_7F4A_7C15
        w ^= bLo &+ (aHi &* 31) &+ bHi
        w ^= UInt64(aPort) << 48 | UInt64(bPort) << 32 | UInt64(proto) << 16
        h.combine(w)
    }
}

/// A tunnel's data packet as relay timing reads it (`ConnectionState.relayOverflow`).
struct RelayDatum {
    var time: Int64
    var length: UInt32
    var forward: Bool
    /// Matched to a connection it relayed already (the ring's counterpart of `relayClaimed`).
    var claimed = false
}

/// A timeline event as the correlator keeps it while the connection is open: plain values only, so appending,
/// merging and sorting copy bytes and never touch a reference count. It becomes a `TimelineEvent` (with its
/// rule hit, interface name and action) only for sinks that want one.
///
/// Stored flat, widest fields first: as `Timestamp`, `FrameRef` and `FiveTuple` fields the padding inside them made
/// an event 152 bytes; flat it is 104, and a million-packet capture writes, sorts and reads a million of them.
/// `time`, `frame` and `tuple` read (and `time` writes) the same values as before.
struct CompactEvent {
    private var seconds: Int64
    private var frameNumber: UInt64
    private var srcHi: UInt64
    private var srcLo: UInt64
    private var dstHi: UInt64
    private var dstLo: UInt64
    private var nanoseconds: Int32
    var length: UInt32
    var mark: UInt32
    var hitID: UInt32
    var restoredMark: UInt32
    var notes: DecodeNotes
    /// What identifies the packet across its views (NAT changes addresses and ports, never these), so an NFLOG
    /// record can be matched to the captured packet it copies.
    var ipID: UInt32
    var seq: UInt32
    var ack: UInt32
    private var frameSource: UInt16
    private var srcPort: UInt16
    private var dstPort: UInt16
    var interfaceIndex: UInt16
    private var proto: UInt8
    private var srcFamily: IPAddress.Family
    private var dstFamily: IPAddress.Family
    var pointKind: CapturePoint.Kind
    var hook: NetfilterHook
    var isLoopback: Bool
    var direction: PacketDirection
    var flags: TCPFlags
    var hasMark: Bool
    var hasRestoredMark: Bool
    var forward: Bool

    init(time: Timestamp, frame: FrameRef, tuple: FiveTuple, length: UInt32, mark: UInt32, hitID: UInt32,
         restoredMark: UInt32, notes: DecodeNotes, ipID: UInt32, seq: UInt32, ack: UInt32, interfaceIndex: UInt16,
         pointKind: CapturePoint.Kind, hook: NetfilterHook, isLoopback: Bool, direction: PacketDirection,
         flags: TCPFlags, hasMark: Bool, hasRestoredMark: Bool, forward: Bool) {
        seconds = time.seconds; nanoseconds = time.nanoseconds
        frameSource = frame.source; frameNumber = frame.frame
        proto = tuple.proto
        srcFamily = tuple.src.addr.family; srcHi = tuple.src.addr.hi; srcLo = tuple.src.addr.lo; srcPort = tuple.src.port
        dstFamily = tuple.dst.addr.family; dstHi = tuple.dst.addr.hi; dstLo = tuple.dst.addr.lo; dstPort = tuple.dst.port
        self.length = length; self.mark = mark; self.hitID = hitID; self.restoredMark = restoredMark; self.notes = notes
        self.ipID = ipID; self.seq = seq; self.ack = ack; self.interfaceIndex = interfaceIndex
        self.pointKind = pointKind; self.hook = hook; self.isLoopback = isLoopback; self.direction = direction
        self.flags = flags; self.hasMark = hasMark; self.hasRestoredMark = hasRestoredMark; self.forward = forward
    }

    var time: Timestamp {
        @inline(__always) get { Timestamp(seconds: seconds, nanoseconds: nanoseconds) }
        @inline(__always) set { seconds = newValue.seconds; nanoseconds = newValue.nanoseconds }
    }

    var frame: FrameRef {
        @inline(__always) get { FrameRef(source: frameSource, frame: frameNumber) }
    }

    var tuple: FiveTuple {
        @inline(__always) get {
            FiveTuple(proto: proto, src: Endpoint(IPAddress(family: srcFamily, hi: srcHi, lo: srcLo), srcPort),
                      dst: Endpoint(IPAddress(family: dstFamily, hi: dstHi, lo: dstLo), dstPort))
        }
    }

    @inline(__always)
    func samePacket(_ o: CompactEvent) -> Bool {
        ipID == o.ipID && seq == o.seq && ack == o.ack && flags == o.flags && forward == o.forward
    }

    /// What `samePacket` compares, in two words (equal words exactly when `samePacket`), with the caller's slot
    /// for the event's index.
    var packedIdentity: (UInt64, UInt64, Int) {
        (UInt64(seq) << 32 | UInt64(ack),
         UInt64(ipID) << 32 | UInt64(flags.rawValue) << 8 | (forward ? 1 : 0), 0)
    }
}

struct PacketIdentity: Hashable {
    var ipID: UInt32
    var seq: UInt32
    var ack: UInt32
    var flags: UInt8
    var forward: Bool
    init(_ e: CompactEvent) { ipID = e.ipID; seq = e.seq; ack = e.ack; flags = e.flags.rawValue; forward = e.forward }
}

/// The initiator's endpoint and protocol: REDIRECT never changes the source, so every NAT view of
/// a connection shares it.
struct InitiatorKey: Hashable {
    var proto: UInt8
    var endpoint: Endpoint
}

/// A TCP connection's first SYN, by its sender's address and initial sequence number: the same in every NAT view
/// of the connection, including one whose source port the kernel changed (see `ConnectionState.natInitiator`).
struct SYNKey: Equatable {
    var addr: IPAddress
    var isn: UInt32
}

final class ConnectionState {
    var timeline: ConnectionTimeline
    /// Some packet of it was selected (`PacketRecord.selected`): shown when the correlator shows only those.
    var selected = false
    /// Every flow key this connection is registered under (original, post-NAT).
    var keys: [FlowKey] = []
    var initiator: Endpoint
    /// The responder as the initiator addressed it (pre-NAT when a NAT view was linked).
    var responder: Endpoint
    /// The responder after REDIRECT (127.0.0.1:15001, podIP:15006), when a NAT view was seen.
    var natResponder: Endpoint?
    /// The initiator as the NAT view shows it, when the kernel gave the redirected connection another source port:
    /// conntrack remaps it when the REDIRECTed tuple's reply would clash with an existing entry (the same app
    /// port already redirected for another destination). Nil when the port was kept, as it nearly always is.
    var natInitiator: Endpoint?
    /// Where the connection is in the correlator's SYN index (`Correlator.bySYN`), to be taken out when it goes.
    var synKey: SYNKey?
    /// True once the initiator is known from a SYN rather than guessed from ports.
    var initiatorFromSYN = false
    /// True once the initiator's SYN came with the packet's own time (an interface capture's, or the kernel's stamp
    /// on an NFLOG record): `timeline.firstSeen` is then when the connection began, not an upper bound (an NFLOG
    /// record stamped on receipt comes after its packet).
    var startExact = false
    /// When the initiator was first seen sending payload, by such a time (Int64.max: not yet). For a tunnel into the
    /// pod's HBONE port that is no later than the request ztunnel reads before it connects into the app.
    var firstForwardDataNanos = Int64.max
    /// True when the pre-NAT responder is known (from a pre-NAT view, a reply on lo, or conntrack).
    var originalKnown = false

    var isnForward: UInt32?
    var isnReply: UInt32?
    /// The lowest initiator sequence number seen while the handshake was not: lets a late copy of the SYN be told
    /// from a new connection on the same tuple (see `Correlator.isFreshSYN`).
    var lowestSeqForward: UInt32?
    var finForward = false
    var finReply = false
    var reset = false
    /// A RST came from the responder's side (with no SYN-ACK seen: refused, `ConnectionTimeline.refused`).
    var resetByResponder = false
    /// The handshake completed as far as any packet shows: the initiator acknowledged something (an ACK that is not
    /// its SYN or a RST), or the responder sent data. A capture that missed the SYN-ACK still knows then that a
    /// reset ending the connection was no refusal.
    var pastHandshake = false
    var closedAt: Int64?
    var lastSeenNanos: Int64 = 0
    var firstSeenNanos: Int64 = 0
    /// When it began, to order it among others: its SYN's own time once that is known (`startExact`), else its first
    /// record's time. A live trace's first records of many connections can share one time (a block of the capture's
    /// ring handed over at once, NFLOG records stamped on receipt), and their order then is the order they were read
    /// in, one source's block after the other's.
    var startedNanos: Int64 { startExact ? timeline.firstSeen.totalNanoseconds : firstSeenNanos }

    /// ztunnel's packet mark 0x539 on the initiator's packets (NFLOG mark, or conntrack mark).
    var ztunnelMarkFrames: [FrameRef] = []
    /// Connmark 0x111 seen: the connmark-set rule hit, restored mark on replies, or NFULA_CT mark.
    var sawZtunnelConnmark = false
    var sawNflog = false
    var sawLoopback = false
    /// The initiator's packets seen on a non-loopback interface (or leaving through one at POSTROUTING).
    var leftFrames: [FrameRef] = []
    var arrivedFrames: [FrameRef] = []
    var sawRedirectHit = false
    var payloadForward: UInt64 = 0
    var payloadReply: UInt64 = 0

    /// Index in the correlator's open list, for O(1) removal.
    var openIndex = -1
    /// Index in the correlator's list of open connections to the HBONE port (pooled tunnel candidates), or -1.
    var tunnelIndex = -1
    /// Set when this connection's events were moved into another (two views first seen apart).
    var mergedInto: ConnectionState?
    /// The connection this one replaced on its tuple (its SYN came with another ISN while that one lingered): a
    /// record read late that is that one's by its sequence numbers goes to it (`Correlator.previousOwner`). Kept one
    /// deep: the replaced connection lets go of its own.
    var previousOnTuple: ConnectionState?
    /// Replaced on its tuple by a new connection (`Correlator.retire`): out of the lookups, emitted after its linger.
    var retired = false
    /// Finished before its time: more connections were open than the correlator keeps (`Correlator.endLeastRecent`).
    var endedEarly = false
    var hopLinks: [HopLink] = []
    /// As a tunnel: the joins of the connections it carried, listed in `hopLinks` or not (a tunnel lists only the
    /// first `Correlator.maxPooledLinksListed` pooled ones).
    var carriedLinks = 0
    var emitted = false
    var conntrackApplied = false
    /// The initiator's packets were seen leaving this host (NFLOG OUTPUT/POSTROUTING, or outgoing on an interface).
    var initiatorSentLocally = false
    /// The initiator's packets arrived from outside (incoming on a non-loopback interface, NFLOG PREROUTING from one).
    var initiatorArrivedFromOutside = false
    var eventsNeedSorting = false
    /// The events kept so far (at most `maxEventsPerConnection`); `timeline.events` is filled from them on emission.
    var events: [CompactEvent] = []
    var sawNetfilterEvent = false
    /// The earliest and latest times of its packets captured on an interface (Int64.max / .min: none): times the
    /// packets carry, where `firstSeenNanos` and `lastSeenNanos` run on the correlator's clock, which a live trace's
    /// NFLOG records (stamped on receipt, up to the instance's flush timeout late) push ahead. What relay timing
    /// reads to tell the tunnels open while a connection ran (`Correlator.relinkByRelayTiming`).
    var interfaceFirstNanos = Int64.max
    var interfaceLastNanos = Int64.min
    var sawInterfaceEvent: Bool { interfaceFirstNanos != .max }
    /// Membership in the hop candidate lists.
    var pendingRoles: HopRoles = []
    /// The address this connection is filed under in the outbound candidate index (`Correlator.outboundByAddress`),
    /// as an app connection (its original destination) and as a tunnel (its peer); nil when not filed.
    var outerFiledUnder: IPAddress?
    var innerFiledUnder: IPAddress?
    /// When it was last appended to the full outbound candidate lists (`Correlator.outerOutbound`/`innerOutbound`):
    /// a scan of the index breaks ties in that order, as a scan of the full list did.
    var outerListed = 0
    var innerListed = 0
    /// A tunnel's data events (indices into `events`) already matched to a connection it relayed
    /// (`Correlator.relinkByRelayTiming`): a packet is one connection's bytes, not another's too. Empty (no storage)
    /// unless the tunnel was ever one of several candidates.
    var relayClaimed: [Int32] = []
    /// A tunnel's data packets that came after it stopped keeping events (`maxEventsPerConnection`), for relay
    /// timing: the latest `relayDataKept` of them, oldest overwritten first. Empty (no storage) until then, so only a
    /// long-lived (pooled) tunnel pays for it.
    var relayOverflow: [RelayDatum] = []
    /// Where the next one goes once the ring is full.
    var relayOverflowNext = 0
    /// The latest time among the data overwritten (`Int64.min`: none): a connection that began before it may have
    /// been relayed in packets no longer kept.
    var relayOverflowLostUntil = Int64.min
    /// A tunnel whose data lined up (relay timing) with a packet of a connection joined to another tunnel: it could
    /// have carried that connection, so with no join of its own it is not unexplained (`Correlator.classify`).
    var relayCouldHaveCarried = false

    /// Keeps a data packet past the event limit in the ring of `capacity`.
    func keepRelayDatum(_ d: RelayDatum, capacity: Int) {
        guard capacity > 0 else { relayOverflowLostUntil = max(relayOverflowLostUntil, d.time); return }
        if relayOverflow.count < capacity {
            if relayOverflow.isEmpty { relayOverflow.reserveCapacity(min(capacity, 64)) }
            relayOverflow.append(d)
            return
        }
        relayOverflowLostUntil = max(relayOverflowLostUntil, relayOverflow[relayOverflowNext].time)
        relayOverflow[relayOverflowNext] = d
        relayOverflowNext = relayOverflowNext + 1 == capacity ? 0 : relayOverflowNext + 1
    }

    init(id: ConnectionID, tuple: FiveTuple, initiator: Endpoint, responder: Endpoint) {
        timeline = ConnectionTimeline(id: id, kind: .unknown,
                                      original: FiveTuple(proto: tuple.proto, src: initiator, dst: responder))
        self.initiator = initiator
        self.responder = responder
    }

    /// An ICMP error about one of its packets (`Correlator.place`, and a merged view's): each type and code once,
    /// the first 4 kinds.
    func addIcmpError(_ e: IcmpError) {
        guard timeline.icmpErrors.count < 4,
              !timeline.icmpErrors.contains(where: { $0.proto == e.proto && $0.type == e.type && $0.code == e.code }) else { return }
        timeline.icmpErrors.append(e)
    }

    var id: ConnectionID { timeline.id }
    var proto: UInt8 { timeline.original.proto }
    var isClosed: Bool { closedAt != nil }
    /// Set when joined, so candidate scans test a flag rather than walk the links.
    var hasOutboundHop = false
    var hasInboundHop = false
    var sawZtunnelMark: Bool { !ztunnelMarkFrames.isEmpty }
}

/// A hop shared by its two connections: both print the same evidence.
final class HopLink {
    var hop: ZtunnelHop
    /// How many candidates there were when it was joined; the evidence is recomputed once, when the first
    /// of its connections is emitted, because NFLOG records (marks, rule hits) arrive in late batches.
    var candidates: Int
    var finalized = false
    /// Joined to a tunnel that was open already (ztunnel pools HBONE connections): its evidence says so, and
    /// timing is not part of it.
    var pooled = false
    /// Joined by the order alone (`Correlator.vipTunnel`: a service VIP, no identity): a connection that finds no
    /// tunnel of its own may take this one back and leave its connection another (`Correlator.vipExchange`).
    var byStartOrder = false
    /// The connection this one's tunnel was taken back from (`Correlator.vipExchange`), for its evidence.
    var takenBackFrom: ConnectionID?
    /// How many joins moved along a chain with this one to explain a marked connection left to none
    /// (`Correlator.explainByOrderChain`), for its evidence; 0 when none did.
    var chain = 0
    /// Chosen (or confirmed) among several open tunnels by relay timing: its evidence says so in place of `unique`.
    var relay: RelayMatch?
    // Strong on purpose: an emitted connection clears its own links, so the pair is freed once both are out.
    var outer: ConnectionState
    var inner: ConnectionState
    init(hop: ZtunnelHop, outer: ConnectionState, inner: ConnectionState, candidates: Int) {
        self.hop = hop; self.outer = outer; self.inner = inner; self.candidates = candidates
    }
}

/// How well a carried connection's data packets line up with one tunnel's (`Correlator.relinkByRelayTiming`).
struct RelayMatch {
    /// The carried connection's data packets with a relayed twin in the chosen tunnel, and how many it had.
    var matched: Int
    var packets: Int
    /// The largest gap between a matched packet and its twin.
    var largestGap: Int64
    /// How many open tunnels could have carried it, and the most packets any other one matched.
    var tunnels: Int
    /// Of those, how many were ztunnel's passthroughs (a service with endpoints outside the mesh).
    var passthroughs = 0
    var runnerUp: Int
    /// Of those tunnels, how many no longer kept data packets from the connection's time (past
    /// `maxEventsPerConnection` a tunnel keeps the latest `relayDataKept`): those could not be compared.
    var blind: Int
    /// The join stands though another tunnel matched more: taking the connection away would leave the tunnel opened
    /// for it with no connection (`Correlator.relinkByRelayTiming`).
    var overruled = false
}

struct HopRoles: OptionSet {
    let rawValue: UInt8
    static let outerOutbound = HopRoles(rawValue: 1)
    static let innerOutbound = HopRoles(rawValue: 2)
    static let outerInbound = HopRoles(rawValue: 4)
    static let innerInbound = HopRoles(rawValue: 8)
}
