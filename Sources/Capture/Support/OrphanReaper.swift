import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Removes the namespaces (and lab run directories) this process made when the process dies without removing them
/// itself: a crash (a Swift trap in a test), SIGKILL, an out-of-memory kill. No teardown code of ours runs then, so
/// the removal has to live in another process.
///
/// That process is a small shell, started once per process at the first namespace: it reads `+ NAME` / `- NAME`
/// (a namespace made / removed) and `d+ PATH` / `d- PATH` (a run directory) from a socket whose other end only this
/// process holds (close-on-exec, so no child inherits it). When this process ends, however it ends, the kernel closes
/// that end; the shell reads end of file and removes what is still listed: the processes inside each namespace,
/// the namespace, the directory. What was removed normally was listed as removed already, so a clean exit leaves it
/// nothing to do; a lab kept on purpose (`meshtrace lab --keep`) is listed as released. It ignores SIGINT, SIGTERM,
/// SIGHUP and SIGQUIT (Ctrl-C reaches the whole process group), and its command line reads
/// `meshtrace-reaper <pid>`.
public enum OrphanReaper {
    /// Only names and paths meshtrace makes itself are ever listed (`mt-<kind><pid>-<n>`, `/tmp/meshtrace-lab-...`),
    /// checked again here: nothing else reaches a shell.
    static func safe(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2d || c == 0x2f || c == 0x5f
        } && !text.contains("..")
    }

    static let script = """
        trap '' INT TERM HUP QUIT
        set -f
        names=' '; dirs=' '
        while read -r op item; do
          case "$op" in
            +) names="$names$item " ;;
            -) k=' '; for n in $names; do [ "$n" = "$item" ] || k="$k$n "; done; names=$k ;;
            d+) dirs="$dirs$item " ;;
            d-) k=' '; for n in $dirs; do [ "$n" = "$item" ] || k="$k$n "; done; dirs=$k ;;
          esac
        done
        for n in $names; do
          for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
          ip netns del "$n" 2>/dev/null
        done
        for d in $dirs; do
          case "$d" in /tmp/meshtrace-lab-*) rm -rf -- "$d" ;; esac
        done
        """

    private static let lock = NSLock()
    nonisolated(unsafe) private static var fd: Int32 = -1
    nonisolated(unsafe) private static var failed = false

    /// A namespace now exists and must not outlive this process.
    public static func watch(namespace name: String) { post("+", name) }
    /// The namespace is gone, or is kept on purpose.
    public static func release(namespace name: String) { post("-", name) }
    public static func watch(directory path: String) { post("d+", path) }
    public static func release(directory path: String) { post("d-", path) }

    /// The reaper's pid (started on first use), for tests; nil when it could not be started.
    static var pid: Int32? { lock.lock(); defer { lock.unlock() }; startIfNeeded(); return process?.processIdentifier }
    nonisolated(unsafe) private static var process: Process?

    private static func post(_ op: String, _ item: String) {
        guard safe(item) else { return }
        lock.lock(); defer { lock.unlock() }
        startIfNeeded()
        guard fd >= 0 else { return }
        let line = Array("\(op) \(item)\n".utf8)
        var done = 0
        while done < line.count {
            // MSG_NOSIGNAL: a reaper that died is no reason for SIGPIPE to end this process.
            let n = line.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, line.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { close(fd); fd = -1; failed = true; return }
            done += n
        }
    }

    /// Called with `lock` held.
    private static func startIfNeeded() {
        guard fd < 0, !failed else { return }
        failed = true
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else { return }
        let started = try? Command.start(["sh", "-c", script, "meshtrace-reaper", String(getpid())],
                                         stdin: FileHandle(fileDescriptor: pair[1], closeOnDealloc: false))
        close(pair[1])
        guard let started else { close(pair[0]); return }
        fd = pair[0]
        process = started
        failed = false
    }
}
