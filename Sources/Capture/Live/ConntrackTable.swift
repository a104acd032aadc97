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
/// Bounded: the oldest entries are forgotten first.
final class ConntrackTable {
    private var byTuple: [FiveTuple: ConntrackInfo] = [:]
    private var order: [FiveTuple]
    private var next = 0
    private let capacity: Int
    private(set) var eventsSeen: UInt64 = 0

    init(capacity: Int = 1 << 15) {
        self.capacity = capacity
        order = []
        order.reserveCapacity(capacity)
        byTuple.reserveCapacity(capacity)
    }

    var isEmpty: Bool { byTuple.isEmpty }

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
    }

    private func remember(_ key: FiveTuple, _ info: ConntrackInfo) {
        if byTuple.updateValue(info, forKey: key) != nil { return }
        if order.count < capacity {
            order.append(key)
        } else {
            byTuple.removeValue(forKey: order[next])
            order[next] = key
            next = (next + 1) % capacity
        }
    }

    func lookup(_ tuple: FiveTuple) -> ConntrackInfo? { byTuple[tuple] }
}
