import Foundation
import XCTest
@testable import Capture

/// pcapng read without libpcap: mixed link types (meshtrace's own annotated files, mergecap output), interface
/// names per packet, timestamp resolutions, either byte order, and damaged blocks.
final class PcapngTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws { dir = try makeTemporaryDirectory() }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    private var tcp: [UInt8] {
        Frame.ipv4(src: "10.0.0.5", dst: "10.96.0.10", proto: 6, payload: Frame.tcp(sport: 40000, dport: 80, seq: 7, ack: 0, flags: 0x02))
    }

    func testInterfacesOfDifferentLinkTypesKeepTheirNamesAndTimestamps() throws {
        for order in [ByteOrder.little, .big] {
            var b = PcapngFileBuilder(order: order)
            b.addInterface(linkType: 113, name: "eth0")                 // µs (default resolution)
            b.addInterface(linkType: 239, name: "nf:OUTPUT", tsresol: 9) // ns
            b.addInterface(linkType: 1, name: "lo", tsresol: 0x80 | 20)  // 2^-20 s
            b.addPacket(interface: 0, units: 1_700_000_000_123_456, Frame.sll(packetType: 4, proto: 0x0800, payload: tcp))
            let tlvs = Frame.attr(1, Frame.be16(0x0800) + [3, 0], order) + Frame.attr(2, Frame.be32(0x539), order)
                + Frame.attr(10, Frame.cString("mt:4:nat:ISTIO_OUTPUT:2:abcd"), order) + Frame.attr(9, tcp, order)
            b.addPacket(interface: 1, units: 1_700_000_000_123_456_789, Frame.nflog(group: 3, tlvs))
            b.addPacket(interface: 2, units: (1_700_000_001 << 20) | (1 << 19), Frame.ethernet(type: 0x0800, payload: tcp))
            let name = "mixed-\(order).pcapng"
            let c = try DecodedCapture(try b.write(dir, name))
            XCTAssertNil(c.damage, "\(order)")
            XCTAssertEqual(c.records.count, 3)
            XCTAssertEqual(c.records.map(\.point.description), ["eth0", "nf:OUTPUT", "lo"])
            XCTAssertEqual(c.records.map(\.time), [Timestamp(seconds: 1_700_000_000, nanoseconds: 123_456_000),
                                                   Timestamp(seconds: 1_700_000_000, nanoseconds: 123_456_789),
                                                   Timestamp(seconds: 1_700_000_001, nanoseconds: 500_000_000)])
            XCTAssertTrue(c.records.allSatisfy { $0.tuple.description == "tcp 10.0.0.5:40000 > 10.96.0.10:80" && $0.notes.isEmpty },
                          c.records.map { "\($0.tuple) \($0.notes.descriptions)" }.joined(separator: "; "))
            XCTAssertEqual(c.records[1].nflog?.mark, 0x539)
            XCTAssertEqual(c.prefix(c.records[1]), "mt:4:nat:ISTIO_OUTPUT:2:abcd")
            XCTAssertEqual(c.records[0].direction, .outbound)
            XCTAssertTrue(c.records[2].point.isLoopback)
            if Tshark.available {
                let rows = try Tshark.fields(dir.appendingPathComponent(name).path,
                                             ["frame.time_epoch", "frame.interface_name", "ip.src", "tcp.dstport"])
                XCTAssertEqual(rows.map { $0["frame.interface_name"]! }, ["eth0", "nf:OUTPUT", "lo"])
                XCTAssertEqual(rows.map { Tshark.epoch($0["frame.time_epoch"]!) }, c.records.map(\.time))
            }
        }
    }

    func testMergecapOfTwoLinkTypesReadsLikeTheFilesItCameFrom() throws {
        try XCTSkipUnless(Command.which("mergecap") != nil, "mergecap not installed")
        let nflog = ReferenceCaptures.path("tcpdump-tests-nflog.pcap")
        let sll = ReferenceCaptures.path("tcpdump-tests-tcp-handshake-nano.pcap")
        let mixed = dir.appendingPathComponent("mixed.pcapng").path
        let r = try Command.run(["mergecap", "-F", "pcapng", "-w", mixed, nflog, sll])
        XCTAssertTrue(r.ok, r.stderr)
        // libpcap 1.10 stops at the second interface; meshtrace reads all of it.
        let c = try DecodedCapture(mixed)
        XCTAssertNil(c.damage)
        let a = try DecodedCapture(nflog), b = try DecodedCapture(sll)
        XCTAssertEqual(c.records.count, a.records.count + b.records.count)
        for original in a.records + b.records {
            XCTAssertTrue(c.records.contains { $0.time == original.time && $0.tuple == original.tuple && $0.nflog == original.nflog
                && $0.tcpFlags == original.tcpFlags && $0.direction == original.direction }, "\(original.tuple) at \(original.time)")
        }
        XCTAssertEqual(Set(c.records.compactMap { $0.nflog?.group }), [20])
    }

    /// `cat nflog.pcapng any.pcapng` is one valid pcapng file of two sections, and each section numbers its
    /// interfaces from 0: a packet of the second section is on the second section's interface 0, not the first's.
    func testConcatenatedSectionsNameEachPacketsOwnInterface() throws {
        for order in [ByteOrder.little, .big] {
            var first = PcapngFileBuilder(order: order)
            first.addInterface(linkType: 239, name: "nflog:5")
            let tlvs = Frame.attr(1, Frame.be16(0x0800) + [3, 0], order) + Frame.attr(9, tcp, order)
            first.addPacket(interface: 0, units: 1_700_000_000_000_001, Frame.nflog(group: 5, tlvs))
            var second = PcapngFileBuilder(order: order)
            second.addInterface(linkType: 1, name: "eth0")
            second.addInterface(linkType: 1, name: "lo")
            second.addPacket(interface: 0, units: 1_700_000_000_000_002, Frame.ethernet(type: 0x0800, payload: tcp))
            second.addPacket(interface: 1, units: 1_700_000_000_000_003, Frame.ethernet(type: 0x0800, payload: tcp))
            var both = first
            both.addRaw(second.bytes)
            let c = try DecodedCapture(try both.write(dir, "sections-\(order).pcapng"))
            XCTAssertNil(c.damage, "\(order)")
            XCTAssertEqual(c.records.map(\.point.description), ["nf:OUTPUT", "eth0", "lo"], "\(order)")
            XCTAssertEqual(c.records.map { $0.nflog != nil }, [true, false, false], "\(order)")
            XCTAssertTrue(c.records.allSatisfy { $0.tuple.description == "tcp 10.0.0.5:40000 > 10.96.0.10:80" },
                          c.records.map { "\($0.tuple) \($0.notes.descriptions)" }.joined(separator: "; "))
        }
    }

    func testAFirstInterfaceOfAnotherLinkTypeDoesNotRefuseTheFile() throws {
        // mergecap of an 802.15.4 capture and an -i any one: refused as "link type 195 is not supported" when the
        // 802.15.4 interface came first, read when it came second. Now read either way: the other interface's
        // packets are noted as not decodable.
        let user = [UInt8](repeating: 0x55, count: 30)
        for userFirst in [true, false] {
            var b = PcapngFileBuilder()
            b.addInterface(linkType: userFirst ? 147 : 113, name: userFirst ? "usb0" : "any")
            b.addInterface(linkType: userFirst ? 113 : 147, name: userFirst ? "any" : "usb0")
            let sll = Frame.sll(packetType: 4, proto: 0x0800, payload: tcp)
            b.addPacket(interface: userFirst ? 0 : 1, units: 1, user)
            b.addPacket(interface: userFirst ? 1 : 0, units: 2, sll)
            let c = try DecodedCapture(try b.write(dir, "mixed-\(userFirst).pcapng"))
            XCTAssertNil(c.damage)
            XCTAssertEqual(c.records.map(\.point.description), ["usb0", "any"], "user first: \(userFirst)")
            XCTAssertEqual(c.records[0].notes, [.unknownLinkPayload])
            XCTAssertEqual(c.records[1].tuple.description, "tcp 10.0.0.5:40000 > 10.96.0.10:80")
            XCTAssertEqual(c.records[1].direction, .outbound)
        }
        // Only interfaces meshtrace does not decode: still refused, naming the first.
        var none = PcapngFileBuilder()
        none.addInterface(linkType: 147, name: "u0")
        none.addInterface(linkType: 195, name: "w0")
        none.addPacket(interface: 0, units: 1, user)
        let e = openError(none.bytes, "none.pcapng")
        XCTAssertEqual(e?.code, .badInput)
        XCTAssertTrue(e?.message.contains("link type 147") ?? false, e?.message ?? "")
    }

    func testDamagedPcapngBlocks() throws {
        var good = PcapngFileBuilder()
        good.addInterface(linkType: 101, name: "raw0")
        good.addPacket(interface: 0, units: 1, tcp)
        good.addPacket(interface: 0, units: 2, tcp)
        let base = good.bytes

        func read(_ bytes: [UInt8], _ name: String) throws -> DecodedCapture {
            let url = dir.appendingPathComponent(name)
            try Data(bytes).write(to: url)
            return try DecodedCapture(url.path)
        }
        // Cut inside the last block.
        let cut = try read(Array(base.dropLast(7)), "cut.pcapng")
        XCTAssertEqual(cut.records.count, 1)
        XCTAssertEqual(cut.damage?.code, .damagedInput)
        // A block claiming 2 GiB.
        var huge = good
        huge.addRaw(good.u32(6) + good.u32(0x7fff_fff0) + [UInt8](repeating: 0, count: 32))
        let h = try read(huge.bytes, "huge.pcapng")
        XCTAssertEqual(h.records.count, 2)
        XCTAssertTrue(h.damage?.message.contains("bad block length") ?? false, h.damage?.message ?? "")
        // A section describing more interfaces than anyone has (each would cost memory for the rest of it): damage
        // at the first one past the limit, after the packets before it.
        var crowded = good
        for i in 0..<PcapngFileReader.maxInterfaces { crowded.addInterface(linkType: 101, name: "if\(i)") }
        crowded.addPacket(interface: 1, units: 3, tcp)
        let crowd = try read(crowded.bytes, "crowded.pcapng")
        XCTAssertEqual(crowd.records.count, 2)
        XCTAssertTrue(crowd.damage?.message.contains("more than 65536 interfaces described in one section") ?? false,
                      crowd.damage?.message ?? "")
        // A packet naming an interface that was never described.
        var ghost = good
        ghost.addPacket(interface: 5, units: 3, tcp)
        let g = try read(ghost.bytes, "ghost.pcapng")
        XCTAssertEqual(g.records.count, 2)
        XCTAssertTrue(g.damage?.message.contains("interface 5") ?? false, g.damage?.message ?? "")
        // Trailing length that disagrees with the leading one.
        var mismatch = base
        mismatch[mismatch.count - 1] ^= 0x10
        mismatch[mismatch.count - 4] ^= 0x10
        let m = try read(mismatch, "mismatch.pcapng")
        XCTAssertEqual(m.records.count, 1)
        XCTAssertNotNil(m.damage)
        // Captured length beyond the block.
        var lying = good
        lying.addRaw(lying.block(6, lying.u32(0) + lying.u32(0) + lying.u32(9) + lying.u32(5000) + lying.u32(5000) + tcp))
        XCTAssertNotNil(try read(lying.bytes, "lying.pcapng").damage)

        // Not usable at all: bad byte-order magic, section header cut short, no interface, unsupported link type.
        var badMagic = base
        badMagic[8] = 0x99
        XCTAssertEqual(openError(badMagic, "bom.pcapng")?.code, .badInput)
        XCTAssertEqual(openError(Array(base.prefix(10)), "short.pcapng")?.code, .badInput)
        XCTAssertEqual(openError(PcapngFileBuilder().bytes, "noif.pcapng")?.code, .badInput)
        var user = PcapngFileBuilder()
        user.addInterface(linkType: 147, name: "u")
        let e = openError(user.bytes, "user.pcapng")
        XCTAssertEqual(e?.code, .badInput)
        XCTAssertTrue(e?.message.contains("link type 147") ?? false, e?.message ?? "")

        // The interface block itself damaged: nothing to analyse, and the error says where it broke (it gave the
        // bare "block 2 trailing length does not match its length 32" before).
        var badIDB = PcapngFileBuilder()
        badIDB.addInterface(linkType: 101, name: "raw0")
        var idbBytes = badIDB.bytes
        idbBytes[idbBytes.count - 4] ^= 0x40
        let ie = openError(idbBytes + Array(base.dropFirst(badIDB.bytes.count)), "bad-idb.pcapng")
        XCTAssertEqual(ie?.code, .badInput)
        XCTAssertTrue(ie?.message.contains("damaged before its first interface description, nothing to analyse (block 2 trailing length") ?? false,
                      ie?.message ?? "")

        // A version other than 1.0 (or libpcap's 1.2): libpcap's pcapng-invalid-vers-1/2.pcapng (0.1, 1.1) were
        // read as 1.0. Unusable in the first section; damage in a later one, after what came before.
        for (major, minor) in [(0, 1), (1, 1), (2, 0)] {
            var other = base
            other.replaceSubrange(12..<16, with: good.u16(major) + good.u16(minor))
            let v = openError(other, "v\(major).\(minor).pcapng")
            XCTAssertEqual(v?.code, .badInput)
            XCTAssertTrue(v?.message.contains("unsupported pcapng version \(major).\(minor)") ?? false, v?.message ?? "")
            var later = good
            later.addRaw(Array(other.prefix(28)))
            let l = try read(later.bytes, "later-v\(major).\(minor).pcapng")
            XCTAssertEqual(l.records.count, 2)
            XCTAssertEqual(l.damage?.code, .damagedInput)
            XCTAssertTrue(l.damage?.message.contains("unsupported pcapng version \(major).\(minor) in section 2") ?? false,
                          l.damage?.message ?? "")
        }
        var v12 = base
        v12.replaceSubrange(14..<16, with: good.u16(2))
        XCTAssertEqual(try read(v12, "v1.2.pcapng").records.count, 2)

        // Random corruption of a valid file: records or damage, never a crash or a hang.
        var rng = SeededGenerator(seed: 99)
        for i in 0..<300 {
            var bytes = base
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            }
            let url = dir.appendingPathComponent("fuzz.pcapng")
            try Data(bytes).write(to: url)
            if let source = try? PcapFileSource(path: url.path, tags: RuleTagTable()) {
                var r = PacketRecord()
                var n = 0
                while source.next(into: &r) != nil && n < 10 { n += 1 }
                XCTAssertLessThanOrEqual(n, 2, "iteration \(i)")
            }
        }
    }

    private func openError(_ bytes: [UInt8], _ name: String) -> MeshtraceError? {
        let url = dir.appendingPathComponent(name)
        try? Data(bytes).write(to: url)
        do {
            _ = try PcapFileSource(path: url.path, tags: RuleTagTable())
            return nil
        } catch {
            return error as? MeshtraceError
        }
    }
}
