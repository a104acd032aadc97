import Foundation
import XCTest
@testable import Capture

/// An ICMP error quotes the packet it reports on (RFC 792, RFC 4443); meshtrace reads the quoted tuple so the
/// correlator can put the error on that packet's connection. Frames written byte by byte, decoded by meshtrace
/// and by tshark (the quoted header is the last occurrence of each field).
final class IcmpQuoteTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws { dir = try makeTemporaryDirectory() }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    /// An ICMP(v6) error: type, code, checksum (left 0), the 4-byte rest of the header, the quote.
    private func error(_ type: UInt8, _ code: UInt8, rest: [UInt8] = [0, 0, 0, 0], quoting quote: [UInt8]) -> [UInt8] {
        [type, code, 0, 0] + rest + quote
    }

    private let udpOut = Frame.ipv4(src: "10.0.0.5", dst: "10.0.9.9", proto: 17, payload: Frame.udp(sport: 40000, dport: 9998, payload: 5))
    private let tcpWithOptions = Frame.ipv4(src: "10.0.0.5", dst: "10.0.2.2", proto: 6, options: [1, 1, 1, 0],
                                            payload: Frame.tcp(sport: 41000, dport: 15008, seq: 7, ack: 0, flags: 0x18, payload: 1400))
    private let echo = Frame.ipv4(src: "10.0.0.5", dst: "192.0.2.7", proto: 1, ttl: 1, payload: Frame.icmpEcho(type: 8, id: 0x77, seq: 3))
    /// A hop-by-hop options header (8 bytes, PadN) before UDP.
    private let udp6WithHopByHop = Frame.ipv6(src: "fd00::5", dst: "fd00::a", next: 0,
                                              payload: [17, 0, 1, 4, 0, 0, 0, 0] + Frame.udp(sport: 1000, dport: 2000, payload: 3))
    private let tcp6 = Frame.ipv6(src: "fd00::5", dst: "fd00::a", next: 6, payload: Frame.tcp(sport: 41000, dport: 15008, seq: 1, ack: 1, flags: 0x10, payload: 1300))

    /// (frame, the quoted tuple meshtrace must read, or nil for none)
    private var cases: [([UInt8], FiveTuple?)] {
        let ep = PacketFactory.ep
        return [
            // Port unreachable from the peer: the header and 8 bytes of the datagram, as RFC 792 asks at least.
            (Frame.ipv4(src: "10.0.9.9", dst: "10.0.0.5", proto: 1, payload: error(3, 3, quoting: Array(udpOut.prefix(28)))),
             FiveTuple(proto: 17, src: ep("10.0.0.5", 40000), dst: ep("10.0.9.9", 9998))),
            // Fragmentation needed (MTU 1400 in the rest) from a router, the quoted header with options, quoted whole.
            (Frame.ipv4(src: "10.0.0.1", dst: "10.0.0.5", proto: 1, payload: error(3, 4, rest: [0, 0] + Frame.be16(1400), quoting: tcpWithOptions)),
             FiveTuple(proto: 6, src: ep("10.0.0.5", 41000), dst: ep("10.0.2.2", 15008))),
            // Time exceeded about an echo request: keyed like the echo (type << 8, identifier).
            (Frame.ipv4(src: "10.0.0.1", dst: "10.0.0.5", proto: 1, payload: error(11, 0, quoting: echo)),
             FiveTuple(proto: 1, src: ep("10.0.0.5", 8 << 8), dst: ep("192.0.2.7", 0x77))),
            // ICMPv6 port unreachable quoting a datagram with a hop-by-hop header.
            (Frame.ipv6(src: "fd00::a", dst: "fd00::5", next: 58, payload: error(1, 4, quoting: udp6WithHopByHop)),
             FiveTuple(proto: 17, src: ep("fd00::5", 1000), dst: ep("fd00::a", 2000))),
            // Packet too big (MTU 1280), quoting the first 1232 bytes as RFC 4443 does.
            (Frame.ipv6(src: "fd00::1", dst: "fd00::5", next: 58, payload: error(2, 0, rest: Frame.be32(1280), quoting: Array(tcp6.prefix(1232)))),
             FiveTuple(proto: 6, src: ep("fd00::5", 41000), dst: ep("fd00::a", 15008))),
            // A quote cut inside its IP header: no quoted tuple, and no damage to the error itself.
            (Frame.ipv4(src: "10.0.9.9", dst: "10.0.0.5", proto: 1, payload: error(3, 3, quoting: Array(udpOut.prefix(12)))), nil),
            // A quote cut before the ports.
            (Frame.ipv4(src: "10.0.9.9", dst: "10.0.0.5", proto: 1, payload: error(3, 3, quoting: Array(udpOut.prefix(22)))), nil),
            // A non-first fragment carries no ports.
            (Frame.ipv4(src: "10.0.9.9", dst: "10.0.0.5", proto: 1,
                        payload: error(3, 1, quoting: Frame.ipv4(src: "10.0.0.5", dst: "10.0.9.9", proto: 17, fragmentOffset: 185, payload: [UInt8](repeating: 0, count: 16)))), nil),
            // An IPv4 error quoting an IPv6 header is no quote of this packet's family.
            (Frame.ipv4(src: "10.0.9.9", dst: "10.0.0.5", proto: 1, payload: error(3, 3, quoting: Array(tcp6.prefix(60)))), nil),
            // Echoes quote nothing.
            (Frame.ipv4(src: "10.0.0.5", dst: "10.0.0.1", proto: 1, payload: Frame.icmpEcho(type: 8, id: 0x77, seq: 1)), nil),
            // An error about an error names no connection (and the inner one's quote is not followed).
            (Frame.ipv4(src: "10.0.0.1", dst: "10.0.9.9", proto: 1,
                        payload: error(11, 0, quoting: Frame.ipv4(src: "10.0.9.9", dst: "10.0.0.5", proto: 1, payload: error(3, 3, quoting: udpOut)))), nil),
        ]
    }

    func testErrorsQuoteThePacketTheyReportOn() throws {
        var b = PcapFileBuilder(linkType: 101)
        for (frame, _) in cases { b.add(frame) }
        let path = try b.write(dir, "icmp-errors.pcap")
        let c = try DecodedCapture(path)
        XCTAssertNil(c.damage)
        XCTAssertEqual(c.records.count, cases.count)
        for (i, (r, (_, expected))) in zip(c.records, cases).enumerated() {
            XCTAssertEqual(r.hasQuoted, expected != nil, "case \(i)")
            if let expected { XCTAssertEqual(r.quoted, expected, "case \(i)") }
            XCTAssertEqual(r.notes.subtracting([.ipOptions, .ipv6ExtensionHeaders]), [], "case \(i): \(r.notes.descriptions)")
        }
        XCTAssertEqual(c.records.map(\.icmpType), [3, 3, 11, 1, 2, 3, 3, 3, 3, 8, 11])

        // tshark's reading of the same frames: the quoted header's fields are the last occurrence of each.
        try XCTSkipUnless(Tshark.available, "tshark not installed")
        let rows = try Tshark.fields(path, ["ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "udp.srcport", "udp.dstport",
                                            "tcp.srcport", "tcp.dstport", "icmp.ident"], occurrence: "l")
        XCTAssertEqual(rows.count, cases.count)
        for (i, (r, row)) in zip(c.records, rows).enumerated() where r.hasQuoted {
            let q = r.quoted
            let v6 = q.src.addr.family == .v6
            XCTAssertEqual(row[v6 ? "ipv6.src" : "ip.src"], q.src.addr.description, "case \(i)")
            XCTAssertEqual(row[v6 ? "ipv6.dst" : "ip.dst"], q.dst.addr.description, "case \(i)")
            switch q.proto {
            case IPProto.udp:
                XCTAssertEqual(Tshark.int(row["udp.srcport"]), Int(q.src.port), "case \(i)")
                XCTAssertEqual(Tshark.int(row["udp.dstport"]), Int(q.dst.port), "case \(i)")
            case IPProto.tcp:
                XCTAssertEqual(Tshark.int(row["tcp.srcport"]), Int(q.src.port), "case \(i)")
                XCTAssertEqual(Tshark.int(row["tcp.dstport"]), Int(q.dst.port), "case \(i)")
            case IPProto.icmp:
                XCTAssertEqual(Tshark.int(row["icmp.ident"]), Int(q.dst.port), "case \(i)")
            default:
                XCTFail("case \(i): quoted protocol \(q.proto)")
            }
        }
    }

    func testMessagesAreNamedAsTcpdumpsReadersKnowThem() {
        XCTAssertEqual(IcmpMessage.name(proto: IPProto.icmp, type: 3, code: 3), "port unreachable")
        XCTAssertEqual(IcmpMessage.name(proto: IPProto.icmp, type: 3, code: 4), "fragmentation needed")
        XCTAssertEqual(IcmpMessage.name(proto: IPProto.icmpv6, type: 1, code: 4), "port unreachable")
        XCTAssertEqual(IcmpMessage.name(proto: IPProto.icmpv6, type: 2, code: 0), "packet too big")
        XCTAssertEqual(IcmpMessage.name(proto: IPProto.icmp, type: 42, code: 1), "type 42 code 1")
        XCTAssertTrue(IcmpMessage.isError(proto: IPProto.icmp, type: 11))
        XCTAssertFalse(IcmpMessage.isError(proto: IPProto.icmp, type: 8))
        XCTAssertFalse(IcmpMessage.isError(proto: IPProto.icmpv6, type: 135))
    }
}
