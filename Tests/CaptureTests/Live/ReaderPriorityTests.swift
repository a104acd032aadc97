import XCTest
@testable import Capture
#if canImport(Glibc)
import Glibc
#endif

/// The reading thread's scheduling (`ReaderPriority`), with the real scheduler: it yields (SCHED_IDLE) while it
/// keeps up, the watchdog raises it when it stops finishing passes, and it lowers itself once a pass drains.
final class ReaderPriorityTests: KernelTestCase {
    static let sched_idle: Int32 = 5, sched_other: Int32 = 0, sched_fifo: Int32 = 1

    /// Whether this process may make a thread SCHED_FIFO (CAP_SYS_NICE and real-time runtime in its cgroup),
    /// asked of a scratch thread.
    static func realtimeAllowed() -> Bool {
        // Written by the scratch thread before `signal`, read after `wait`.
        final class Answer: @unchecked Sendable { var allowed = false }
        let answer = Answer()
        let done = DispatchSemaphore(value: 0)
        Thread {
            var param = sched_param(sched_priority: 1)
            answer.allowed = sched_setscheduler(0, sched_fifo, &param) == 0
            done.signal()
        }.start()
        done.wait()
        return answer.allowed
    }

    /// Burns the calling thread's CPU for `nanos` (by its own CPU clock); returns how much it burnt.
    static func spin(_ nanos: UInt64) -> UInt64 {
        let from = StallGate.threadCPU()
        var x: UInt64 = 1
        while StallGate.threadCPU() - from < nanos { for _ in 0..<1000 { x = x &* 6364136223846793005 &+ 1 } }
        withExtendedLifetime(x) {}
        return StallGate.threadCPU() - from
    }

    /// A raise still on when the trace stops: `stop` counts its CPU (the reader never lowered itself).
    func testTheCPUOfARaiseStillOnAtTheStopIsCounted() throws {
        try XCTSkipUnless(Self.realtimeAllowed(), "SCHED_FIFO is refused here: the reader does not yield")
        final class Seen: @unchecked Sendable { var raised = false, spun: UInt64 = 0, counted: UInt64 = 0 }
        let seen = Seen()
        let done = DispatchSemaphore(value: 0)
        Thread {
            defer { done.signal() }
            let p = ReaderPriority()
            p.start()
            p.passFinished(drained: true, at: DispatchTime.now().uptimeNanoseconds)
            let deadline = DispatchTime.now().uptimeNanoseconds + 2_000_000_000
            while !p.isRaised && DispatchTime.now().uptimeNanoseconds < deadline { usleep(2_000) }
            seen.raised = p.isRaised
            seen.spun = Self.spin(5_000_000)
            p.stop()
            seen.counted = p.raisedCPUNanos
        }.start()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertTrue(seen.raised, "the watchdog did not raise a starved reader")
        XCTAssertGreaterThanOrEqual(seen.counted, seen.spun, "a raise still on at the stop was not counted")
        XCTAssertLessThan(seen.counted, seen.spun + 200_000_000)
    }

    func testReaderYieldsIsRaisedWhenStarvedAndLowersItselfOnceDrainedOrAfterItsTime() throws {
        try XCTSkipUnless(Self.realtimeAllowed(), "SCHED_FIFO is refused here: the reader does not yield")
        // Written by the thread below, read here after `done`: the semaphore orders the two.
        final class Seen: @unchecked Sendable { var started: Int32 = -1, nice: Int32 = 0, whileStarved: Int32 = -1, raises = 0
                      var afterUndrained: Int32 = -1, afterDrained: Int32 = -1, raisesAfterDrained = 0
                      var raisedAgain: Int32 = -1, afterLongRaise: Int32 = -1, raisesAfterLongRaise = 0
                      var afterStop: Int32 = -1, raisesAfterStop = 0
                      var raisedCPUBefore: UInt64 = 1, raisedCPUAfterSpin: UInt64 = 0, spun: UInt64 = 0, raisedCPUAtEnd: UInt64 = 0 }
        let seen = Seen()
        let done = DispatchSemaphore(value: 0)
        // A thread of its own: the test's thread keeps its policy whatever happens.
        let thread = Thread {
            defer { done.signal() }
            let p = ReaderPriority()
            func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
            /// No pass finishes: the watchdog must raise the thread (bounded wait).
            func starve() -> Int32 {
                let deadline = now() + 2_000_000_000
                while !p.isRaised && now() < deadline { usleep(2_000) }
                return sched_getscheduler(0)
            }
            p.start()
            seen.started = sched_getscheduler(0)
            errno = 0
            seen.nice = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
            p.passFinished(drained: true, at: now())
            seen.raisedCPUBefore = p.raisedCPUNanos
            seen.whileStarved = starve()
            seen.raises = p.raises
            // CPU used while raised is what the raise cost the node: counted when the reader lowers itself.
            seen.spun = Self.spin(8_000_000)   // within `maxRaisedNanos`: the pass below keeps it raised
            // A pass that stopped at its limit keeps it raised; one that drained lowers it.
            p.passFinished(drained: false, at: now())
            seen.afterUndrained = sched_getscheduler(0)
            p.passFinished(drained: true, at: now())
            seen.afterDrained = sched_getscheduler(0)
            seen.raisedCPUAfterSpin = p.raisedCPUNanos
            seen.raisesAfterDrained = p.raises
            // Raised again, it never drains: after `maxRaisedNanos` it lowers itself all the same.
            seen.raisedAgain = starve()
            usleep(UInt32(ReaderPriority.maxRaisedNanos / 1000) + 5_000)
            p.passFinished(drained: false, at: now())
            seen.afterLongRaise = sched_getscheduler(0)
            seen.raisesAfterLongRaise = p.raises
            p.stop()
            seen.raisedCPUAtEnd = p.raisedCPUNanos
            seen.afterStop = sched_getscheduler(0)
            // The watchdog is gone: a long silence raises nothing any more.
            usleep(UInt32(ReaderPriority.starvedNanos / 1000) * 3)
            seen.raisesAfterStop = p.raises
        }
        thread.start()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(seen.started, Self.sched_idle)
        XCTAssertEqual(seen.nice, ReaderPriority.normalNice)
        XCTAssertEqual(seen.whileStarved, Self.sched_fifo, "the watchdog did not raise a starved reader")
        XCTAssertEqual(seen.raises, 1)
        XCTAssertEqual(seen.afterUndrained, Self.sched_fifo)
        XCTAssertEqual(seen.afterDrained, Self.sched_idle)
        XCTAssertEqual(seen.raisedCPUBefore, 0)
        XCTAssertGreaterThanOrEqual(seen.raisedCPUAfterSpin, seen.spun, "the CPU spent raised was not counted")
        XCTAssertLessThan(seen.raisedCPUAfterSpin, seen.spun + 200_000_000, "more counted than the raise can have used")
        // The second raise slept (no CPU) until it lowered itself: it adds little.
        XCTAssertLessThan(seen.raisedCPUAtEnd - seen.raisedCPUAfterSpin, 20_000_000)
        XCTAssertEqual(seen.raisesAfterDrained, 1)
        XCTAssertEqual(seen.raisedAgain, Self.sched_fifo)
        XCTAssertEqual(seen.afterLongRaise, Self.sched_idle, "a raise outlasted maxRaisedNanos")
        XCTAssertEqual(seen.raisesAfterLongRaise, 2)
        XCTAssertEqual(seen.afterStop, Self.sched_other)
        XCTAssertEqual(seen.raisesAfterStop, 2)
    }
}
