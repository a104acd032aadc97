// Link-layer headers: what comes before the IP packet in each libpcap link type meshtrace reads.

/// The link types meshtrace decodes, as libpcap's `pcap_datalink` reports them (DLT values; they equal
/// the LINKTYPE values in the file except for RAW, which libpcap reports as DLT_RAW 12, or 14 on OpenBSD).
public enum LinkType {
    public static let null: Int32 = 0
    public static let ethernet: Int32 = 1
    public static let rawDLT: Int32 = 12
    public static let rawOpenBSD: Int32 = 14
    public static let raw: Int32 = 101
    public static let loop: Int32 = 108
    public static let linuxSLL: Int32 = 113
    public static let ipv4: Int32 = 228
    public static let ipv6: Int32 = 229
    public static let nflog: Int32 = 239
    public static let linuxSLL2: Int32 = 276

    public static let supported: [Int32] = [null, ethernet, rawDLT, rawOpenBSD, raw, loop, linuxSLL, ipv4, ipv6, nflog, linuxSLL2]

    public static func isSupported(_ linkType: Int32) -> Bool { supported.contains(linkType) }

    public static func name(_ linkType: Int32) -> String {
        switch linkType {
        case null: return "NULL"
        case ethernet: return "EN10MB"
        case rawDLT, rawOpenBSD, raw: return "RAW"
        case loop: return "LOOP"
        case linuxSLL: return "LINUX_SLL"
        case ipv4: return "IPV4"
        case ipv6: return "IPV6"
        case nflog: return "NFLOG"
        case linuxSLL2: return "LINUX_SLL2"
        default: return "linktype \(linkType)"
        }
    }
}

enum LinkDecoder {
    static let etherTypeIPv4: UInt16 = 0x0800
    static let etherTypeIPv6: UInt16 = 0x86dd
    /// ARPHRD_LOOPBACK: the cooked header's device type for lo.
    static let arphrdLoopback: UInt16 = 772

    /// IP version carried for an EtherType, 0 when it is not IP.
    @inline(__always)
    static func ipVersion(etherType: UInt16) -> UInt8 {
        switch etherType {
        case etherTypeIPv4: return 4
        case etherTypeIPv6: return 6
        default: return 0
        }
    }

    /// EN10MB: destination, source, EtherType, with 802.1Q / 802.1ad tags stepped over.
    static func ethernet(_ r: inout ByteReader, into rec: inout PacketRecord) {
        guard let addresses = r.take(12), let etherType = r.be16() else {
            rec.notes.insert(.truncatedLink)
            return
        }
        // Linux lo has an Ethernet header with both addresses zero (`tcpdump -i lo` writes EN10MB).
        if addresses.allSatisfy({ $0 == 0 }) { rec.point.isLoopback = true }
        network(etherType: etherType, &r, into: &rec)
    }

    /// LINUX_SLL (`tcpdump -i any`): packet type, ARPHRD type, address length, 8 address bytes, protocol.
    static func linuxSLL(_ r: inout ByteReader, into rec: inout PacketRecord) {
        guard let packetType = r.be16(), let arphrd = r.be16(), r.skip(10), let proto = r.be16() else {
            rec.notes.insert(.truncatedLink)
            return
        }
        cooked(packetType: packetType, arphrd: arphrd, into: &rec)
        network(etherType: proto, &r, into: &rec)
    }

    /// LINUX_SLL2: protocol, reserved, interface index, ARPHRD type, packet type, address length, 8 address bytes.
    static func linuxSLL2(_ r: inout ByteReader, into rec: inout PacketRecord) {
        guard let proto = r.be16(), r.skip(2), let ifindex = r.be32(), let arphrd = r.be16(),
              let packetType = r.u8(), r.skip(9) else {
            rec.notes.insert(.truncatedLink)
            return
        }
        rec.ifindex = ifindex
        cooked(packetType: UInt16(packetType), arphrd: arphrd, into: &rec)
        network(etherType: proto, &r, into: &rec)
    }

    /// NULL (host order of the writer) and LOOP (network order): a 4-byte address family. The family values
    /// are small, so whichever byte order gives a value below 256 is the one it was written in.
    static func nullOrLoop(_ r: inout ByteReader, into rec: inout PacketRecord) {
        guard let raw = r.be32() else {
            rec.notes.insert(.truncatedLink)
            return
        }
        let family = raw < 256 ? raw : raw.byteSwapped
        switch family {
        case 2: IPDecoder.decode(version: 4, &r, into: &rec)
        // AF_INET6 differs by OS: Linux 10, NetBSD/OpenBSD 24, FreeBSD 28, macOS 30.
        case 10, 24, 28, 30: IPDecoder.decode(version: 6, &r, into: &rec)
        default: rec.notes.insert(.notIP)
        }
    }

    /// Direction from the cooked header's packet type (PACKET_HOST 0 ... PACKET_OUTGOING 4); loopback from ARPHRD.
    private static func cooked(packetType: UInt16, arphrd: UInt16, into rec: inout PacketRecord) {
        switch packetType {
        case 4: rec.direction = .outbound
        case 0, 1, 2, 3: rec.direction = .inbound
        default: rec.direction = .unknown
        }
        if arphrd == arphrdLoopback {
            rec.point.isLoopback = true
            // A cooked capture has no interface names; ARPHRD_LOOPBACK is the one name it does tell.
            if rec.point.kind == .interface && rec.point.interfaceName == .any { rec.point.interfaceName = .lo }
        }
    }

    /// The packet after an EtherType: IP, or 802.1Q / 802.1ad tags (TCI, then the next EtherType; up to 4) before
    /// it. Tags come in Ethernet frames, and in cooked ones too: libpcap reinserts an offloaded tag after the
    /// LINUX_SLL header, and the kernel hands a tag it did not strip in the payload. Looked for only when the
    /// EtherType is not IP, so untagged packets pay nothing for them.
    private static func network(etherType: UInt16, _ r: inout ByteReader, into rec: inout PacketRecord) {
        var version = ipVersion(etherType: etherType)
        if version == 0 {
            var inner = etherType
            var tags = 0
            while inner == 0x8100 || inner == 0x88a8 || inner == 0x9100 {
                tags += 1
                guard tags <= 4, r.skip(2), let next = r.be16() else {
                    rec.notes.insert(.truncatedLink)
                    return
                }
                inner = next
            }
            version = ipVersion(etherType: inner)
            guard version != 0 else {
                rec.notes.insert(.notIP)
                return
            }
        }
        IPDecoder.decode(version: version, &r, into: &rec)
    }
}
