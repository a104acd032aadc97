import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A network namespace the user named: `--netns NAME` (under /var/run/netns), `--netns PATH`, or `--pid N`.
/// Everything meshtrace does to a pod happens inside one of these, never in the root namespace.
public struct NetnsRef: Hashable, Sendable, CustomStringConvertible {
    /// The file that pins the namespace: /var/run/netns/NAME, /proc/PID/ns/net, or the given path.
    public let path: String
    /// How the user named it, for messages.
    public let label: String

    /// The process it was named by (`--pid`), if it was.
    public let pid: Int32?
    /// The Kubernetes pod it was named by (`--pod NAMESPACE/NAME`), if it was.
    public let pod: String?

    public init(path: String, label: String, pid: Int32? = nil, pod: String? = nil) {
        self.path = path; self.label = label; self.pid = pid; self.pod = pod
    }

    /// Whether this is the node's own network namespace, as far as meshtrace can tell: the one it runs in (on a node,
    /// the host network), or pid 1's where that may be read. A host-network pod's `--pid` lands there.
    public var isNodeNetns: Bool {
        guard let target = NetnsRef.identity(path) else { return false }
        return ["/proc/self/ns/net", "/proc/1/ns/net"].contains { NetnsRef.identity($0) == target }
    }

    /// Which namespace a path names: its nsfs device and inode (nil when it cannot be read).
    static func identity(_ path: String) -> [UInt64]? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return [UInt64(st.st_dev), UInt64(st.st_ino)]
    }

    /// Resolves `--netns` / `--pid`; throws `.noSuchNetns` when the namespace does not exist.
    public static func resolve(netns: String?, pid: Int32?) throws -> NetnsRef {
        if pid != nil, let netns, !netns.isEmpty {
            // Two namespaces named at once: one of them would be ignored without a word (it took the pid's).
            throw MeshtraceError(.usage, "give either --netns \(netns) or --pid \(pid!), not both")
        }
        if let pid {
            let p = "/proc/\(pid)/ns/net"
            var st = stat()
            guard stat(p, &st) == 0 else {
                // Another user's process (or one an LSM hides from us): it exists, we may not enter its netns.
                // Said as the privilege problem it is (exit 5), not "no process" (exit 4).
                let e = errno
                if NetnsRef.isPermission(e), stat("/proc/\(pid)", &st) == 0 {
                    throw NetnsRef.cannotOpen("the network namespace of pid \(pid)", path: p, errno: e)
                }
                throw MeshtraceError(.noSuchNetns, "no process \(pid): cannot find its network namespace (\(p))")
            }
            try requireNamespaceFile(p, label: "pid \(pid)")
            return NetnsRef(path: p, label: "pid \(pid)", pid: pid)
        }
        guard let netns, !netns.isEmpty else {
            throw MeshtraceError(.usage, "name the pod's network namespace with --netns NAME|PATH, --pid N or --pod NAMESPACE/NAME")
        }
        let p = netns.contains("/") ? netns : "/var/run/netns/\(netns)"
        var st = stat()
        guard stat(p, &st) == 0 else {
            let e = errno
            if NetnsRef.isPermission(e) { throw NetnsRef.cannotOpen("network namespace '\(netns)'", path: p, errno: e) }
            throw MeshtraceError(.noSuchNetns, "network namespace '\(netns)' does not exist (\(p))")
        }
        try requireNamespaceFile(p, label: netns)
        return NetnsRef(path: p, label: netns)
    }

    /// nsfs's magic number (linux/magic.h): the file system of /proc/PID/ns/* and of their bind mounts.
    static let nsfsMagic = 0x6e73_6673

    /// A namespace file is on nsfs. Anything else (a regular file, a name left under /var/run/netns after its
    /// mount went away) is said so here, for every command, instead of failing later in setns() or nsenter.
    static func requireNamespaceFile(_ path: String, label: String) throws {
        // struct statfs begins with f_type (a long) on Linux; 256 bytes hold the whole struct on every ABI.
        var buffer = [UInt64](repeating: 0, count: 32)
        let status = buffer.withUnsafeMutableBytes { meshtrace_statfs(path, $0.baseAddress!) }
        guard status == 0 else {
            throw MeshtraceError(.noSuchNetns, "network namespace '\(label)' cannot be read (\(path): \(String(cString: strerror(errno))))")
        }
        guard Int(truncatingIfNeeded: buffer[0]) == nsfsMagic else {
            throw MeshtraceError(.noSuchNetns, "'\(label)' is not a network namespace (\(path) is not a namespace file)")
        }
    }

    public var description: String { label }

    /// An open or stat of a namespace file refused for lack of privilege (exit 5), not for its absence.
    static func isPermission(_ e: Int32) -> Bool { e == EACCES || e == EPERM }

    /// The one line for a namespace meshtrace may not open: what, where (nil when the path is meshtrace's own handle,
    /// which would mean nothing to the operator), and why.
    static func cannotOpen(_ what: String, path: String?, errno e: Int32) -> MeshtraceError {
        MeshtraceError(.noPrivilege, "cannot open \(what) (\(path.map { "\($0): " } ?? "")\(String(cString: strerror(e)))): run it as root")
    }

    /// How to name this namespace again on the command line (`--pod NAMESPACE/NAME`, `--pid N` or
    /// `--netns NAME|PATH`), for messages.
    public var commandLine: String { pod.map { "--pod \($0)" } ?? pid.map { "--pid \($0)" } ?? "--netns \(label)" }

    /// The argv prefix that runs a program inside this namespace (util-linux nsenter).
    public var execPrefix: [String] { ["nsenter", "--net=\(path)", "--"] }
}

/// An open file descriptor on a network namespace, and a path that reaches it through this process
/// (`/proc/PID/fd/N`) for as long as the pin lives. A trace adds its rules and removes them through that path,
/// not through the name it was given: a pod whose process exits (an app container restarting, with `--pid`) or
/// whose name goes away during the trace keeps its netns, and the twins in it must still come out.
public final class NetnsPin: @unchecked Sendable {
    public let ref: NetnsRef
    private let fd: Int32

    public init(_ netns: NetnsRef) throws {
        let fd = open(netns.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            if NetnsRef.isPermission(e) { throw NetnsRef.cannotOpen("network namespace \(netns)", path: netns.path, errno: e) }
            throw MeshtraceError(.noSuchNetns, "network namespace \(netns) went away (\(netns.path): \(String(cString: strerror(e))))")
        }
        self.fd = fd
        ref = NetnsRef(path: "/proc/\(getpid())/fd/\(fd)", label: netns.label, pid: netns.pid, pod: netns.pod)
    }

    deinit { close(fd) }

    /// Whether `path` still names the namespace held here (the same nsfs inode). False when it is gone, or names
    /// another one now: a netns deleted and made again under the same name, or a pid that exited and was reused.
    public func isNamed(by path: String) -> Bool {
        var held = stat()
        guard fstat(fd, &held) == 0, let named = NetnsRef.identity(path) else { return false }
        return named == [UInt64(held.st_dev), UInt64(held.st_ino)]
    }
}

/// Runs external programs (iptables-save, nft, ip, ...), optionally inside a netns, and captures their output.
/// The only place meshtrace starts another program.
public enum Command {
    public struct Result: Sendable {
        public var status: Int32
        public var stdout: String
        public var stderr: String
        public var ok: Bool { status == 0 }
    }

    /// Runs `argv` (looked up in PATH and the sbin directories), feeding `input` on stdin.
    /// Throws `.missingTool` when the program is not installed.
    @discardableResult
    public static func run(_ argv: [String], in netns: NetnsRef? = nil, input: String? = nil) throws -> Result {
        let p = try process(argv, in: netns)
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let inPipe: Pipe? = input != nil ? Pipe() : nil
        p.standardInput = inPipe ?? FileHandle.nullDevice
        try p.run()
        if let inPipe, let input {
            let data = Data(input.utf8)
            DispatchQueue.global().async {
                Command.writeAll(inPipe.fileHandleForWriting.fileDescriptor, data)
                try? inPipe.fileHandleForWriting.close()
            }
        }
        // Read both pipes concurrently so a chatty stderr cannot block the child. The reader thread writes the box
        // once, before `leave`; this thread reads it after `wait`: the group orders the two.
        final class Box: @unchecked Sendable { var data = Data() }
        let errData = Box()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async {
            errData.data = Command.readAll(err.fileHandleForReading.fileDescriptor)
            group.leave()
        }
        let outData = Command.readAll(out.fileHandleForReading.fileDescriptor)
        group.wait()
        p.waitUntilExit()
        return Result(status: p.terminationStatus,
                      stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData.data, as: UTF8.self))
    }

    /// Runs each of `commands` (inside `netns` when given) side by side and returns their results in the same
    /// order: a result, or the error `run` threw for it. For read-only programs that do not depend on each other
    /// (the five rule dumps of a netns: one after another they took ~0.35 s, each a process entering the netns).
    public static func runAll(_ commands: [[String]], in netns: NetnsRef? = nil) -> [Swift.Result<Result, Error>] {
        guard commands.count > 1 else { return commands.map { argv in Swift.Result { try run(argv, in: netns) } } }
        final class Slots: @unchecked Sendable {
            let lock = NSLock()
            var results: [Swift.Result<Result, Error>?]
            init(_ n: Int) { results = Array(repeating: nil, count: n) }
        }
        let slots = Slots(commands.count)
        let done = DispatchSemaphore(value: 0)
        // Threads of their own, not the global queue: `run` waits there for its stderr reader.
        for (i, argv) in commands.enumerated() {
            let t = Thread {
                let r = Swift.Result { try run(argv, in: netns) }
                slots.lock.lock(); slots.results[i] = r; slots.lock.unlock()
                done.signal()
            }
            t.start()
        }
        for _ in commands { done.wait() }
        slots.lock.lock(); defer { slots.lock.unlock() }
        return slots.results.map { $0! }
    }

    /// Starts `argv` (inside `netns` when given) and returns at once: a program that runs beside the caller
    /// (tcpdump, a listener, the orphan reaper). Its stdout is /dev/null, its stdin `stdin` and its stderr `stderr`
    /// (else /dev/null); the caller ends it and waits for it.
    public static func start(_ argv: [String], in netns: NetnsRef? = nil, stdin: FileHandle? = nil,
                             stderr: FileHandle? = nil) throws -> Process {
        let p = try process(argv, in: netns)
        p.standardInput = stdin ?? FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = stderr ?? FileHandle.nullDevice
        try p.run()
        return p
    }

    /// A Process for `argv`, found on `searchPath`, prefixed to enter `netns`: missing programs are one clear error.
    private static func process(_ argv: [String], in netns: NetnsRef?) throws -> Process {
        let full = (netns?.execPrefix ?? []) + argv
        guard let exe = which(full[0]) else {
            throw MeshtraceError(.missingTool, "\(full[0]) is not installed (needed to run: \(argv.joined(separator: " ")))")
        }
        if netns != nil, which(argv[0]) == nil {
            throw MeshtraceError(.missingTool, "\(argv[0]) is not installed")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = Array(full.dropFirst())
        var env = ProcessInfo.processInfo.environment
        env["PATH"] = searchPath
        env["LC_ALL"] = "C"
        p.environment = env
        return p
    }

    // FileHandle.readDataToEndOfFile / write(_:) trap on EINTR (a `try!` inside Foundation), and any signal handler
    // installed without SA_RESTART makes a blocking read in any thread return EINTR: retry instead.
    static func readAll(_ fd: Int32) -> Data {
        var data = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 { data.append(contentsOf: buf[0..<n]); continue }
            if n < 0 && errno == EINTR { continue }
            return data
        }
    }

    static func writeAll(_ fd: Int32, _ data: Data) {
        data.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = write(fd, raw.baseAddress! + done, raw.count - done)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return }
                done += n
            }
        }
    }

    static let searchPath: String = {
        let base = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return base + ":/usr/local/sbin:/usr/sbin:/sbin"
    }()

    /// The absolute path of a program, or nil when it is not installed.
    public static func which(_ name: String) -> String? {
        if name.contains("/") { return FileManager.default.isExecutableFile(atPath: name) ? name : nil }
        for dir in searchPath.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// True when running as root (the live paths need CAP_NET_ADMIN; root is how meshtrace is run).
    public static var isRoot: Bool { geteuid() == 0 }

    public static func requireRoot(_ what: String) throws {
        guard isRoot else {
            throw MeshtraceError(.noPrivilege, "\(what) needs root (CAP_NET_ADMIN): run it with sudo")
        }
    }
}

// statfs(2) is not in Glibc's module map (sys/statfs.h); it is a plain libc symbol.
@_silgen_name("statfs")
private func meshtrace_statfs(_ path: UnsafePointer<CChar>, _ buf: UnsafeMutableRawPointer) -> Int32
