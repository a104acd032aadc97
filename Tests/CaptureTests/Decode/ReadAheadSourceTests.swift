import XCTest
@testable import Capture

/// `analyze` decodes on a read-ahead thread: the records it hands over must be the records a plain read gives,
/// in the same order, across batch boundaries, with new NFLOG prefixes interned while the caller reads the
/// tag table, and with the same damage at the end of a cut file.
final class ReadAheadSourceTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws { dir = try makeTemporaryDirectory() }
    override func tearDown() {
        if let dir { try? FileManager.default.removeItem(at: dir) }
        super.tearDown()
    }

    /// An `-i any` capture of `packets` TCP packets and an `nflog:G` capture of `events` twin hits whose prefixes
    /// keep changing (one new prefix every 97 records), interleaved in time.
    private func captures(packets: Int, events: Int, cut: Int = 0) throws -> [String] {
        var any = PcapFileBuilder(linkType: 113)
        for i in 0..<packets {
            let tcp = Frame.tcp(sport: 40000 + i % 500, dport: 80, seq: UInt32(i), ack: 0, flags: 0x10, payload: i % 3)
            let ip = Frame.ipv4(src: "10.244.1.10", dst: "10.244.2.\(i % 200)", proto: 6, id: i & 0xffff, payload: tcp)
            any.add(Frame.sll(packetType: 4, proto: 0x0800, payload: ip), seconds: 1_700_000_000 + UInt32(i / 1000), fraction: UInt32(i % 1000) * 1000)
        }
        var nflog = PcapFileBuilder(linkType: 239)
        for i in 0..<events {
            let tcp = Frame.tcp(sport: 40000 + i % 500, dport: 80, seq: UInt32(i), ack: 0, flags: 0x02)
            let ip = Frame.ipv4(src: "10.244.1.10", dst: "10.244.2.\(i % 200)", proto: 6, payload: tcp)
            let prefix = "mt:4:mangle:OUTPUT:\(1 + i / 97):\(String(i / 97, radix: 16))"
            let tlvs = Frame.attr(1, Frame.be16(0x0800) + [3, 0]) + Frame.attr(10, Frame.cString(prefix)) + Frame.attr(9, ip)
            nflog.add(Frame.nflog(group: 5, tlvs), seconds: 1_700_000_000 + UInt32(i / 1000), fraction: UInt32(i % 1000) * 1000 + 500)
        }
        var anyBytes = any.bytes
        if cut > 0 { anyBytes.removeLast(cut) }
        let anyPath = dir.appendingPathComponent("any-\(packets)-\(cut).pcap").path
        try Data(anyBytes).write(to: URL(fileURLWithPath: anyPath))
        return [anyPath, try nflog.write(dir, "nflog-\(events).pcap")]
    }

    private func line(_ r: PacketRecord, _ tags: RuleTagTable) -> String {
        "\(r.ref.source):\(r.ref.frame) \(r.time) \(r.point) \(r.tuple) \(r.tcpFlags) \(r.tcpSeq) \(r.payloadLength) "
            + "\(r.hasNflog ? tags.text(for: r.nflogFields.prefixID) : "-") \(r.notes.rawValue)"
    }

    private func plain(_ paths: [String]) throws -> (lines: [String], damage: String?) {
        let tags = RuleTagTable()
        let source = try MergedSource(paths: paths, tags: tags)
        var record = PacketRecord()
        var lines: [String] = []
        while source.next(into: &record) != nil { lines.append(line(record, tags)) }
        return (lines, source.damage?.message)
    }

    private func readAhead(_ paths: [String]) throws -> (lines: [String], damage: String?, bytes: UInt64) {
        let tags = RuleTagTable()
        let source = try MergedSource(paths: paths, tags: tags)
        var lines: [String] = []
        var bytes: UInt64 = 0
        // The caller reads the tag table (as the correlator does) while the reader interns new prefixes.
        ReadAheadSource(source).forEach({ lines.append(line($0, tags)) }, batchDone: { bytes += $0 })
        return (lines, source.damage?.message, bytes)
    }

    func testRecordsAreThePlainReadsAcrossBatchBoundaries() throws {
        let b = ReadAheadSource.batchSize
        for (packets, events) in [(1, 0), (b - 1, 0), (b, 0), (b + 1, 0), (2 * b - 300, 300), (3 * b, b + 7), (5000, 2000)] {
            let paths = try captures(packets: packets, events: events)
            let expected = try plain(paths)
            let got = try readAhead(paths)
            XCTAssertEqual(got.lines.count, packets + events, "\(packets) + \(events)")
            XCTAssertEqual(got.lines, expected.lines, "\(packets) + \(events)")
            XCTAssertNil(got.damage)
            let sizes = paths.map { (try? FileManager.default.attributesOfItem(atPath: $0)[.size] as? UInt64) ?? 0 }
            XCTAssertEqual(got.bytes + 24 * 2, sizes.reduce(0, +), "bytes handed over per batch add up to the files")
        }
    }

    func testACutFileEndsWithTheSameDamage() throws {
        let paths = try captures(packets: 3000, events: 500, cut: 30)
        let expected = try plain(paths)
        let got = try readAhead(paths)
        XCTAssertNotNil(expected.damage)
        XCTAssertEqual(got.damage, expected.damage)
        XCTAssertEqual(got.lines, expected.lines)
    }
}
