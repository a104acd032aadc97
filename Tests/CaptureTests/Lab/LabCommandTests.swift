import XCTest
@testable import Capture

/// The lab's command line and the samples it recorded, through the built CLI.
final class LabCommandTests: XCTestCase {
    private var executable: String { ProjectPaths.meshtrace }

    private func meshtrace(_ args: [String]) throws -> Command.Result {
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        return try Command.run([executable] + args)
    }

    func testBadLabArgumentsAreOneLineErrorsWithTheirExitCodes() throws {
        let scenario = try meshtrace(["lab", "--scenario", "no-such-scenario"])
        XCTAssertEqual(scenario.status, ExitStatus.usage.rawValue)
        XCTAssertTrue(scenario.stderr.contains("unknown scenario 'no-such-scenario'"), scenario.stderr)
        XCTAssertEqual(scenario.stderr.split(whereSeparator: \.isNewline).count, 1)

        let ruleset = try meshtrace(["lab", "--ruleset", "/etc/hostname"])
        XCTAssertEqual(ruleset.status, ExitStatus.badInput.rawValue, ruleset.stderr)

        let missing = try meshtrace(["lab", "--ruleset", "/no/such/file.txt"])
        XCTAssertEqual(missing.status, ExitStatus.badInput.rawValue, missing.stderr)

        let backend = try meshtrace(["lab", "--backend", "ipchains"])
        XCTAssertEqual(backend.status, ExitStatus.usage.rawValue, backend.stderr)

        let pooling = try meshtrace(["lab", "--pool-tunnels", "--multiplex-tunnels", "--scenario", "outbound"])
        XCTAssertEqual(pooling.status, ExitStatus.usage.rawValue, pooling.stderr)
        XCTAssertEqual(pooling.stderr, "meshtrace: --pool-tunnels and --multiplex-tunnels are two ways to pool tunnels: choose one\n")
        // --tunnel-streams limits a multiplexed tunnel's streams: alone, or below 1, it is a usage error before any lab.
        let streams = try meshtrace(["lab", "--tunnel-streams", "2", "--scenario", "outbound"])
        XCTAssertEqual(streams.status, ExitStatus.usage.rawValue, streams.stderr)
        XCTAssertEqual(streams.stderr, "meshtrace: --tunnel-streams limits the streams of a multiplexed tunnel: it needs --multiplex-tunnels\n")
        let none = try meshtrace(["lab", "--multiplex-tunnels", "--tunnel-streams", "0", "--scenario", "outbound"])
        XCTAssertEqual(none.status, ExitStatus.usage.rawValue, none.stderr)
        XCTAssertEqual(none.stderr, "meshtrace: --tunnel-streams takes a count of 1 or more\n")

        // The help says "not 0" (where legacy TRACE logs), as trace and plan do: the lab ran with it.
        let group = try meshtrace(["lab", "--nflog-group", "0", "--scenario", "outbound"])
        XCTAssertEqual(group.status, ExitStatus.usage.rawValue, group.stderr)

        // A --capture-dir that cannot be a directory is one line and exit 2 before any namespace is built: it was a
        // Foundation error dump and exit 1 ("an escape was found") after the lab came up.
        if Command.isRoot {
            for dir in ["/dev/null", "/etc/hostname/sub"] {
                let r = try meshtrace(["lab", "--capture-dir", dir, "--scenario", "outbound"])
                XCTAssertEqual(r.status, ExitStatus.badInput.rawValue, "\(dir): \(r.stderr)")
                XCTAssertEqual(r.stderr.split(whereSeparator: \.isNewline).count, 1, r.stderr)
                XCTAssertTrue(r.stderr.hasPrefix("meshtrace: cannot use --capture-dir \(dir): "), r.stderr)
                XCTAssertEqual(r.stdout, "", "the lab was built first")
            }
        }

        // A Foundation error while the lab runs (here: the rules file cannot be written, a directory has its name)
        // is one line and exit 2. It was ArgumentParser's dump of the NSError and exit 1, "an escape was found".
        if Command.isRoot {
            let dir = NSTemporaryDirectory() + "mt-capdir-\(getpid())"
            try FileManager.default.createDirectory(atPath: dir + "/outbound-client-rules.txt", withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let r = try meshtrace(["lab", "--capture-dir", dir, "--scenario", "outbound"])
            XCTAssertEqual(r.status, ExitStatus.badInput.rawValue, r.stderr)
            XCTAssertEqual(r.stderr.split(whereSeparator: \.isNewline).count, 1, r.stderr)
            XCTAssertTrue(r.stderr.hasPrefix("meshtrace: cannot write \(dir)/outbound-client-rules.txt"), r.stderr)
        }

        let list = try meshtrace(["lab", "--list"])
        XCTAssertEqual(list.status, 0)
        for s in Scenario.allCases { XCTAssertTrue(list.stdout.contains(s.rawValue)) }
    }

    /// samples/README.md says what each recording shows; the analyze engine must agree with it.
    func testSamplesAnalyzeAsTheirREADMESays() throws {
        let s = ProjectPaths.samples.path
        let outbound = try meshtrace(["analyze", "\(s)/outbound-client-any.pcap", "\(s)/outbound-client-nflog.pcap",
                                      "--rules", "\(s)/outbound-client-rules.txt", "--color", "never"])
        XCTAssertEqual(outbound.status, 0, outbound.stderr)
        XCTAssertTrue(outbound.stdout.contains("app-outbound") && outbound.stdout.contains("hbone-outbound"), outbound.stdout)
        XCTAssertTrue(outbound.stdout.contains("REDIRECT to :15001"), outbound.stdout)

        let inbound = try meshtrace(["analyze", "\(s)/inbound-hbone-server-any.pcap", "\(s)/inbound-hbone-server-nflog.pcap",
                                     "--rules", "\(s)/inbound-hbone-server-rules.txt", "--color", "never"])
        XCTAssertEqual(inbound.status, 0, inbound.stderr)
        XCTAssertTrue(inbound.stdout.contains("hbone-inbound") && inbound.stdout.contains("connmark set 0x111"), inbound.stdout)

        let escape = try meshtrace(["analyze", "\(s)/mark-escape-client-any.pcap", "\(s)/mark-escape-client-nflog.pcap",
                                    "--rules", "\(s)/mark-escape-client-rules.txt", "--color", "never"])
        XCTAssertEqual(escape.status, ExitStatus.escapeFound.rawValue, escape.stdout + escape.stderr)
        XCTAssertTrue(escape.stdout.contains("ESCAPE"), escape.stdout)
    }
}
