// The one way decoders read packet bytes (tcpdump's GET_* idea): every read is checked against the
// end of the buffer and answers nil instead of reading past it, so a truncated or hostile packet
// becomes a `DecodeNotes` entry in the record, never a crash. A value type over borrowed memory:
// making one, slicing one and reading through one never allocates.

/// Byte order of multi-byte fields whose order is not fixed by the protocol
/// (NFLOG TLV headers, netlink attribute headers, the NULL link type's address family).
public enum ByteOrder: Sendable {
    case big, little

    public static var host: ByteOrder {
        1.littleEndian == 1 ? .little : .big
    }

    public var swapped: ByteOrder { self == .big ? .little : .big }
}

public struct ByteReader {
    public let bytes: UnsafeRawBufferPointer
    /// Position of the next read, from the start of `bytes`.
    public private(set) var offset: Int

    public init(_ bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
        self.offset = 0
    }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset >= bytes.count }
    /// The unread bytes.
    public var rest: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: bytes[offset...]) }

    @inline(__always)
    public func has(_ n: Int) -> Bool { n >= 0 && n <= bytes.count - offset }

    // MARK: reads that advance

    @inline(__always)
    public mutating func u8() -> UInt8? {
        guard has(1) else { return nil }
        defer { offset += 1 }
        return bytes[offset]
    }

    @inline(__always)
    public mutating func be16() -> UInt16? { load(UInt16.self).map { UInt16(bigEndian: $0) } }
    @inline(__always)
    public mutating func le16() -> UInt16? { load(UInt16.self).map { UInt16(littleEndian: $0) } }
    @inline(__always)
    public mutating func be32() -> UInt32? { load(UInt32.self).map { UInt32(bigEndian: $0) } }
    @inline(__always)
    public mutating func le32() -> UInt32? { load(UInt32.self).map { UInt32(littleEndian: $0) } }
    @inline(__always)
    public mutating func be64() -> UInt64? { load(UInt64.self).map { UInt64(bigEndian: $0) } }

    @inline(__always)
    public mutating func u16(_ order: ByteOrder) -> UInt16? { order == .big ? be16() : le16() }
    @inline(__always)
    public mutating func u32(_ order: ByteOrder) -> UInt32? { order == .big ? be32() : le32() }

    /// Skips `n` bytes; false (and nothing skipped) when fewer remain.
    @discardableResult
    public mutating func skip(_ n: Int) -> Bool {
        guard has(n) else { return false }
        offset += n
        return true
    }

    /// Moves to an absolute position inside the buffer; false when it is outside.
    @discardableResult
    public mutating func seek(to position: Int) -> Bool {
        guard position >= 0 && position <= bytes.count else { return false }
        offset = position
        return true
    }

    /// The next `n` bytes as a buffer, advancing past them.
    public mutating func take(_ n: Int) -> UnsafeRawBufferPointer? {
        guard has(n) else { return nil }
        defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + n)])
    }

    /// A reader over the next `n` bytes, advancing past them.
    public mutating func subReader(_ n: Int) -> ByteReader? {
        take(n).map(ByteReader.init)
    }

    /// A reader over at most the next `n` bytes (fewer when the buffer ends first), advancing past them.
    public mutating func subReader(upTo n: Int) -> ByteReader {
        take(max(0, min(n, remaining)))!.withReader()
    }

    // MARK: reads at an offset from the current position, without advancing

    @inline(__always)
    public func peekU8(at delta: Int = 0) -> UInt8? {
        guard delta >= 0, has(delta + 1) else { return nil }
        return bytes[offset + delta]
    }

    @inline(__always)
    public func peekBE16(at delta: Int = 0) -> UInt16? {
        guard delta >= 0, has(delta + 2) else { return nil }
        return UInt16(bigEndian: bytes.loadUnaligned(fromByteOffset: offset + delta, as: UInt16.self))
    }

    @inline(__always)
    public func peekBE32(at delta: Int = 0) -> UInt32? {
        guard delta >= 0, has(delta + 4) else { return nil }
        return UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: offset + delta, as: UInt32.self))
    }

    @inline(__always)
    private mutating func load<T: FixedWidthInteger>(_ type: T.Type) -> T? {
        let n = MemoryLayout<T>.size
        guard has(n) else { return nil }
        defer { offset += n }
        return bytes.loadUnaligned(fromByteOffset: offset, as: T.self)
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    fileprivate func withReader() -> ByteReader { ByteReader(self) }
}
