import XCTest
@testable import Capture
#if canImport(Glibc)
import Glibc
#endif

/// `--pod NAMESPACE/NAME` reads crictl's JSON: what containerd and CRI-O print for `crictl pods -o json` and
/// `crictl inspectp -o json`.
final class PodLookupParsingTests: XCTestCase {
    func testNamespaceAndName() throws {
        XCTAssertEqual(try PodLookup.split("istio-system/ztunnel-x2").namespace, "istio-system")
        XCTAssertEqual(try PodLookup.split("istio-system/ztunnel-x2").name, "ztunnel-x2")
        XCTAssertEqual(try PodLookup.split("productpage-v1").namespace, "default")
        for bad in ["", "/", "a/", "/b", "a/b/c"] {
            XCTAssertThrowsError(try PodLookup.split(bad), bad) { XCTAssertEqual(($0 as? MeshtraceError)?.code, .usage, bad) }
        }
    }

    func testSandboxesAreReadWithTheirState() throws {
        let list = try PodLookup.sandboxes(fromPods: PodLookupTests.podsJSON)
        XCTAssertEqual(list.first, PodLookup.Sandbox(id: "4fa2c18d0b7e", namespace: "default", name: "client", ready: true))
        XCTAssertEqual(list.filter { $0.name == "client" && $0.namespace == "default" }.map(\.ready), [true, false])
        XCTAssertEqual(try PodLookup.sandboxes(fromPods: #"{"items":[]}"#), [])
        XCTAssertThrowsError(try PodLookup.sandboxes(fromPods: "level=fatal msg=\"connect: connection refused\""))
    }

    func testTheNetworkNamespaceIsThePathElseThePid() throws {
        XCTAssertEqual(try PodLookup.networkNamespace(fromInspect: PodLookupTests.inspect(path: "/var/run/netns/cni-1f0c", pid: 4242)),
                       .path("/var/run/netns/cni-1f0c"))
        // A host-network sandbox: its network entry has no path; only the pause process leads anywhere.
        XCTAssertEqual(try PodLookup.networkNamespace(fromInspect: PodLookupTests.inspect(path: nil, pid: 4242)), .pid(4242))
        XCTAssertEqual(try PodLookup.networkNamespace(fromInspect: #"{"status":{"id":"x"},"info":{}}"#), .none)
        XCTAssertThrowsError(try PodLookup.networkNamespace(fromInspect: "[1,2]"))
    }
}

/// The CLI with `--pod`, against a real namespace loaded with the seed ruleset. This machine runs no container
/// runtime, so `crictl` is a script printing what crictl prints; everything after it (the rules read, twins
/// added and removed, the trace) is real.
final class PodLookupTests: KernelTestCase {
    var executable: String { LiveTracerTests.executable }

    static let podsJSON = """
        {"items": [
          {"id": "4fa2c18d0b7e", "metadata": {"name": "client", "uid": "7c1e", "namespace": "default", "attempt": 1},
           "state": "SANDBOX_READY", "createdAt": "1764489600000000000", "labels": {"app": "client"}, "annotations": {}, "runtimeHandler": ""},
          {"id": "0d9b31aa52c0", "metadata": {"name": "client", "uid": "7c1e", "namespace": "default", "attempt": 0},
           "state": "SANDBOX_NOTREADY", "createdAt": "1764489000000000000", "labels": {}, "annotations": {}, "runtimeHandler": ""},
          {"id": "b2", "metadata": {"name": "client", "namespace": "other", "attempt": 0}, "state": "SANDBOX_READY"},
          {"id": "c3", "metadata": {"name": "client-2", "namespace": "default", "attempt": 0}, "state": "SANDBOX_READY"},
          {"id": "d4", "metadata": {"name": "stopped", "namespace": "default", "attempt": 0}, "state": "SANDBOX_NOTREADY"},
          {"id": "e5", "metadata": {"name": "twice", "namespace": "default", "attempt": 0}, "state": "SANDBOX_READY"},
          {"id": "e6", "metadata": {"name": "twice", "namespace": "default", "attempt": 0}, "state": "SANDBOX_READY"},
          {"id": "f7", "metadata": {"name": "bypid", "namespace": "default", "attempt": 0}, "state": "SANDBOX_READY"}
        ]}
        """

    static func inspect(path: String?, pid: Int32) -> String {
        let network = path.map { #"{"type": "network", "path": "\#($0)"}"# } ?? #"{"type": "network"}"#
        return """
            {"status": {"id": "4fa2c18d0b7e", "state": "SANDBOX_READY", "network": {"ip": "10.244.1.10"}},
             "info": {"pid": \(pid), "processStatus": "running", "netNamespaceClosed": false,
                      "runtimeSpec": {"ociVersion": "1.1.0", "linux": {"namespaces": [
                        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, \(network)]}}}}
            """
    }

    /// A directory with a `crictl` that answers from files: pods.json, inspect-ID.json; `fail` makes it fail.
    func fakeCrictl(pointingAt ns: ScratchNetns, pausePid: Int32) throws -> String {
        let dir = NSTemporaryDirectory() + "mt-crictl-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let script = """
            #!/bin/sh
            d=$(dirname "$0")
            if [ -f "$d/fail" ]; then cat "$d/fail" >&2; exit 1; fi
            case "$1" in
              pods) cat "$d/pods.json" ;;
              inspectp) cat "$d/inspect-$4.json" ;;
              *) exit 2 ;;
            esac
            """
        let files = [
            "crictl": script, "pods.json": PodLookupTests.podsJSON,
            "inspect-4fa2c18d0b7e.json": PodLookupTests.inspect(path: ScratchNetns.path(of: ns.name), pid: 1),
            "inspect-b2.json": PodLookupTests.inspect(path: "/var/run/netns/mt-no-such-\(getpid())", pid: 0),
            "inspect-f7.json": PodLookupTests.inspect(path: nil, pid: pausePid),
        ]
        for (name, text) in files { try text.write(toFile: "\(dir)/\(name)", atomically: true, encoding: .utf8) }
        XCTAssertEqual(chmod("\(dir)/crictl", 0o755), 0)
        return dir
    }

    func meshtrace(_ args: [String], crictlIn dir: String?) throws -> Command.Result {
        let path = (dir.map { [$0] } ?? []) + [ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"]
        return try Command.run(["env", "PATH=\(path.joined(separator: ":"))", "timeout", "-s", "KILL", "60", executable] + args)
    }

    func testAPodIsFoundThroughTheContainerRuntimeAndTraced() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: InstrumenterTests.seed)
        let before = try InstrumenterTests.rulesText(ns)
        let pause = try Command.start(["sleep", "120"], in: ns.ref)
        defer { kill(pause.processIdentifier, SIGKILL); pause.waitUntilExit() }
        let dir = try fakeCrictl(pointingAt: ns, pausePid: pause.processIdentifier)

        // NAME alone is in the default namespace; the plan names the pod the way it was given.
        let plan = try meshtrace(["plan", "--pod", "client"], crictlIn: dir)
        XCTAssertEqual(plan.status, 0, plan.stderr)
        XCTAssertTrue(plan.stdout.contains("for netns pod default/client"), plan.stdout)
        XCTAssertTrue(plan.stdout.contains("meshtrace cleanup --pod default/client"), plan.stdout)
        XCTAssertTrue(plan.stdout.contains("-j NFLOG"), plan.stdout)
        // A sandbox whose spec gives no path: its pause process leads to the same namespace.
        let byPid = try meshtrace(["plan", "--pod", "default/bypid"], crictlIn: dir)
        XCTAssertEqual(byPid.status, 0, byPid.stderr)
        XCTAssertEqual(byPid.stdout.split(separator: "\n").filter { $0.contains("-j NFLOG") }.count,
                       plan.stdout.split(separator: "\n").filter { $0.contains("-j NFLOG") }.count)
        // The plan's removal hint named a pid as `--netns pid N` until this was written.
        let planByPid = try meshtrace(["plan", "--pid", "\(pause.processIdentifier)"], crictlIn: nil)
        XCTAssertEqual(planByPid.status, 0, planByPid.stderr)
        XCTAssertTrue(planByPid.stdout.contains("meshtrace cleanup --pid \(pause.processIdentifier)\n"), planByPid.stdout)
        let rules = try meshtrace(["rules", "--pod", "default/client"], crictlIn: dir)
        XCTAssertEqual(rules.status, 0, rules.stderr)
        XCTAssertTrue(rules.stdout.contains("ISTIO_OUTPUT"), rules.stdout)
        // A real trace: twins in, traffic-free second, twins out.
        let trace = try meshtrace(["trace", "--pod", "default/client", "--group", "5541", "--duration", "1", "--quiet"], crictlIn: dir)
        XCTAssertEqual(trace.status, 0, trace.stderr)
        XCTAssertTrue(trace.stdout.contains("rule hits (meshtrace / kernel counter)"), trace.stdout)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    func testAPodThatCannotBeFoundIsOneLineAndADistinctExit() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: InstrumenterTests.seed)
        let before = try InstrumenterTests.rulesText(ns)
        let dir = try fakeCrictl(pointingAt: ns, pausePid: 1)
        let cases: [([String], ExitStatus, String)] = [
            (["trace", "--pod", "default/nope", "--duration", "1"], .noSuchNetns, "no pod default/nope on this node"),
            (["plan", "--pod", "stopped"], .noSuchNetns, "has no ready sandbox"),
            (["plan", "--pod", "twice"], .usage, "2 ready sandboxes"),
            // The same name in another namespace is another pod (its netns here does not exist).
            (["trace", "--pod", "other/client", "--duration", "1"], .noSuchNetns, "does not exist"),
            (["cleanup", "--pod", "a/b/c"], .usage, "--pod takes NAMESPACE/NAME"),
            (["trace", "--pod", "client", "--netns", ns.name, "--duration", "1"], .usage, "not both"),
            (["verify", "--pod", "client", "--netns", ns.name], .usage, "exactly one of"),
        ]
        for (args, status, text) in cases {
            let r = try meshtrace(args, crictlIn: dir)
            XCTAssertEqual(r.status, status.rawValue, "\(args): \(r.stdout) \(r.stderr)")
            // `verify` checks its options in ArgumentParser's validate(), which adds the usage lines.
            if args[0] != "verify" { XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(args): \(r.stderr)") }
            XCTAssertTrue(r.stderr.contains(text), "\(args): \(r.stderr)")
        }
        // crictl that cannot reach the runtime: without permission (exit 5), or otherwise (exit 4), said as it said it.
        try "time=\"2026-11-30T06:40:00Z\" level=fatal msg=\"validate service connection: dial unix /run/containerd/containerd.sock: connect: permission denied\"\n"
            .write(toFile: "\(dir)/fail", atomically: true, encoding: .utf8)
        let denied = try meshtrace(["trace", "--pod", "client", "--duration", "1"], crictlIn: dir)
        XCTAssertEqual(denied.status, ExitStatus.noPrivilege.rawValue, denied.stderr)
        XCTAssertTrue(denied.stderr.contains("permission denied"), denied.stderr)
        try "level=fatal msg=\"connect: connection refused\"\n".write(toFile: "\(dir)/fail", atomically: true, encoding: .utf8)
        let refused = try meshtrace(["plan", "--pod", "client"], crictlIn: dir)
        XCTAssertEqual(refused.status, ExitStatus.noSuchNetns.rawValue, refused.stderr)
        XCTAssertTrue(refused.stderr.contains("connection refused"), refused.stderr)
        XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
        // No crictl at all (this machine has none; skipped where one is installed).
        if Command.which("crictl") == nil {
            let missing = try meshtrace(["trace", "--pod", "client", "--duration", "1"], crictlIn: nil)
            XCTAssertEqual(missing.status, ExitStatus.missingTool.rawValue, missing.stderr)
            XCTAssertTrue(missing.stderr.contains("crictl is not installed"), missing.stderr)
        }
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }
}
