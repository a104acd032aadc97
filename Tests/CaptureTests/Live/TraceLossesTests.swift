import XCTest
@testable import Capture

/// What a trace lost, counted and said: TRACE steps beside NFLOG events, `--strict` failing on either.
final class TraceLossesTests: XCTestCase {
    func testTraceStepsLostAreTheGapOrAtLeastOnePerOverrunAndFailStrict() {
        var l = TraceLosses()
        XCTAssertFalse(l.any)
        XCTAssertEqual(l.traceStepsLost, 0)
        l.eventSocketOverruns = 2
        XCTAssertEqual(l.traceStepsLost, 2, "an overrun whose gap no later step showed is at least one lost")
        XCTAssertTrue(l.any, "--strict exits 10")
        l.traceStepSequenceGap = 40
        XCTAssertEqual(l.traceStepsLost, 40, "the legacy gap counts exactly")
        XCTAssertEqual(l.nflogEventsLost, 0, "the twins' events are counted apart")
    }

    func testTheSummarySaysTraceStepsLostInTraceModeOnly() {
        var l = TraceLosses()
        l.traceStepSequenceGap = 7
        l.eventSocketOverruns = 1
        XCTAssertTrue(TraceSummaryText.lossLine(l, traceMode: true).hasSuffix(", TRACE steps lost 7 (sequence gaps 7, ENOBUFS 1)"),
                      TraceSummaryText.lossLine(l, traceMode: true))
        XCTAssertFalse(TraceSummaryText.lossLine(TraceLosses(), traceMode: false).contains("TRACE"))
    }
}
