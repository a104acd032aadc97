import XCTest
@testable import Capture

/// The text and JSON printers' byte writer, against Swift's own formatting.
final class ReportBufferTests: XCTestCase {
    /// Writes through a buffer into a file (not a pipe: a long write would block before anyone reads).
    private func render(_ body: (ReportBuffer) -> Void) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("mt-rb-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { unlink(path) }
        let b = ReportBuffer(fileDescriptor: fd)
        body(b)
        b.flush()
        close(fd)
        return try String(contentsOfFile: path, encoding: .utf8)
    }

    func testDecimalsAddressesAndTimestampsMatchSwiftsFormatting() throws {
        let values: [UInt64] = [0, 9, 10, 99, 100, 101, 999, 1000, 65535, 1_000_000_007, UInt64.max]
        XCTAssertEqual(try render { b in for v in values { b.unsignedDecimal(v); b.byte(0x20) } },
                       values.map(String.init).joined(separator: " ") + " ")
        XCTAssertEqual(try render { $0.decimal(-42) }, "-42")
        let a = IPAddress("10.244.1.10")!, v6 = IPAddress("fd00:10:244::1")!
        XCTAssertEqual(try render { $0.endpoint(Endpoint(a, 15001)); $0.byte(0x20); $0.endpoint(Endpoint(v6, 80)) },
                       "10.244.1.10:15001 [fd00:10:244::1]:80")
        let t = Timestamp(seconds: 1_795_821_334, nanoseconds: 5_000)
        XCTAssertEqual(try render { $0.timestamp(t) }, t.description)
        XCTAssertEqual(try render { $0.hex(0x539); $0.byte(0x20); $0.hex(0) }, "539 0")
    }

    func testJSONStringsAreEscapedAndLongOutputIsWrittenWhole() throws {
        XCTAssertEqual(try render { $0.jsonString("a\"b\\c\nd\u{1}é") }, "\"a\\\"b\\\\c\\nd\\u0001é\"")
        // Strings that need no escape are copied whole: ASCII, UTF-8, empty, one escape at the very end, and
        // a clean string too long for the buffer's fast path.
        XCTAssertEqual(try render { $0.jsonString("-A OUTPUT -j ISTIO_OUTPUT"); $0.jsonString("é→ü"); $0.jsonString("") },
                       "\"-A OUTPUT -j ISTIO_OUTPUT\"\"é→ü\"\"\"")
        XCTAssertEqual(try render { $0.jsonString("tab at the end\t") }, "\"tab at the end\\t\"")
        let clean = String(repeating: "rule ", count: 20_000)
        XCTAssertEqual(try render { b in b.text("x"); b.jsonString(clean); b.jsonString(clean) },
                       "x\"\(clean)\"\"\(clean)\"")
        let long = String(repeating: "x", count: 300_000)
        let out = try render { b in for _ in 0..<3 { b.text("0123456789") }; b.text(long); b.text("end") }
        XCTAssertEqual(out.utf8.count, 30 + 300_000 + 3)
        XCTAssertTrue(out.hasSuffix("xend"))
    }
}
