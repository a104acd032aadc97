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
        let values: [UInt64] = [0, 9, 10, 99, 100, 101, 999, 1000, 65535, 99_999, 100_000, 999_999, 1_000_000, 9_999_999,
                                1_000_000_007, 9_999_999_999_999_999_999, 10_000_000_000_000_000_000, UInt64.max]
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

    /// The cursor (`write(room:)`, what the JSON and text event writers use) gives Swift's formatting too, also
    /// where a stretch's room is reserved across one of the buffer's flushes (~150 KB through a 128 KiB buffer),
    /// and for timestamps whose seconds change from one to the next, are 0, or are negative.
    func testCursorStretchesMatchSwiftsFormattingAcrossFlushes() throws {
        let times = [Timestamp(seconds: 1_795_821_334, nanoseconds: 5_000), Timestamp(seconds: 1_795_821_334, nanoseconds: 999_999_999),
                     Timestamp(seconds: 1_795_821_335, nanoseconds: 0), Timestamp(seconds: 0, nanoseconds: 7),
                     Timestamp(seconds: -3, nanoseconds: 500)]
        var expected = ""
        let out = try render { b in
            for i in 0..<6_000 {
                let t = times[i % times.count]
                let address = IPAddress(v4: UInt32(truncatingIfNeeded: i &* 2_654_435_761))
                let number = UInt64(i) &* 7_919 &* UInt64(i % 7 == 0 ? 1_000_003 : 1)
                let flags = TCPFlags(rawValue: UInt8(i % 64))
                let seconds = b.secondsDigits(t.seconds)
                b.write(room: 96) { w in
                    w.timestamp(t, seconds: seconds); w.byte(0x20)
                    w.address(address); w.text(" n=")
                    w.unsignedDecimal(number); w.byte(0x20)
                    w.sixDigits(UInt64(i % 1_000_000)); w.spaces(i % 3 - 1); w.byte(0x7c)
                    w.tcpFlags(flags); w.byte(0x0a)
                }
                let six = String(i % 1_000_000)
                expected += "\(t) \(address) n=\(number) \(String(repeating: "0", count: 6 - six.count))\(six)"
                    + String(repeating: " ", count: max(0, i % 3 - 1)) + "|\(flags)\n"
            }
        }
        XCTAssertGreaterThan(out.utf8.count, 140_000)
        XCTAssertEqual(out, expected)
        XCTAssertEqual(try render { b in b.write(room: 4) { $0.address(IPAddress(family: .none, hi: 0, lo: 0)) } }, "-")
    }

    /// A tuple's bytes are written once and copied while it is among the last few: the copies are the bytes
    /// written for that tuple (never another slot's), also when more tuples than slots take turns.
    func testTuplePiecesCopyEachTuplesOwnBytes() throws {
        let tuples = (0..<9).map { i in
            FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v4: 0x0af4_010a), UInt16(40_000 + i)),
                      dst: Endpoint(i % 2 == 0 ? IPAddress(v4: 0x7f00_0001) : IPAddress("fd00::\(i)")!, 15_001))
        }
        let pieces = TuplePieces()
        var writes = 0
        func columns(_ b: ReportBuffer, _ t: FiveTuple) {
            pieces.write(t, into: b) { writes += 1; b.endpoint(t.src); b.text(" > "); b.endpoint(t.dst) }
            b.byte(0x0a)
        }
        // Two tuples taking turns: each written once, then copied.
        let two = try render { b in for i in 0..<1_000 { columns(b, tuples[i % 2]) } }
        XCTAssertEqual(two, (0..<1_000).map { "\(tuples[$0 % 2].src) > \(tuples[$0 % 2].dst)\n" }.joined())
        XCTAssertEqual(writes, 2)
        // Nine taking turns through six slots: whatever is copied must still be the right tuple's.
        let nine = try render { b in for i in 0..<900 { columns(b, tuples[(i * 5) % 9]) } }
        XCTAssertEqual(nine, (0..<900).map { "\(tuples[($0 * 5) % 9].src) > \(tuples[($0 * 5) % 9].dst)\n" }.joined())
    }

    /// Pieces are copied by size class (under 4, 4-7, 8-16 bytes, longer): every length comes out whole.
    func testPiecesOfEveryLengthAreCopiedWhole() throws {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ".utf8)
        var expected = ""
        let out = try render { b in
            for n in 0...alphabet.count {
                let piece = Array(alphabet[(alphabet.count - n)...])
                piece.withUnsafeBufferPointer { b.bytes($0) }
                b.byte(0x7c)
                expected += String(decoding: piece, as: UTF8.self) + "|"
            }
            b.text(",\"dir\":\"out\",\"tuple\":")
        }
        XCTAssertEqual(out, expected + ",\"dir\":\"out\",\"tuple\":")
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

    /// Hop evidence is kept as facts and worded when printed: the words written into the buffer, the `detail`
    /// String, and the sentences the correlator used to build with interpolation must all be the same.
    func testHopEvidenceWordsAreTheSameInTheBufferAndAsAString() throws {
        let v4 = IPAddress("10.244.2.10")!, v6 = IPAddress("fd00:10:244::2")!
        let cases: [(HopEvidence.Fact, String, String)] = [
            (.ztunnelMark(0x539, frame: FrameRef(source: 1, frame: 20_000_000_007)), "ztunnel-mark",
             "inner connection carries ztunnel's mark 0x539 (frame 1:20000000007)"),
            (.ztunnelConnmark(0x111), "ztunnel-connmark", "inner connection has connmark 0x111 (ztunnel's connection into the pod)"),
            (.hbonePort(15008), "hbone-port", "inner connection goes to :15008 (HBONE) without being redirected"),
            (.passthroughDestination(Endpoint(v6, 443)), "original-destination",
             "passthrough destination [fd00:10:244::2]:443 equals the app's original destination"),
            (.hboneDestination(v4, original: Endpoint(v4, 80)), "original-destination",
             "HBONE destination 10.244.2.10 equals the app's original destination 10.244.2.10:80"),
            (.clientAddress(inner: v6, outer: v6), "client-address", "inner source fd00:10:244::2 equals the outer client fd00:10:244::2"),
            (.originalPort(8080), "original-port", "inner destination port 8080 equals the original destination port"),
            (.timing(nanos: 150_000), "timing", "inner connection starts 150 µs after the outer one"),
            (.timing(nanos: -1_250_000), "timing", "inner connection starts -1.2 ms after the outer one"),
            (.timing(nanos: 7), "timing", "inner connection starts 7 ns after the outer one"),
            (.onlyCandidate(windowNanos: 2_000_000_000), "unique", "the only candidate within 2.0 s"),
            (.earliestCandidate(of: 3, windowNanos: 2_500_000_000), "unique",
             "one of 3 candidates within 2.5 s; the earliest was chosen"),
            (.unexplainedMarkedConnection(of: 1, takenBackFrom: nil), "unique",
             "no connection of ztunnel's names the original destination (a service VIP ztunnel resolved to an endpoint): the only marked connection no other connection explains that began while this one ran"),
            (.unexplainedMarkedConnection(of: 4, takenBackFrom: nil), "unique",
             "no connection of ztunnel's names the original destination (a service VIP ztunnel resolved to an endpoint): one of 4 marked connections no other connection explains that began while this one ran; the earliest was chosen, as connections without one choose in the order they began"),
            (.unexplainedMarkedConnection(of: 2, takenBackFrom: nil, chain: 1), "unique",
             "no connection of ztunnel's names the original destination (a service VIP ztunnel resolved to an endpoint): a marked connection that began while this one ran, which the joins by the order had left to no connection"),
            (.unexplainedMarkedConnection(of: 2, takenBackFrom: nil, chain: 3), "unique",
             "no connection of ztunnel's names the original destination (a service VIP ztunnel resolved to an endpoint): a marked connection that began while this one ran; the joins by the order had left one to no connection, and this join moved with 2 others along a chain to explain it"),
            (.unexplainedMarkedConnection(of: 2, takenBackFrom: 17), "unique",
             "no connection of ztunnel's names the original destination (a service VIP ztunnel resolved to an endpoint): one of 2 marked connections no other connection explains that began while this one ran, taken back from #17, which began earlier and had it by the order, and took another that began while it ran"),
            (.bytesConsistent(outbound: false, larger: 10800, smaller: 8520), "bytes",
             "outer carried 10800 payload bytes, inner 8520: consistent with tunnelling"),
            (.bytesConsistent(outbound: true, larger: 5, smaller: 4), "bytes",
             "inner carried 5 payload bytes, outer 4: consistent with tunnelling"),
            (.bytesInconsistent(outbound: true, inner: 3, outer: 900), "bytes",
             "inner carried fewer payload bytes than outer (3 vs 900): not consistent (capture cut?)"),
            (.relayTiming(outbound: true, matched: 3, packets: 4, largestGap: 350_000, windowNanos: 2_000_000, tunnels: 3, runnerUp: 1, blind: 0,
                          overruled: false),
             "relay-timing", "3 of 4 data packets of the outer connection have a twin in the tunnel within 2.0 ms (the largest gap 350 µs); of 3 open tunnels that could have carried it, the next best could have matched 1"),
            (.relayTiming(outbound: false, matched: 0, packets: 2, largestGap: 0, windowNanos: 2_000_000, tunnels: 2, runnerUp: 0, blind: 1,
                          overruled: false),
             "relay-timing", "none of 2 data packets of the inner connection has a twin within 2.0 ms in any of 2 open tunnels that could have carried it: timing cannot tell which did; 1 of them no longer kept packets from its time (a tunnel past --max-events keeps only its latest data packets): those were not compared"),
            (.relayTiming(outbound: true, matched: 1, packets: 2, largestGap: 600_000, windowNanos: 2_000_000, tunnels: 4, runnerUp: 2, blind: 1,
                          overruled: true),
             "relay-timing", "1 of 2 data packets of the outer connection have a twin in this tunnel within 2.0 ms, another of the 4 open tunnels matched 2: the timing points elsewhere, but under load it is noisy, and the join stands on the order the tunnels opened in (no tunnel is taken from the connection it was opened for, or left with none, on timing alone); 1 of them no longer kept packets from its time (a tunnel past --max-events keeps only its latest data packets): those were not compared"),
            (.relayTiming(outbound: true, matched: 0, packets: 2, largestGap: 300_000, windowNanos: 2_000_000, tunnels: 5, runnerUp: 2, blind: 0,
                          overruled: true, passthroughs: 4, intoPassthrough: true),
             "relay-timing", "0 of 2 data packets of the outer connection have a twin in this passthrough within 2.0 ms, another of the 5 connections of ztunnel's (1 open tunnel, 4 passthroughs) matched 2: the timing points elsewhere, but under load it is noisy, and the join stands on the order ztunnel's connections opened in (none is taken from the connection it was opened for, or left with none, on timing alone)"),
            (.relayTiming(outbound: true, matched: 0, packets: 1, largestGap: 0, windowNanos: 2_000_000, tunnels: 3, runnerUp: 0, blind: 0,
                          overruled: false, passthroughs: 1),
             "relay-timing", "none of 1 data packets of the outer connection has a twin within 2.0 ms in any of 3 connections of ztunnel's (2 open tunnels, 1 passthrough) that could have carried it: timing cannot tell which did"),
            (.worded(kind: "custom", detail: "as \"given\""), "custom", "as \"given\""),
        ]
        for (fact, kind, detail) in cases {
            let ev = HopEvidence(fact)
            XCTAssertEqual(ev.kind, kind)
            XCTAssertEqual(ev.detail, detail)
            XCTAssertEqual(try render { b in var w = b; fact.word(into: &w) }, detail)
            XCTAssertEqual(ev, HopEvidence(kind: kind, detail: detail))
        }
        XCTAssertEqual(formatDelta(999), "999 ns")
        XCTAssertEqual(formatDelta(-61_000_000_000), "-61.0 s")
        var edited = HopEvidence(.timing(nanos: 5))
        edited.detail = "changed"
        XCTAssertEqual(edited.kind, "timing")
        XCTAssertEqual(edited.detail, "changed")
    }
}
