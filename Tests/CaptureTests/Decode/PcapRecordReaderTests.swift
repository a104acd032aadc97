import Foundation
import XCTest
@testable import Capture

/// Classic pcap records are read by `PcapRecordReader` (blocks of 1 MiB) instead of libpcap's `pcap_next_ex`,
/// with libpcap still opening every file and taking over at the first record the reader leaves to it. Every
/// test here reads the same file both ways, through `PcapFileSource` and through libpcap alone (`PcapHandle`),
/// and requires the same frames (time, wire length, bytes) and the same end: clean, or the same damage message.
final class PcapRecordReaderTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws { dir = try makeTemporaryDirectory() }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    private struct Frame: Equatable {
        var seconds: Int64
        var nanoseconds: Int32
        var wireLength: UInt32
        var bytes: [UInt8]
    }

    /// libpcap alone: every frame, then nil at a clean end or libpcap's error text.
    private func readWithLibpcap(_ path: String) throws -> ([Frame], String?) {
        let h = try PcapHandle.openOffline(path: path)
        defer { h.close() }
        var frames: [Frame] = []
        while true {
            switch h.next() {
            case .packet(let p):
                frames.append(Frame(seconds: p.time.seconds, nanoseconds: p.time.nanoseconds, wireLength: p.wireLength, bytes: Array(p.bytes)))
            case .end, .timeout: return (frames, nil)
            case .error(let message): return (frames, message)
            }
        }
    }

    /// meshtrace's file source: every frame, the damage message, and whether the block reader took the file.
    private func readWithSource(_ path: String) throws -> ([Frame], String?, Bool) {
        let source = try PcapFileSource(path: path, tags: RuleTagTable())
        let inBlocks = source.readsRecordsInBlocks
        var record = PacketRecord()
        var frames: [Frame] = []
        while let bytes = source.next(into: &record) {
            frames.append(Frame(seconds: record.time.seconds, nanoseconds: record.time.nanoseconds,
                                wireLength: record.wireLength, bytes: Array(bytes)))
            XCTAssertEqual(record.ref.frame, UInt64(frames.count))
        }
        return (frames, source.damage?.message, inBlocks)
    }

    private func assertSameAsLibpcap(_ path: String, expectBlocks: Bool = true, _ label: String,
                                     file: StaticString = #filePath, line: UInt = #line) throws {
        let (expected, error) = try readWithLibpcap(path)
        let (got, damage, inBlocks) = try readWithSource(path)
        XCTAssertEqual(inBlocks, expectBlocks, "\(label): read in blocks", file: file, line: line)
        XCTAssertEqual(got.count, expected.count, "\(label): frame count", file: file, line: line)
        XCTAssertTrue(got == expected, "\(label): frames differ from libpcap's", file: file, line: line)
        if let error {
            let d = try XCTUnwrap(damage, "\(label): libpcap says \(error), meshtrace saw no damage", file: file, line: line)
            XCTAssertTrue(d.contains("damaged after frame \(expected.count) (\(error))"), "\(label): \(d) vs libpcap \(error)", file: file, line: line)
        } else {
            XCTAssertNil(damage, label, file: file, line: line)
        }
    }

    /// Frames of several lengths (an empty one too), varied times, wire lengths above the captured length.
    private func sample(linkType: UInt32 = 113, snaplen: UInt32 = 65535, nanosecond: Bool, bigEndian: Bool, count: Int = 40) -> PcapFileBuilder {
        var b = PcapFileBuilder(linkType: linkType, snaplen: snaplen, nanosecond: nanosecond, bigEndian: bigEndian)
        for i in 0..<count {
            let n = [0, 1, 20, 60, 61, 1514, 300][i % 7]
            let frame = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) }
            b.add(frame, wireLength: n + (i % 3) * 100, seconds: 1_700_000_000 + UInt32(i / 5),
                  fraction: UInt32(nanosecond ? UInt64(i) * 123_456_789 % 1_000_000_000 : UInt64(i) * 12_345 % 1_000_000))
        }
        return b
    }

    func testBothByteOrdersAndBothResolutionsReadLikeLibpcap() throws {
        for nano in [false, true] {
            for big in [false, true] {
                let label = "\(nano ? "ns" : "µs") \(big ? "big" : "little")-endian"
                let path = try sample(nanosecond: nano, bigEndian: big).write(dir, "\(nano)-\(big).pcap")
                try assertSameAsLibpcap(path, label)
                let (frames, _, _) = try readWithSource(path)
                // µs files come out in ns: the fraction times 1000.
                XCTAssertEqual(frames[3].nanoseconds, nano ? Int32(3 * 123_456_789 % 1_000_000_000) : Int32(3 * 12_345 * 1000), label)
                XCTAssertEqual(frames[6].bytes.count, 300, label)
            }
        }
    }

    func testTruncationAtEveryOffsetEndsLikeLibpcap() throws {
        for big in [false, true] {
            let full = sample(nanosecond: true, bigEndian: big, count: 6).bytes
            // Every cut from just after the file header to the full length: clean ends at record boundaries,
            // libpcap's "truncated dump file" damage inside a record header or body.
            for cut in 24...full.count {
                let path = dir.appendingPathComponent("cut-\(big)-\(cut).pcap").path
                try Data(full.prefix(cut)).write(to: URL(fileURLWithPath: path))
                try assertSameAsLibpcap(path, "\(big ? "big" : "little")-endian cut at \(cut)")
            }
        }
    }

    func testOversizedRecordsAreLeftToLibpcap() throws {
        // caplen above the file's snaplen (libpcap reads snaplen bytes and skips the rest), above libpcap's 256 KiB
        // maximum (an error), and a bogus huge length: libpcap decides each, from that record on.
        var b = PcapFileBuilder(linkType: 1, snaplen: 100, nanosecond: false)
        b.add([UInt8](repeating: 1, count: 60), fraction: 1)
        b.add([UInt8](repeating: 2, count: 150), fraction: 2)
        b.add([UInt8](repeating: 3, count: 60), fraction: 3)
        try assertSameAsLibpcap(try b.write(dir, "over-snaplen.pcap"), "caplen above snaplen")
        let (frames, damage, _) = try readWithSource(try b.write(dir, "over-snaplen2.pcap"))
        XCTAssertEqual(frames.map(\.bytes.count), [60, 100, 60])
        XCTAssertNil(damage)

        var huge = PcapFileBuilder(linkType: 1, snaplen: 0x7fff_ffff, nanosecond: false)
        huge.add([UInt8](repeating: 1, count: 60))
        huge.add([UInt8](repeating: 2, count: 262_145))
        huge.add([UInt8](repeating: 3, count: 60))
        try assertSameAsLibpcap(try huge.write(dir, "over-max.pcap"), "caplen above 256 KiB")

        var bogus = PcapFileBuilder(linkType: 1)
        bogus.add([UInt8](repeating: 1, count: 60))
        let bytes = bogus.bytes + [0, 0, 0, 0, 0, 0, 0, 0] + [0xf0, 0xff, 0xff, 0x7f] + [0x40, 0, 0, 0] + [UInt8](repeating: 9, count: 64)
        let path = dir.appendingPathComponent("bogus.pcap").path
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        try assertSameAsLibpcap(path, "2 GiB caplen")
    }

    func testRecordsAcrossTheBlockBoundaryAndLargeFilesReadLikeLibpcap() throws {
        // ~3 MiB of records of many sizes: records straddle the 1 MiB block boundaries at every phase.
        var b = PcapFileBuilder(linkType: 113, snaplen: 262_144, nanosecond: true)
        var size = 0, i = 0
        while size < 3 << 20 {
            let n = (i * 7919) % 9000
            b.add((0..<n).map { UInt8(truncatingIfNeeded: $0 ^ i) }, seconds: UInt32(i), fraction: UInt32(i))
            size += 16 + n
            i += 1
        }
        b.add([UInt8](repeating: 0xab, count: 262_144))
        try assertSameAsLibpcap(try b.write(dir, "large.pcap"), "3 MiB")
        let cut = b.bytes.count - 1000
        let path = dir.appendingPathComponent("large-cut.pcap").path
        try Data(b.bytes.prefix(cut)).write(to: URL(fileURLWithPath: path))
        try assertSameAsLibpcap(path, "3 MiB cut inside the last record")
    }

    func testTimeFieldsAreUnsignedAndWholeSecondsOfFractionCarry() throws {
        // The format's seconds are unsigned (tcpdump's time_2039 / time_2106_max), and a fraction of a second or
        // more (its timestamp_invalid_micro / _nano) is carried into the seconds: libpcap 1.10 sign-extended both,
        // which put 2038-2106 before 1970 and printed "1418145370.:00000000". The same through the block reader
        // (version 2.4) and through libpcap (version 2.3, which the block reader leaves to it).
        for nano in [false, true] {
            for minor: UInt8 in [4, 3] {
                var b = PcapFileBuilder(linkType: 101, nanosecond: nano)
                b.add([0x45], seconds: 0xffff_ffff, fraction: 0)
                b.add([0x45], seconds: 0x8000_0000, fraction: nano ? 999_999_999 : 999_999)
                b.add([0x45], seconds: 1_418_145_370, fraction: nano ? 1_000_000_000 : 1_000_000)
                b.add([0x45], seconds: 1_418_145_370, fraction: nano ? 2_147_483_648 : 2_147_483)
                // A µs fraction whose ns (x 1000) does not fit 32 bits: libpcap's path cut it to them.
                b.add([0x45], seconds: 1_418_145_370, fraction: 4_294_967_295)
                var bytes = b.bytes
                bytes[6] = minor
                let path = dir.appendingPathComponent("times-\(nano)-\(minor).pcap").path
                try Data(bytes).write(to: URL(fileURLWithPath: path))
                let (frames, damage, inBlocks) = try readWithSource(path)
                let label = "\(nano ? "ns" : "µs") version 2.\(minor)"
                XCTAssertEqual(inBlocks, minor == 4, label)
                XCTAssertNil(damage, label)
                let times = frames.map { [$0.seconds, Int64($0.nanoseconds)] }
                XCTAssertEqual(times, [[4_294_967_295, 0], [2_147_483_648, nano ? 999_999_999 : 999_999_000], [1_418_145_371, 0],
                                       [1_418_145_372, nano ? 147_483_648 : 147_483_000],
                                       nano ? [1_418_145_374, 294_967_295] : [1_418_149_664, 967_295_000]], label)
            }
        }
    }

    func testFilesTheBlockReaderDoesNotTakeStayWithLibpcap() throws {
        // Version 2.3 (libpcap may swap its length fields) and an other-endian NFLOG file (libpcap swaps its TLV
        // headers in place) are read by libpcap alone, with the same frames.
        var old = sample(nanosecond: false, bigEndian: false, count: 5).bytes
        old[6] = 3
        let oldPath = dir.appendingPathComponent("v2.3.pcap").path
        try Data(old).write(to: URL(fileURLWithPath: oldPath))
        try assertSameAsLibpcap(oldPath, expectBlocks: false, "version 2.3")

        let otherEndian = ByteOrder.host != .big
        let nflog = sample(linkType: 239, nanosecond: false, bigEndian: otherEndian, count: 5)
        try assertSameAsLibpcap(try nflog.write(dir, "nflog-other-endian.pcap"), expectBlocks: false, "other-endian NFLOG")
        let nflogHost = sample(linkType: 239, nanosecond: false, bigEndian: !otherEndian, count: 5)
        try assertSameAsLibpcap(try nflogHost.write(dir, "nflog-host.pcap"), expectBlocks: true, "host-order NFLOG")
    }

    func testWrongMagicAndShortHeadersAreStillLibpcapsErrors() throws {
        for (name, bytes) in [("text", Array("not a capture at all, only some words....".utf8)),
                              ("short", Array(PcapFileBuilder(linkType: 1).bytes.prefix(20)))] {
            let path = dir.appendingPathComponent("\(name).pcap").path
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            XCTAssertThrowsError(try PcapFileSource(path: path, tags: RuleTagTable()), name) { e in
                XCTAssertEqual((e as? MeshtraceError)?.code, .badInput, name)
            }
        }
    }

    func testReferenceCapturesReadLikeLibpcap() throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/captures")
        let files = try FileManager.default.contentsOfDirectory(atPath: fixtures.path).filter { $0.hasSuffix(".pcap") }
        XCTAssertFalse(files.isEmpty)
        for f in files { try assertSameAsLibpcap(fixtures.appendingPathComponent(f).path, f) }
        let samples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("samples")
        for f in try FileManager.default.contentsOfDirectory(atPath: samples.path) where f.hasSuffix(".pcap") {
            try assertSameAsLibpcap(samples.appendingPathComponent(f).path, f)
        }
    }
}
