import XCTest
@testable import Capture

/// `NflogMeta.reset()` is how the decoder clears the NFLOG fields of a reused record: it must leave exactly
/// what a fresh `NflogMeta()` holds, for every field there is.
final class NflogMetaTests: XCTestCase {
    func testResetLeavesAFreshValue() {
        var m = NflogMeta()
        m.group = 7; m.hook = .output; m.hwProtocol = 0x0800; m.mark = 0x539; m.prefixID = 3
        m.inputIfindex = 1; m.outputIfindex = 2; m.uid = 1337; m.gid = 1337; m.sequence = 9
        m.hadKernelTimestamp = true
        let t = FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v4: 1), 1), dst: Endpoint(IPAddress(v4: 2), 2))
        m.conntrack = ConntrackInfo(original: t, reply: t.reversed, mark: 0x111)
        m.kernelTime = Timestamp(seconds: 1, nanoseconds: 2); m.globalSequence = 4; m.conntrackState = 2
        m.physInputIfindex = 5; m.physOutputIfindex = 6
        // Every field was set above: a field added to NflogMeta without a line in reset() fails here first.
        XCTAssertEqual(Mirror(reflecting: m).children.count, 18, "NflogMeta has a new field: reset() and this test must clear and set it")
        for (a, b) in zip(Mirror(reflecting: m).children, Mirror(reflecting: NflogMeta()).children) {
            XCTAssertNotEqual("\(a.value)", "\(b.value)", "\(a.label ?? "?") is not set by this test")
        }
        m.reset()
        XCTAssertEqual(m, NflogMeta())
    }

    /// The presence flag the hot paths read instead of the optional follows every way `conntrack` is set.
    func testConntrackPresenceFollowsTheEntry() {
        var m = NflogMeta()
        XCTAssertFalse(m.hasConntrack)
        let t = FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v4: 1), 1), dst: Endpoint(IPAddress(v4: 2), 2))
        m.conntrack = ConntrackInfo(original: t, reply: t.reversed)
        XCTAssertTrue(m.hasConntrack)
        m.conntrack?.mark = 0x111
        XCTAssertTrue(m.hasConntrack)
        XCTAssertEqual(m.conntrack?.mark, 0x111)
        m.conntrack = nil
        XCTAssertFalse(m.hasConntrack)
        m.conntrack = ConntrackInfo(original: t, reply: t.reversed)
        m.reset()
        XCTAssertFalse(m.hasConntrack)
        XCTAssertNil(m.conntrack)
    }
}
