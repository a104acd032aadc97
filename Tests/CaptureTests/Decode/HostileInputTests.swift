import Foundation
import XCTest
@testable import Capture

/// Damaged and hostile captures, built byte by byte: each gives its error or note, never a crash.
final class HostileInputTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws { dir = try makeTemporaryDirectory() }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    private func openError(_ path: String) -> MeshtraceError? {
        do {
            _ = try PcapFileSource(path: path, tags: RuleTagTable())
            return nil
        } catch let e as MeshtraceError {
            return e
        } catch {
            XCTFail("unexpected error type \(error)")
            return nil
        }
    }

    private func tcpFrame() -> [UInt8] {
        Frame.ethernet(type: 0x0800, payload: Frame.ipv4(src: "10.0.0.1", dst: "10.0.0.2", proto: 6,
            payload: Frame.tcp(sport: 40000, dport: 80, seq: 1000, ack: 0, flags: 0x02, options: [2, 4, 5, 180], payload: 0)))
    }

    // MARK: files that are not usable captures

    func testMissingFileIsBadInputNamingTheFile() throws {
        let path = dir.appendingPathComponent("nope.pcap").path
        let e = try XCTUnwrap(openError(path))
        XCTAssertEqual(e.code, .badInput)
        XCTAssertTrue(e.message.contains(path) && e.message.contains("No such file"), e.message)
    }

    func testEmptyFileIsBadInput() throws {
        let path = dir.appendingPathComponent("empty.pcap").path
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data()), "cannot create a scratch file")
        let e = try XCTUnwrap(openError(path))
        XCTAssertEqual(e.code, .badInput)
        XCTAssertTrue(e.message.contains("empty"), e.message)
    }

    func testWrongMagicIsBadInput() throws {
        let path = dir.appendingPathComponent("text.pcap").path
        try Data("this is not a capture file at all, just some words\n".utf8).write(to: URL(fileURLWithPath: path))
        let e = try XCTUnwrap(openError(path))
        XCTAssertEqual(e.code, .badInput)
        XCTAssertTrue(e.message.contains("not a pcap or pcapng"), e.message)
        XCTAssertFalse(e.message.contains("\n"))
    }

    func testTruncatedFileHeaderIsBadInput() throws {
        let full = PcapFileBuilder(linkType: 1).bytes
        let path = dir.appendingPathComponent("short-header.pcap").path
        try Data(full.prefix(10)).write(to: URL(fileURLWithPath: path))
        let e = try XCTUnwrap(openError(path))
        XCTAssertEqual(e.code, .badInput)
        XCTAssertTrue(e.message.contains("truncated"), e.message)
    }

    func testUnknownLinkTypeIsBadInputNamingIt() throws {
        var b = PcapFileBuilder(linkType: 147)  // LINKTYPE_USER0
        b.add([1, 2, 3, 4])
        let e = try XCTUnwrap(openError(try b.write(dir, "user0.pcap")))
        XCTAssertEqual(e.code, .badInput)
        XCTAssertTrue(e.message.contains("link type 147") && e.message.contains("not supported"), e.message)
    }

    func testRunningOutOfFileDescriptorsSaysSoNotThatTheCaptureIsBad() throws {
        // Every capture of a run stays open; past the descriptor limit the next one said "cannot read as a capture
        // (FILE: Too many open files)", as if the file were bad.
        var b = PcapFileBuilder(linkType: 1)
        b.add(tcpFrame())
        let classic = try b.write(dir, "a.pcap")
        var ng = PcapngFileBuilder()
        ng.addInterface(linkType: 1, name: "eth0")
        ng.addPacket(interface: 0, units: 1, tcpFrame())
        let pcapng = try ng.write(dir, "b.pcapng")
        var saved = rlimit()
        XCTAssertEqual(getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved), 0)
        for path in [classic, pcapng] {
            let open = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count
            var low = saved
            low.rlim_cur = rlim_t(open + 6)
            XCTAssertEqual(setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &low), 0)
            var sources: [PcapFileSource] = []
            var failure: MeshtraceError? = nil
            for i in 0..<20 {
                do {
                    sources.append(try PcapFileSource(path: path, index: UInt16(i), tags: RuleTagTable()))
                } catch {
                    failure = error as? MeshtraceError
                    break
                }
            }
            sources.removeAll()
            XCTAssertEqual(setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved), 0)
            let e = try XCTUnwrap(failure, path)
            XCTAssertEqual(e.code, .badInput)
            XCTAssertTrue(e.message.contains("cannot open: too many open files (capture "), e.message)
            XCTAssertTrue(e.message.contains("ulimit -n"), e.message)
            XCTAssertFalse(e.message.contains("cannot read as a capture"), e.message)
        }
    }

    func testDirectoryIsBadInput() throws {
        let e = try XCTUnwrap(openError(dir.path))
        XCTAssertEqual(e.code, .badInput)
    }

    /// A capture's own text (a pcapng if_name, an NFLOG prefix) cannot drive the operator's terminal: control
    /// characters in it are printed as visible escapes, in the text report as everywhere else.
    func testControlCharactersInACapturesNamesAndPrefixesAreNotPrintedRaw() throws {
        let evilName = "\u{1B}[31mEVIL\u{1B}]0;pwned\u{07}\u{1B}[2J"
        let evilPrefix = "x\u{1B}[2K\u{9B}1A"
        let tcp = Frame.ipv4(src: "10.0.0.5", dst: "10.96.0.10", proto: 6, payload: Frame.tcp(sport: 40000, dport: 80, seq: 7, ack: 0, flags: 0x02))
        var b = PcapngFileBuilder()
        b.addInterface(linkType: 101, name: evilName)
        b.addInterface(linkType: 239, name: "nflog:5")
        b.addPacket(interface: 0, units: 1_700_000_000_000_001, tcp)
        let tlvs = Frame.attr(1, Frame.be16(0x0800) + [3, 0]) + Frame.attr(10, Frame.cString(evilPrefix)) + Frame.attr(9, tcp)
        b.addPacket(interface: 1, units: 1_700_000_000_000_002, Frame.nflog(group: 5, tlvs))
        let c = try DecodedCapture(try b.write(dir, "evil.pcapng"))
        XCTAssertNil(c.damage)
        XCTAssertEqual(c.records.count, 2)
        XCTAssertEqual(c.records[0].point.description, "\\x1b[31mEVIL\\x1b]0;pwned\\x07\\x1b[2J")
        XCTAssertEqual(c.prefix(c.records[1]), "x\\x1b[2K\\x9b1A")
        let text = try renderReport(c.records, tags: c.tags) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(text.contains("EVIL"), text)
        XCTAssertFalse(text.unicodeScalars.contains { $0.value < 0x20 && $0 != "\n" || ($0.value >= 0x7f && $0.value < 0xa0) },
                       text.debugDescription)
        // Names without control characters are kept as they are.
        XCTAssertEqual(InterfaceName("eth0.100@if7").string, "eth0.100@if7")
    }

    // MARK: damage inside the file: records up to it, then a damage report

    func testTruncatedLastRecordKeepsEarlierRecordsAndReportsDamage() throws {
        var b = PcapFileBuilder(linkType: 1)
        b.add(tcpFrame(), fraction: 1)
        b.add(tcpFrame(), fraction: 2)
        b.add(tcpFrame(), fraction: 3)
        for (name, cut) in [("inside-data", 20), ("inside-record-header", tcpFrame().count + 10)] {
            let path = dir.appendingPathComponent("\(name).pcap").path
            try Data(b.bytes.dropLast(cut)).write(to: URL(fileURLWithPath: path))
            let c = try DecodedCapture(path)
            XCTAssertEqual(c.records.count, 2, name)
            XCTAssertEqual(c.records.map(\.tuple.dst.port), [80, 80])
            let damage = try XCTUnwrap(c.damage, name)
            XCTAssertEqual(damage.code, .damagedInput)
            XCTAssertTrue(damage.message.contains("after frame 2") && damage.message.contains(path), damage.message)
        }
    }

    func testBogusRecordLengthIsDamageAfterTheGoodRecords() throws {
        var b = PcapFileBuilder(linkType: 1)
        b.add(tcpFrame())
        // A record header claiming 2 GiB captured: libpcap refuses it; meshtrace reports damage, no allocation.
        let bytes = b.bytes + [0, 0, 0, 0, 0, 0, 0, 0] + [0xf0, 0xff, 0xff, 0x7f] + [0x40, 0, 0, 0] + tcpFrame()
        let path = dir.appendingPathComponent("huge-record.pcap").path
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let c = try DecodedCapture(path)
        XCTAssertEqual(c.records.count, 1)
        XCTAssertEqual(c.damage?.code, .damagedInput)
    }

    func testDamageInOneMergedFileDoesNotStopTheOthers() throws {
        var good = PcapFileBuilder(linkType: 1)
        var bad = PcapFileBuilder(linkType: 1)
        for i in 0..<4 { good.add(tcpFrame(), fraction: UInt32(2 * i)) }
        for i in 0..<4 { bad.add(tcpFrame(), fraction: UInt32(2 * i + 1)) }
        let badPath = dir.appendingPathComponent("bad.pcap").path
        try Data(bad.bytes.dropLast(5)).write(to: URL(fileURLWithPath: badPath))
        let merged = try MergedSource(paths: [try good.write(dir, "good.pcap"), badPath], tags: RuleTagTable())
        var r = PacketRecord()
        var refs: [FrameRef] = []
        while merged.next(into: &r) != nil { refs.append(r.ref) }
        XCTAssertEqual(refs.count, 7)
        XCTAssertEqual(refs.filter { $0.source == 0 }.count, 4)
        XCTAssertEqual(merged.damage?.code, .damagedInput)

        // One file through the merge: the same frames, and its damage.
        let single = try MergedSource(paths: [badPath], tags: RuleTagTable())
        var frames: [UInt64] = []
        while single.next(into: &r) != nil {
            frames.append(r.ref.frame)
            XCTAssertEqual(single.currentLinkType, LinkType.ethernet)
        }
        XCTAssertEqual(frames, [1, 2, 3])
        XCTAssertEqual(single.damage?.code, .damagedInput)
    }

    // MARK: packets cut by a snaplen

    func testEveryCutOfAFrameGivesNotesNotACrash() throws {
        let frame = tcpFrame()
        var decoder = PacketDecoder(tags: RuleTagTable())
        for n in 0..<frame.count {
            let r = decoder.decodeFrame(Array(frame.prefix(n)), linkType: LinkType.ethernet, wireLength: frame.count)
            XCTAssertTrue(r.notes.contains(.snaplenCut), "cut at \(n): \(r.notes.descriptions)")
            switch n {
            case ..<14: XCTAssertTrue(r.notes.contains(.truncatedLink), "cut at \(n)")
            case 14..<34: XCTAssertTrue(r.notes.contains(.truncatedIP), "cut at \(n)")
            default:
                XCTAssertTrue(r.notes.contains(.truncatedTransport), "cut at \(n)")
                XCTAssertEqual(r.tuple.src.addr, IPAddress("10.0.0.1"))
                if n >= 38 { XCTAssertEqual(r.tuple.dst.port, 80, "ports survive a cut after them") }
            }
        }
        let whole = decoder.decodeFrame(frame, linkType: LinkType.ethernet)
        XCTAssertEqual(whole.notes, [])
        XCTAssertEqual(whole.tcpFlags, .syn)
    }

    func testAWholeFrameShorterThanItsIPLengthIsMalformedNotCutBySnaplen() throws {
        // caplen == wire length, but the IP header claims more than the frame holds (tcpdump's "truncated-ip -
        // N bytes missing!"): the packet is malformed. It was also called "cut by snaplen" before.
        var decoder = PacketDecoder(tags: RuleTagTable())
        var v4 = Frame.ipv4(src: "10.0.0.1", dst: "10.0.0.2", proto: 6, payload: Frame.tcp(sport: 1, dport: 2, seq: 0, ack: 0, flags: 2))
        v4[2] = 0x05; v4[3] = 0xdc
        let shortTCP = Array(v4.prefix(20 + 10))
        XCTAssertEqual(decoder.decodeFrame(shortTCP, linkType: LinkType.raw).notes, [.truncatedTransport])
        XCTAssertEqual(decoder.decodeFrame(shortTCP, linkType: LinkType.raw, wireLength: 1500).notes, [.truncatedTransport, .snaplenCut])
        var v6 = Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 43, payload: [6, 4] + [UInt8](repeating: 0, count: 6))
        v6[4] = 0x05; v6[5] = 0xdc
        XCTAssertEqual(decoder.decodeFrame(v6, linkType: LinkType.ipv6).notes, [.ipv6ExtensionHeaders, .truncatedIP])
        XCTAssertEqual(decoder.decodeFrame(v6, linkType: LinkType.ipv6, wireLength: 1540).notes, [.ipv6ExtensionHeaders, .truncatedIP, .snaplenCut])
    }

    func testSnaplenCutFileIsReadWithNotes() throws {
        var b = PcapFileBuilder(linkType: 1, snaplen: 40)
        let frame = tcpFrame()
        b.add(Array(frame.prefix(40)), wireLength: frame.count)
        let c = try DecodedCapture(try b.write(dir, "cut.pcap"))
        XCTAssertNil(c.damage)
        XCTAssertEqual(c.records.count, 1)
        XCTAssertEqual(c.records[0].notes, [.truncatedTransport, .snaplenCut])
        XCTAssertEqual(c.records[0].tuple.dst.port, 80)
        XCTAssertEqual(c.records[0].wireLength, UInt32(frame.count))
    }

    // MARK: NFLOG TLVs

    private func nflogFrame(_ tlvs: [UInt8]) -> [UInt8] { Frame.nflog(group: 7, tlvs) }

    private var payloadTLV: [UInt8] {
        Frame.attr(9, Frame.ipv4(src: "10.1.1.1", dst: "10.2.2.2", proto: 17, payload: Frame.udp(sport: 5353, dport: 53, payload: 12)))
    }

    func testBogusNflogTLVLengthsAreNotedAndStopTheWalk() throws {
        let tags = RuleTagTable()
        var decoder = PacketDecoder(tags: tags)
        let prefix = Frame.attr(10, Frame.cString("mt:4:nat:ISTIO_OUTPUT:3:beef"))
        let header = Frame.attr(1, Frame.be16(0x0800) + [3, 0])
        for bogus in [0, 2, 3, 0xffff, 4 + 64] {
            // A TLV claiming `bogus` bytes, followed by a mark that must not be read through it.
            let bad = Frame.u16(bogus, .host) + Frame.u16(2, .host) + Frame.be32(0x539)
            let frame = nflogFrame(header + prefix + bad + Frame.attr(2, Frame.be32(0x111)))
            let r = decoder.decodeFrame(frame, linkType: LinkType.nflog)
            XCTAssertTrue(r.notes.contains(.badNflogTLV), "length \(bogus): \(r.notes.descriptions)")
            XCTAssertEqual(tags.text(for: r.nflog?.prefixID ?? 0), "mt:4:nat:ISTIO_OUTPUT:3:beef", "length \(bogus)")
            XCTAssertEqual(r.nflog?.hook, .output)
            XCTAssertEqual(r.point, .netfilter(.output))
            XCTAssertNil(r.nflog?.mark, "length \(bogus): nothing after the bogus TLV is trusted")
        }
        // Truncated inside the TLV area when the record was cut by a snaplen: a truncation, not a bogus length.
        let whole = nflogFrame(header + prefix + payloadTLV)
        let cut = decoder.decodeFrame(Array(whole.prefix(whole.count - 20)), linkType: LinkType.nflog, wireLength: whole.count)
        XCTAssertTrue(cut.notes.isSuperset(of: [.truncatedNflog, .snaplenCut]), cut.notes.descriptions.joined(separator: ", "))
        XCTAssertFalse(cut.notes.contains(.badNflogTLV))
        // Every cut of the record decodes without crashing.
        for n in 0..<whole.count {
            _ = decoder.decodeFrame(Array(whole.prefix(n)), linkType: LinkType.nflog, wireLength: whole.count)
        }
    }

    func testFixedSizeTLVsTooShortAreNoted() throws {
        var decoder = PacketDecoder(tags: RuleTagTable())
        for type in [1, 2, 3, 4, 5, 11, 12, 14] {
            let r = decoder.decodeFrame(nflogFrame(Frame.attr(type, [1])), linkType: LinkType.nflog)
            XCTAssertTrue(r.notes.contains(.badNflogTLV), "type \(type)")
        }
    }

    private func ctTuple(_ src: String, _ dst: String, proto: UInt8, sport: Int, dport: Int, _ order: ByteOrder = .host) -> [UInt8] {
        let ip = Frame.attr(1, Frame.v4(src), order) + Frame.attr(2, Frame.v4(dst), order)
        let ports = Frame.attr(1, [proto], order) + Frame.attr(2, Frame.be16(sport), order) + Frame.attr(3, Frame.be16(dport), order)
        return Frame.attr(0x8001, ip, order) + Frame.attr(0x8002, ports, order)
    }

    private func ctAttribute(_ order: ByteOrder = .host) -> [UInt8] {
        // An OUTPUT REDIRECT: original 10.0.0.5:40000 -> 10.96.0.10:80, reply 127.0.0.1:15001 -> 10.0.0.5:40000.
        let orig = Frame.attr(0x8001, ctTuple("10.0.0.5", "10.96.0.10", proto: 6, sport: 40000, dport: 80, order), order)
        let reply = Frame.attr(0x8002, ctTuple("127.0.0.1", "10.0.0.5", proto: 6, sport: 15001, dport: 40000, order), order)
        let rest = Frame.attr(3, Frame.be32(0x188), order) + Frame.attr(8, Frame.be32(0x111), order)
            + Frame.attr(12, Frame.be32(0xdeadbeef), order) + Frame.attr(18, Frame.be16(7), order)
            + Frame.attr(7, Frame.be32(120), order)  // CTA_TIMEOUT, skipped
        return Frame.attr(0x8000 | 18, orig + reply + rest, order)
    }

    func testConntrackAttributeGivesBothTuples() throws {
        var decoder = PacketDecoder(tags: RuleTagTable())
        let r = decoder.decodeFrame(nflogFrame(Frame.attr(1, Frame.be16(0x0800) + [3, 0]) + ctAttribute()
                                               + Frame.attr(19, Frame.be32(2)) + payloadTLV), linkType: LinkType.nflog)
        XCTAssertEqual(r.notes, [])
        let ct = try XCTUnwrap(r.nflog?.conntrack)
        XCTAssertEqual(ct.original.description, "tcp 10.0.0.5:40000 > 10.96.0.10:80")
        XCTAssertEqual(ct.reply.description, "tcp 127.0.0.1:15001 > 10.0.0.5:40000")
        XCTAssertTrue(ct.isDestinationNATed)
        XCTAssertEqual(ct.status, 0x188)
        XCTAssertEqual(ct.mark, 0x111)
        XCTAssertEqual(ct.id, 0xdeadbeef)
        XCTAssertEqual(ct.zone, 7)
        XCTAssertEqual(r.nflog?.conntrackState, 2)
        XCTAssertEqual(r.tuple.description, "udp 10.1.1.1:5353 > 10.2.2.2:53")
    }

    func testGarbageConntrackIsNotedAndTheRestStillDecodes() throws {
        var decoder = PacketDecoder(tags: RuleTagTable())
        var rng = SystemRandomNumberGenerator()
        let garbage: [[UInt8]] = [
            [0xff, 0xff, 0x01, 0x80, 1, 2, 3, 4],                                        // nested length beyond the value
            [0x01, 0x00, 0x01, 0x80],                                                   // length 1
            Frame.attr(0x8001, Frame.attr(0x8001, Frame.attr(1, [1, 2]))),             // 2-byte IPv4 address
            Frame.attr(0x8001, Frame.attr(0x8002, Frame.attr(2, [1]))),                // 1-byte port
            Frame.attr(3, [1, 2, 3]),                                                   // status of 3 bytes, no tuple
            (0..<64).map { _ in UInt8.random(in: 0...255, using: &rng) },
        ]
        for g in garbage {
            let frame = nflogFrame(Frame.attr(18, g) + Frame.attr(2, Frame.be32(0x539)) + payloadTLV)
            let r = decoder.decodeFrame(frame, linkType: LinkType.nflog)
            XCTAssertTrue(r.notes.contains(.badConntrack), "\(g): \(r.notes.descriptions)")
            XCTAssertNil(r.nflog?.conntrack)
            XCTAssertEqual(r.nflog?.mark, 0x539)
            XCTAssertEqual(r.tuple.dst.port, 53)
        }
    }

    /// A capture written on a machine of the other byte order: libpcap swaps the NFLOG TLV headers to host
    /// order, not the ctnetlink headers nested in NFULA_CT; both must come out right.
    func testOtherEndianNflogFileDecodes() throws {
        let other = ByteOrder.host.swapped
        var b = PcapFileBuilder(linkType: 239, bigEndian: other == .big)
        let tlvs = Frame.attr(1, Frame.be16(0x0800) + [0, 0], other) + Frame.attr(2, Frame.be32(0x539), other)
            + Frame.attr(10, Frame.cString("mt:4:nat:PREROUTING:in:-"), other) + ctAttribute(other)
            + Frame.attr(9, Frame.ipv4(src: "10.1.1.1", dst: "10.2.2.2", proto: 6,
                                         payload: Frame.tcp(sport: 1234, dport: 15008, seq: 9, ack: 0, flags: 0x02)), other)
        b.add(Frame.nflog(group: 99, tlvs))
        let c = try DecodedCapture(try b.write(dir, "other-endian.pcap"))
        let r = try XCTUnwrap(c.records.first)
        XCTAssertEqual(r.notes, [])
        XCTAssertEqual(r.nflog?.group, 99)
        XCTAssertEqual(r.nflog?.hook, .prerouting)
        XCTAssertEqual(r.direction, .inbound)
        XCTAssertEqual(r.nflog?.mark, 0x539)
        XCTAssertEqual(c.prefix(r), "mt:4:nat:PREROUTING:in:-")
        XCTAssertEqual(r.nflog?.conntrack?.reply.src.port, 15001)
        XCTAssertEqual(r.tuple.description, "tcp 10.1.1.1:1234 > 10.2.2.2:15008")
    }

    // MARK: IP layer

    func testIPv6ExtensionHeaderChainsAreWalkedAndBounded() throws {
        var decoder = PacketDecoder(tags: RuleTagTable())
        let tcp = Frame.tcp(sport: 33000, dport: 15008, seq: 1, ack: 0, flags: 0x02)
        // hop-by-hop -> dest opts -> fragment (first, id 0xabcdef01) -> TCP
        let hop: [UInt8] = [60, 0, 1, 4, 0, 0, 0, 0]
        let dest: [UInt8] = [44, 1] + [UInt8](repeating: 1, count: 14)
        let frag: [UInt8] = [6, 0] + Frame.be16(0x0001) + Frame.be32(0xabcd_ef01)
        let packet = Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 0, payload: hop + dest + frag + tcp)
        let r = decoder.decodeFrame(packet, linkType: LinkType.ipv6)
        XCTAssertEqual(r.notes, [.ipv6ExtensionHeaders, .fragment])
        XCTAssertEqual(r.tuple.description, "tcp [fd00::1]:33000 > [fd00::2]:15008")
        XCTAssertEqual(r.ipID, 0xabcd_ef01)
        XCTAssertEqual(r.tcpFlags, .syn)

        // A non-first fragment: no transport header to read.
        let later: [UInt8] = [6, 0] + Frame.be16(0x0010) + Frame.be32(7)
        let r2 = decoder.decodeFrame(Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 44, payload: later + [1, 2, 3, 4]), linkType: LinkType.ipv6)
        XCTAssertTrue(r2.notes.contains(.nonFirstFragment))
        XCTAssertEqual(r2.tuple.proto, 6)
        XCTAssertEqual(r2.tuple.src.port, 0)

        // A chain of 40 hop-by-hop headers, each naming another: bounded, noted, no hang.
        let loop = [UInt8]((0..<40).flatMap { _ in [0, 0, 1, 4, 0, 0, 0, 0] as [UInt8] })
        let r3 = decoder.decodeFrame(Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 0, payload: loop), linkType: LinkType.ipv6)
        XCTAssertTrue(r3.notes.contains(.badIPHeader))
        // Extension header lengths pointing past the packet.
        let r4 = decoder.decodeFrame(Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 43, payload: [6, 255, 0, 0, 0, 0, 0, 0]), linkType: LinkType.ipv6)
        XCTAssertTrue(r4.notes.contains(.truncatedIP))
        // ESP ends the walk with no ports.
        let r5 = decoder.decodeFrame(Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 50, payload: [1, 2, 3, 4, 5, 6, 7, 8]), linkType: LinkType.ipv6)
        XCTAssertEqual(r5.tuple.proto, 50)
        XCTAssertEqual(r5.notes, [])
    }

    func testIPv4OptionsFragmentsAndBadHeaders() throws {
        var decoder = PacketDecoder(tags: RuleTagTable())
        let udp = Frame.udp(sport: 1000, dport: 2000, payload: 30)
        let withOptions = decoder.decodeFrame(Frame.ipv4(src: "1.1.1.1", dst: "2.2.2.2", proto: 17, options: [1, 1, 1, 0], payload: udp), linkType: LinkType.ipv4)
        XCTAssertEqual(withOptions.notes, [.ipOptions])
        XCTAssertEqual(withOptions.tuple.dst.port, 2000)
        XCTAssertEqual(withOptions.payloadLength, 30)
        let first = decoder.decodeFrame(Frame.ipv4(src: "1.1.1.1", dst: "2.2.2.2", proto: 17, moreFragments: true, payload: udp), linkType: LinkType.ipv4)
        XCTAssertEqual(first.notes, [.fragment])
        XCTAssertEqual(first.tuple.dst.port, 2000)
        let later = decoder.decodeFrame(Frame.ipv4(src: "1.1.1.1", dst: "2.2.2.2", proto: 17, fragmentOffset: 100, payload: udp), linkType: LinkType.ipv4)
        XCTAssertEqual(later.notes, [.fragment, .nonFirstFragment])
        XCTAssertEqual(later.tuple.dst.port, 0)
        var badIHL = Frame.ipv4(src: "1.1.1.1", dst: "2.2.2.2", proto: 17, payload: udp)
        badIHL[0] = 0x43
        XCTAssertTrue(decoder.decodeFrame(badIHL, linkType: LinkType.ipv4).notes.contains(.badIPHeader))
        var badTotal = Frame.ipv4(src: "1.1.1.1", dst: "2.2.2.2", proto: 17, payload: udp)
        badTotal[2] = 0; badTotal[3] = 10
        XCTAssertTrue(decoder.decodeFrame(badTotal, linkType: LinkType.ipv4).notes.contains(.badIPHeader))
        let badOffset = Frame.ipv4(src: "1.1.1.1", dst: "2.2.2.2", proto: 6,
                                   payload: Array(Frame.tcp(sport: 1, dport: 2, seq: 0, ack: 0, flags: 2).prefix(12)) + [0x20, 2] + [UInt8](repeating: 0, count: 6))
        XCTAssertTrue(decoder.decodeFrame(badOffset, linkType: LinkType.ipv4).notes.contains(.badTransportHeader))
        XCTAssertTrue(decoder.decodeFrame(Frame.ethernet(type: 0x0806, payload: [0, 1, 8, 0]), linkType: LinkType.ethernet).notes.contains(.notIP))
    }

    func testPacketsAbove64KiBWithLengthZeroTakeTheirLengthFromTheFrameOrTheJumboOption() throws {
        // Linux BIG TCP (tcpdump's bigtcp-*.pcap): IPv4 total length 0, IPv6 payload length 0 without the jumbo
        // option, or with it (RFC 2675). These read as bad headers, or as TCP to port 0, before.
        var decoder = PacketDecoder(tags: RuleTagTable())
        let payload = 80_000
        let tcp = Frame.tcp(sport: 35871, dport: 36425, seq: 1, ack: 2, flags: 0x18, payload: payload)
        var v4 = Frame.ipv4(src: "10.25.132.13", dst: "10.25.132.11", proto: 6, payload: tcp)
        v4[2] = 0; v4[3] = 0
        let v4Frame = Frame.ethernet(type: 0x0800, payload: v4)
        for captured in [v4Frame.count, 200] {
            let r = decoder.decodeFrame(Array(v4Frame.prefix(captured)), linkType: LinkType.ethernet, wireLength: v4Frame.count)
            XCTAssertEqual(r.notes, [], "IPv4, \(captured) bytes captured")
            XCTAssertEqual(r.tuple.description, "tcp 10.25.132.13:35871 > 10.25.132.11:36425")
            XCTAssertEqual(r.ipLength, UInt32(20 + 20 + payload))
            XCTAssertEqual(r.payloadLength, UInt32(payload))
            XCTAssertEqual(r.tcpFlags, [.psh, .ack])
        }
        // IPv4 total length 0 is still a bad header for what BIG TCP does not send.
        var icmp = Frame.ipv4(src: "10.0.0.1", dst: "10.0.0.2", proto: 1, payload: Frame.icmpEcho(type: 8, id: 1, seq: 1))
        icmp[2] = 0; icmp[3] = 0
        XCTAssertTrue(decoder.decodeFrame(icmp, linkType: LinkType.ipv4).notes.contains(.badIPHeader))

        var v6 = Frame.ipv6(src: "2604:1380:4091:ce00::b", dst: "2604:1380:4091:ce00::d", next: 6, payload: tcp)
        v6[4] = 0; v6[5] = 0
        let v6Frame = Frame.sll2(proto: 0x86dd, ifindex: 3, packetType: 4, payload: v6)
        let r6 = decoder.decodeFrame(Array(v6Frame.prefix(120)), linkType: LinkType.linuxSLL2, wireLength: v6Frame.count)
        XCTAssertEqual(r6.tuple.description, "tcp [2604:1380:4091:ce00::b]:35871 > [2604:1380:4091:ce00::d]:36425")
        XCTAssertEqual(r6.ipLength, UInt32(40 + 20 + payload))
        XCTAssertEqual(r6.payloadLength, UInt32(payload))
        XCTAssertEqual(r6.notes, [])

        // The jumbo option in a hop-by-hop header: Pad1, PadN, then type 0xC2 with the payload length after the
        // fixed header.
        let hop: [UInt8] = [6, 1] + [0] + [1, 5, 0, 0, 0, 0, 0] + [0xc2, 4] + Frame.be32(UInt32(16 + tcp.count))
        var jumbo = Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 0, payload: hop + tcp)
        jumbo[4] = 0; jumbo[5] = 0
        let rj = decoder.decodeFrame(Array(jumbo.prefix(100)), linkType: LinkType.ipv6, wireLength: jumbo.count)
        XCTAssertEqual(rj.tuple.description, "tcp [fd00::1]:35871 > [fd00::2]:36425")
        XCTAssertEqual(rj.ipLength, UInt32(jumbo.count))
        XCTAssertEqual(rj.payloadLength, UInt32(payload))
        XCTAssertEqual(rj.notes, [.ipv6ExtensionHeaders])

        // A hostile jumbo length (the largest, or one the option may not carry) is not taken: no trap, no length.
        for bogus: UInt32 in [0xffff_ffff, 0xffff_ffd8, 1000] {
            var bad = jumbo
            bad.replaceSubrange(52..<56, with: Frame.be32(bogus))
            let rb = decoder.decodeFrame(Array(bad.prefix(100)), linkType: LinkType.ipv6, wireLength: bad.count)
            XCTAssertEqual(rb.ipLength, 40, "jumbo \(bogus)")
        }

        // UDP above 64 KiB (a tunnel carrying BIG TCP) has UDP length 0 too.
        var udp = Frame.udp(sport: 55411, dport: 6081, payload: payload)
        udp[4] = 0; udp[5] = 0
        var v6udp = Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 17, payload: udp)
        v6udp[4] = 0; v6udp[5] = 0
        let ru = decoder.decodeFrame(Array(v6udp.prefix(60)), linkType: LinkType.ipv6, wireLength: v6udp.count)
        XCTAssertEqual(ru.tuple.description, "udp [fd00::1]:55411 > [fd00::2]:6081")
        XCTAssertEqual(ru.payloadLength, UInt32(payload))
        XCTAssertEqual(ru.notes, [])

        // A small IPv6 packet with payload length 0 carries no transport header, as before.
        let empty = Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 6, payload: []) + Frame.tcp(sport: 1, dport: 2, seq: 0, ack: 0, flags: 2)
        let re = decoder.decodeFrame(empty, linkType: LinkType.ipv6)
        XCTAssertEqual(re.ipLength, 40)
        XCTAssertEqual(re.tuple.src.port, 0)
    }

    /// Random bit flips, truncations and length fields of every frame kind: the decoder never traps.
    func testRandomlyMutatedFramesNeverCrash() throws {
        var decoder = PacketDecoder(tags: RuleTagTable())
        var rng = SeededGenerator(seed: 0x6d657368)
        let ip4 = Frame.ipv4(src: "10.0.0.1", dst: "10.0.0.2", proto: 6, payload: Frame.tcp(sport: 1, dport: 2, seq: 3, ack: 4, flags: 0x12, payload: 10))
        let ip6 = Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 0,
                             payload: [58, 0, 1, 4, 0, 0, 0, 0] + Frame.icmpEcho(type: 128, id: 7, seq: 1))
        let nflog = nflogFrame(Frame.attr(1, Frame.be16(0x0800) + [3, 0]) + Frame.attr(10, Frame.cString("mt:x")) + ctAttribute()
                               + Frame.attr(9, ip4))
        let samples: [(Int32, [UInt8])] = [
            (LinkType.ethernet, Frame.ethernet(type: 0x0800, vlan: 5, payload: ip4)),
            (LinkType.linuxSLL, Frame.sll(packetType: 4, arphrd: 772, proto: 0x86dd, payload: ip6)),
            (LinkType.linuxSLL2, Frame.sll2(proto: 0x0800, ifindex: 3, packetType: 0, payload: ip4)),
            (LinkType.raw, ip6), (LinkType.null, [2, 0, 0, 0] + ip4), (LinkType.loop, [0, 0, 0, 30] + ip6),
            (LinkType.nflog, nflog),
        ]
        var decoded = 0
        for _ in 0..<4000 {
            for (linkType, frame) in samples {
                var f = frame
                for _ in 0..<Int.random(in: 1...6, using: &rng) {
                    let i = Int.random(in: 0..<f.count, using: &rng)
                    f[i] = Bool.random(using: &rng) ? UInt8.random(in: 0...255, using: &rng) : f[i] ^ (1 << UInt8.random(in: 0...7, using: &rng))
                }
                if Bool.random(using: &rng) { f = Array(f.prefix(Int.random(in: 0...f.count, using: &rng))) }
                _ = decoder.decodeFrame(f, linkType: linkType, wireLength: frame.count)
                decoded += 1
            }
        }
        XCTAssertEqual(decoder.framesDecoded, UInt64(decoded))
    }
}

/// Deterministic xorshift so a failing mutation can be reproduced.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed | 1 }
    mutating func next() -> UInt64 {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return state
    }
}

/// The one netlink message walk (`forEachNetlinkMessage`) under the NFLOG, TRACE and conntrack readers: messages
/// of other types are skipped, and a truncated or bogus length ends the walk without reading past the datagram.
final class NetlinkWalkTests: XCTestCase {
    /// An nlmsghdr (host order, as the kernel sends it) followed by `payload`, padded to 4 bytes.
    static func message(type: UInt16, sequence: UInt32, payload: [UInt8], length: UInt32? = nil) -> [UInt8] {
        var m: [UInt8] = []
        withUnsafeBytes(of: length ?? UInt32(16 + payload.count)) { m += $0 }
        withUnsafeBytes(of: type) { m += $0 }
        m += [0, 0]                                        // flags
        withUnsafeBytes(of: sequence) { m += $0 }
        m += [0, 0, 0, 0]                                  // portid
        m += payload
        while m.count % 4 != 0 { m.append(0) }
        return m
    }

    func testNflogPacketsAreFoundAmongOtherMessagesAndBadLengthsEndTheWalk() {
        let packetType = UInt16(4) << 8 | 0                // NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET
        let tlvs: [UInt8] = [8, 0, 1, 0, 0xaa, 0xbb, 0xcc, 0xdd]
        var datagram = Self.message(type: 2, sequence: 7, payload: [0xff, 0xff, 0xff, 0xff])  // NLMSG_ERROR: skipped
        datagram += Self.message(type: packetType, sequence: 8, payload: [2, 0, 0x14, 0x21] + tlvs)  // family 2, group 5153
        datagram += Self.message(type: packetType, sequence: 9, payload: [10, 0, 0, 1])          // no TLVs at all
        datagram += Self.message(type: packetType, sequence: 10, payload: [2, 0, 0, 1], length: 4096)  // beyond the end
        datagram += Self.message(type: packetType, sequence: 11, payload: [2, 0, 0, 1])          // after it: never reached
        var seen: [(UInt8, UInt16, [UInt8])] = []
        datagram.withUnsafeBytes { d in
            NflogSocket.forEachPacket(in: d) { t, family, group in seen.append((family, group, Array(t))) }
        }
        XCTAssertEqual(seen.count, 2)
        XCTAssertEqual(seen.first?.0, 2)
        XCTAssertEqual(seen.first?.1, 5153)
        XCTAssertEqual(seen.first?.2, tlvs)
        XCTAssertEqual(seen.last?.0, 10)
        XCTAssertEqual(seen.last?.2, [])

        var sequences: [UInt32] = []
        datagram.withUnsafeBytes { d in forEachNetlinkMessage(in: d) { _, seq, _ in sequences.append(seq); return true } }
        XCTAssertEqual(sequences, [7, 8, 9])
        // A length below the header's own, and a datagram cut inside a header: nothing, and no read past the end.
        var short = Self.message(type: packetType, sequence: 1, payload: [], length: 8)
        short += [1, 2, 3]
        short.withUnsafeBytes { d in forEachNetlinkMessage(in: d) { _, seq, _ in sequences.append(seq); return true } }
        Array(datagram.prefix(10)).withUnsafeBytes { d in forEachNetlinkMessage(in: d) { _, seq, _ in sequences.append(seq); return true } }
        XCTAssertEqual(sequences, [7, 8, 9])
        // `body` returning false stops the walk.
        var first: [UInt32] = []
        datagram.withUnsafeBytes { d in forEachNetlinkMessage(in: d) { _, seq, _ in first.append(seq); return false } }
        XCTAssertEqual(first, [7])
    }
}
