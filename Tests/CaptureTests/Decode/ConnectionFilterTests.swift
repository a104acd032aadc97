import XCTest
@testable import Capture

/// `--filter`'s per-packet test, on bytes built here and decoded as the sources decode them (`PacketDecoder` with a
/// selector): an IPv4 and an IPv6 TCP packet, as the IP packet of an NFLOG event (attributes in host order, as read
/// live, or in a file's other order) and behind a LINUX_SLL header (the `any` capture).
final class ConnectionFilterTests: XCTestCase {
    static func ipv4TCP(src: [UInt8], dst: [UInt8], sport: UInt16, dport: UInt16) -> [UInt8] {
        var ip: [UInt8] = [0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0] + src + dst
        ip += [UInt8(sport >> 8), UInt8(sport & 0xff), UInt8(dport >> 8), UInt8(dport & 0xff)]
        ip += [0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]
        return ip
    }

    static func ipv6TCP(dport: UInt16) -> [UInt8] {
        var ip: [UInt8] = [0x60, 0, 0, 0, 0, 20, 6, 64]
        ip += [UInt8](repeating: 0, count: 15) + [1]                    // ::1
        ip += [0xfd, 0] + [UInt8](repeating: 0, count: 13) + [2]        // fd00::2
        ip += [0x9c, 0x40, UInt8(dport >> 8), UInt8(dport & 0xff), 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]
        return ip
    }

    /// NFULA_PACKET_HDR and, when given, NFULA_PAYLOAD, each padded to 4 bytes; the attribute headers in `order`.
    static func nflogAttributes(payload: [UInt8]?, order: ByteOrder = .host) -> [UInt8] {
        func tlv(_ type: UInt16, _ value: [UInt8]) -> [UInt8] {
            let length = UInt16(4 + value.count)
            func word(_ v: UInt16) -> [UInt8] { order == .big ? [UInt8(v >> 8), UInt8(v & 0xff)] : [UInt8(v & 0xff), UInt8(v >> 8)] }
            var out = word(length) + word(type) + value
            while out.count % 4 != 0 { out.append(0) }
            return out
        }
        var out = tlv(1, [0x08, 0x00, 3, 0])
        out += tlv(10, Array("mt:4:nat:OUTPUT:1:-\0".utf8))
        if let payload { out += tlv(9, payload) }
        return out
    }

    /// LINUX_SLL (v1) header for an outgoing IPv4 packet, then the packet.
    static func sllFrame(_ ip: [UInt8]) -> [UInt8] {
        [0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00] + ip
    }

    /// Whether the live NFLOG message with `payload` selects its connection.
    func matchesNflog(_ expression: String, _ payload: [UInt8]?) throws -> Bool {
        var decoder = PacketDecoder(tags: RuleTagTable())
        decoder.selector = try ConnectionFilter(expression)
        var record = PacketRecord()
        Self.nflogAttributes(payload: payload).withUnsafeBytes {
            decoder.decodeNflogAttributes($0, family: 2, group: 5153, byteOrder: .host, into: &record)
        }
        return record.selected
    }

    /// Whether a captured frame of `linkType` selects its connection (NFLOG frames with their TLVs in `nflogOrder`).
    func selects(_ filter: ConnectionFilter, _ frame: [UInt8], linkType: Int32, wireLength: UInt32? = nil,
                 nflogOrder: ByteOrder = .host) -> Bool {
        var decoder = PacketDecoder(tags: RuleTagTable())
        decoder.selector = filter
        decoder.nflogByteOrder = nflogOrder
        var record = PacketRecord()
        record.selected = false
        frame.withUnsafeBytes { decoder.decode(linkType: linkType, bytes: $0, wireLength: wireLength ?? UInt32(frame.count), into: &record) }
        return record.selected
    }

    func testTheIPPacketOfAnNFLOGEventIsMatched() throws {
        let toService = Self.ipv4TCP(src: [10, 0, 1, 5], dst: [10, 0, 2, 2], sport: 40000, dport: 80)
        XCTAssertTrue(try matchesNflog("tcp port 80", toService))
        XCTAssertTrue(try matchesNflog("host 10.0.2.2 and tcp dst port 80", toService))
        XCTAssertFalse(try matchesNflog("tcp port 81", toService))
        XCTAssertFalse(try matchesNflog("udp", toService))
        XCTAssertFalse(try matchesNflog("host 10.0.2.3", toService))
        // An event that carries no packet selects nothing.
        XCTAssertFalse(try matchesNflog("tcp", nil))
    }

    func testIPv6PacketsAreMatchedByTheirOwnVersion() throws {
        let packet = Self.ipv6TCP(dport: 15008)
        XCTAssertTrue(try matchesNflog("ip6 and tcp dst port 15008", packet))
        XCTAssertTrue(try matchesNflog("host fd00::2", packet))
        XCTAssertFalse(try matchesNflog("ip", packet))
        XCTAssertFalse(try matchesNflog("tcp dst port 80", packet))
    }

    func testCapturedFramesAreMatchedBehindTheirCookedHeader() throws {
        let frame = Self.sllFrame(Self.ipv4TCP(src: [127, 0, 0, 1], dst: [127, 0, 0, 1], sport: 40000, dport: 15001))
        let filter = try ConnectionFilter("tcp dst port 15001")
        XCTAssertTrue(selects(filter, frame, linkType: LinkType.linuxSLL))
        let other = try ConnectionFilter("tcp dst port 15006")
        XCTAssertFalse(selects(other, frame, linkType: LinkType.linuxSLL))
        // `greater` reads the packet's length on the wire, not what was kept of it.
        let long = try ConnectionFilter("greater 1000")
        XCTAssertTrue(selects(long, frame, linkType: LinkType.linuxSLL, wireLength: 1500))
        XCTAssertFalse(selects(long, frame, linkType: LinkType.linuxSLL))
    }

    /// `analyze --filter` reads files of every link type: an NFLOG frame as tcpdump wrote it (nflog_hdr, then the
    /// attributes), also from a machine of the other byte order (pcapng read without libpcap keeps the writer's
    /// order), raw IP under its pcapng LINKTYPE (101, not the DLT), Ethernet.
    func testFramesOfEachLinkTypeAreMatchedByTheirOwnProgram() throws {
        let packet = Self.ipv4TCP(src: [10, 0, 1, 5], dst: [10, 0, 2, 2], sport: 40000, dport: 80)
        let filter = try ConnectionFilter("tcp dst port 80")
        let miss = try ConnectionFilter("tcp dst port 81")
        let nflogFrame: [UInt8] = [2, 0, 0x14, 0x01] + Self.nflogAttributes(payload: packet)
        let ethernet: [UInt8] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x08, 0x00] + packet
        for (frame, linkType) in [(nflogFrame, LinkType.nflog), (packet, LinkType.raw), (packet, LinkType.rawDLT), (ethernet, LinkType.ethernet)] {
            XCTAssertTrue(selects(filter, frame, linkType: linkType), "link type \(linkType)")
            XCTAssertFalse(selects(miss, frame, linkType: linkType), "link type \(linkType)")
        }
        let other: ByteOrder = ByteOrder.host == .little ? .big : .little
        let foreign: [UInt8] = [2, 0, 0x14, 0x01] + Self.nflogAttributes(payload: packet, order: other)
        XCTAssertTrue(selects(filter, foreign, linkType: LinkType.nflog, nflogOrder: other), "an NFLOG frame in the other byte order")
        XCTAssertFalse(selects(miss, foreign, linkType: LinkType.nflog, nflogOrder: other))
        // The same filter object across link types in turn (it keeps the last one's program at hand).
        XCTAssertTrue(selects(filter, packet, linkType: LinkType.raw, wireLength: 40))
        XCTAssertFalse(selects(filter, Array(nflogFrame.prefix(3)), linkType: LinkType.nflog, wireLength: 3))
        // Without a selector every record is selected, whatever the slot held before.
        XCTAssertTrue(selects(try ConnectionFilter("tcp"), packet, linkType: LinkType.raw))
        var decoder = PacketDecoder(tags: RuleTagTable())
        var stale = PacketRecord()
        stale.selected = false
        packet.withUnsafeBytes { decoder.decode(linkType: LinkType.raw, bytes: $0, wireLength: 40, into: &stale) }
        XCTAssertTrue(stale.selected)
    }

    func testABadExpressionIsAUsageError() {
        XCTAssertThrowsError(try ConnectionFilter("tcp port")) { error in
            XCTAssertEqual((error as? MeshtraceError)?.code, .usage)
            XCTAssertTrue("\(error)".contains("bad filter 'tcp port'"), "\(error)")
        }
    }
}
