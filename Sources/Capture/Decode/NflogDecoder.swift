// NFLOG records: what an NFLOG rule sends to userspace, either inside a LINKTYPE_NFLOG capture
// (`tcpdump -i nflog:G -w`) or as a live nfnetlink_log message. Both carry the same TLVs; they differ
// in the header in front (a 4-byte nflog_hdr in files, nlmsghdr + nfgenmsg live) and in the byte order
// of the TLV headers: the producer's host order live, and host order again after libpcap read a file
// (libpcap swaps them when the file came from a machine of the other byte order; pcap/nflog.h).

// linux/netfilter/nfnetlink_log.h
enum NFULA {
    static let packetHeader: UInt16 = 1
    static let mark: UInt16 = 2
    static let timestamp: UInt16 = 3
    static let inputIfindex: UInt16 = 4
    static let outputIfindex: UInt16 = 5
    static let physInputIfindex: UInt16 = 6
    static let physOutputIfindex: UInt16 = 7
    static let hwAddress: UInt16 = 8
    static let payload: UInt16 = 9
    static let prefix: UInt16 = 10
    static let uid: UInt16 = 11
    static let sequence: UInt16 = 12
    static let globalSequence: UInt16 = 13
    static let gid: UInt16 = 14
    static let hwType: UInt16 = 15
    static let hwHeader: UInt16 = 16
    static let hwLength: UInt16 = 17
    static let conntrack: UInt16 = 18
    static let conntrackInfo: UInt16 = 19
}

extension PacketDecoder {
    /// Decodes the TLVs of one NFLOG message (everything after nflog_hdr in a file, or after nlmsghdr +
    /// nfgenmsg in a live netlink message) into `record`, replacing what it held except `ref` and `time`.
    ///
    /// - Parameters:
    ///   - family: nfgenmsg / nflog_hdr family (2 AF_INET, 10 AF_INET6) — the payload's IP version.
    ///   - group: the NFLOG group (res_id).
    ///   - byteOrder: byte order of the TLV length/type: `.host` live and for files read through libpcap.
    ///   - nestedByteOrder: byte order of the ctnetlink attribute headers inside NFULA_CT, which libpcap does
    ///     not swap: the capturing machine's order (`.host` live). Defaults to `byteOrder`.
    public mutating func decodeNflogAttributes(_ buf: UnsafeRawBufferPointer, family: UInt8, group: UInt16,
                                               byteOrder: ByteOrder, nestedByteOrder: ByteOrder? = nil,
                                               into record: inout PacketRecord) {
        record.resetDecodedFields()
        decodeNflogTLVs(ByteReader(buf), family: family, group: group, byteOrder: byteOrder,
                        nestedByteOrder: nestedByteOrder ?? byteOrder, captureCut: false, into: &record)
    }

    /// LINKTYPE_NFLOG: u8 family, u8 version, be16 resource id (the group), then TLVs to the end.
    mutating func decodeNflogRecord(_ r: inout ByteReader, captureCut: Bool, into record: inout PacketRecord) {
        guard let family = r.u8(), r.skip(1), let group = r.be16() else {
            record.notes.insert(.truncatedLink)
            record.nflog = NflogMeta()
            record.point = .netfilter(.unknown)
            if selector != nil { record.selected = false }
            return
        }
        decodeNflogTLVs(r, family: family, group: group, byteOrder: nflogByteOrder, nestedByteOrder: nestedByteOrder,
                        captureCut: captureCut, into: &record)
    }

    private mutating func decodeNflogTLVs(_ r: ByteReader, family: UInt8, group: UInt16, byteOrder: ByteOrder,
                                          nestedByteOrder: ByteOrder, captureCut: Bool, into record: inout PacketRecord) {
        // Filled in place: the record's NFLOG fields are ~270 bytes, and this runs for every NFLOG record.
        record.nflogFields.reset()
        record.hasNflog = true
        record.nflogFields.group = group
        var payload: ByteReader? = nil
        var attrs = NetlinkAttributes(r, order: byteOrder)
        while let (type, value) = attrs.next() {
            var v = value
            switch type {
            case NFULA.packetHeader:
                guard let proto = v.be16(), let hook = v.u8() else { record.notes.insert(.badNflogTLV); continue }
                record.nflogFields.hwProtocol = proto
                record.nflogFields.hook = NetfilterHook(rawValue: hook) ?? .unknown
            case NFULA.mark: record.nflogFields.mark = be32(&v, &record)
            case NFULA.timestamp:
                guard let sec = v.be64(), let usec = v.be64() else { record.notes.insert(.badNflogTLV); continue }
                record.nflogFields.hadKernelTimestamp = true
                record.nflogFields.kernelTime = Timestamp(seconds: Int64(truncatingIfNeeded: sec),
                                                          nanoseconds: Int32(truncatingIfNeeded: (usec % 1_000_000) * 1000))
            case NFULA.inputIfindex: record.nflogFields.inputIfindex = be32(&v, &record)
            case NFULA.outputIfindex: record.nflogFields.outputIfindex = be32(&v, &record)
            case NFULA.physInputIfindex: record.nflogFields.physInputIfindex = be32(&v, &record)
            case NFULA.physOutputIfindex: record.nflogFields.physOutputIfindex = be32(&v, &record)
            case NFULA.payload: payload = v
            case NFULA.prefix: record.nflogFields.prefixID = tags.intern(v.rest)
            case NFULA.uid: record.nflogFields.uid = be32(&v, &record)
            case NFULA.gid: record.nflogFields.gid = be32(&v, &record)
            case NFULA.sequence: record.nflogFields.sequence = be32(&v, &record)
            case NFULA.globalSequence: record.nflogFields.globalSequence = be32(&v, &record)
            case NFULA.conntrack:
                if let ct = ConntrackDecoder.decode(v, order: nestedByteOrder) {
                    record.nflogFields.conntrack = ct
                } else {
                    record.notes.insert(.badConntrack)
                }
            case NFULA.conntrackInfo: record.nflogFields.conntrackState = be32(&v, &record)
            default:
                // HWADDR, HWTYPE, HWHEADER, HWLEN, VLAN, L2HDR, and types newer than this decoder: the
                // walker already stepped over them by their length.
                break
            }
        }
        switch attrs.failure {
        case .none: break
        case .beyondBuffer: record.notes.insert(captureCut ? [.truncatedNflog, .snaplenCut] : .badNflogTLV)
        case .shortLength: record.notes.insert(.badNflogTLV)
        case .trailingBytes: record.notes.insert(captureCut ? [.truncatedNflog, .snaplenCut] : .badNflogTLV)
        }

        record.point = .netfilter(record.nflogFields.hook)
        switch record.nflogFields.hook {
        case .output, .postrouting: record.direction = .outbound
        case .prerouting, .input, .ingress: record.direction = .inbound
        default: record.direction = .unknown
        }
        if let selector { record.selected = payload.map { selector.matches(ipPacket: $0.rest) } ?? false }
        guard var p = payload else { return }
        if record.wireLength == 0 { record.wireLength = UInt32(p.remaining) }
        // The family in the header is the rule's (an inet-family nft table logs both); the payload's own
        // version nibble decides, with the header family as the fallback for an empty payload.
        let version: UInt8 = p.peekU8().map { $0 >> 4 } ?? (family == 10 ? 6 : 4)
        IPDecoder.decode(version: version, &p, into: &record)
    }

    private func be32(_ v: inout ByteReader, _ record: inout PacketRecord) -> UInt32? {
        guard let x = v.be32() else {
            record.notes.insert(.badNflogTLV)
            return nil
        }
        return x
    }
}
