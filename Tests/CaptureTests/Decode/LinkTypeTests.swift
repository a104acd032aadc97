import Foundation
import XCTest
@testable import Capture

/// Every link type meshtrace reads, in files written byte by byte here (no tool on this machine writes RAW,
/// NULL, LOOP, IPV4/IPV6 or VLAN-tagged frames on demand), decoded by meshtrace and by tshark.
final class LinkTypeTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws { dir = try makeTemporaryDirectory() }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    private var packets: [[UInt8]] {
        [
            Frame.ipv4(src: "10.0.0.5", dst: "10.96.0.10", proto: 6, id: 0x4242,
                       payload: Frame.tcp(sport: 40000, dport: 80, seq: 100, ack: 0, flags: 0x02, options: [2, 4, 5, 180])),
            Frame.ipv4(src: "10.96.0.10", dst: "10.0.0.5", proto: 6, id: 0,
                       payload: Frame.tcp(sport: 80, dport: 40000, seq: 900, ack: 101, flags: 0x12)),
            Frame.ipv4(src: "10.0.0.5", dst: "10.96.0.10", proto: 6, payload: Frame.tcp(sport: 40000, dport: 80, seq: 101, ack: 901, flags: 0x18, payload: 77)),
            Frame.ipv4(src: "10.0.0.5", dst: "8.8.8.8", proto: 17, ttl: 3, payload: Frame.udp(sport: 5353, dport: 53, payload: 30)),
            Frame.ipv4(src: "10.0.0.5", dst: "10.0.0.1", proto: 1, payload: Frame.icmpEcho(type: 8, id: 0x77, seq: 1)),
            Frame.ipv6(src: "fd00::5", dst: "fd00::a", next: 6, payload: Frame.tcp(sport: 41000, dport: 15008, seq: 1, ack: 0, flags: 0x02)),
            Frame.ipv6(src: "fd00::5", dst: "2001:db8::1", next: 17, hopLimit: 9, payload: Frame.udp(sport: 1000, dport: 2000, payload: 3)),
            Frame.ipv6(src: "fd00::a", dst: "fd00::5", next: 58, payload: Frame.icmpEcho(type: 129, id: 0x99, seq: 4)),
        ]
    }

    private func isV6(_ p: [UInt8]) -> Bool { p[0] >> 4 == 6 }

    /// `tcpdump -i eth0` in the pod: Ethernet says no direction, so without NFLOG records the pod's address is not
    /// inferred and an app's uncaptured TCP cannot be told from inbound traffic. The text view says so instead of
    /// a bare "no escapes"; with --pod-ip the escape is found.
    func testAnEthernetCaptureWithoutThePodsAddressSaysEscapesCouldNotBeJudged() throws {
        var b = PcapFileBuilder(linkType: 1)
        for p in packets.prefix(3) { b.add(Frame.ethernet(type: 0x0800, payload: p)) }
        let c = try DecodedCapture(try b.write(dir, "eth0.pcap"))
        let unknown = try renderReport(c.records, tags: c.tags) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(unknown.contains("no escapes"), unknown)
        XCTAssertTrue(unknown.contains("pod address unknown"), unknown)
        XCTAssertTrue(unknown.contains("give --pod-ip"), unknown)
        var options = CorrelatorOptions()
        options.podAddresses = [IPAddress("10.0.0.5")!]
        let known = try renderReport(c.records, tags: c.tags, options: options) { TextReport(fileDescriptor: $0) }
        XCTAssertTrue(known.contains("1 escape,"), known)
        XCTAssertTrue(known.contains("pod address: 10.0.0.5"), known)
        XCTAssertFalse(known.contains("pod address unknown"), known)
    }

    func testCookedCapturesStepOverVLANTags() throws {
        // libpcap puts an offloaded 802.1Q tag back after the LINUX_SLL header (protocol 0x8100, then TCI and the
        // inner EtherType), and the kernel hands a tag it did not strip in the payload: such packets were not IP.
        var decoder = PacketDecoder(tags: RuleTagTable())
        let ip = Frame.ipv4(src: "10.0.0.5", dst: "10.96.0.10", proto: 6, payload: Frame.tcp(sport: 40000, dport: 80, seq: 1, ack: 0, flags: 2))
        let tagged = Frame.be16(0x2064) + Frame.be16(0x0800) + ip
        let sll = decoder.decodeFrame(Frame.sll(packetType: 4, proto: 0x8100, payload: tagged), linkType: LinkType.linuxSLL)
        let sll2 = decoder.decodeFrame(Frame.sll2(proto: 0x88a8, ifindex: 2, packetType: 0,
                                                  payload: Frame.be16(5) + Frame.be16(0x8100) + tagged), linkType: LinkType.linuxSLL2)
        for (name, r) in [("sll", sll), ("sll2 QinQ", sll2)] {
            XCTAssertEqual(r.notes, [], "\(name): \(r.notes.descriptions)")
            XCTAssertEqual(r.tuple.description, "tcp 10.0.0.5:40000 > 10.96.0.10:80", name)
        }
        XCTAssertEqual(sll.direction, .outbound)
        XCTAssertEqual(sll2.ifindex, 2)
        // Cut inside the tag: a truncated link header, as for Ethernet.
        XCTAssertEqual(decoder.decodeFrame(Frame.sll(packetType: 0, proto: 0x8100, payload: [0x20]), linkType: LinkType.linuxSLL).notes, [.truncatedLink])
    }

    func testEveryLinkTypeDecodesLikeTshark() throws {
        try XCTSkipUnless(Tshark.available, "tshark not installed")
        let kinds: [(String, UInt32, ([UInt8], Int) -> [UInt8])] = [
            ("ethernet-vlan", 1, { p, i in Frame.ethernet(type: self.isV6(p) ? 0x86dd : 0x0800, vlan: i % 2 == 0 ? 42 : nil, payload: p) }),
            ("sll", 113, { p, i in Frame.sll(packetType: i % 2 == 0 ? 4 : 0, proto: self.isV6(p) ? 0x86dd : 0x0800, payload: p) }),
            ("sll2", 276, { p, i in Frame.sll2(proto: self.isV6(p) ? 0x86dd : 0x0800, ifindex: UInt32(3 + i % 2), packetType: i % 2 == 0 ? 4 : 0, payload: p) }),
            // A VLAN tag after the cooked header (libpcap reinserts an offloaded one there in LINUX_SLL).
            ("sll-vlan", 113, { p, i in Frame.sll(packetType: i % 2 == 0 ? 4 : 0, proto: 0x8100, payload: Frame.be16(42) + Frame.be16(self.isV6(p) ? 0x86dd : 0x0800) + p) }),
            ("sll2-vlan", 276, { p, i in Frame.sll2(proto: 0x8100, ifindex: 3, packetType: 0, payload: Frame.be16(7) + Frame.be16(self.isV6(p) ? 0x86dd : 0x0800) + p) }),
            ("raw", 101, { p, _ in p }),
            ("null-le", 0, { p, _ in (self.isV6(p) ? [30, 0, 0, 0] : [2, 0, 0, 0]) + p }),
            ("loop", 108, { p, _ in (self.isV6(p) ? [0, 0, 0, 24] : [0, 0, 0, 2]) + p }),
        ]
        for (name, linkType, wrap) in kinds {
            var b = PcapFileBuilder(linkType: linkType, nanosecond: true)
            for (i, p) in packets.enumerated() { b.add(wrap(p, i), seconds: 1_700_000_000 + UInt32(i), fraction: UInt32(i * 1001)) }
            try check(try b.write(dir, "\(name).pcap"), name: name, count: packets.count)
        }
        // IPV4 and IPV6 link types each carry one family.
        var v4 = PcapFileBuilder(linkType: 228), v6 = PcapFileBuilder(linkType: 229)
        for p in packets { if isV6(p) { v6.add(p) } else { v4.add(p) } }
        try check(try v4.write(dir, "ipv4.pcap"), name: "ipv4", count: 5)
        try check(try v6.write(dir, "ipv6.pcap"), name: "ipv6", count: 3)
    }

    private func check(_ path: String, name: String, count: Int) throws {
        let c = try DecodedCapture(path)
        XCTAssertNil(c.damage, name)
        XCTAssertEqual(c.records.count, count, name)
        let rows = try Tshark.fields(path, ["frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst",
                                            "ip.ttl", "ipv6.hlim", "ip.id", "tcp.srcport", "tcp.dstport", "tcp.flags", "tcp.seq_raw",
                                            "tcp.ack_raw", "tcp.len", "udp.srcport", "udp.dstport", "udp.length",
                                            "icmp.type", "icmpv6.type", "icmp.ident", "icmpv6.echo.identifier", "sll.pkttype",
                                            "sll.ifindex", "vlan.id"])
        XCTAssertEqual(rows.count, count, name)
        for (r, row) in zip(c.records, rows) {
            let at = "\(name) frame \(r.ref.frame)"
            XCTAssertEqual(r.notes.subtracting(.ipv6ExtensionHeaders), [], "\(at): \(r.notes.descriptions)")
            XCTAssertEqual(Tshark.epoch(row["frame.time_epoch"]!), r.time, at)
            XCTAssertEqual(Tshark.int(row["frame.len"]), Int(r.wireLength), at)
            let v6 = r.tuple.src.addr.family == .v6
            XCTAssertEqual(row[v6 ? "ipv6.src" : "ip.src"], r.tuple.src.addr.description, at)
            XCTAssertEqual(row[v6 ? "ipv6.dst" : "ip.dst"], r.tuple.dst.addr.description, at)
            XCTAssertEqual(Tshark.int(row[v6 ? "ipv6.hlim" : "ip.ttl"]), Int(r.ttl), at)
            if !v6 { XCTAssertEqual(Tshark.int(row["ip.id"]), Int(r.ipID), at) }
            switch r.tuple.proto {
            case IPProto.tcp:
                XCTAssertEqual(Tshark.int(row["tcp.srcport"]), Int(r.tuple.src.port), at)
                XCTAssertEqual(Tshark.int(row["tcp.dstport"]), Int(r.tuple.dst.port), at)
                XCTAssertEqual(Tshark.int(row["tcp.flags"]), Int(r.tcpFlags.rawValue), at)
                XCTAssertEqual(Tshark.int(row["tcp.seq_raw"]), Int(r.tcpSeq), at)
                XCTAssertEqual(Tshark.int(row["tcp.ack_raw"]), Int(r.tcpAck), at)
                XCTAssertEqual(Tshark.int(row["tcp.len"]), Int(r.payloadLength), at)
            case IPProto.udp:
                XCTAssertEqual(Tshark.int(row["udp.srcport"]), Int(r.tuple.src.port), at)
                XCTAssertEqual(Tshark.int(row["udp.dstport"]), Int(r.tuple.dst.port), at)
                XCTAssertEqual(Tshark.int(row["udp.length"]).map { $0 - 8 }, Int(r.payloadLength), at)
            case IPProto.icmp, IPProto.icmpv6:
                XCTAssertEqual(Tshark.int(row[v6 ? "icmpv6.type" : "icmp.type"]), Int(r.icmpType), at)
                XCTAssertEqual(Tshark.int(row[v6 ? "icmpv6.echo.identifier" : "icmp.ident"]), Int(r.tuple.dst.port), at)
            default:
                XCTFail("\(at): unexpected protocol \(r.tuple.proto)")
            }
            if let pkttype = Tshark.int(row["sll.pkttype"]) {
                XCTAssertEqual(pkttype == 4 ? PacketDirection.outbound : .inbound, r.direction, at)
            }
            if let ifindex = Tshark.int(row["sll.ifindex"]) { XCTAssertEqual(ifindex, Int(r.ifindex), at) }
        }
    }
}
