import XCTest
@testable import Capture
#if canImport(Glibc)
import Glibc
#endif

/// The `meshtrace trace` binary as an operator runs it: interrupted, terminated, killed, pointed at a busy
/// group or a netns that does not exist. The rules must always end up exactly as they were.
final class TraceCLITests: KernelTestCase {
    var executable: String { LiveTracerTests.executable }

    func seededNetns() throws -> ScratchNetns {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: InstrumenterTests.seed)
        return ns
    }

    /// Starts `meshtrace ARGS` with output to a log file.
    func start(_ args: [String], program: String? = nil) throws -> (Process, String) {
        let log = NSTemporaryDirectory() + "mt-trace-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        XCTAssertTrue(FileManager.default.createFile(atPath: log, contents: nil), "cannot create a scratch file")
        let out = try XCTUnwrap(FileHandle(forWritingAtPath: log))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program ?? executable)
        p.arguments = program == nil ? args : Array(args.dropFirst())
        p.standardOutput = out
        p.standardError = out
        p.standardInput = FileHandle.nullDevice
        try p.run()
        return (p, log)
    }

    /// Waits (bounded) until the netns holds all of meshtrace's rules: the trace applies one transaction per table,
    /// so the first twin seen may be the mangle table's with the nat table's still to come (a test that read the
    /// rules then saw them change under it). All are in once their count holds for 400 ms.
    func waitForTwins(_ ns: ScratchNetns, _ p: Process) throws {
        let deadline = Date().addingTimeInterval(20)
        var last = 0, steady = 0
        while Date() < deadline {
            let count = try ns.run(["iptables-save"]).stdout.components(separatedBy: "--comment meshtrace").count - 1
            if count > 0 && count == last { steady += 1 } else { steady = 0 }
            if steady == 8 { return }
            last = count
            XCTAssertTrue(p.isRunning, "trace exited before instrumenting")
            if !p.isRunning { return }
            usleep(50_000)
        }
        XCTFail("meshtrace's rules did not appear, or kept changing, for 20 s")
    }

    func waitForExit(_ p: Process, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        return !p.isRunning
    }

    func stopsCleanly(on sig: Int32) throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "\(5500 + UInt16(sig))", "--duration", "60", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        kill(p.processIdentifier, sig)
        guard waitForExit(p) else { return XCTFail("trace did not exit after signal \(sig)") }
        XCTAssertEqual(p.terminationReason, .exit, "killed by the signal instead of unwinding")
        XCTAssertEqual(p.terminationStatus, 0, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    func testSIGINTRemovesTheRules() throws { try stopsCleanly(on: SIGINT) }
    func testSIGTERMRemovesTheRules() throws { try stopsCleanly(on: SIGTERM) }
    func testSIGHUPRemovesTheRules() throws { try stopsCleanly(on: SIGHUP) }
    /// Ctrl-\ dumped core and SIGUSR1/SIGALRM killed the trace, each leaving every twin in the pod.
    func testSIGQUITRemovesTheRules() throws { try stopsCleanly(on: SIGQUIT) }
    func testSIGUSR1RemovesTheRules() throws { try stopsCleanly(on: SIGUSR1) }
    func testSIGALRMRemovesTheRules() throws { try stopsCleanly(on: SIGALRM) }

    func testNormalEndRemovesTheRules() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let r = try Command.run([executable, "trace", "--netns", ns.name, "--group", "5510", "--duration", "1", "--quiet"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("rule hits (meshtrace / kernel counter)"), r.stdout)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
        // The reader yields by default (where SCHED_FIFO is allowed), and not with --no-yield.
        XCTAssertEqual(r.stdout.contains("reader at normal priority"), !ReaderPriorityTests.realtimeAllowed(), r.stdout)
        let kept = try Command.run([executable, "trace", "--netns", ns.name, "--group", "5510", "--duration", "1", "--quiet", "--no-yield"])
        XCTAssertEqual(kept.status, 0, kept.stderr)
        XCTAssertTrue(kept.stdout.contains("reader at normal priority"), kept.stdout)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// The number right before `label` in the text summary's `trace:` line ("…, 920000 NFLOG events, …").
    static func summaryCount(_ label: String, in line: String) -> Int? {
        // A count of 1 has the singular ("1 NFLOG event", "1 packet captured", "1 connection").
        let singular = ["NFLOG events": "NFLOG event,", "packets captured": "packet captured", "connections": "connection,"][label]
        guard let r = line.range(of: " \(label)") ?? singular.flatMap({ line.range(of: " \($0)") }) else { return nil }
        return Int(line[..<r.lowerBound].split(separator: " ").last ?? "")
    }

    /// `--rules-only` (or `--no-capture`): the rule hits and no packet capture. Traffic on the netns's lo (a refused
    /// TCP connection) hits the mangle OUTPUT/PREROUTING jumps' twins either way; only the default captures packets.
    func testRulesOnlyReportsRuleHitsWithoutCapturingPackets() throws {
        let ns = try seededNetns()
        func traced(_ extra: [String]) throws -> String {
            let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5513", "--duration", "60", "--quiet"] + extra)
            defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
            try waitForTwins(ns, p)
            for port in 1...3 { _ = try? ns.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/\(port)"]) }
            usleep(300_000)
            kill(p.processIdentifier, SIGINT)
            guard waitForExit(p) else { XCTFail("trace did not exit after SIGINT"); return "" }
            XCTAssertEqual(p.terminationStatus, 0)
            let out = try String(contentsOfFile: log, encoding: .utf8)
            return try XCTUnwrap(out.split(separator: "\n").first { $0.hasPrefix("trace: ") }.map(String.init), out)
        }
        for flag in ["--rules-only", "--no-capture"] {
            let line = try traced([flag])
            XCTAssertGreaterThanOrEqual(Self.summaryCount("NFLOG events", in: line) ?? 0, 6, line)
            XCTAssertEqual(Self.summaryCount("packets captured", in: line), 0, line)
        }
        let line = try traced([])
        XCTAssertGreaterThanOrEqual(Self.summaryCount("NFLOG events", in: line) ?? 0, 6, line)
        XCTAssertGreaterThanOrEqual(Self.summaryCount("packets captured", in: line) ?? 0, 6, line)
    }

    func testAfterSIGKILLTheNextTraceRefusesAndCleanupRestoresTheRules() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5511", "--duration", "60", "--quiet"])
        defer { try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        kill(p.processIdentifier, SIGKILL)
        XCTAssertTrue(waitForExit(p))
        XCTAssertNotEqual(try InstrumenterTests.rulesText(ns), before, "SIGKILL cannot clean up; the twins must still be there")

        let again = try Command.run([executable, "trace", "--netns", ns.name, "--group", "5512", "--duration", "1", "--quiet"])
        XCTAssertEqual(again.status, ExitStatus.leftovers.rawValue, again.stderr)
        XCTAssertTrue(again.stderr.contains("meshtrace cleanup"), again.stderr)
        XCTAssertEqual(again.stderr.split(separator: "\n").count, 1)
        XCTAssertTrue(again.stderr.contains("meshtrace cleanup --netns \(ns.name)`"), again.stderr)
        // Named by a pid, the hint names it by that pid (it said `--netns pid N`, which no command takes).
        let app = try Command.start(["sleep", "30"], in: ns.ref)
        defer { kill(app.processIdentifier, SIGKILL) }
        let byPid = try Command.run([executable, "trace", "--pid", "\(app.processIdentifier)", "--group", "5512", "--duration", "1", "--quiet"])
        XCTAssertEqual(byPid.status, ExitStatus.leftovers.rawValue, byPid.stderr)
        XCTAssertTrue(byPid.stderr.contains("meshtrace cleanup --pid \(app.processIdentifier)`"), byPid.stderr)

        let cleanup = try Command.run([executable, "cleanup", "--netns", ns.name])
        XCTAssertEqual(cleanup.status, 0, cleanup.stderr)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    func testBusyGroupIsOneLineExit6AndNoRulesAreLeft() throws {
        try XCTSkipIf(Command.which("tcpdump") == nil, "tcpdump holds the group in this test")
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: Command.which("nsenter")!)
        // -Z root: tcpdump hands its output file to its own user, and that file here is the machine's /dev/null.
        holder.arguments = ["--net=\(ns.ref.path)", "--", Command.which("tcpdump")!, "-Z", "root", "-i", "nflog:5513", "-w", "/dev/null"]
        let err = Pipe()
        holder.standardError = err
        holder.standardOutput = FileHandle.nullDevice
        try holder.run()
        defer { if holder.isRunning { holder.terminate(); holder.waitUntilExit() } }
        // tcpdump says "listening on nflog:5513" once it has bound the group.
        var said = Data()
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, !String(decoding: said, as: UTF8.self).contains("listening") {
            said += err.fileHandleForReading.availableData
        }
        let r = try Command.run([executable, "trace", "--netns", ns.name, "--group", "5513", "--duration", "1"])
        XCTAssertEqual(r.status, ExitStatus.nflogGroupBusy.rawValue, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.hasPrefix("meshtrace: "), r.stderr)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// A second trace on a pod another trace is tracing right now (on another group) finds the first one's twins.
    /// They are not a killed run's leftovers: their group is being read. It says so and refuses, also with
    /// `--replace` (which would have taken the running trace's rules away), and the first trace is untouched.
    func testASecondTraceOnAPodBeingTracedRefusesAndLeavesTheFirstAlone() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let (first, log) = try start(["trace", "--netns", ns.name, "--group", "5516", "--duration", "60", "--quiet"])
        defer { if first.isRunning { kill(first.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, first)
        let during = try InstrumenterTests.rulesText(ns)
        for extra in [[], ["--replace"]] {
            let r = try Command.run(["timeout", "-s", "KILL", "30", executable, "trace", "--netns", ns.name, "--group", "5517", "--duration", "1", "--quiet"] + extra)
            XCTAssertEqual(r.status, ExitStatus.leftovers.rawValue, "\(extra): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains("is being traced right now") && r.stderr.contains("NFLOG group 5516"), r.stderr)
            XCTAssertEqual(try InstrumenterTests.rulesText(ns), during, "the first trace's rules changed")
        }
        // `plan` on it says the same (it used to say "run `meshtrace cleanup` first").
        let plan = try Command.run([executable, "plan", "--netns", ns.name])
        XCTAssertEqual(plan.status, ExitStatus.leftovers.rawValue, plan.stderr)
        XCTAssertTrue(plan.stderr.contains("is being traced right now"), plan.stderr)
        kill(first.processIdentifier, SIGINT)
        guard waitForExit(first) else { return XCTFail("the first trace did not exit after SIGINT") }
        XCTAssertEqual(first.terminationStatus, 0, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// `cleanup` on a pod being traced right now refuses (exit 9, one line naming the group) and leaves the running
    /// trace's rules exactly as they are; the trace goes on seeing traffic. It used to remove them silently (exit 0),
    /// leaving the trace blind. `--force` removes them, and the trace still ends cleanly.
    func testCleanupRefusesWhileATraceIsRunningUnlessForced() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5521", "--duration", "60", "--quiet", "--rules-only"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        let during = try InstrumenterTests.rulesText(ns)
        let app = try Command.start(["sleep", "30"], in: ns.ref)
        defer { kill(app.processIdentifier, SIGKILL) }
        for target in [["--netns", ns.name], ["--pid", "\(app.processIdentifier)"]] {
            let r = try Command.run(["timeout", "-s", "KILL", "30", executable, "cleanup"] + target)
            XCTAssertEqual(r.status, ExitStatus.leftovers.rawValue, "\(target): \(r.stdout) \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.hasPrefix("meshtrace: ") && r.stderr.contains("is being traced right now")
                          && r.stderr.contains("NFLOG group 5521") && r.stderr.contains("--force"), r.stderr)
            XCTAssertTrue(r.stderr.contains("meshtrace cleanup \(target.joined(separator: " ")) --force`"), r.stderr)
            XCTAssertEqual(try InstrumenterTests.rulesText(ns), during, "cleanup touched the running trace's rules")
        }
        // The trace still sees the pod's traffic: its twins' counters move.
        func twinPackets() throws -> Int {
            let saved = try ns.run(["iptables-save", "-c"]).stdout
            return saved.split(separator: "\n").filter { $0.contains("--comment meshtrace") }
                .compactMap { line -> Int? in
                    guard line.hasPrefix("["), let colon = line.firstIndex(of: ":") else { return nil }
                    return Int(line[line.index(after: line.startIndex)..<colon])
                }.reduce(0, +)
        }
        let hitsBefore = try twinPackets()
        for port in 1...3 { _ = ns.attempt(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/\(port)"]) }
        XCTAssertGreaterThan(try twinPackets(), hitsBefore, "the twins saw no traffic after the refused cleanup")
        XCTAssertTrue(p.isRunning, "the trace ended")

        let forced = try Command.run(["timeout", "-s", "KILL", "30", executable, "cleanup", "--netns", ns.name, "--force"])
        XCTAssertEqual(forced.status, 0, forced.stderr)
        XCTAssertTrue(forced.stdout.contains("removed"), forced.stdout)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("the trace did not exit after SIGINT") }
        XCTAssertEqual(p.terminationReason, .exit)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
        // With nothing left, cleanup says so and exits 0.
        let again = try Command.run([executable, "cleanup", "--netns", ns.name])
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertTrue(again.stdout.contains("no meshtrace rules"), again.stdout)
    }

    /// A --duration too long for a deadline in nanoseconds (1e300) traces until a signal like no --duration: it trapped
    /// converting it (exit 132) with the twins in, and left them in the pod. `inf` is a usage error (64), touching nothing.
    func testAnEnormousDurationTracesUntilStoppedAndInfinityIsAUsageError() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5522", "--duration", "1e300", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        usleep(300_000)
        XCTAssertTrue(p.isRunning, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        XCTAssertEqual(p.terminationReason, .exit)
        XCTAssertEqual(p.terminationStatus, 0, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
        for bad in ["inf", "nan", "-1", "0"] {
            let r = try Command.run(["timeout", "-s", "KILL", "30", executable, "trace", "--netns", ns.name, "--duration", bad, "--quiet"])
            XCTAssertEqual(r.status, ExitStatus.usage.rawValue, "\(bad): \(r.stderr)")
            XCTAssertEqual(try InstrumenterTests.rulesText(ns), before, bad)
        }
    }

    /// A `-w` file that cannot be written (a full disk; /dev/full here) is exit 2 with one line naming it, not exit 0
    /// with a short or empty file: pcap_dump reports nothing, and the final flush's error was swallowed.
    func testAWriteFileThatCannotBeWrittenIsAnErrorAndTheRulesComeOut() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5523", "--duration", "60", "--quiet", "-w", "/dev/full"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        for port in 1...3 { _ = ns.attempt(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/\(port)"]) }
        usleep(300_000)
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        let out = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationReason, .exit)
        XCTAssertEqual(p.terminationStatus, ExitStatus.badInput.rawValue, out)
        let errors = out.split(separator: "\n").filter { $0.hasPrefix("meshtrace: ") }
        XCTAssertEqual(errors.count, 1, out)
        XCTAssertTrue(errors.first?.contains("cannot write /dev/full") == true, out)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// `plan > FILE` on a full disk (/dev/full here) is exit 2 with one line: print's failed writes were never
    /// checked, so the operator got an empty plan and exit 0. Same for `cleanup`'s line (its work is done).
    func testPlanIntoAFullDiskIsAnError() throws {
        let ns = try seededNetns()
        for command in ["plan", "cleanup"] {
            let r = try Command.run(["timeout", "-s", "KILL", "30", "bash", "-c", "exec \"$0\" \(command) --netns \(ns.name) > /dev/full", executable])
            XCTAssertEqual(r.status, ExitStatus.badInput.rawValue, "\(command): \(r.stderr)")
            XCTAssertEqual(r.stderr, "meshtrace: cannot write the output: No space left on device\n", command)
        }
        let ok = try Command.run([executable, "plan", "--netns", ns.name])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertEqual(ok.stderr, "")
    }

    /// After a SIGKILLed `--mode trace` on an nf_tables pod, `cleanup` removes the twins and the trace's own nft
    /// table, and says both. A run that left only the table was "no meshtrace rules" although cleanup removed it.
    func testCleanupAfterAKilledTraceModeRunSaysItRemovedTheTraceTable() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5527", "--mode", "trace", "--duration", "60", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        func hasTable() throws -> Bool { try ns.run(["nft", "list", "tables"]).stdout.contains("table inet \(Instrumenter.traceTableName)") }
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline, p.isRunning, !(try hasTable()) { usleep(50_000) }
        try waitForTwins(ns, p)
        XCTAssertTrue(try hasTable(), (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        kill(p.processIdentifier, SIGKILL)
        XCTAssertTrue(waitForExit(p))
        let r = try Command.run([executable, "cleanup", "--netns", ns.name])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("meshtrace rules and --mode trace's nft table (inet \(Instrumenter.traceTableName))"), r.stdout)
        XCTAssertFalse(try hasTable())
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
        // Only the table left (the twins removed by hand): said as such, not "no meshtrace rules".
        try ns.run(["nft", "add", "table", "inet", Instrumenter.traceTableName])
        let again = try Command.run([executable, "cleanup", "--netns", ns.name])
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertTrue(again.stdout.hasPrefix("removed --mode trace's nft table"), again.stdout)
        XCTAssertFalse(try hasTable())
    }

    /// `--mode trace` on a legacy pod binds nfnetlink_log as the netns's nf_log backend (legacy TRACE reaches
    /// meshtrace through it). After a SIGKILL that binding stayed: the pod's LOG/TRACE went to an NFLOG group 0
    /// nobody reads, and `cleanup` removed the rules but never put the backend back (nor did any later trace,
    /// which took nfnetlink_log for the pod's own). The TRACE rules record the backends; removal restores them.
    func testCleanupAfterAKilledLegacyTraceModeRunPutsTheLogBackendBack() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let ns = try makeNetns()
        try ns.run(["iptables-legacy-restore"], input: InstrumenterTests.seed)
        func logger(_ pf: Int) throws -> String {
            try ns.run(["cat", "/proc/sys/net/netfilter/nf_log/\(pf)"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        let prior = (try logger(2), try logger(10))
        try XCTSkipIf(prior.0 == "nfnetlink_log", "this kernel binds nfnetlink_log already")
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5524", "--mode", "trace", "--duration", "60", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline, p.isRunning, !(try ns.run(["iptables-legacy-save", "-t", "raw"]).stdout.contains("-j TRACE")) { usleep(50_000) }
        XCTAssertTrue(try ns.run(["iptables-legacy-save", "-t", "raw"]).stdout.contains("-j TRACE"),
                      (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        XCTAssertEqual(try logger(2), "nfnetlink_log", "the trace binds nfnetlink_log for legacy TRACE")
        kill(p.processIdentifier, SIGKILL)
        XCTAssertTrue(waitForExit(p))
        XCTAssertEqual(try logger(2), "nfnetlink_log", "a SIGKILL cannot put it back")

        // `--mode trace --replace` over the leftovers: its own socket reads group 0 while it removes them, so it
        // takes over the recorded backends and puts them back when it ends (it kept nfnetlink_log as "the prior").
        let replaced = try Command.run(["timeout", "-s", "KILL", "30", executable, "trace", "--netns", ns.name, "--group", "5524",
                                        "--mode", "trace", "--replace", "--duration", "1", "--quiet"])
        XCTAssertEqual(replaced.status, 0, replaced.stderr)
        XCTAssertEqual(try logger(2), prior.0, "after trace --mode trace --replace")
        XCTAssertEqual(try logger(10), prior.1, "after trace --mode trace --replace")
        XCTAssertEqual(try InstrumenterTests.rulesText(ns).replacingOccurrences(of: "*raw\n:PREROUTING ACCEPT \n:OUTPUT ACCEPT \nCOMMIT\n", with: ""), before)

        // Killed again: cleanup puts them back.
        let (again, againLog) = try start(["trace", "--netns", ns.name, "--group", "5524", "--mode", "trace", "--duration", "60", "--quiet"])
        defer { if again.isRunning { kill(again.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: againLog) }
        let deadline2 = Date().addingTimeInterval(20)
        while Date() < deadline2, again.isRunning, !(try ns.run(["iptables-legacy-save", "-t", "raw"]).stdout.contains("-j TRACE")) { usleep(50_000) }
        kill(again.processIdentifier, SIGKILL)
        XCTAssertTrue(waitForExit(again))
        XCTAssertEqual(try logger(2), "nfnetlink_log")
        let cleanup = try Command.run(["timeout", "-s", "KILL", "30", executable, "cleanup", "--netns", ns.name])
        XCTAssertEqual(cleanup.status, 0, cleanup.stderr)
        XCTAssertEqual(try logger(2), prior.0)
        XCTAssertEqual(try logger(10), prior.1)
        // The raw table the TRACE rules needed stays (a legacy table cannot be unregistered); it is empty again.
        let raw = try ns.run(["iptables-legacy-save", "-t", "raw"]).stdout
        XCTAssertFalse(raw.contains("-A "), raw)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns).replacingOccurrences(of: "*raw\n:PREROUTING ACCEPT \n:OUTPUT ACCEPT \nCOMMIT\n", with: ""), before)
    }

    /// `--netns A --pid B` names two namespaces: a usage error (64) from every live command, touching nothing.
    /// The pid's was used and --netns ignored without a word (cleanup removed rules from a netns not asked for).
    func testNetnsAndPidTogetherAreAUsageError() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let app = try Command.start(["sleep", "30"], in: ns.ref)
        defer { kill(app.processIdentifier, SIGKILL) }
        for cmd in [["trace", "--duration", "1"], ["plan"], ["cleanup"]] {
            let r = try Command.run(["timeout", "-s", "KILL", "30", executable] + cmd + ["--netns", "no-such-ns", "--pid", "\(app.processIdentifier)"])
            XCTAssertEqual(r.status, ExitStatus.usage.rawValue, "\(cmd): \(r.stdout) \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains("not both"), r.stderr)
        }
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// `--pid` of a host-network process (or `--netns` naming the node's netns) is the node's own network namespace:
    /// ambient does not capture there, and a trace would put its twins into the node's rules. Refused (exit 2,
    /// one line naming --host-netns) before anything is read or touched. Here the node is this machine's root netns,
    /// which the tests never change: only the refusal is tested.
    func testTheNodesOwnNetworkNamespaceIsRefusedWithoutHostNetns() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let before = try Command.run(["iptables-save"]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.hasPrefix(":") }
        for target in [["--pid", "\(getpid())"], ["--netns", "/proc/\(getpid())/ns/net"], ["--netns", "/proc/self/ns/net"]] {
            let r = try Command.run(["timeout", "-s", "KILL", "30", executable, "trace"] + target + ["--duration", "1", "--quiet"])
            XCTAssertEqual(r.status, ExitStatus.badInput.rawValue, "\(target): \(r.stdout) \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains("node's own network namespace") && r.stderr.contains("--host-netns"), r.stderr)
        }
        XCTAssertEqual(try Command.run(["iptables-save"]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.hasPrefix(":") }, before)
        // A pod's netns is not the node's.
        let ns = try makeNetns()
        XCTAssertFalse(try NetnsRef.resolve(netns: ns.name, pid: nil).isNodeNetns)
    }

    /// The summary line counts in words that agree with the count: "1 connection", "0 ztunnel hops" (it said
    /// "1 connections, 1 ztunnel hops" after every one-connection trace).
    func testTheSummaryLineSaysOneConnectionInTheSingular() throws {
        let ns = try seededNetns()
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5534", "--duration", "60", "--quiet", "--color", "never"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        _ = try? ns.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9"])
        usleep(300_000)
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        let out = try String(contentsOfFile: log, encoding: .utf8)
        let line = try XCTUnwrap(out.split(separator: "\n").first { $0.hasPrefix("trace: ") }.map(String.init), out)
        XCTAssertTrue(line.hasSuffix(", 1 connection, 0 ztunnel hops, 0 escapes"), line)
        XCTAssertTrue(line.contains(" packets captured, "), line)
        XCTAssertEqual(Self.summaryCount("connections", in: line), 1, line)
    }

    /// `--host-netns` traces the netns meshtrace itself runs in. The node stands in as a scratch netns holding the seed
    /// ruleset, with meshtrace started inside it (`ip netns exec`), so the root netns's rules are never touched:
    /// without the flag it is refused as the node's own (exit 2, rules unchanged); with it, the twins go in, lo
    /// traffic is traced, and the rules come back out exactly.
    func testHostNetnsTracesTheNamespaceMeshtraceRunsIn() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let refused = try Command.run(["timeout", "-s", "KILL", "30", "ip", "netns", "exec", ns.name, executable, "trace",
                                       "--netns", ns.name, "--group", "5532", "--duration", "1", "--quiet"])
        XCTAssertEqual(refused.status, ExitStatus.badInput.rawValue, refused.stdout + refused.stderr)
        XCTAssertTrue(refused.stderr.contains("node's own network namespace"), refused.stderr)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)

        let (p, log) = try start(["ip", "netns", "exec", ns.name, executable, "trace", "--netns", ns.name,
                                  "--host-netns", "--group", "5532", "--duration", "60", "--quiet"], program: "/usr/sbin/ip")
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        for port in 1...3 { _ = try? ns.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/\(port)"]) }
        usleep(300_000)
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        let out = try String(contentsOfFile: log, encoding: .utf8)
        XCTAssertEqual(p.terminationStatus, 0, out)
        let line = try XCTUnwrap(out.split(separator: "\n").first { $0.hasPrefix("trace: ") }.map(String.init), out)
        XCTAssertGreaterThanOrEqual(Self.summaryCount("NFLOG events", in: line) ?? 0, 6, line)
        XCTAssertGreaterThanOrEqual(Self.summaryCount("connections", in: line) ?? 0, 3, line)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// stdout a pipe that nobody reads (`| less` left on a page): the reading thread blocks in its write. A SIGTERM
    /// took the rules out and then waited for the pipe for ever. Now the trace gives the output up after 2 s,
    /// exits 2 with one line on stderr, and the rules are as they were.
    func testAStopWithStdoutBlockedEndsTheTraceAndRemovesTheRules() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let pipe = Pipe()   // never read
        let errLog = NSTemporaryDirectory() + "mt-stall-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).err"
        XCTAssertTrue(FileManager.default.createFile(atPath: errLog, contents: nil), "cannot create a scratch file")
        defer { try? FileManager.default.removeItem(atPath: errLog) }
        let err = try XCTUnwrap(FileHandle(forWritingAtPath: errLog))
        defer { try? err.close() }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = ["trace", "--netns", ns.name, "--group", "5533", "--duration", "120", "--color", "never"]
        p.standardOutput = pipe
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        try waitForTwins(ns, p)
        // Refused lo connections, a few timeline lines each, until the pipe's 64 KiB are full (bounded).
        _ = try ns.run(["bash", "-c", "for i in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/9) 2>/dev/null; done; true"])
        // The connections are printed once they finish (~0.5 s after their RST): wait for a thread blocked in the
        // pipe's write.
        var blocked = false
        for _ in 0..<100 where !blocked {
            usleep(100_000)
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(p.processIdentifier)/task")) ?? []
            blocked = tasks.contains {
                (try? String(contentsOfFile: "/proc/\(p.processIdentifier)/task/\($0)/wchan", encoding: .utf8))?.contains("pipe_write") == true
            }
        }
        XCTAssertTrue(blocked, "the trace's output did not fill the pipe: the test did not test the stall")
        let stopped = Date()
        kill(p.processIdentifier, SIGTERM)
        guard waitForExit(p, seconds: 20) else { return XCTFail("the trace did not end after SIGTERM with stdout blocked") }
        XCTAssertLessThan(Date().timeIntervalSince(stopped), 10)
        XCTAssertEqual(p.terminationReason, .exit)
        XCTAssertEqual(p.terminationStatus, ExitStatus.badInput.rawValue)
        let said = try String(contentsOfFile: errLog, encoding: .utf8)
        XCTAssertEqual(said.split(separator: "\n").count, 1, said)
        XCTAssertTrue(said.contains("the trace was stopped while stdout took nothing for 2 s"), said)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
        try? pipe.fileHandleForReading.close()
    }

    /// A copy too short for the headers it is decoded from made every NFLOG event "partly decoded" (no ports, no
    /// TCP flags, no connection): `--snaplen` takes 64 or more, for trace and plan, before anything is touched.
    func testASnaplenTooShortForTheHeadersIsAUsageError() throws {
        let rules = ProjectPaths.samples.appendingPathComponent("outbound-client-rules.txt").path
        for cmd in [["trace", "--netns", "no-such-ns", "--duration", "1"], ["plan", "--rules", rules]] {
            for short in ["16", "63"] {
                let r = try Command.run(["timeout", "-s", "KILL", "30", executable] + cmd + ["--snaplen", short])
                XCTAssertEqual(r.status, ExitStatus.usage.rawValue, "\(cmd) --snaplen \(short): \(r.stdout) \(r.stderr)")
                XCTAssertTrue(r.stderr.contains("64...65535"), r.stderr)
            }
        }
        let ok = try Command.run([executable, "plan", "--rules", rules, "--snaplen", "64"])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(ok.stdout.contains("--nflog-size 64"), ok.stdout)
    }

    /// istio-cni re-applies a pod's rules (a full iptables-restore: the twins go with the old tables) while a trace
    /// runs. The trace is blind from then on; its summary says so. It said the kernel and meshtrace "differ by -N
    /// hits (packets in flight while the rules were read and removed)", which is not what happened.
    func testTwinsTakenOutUnderARunningTraceAreSaidSo() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let original = try ns.run(["iptables-save"]).stdout
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5525", "--duration", "60", "--quiet", "--rules-only"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        for port in 1...3 { _ = ns.attempt(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/\(port)"]) }
        usleep(300_000)
        try ns.run(["iptables-restore"], input: original)
        XCTAssertFalse(try ns.run(["iptables-save"]).stdout.contains("meshtrace"))
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        let out = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationStatus, 0, out)
        XCTAssertTrue(out.contains("twins were gone from the pod when the trace ended"), out)
        XCTAssertFalse(out.contains("packets in flight"), out)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
        // A trace whose twins stayed says nothing of the kind.
        let normal = try Command.run(["timeout", "-s", "KILL", "30", executable, "trace", "--netns", ns.name, "--group", "5525", "--duration", "1", "--quiet"])
        XCTAssertEqual(normal.status, 0, normal.stderr)
        XCTAssertFalse(normal.stdout.contains("twins were gone"), normal.stdout)
    }

    /// Two traces started on one pod at the same moment (two operators, a script run twice): both read "no twins",
    /// both applied theirs, each found the other's misplaced and both rolled back, exit 8 with a wrong reason
    /// ("twin ... sits before rule 1"). Installs take turns now: one traces, the other says the pod is being
    /// traced (exit 9), and the rules come back exactly.
    func testTwoTracesStartedTogetherOneTracesTheOtherRefuses() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        for round in 0..<3 {
            let runs = try [5526, 5527].map { group in
                try start(["trace", "--netns", ns.name, "--group", "\(group)", "--duration", "3", "--quiet"])
            }
            defer { for (p, log) in runs { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) } }
            for (p, _) in runs { XCTAssertTrue(waitForExit(p, seconds: 30), "round \(round): a trace did not end") }
            let logs = runs.map { (try? String(contentsOfFile: $0.1, encoding: .utf8)) ?? "" }
            let statuses = runs.map { $0.0.terminationStatus }
            XCTAssertEqual(statuses.sorted(), [0, ExitStatus.leftovers.rawValue], "round \(round): \(logs)")
            if let loser = statuses.firstIndex(of: ExitStatus.leftovers.rawValue) {
                XCTAssertTrue(logs[loser].contains("is being traced right now"), logs[loser])
                XCTAssertEqual(logs[loser].split(separator: "\n").count, 1, logs[loser])
            }
            XCTAssertEqual(try InstrumenterTests.rulesText(ns), before, "round \(round)")
        }
    }

    /// A foreign rule ahead of Istio's jump with a hashlimit (2 SYNs to :7777, then drop): tracing must not change
    /// what it decides. Its twin, a copy of the match, drained the same named bucket first, and the pod's second
    /// connection was dropped while the trace ran. Now the rule has no twin and the summary says so.
    func testTracingDoesNotChangeTheVerdictOfARuleWithAStatefulMatch() throws {
        let ns = try seededNetns()
        try ns.run(["iptables", "-t", "mangle", "-I", "PREROUTING", "1", "-p", "tcp", "--dport", "7777", "--syn",
                    "-m", "hashlimit", "--hashlimit-name", "mt\(getpid() % 100000)", "--hashlimit-above", "1/hour",
                    "--hashlimit-burst", "2", "-j", "DROP"])
        let before = try InstrumenterTests.rulesText(ns)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5528", "--duration", "60", "--quiet", "--rules-only"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        // Nothing listens on :7777: a SYN let through is answered by a RST (refused); a dropped one times out.
        let verdicts = (1...3).map { _ in
            ns.attempt(["timeout", "2", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7777"]).stderr.contains("refused") ? "pass" : "drop"
        }
        XCTAssertEqual(verdicts, ["pass", "pass", "drop"], "the hashlimit decided differently while traced")
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        let out = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationStatus, 0, out)
        XCTAssertTrue(out.contains("mangle PREROUTING #1 has no twin (its match `-m hashlimit`"), out)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// A trace waiting its turn to add twins (another meshtrace holds the netns's lock) stops at once on SIGTERM,
    /// touching nothing, instead of waiting out the lock first.
    func testATraceWaitingForTheNetnsLockStopsOnASignal() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let holder = try Command.start(["flock", "-o", ns.ref.path, "sleep", "12"])
        defer { kill(holder.processIdentifier, SIGKILL) }
        usleep(300_000)
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5529", "--duration", "60", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        usleep(800_000)
        XCTAssertFalse(try ns.run(["iptables-save"]).stdout.contains("meshtrace"), "the lock did not hold the trace back")
        kill(p.processIdentifier, SIGTERM)
        guard waitForExit(p, seconds: 3) else { return XCTFail("the trace waited for the lock instead of stopping") }
        let out = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationStatus, 0, out)
        XCTAssertTrue(out.contains("stopped before the rules were added"), out)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// A timeline is printed when its connection finishes, not when the printer's buffer fills or the trace ends
    /// (it waited for 64 KiB of output: a quiet pod's connections showed up only at Ctrl-C).
    func testATimelineIsWrittenWhileTheTraceRuns() throws {
        let ns = try seededNetns()
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5518", "--duration", "60", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        _ = try? ns.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7"])
        let deadline = Date().addingTimeInterval(10)
        var written = ""
        while Date() < deadline, p.isRunning {
            written = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            if written.contains("127.0.0.1:7 ") { break }
            usleep(50_000)
        }
        XCTAssertTrue(p.isRunning, "the trace ended early: \(written)")
        XCTAssertTrue(written.contains("#1 ") && written.contains("127.0.0.1:7 "), "nothing printed while the trace ran: \(written)")
        kill(p.processIdentifier, SIGINT)
        XCTAssertTrue(waitForExit(p))
    }

    /// `meshtrace trace | head`: when the reader of its output goes away the trace stops, removes its rules and
    /// exits 0, as tcpdump does, instead of tracing into a closed pipe until the duration (or forever).
    func testATraceWhoseOutputIsClosedStopsAndRemovesItsRules() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = ["trace", "--netns", ns.name, "--group", "5519", "--duration", "120", "--quiet"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        try waitForTwins(ns, p)
        let traffic = Date()
        _ = try? ns.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7"])
        // Read the first bytes of a timeline, then go away like `head`.
        let first = out.fileHandleForReading.readData(ofLength: 16)
        XCTAssertFalse(first.isEmpty)
        try out.fileHandleForReading.close()
        // More output to write into the closed pipe.
        for port in 8...40 { _ = try? ns.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/\(port)"]) }
        // (Foundation traps on the exit status of a running process: fail and let the defer kill it.)
        guard waitForExit(p, seconds: 30) else { return XCTFail("the trace kept running with its output closed") }
        // Well before the 120 s duration: the timeline came out at once, and the closed pipe ended the trace.
        XCTAssertLessThan(Date().timeIntervalSince(traffic), 60)
        XCTAssertEqual(p.terminationReason, .exit)
        XCTAssertEqual(p.terminationStatus, 0)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    /// The hint to run `meshtrace cleanup` names the namespace the way the user did: a pid as `--pid N`.
    func testCleanupHintsNameTheNamespaceAsTheUserDid() throws {
        let byPid = try NetnsRef.resolve(netns: nil, pid: getpid())
        XCTAssertEqual(byPid.commandLine, "--pid \(getpid())")
        XCTAssertEqual(try NetnsPin(byPid).ref.commandLine, "--pid \(getpid())")
        XCTAssertEqual(try NetnsRef.resolve(netns: "/proc/\(getpid())/ns/net", pid: nil).commandLine, "--netns /proc/\(getpid())/ns/net")
    }

    func testMissingNetnsIsExit4() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        for cmd in ["trace", "cleanup", "plan"] {
            let r = try Command.run([executable, cmd, "--netns", "mt-no-such-netns-\(getpid())"])
            XCTAssertEqual(r.status, ExitStatus.noSuchNetns.rawValue, "\(cmd): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1)
        }
    }

    /// `--pid` names the pod by a process, and processes come and go (an app container restarting) while the
    /// netns stays. The trace holds its own handle on the netns (`NetnsPin`) and removes its rules through it:
    /// before, it went through /proc/PID/ns/net, which was gone, and exited 0 leaving every twin in the pod.
    func testWithPidTheRulesComeOutEvenWhenTheProcessExitsDuringTheTrace() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let app = try Command.start(["sleep", "120"], in: ns.ref)
        defer { if app.isRunning { kill(app.processIdentifier, SIGKILL) } }
        let (p, log) = try start(["trace", "--pid", "\(app.processIdentifier)", "--group", "5515", "--duration", "60", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        usleep(500_000)   // past the check that the rules went in as planned: the trace is running
        kill(app.processIdentifier, SIGKILL)
        app.waitUntilExit()
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/proc/\(app.processIdentifier)/ns/net"))
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        let out = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationStatus, 0, out)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before, out)
        XCTAssertTrue(out.contains("note: pid \(app.processIdentifier) exited during the trace"), out)
    }

    /// A named netns deleted and made again under its name during the trace: the twins came out of the one traced
    /// (through meshtrace's own handle), the new one is untouched, and the summary says the name changed hands
    /// (it said nothing: only a name that no longer existed was noticed).
    func testANetnsMadeAgainUnderItsNameDuringTheTraceIsSaidAndLeftAlone() throws {
        let ns = try seededNetns()
        let (p, log) = try start(["trace", "--netns", ns.name, "--group", "5531", "--duration", "60", "--quiet"])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; try? FileManager.default.removeItem(atPath: log) }
        try waitForTwins(ns, p)
        usleep(500_000)   // past the check that the rules went in as planned: the trace is running
        XCTAssertTrue(try Command.run(["ip", "netns", "del", ns.name]).ok)
        XCTAssertTrue(try Command.run(["ip", "netns", "add", ns.name]).ok)
        let fresh = try Command.run(["iptables-save"], in: ns.ref).stdout
        kill(p.processIdentifier, SIGINT)
        guard waitForExit(p) else { return XCTFail("trace did not exit after SIGINT") }
        let out = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationStatus, 0, out)
        XCTAssertTrue(out.contains("note: netns \(ns.name) was removed (and another made under its name, untouched) during the trace"), out)
        XCTAssertEqual(try Command.run(["iptables-save"], in: ns.ref).stdout, fresh, "the new netns was touched")
    }

    /// A path that exists but is not a network namespace: one clear line and exit 4 from every command, never a
    /// hang. (`trace --netns /etc/passwd` used to wait forever: its netns thread could not enter the file, so it
    /// never said whether its sockets opened, and a trace takes SIGTERM as a request to stop once it runs.)
    /// `timeout -s KILL` bounds a regression: exit 137 here, not a stuck test run.
    func testAFileThatIsNotANetworkNamespaceIsExit4AndNeverAHang() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let file = NSTemporaryDirectory() + "mt-not-a-netns-\(getpid())"
        XCTAssertTrue(FileManager.default.createFile(atPath: file, contents: Data("x".utf8)))
        defer { try? FileManager.default.removeItem(atPath: file) }
        for cmd in ["trace", "cleanup", "plan"] {
            let r = try Command.run(["timeout", "-s", "KILL", "30", executable, cmd, "--netns", file])
            XCTAssertEqual(r.status, ExitStatus.noSuchNetns.rawValue, "\(cmd): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains("is not a network namespace"), r.stderr)
        }
        // A namespace file of another kind is on nsfs too: entering it as a netns fails on the netns thread.
        let r = try Command.run(["timeout", "-s", "KILL", "30", executable, "trace", "--netns", "/proc/\(getpid())/ns/mnt", "--duration", "1"])
        XCTAssertEqual(r.status, ExitStatus.noSuchNetns.rawValue, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("is not a network namespace"), r.stderr)
    }

    /// A `--filter` libpcap cannot compile is a usage error, one line, before the pod is touched.
    func testBadFilterIsExit64AndNoRulesAreAdded() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let ns = try seededNetns()
        let before = try ns.run(["iptables-save"]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
        let r = try Command.run([executable, "trace", "--netns", ns.name, "--filter", "tcp port", "--duration", "1", "--quiet"])
        XCTAssertEqual(r.status, ExitStatus.usage.rawValue, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("bad filter 'tcp port'"), r.stderr)
        let after = try ns.run(["iptables-save"]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
        XCTAssertEqual(after, before)
    }

    func testPlanPrintsCommandsThatAddAndRemoveTheTwinsExactly() throws {
        let ns = try seededNetns()
        let before = try InstrumenterTests.rulesText(ns)
        let r = try Command.run([executable, "plan", "--netns", ns.name, "--group", "5514"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before, "plan must not change anything")
        // Steps 1 (add) and 3 (remove) are shell an operator pastes; run them as printed.
        let text = r.stdout
        func section(_ from: String, _ to: String) throws -> String {
            let a = try XCTUnwrap(text.range(of: from)), b = try XCTUnwrap(text.range(of: to))
            return String(text[a.upperBound..<b.lowerBound])
        }
        let add = try section("# 1. add", "# 2. collect")
        let remove = try section("# 3. remove", "# 4. analyze")
        XCTAssertTrue(add.contains("nsenter --net=\(ns.ref.path) -- iptables-nft-restore --noflush"))
        XCTAssertTrue(try Command.run(["bash", "-c", "set -e\n" + add.split(separator: "\n").dropFirst().joined(separator: "\n")]).ok)
        let instrumented = try ns.run(["iptables-save"]).stdout
        XCTAssertEqual(instrumented.components(separatedBy: "--comment meshtrace").count - 1, 12)
        XCTAssertTrue(instrumented.contains("--nflog-group 5514"))
        XCTAssertTrue(try Command.run(["bash", "-c", "set -e\n" + remove.split(separator: "\n").dropFirst().joined(separator: "\n")]).ok)
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }

    func testWithoutPrivilegesEveryLiveCommandIsExit5AndTouchesNothing() throws {
        try XCTSkipIf(Command.which("setpriv") == nil, "setpriv (util-linux) drops root for this test")
        let ns = try seededNetns()
        // A checkout under a root-only directory (/root) cannot be run by nobody at all.
        let reachable = try Command.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-x", executable])
        try XCTSkipUnless(reachable.ok, "the build directory is not reachable for an unprivileged user")
        let before = try InstrumenterTests.rulesText(ns)
        for cmd in ["trace", "cleanup", "plan"] {
            let r = try Command.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", executable, cmd, "--netns", ns.name])
            XCTAssertEqual(r.status, ExitStatus.noPrivilege.rawValue, "\(cmd): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        // Named by a root process's pid: its netns cannot be opened, which is the same privilege problem; it said
        // "no process N" (exit 4) of a process that exists.
        let app = try Command.start(["sleep", "30"], in: ns.ref)
        defer { kill(app.processIdentifier, SIGKILL) }
        for cmd in ["trace", "cleanup", "plan"] {
            let r = try Command.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", executable, cmd, "--pid", "\(app.processIdentifier)"])
            XCTAssertEqual(r.status, ExitStatus.noPrivilege.rawValue, "\(cmd) --pid: \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertFalse(r.stderr.contains("no process"), r.stderr)
        }
        XCTAssertEqual(try InstrumenterTests.rulesText(ns), before)
    }
}
