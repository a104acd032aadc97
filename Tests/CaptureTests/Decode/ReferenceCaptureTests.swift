import Foundation
import XCTest
@testable import Capture

/// The third-party captures in ../shared/reference/captures, decoded by meshtrace and by tcpdump/tshark.
final class ReferenceCaptureTests: XCTestCase {
    func testNflogCaptureMatchesTcpdump() throws {
        let path = ReferenceCaptures.path("tcpdump-tests-nflog.pcap")
        let capture = try DecodedCapture(path)
        XCTAssertNil(capture.damage)
        XCTAssertEqual(capture.linkType, LinkType.nflog)
        let lines = try Tcpdump.read(path, ["-#", "-n", "-tttt", "-e"])
        // The tcpdump here prints what the tcpdump project expects for this file: a faithful second decoder.
        let expected = try String(contentsOfFile: ReferenceCaptures.path("tcpdump-tests-nflog-e.out"), encoding: .utf8)
        XCTAssertEqual(lines, expected.split(separator: "\n").map(String.init))
        XCTAssertEqual(capture.records.count, lines.count)
        XCTAssertGreaterThan(lines.count, 0)
        for (record, line) in zip(capture.records, lines) {
            // "    1  2013-09-06 18:31:59.615994 version 0, resource ID 20, family IPv4 (2), length 180: 74.82.42.42.53 > 10.0.0.20.42585: ..."
            let words = line.split(separator: " ").map(String.init)
            XCTAssertEqual(UInt64(words[0]), record.ref.frame, line)
            XCTAssertEqual("\(words[1]) \(words[2])", tcpdumpTime(record.time, digits: 6), line)
            let group = words[words.firstIndex(of: "ID")! + 1].trimmingCharacters(in: CharacterSet(charactersIn: ","))
            XCTAssertEqual(UInt16(group), record.nflog?.group, line)
            let length = words[words.firstIndex(of: "length")! + 1].dropLast()
            XCTAssertEqual(UInt32(length), record.wireLength, line)
            let arrow = words.firstIndex(of: ">")!
            XCTAssertEqual(words[arrow - 1], "\(record.tuple.src.addr).\(record.tuple.src.port)", line)
            XCTAssertEqual(words[arrow + 1], "\(record.tuple.dst.addr).\(record.tuple.dst.port):", line)
            XCTAssertTrue(line.contains("family IPv4 (2)"))
            XCTAssertEqual(record.tuple.src.addr.family, .v4)
        }
    }

    func testNflogCaptureMatchesTshark() throws {
        try XCTSkipUnless(Tshark.available, "tshark not installed")
        let path = ReferenceCaptures.path("tcpdump-tests-nflog.pcap")
        let capture = try DecodedCapture(path)
        let rows = try Tshark.fields(path, ["frame.time_epoch", "frame.len", "nflog.res_id", "nflog.hook", "nflog.family",
                                            "nflog.ifindex_indev", "nflog.prefix", "nflog.timestamp", "nflog.protocol",
                                            "ip.src", "ip.dst", "ip.len", "ip.id", "ip.ttl", "ip.proto",
                                            "udp.srcport", "udp.dstport", "udp.length"])
        XCTAssertEqual(rows.count, capture.records.count)
        for (r, row) in zip(capture.records, rows) {
            let m = try XCTUnwrap(r.nflog)
            XCTAssertEqual(Tshark.epoch(row["frame.time_epoch"]!), r.time)
            XCTAssertEqual(Tshark.int(row["frame.len"]), Int(r.wireLength))
            XCTAssertEqual(Tshark.int(row["nflog.res_id"]), Int(m.group))
            XCTAssertEqual(Tshark.int(row["nflog.hook"]), Int(m.hook.rawValue))
            XCTAssertEqual(m.hook, .input)
            XCTAssertEqual(r.point, .netfilter(.input))
            XCTAssertEqual(r.direction, .inbound)
            XCTAssertEqual(Tshark.int(row["nflog.ifindex_indev"]), m.inputIfindex.map(Int.init))
            XCTAssertNil(m.outputIfindex)
            XCTAssertEqual(row["nflog.prefix"]!, capture.prefix(r))
            XCTAssertEqual(Tshark.int(row["nflog.protocol"]), Int(m.hwProtocol))
            XCTAssertEqual(Tshark.absolute(row["nflog.timestamp"]!), m.kernelTime)
            XCTAssertTrue(m.hadKernelTimestamp)
            XCTAssertEqual(row["ip.src"], r.tuple.src.addr.description)
            XCTAssertEqual(row["ip.dst"], r.tuple.dst.addr.description)
            XCTAssertEqual(Tshark.int(row["ip.len"]), Int(r.ipLength))
            XCTAssertEqual(Tshark.int(row["ip.id"]), Int(r.ipID))
            XCTAssertEqual(Tshark.int(row["ip.ttl"]), Int(r.ttl))
            XCTAssertEqual(Tshark.int(row["ip.proto"]), Int(r.tuple.proto))
            XCTAssertEqual(Tshark.int(row["udp.srcport"]), Int(r.tuple.src.port))
            XCTAssertEqual(Tshark.int(row["udp.dstport"]), Int(r.tuple.dst.port))
            XCTAssertEqual(Tshark.int(row["udp.length"]).map { $0 - 8 }, Int(r.payloadLength))
            XCTAssertEqual(r.notes, [])
        }
    }

    func testNanosecondCookedCaptureMatchesTcpdumpAndTshark() throws {
        let path = ReferenceCaptures.path("tcpdump-tests-tcp-handshake-nano.pcap")
        let capture = try DecodedCapture(path)
        XCTAssertNil(capture.damage)
        XCTAssertEqual(capture.linkType, LinkType.linuxSLL)
        let lines = try Tcpdump.read(path, ["-#", "-n", "-tttt", "-q", "--nano"])
        let expected = try String(contentsOfFile: ReferenceCaptures.path("tcpdump-tests-tcp-handshake-nano-tttt.out"), encoding: .utf8)
        XCTAssertEqual(lines, expected.split(separator: "\n").map(String.init))
        XCTAssertEqual(lines.count, capture.records.count)
        for (r, line) in zip(capture.records, lines) {
            // "    1  2014-12-09 17:16:09.924505488 IP 131.155.215.69.46656 > 137.116.81.94.80: tcp 0"
            let words = line.split(separator: " ").map(String.init)
            XCTAssertEqual("\(words[1]) \(words[2])", tcpdumpTime(r.time, digits: 9), line)
            XCTAssertEqual(words[4], "\(r.tuple.src.addr).\(r.tuple.src.port)")
            XCTAssertEqual(words[6], "\(r.tuple.dst.addr).\(r.tuple.dst.port):")
            XCTAssertEqual(UInt32(words[8]), r.payloadLength)
            XCTAssertEqual(r.point.interface, "any")
        }
        try XCTSkipUnless(Tshark.available, "tshark not installed")
        let rows = try Tshark.fields(path, ["frame.time_epoch", "sll.pkttype", "sll.hatype", "tcp.flags", "tcp.seq_raw",
                                            "tcp.ack_raw", "tcp.len", "ip.id", "ip.len"])
        XCTAssertEqual(rows.count, capture.records.count)
        for (r, row) in zip(capture.records, rows) {
            XCTAssertEqual(Tshark.epoch(row["frame.time_epoch"]!), r.time)
            XCTAssertEqual(Tshark.int(row["sll.pkttype"]) == 4 ? PacketDirection.outbound : .inbound, r.direction)
            XCTAssertEqual(Tshark.int(row["tcp.flags"]).map { UInt8($0 & 0x3f) }, r.tcpFlags.rawValue)
            XCTAssertEqual(Tshark.int(row["tcp.seq_raw"]), Int(r.tcpSeq))
            XCTAssertEqual(Tshark.int(row["tcp.ack_raw"]), Int(r.tcpAck))
            XCTAssertEqual(Tshark.int(row["tcp.len"]), Int(r.payloadLength))
            XCTAssertEqual(Tshark.int(row["ip.id"]), Int(r.ipID))
            XCTAssertEqual(Tshark.int(row["ip.len"]), Int(r.ipLength))
            XCTAssertFalse(r.point.isLoopback)
        }
    }
}
