#if canImport(Glibc)
import Glibc
#endif

/// Holds the correlator's sweeps while the live reader places what a stall left behind.
///
/// When the reading thread stands still (stopped with SIGSTOP, a debugger, a node or a hypervisor that does not run
/// it) the kernel keeps queueing NFLOG events and captured packets. Once it runs again it reads both backlogs, but
/// one after the other, and NFLOG events at OUTPUT carry their receipt time (the kernel stamps only PREROUTING,
/// INPUT and FORWARD). So the first of them moves the correlator's clock by the whole stall at once, and the sweep
/// that follows finishes every connection that closed more than the linger before, although part of its records,
/// from the other source, are still in the hold ring or the kernel: those then make a second connection of their own,
/// headless. (`LiveTracerQuietPodTests.testAReaderThatStallsLosesNothingAndSplitsNoConnection` failed 3 runs in 31
/// on the twenty-fifth session's VM: the connections around the stall printed in two halves, the capture's and
/// NFLOG's.)
///
/// A stall is a time between two checkpoints (before and after each pass's reading) during which the thread used less
/// CPU than the wall clock moved by more than `stallNanos` (half the close linger: a shorter stall cannot move the
/// clock past a linger; the poll's 5 ms wait and the 2 ms pause between passes are far below it). From then on
/// the correlator's sweeps are held until a pass that began after the stall has read every source empty and every
/// record read up to then has left the hold ring for the correlator; then it sweeps. At most `limitNanos`: a reader
/// that stays behind gets its sweeps back (the live reader-behind case, `pump`'s catch-up).
struct StallGate {
    let stallNanos: UInt64
    let limitNanos: UInt64
    private var last: (wall: UInt64, cpu: UInt64)?
    private(set) var holding = false
    private var detectedAt: UInt64 = 0
    private var readBy: UInt64?
    private var deadline: UInt64 = 0
    /// Stalls seen (each held the sweeps once).
    private(set) var stalls = 0

    init(stallNanos: UInt64, limitNanos: UInt64) {
        self.stallNanos = stallNanos
        self.limitNanos = limitNanos
    }

    /// At a checkpoint of the reading thread (before and after each pass's reading: `wall` the monotonic clock,
    /// `cpu` the thread's CPU time). True when a stall since the last checkpoint starts a hold: before the pass
    /// reads (a stall between passes), so that no record of the backlog reaches the correlator unheld, not even one
    /// a full hold ring pushes out while the pass reads; after it (a stall while it read).
    mutating func checkpoint(wall: UInt64, cpu: UInt64) -> Bool {
        defer { last = (wall, cpu) }
        guard let last, wall > last.wall else { return false }
        let used = cpu > last.cpu ? cpu - last.cpu : 0
        let away = (wall - last.wall) > used ? (wall - last.wall) - used : 0
        guard away > stallNanos else { return false }
        stalls += 1
        let started = !holding
        holding = true
        detectedAt = wall
        readBy = nil
        deadline = wall + limitNanos
        return started
    }

    /// After a pass read its sources (`woke`: when it began, `wall`: now): a pass begun after the stall that read
    /// every source empty has read the whole backlog.
    mutating func afterReading(woke: UInt64, wall: UInt64, drained: Bool) {
        if holding, readBy == nil, drained, woke > detectedAt { readBy = wall }
    }

    /// After the pass released what it could to the correlator (`oldestHeld`: the arrival of the oldest record
    /// still in the hold ring). True when the hold ends now.
    mutating func afterRelease(now: UInt64, oldestHeld: Int64?) -> Bool {
        guard holding else { return false }
        let placed = readBy.map { r in oldestHeld.map { $0 > Int64(r) } ?? true } ?? false
        guard placed || now >= deadline else { return false }
        holding = false
        return true
    }

    /// The calling thread's CPU time (ns).
    static func threadCPU() -> UInt64 { clockNanos(CLOCK_THREAD_CPUTIME_ID) }
}
