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
    private let order: ByteOrder
    private(set) var failure: Failure = .none

    init(_ reader: ByteReader, order: ByteOrder) {
        self.reader = reader
        self.order = order
    }

    /// NLA_F_NESTED (0x8000) and NLA_F_NET_BYTEORDER (0x4000) are flags, not part of the type.
    static let typeMask: UInt16 = 0x3fff

    /// The next attribute's type and value, or nil at the end or at the first malformed header (see `failure`).
    @inline(__always)
    mutating func next() -> (type: UInt16, value: ByteReader)? {
        guard failure == .none else { return nil }
        guard reader.remaining >= 4 else {
            if reader.remaining > 0 { failure = .trailingBytes }
            return nil
        }
        let length = Int(reader.u16(order)!)
        let type = reader.u16(order)! & NetlinkAttributes.typeMask
        guard length >= 4 else {
            failure = .shortLength
            return nil
        }
        guard let value = reader.subReader(length - 4) else {
            failure = .beyondBuffer
            return nil
        }
        // NFA_ALIGN / NLA_ALIGN: the last attribute's padding may be missing when the message ends there.
        let padding = (4 - length % 4) % 4
        reader.skip(min(padding, reader.remaining))
        return (type, value)
    }
}
