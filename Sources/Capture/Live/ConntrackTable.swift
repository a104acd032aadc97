/// Conntrack's view of the pod's recent NATed connections, from ctnetlink NEW events.
///
/// It stands in for NFULA_CT where the kernel cannot attach conntrack to NFLOG messages (built without
/// CONFIG_NETFILTER_NETLINK_GLUE_CT: `nflog_set_flags(NFULNL_CFG_F_CONNTRACK)` fails with EOPNOTSUPP).
/// The events carry the same ctnetlink attributes, decoded by the same `ConntrackDecoder`. A connection's
/// NEW event is sent when conntrack confirms it, after the NFLOG twins saw its first packet: the tracer
/// holds records briefly (`LiveTracer.holdNanos`) so the event is in the table when the record is released.
///
/// What the correlator needs from it is the one thing the packets cannot show: a REDIRECT's original
/// destination. So only destination-NATed connections are kept, and only NEW events are subscribed: UPDATE
/// events (every TCP state change, and the connmark set after confirmation) cost the kernel one netlink
/// message each for every connection of the pod, several times the NEW events, for nothing a timeline shows
/// (the restored connmark is shown from the CONNMARK rules' own hits).
///
/// Bounded, and looked up for each REDIRECT/DNAT twin hit: a set-associative cache (4 ways per set, the set
/// chosen by the flow table's seeded mix of the tuple's words, `FiveTuple.mixedHash`), where a new key replaces the oldest entry of its set. Three keys
/// per NATed connection went into a `Dictionary` before, hashed with SipHash over every field: ~5 % of the
/// tracer's time under load.
final class ConntrackTable {
    private static let ways = 4
    private struct Slot {
        var key: FiveTuple
        var info: ConntrackInfo
        /// Insertion order; 0 marks an empty slot.
        var stamp: UInt64
    }
    private let slots: UnsafeMutablePointer<Slot>
    private let setMask: Int
    private let seed: UInt64
    private var stamp: UInt64 = 0
    private(set) var eventsSeen: UInt64 = 0
    private(set) var isEmpty = true

    /// Room for about `capacity` keys (three per NATed connection).
    init(capacity: Int = 1 << 15) {
        var sets = 1
        while sets * ConntrackTable.ways < capacity { sets <<= 1 }
        setMask = sets - 1
        let empty = FiveTuple(proto: 0, src: Endpoint(.none, 0), dst: Endpoint(.none, 0))
        slots = .allocate(capacity: sets * ConntrackTable.ways)
        slots.initialize(repeating: Slot(key: empty, info: ConntrackInfo(original: empty, reply: empty), stamp: 0),
                         count: sets * ConntrackTable.ways)
        seed = UInt64.random(in: 1...UInt64.max)
    }

    deinit {
        slots.deinitialize(count: (setMask + 1) * ConntrackTable.ways)
        slots.deallocate()
    }

    /// Takes in the attributes of one IPCTNL_MSG_CT_NEW message.
    func apply(_ attributes: ByteReader) {
        guard let info = ConntrackDecoder.decode(attributes, order: .host) else { return }
        eventsSeen += 1
        guard info.isDestinationNATed else { return }
        // Keys for every view a twin can see: the original direction before NAT, the reply direction, and
        // the original direction after NAT (the reply tuple reversed).
        remember(info.original, info)
        remember(info.reply, info)
        remember(info.reply.reversed, info)
        isEmpty = false
    }

    @inline(__always)
    private func set(of t: FiveTuple) -> UnsafeMutablePointer<Slot> {
        slots + (Int(truncatingIfNeeded: t.mixedHash(seed)) & setMask) * ConntrackTable.ways
    }

    func remember(_ key: FiveTuple, _ info: ConntrackInfo) {
        let s = set(of: key)
        stamp += 1
        var victim = 0
        for w in 0..<ConntrackTable.ways {
            if s[w].stamp != 0 && s[w].key == key { victim = w; break }
            if s[w].stamp < s[victim].stamp { victim = w }
        }
        s[victim] = Slot(key: key, info: info, stamp: stamp)
    }

    func lookup(_ tuple: FiveTuple) -> ConntrackInfo? {
        let s = set(of: tuple)
        for w in 0..<ConntrackTable.ways where s[w].stamp != 0 && s[w].key == tuple { return s[w].info }
        return nil
    }
}
