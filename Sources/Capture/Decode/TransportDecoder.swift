// TCP, UDP, ICMP and ICMPv6 headers. Ports are read before anything else so a snaplen that cuts the
// header after four bytes still yields a tuple the correlator can use.

enum TransportDecoder {
    /// Decodes the transport header at the reader's position. `l4Length` is the transport length the IP
    /// header announces (it may exceed what was captured); payload lengths come from it, not from the capture.
    static func decode(proto: UInt8, _ r: inout ByteReader, l4Length: Int, into rec: inout PacketRecord) {
        switch proto {
        case IPProto.tcp: tcp(&r, l4Length: l4Length, into: &rec)
        case IPProto.udp: udp(&r, l4Length: l4Length, into: &rec)
        case IPProto.icmp: icmp(&r, echoRequest: 8, echoReply: 0, into: &rec)
        case IPProto.icmpv6: icmp(&r, echoRequest: 128, echoReply: 129, into: &rec)
        case IPProto.sctp: ports(&r, into: &rec)
        default: break
        }
    }

    private static func ports(_ r: inout ByteReader, into rec: inout PacketRecord) {
        guard let sport = r.be16(), let dport = r.be16() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        rec.tuple.src.port = sport
        rec.tuple.dst.port = dport
    }

    private static func tcp(_ r: inout ByteReader, l4Length: Int, into rec: inout PacketRecord) {
        guard let sport = r.be16(), let dport = r.be16() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        rec.tuple.src.port = sport
        rec.tuple.dst.port = dport
        guard let seq = r.be32(), let ack = r.be32(), let offsetByte = r.u8(), let flags = r.u8() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        rec.tcpSeq = seq
        rec.tcpAck = ack
        // Only the six classic flags: ECE/CWR (0x40/0x80) are congestion signalling, not connection state.
        rec.tcpFlags = TCPFlags(rawValue: flags & 0x3f)
        let headerLength = Int(offsetByte >> 4) * 4
        guard headerLength >= 20, headerLength <= l4Length else {
            rec.notes.insert(.badTransportHeader)
            return
        }
        rec.payloadLength = UInt32(l4Length - headerLength)
        // window, checksum, urgent pointer and options: present or the header was cut.
        if !r.has(headerLength - 14) { rec.notes.insert(.truncatedTransport) }
    }

    private static func udp(_ r: inout ByteReader, l4Length: Int, into rec: inout PacketRecord) {
        guard let sport = r.be16(), let dport = r.be16() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        rec.tuple.src.port = sport
        rec.tuple.dst.port = dport
        guard let length = r.be16() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        if length == 0 && l4Length > 65_535 {
            // A datagram above 64 KiB (an IPv6 jumbogram, RFC 2675; BIG TCP's tunnels) has length 0.
            rec.payloadLength = UInt32(l4Length - 8)
            return
        }
        if length < 8 {
            rec.notes.insert(.badTransportHeader)
            return
        }
        rec.payloadLength = UInt32(length - 8)
    }

    /// FiveTuple's ICMP convention: src port = type<<8|code, dst port = the echo identifier (0 for other types),
    /// so an echo request and its reply share the dst port the correlator keys on.
    private static func icmp(_ r: inout ByteReader, echoRequest: UInt8, echoReply: UInt8, into rec: inout PacketRecord) {
        guard let type = r.u8(), let code = r.u8() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        rec.icmpType = type
        rec.icmpCode = code
        rec.tuple.src.port = UInt16(type) << 8 | UInt16(code)
        rec.tuple.dst.port = 0
        if IcmpMessage.isError(proto: rec.tuple.proto, type: type) {
            // Checksum and the 4-byte rest of the header (unused, MTU, pointer), then the packet reported on. A
            // record that is itself a quote (`hasQuoted` set below) reads no quote inside it: an error about an
            // error names no connection, and a hostile chain of nested errors is not followed.
            guard !rec.hasQuoted, r.skip(6) else { return }
            quotedPacket(&r, family: rec.tuple.src.addr.family, into: &rec)
            return
        }
        guard type == echoRequest || type == echoReply else { return }
        guard r.skip(2), let id = r.be16() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        rec.tuple.dst.port = id
    }

    /// The packet an ICMP error quotes: its IP header and at least the first 8 bytes after it, decoded by the same
    /// IP and transport decoders as any packet (IPv4 options, IPv6 extension headers, fragments), into a scratch
    /// record on the stack. Its tuple is kept when the addresses and the ports (or a quoted echo's type and
    /// identifier) were read, in the error's own family, and not from a non-first fragment. A quote cut short is
    /// no damage to the error itself: the scratch record's notes stay there.
    private static func quotedPacket(_ r: inout ByteReader, family: IPAddress.Family, into rec: inout PacketRecord) {
        guard family != .none else { return }
        var q = PacketRecord()
        q.hasQuoted = true
        IPDecoder.decode(version: family == .v4 ? 4 : 6, &r, into: &q)
        let t = q.tuple
        guard t.src.addr.family == family, q.notes.isDisjoint(with: [.notIP, .badIPHeader, .truncatedIP, .nonFirstFragment])
        else { return }
        switch t.proto {
        case IPProto.tcp, IPProto.udp, IPProto.sctp:
            // Ports are read first: cut before them, both are still 0.
            guard !(q.notes.contains(.truncatedTransport) && t.src.port == 0 && t.dst.port == 0) else { return }
        case IPProto.icmp, IPProto.icmpv6:
            // Only a quoted echo keys a connection (by its identifier), and only with the identifier read.
            guard FlowKey.isEcho(t), !q.notes.contains(.truncatedTransport) else { return }
        default:
            return
        }
        rec.quoted = t
        rec.hasQuoted = true
    }
}

/// ICMP and ICMPv6 messages by type and code: which are errors (they quote the packet they report on), and the
/// words tcpdump's readers know them by.
public enum IcmpMessage {
    public static func isError(proto: UInt8, type: UInt8) -> Bool {
        switch proto {
        case IPProto.icmp: return type == 3 || type == 4 || type == 5 || type == 11 || type == 12
        case IPProto.icmpv6: return type >= 1 && type <= 4
        default: return false
        }
    }

    /// "port unreachable", "echo request", "packet too big", ...; "type T code C" for the rest.
    /// The message of an ICMP tuple, whose source port holds type << 8 | code (`TransportDecoder.icmp`).
    public static func name(of t: FiveTuple) -> String {
        name(proto: t.proto, type: UInt8(t.src.port >> 8), code: UInt8(t.src.port & 0xff))
    }

    public static func name(proto: UInt8, type: UInt8, code: UInt8) -> String {
        if proto == IPProto.icmp {
            switch (type, code) {
            case (0, _): return "echo reply"
            case (3, 0): return "net unreachable"
            case (3, 1): return "host unreachable"
            case (3, 2): return "protocol unreachable"
            case (3, 3): return "port unreachable"
            case (3, 4): return "fragmentation needed"
            case (3, 9), (3, 10), (3, 13): return "administratively prohibited"
            case (3, _): return "unreachable code \(code)"
            case (4, _): return "source quench"
            case (5, _): return "redirect"
            case (8, _): return "echo request"
            case (11, 0): return "time exceeded in transit"
            case (11, _): return "fragment reassembly time exceeded"
            case (12, _): return "parameter problem"
            default: break
            }
        } else if proto == IPProto.icmpv6 {
            switch (type, code) {
            case (1, 0): return "no route"
            case (1, 1): return "administratively prohibited"
            case (1, 3): return "address unreachable"
            case (1, 4): return "port unreachable"
            case (1, 5): return "source address failed policy"
            case (1, 6): return "reject route"
            case (1, _): return "unreachable code \(code)"
            case (2, _): return "packet too big"
            case (3, 0): return "hop limit exceeded in transit"
            case (3, _): return "fragment reassembly time exceeded"
            case (4, _): return "parameter problem"
            case (128, _): return "echo request"
            case (129, _): return "echo reply"
            case (130, _): return "multicast listener query"
            case (131, _): return "multicast listener report"
            case (132, _): return "multicast listener done"
            case (143, _): return "multicast listener report v2"
            case (133, _): return "router solicitation"
            case (134, _): return "router advertisement"
            case (135, _): return "neighbor solicitation"
            case (136, _): return "neighbor advertisement"
            case (137, _): return "redirect"
            default: break
            }
        }
        return "type \(type) code \(code)"
    }
}
