// NFULA_CT: the packet's conntrack entry as nested ctnetlink attributes (what `conntrack -L` prints).
// For a REDIRECT this is how the original destination is known exactly: CTA_TUPLE_ORIG keeps the
// pre-NAT tuple, CTA_TUPLE_REPLY the one replies carry. Values are big-endian (ctnetlink's convention).

enum ConntrackDecoder {
    // linux/netfilter/nfnetlink_conntrack.h
    private static let ctaTupleOrig: UInt16 = 1
    private static let ctaTupleReply: UInt16 = 2
    private static let ctaStatus: UInt16 = 3
    private static let ctaMark: UInt16 = 8
    private static let ctaID: UInt16 = 12
    private static let ctaZone: UInt16 = 18

    private static let ctaTupleIP: UInt16 = 1
    private static let ctaTupleProto: UInt16 = 2

    private static let ctaIPv4Src: UInt16 = 1
    private static let ctaIPv4Dst: UInt16 = 2
    private static let ctaIPv6Src: UInt16 = 3
    private static let ctaIPv6Dst: UInt16 = 4

    private static let ctaProtoNum: UInt16 = 1
    private static let ctaProtoSrcPort: UInt16 = 2
    private static let ctaProtoDstPort: UInt16 = 3
    private static let ctaProtoICMPID: UInt16 = 4
    private static let ctaProtoICMPType: UInt16 = 5
    private static let ctaProtoICMPCode: UInt16 = 6
    private static let ctaProtoICMPv6ID: UInt16 = 7
    private static let ctaProtoICMPv6Type: UInt16 = 8
    private static let ctaProtoICMPv6Code: UInt16 = 9

    /// Decodes the value of NFULA_CT. nil when it is garbage or lacks the original tuple.
    static func decode(_ value: ByteReader, order: ByteOrder) -> ConntrackInfo? {
        let empty = FiveTuple(proto: 0, src: Endpoint(.none, 0), dst: Endpoint(.none, 0))
        var info = ConntrackInfo(original: empty, reply: empty)
        var sawOriginal = false
        var attrs = NetlinkAttributes(value, order: order)
        while let (type, v) = attrs.next() {
            var v = v
            switch type {
            case ctaTupleOrig:
                guard tuple(v, order: order, into: &info.original) else { return nil }
                sawOriginal = true
            case ctaTupleReply:
                guard tuple(v, order: order, into: &info.reply) else { return nil }
            case ctaStatus:
                guard v.remaining == 4, let x = v.be32() else { return nil }
                info.status = x
            case ctaMark:
                guard v.remaining == 4, let x = v.be32() else { return nil }
                info.mark = x
            case ctaID:
                guard v.remaining == 4, let x = v.be32() else { return nil }
                info.id = x
            case ctaZone:
                guard v.remaining == 2, let x = v.be16() else { return nil }
                info.zone = x
            default:
                break // timeout, protoinfo, helper, labels...: not needed to follow a connection
            }
        }
        guard attrs.failure == .none, sawOriginal else { return nil }
        return info
    }

    private static func tuple(_ value: ByteReader, order: ByteOrder, into t: inout FiveTuple) -> Bool {
        var attrs = NetlinkAttributes(value, order: order)
        while let (type, v) = attrs.next() {
            switch type {
            case ctaTupleIP: guard addresses(v, order: order, into: &t) else { return false }
            case ctaTupleProto: guard proto(v, order: order, into: &t) else { return false }
            default: break
            }
        }
        return attrs.failure == .none && t.src.addr.family != .none && t.src.addr.family == t.dst.addr.family
    }

    private static func addresses(_ value: ByteReader, order: ByteOrder, into t: inout FiveTuple) -> Bool {
        var attrs = NetlinkAttributes(value, order: order)
        while let (type, v) = attrs.next() {
            var v = v
            switch type {
            case ctaIPv4Src, ctaIPv4Dst:
                guard v.remaining == 4, let a = v.be32() else { return false }
                if type == ctaIPv4Src { t.src.addr = IPAddress(v4: a) } else { t.dst.addr = IPAddress(v4: a) }
            case ctaIPv6Src, ctaIPv6Dst:
                guard v.remaining == 16, let hi = v.be64(), let lo = v.be64() else { return false }
                if type == ctaIPv6Src { t.src.addr = IPAddress(v6: hi, lo) } else { t.dst.addr = IPAddress(v6: hi, lo) }
            default: break
            }
        }
        return attrs.failure == .none
    }

    private static func proto(_ value: ByteReader, order: ByteOrder, into t: inout FiveTuple) -> Bool {
        var icmpType: UInt8 = 0, icmpCode: UInt8 = 0, icmpID: UInt16 = 0, isICMP = false
        var attrs = NetlinkAttributes(value, order: order)
        while let (type, v) = attrs.next() {
            var v = v
            switch type {
            case ctaProtoNum:
                guard v.remaining == 1, let p = v.u8() else { return false }
                t.proto = p
            case ctaProtoSrcPort, ctaProtoDstPort:
                guard v.remaining == 2, let p = v.be16() else { return false }
                if type == ctaProtoSrcPort { t.src.port = p } else { t.dst.port = p }
            case ctaProtoICMPID, ctaProtoICMPv6ID:
                guard v.remaining == 2, let x = v.be16() else { return false }
                icmpID = x; isICMP = true
            case ctaProtoICMPType, ctaProtoICMPv6Type:
                guard v.remaining == 1, let x = v.u8() else { return false }
                icmpType = x; isICMP = true
            case ctaProtoICMPCode, ctaProtoICMPv6Code:
                guard v.remaining == 1, let x = v.u8() else { return false }
                icmpCode = x; isICMP = true
            default: break
            }
        }
        if isICMP {
            // Same convention as decoded packets (see FiveTuple): type<<8|code, echo id.
            t.src.port = UInt16(icmpType) << 8 | UInt16(icmpCode)
            t.dst.port = icmpID
        }
        return attrs.failure == .none
    }
}

extension ConntrackInfo {
    /// Decodes ctnetlink attributes (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_MARK, ...): the value of NFULA_CT, or
    /// the payload after nfgenmsg of a ctnetlink message (IPCTNL_MSG_CT_NEW from a dump or a `conntrack -E`
    /// style event subscription), which carry the same attributes. nil when malformed or without the
    /// original tuple. `byteOrder` is that of the attribute headers: `.host` for live netlink.
    public init?(ctnetlinkAttributes buf: UnsafeRawBufferPointer, byteOrder: ByteOrder = .host) {
        guard let info = ConntrackDecoder.decode(ByteReader(buf), order: byteOrder) else { return nil }
        self = info
    }
}
