import Foundation

// The text and JSON printers write a line per packet of every connection: a million lines for a
// million-packet capture. Formatting them through String interpolation would cost more than the whole
// analysis, so they append bytes to one reused buffer and write it out in large chunks.

final class ReportBuffer {
    private let capacity = 1 << 17
    private let base: UnsafeMutablePointer<UInt8>
    private let pairs = ReportBuffer.makeDigitPairs()
    private var count = 0
    private let fd: Int32
    private let flushAt = 1 << 16
    private(set) var writeError: Int32 = 0
    /// The reader of the output went away (EPIPE): not a failure of the report (`| head`), but nothing more
    /// written will be read.
    var readerGone: Bool { writeError == EPIPE }
    /// The output was given up after a stop found it taking nothing (`OutputStall`).
    var abandoned: Bool { writeError == ECANCELED }

    init(fileDescriptor: Int32) {
        fd = fileDescriptor
        base = .allocate(capacity: capacity)
    }

    deinit {
        flush()
        base.deallocate()
        pairs.deallocate()
        secondsDigitBytes.deallocate()
    }

    @inline(__always) private func reserve(_ n: Int) { if count + n > capacity { flush() } }

    @inline(__always) func byte(_ b: UInt8) {
        reserve(1)
        base[count] = b
        count += 1
    }

    /// Writes through a cursor into `room` bytes reserved once (see `ReportCursor`); `body` writes at most that,
    /// and `room` is at most half the buffer (the callers' rooms are a few dozen bytes; `bytes` writes a piece
    /// longer than half the buffer straight to the file).
    @inline(__always)
    func write(room: Int, _ body: (inout ReportCursor) -> Void) {
        reserve(room)
        var cursor = ReportCursor(at: base + count, pairs: pairs)
        body(&cursor)
        count = cursor.at - base
    }

    @inline(__always)
    private func append(_ src: UnsafeBufferPointer<UInt8>) {
        let n = src.count
        guard n > 0 else { return }
        if n > capacity / 2 {
            flush()
            writeAll(UnsafeRawBufferPointer(src))
            return
        }
        write(room: n) { $0.bytes(src) }
    }

    /// Bytes from elsewhere (a name table).
    @inline(__always)
    func bytes(_ p: UnsafeBufferPointer<UInt8>) { append(p) }

    /// A literal, through the cursor's writer (literals are short: one reservation).
    @inline(__always)
    func text(_ s: StaticString) { write(room: s.utf8CodeUnitCount) { $0.text(s) } }

    /// Disfavoured: a literal would otherwise pick this overload (String is the default literal type) and be
    /// written through a String instead of the StaticString one's inlined copy.
    @_disfavoredOverload
    func text(_ s: String) {
        var s = s
        s.withUTF8 { append($0) }
    }

    @inline(__always)
    func spaces(_ n: Int) {
        guard n > 0 else { return }
        write(room: n) { $0.spaces(n) }
    }

    func decimal<T: BinaryInteger>(_ v: T) {
        if v < 0 { byte(UInt8(ascii: "-")); unsignedDecimal(Int64(v).magnitude) } else { unsignedDecimal(UInt64(v)) }
    }

    /// "00" "01" ... "99": two digits per division. Owned by the buffer (a static array costs a lazy-init check
    /// and a retain on every number, and a packet line has a dozen numbers).
    private static func makeDigitPairs() -> UnsafeMutablePointer<UInt8> {
        let t = UnsafeMutablePointer<UInt8>.allocate(capacity: 200)
        for n in 0..<100 {
            t[2 * n] = 0x30 + UInt8(n / 10)
            t[2 * n + 1] = 0x30 + UInt8(n % 10)
        }
        return t
    }

    @inline(__always)
    func unsignedDecimal(_ v: UInt64) { write(room: 20) { $0.unsignedDecimal(v) } }

    /// Exactly six digits, zero-padded (the microseconds of a timeline offset); `v` is below 1 000 000.
    @inline(__always)
    func sixDigits(_ v: UInt64) { write(room: 6) { $0.sixDigits(v) } }

    func hex(_ v: UInt32) {
        let digits: StaticString = "0123456789abcdef"
        var started = false
        digits.withUTF8Buffer { d in
            for shift in stride(from: 28, through: 0, by: -4) {
                let nibble = Int((v >> UInt32(shift)) & 0xf)
                if nibble != 0 || started || shift == 0 { byte(d[nibble]); started = true }
            }
        }
    }

    /// tcpdump's letters, as `TCPFlags.description` spells them.
    @inline(__always)
    func tcpFlags(_ f: TCPFlags) { write(room: 6) { $0.tcpFlags(f) } }

    @inline(__always)
    func address(_ a: IPAddress) {
        if a.family == .v6 { text(a.description) } else { write(room: 15) { $0.address(a) } }
    }

    @inline(__always)
    func endpoint(_ e: Endpoint) {
        if e.addr.family == .v6 { byte(UInt8(ascii: "[")); address(e.addr); byte(UInt8(ascii: "]")) } else { address(e.addr) }
        byte(UInt8(ascii: ":"))
        unsignedDecimal(UInt64(e.port))
    }

    /// seconds.nanoseconds, the form the JSON output and the text headers use.
    func timestamp(_ t: Timestamp) {
        let seconds = secondsDigits(t.seconds)
        write(room: ReportCursor.timestampRoom) { $0.timestamp(t, seconds: seconds) }
    }

    /// The digits of `seconds` (not negative; else empty), for `ReportCursor.timestamp`. The seconds of one
    /// timeline rarely change from event to event: their digits are kept and copied.
    @inline(__always)
    func secondsDigits(_ seconds: Int64) -> UnsafeBufferPointer<UInt8> {
        if seconds != lastSeconds && seconds >= 0 {
            var x = UInt64(seconds)
            var n = 0
            repeat { secondsDigitBytes[19 - n] = 0x30 + UInt8(x % 10); x /= 10; n += 1 } while x > 0
            secondsCount = n
            lastSeconds = seconds
        }
        return UnsafeBufferPointer(start: secondsDigitBytes + 20 - secondsCount, count: seconds < 0 ? 0 : secondsCount)
    }
    /// Never a valid cache key at first (negative times are written in full).
    private var lastSeconds: Int64 = -1
    /// The digits of `lastSeconds`, right-aligned in 20 bytes.
    private let secondsDigitBytes = UnsafeMutablePointer<UInt8>.allocate(capacity: 20)
    private var secondsCount = 0

    /// Exactly nine digits, zero-padded; `v` is below 1 000 000 000.
    @inline(__always)
    func nineDigits(_ v: UInt64) { write(room: 9) { $0.nineDigits(v) } }

    /// `,"name":` (the comma when `comma`), in one reservation: a JSON record has a dozen keys per packet.
    @inline(__always)
    func jsonKey(_ name: StaticString, comma: Bool) {
        write(room: name.utf8CodeUnitCount + 4) { $0.jsonKey(name, comma: comma) }
    }

    /// Calls `body` with the bytes written since `mark` (nil when they were flushed in between), in place.
    func withWritten<T>(since mark: (offset: Int, flushes: Int), _ body: (UnsafeBufferPointer<UInt8>?) -> T) -> T {
        guard mark.flushes == flushes, mark.offset <= count else { return body(nil) }
        return body(UnsafeBufferPointer(start: base + mark.offset, count: count - mark.offset))
    }

    /// A JSON string literal with the escapes RFC 8259 requires. Most strings (rule text, evidence, names) need
    /// none: they are scanned once and copied whole.
    func jsonString(_ s: String) {
        var s = s
        let copied = s.withUTF8 { u -> Bool in
            for b in u where b == 0x22 || b == 0x5c || b < 0x20 { return false }
            if u.count > capacity / 2 { return false }
            reserve(u.count + 2)
            base[count] = 0x22
            count += 1
            append(u)
            base[count] = 0x22
            count += 1
            return true
        }
        if copied { return }
        byte(0x22)
        for b in s.utf8 {
            switch b {
            case 0x22: text("\\\"")
            case 0x5c: text("\\\\")
            case 0x0a: text("\\n")
            case 0x0d: text("\\r")
            case 0x09: text("\\t")
            case 0..<0x20:
                text("\\u00")
                let d: StaticString = "0123456789abcdef"
                d.withUTF8Buffer { byte($0[Int(b >> 4)]); byte($0[Int(b & 0xf)]) }
            default: byte(b)
            }
        }
        byte(0x22)
    }

    /// Piece `i` of a printer's pieces (a rule hit's words, an interface name): its bytes copied when kept, else
    /// written by `write` and kept (unless the buffer was flushed in between; then the next use writes it again).
    @inline(__always)
    func cached(_ pieces: ReportPieces, _ i: Int, write: () -> Void) {
        if let piece = pieces[i] { bytes(piece); return }
        keeping(in: pieces, i, write: write)
    }

    private func keeping(in pieces: ReportPieces, _ i: Int, write: () -> Void) {
        let mark = self.mark(room: 4096)
        write()
        withWritten(since: mark) { if let written = $0 { pieces.keep(i, written) } }
    }

    func flushIfFull() { if count >= flushAt { flush() } }

    /// Times the buffer was written out: a `mark` from before a flush no longer points at its bytes.
    private var flushes = 0

    /// Where the next byte goes, with `room` bytes free after it, for `withWritten(since:)`.
    func mark(room: Int) -> (offset: Int, flushes: Int) {
        reserve(min(room, capacity / 2))
        return (count, flushes)
    }

    func flush() {
        guard count > 0 else { return }
        flushes &+= 1
        writeAll(UnsafeRawBufferPointer(start: base, count: count))
        count = 0
    }

    private func writeAll(_ raw: UnsafeRawBufferPointer) {
        guard writeError == 0, let start = raw.baseAddress else { return }
        var off = 0
        while off < raw.count {
            // Given up by a stop (`OutputStall`): whatever is left is dropped.
            if OutputStall.isAbandoned { writeError = ECANCELED; return }
            OutputStall.writing()
            let n = Foundation.write(fd, start + off, raw.count - off)
            OutputStall.wrote()
            if n < 0 {
                if errno == EINTR { continue }
                writeError = errno
                return
            }
            off += n
        }
    }
}

/// A printer's pieces written again and again (a rule hit's words, an interface name), by number: their bytes
/// as first written, copied on later uses. One unsafe block: as an array of byte arrays, every copy retained and
/// released the piece's array, and that showed in a trace's profile.
final class ReportPieces {
    private var bytes: UnsafeMutablePointer<UInt8>
    private var byteCapacity = 4096
    private var used = 0
    /// Where piece `i` is in `bytes`; count 0: not kept (yet).
    private var spans: UnsafeMutablePointer<(start: Int, count: Int)>
    private var spanCapacity = 64

    init() {
        bytes = .allocate(capacity: byteCapacity)
        spans = .allocate(capacity: spanCapacity)
        spans.initialize(repeating: (0, 0), count: spanCapacity)
    }

    deinit {
        bytes.deallocate()
        spans.deallocate()
    }

    /// Piece `i`'s bytes, valid until the next `keep`; nil when not kept.
    @inline(__always)
    subscript(i: Int) -> UnsafeBufferPointer<UInt8>? {
        guard i >= 0, i < spanCapacity else { return nil }
        let span = spans[i]
        return span.count > 0 ? UnsafeBufferPointer(start: bytes + span.start, count: span.count) : nil
    }

    func keep(_ i: Int, _ piece: UnsafeBufferPointer<UInt8>) {
        guard i >= 0, let from = piece.baseAddress, piece.count > 0 else { return }
        if i >= spanCapacity {
            var n = spanCapacity
            while n <= i { n *= 2 }
            let grown = UnsafeMutablePointer<(start: Int, count: Int)>.allocate(capacity: n)
            grown.moveInitialize(from: spans, count: spanCapacity)
            (grown + spanCapacity).initialize(repeating: (0, 0), count: n - spanCapacity)
            spans.deallocate()
            spans = grown
            spanCapacity = n
        }
        if used + piece.count > byteCapacity {
            var n = byteCapacity
            while n < used + piece.count { n *= 2 }
            let grown = UnsafeMutablePointer<UInt8>.allocate(capacity: n)
            grown.moveInitialize(from: bytes, count: used)
            bytes.deallocate()
            bytes = grown
            byteCapacity = n
        }
        (bytes + used).initialize(from: from, count: piece.count)
        spans[i] = (used, piece.count)
        used += piece.count
    }
}

/// The bytes a printer wrote for the last few tuples, by tuple: one connection's events carry a few tuples (its NAT
/// views, both ways) over and over, so each is written once and copied after that (a JSON tuple object, the text
/// view's `src > dst` columns).
final class TuplePieces {
    private static let slots = 6
    private static let stride = 192
    private typealias Key = (UInt64, UInt64, UInt64, UInt64, UInt64)
    private let bytes = UnsafeMutablePointer<UInt8>.allocate(capacity: TuplePieces.slots * TuplePieces.stride)
    /// Byte count of each slot (0: empty) and its key, in unsafe storage: as arrays of a class, every read was
    /// bounds-checked and their exclusivity tracked.
    private let lengths: UnsafeMutablePointer<Int> = {
        let p = UnsafeMutablePointer<Int>.allocate(capacity: TuplePieces.slots)
        p.initialize(repeating: 0, count: TuplePieces.slots)
        return p
    }()
    private let keys: UnsafeMutablePointer<Key> = {
        let p = UnsafeMutablePointer<Key>.allocate(capacity: TuplePieces.slots)
        p.initialize(repeating: (0, 0, 0, 0, 0), count: TuplePieces.slots)
        return p
    }()
    private var next = 0
    private var last = 0

    deinit {
        bytes.deallocate()
        lengths.deallocate()
        keys.deallocate()
    }

    /// Everything `FiveTuple ==` compares, in five words.
    @inline(__always)
    private static func key(_ t: FiveTuple) -> Key {
        (t.src.addr.hi, t.src.addr.lo, t.dst.addr.hi, t.dst.addr.lo,
         UInt64(t.src.port) << 48 | UInt64(t.dst.port) << 32 | UInt64(t.src.addr.family.rawValue) << 16
            | UInt64(t.dst.addr.family.rawValue) << 8 | UInt64(t.proto))
    }

    /// Copies the bytes kept for `t` into `out`, or has `write` write them there and keeps them (unless they are
    /// longer than a slot, or the buffer was flushed in between).
    @inline(__always)
    func write(_ t: FiveTuple, into out: ReportBuffer, _ write: () -> Void) {
        // Keys compared as five packed words (FiveTuple's own == compared it field by field, out of line), the
        // last slot found first: a connection's events alternate between two or three tuples. Keys are unique,
        // so where the search starts never changes which bytes are copied.
        let key = TuplePieces.key(t)
        var i = last
        for _ in 0..<TuplePieces.slots {
            let k = keys[i]
            if lengths[i] > 0 && (k.0 ^ key.0) | (k.1 ^ key.1) | (k.2 ^ key.2) | (k.3 ^ key.3) | (k.4 ^ key.4) == 0 {
                out.bytes(UnsafeBufferPointer(start: bytes + i * TuplePieces.stride, count: lengths[i]))
                last = i
                return
            }
            i = i == TuplePieces.slots - 1 ? 0 : i + 1
        }
        keep(t, key: key, into: out, write)
    }

    private func keep(_ t: FiveTuple, key: Key, into out: ReportBuffer, _ write: () -> Void) {
        let mark = out.mark(room: TuplePieces.stride)
        write()
        let slot = next
        out.withWritten(since: mark) { written in
            guard let written, written.count <= TuplePieces.stride, let from = written.baseAddress else { return }
            (bytes + slot * TuplePieces.stride).update(from: from, count: written.count)
            lengths[slot] = written.count
            keys[slot] = key
            next = (slot + 1) % TuplePieces.slots
        }
    }
}

/// Hop evidence is worded straight into the buffer (`hex`, `address` and `endpoint` are the buffer's own).
extension ReportBuffer: EvidenceWriter {
    @inline(__always) func words(_ s: StaticString) { text(s) }
    @inline(__always) func string(_ s: String) { text(s) }
    @inline(__always) func number(_ v: UInt64) { unsignedDecimal(v) }
    @inline(__always) func signed(_ v: Int64) { decimal(v) }
}

/// A run of writes into room the buffer reserved once (`ReportBuffer.write(room:_:)`). A printer that knows how
/// long a stretch of a record can be (a JSON event's fixed fields, a text line's columns) writes it through a
/// cursor: its position is a local the compiler keeps in a register, where through the buffer every piece
/// checked the room and loaded and stored the buffer's count (~40 times per JSON event). The buffer's own
/// number and address writers are these, so both paths write the same bytes.
struct ReportCursor {
    fileprivate(set) var at: UnsafeMutablePointer<UInt8>
    fileprivate let pairs: UnsafeMutablePointer<UInt8>

    /// The most a timestamp takes: a sign, 19 digits of seconds, the point and nine digits.
    static let timestampRoom = 30

    @inline(__always) mutating func byte(_ b: UInt8) { at.pointee = b; at += 1 }

    @inline(__always)
    mutating func bytes(_ src: UnsafeBufferPointer<UInt8>) {
        let n = src.count
        guard n > 0, let from = src.baseAddress else { return }
        // Most pieces are a few bytes. A byte loop is turned into a call to memmove by the compiler; two
        // overlapping word copies (the first and the last 8 or 4 bytes, all inside the piece) are not.
        let to = UnsafeMutableRawPointer(at), raw = UnsafeRawPointer(from)
        if n >= 8 && n <= 16 {
            to.storeBytes(of: raw.loadUnaligned(as: UInt64.self), as: UInt64.self)
            (to + n - 8).storeBytes(of: (raw + n - 8).loadUnaligned(as: UInt64.self), as: UInt64.self)
        } else if n >= 4 && n < 8 {
            to.storeBytes(of: raw.loadUnaligned(as: UInt32.self), as: UInt32.self)
            (to + n - 4).storeBytes(of: (raw + n - 4).loadUnaligned(as: UInt32.self), as: UInt32.self)
        } else if n < 4 {
            for i in 0..<n { at[i] = from[i] }
        } else {
            at.update(from: from, count: n)
        }
        at += n
    }

    /// `n` spaces (none when `n` is not positive).
    @inline(__always)
    mutating func spaces(_ n: Int) {
        guard n > 0 else { return }
        at.initialize(repeating: 0x20, count: n)
        at += n
    }

    /// A literal; the caller reserved room for it. Its bytes directly: through `withUTF8Buffer`'s closure this
    /// stayed a call per piece. The rare one-scalar literal (a StaticString may hold a single Unicode scalar instead
    /// of a pointer) is written out of line: with its closure in here too, this was never inlined, and every piece
    /// was a call that tested the piece's length at run time (~10 per JSON event).
    @inline(__always)
    mutating func text(_ s: StaticString) {
        if s.hasPointerRepresentation {
            bytes(UnsafeBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount))
        } else {
            scalarText(s)
        }
    }

    @inline(never)
    private mutating func scalarText(_ s: StaticString) { s.withUTF8Buffer { bytes($0) } }

    /// `,"name":` (the comma when `comma`).
    @inline(__always)
    mutating func jsonKey(_ name: StaticString, comma: Bool) {
        if comma { byte(UInt8(ascii: ",")) }
        byte(0x22)
        text(name)
        byte(0x22); byte(UInt8(ascii: ":"))
    }

    @inline(__always)
    private mutating func pair(_ n: Int) {
        at[0] = pairs[2 * n]; at[1] = pairs[2 * n + 1]
        at += 2
    }

    /// Ports, lengths and small counters (below 100 000) without a digit-counting loop; up to 20 digits.
    @inline(__always)
    mutating func unsignedDecimal(_ v: UInt64) {
        if v < 100 {
            if v < 10 { byte(0x30 + UInt8(v)) } else { pair(Int(v)) }
            return
        }
        if v < 10_000 {
            let hi = Int(v / 100), lo = Int(v % 100)
            if hi >= 10 { pair(hi) } else { byte(0x30 + UInt8(hi)) }
            pair(lo)
            return
        }
        if v < 100_000 {
            // Ports above 9999 (ephemeral ports, 15001, 15008).
            byte(0x30 + UInt8(v / 10_000))
            pair(Int((v / 100) % 100)); pair(Int(v % 100))
            return
        }
        largeDecimal(v)
    }

    private mutating func largeDecimal(_ v: UInt64) {
        // Counted by multiplying up, not dividing down: frame numbers of a big capture come here on every event.
        var digits = 6
        var limit: UInt64 = 1_000_000
        while digits < 20 && v >= limit { digits += 1; limit = limit &* 10 }
        var i = digits
        var x = v
        while x >= 100 {
            let r = Int(x % 100); x /= 100
            i -= 2; at[i] = pairs[2 * r]; at[i + 1] = pairs[2 * r + 1]
        }
        if x >= 10 {
            let r = Int(x)
            i -= 2; at[i] = pairs[2 * r]; at[i + 1] = pairs[2 * r + 1]
        } else {
            i -= 1; at[i] = 0x30 + UInt8(x)
        }
        at += digits
    }

    /// Exactly six digits, zero-padded; `v` is below 1 000 000.
    @inline(__always)
    mutating func sixDigits(_ v: UInt64) {
        pair(Int(v / 10_000)); pair(Int((v / 100) % 100)); pair(Int(v % 100))
    }

    /// Exactly nine digits, zero-padded; `v` is below 1 000 000 000.
    @inline(__always)
    mutating func nineDigits(_ v: UInt64) {
        let rest = v % 100_000_000
        byte(0x30 + UInt8(v / 100_000_000))
        pair(Int(rest / 1_000_000)); pair(Int((rest / 10_000) % 100)); pair(Int((rest / 100) % 100)); pair(Int(rest % 100))
    }

    /// seconds.nanoseconds; `seconds` holds the digits of `t.seconds` when it is not negative
    /// (`ReportBuffer.secondsDigits`). Takes at most `timestampRoom` bytes.
    @inline(__always)
    mutating func timestamp(_ t: Timestamp, seconds: UnsafeBufferPointer<UInt8>) {
        if t.seconds < 0 {
            byte(UInt8(ascii: "-")); unsignedDecimal(t.seconds.magnitude)
        } else {
            bytes(seconds)
        }
        byte(0x2e)
        nineDigits(UInt64(max(0, t.nanoseconds)))
    }

    /// 0...255 without a division loop: an IPv4 address is four of these.
    @inline(__always)
    private mutating func octet(_ v: UInt32) {
        if v >= 100 {
            byte(0x30 + UInt8(v / 100)); pair(Int(v % 100))
        } else if v >= 10 {
            pair(Int(v))
        } else {
            byte(0x30 + UInt8(v))
        }
    }

    /// An IPv4 address (at most 15 bytes), or "-" for none. Not IPv6: its text can be 45 bytes, more than the
    /// callers reserve for an address, so the buffer writes it (`ReportBuffer.address`, `IPAddress.description`).
    @inline(__always)
    mutating func address(_ a: IPAddress) {
        assert(a.family != .v6, "an IPv6 address is written by the buffer, not the cursor")
        switch a.family {
        case .v4:
            let v = a.v4Value
            octet(v >> 24); byte(0x2e)
            octet((v >> 16) & 0xff); byte(0x2e)
            octet((v >> 8) & 0xff); byte(0x2e)
            octet(v & 0xff)
        case .v6: break
        case .none: byte(UInt8(ascii: "-"))
        }
    }

    /// tcpdump's letters, as `TCPFlags.description` spells them (at most 6 bytes).
    @inline(__always)
    mutating func tcpFlags(_ f: TCPFlags) {
        if f.rawValue & 0x3f == 0 { text("none"); return }
        if f.contains(.syn) { byte(UInt8(ascii: "S")) }
        if f.contains(.fin) { byte(UInt8(ascii: "F")) }
        if f.contains(.rst) { byte(UInt8(ascii: "R")) }
        if f.contains(.psh) { byte(UInt8(ascii: "P")) }
        if f.contains(.urg) { byte(UInt8(ascii: "U")) }
        if f.contains(.ack) { byte(UInt8(ascii: ".")) }
    }
}
