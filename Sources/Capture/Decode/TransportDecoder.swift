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
        guard type == echoRequest || type == echoReply else { return }
        guard r.skip(2), let id = r.be16() else {
            rec.notes.insert(.truncatedTransport)
            return
        }
        rec.tuple.dst.port = id
    }
}
