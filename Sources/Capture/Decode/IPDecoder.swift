// IPv4 and IPv6 headers (with IPv6 extension headers), then the transport layer inside.
// Lengths come from the IP header; the captured bytes only decide how far decoding gets. When an NFLOG
// payload is shorter than its packet (`--nflog-size`), a truncation is also marked `.snaplenCut` so a reader
// can tell "the copy was cut" from "the packet is malformed" (`PacketDecoder` marks a frame cut by a snaplen).

enum IPDecoder {
    /// Decodes an L3 packet whose family is told by the link layer; 0 = look at the version nibble.
    static func decode(version: UInt8, _ r: inout ByteReader, into rec: inout PacketRecord) {
        var v = version
        if v == 0 {
            guard let first = r.peekU8() else {
                rec.notes.insert(.truncatedIP)
                return
            }
            v = first >> 4
        }
        switch v {
        case 4: ipv4(&r, into: &rec)
        case 6: ipv6(&r, into: &rec)
        default: rec.notes.insert(.notIP)
        }
    }

    static func ipv4(_ r: inout ByteReader, into rec: inout PacketRecord) {
        let captured = r.remaining
        guard let verIHL = r.u8(), r.skip(1), let totalLength = r.be16(), let id = r.be16(),
              let fragField = r.be16(), let ttl = r.u8(), let proto = r.u8(), r.skip(2),
              let src = r.be32(), let dst = r.be32() else {
            rec.notes.insert(.truncatedIP)
            return
        }
        guard verIHL >> 4 == 4 else {
            rec.notes.insert(.badIPHeader)
            return
        }
        let headerLength = Int(verIHL & 0x0f) * 4
        var ipLength = Int(totalLength)
        guard headerLength >= 20 else {
            rec.notes.insert(.badIPHeader)
            return
        }
        if _slowPath(ipLength < headerLength) {
            // Linux BIG TCP (and TSO seen before segmentation): a packet above 64 KiB has total length 0; its
            // length is the frame's (tcpdump: "presumed BIG TCP"). Any other length below the header is bad.
            if ipLength == 0 && (proto == IPProto.tcp || proto == IPProto.udp) {
                ipLength = bigPacketLength(captured: captured, r, rec)
            }
            guard ipLength >= headerLength else {
                rec.notes.insert(.badIPHeader)
                return
            }
        }
        rec.ipLength = UInt32(truncatingIfNeeded: ipLength)  // at most the frame's UInt32 wire length
        rec.ipID = UInt32(id)
        rec.ttl = ttl
        rec.tuple.proto = proto
        rec.tuple.src.addr = IPAddress(v4: src)
        rec.tuple.dst.addr = IPAddress(v4: dst)
        if headerLength > 20 {
            rec.notes.insert(.ipOptions)
            guard r.skip(headerLength - 20) else {
                rec.notes.insert(copyCut(captured: captured, ipLength: ipLength, rec) ? [.truncatedIP, .snaplenCut] : .truncatedIP)
                return
            }
        }
        let moreFragments = fragField & 0x2000 != 0
        let fragmentOffset = fragField & 0x1fff
        if moreFragments || fragmentOffset != 0 { rec.notes.insert(.fragment) }
        if fragmentOffset != 0 {
            // Only the first fragment carries the transport header.
            rec.notes.insert(.nonFirstFragment)
            return
        }
        let l4Length = ipLength - headerLength
        // Ethernet pads short frames: read no further than the IP packet.
        var l4 = r.subReader(upTo: l4Length)
        transport(proto: proto, &l4, l4Length: l4Length, captured: captured, ipLength: ipLength, into: &rec)
    }

    /// Upper bound on extension headers walked: each consumes at least 8 bytes, so the buffer ends the walk
    /// anyway; the bound names a hostile chain instead of walking a 64 KiB one.
    static let maxExtensionHeaders = 16

    static func ipv6(_ r: inout ByteReader, into rec: inout PacketRecord) {
        let captured = r.remaining
        guard let word0 = r.be32(), let payloadLength = r.be16(), var next = r.u8(), let hopLimit = r.u8(),
              let srcHi = r.be64(), let srcLo = r.be64(), let dstHi = r.be64(), let dstLo = r.be64() else {
            rec.notes.insert(.truncatedIP)
            return
        }
        guard word0 >> 28 == 6 else {
            rec.notes.insert(.badIPHeader)
            return
        }
        rec.ttl = hopLimit
        rec.tuple.src.addr = IPAddress(v6: srcHi, srcLo)
        rec.tuple.dst.addr = IPAddress(v6: dstHi, dstLo)
        var l4Length = Int(payloadLength)
        if _slowPath(payloadLength == 0) {
            // A jumbogram (RFC 2675: the length is in a hop-by-hop Jumbo Payload option), or Linux BIG TCP, which
            // leaves the option out of what a capture sees: TCP or UDP right after the header, a frame above 64 KiB.
            if next == 0, let jumbo = jumboPayloadLength(r) {
                l4Length = jumbo
            } else if next == IPProto.tcp || next == IPProto.udp {
                let frame = bigPacketLength(captured: captured, r, rec)
                if frame > 65_535 { l4Length = frame - 40 }
            }
        }
        rec.ipLength = UInt32(truncatingIfNeeded: 40 + l4Length)  // the jumbo length is bounded, the frame's is a UInt32
        let ipLength = 40 + l4Length
        var walked = 0
        walk: while true {
            switch next {
            case 0, 43, 60, 51, 44:
                walked += 1
                rec.notes.insert(.ipv6ExtensionHeaders)
                guard walked <= maxExtensionHeaders else {
                    rec.notes.insert(.badIPHeader)
                    rec.tuple.proto = next
                    return
                }
                guard let nextHeader = r.u8(), let lengthByte = r.u8() else {
                    rec.tuple.proto = next
                    rec.notes.insert(copyCut(captured: captured, ipLength: ipLength, rec) ? [.truncatedIP, .snaplenCut] : .truncatedIP)
                    return
                }
                let length: Int
                if next == 44 {
                    // Fragment header: fixed 8 bytes (offset, M flag, 32-bit identification).
                    guard let offsetField = r.be16(), let id = r.be32() else {
                        rec.tuple.proto = next
                        rec.notes.insert(copyCut(captured: captured, ipLength: ipLength, rec) ? [.truncatedIP, .snaplenCut] : .truncatedIP)
                        return
                    }
                    rec.ipID = id
                    rec.notes.insert(.fragment)
                    length = 8
                    if offsetField >> 3 != 0 {
                        rec.tuple.proto = nextHeader
                        rec.notes.insert(.nonFirstFragment)
                        return
                    }
                } else {
                    // AH counts 4-byte words minus 2; the others 8-byte words minus 1.
                    length = next == 51 ? (Int(lengthByte) + 2) * 4 : (Int(lengthByte) + 1) * 8
                    guard r.skip(length - 2) else {
                        rec.tuple.proto = next
                        rec.notes.insert(copyCut(captured: captured, ipLength: ipLength, rec) ? [.truncatedIP, .snaplenCut] : .truncatedIP)
                        return
                    }
                }
                l4Length -= length
                next = nextHeader
            default:
                break walk
            }
        }
        rec.tuple.proto = next
        guard l4Length >= 0 else {
            rec.notes.insert(.badIPHeader)
            return
        }
        // 50 (ESP) and 59 (no next header) end here: nothing readable follows.
        var l4 = r.subReader(upTo: l4Length)
        transport(proto: next, &l4, l4Length: l4Length, captured: captured, ipLength: ipLength, into: &rec)
    }

    /// Whether a packet shorter than its IP length was cut in the copy (an NFLOG payload: `--nflog-size`) rather
    /// than malformed. A frame's own cut is `PacketDecoder`'s to tell, from caplen < wire length: a whole frame
    /// whose IP header claims more than it holds is a malformed packet, not a snaplen cut.
    @inline(__always)
    private static func copyCut(captured: Int, ipLength: Int, _ rec: PacketRecord) -> Bool {
        rec.hasNflog && captured < ipLength
    }

    /// The IP packet's length on the wire, from the frame's: what is left of the capture at the IP header
    /// (`captured`) plus what the snaplen cut off. An NFLOG payload has no wire length of its own: what it holds.
    private static func bigPacketLength(captured: Int, _ r: ByteReader, _ rec: PacketRecord) -> Int {
        // `r` is the frame (a link decoder's reader) unless the packet came in an NFLOG record.
        guard !rec.hasNflog else { return captured }
        return captured + max(0, Int(rec.wireLength) - r.bytes.count)
    }

    /// The Jumbo Payload option's length (IPv6 payload after the fixed header) when the hop-by-hop header at the
    /// reader's position has one; nil otherwise or when the header is not all captured.
    private static func jumboPayloadLength(_ r: ByteReader) -> Int? {
        var h = r
        guard h.skip(1), let lengthByte = h.u8() else { return nil }
        var options = h.subReader(upTo: (Int(lengthByte) + 1) * 8 - 2)
        while let type = options.u8() {
            if type == 0 { continue }  // Pad1
            guard let length = options.u8() else { return nil }
            if type == 0xc2 && length == 4 {
                // RFC 2675: above 65535; the bound keeps 40 + the length within the record's UInt32.
                guard let jumbo = options.be32(), jumbo > 65_535, jumbo <= UInt32.max - 40 else { return nil }
                return Int(jumbo)
            }
            guard options.skip(Int(length)) else { return nil }
        }
        return nil
    }

    private static func transport(proto: UInt8, _ r: inout ByteReader, l4Length: Int, captured: Int, ipLength: Int,
                                  into rec: inout PacketRecord) {
        TransportDecoder.decode(proto: proto, &r, l4Length: l4Length, into: &rec)
        if rec.notes.contains(.truncatedTransport) && copyCut(captured: captured, ipLength: ipLength, rec) {
            rec.notes.insert(.snaplenCut)
        }
    }
}
