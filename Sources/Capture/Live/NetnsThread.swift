import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The one thread that does all of a trace's netns work.
///
/// setns(CLONE_NEWNET) moves only the calling thread, and a socket belongs to the netns of the thread that
/// created it. So meshtrace starts one dedicated thread, enters the pod's netns on it *before* opening
/// anything, and opens every socket there (the NFLOG group, the libpcap handles, the netlink event socket);
/// the same thread then reads, decodes and correlates. The main thread never enters the netns: it applies
/// and removes the rules through `nsenter`, handles signals, and waits.
public final class NetnsThread: @unchecked Sendable {
    private let netns: NetnsRef
    private let body: () throws -> Void
    private let enterFailed: (Error) -> Void
    private let done = DispatchSemaphore(value: 0)
    private var failure: Error?
    private var thread: Thread?
    /// The running thread's pthread, for `interrupt`: set by the thread itself before its body runs, cleared (under
    /// `pthreadLock`) before it ends, so `interrupt` never signals a thread that is gone.
    private var pthread: pthread_t?
    private let pthreadLock = NSLock()

    /// The thread's stack: it reads, decodes and correlates (the correlator's longest search, its order chain, is
    /// tested on a stack this size).
    public static let stackSize = 1 << 20

    /// `enterFailed` runs on the thread when it cannot enter the netns and `body` will not run: a caller
    /// waiting for `body` to say something (its sockets are open) must be told instead of waiting forever.
    public init(netns: NetnsRef, enterFailed: @escaping (Error) -> Void = { _ in }, body: @escaping () throws -> Void) {
        self.netns = netns
        self.enterFailed = enterFailed
        self.body = body
    }

    public func start() {
        let t = Thread { [self] in
            pthreadLock.withLock { pthread = pthread_self() }
            defer { pthreadLock.withLock { pthread = nil } }
            do {
                try NetnsThread.enter(netns)
            } catch {
                failure = error
                enterFailed(error)
                done.signal()
                return
            }
            do {
                try body()
            } catch {
                failure = error
            }
            done.signal()
        }
        t.name = "meshtrace-netns"
        t.stackSize = NetnsThread.stackSize
        thread = t
        t.start()
    }

    /// Waits for the body to return; rethrows what it threw.
    public func join() throws {
        done.wait()
        if let failure { throw failure }
    }

    /// Whether the thread finished within `nanos` (then `join` returns at once).
    public func finished(within nanos: UInt64) -> Bool {
        if done.wait(timeout: .now() + .nanoseconds(Int(nanos))) == .timedOut { return false }
        done.signal()   // for `join`
        return true
    }

    /// Interrupts a blocking system call of the thread (`OutputStall.interruptSignal`, whose handler does not restart it).
    public func interrupt() {
        pthreadLock.withLock {
            if let pthread { _ = pthread_kill(pthread, OutputStall.interruptSignal) }
        }
    }

    /// CLONE_NEWNET (linux/sched.h).
    static let cloneNewNet: Int32 = 0x4000_0000

    /// Moves the calling thread into the netns.
    public static func enter(_ ref: NetnsRef) throws {
        let fd = open(ref.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            // The label, not the path: a trace's path is its own handle on the netns (`NetnsPin`).
            if NetnsRef.isPermission(e) { throw NetnsRef.cannotOpen("network namespace \(ref)", path: nil, errno: e) }
            throw MeshtraceError(.noSuchNetns, "network namespace \(ref) does not exist")
        }
        defer { close(fd) }
        guard meshtrace_setns(fd, NetnsThread.cloneNewNet) == 0 else {
            let e = errno
            if e == EPERM { throw MeshtraceError(.noPrivilege, "entering netns \(ref) needs CAP_SYS_ADMIN: run as root") }
            throw MeshtraceError(.noSuchNetns, "'\(ref)' is not a network namespace (setns: \(String(cString: strerror(e))))")
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP ask the trace to stop; they never exit the process. The handler only writes a
/// byte to a pipe (async-signal-safe); the netns thread polls the pipe's read end and unwinds, and the main
/// thread then removes the rules. SIGPIPE is ignored so a closed stdout is an error to handle, not a death.
public enum StopSignal {
    nonisolated(unsafe) private static var pipeFDs: [Int32] = [-1, -1]
    nonisolated(unsafe) private static var installed = false

    /// The fd to poll: readable once a stop was asked for.
    public static var fd: Int32 { pipeFDs[0] }

    public static func install() {
        guard !installed else { return }
        installed = true
        let fds = makePipe()
        pipeFDs = fds
        stopWriteFD = fds[1]
        signal(SIGPIPE, SIG_IGN)
        // Every signal whose default would end the process with the twins in: Ctrl-\ (SIGQUIT, core dump) is what an
        // operator presses when Ctrl-C seems slow; SIGUSR1/2 and SIGALRM come from scripts and timers.
        for sig in StopSignal.signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = stopHandler
            sigemptyset(&action.sa_mask)
            // SA_RESTART: Foundation's FileHandle reads and writes trap on EINTR, and a stop signal lands on
            // whichever thread is running; the netns thread still wakes, because poll(2) is never restarted.
            action.sa_flags = SA_RESTART
            sigaction(sig, &action, nil)
        }
    }

    /// The signals that stop a trace (and the lab) the normal way: rules out, then exit.
    public static let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM]

    /// True once a stop signal arrived.
    public static var requested: Bool { stopRequested != 0 }

    /// Asks for a stop from inside the program (the duration ran out, an error on the netns thread).
    public static func request() {
        stopRequested = 1
        var b: UInt8 = 0
        _ = write(stopWriteFD, &b, 1)
    }

    /// The signal that stopped the trace (0 if none), for the exit message.
    public static var signalNumber: Int32 { stopSignalNumber }
}

// setns(2) is a GNU extension Glibc's module map does not export; it is a plain libc symbol.
@_silgen_name("setns")
private func meshtrace_setns(_ fd: Int32, _ nstype: Int32) -> Int32

/// A close-on-exec, nonblocking pipe (pipe2 is not exported either).
func makePipe() -> [Int32] {
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else { return fds }
    for fd in fds {
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }
    return fds
}

nonisolated(unsafe) private var stopWriteFD: Int32 = -1
nonisolated(unsafe) private var stopRequested: sig_atomic_t = 0
nonisolated(unsafe) private var stopSignalNumber: Int32 = 0

private let stopHandler: @convention(c) (Int32) -> Void = { sig in
    stopRequested = 1
    stopSignalNumber = sig
    var b: UInt8 = 1
    _ = write(stopWriteFD, &b, 1)
}
