// Netlink-style type-length-value attributes: NFLOG's TLVs and the ctnetlink attributes nested in
// NFULA_CT share one layout (u16 length including the 4-byte header, u16 type, value padded to 4 bytes).
// The header's byte order is the producer's host order (or, through libpcap, the reader's host order),
// so it is a parameter; the values themselves are big-endian by protocol.

struct NetlinkAttributes {
    enum Failure: Equatable {
        case none
        /// A length below the 4-byte header: the walk cannot continue.
        case shortLength
        /// A length reaching past the buffer: cut by a snaplen, or bogus.
        case beyondBuffer
        /// 1-3 bytes after the last attribute: too few for a header.
        case trailingBytes
    }

    private var reader: ByteReader
    /// Whether the headers' order differs from this machine's (files written on another one).
    private let swapped: Bool
    private(set) var failure: Failure = .none

    init(_ reader: ByteReader, order: ByteOrder) {
        self.reader = reader
        self.swapped = order != .host
    }

    /// NLA_F_NESTED (0x8000) and NLA_F_NET_BYTEORDER (0x4000) are flags, not part of the type.
    static let typeMask: UInt16 = 0x3fff

    /// The next attribute's type and value, or nil at the end or at the first malformed header (see `failure`).
    /// Every NFLOG record runs this ~10 times: the header is loaded directly, bounds checked once.
    @inline(__always)
    mutating func next() -> (type: UInt16, value: ByteReader)? {
        let start = reader.offset
        let remaining = reader.bytes.count - start
        guard failure == .none, remaining >= 4, let base = reader.bytes.baseAddress else {
            if failure == .none && remaining > 0 { failure = .trailingBytes }
            return nil
        }
        var length = base.loadUnaligned(fromByteOffset: start, as: UInt16.self)
        var type = base.loadUnaligned(fromByteOffset: start + 2, as: UInt16.self)
        if swapped { length = length.byteSwapped; type = type.byteSwapped }
        let n = Int(length)
        guard n >= 4 else {
            failure = .shortLength
            return nil
        }
        guard n <= remaining else {
            failure = .beyondBuffer
            return nil
        }
        // NFA_ALIGN / NLA_ALIGN: the last attribute's padding may be missing when the message ends there.
        reader.seek(to: min(start + ((n + 3) & ~3), reader.bytes.count))
        return (type & NetlinkAttributes.typeMask, ByteReader(UnsafeRawBufferPointer(start: base + start + 4, count: n - 4)))
    }
}
