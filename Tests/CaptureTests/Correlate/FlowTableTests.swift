import XCTest
@testable import Capture

/// The correlator's open-addressing table against `Dictionary`, through random inserts, updates and removals
/// (backward-shift deletion is where such tables break), with keys crowded into few addresses and ports.
final class FlowTableTests: XCTestCase {
    func testAgreesWithDictionaryThroughRandomInsertsAndRemovals() {
        var rng = SystemRandomNumberGenerator()
        let table = FlowTable<FlowKey>(capacity: 16)
        var reference: [FlowKey: ConnectionState] = [:]
        let states = (0..<64).map { ConnectionState(id: ConnectionID($0), tuple: FiveTuple(proto: 6, src: Endpoint(.none, 0), dst: Endpoint(.none, 0)),
                                                    initiator: Endpoint(.none, 0), responder: Endpoint(.none, 0)) }
        func key() -> FlowKey {
            let a = Endpoint(IPAddress(v4: 0x0a00_0001 + UInt32.random(in: 0..<3, using: &rng)), UInt16.random(in: 40000..<40040, using: &rng))
            let b = Endpoint(Bool.random(using: &rng) ? IPAddress(v4: 0x7f00_0001) : IPAddress(v6: 0xfd00, UInt64.random(in: 1..<3, using: &rng)),
                             UInt16.random(in: 80..<83, using: &rng))
            return FlowKey(FiveTuple(proto: Bool.random(using: &rng) ? 6 : 17, src: a, dst: b))
        }
        for step in 0..<200_000 {
            let k = key()
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<5:
                let s = states[Int.random(in: 0..<states.count, using: &rng)]
                table[k] = s; reference[k] = s
            case 5..<9:
                table[k] = nil; reference[k] = nil
            default:
                XCTAssertTrue(table[k] === reference[k], "lookup at step \(step)")
            }
            if step % 10_000 == 0 {
                XCTAssertEqual(table.count, reference.count, "count at step \(step)")
                for (rk, rv) in reference { XCTAssertTrue(table[rk] === rv, "member at step \(step)") }
            }
        }
        XCTAssertEqual(table.count, reference.count)
        for (rk, rv) in reference { XCTAssertTrue(table[rk] === rv) }
        // The reversed tuple is the same flow.
        let t = FiveTuple(proto: 6, src: Endpoint(IPAddress(v4: 1), 1), dst: Endpoint(IPAddress(v4: 2), 2))
        table[FlowKey(t)] = states[0]
        XCTAssertTrue(table[FlowKey(t.reversed)] === states[0])
    }
}
