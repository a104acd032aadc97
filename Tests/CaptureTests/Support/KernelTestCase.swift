import XCTest
@testable import Capture

/// Base for tests that use the real kernel: network namespaces, iptables, NFLOG.
/// Every namespace made through `makeNetns()` is removed in tearDown, whether the test passed or not.
class KernelTestCase: XCTestCase {
    private var namespaces: [ScratchNetns] = []

    override func setUpWithError() throws {
        try super.setUpWithError()
        try XCTSkipUnless(Command.isRoot, "kernel tests need root (CI runs as root)")
        ScratchNetns.sweepOrphans()
    }

    override func tearDown() {
        for ns in namespaces.reversed() { ns.remove() }
        namespaces.removeAll()
        super.tearDown()
    }

    func makeNetns() throws -> ScratchNetns {
        let ns = try ScratchNetns(kind: "t")
        namespaces.append(ns)
        return ns
    }

    /// Two new namespaces joined by a veth named `eth0` on both sides, addressed /24 and up.
    func makeNetnsPair(_ firstAddress: String, _ secondAddress: String) throws -> (ScratchNetns, ScratchNetns) {
        let first = try makeNetns(), second = try makeNetns()
        try first.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", second.name])
        try first.run(["ip", "addr", "add", "\(firstAddress)/24", "dev", "eth0"])
        try second.run(["ip", "addr", "add", "\(secondAddress)/24", "dev", "eth0"])
        try first.run(["ip", "link", "set", "eth0", "up"])
        try second.run(["ip", "link", "set", "eth0", "up"])
        return (first, second)
    }
}

/// Paths of the project's own files, for tests.
enum ProjectPaths {
    static var root: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()
    }
    static var reference: URL { root.deletingLastPathComponent().appendingPathComponent("shared/reference") }
    static var samples: URL { root.appendingPathComponent("samples") }
    static var fixtures: URL { root.appendingPathComponent("Tests/CaptureTests/Fixtures") }
    /// The meshtrace binary of the build these tests belong to: `$MESHTRACE_EXECUTABLE`, else the one beside the
    /// test bundle (`swift test --scratch-path P` tests P's build, not `.build`'s), else `.build/debug/meshtrace`.
    static var meshtrace: String {
        if let given = ProcessInfo.processInfo.environment["MESHTRACE_EXECUTABLE"], !given.isEmpty { return given }
        let beside = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
            .deletingLastPathComponent().appendingPathComponent("meshtrace").path
        if FileManager.default.isExecutableFile(atPath: beside) { return beside }
        return root.appendingPathComponent(".build/debug/meshtrace").path
    }
}

final class ScratchNetnsTests: KernelTestCase {
    func testNamespaceIsCreatedAndRemoved() throws {
        let ns = try makeNetns()
        let list = try Command.run(["ip", "netns", "list"]).stdout
        XCTAssertTrue(list.contains(ns.name))
        XCTAssertLessThanOrEqual(ns.name.utf8.count, 15)
        ns.remove()
        XCTAssertFalse(try Command.run(["ip", "netns", "list"]).stdout.contains(ns.name))
    }

    /// What the orphan reaper's shell is told is checked: only the names and paths meshtrace makes.
    func testTheReaperIsToldOnlyNamesMeshtraceMakes() throws {
        for good in ["mt-l123-4", "mt-t99-1", "/tmp/meshtrace-lab-12-345"] { XCTAssertTrue(OrphanReaper.safe(good), good) }
        for bad in ["", "a b", "$(reboot)", "x;y", "/tmp/meshtrace-lab-1/../../etc", "a\nb", "`id`", "*", "-rf /"] {
            XCTAssertFalse(OrphanReaper.safe(bad), bad)
        }
        // This process made namespaces: its reaper runs.
        _ = try makeNetns()
        let pid = try XCTUnwrap(OrphanReaper.pid)
        XCTAssertEqual(kill(pid, 0), 0)
    }

    /// Names carry the creating process's pid, and a lab kept up (`meshtrace lab --keep`) outlives its creator: a
    /// later process given the same pid found its names taken, and `ip netns add` refused ("File exists").
    func testANameLeftByAnEarlierProcessWithTheSamePidIsSkipped() throws {
        let first = try makeNetns()
        let prefix = String(first.name[..<first.name.lastIndex(of: "-")!])
        let n = Int(first.name[first.name.index(after: first.name.lastIndex(of: "-")!)...])!
        let stale = (1...3).map { "\(prefix)-\(n + $0)" }
        defer { for name in stale { _ = try? Command.run(["ip", "netns", "del", name]) } }
        for name in stale { XCTAssertTrue(try Command.run(["ip", "netns", "add", name]).ok, name) }
        let next = try makeNetns()
        XCTAssertFalse(stale.contains(next.name), next.name)
        XCTAssertTrue(try Command.run(["ip", "netns", "list"]).stdout.contains(next.name))
    }
}
