import XCTest
@testable import Capture

/// The live tracer's cache of NATed conntrack entries (ctnetlink NEW events), checked against a plain model.
final class ConntrackTableTests: XCTestCase {
    private func tuple(_ i: Int, proto: UInt8 = IPProto.tcp) -> FiveTuple {
        FiveTuple(proto: proto, src: Endpoint(IPAddress(v4: 0x0AF4_0000 | UInt32(i & 0xffff)), UInt16(truncatingIfNeeded: 30000 + i)),
                  dst: Endpoint(IPAddress(v4: 0x0AF4_0200 | UInt32(i % 7)), 80))
    }

    private func info(_ i: Int) -> ConntrackInfo {
        let t = tuple(i)
        return ConntrackInfo(original: t, reply: FiveTuple(proto: t.proto, src: Endpoint(IPAddress(v4: 0x7F00_0001), 15001), dst: t.src),
                             id: UInt32(i))
    }

    /// Room for everything: every key is found with exactly what was remembered last for it.
    func testEveryKeyIsFoundWhileThereIsRoom() {
        let table = ConntrackTable(capacity: 4096)
        XCTAssertTrue(table.isEmpty)
        for i in 0..<500 { table.remember(tuple(i), info(i)) }
        // A key remembered again replaces its entry instead of taking a second slot.
        for i in 0..<500 where i % 5 == 0 { table.remember(tuple(i), info(i + 10_000)) }
        var found = 0
        for i in 0..<500 {
            guard let got = table.lookup(tuple(i)) else { continue }
            found += 1
            XCTAssertEqual(got.id, UInt32(i % 5 == 0 ? i + 10_000 : i))
        }
        // 500 keys in 4096 slots of 4 ways: a set overflowing is possible but rare.
        XCTAssertGreaterThan(found, 490)
        XCTAssertNil(table.lookup(tuple(9_999)))
        XCTAssertNil(table.lookup(tuple(3, proto: IPProto.udp)), "the protocol is part of the key")
    }

    /// Far more keys than room: the table stays bounded, never answers with another key's entry, and the
    /// newest keys are the ones kept.
    func testOldestEntriesAreForgottenFirst() {
        let table = ConntrackTable(capacity: 256)
        let total = 20_000
        for i in 0..<total {
            table.remember(tuple(i), info(i))
            XCTAssertEqual(table.lookup(tuple(i))?.id, UInt32(i), "the key just remembered is there")
        }
        var recent = 0, old = 0
        for i in 0..<total {
            guard let got = table.lookup(tuple(i)) else { continue }
            XCTAssertEqual(got.id, UInt32(i), "an entry found is the one remembered for that key")
            if i >= total - 256 { recent += 1 } else { old += 1 }
        }
        XCTAssertLessThanOrEqual(recent + old, 256)
        XCTAssertGreaterThan(recent, 128, "most of the newest 256 keys are kept")
        XCTAssertLessThan(old, recent)
    }
}
