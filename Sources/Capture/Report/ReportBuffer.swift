import Foundation

// The text and JSON printers write a line per packet of every connection: a million lines for a
// million-packet capture. Formatting them through String interpolation would cost more than the whole
// analysis, so they append bytes to one reused buffer and write it out in large chunks.

final class ReportBuffer {
    private var bytes: [UInt8] = []
    private let fd: Int32
    private let flushAt = 1 << 16
    private(set) var writeError: Int32 = 0

    init(fileDescriptor: Int32) {
        fd = fileDescriptor
        bytes.reserveCapacity(flushAt + 4096)
    }

    @inline(__always) func byte(_ b: UInt8) { bytes.append(b) }

    func text(_ s: StaticString) {
        s.withUTF8Buffer { bytes.append(contentsOf: $0) }
    }

    func text(_ s: String) {
        var s = s
        s.withUTF8 { bytes.append(contentsOf: $0) }
    }

    func spaces(_ n: Int) { for _ in 0..<max(0, n) { bytes.append(0x20) } }

    func decimal<T: BinaryInteger>(_ v: T) {
        if v < 0 { bytes.append(UInt8(ascii: "-")); unsignedDecimal(UInt64(-Int64(v))) } else { unsignedDecimal(UInt64(v)) }
    }

    /// "00" "01" ... "99": two digits per division.
    private static let digitPairs: [UInt8] = {
        var t: [UInt8] = []
        for n in 0..<100 {
            let tens = UInt8(n / 10), ones = UInt8(n % 10)
            t.append(0x30 + tens)
            t.append(0x30 + ones)
        }
        return t
    }()

    func unsignedDecimal(_ v: UInt64) {
        if v < 10 { bytes.append(0x30 + UInt8(v)); return }
        // Digits are written backwards into a 20-byte scratch (UInt64.max has 20), then appended in one go.
        var scratch: (UInt64, UInt64, UInt64) = (0, 0, 0)
        withUnsafeMutableBytes(of: &scratch) { buf in
            var i = 24
            var x = v
            ReportBuffer.digitPairs.withUnsafeBufferPointer { pairs in
                while x >= 100 {
                    let r = Int(x % 100); x /= 100
                    i -= 2; buf[i] = pairs[2 * r]; buf[i + 1] = pairs[2 * r + 1]
                }
                if x >= 10 {
                    let r = Int(x)
                    i -= 2; buf[i] = pairs[2 * r]; buf[i + 1] = pairs[2 * r + 1]
                } else {
                    i -= 1; buf[i] = 0x30 + UInt8(x)
                }
            }
            bytes.append(contentsOf: UnsafeRawBufferPointer(rebasing: buf[i..<24]))
        }
    }

    /// Zero-padded to `width` digits.
    func padded(_ v: UInt64, width: Int) {
        var digits = 1, x = v
        while x >= 10 { x /= 10; digits += 1 }
        for _ in 0..<max(0, width - digits) { bytes.append(0x30) }
        unsignedDecimal(v)
    }

    func hex(_ v: UInt32) {
        let digits: StaticString = "0123456789abcdef"
        var started = false
        digits.withUTF8Buffer { d in
            for shift in stride(from: 28, through: 0, by: -4) {
                let nibble = Int((v >> UInt32(shift)) & 0xf)
                if nibble != 0 || started || shift == 0 { bytes.append(d[nibble]); started = true }
            }
        }
    }

    func address(_ a: IPAddress) {
        switch a.family {
        case .v4:
            let v = a.v4Value
            unsignedDecimal(UInt64(v >> 24)); byte(0x2e)
            unsignedDecimal(UInt64((v >> 16) & 0xff)); byte(0x2e)
            unsignedDecimal(UInt64((v >> 8) & 0xff)); byte(0x2e)
            unsignedDecimal(UInt64(v & 0xff))
        case .v6: text(a.description)
        case .none: byte(UInt8(ascii: "-"))
        }
    }

    func endpoint(_ e: Endpoint) {
        if e.addr.family == .v6 { byte(UInt8(ascii: "[")); address(e.addr); byte(UInt8(ascii: "]")) } else { address(e.addr) }
        byte(UInt8(ascii: ":"))
        unsignedDecimal(UInt64(e.port))
    }

    /// seconds.nanoseconds, the form the JSON output and the text headers use.
    func timestamp(_ t: Timestamp) {
        decimal(t.seconds)
        byte(0x2e)
        padded(UInt64(max(0, t.nanoseconds)), width: 9)
    }

    /// A JSON string literal with the escapes RFC 8259 requires.
    func jsonString(_ s: String) {
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
                d.withUTF8Buffer { bytes.append($0[Int(b >> 4)]); bytes.append($0[Int(b & 0xf)]) }
            default: bytes.append(b)
            }
        }
        byte(0x22)
    }

    func flushIfFull() { if bytes.count >= flushAt { flush() } }

    func flush() {
        guard !bytes.isEmpty else { return }
        bytes.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = Foundation.write(fd, raw.baseAddress! + off, raw.count - off)
                if n < 0 {
                    if errno == EINTR { continue }
                    writeError = errno
                    break
                }
                off += n
            }
        }
        bytes.removeAll(keepingCapacity: true)
    }
}
