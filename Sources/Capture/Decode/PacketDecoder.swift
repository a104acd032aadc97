// The entry point from raw frame bytes to a `PacketRecord`: picks the link-layer decoder for the
// capture's link type and chains down through IP to the transport layer. Fills the caller's record in
// place and allocates nothing per packet (NFLOG prefixes seen before are looked up, not copied).

public struct PacketDecoder {
    /// Where NFLOG prefixes are interned; shared with whoever maps ids back to rules.
    public let tags: RuleTagTable
    /// Byte order of the ctnetlink headers inside NFULA_CT in files: libpcap swaps the NFLOG TLV headers of
    /// an other-endian file to host order but not the nested ones. `PcapFileSource` sets it per file.
    public var nestedByteOrder: ByteOrder = .host
    /// Byte order of NFLOG TLV headers in LINKTYPE_NFLOG frames: `.host` for frames libpcap handed out (it swaps
    /// them), the writer's order for pcapng read without libpcap.
    public var nflogByteOrder: ByteOrder = .host
    /// `--filter`: when set, each record's `selected` says whether its packet matches (for an NFLOG record the IP
    /// packet it carries, found as the record is decoded; else the frame). Unset, every record is selected.
    public var selector: ConnectionFilter? = nil
    /// Frames decoded, and how many of them carried at least one note.
    public private(set) var framesDecoded: UInt64 = 0
    public private(set) var framesWithNotes: UInt64 = 0

    public init(tags: RuleTagTable) {
        self.tags = tags
    }

    public static func isSupported(linkType: Int32) -> Bool { LinkType.isSupported(linkType) }

    /// Decodes one captured frame. `bytes` is what was captured (caplen), `wireLength` the original length.
    /// The record's `ref`, `time` and `point` are the caller's (set them first; `point` is the capture's
    /// interface); everything else is replaced. NFLOG frames set `point` to their netfilter hook.
    public mutating func decode(linkType: Int32, bytes: UnsafeRawBufferPointer, wireLength: UInt32,
                                into record: inout PacketRecord) {
        record.resetDecodedFields()
        record.wireLength = wireLength
        var r = ByteReader(bytes)
        switch linkType {
        case LinkType.ethernet: LinkDecoder.ethernet(&r, into: &record)
        case LinkType.linuxSLL: LinkDecoder.linuxSLL(&r, into: &record)
        case LinkType.linuxSLL2: LinkDecoder.linuxSLL2(&r, into: &record)
        case LinkType.raw, LinkType.rawDLT, LinkType.rawOpenBSD: IPDecoder.decode(version: 0, &r, into: &record)
        case LinkType.ipv4: IPDecoder.decode(version: 4, &r, into: &record)
        case LinkType.ipv6: IPDecoder.decode(version: 6, &r, into: &record)
        case LinkType.null, LinkType.loop: LinkDecoder.nullOrLoop(&r, into: &record)
        case LinkType.nflog: decodeNflogRecord(&r, captureCut: bytes.count < Int(wireLength), into: &record)
        default: record.notes.insert(.unknownLinkPayload)
        }
        if selector != nil && linkType != LinkType.nflog { select(&record, frame: bytes, wireLength: wireLength, linkType: linkType) }
        if bytes.count < Int(wireLength), !record.notes.isDisjoint(with: PacketDecoder.truncations) {
            record.notes.insert(.snaplenCut)
        }
        framesDecoded &+= 1
        if !record.notes.isEmpty { framesWithNotes &+= 1 }
    }

    /// Out of line: inlined, the selector's call made every frame's decode save and restore more registers, with
    /// or without a filter (~14 instructions per packet).
    @inline(never)
    private func select(_ record: inout PacketRecord, frame: UnsafeRawBufferPointer, wireLength: UInt32, linkType: Int32) {
        record.selected = selector?.matches(frame: frame, wireLength: wireLength, linkType: linkType) ?? true
    }

    static let truncations: DecodeNotes = [.truncatedLink, .truncatedIP, .truncatedTransport, .truncatedNflog]
}

extension PacketRecord {
    /// Clears what a decoder fills, keeping the caller's `ref`, `time` and `point` (minus per-packet loopback
    /// detection). Assigning inline values only: no allocation.
    @inline(__always)
    mutating func resetDecodedFields() {
        direction = .unknown
        wireLength = 0
        ipLength = 0
        tuple = FiveTuple(proto: 0, src: Endpoint(.none, 0), dst: Endpoint(.none, 0))
        ipID = 0
        ttl = 0
        tcpFlags = []
        tcpSeq = 0
        tcpAck = 0
        payloadLength = 0
        icmpType = 0
        icmpCode = 0
        hasQuoted = false
        hasNflog = false
        selected = true
        notes = []
        ifindex = 0
    }
}
