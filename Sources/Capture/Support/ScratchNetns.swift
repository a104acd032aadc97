import Foundation

/// A network namespace meshtrace itself creates (the lab, the tests): a unique name that carries the
/// creating process's pid, so namespaces orphaned by a killed run can be recognised and swept.
///
/// Names look like `mt-<kind><pid>-<n>` (at most 15 bytes, so veths named after them fit IFNAMSIZ).
public final class ScratchNetns: @unchecked Sendable {
    public let name: String
    public var ref: NetnsRef { NetnsRef(path: ScratchNetns.path(of: name), label: name) }
    /// Where `ip netns` keeps a named namespace.
    static func path(of name: String) -> String { "/var/run/netns/\(name)" }
    private var removed = false

    private static let counterLock = NSLock()
    nonisolated(unsafe) private static var counter = 0

    /// Creates the namespace and brings its lo up. `kind` is one letter: t (test), l (lab), b (benchmark).
    public init(kind: Character = "t") throws {
        try Command.requireRoot("creating a network namespace")
        // A name left by an earlier process that had this pid (a lab kept with --keep, or a killed run) is skipped:
        // `ip netns add` would refuse it ("File exists") and the lab or test would fail to start.
        var candidate = ""
        for _ in 0..<1000 {
            ScratchNetns.counterLock.lock()
            ScratchNetns.counter += 1
            let n = ScratchNetns.counter
            ScratchNetns.counterLock.unlock()
            candidate = "mt-\(kind)\(getpid())-\(n)"
            if !FileManager.default.fileExists(atPath: ScratchNetns.path(of: candidate)) { break }
        }
        name = candidate
        let r = try Command.run(["ip", "netns", "add", name])
        guard r.ok else { throw MeshtraceError(.kernelRefused, "ip netns add \(name): \(r.stderr)") }
        // Removed by `remove()`; if this process dies first (a crash, SIGKILL), by the reaper.
        OrphanReaper.watch(namespace: name)
        try run(["ip", "link", "set", "lo", "up"])
    }

    /// Runs a program inside the namespace; throws with its stderr when it fails.
    @discardableResult
    public func run(_ argv: [String], input: String? = nil) throws -> Command.Result {
        let r = try Command.run(argv, in: ref, input: input)
        guard r.ok else {
            throw MeshtraceError(.kernelRefused, "\(argv.joined(separator: " ")) in \(name): \(r.stderr)")
        }
        return r
    }

    /// Runs without throwing on a non-zero exit (for probes whose failure is the expected result).
    @discardableResult
    public func attempt(_ argv: [String], input: String? = nil) -> Command.Result {
        (try? Command.run(argv, in: ref, input: input)) ?? Command.Result(status: 127, stdout: "", stderr: "not run")
    }

    /// Deletes the namespace (which also removes its veth ends and rules). Safe to call twice.
    public func remove() {
        guard !removed else { return }
        removed = true
        if ScratchNetns.delete(name) { OrphanReaper.release(namespace: name) }
    }

    /// Deletes the named namespace, ending the processes still inside first (they would keep it and its sockets
    /// alive). True when `ip netns del` succeeded.
    @discardableResult
    static func delete(_ name: String) -> Bool {
        if let pids = try? Command.run(["ip", "netns", "pids", name]), pids.ok {
            for p in pids.stdout.split(whereSeparator: \.isNewline) { if let pid = Int32(p) { kill(pid, SIGKILL) } }
        }
        return (try? Command.run(["ip", "netns", "del", name]))?.ok == true
    }

    /// This namespace is to outlive the process (a lab kept with `--keep`): the reaper leaves it alone.
    func keepAfterExit() { OrphanReaper.release(namespace: name) }

    deinit { remove() }

    /// Removes namespaces named `mt-<kind><pid>-*` of the given kinds whose creating process no longer exists.
    /// Tests sweep their own kinds only: a lab left up with `meshtrace lab --keep` (kind l) outlives its creator on
    /// purpose, and `meshtrace lab down` is what removes it.
    public static func sweepOrphans(kinds: Set<Character> = ["t", "b"]) {
        guard let r = try? Command.run(["ip", "netns", "list"]), r.ok else { return }
        for line in r.stdout.split(whereSeparator: \.isNewline) {
            let name = String(line.split(separator: " ").first ?? "")
            guard name.hasPrefix("mt-"), let dash = name.lastIndex(of: "-"), dash > name.index(name.startIndex, offsetBy: 4),
                  kinds.contains(name[name.index(name.startIndex, offsetBy: 3)]) else { continue }
            let pidText = name[name.index(name.startIndex, offsetBy: 4)..<dash]
            guard let pid = Int32(pidText), pid != getpid() else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH { delete(name) }
        }
    }
}
