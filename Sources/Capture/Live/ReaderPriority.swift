import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How the reading thread shares the node's CPUs with the pod it traces.
///
/// The reader yields: it runs as SCHED_IDLE, on CPU time nothing else on the node wants, so tracing takes no CPU
/// from the pod while the node has some to spare. A reader that never gets the CPU would overflow the kernel's
/// buffers and fall behind the correlator's clock, so a watchdog thread raises it when it has not finished a pass
/// for `starvedNanos` (the node's CPUs are busy): to SCHED_FIFO, so it runs at once and catches up, and it lowers
/// itself to SCHED_IDLE again after a pass that read every source empty. At 140 000 events/s, `starvedNanos` of
/// events is ~3 000 of them, against a 16 MiB NFLOG socket buffer and a 64 MiB capture ring, and the records
/// wait well within the correlator's clock lag (`LiveTracer.advanceLagNanos`).
///
/// Why SCHED_FIFO and not the normal policy at a better nice value: a SCHED_IDLE thread's virtual runtime runs
/// ~340 times faster than a nice-0 thread's, and the fair scheduler carries that debt over when the thread is
/// made normal again. Raised that way, the reader still waited 50-500 ms for the CPU on a busy node (measured by
/// `LiveTracerTests.testOnABusyNodeTheReaderIsRaisedAndNothingIsLost`); raised to SCHED_FIFO it runs at once.
///
/// A raise lasts until a pass drains every source, or `maxRaisedNanos` at most: then the reader lowers itself
/// anyway, and the watchdog raises it again only after another `starvedNanos` without a pass. So a pod that makes
/// more events than meshtrace can take in gets at most half of one CPU taken at real-time priority; the rest of
/// what meshtrace cannot read is lost and counted, never hidden, and the pod keeps running.
///
/// What a raise costs the pod is the reader's CPU time while raised (`raisedCPUNanos`): the watchdog reads the
/// reader's thread CPU clock when it raises it, the reader its own when it lowers itself, and the summary says it.
///
/// The watchdog itself is SCHED_FIFO (it wakes every `checkNanos` for a few microseconds), so it is never
/// starved either. Where that is refused (no CAP_SYS_NICE, or a cgroup without real-time runtime), the reader
/// could not be raised, so it does not yield: it keeps the normal policy at nice -5, as it did before.
final class ReaderPriority: @unchecked Sendable {
    static let checkNanos: UInt64 = 5_000_000
    static let starvedNanos: UInt64 = 20_000_000
    static let maxRaisedNanos: UInt64 = 20_000_000
    /// The reader's nice value under the normal policy (when it does not yield, and after the trace).
    static let normalNice: Int32 = -5
    static let schedOther: Int32 = 0
    static let schedFIFO: Int32 = 1
    static let schedIdle: Int32 = 5

    /// Uptime (ns) at the reader's last finished pass.
    private let heartbeat = Atomic<UInt64>(0)
    /// Uptime (ns) when the watchdog raised the reader, stored once the raise is done; 0 while it is not raised
    /// (the reader sets it back when it lowers itself).
    private let raisedAt = Atomic<UInt64>(0)
    private let stopping = Atomic<Bool>(false)
    private let raiseCount = Atomic<Int>(0)
    /// The reader's thread CPU time (ns) when the watchdog raised it: stored before `raisedAt`, read by the reader
    /// after it saw `raisedAt` set.
    private let cpuAtRaise = Atomic<UInt64>(0)
    /// The reader's CPU clock, for the watchdog (set by `start` before the watchdog starts).
    private var readerClock: clockid_t?
    /// The reader's CPU time spent raised, summed when it lowers itself (touched by the reading thread only).
    private var raisedCPU: UInt64 = 0
    private let watchdogReady = DispatchSemaphore(value: 0)
    private let watchdogDone = DispatchSemaphore(value: 0)
    private var watchdogIsRealtime = false
    /// The reading thread's id and state: touched by the reading thread only (the watchdog reads `tid` after
    /// `start` set it and before `stop` returns).
    private var tid: Int32 = 0
    private var yielding = false
    /// Whether the reader yielded during the trace.
    private(set) var yielded = false

    /// How many times the watchdog raised the reader.
    var raises: Int { raiseCount.load(ordering: .relaxed) }
    /// The reader's CPU time while raised, in ns: what it took from the node at real-time priority. Read once the
    /// reader has stopped (`stop` counts a raise still on).
    var raisedCPUNanos: UInt64 { raisedCPU }
    /// Whether the reader is raised now (set once the raise is complete).
    var isRaised: Bool { raisedAt.load(ordering: .relaxed) != 0 }

    /// Called on the reading thread: starts the watchdog, then lowers the thread if the watchdog can raise it.
    /// `yielding` false: the thread only gets the normal policy at nice -5.
    func start(yielding wanted: Bool = true) {
        tid = currentTid()
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), UInt32(bitPattern: tid), ReaderPriority.normalNice)
        guard wanted else { return }
        var clock = clockid_t(0)
        if pthread_getcpuclockid(pthread_self(), &clock) == 0 { readerClock = clock }
        heartbeat.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed)
        // Started before the reader is lowered: a new thread inherits its creator's policy.
        let watchdog = Thread { [self] in watch() }
        watchdog.name = "meshtrace-watchdog"
        watchdog.start()
        watchdogReady.wait()
        guard watchdogIsRealtime, ReaderPriority.setPolicy(tid, ReaderPriority.schedIdle) else {
            stopWatchdog()
            return
        }
        yielding = true
        yielded = true
    }

    /// Called on the reading thread after every pass. `drained`: the pass read every source empty.
    @inline(__always)
    func passFinished(drained: Bool, at now: UInt64) {
        heartbeat.store(now, ordering: .relaxed)
        guard yielding else { return }
        let raised = raisedAt.load(ordering: .acquiring)
        // Caught up, or raised for as long as one raise may last.
        if raised != 0, drained || now &- raised >= ReaderPriority.maxRaisedNanos {
            countRaisedCPU()
            raisedAt.store(0, ordering: .relaxed)
            _ = ReaderPriority.setPolicy(tid, ReaderPriority.schedIdle)
        }
    }

    /// Called on the reading thread: it keeps the normal policy from here on (the last events are drained
    /// whatever the node is doing), and the watchdog has exited before this returns, so it never changes a
    /// thread that may be gone.
    func stop() {
        guard yielding else { return }
        yielding = false
        stopWatchdog()
        if raisedAt.load(ordering: .acquiring) != 0 { countRaisedCPU() }
        _ = ReaderPriority.setPolicy(tid, ReaderPriority.schedOther)
    }

    /// Adds the reader's CPU time since the watchdog raised it (on the reading thread).
    private func countRaisedCPU() {
        let from = cpuAtRaise.load(ordering: .relaxed)
        let now = StallGate.threadCPU()
        if from != 0, now > from { raisedCPU &+= now - from }
    }

    private func stopWatchdog() {
        stopping.store(true, ordering: .relaxed)
        watchdogDone.wait()
    }

    private func watch() {
        defer { watchdogDone.signal() }
        watchdogIsRealtime = ReaderPriority.setPolicy(currentTid(), ReaderPriority.schedFIFO, priority: 1)
        watchdogReady.signal()
        guard watchdogIsRealtime else { return }
        var pause = timespec(tv_sec: 0, tv_nsec: Int(ReaderPriority.checkNanos))
        while !stopping.load(ordering: .relaxed) {
            nanosleep(&pause, nil)
            let now = DispatchTime.now().uptimeNanoseconds
            let last = heartbeat.load(ordering: .relaxed)
            guard now > last, now - last >= ReaderPriority.starvedNanos, raisedAt.load(ordering: .relaxed) == 0 else { continue }
            // The policy first, then the time: a reader that sees the time has been raised. Its CPU clock before
            // both, so a raise's CPU is counted from no later than the raise.
            if let readerClock { cpuAtRaise.store(clockNanos(readerClock), ordering: .relaxed) }
            if ReaderPriority.setPolicy(tid, ReaderPriority.schedFIFO, priority: 1) { raiseCount.add(1, ordering: .relaxed) }
            raisedAt.store(max(DispatchTime.now().uptimeNanoseconds, 1), ordering: .releasing)
        }
    }

    private static func setPolicy(_ tid: Int32, _ policy: Int32, priority: Int32 = 0) -> Bool {
        var param = sched_param(sched_priority: priority)
        return sched_setscheduler(tid, policy, &param) == 0
    }
}

@_silgen_name("gettid")
private func currentTid() -> Int32
