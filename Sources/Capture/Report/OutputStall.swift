import Foundation
#if canImport(Glibc)
import Glibc
#endif

// A live trace writes its timelines from the reading thread. When nothing reads stdout (`meshtrace trace | less`
// left on a page, a pipe into a stuck consumer), that write blocks, and a stop then removed the rules but never
// returned: the stop waits for the reading thread, which waited for the pipe. So the report's writes say when a
// write began, the stop path gives up on an output that has not taken a byte for `stalledNanos`, and a signal
// without SA_RESTART takes the blocked write out of the kernel. Everything written after that is dropped, and the
// trace ends with one line saying so.

public enum OutputStall {
    /// How long a single write may block after the trace was asked to stop before the output is given up.
    public static let stalledNanos: UInt64 = 2_000_000_000
    /// The signal that interrupts a blocked write (its default action is to ignore it; meshtrace uses it for
    /// nothing else).
    static let interruptSignal = SIGURG

    /// Uptime (ns) at which the write in progress began; 0 when none is.
    nonisolated(unsafe) private static var writeBegan: UInt64 = 0
    nonisolated(unsafe) private static var abandonedFlag: sig_atomic_t = 0
    nonisolated(unsafe) private static var installed = false

    /// Whether the output was given up: writes return at once, writing nothing.
    public static var isAbandoned: Bool { abandonedFlag != 0 }

    /// The write in progress has been blocked for longer than `stalledNanos`.
    public static var isStalled: Bool {
        let began = writeBegan
        return began != 0 && uptimeNanos() &- began > stalledNanos
    }

    /// Gives the output up; later writes drop their bytes, and one in progress stops at the next interruption.
    public static func abandon() { abandonedFlag = 1 }

    /// Installs the interrupting signal's handler (does nothing, and does not restart the call it interrupted).
    public static func installInterruptHandler() {
        guard !installed else { return }
        installed = true
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(interruptSignal, &action, nil)
    }

    static func writing() { writeBegan = uptimeNanos() }
    static func wrote() { writeBegan = 0 }

    static func uptimeNanos() -> UInt64 { clockNanos(CLOCK_MONOTONIC) }

    /// The message of a trace whose output was given up.
    public static let said = "the trace was stopped while stdout took nothing for 2 s (a pipe nobody reads?): the rest of the output was dropped; the rules are removed"

    /// Writes one line to stderr unless stderr, too, takes nothing within `timeoutMillis` (the same stuck pipe,
    /// `2>&1`): an error line must not hang the exit.
    public static func writeStderrLine(_ line: String, timeoutMillis: Int32 = 2000) {
        var p = pollfd(fd: STDERR_FILENO, events: Int16(POLLOUT), revents: 0)
        guard poll(&p, 1, timeoutMillis) == 1, p.revents & Int16(POLLOUT) != 0 else { return }
        var s = line + "\n"
        s.withUTF8 { buf in _ = Glibc.write(STDERR_FILENO, buf.baseAddress, buf.count) }
    }
}
