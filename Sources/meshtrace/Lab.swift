import ArgumentParser
import Capture
import Foundation

struct Lab: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "Build a real ambient pod pair from network namespaces, run scenarios through it, and trace them.",
        discussion: """
        Needs root. Builds a node, a client pod and a server pod (ambient rules + a ztunnel stand-in each) and a peer
        outside the mesh, all in their own network namespaces (mt-l<pid>-N); nothing touches the root namespace.
        Each scenario prints its expected verdict next to what the kernel showed and what meshtrace found.
        Everything is removed at the end, on Ctrl-C and on errors, unless --keep. See docs/LAB.md.
        """,
        subcommands: [Run.self, Down.self],
        defaultSubcommand: Run.self)

    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "run", abstract: "Build the lab, run the scenarios, tear it down (the default).")

        @Option(name: .long, parsing: .upToNextOption,
                help: "Scenarios to run (repeatable or comma-separated; default: all). --list names them.")
        var scenario: [String] = []

        @Option(name: .long, help: "The ruleset: seed (default), istio-default, nft, or a file (iptables-save, golden, nft).")
        var ruleset: String = "seed"

        @Option(name: .long, help: "What loads iptables-form rulesets: iptables-nft (default) or iptables-legacy.")
        var backend: String = "iptables-nft"

        @Flag(name: .long, help: "Leave the lab up afterwards and print how to poke at it (remove it with `meshtrace lab down`).")
        var keep = false

        @Flag(name: .long, help: "The ztunnel stand-ins keep HBONE connections open and reuse them for later connections to the same pod, as ztunnel pools them.")
        var poolTunnels = false

        @Flag(name: .long, help: "The ztunnel stand-ins send every connection to a pod through one HBONE connection, several at once, as ztunnel multiplexes HTTP/2 streams.")
        var multiplexTunnels = false

        @Option(name: .long, help: "With --multiplex-tunnels: at most N streams at once on one tunnel; more open another tunnel to the same pod (ztunnel's POOL_MAX_STREAMS_PER_CONNECTION, 100 by default).")
        var tunnelStreams: Int?

        @Flag(name: .long, help: "List the scenarios and the built-in rulesets, then exit.")
        var list = false

        @Option(name: .long, help: "Keep each scenario's files here: tcpdump -i any and -i nflog:G captures of the traced pod, and its rules.")
        var captureDir: String?

        @Option(name: .long, help: "NFLOG group for meshtrace's twins in the traced pod (not 0).")
        var nflogGroup: UInt16 = 5153

        @Flag(name: .long, help: "Timelines without their per-packet lines.")
        var brief = false

        @OptionGroup var output: OutputOptions

        func validate() throws {
            try TwinOptionChecks.group(nflogGroup, option: "--nflog-group")
        }

        /// --capture-dir is made (or found) before any namespace is built: a path that cannot be a directory is one
        /// line and exit 2, not a Foundation error (exit 1, "an escape was found") after the lab came up.
        private func prepareCaptureDirectory() throws {
            guard let captureDir else { return }
            // mkdir -p, with the system's reason when it cannot (Foundation's NSError text names neither).
            var path = captureDir.hasPrefix("/") ? "" : "."
            for part in captureDir.split(separator: "/") {
                path += "/" + part
                if mkdir(path, 0o755) != 0 && errno != EEXIST {
                    throw MeshtraceError.badInput("cannot use --capture-dir \(captureDir): \(path): \(String(cString: strerror(errno)))")
                }
            }
            var st = stat()
            guard stat(captureDir, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
                throw MeshtraceError.badInput("cannot use --capture-dir \(captureDir): it exists and is not a directory")
            }
        }

        func run() throws {
            try reportingErrors {
                do { return try runLab() } catch {
                    // A Ctrl-C tears the lab down under the running scenario; its failure is not the story.
                    LabTopology.waitIfInterrupted()
                    throw error
                }
            }
        }

        private func runLab() throws -> ExitStatus {
            if list { printList(); return .ok }
            let scenarios = try selectedScenarios()
            var options = LabOptions(executable: try selfExecutable())
            options.ruleset = try LabRuleset.named(ruleset)
            guard let b = LabBackend(rawValue: backend) else {
                throw MeshtraceError(.usage, "--backend takes \(LabBackend.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            options.backend = options.ruleset.form == .nftables ? .nftables : b
            options.dualStack = scenarios.contains { $0.needsDualStack }
            options.keep = keep
            guard !(poolTunnels && multiplexTunnels) else {
                throw MeshtraceError(.usage, "--pool-tunnels and --multiplex-tunnels are two ways to pool tunnels: choose one")
            }
            options.poolTunnels = poolTunnels
            options.multiplexTunnels = multiplexTunnels
            if let n = tunnelStreams {
                guard multiplexTunnels else { throw MeshtraceError(.usage, "--tunnel-streams limits the streams of a multiplexed tunnel: it needs --multiplex-tunnels") }
                guard n >= 1 else { throw MeshtraceError(.usage, "--tunnel-streams takes a count of 1 or more") }
                options.streamsPerTunnel = n
            }
            try prepareCaptureDirectory()

            LabTopology.tearDownOnSignals()
            let lab = try LabTopology(options: options)
            defer { lab.teardown() }
            let json = output.json
            if json { emitJSON(topologyRecord(lab)) } else { printTopology(lab) }

            // Live by default (the engine of `meshtrace trace`); with --capture-dir, recorded as an operator would
            // (twins + tcpdump) and read back by the engine of `meshtrace analyze`.
            let config = output.config
            let tracing: LabTracing = captureDir.map { PacketCaptureTracing(directory: $0, nflogGroup: nflogGroup, output: config) }
                ?? LiveTraceTracing(group: nflogGroup, showEvents: !brief, output: config)
            let runner = ScenarioRunner(lab: lab, tracing: tracing)
            var results: [ScenarioResult] = []
            for s in scenarios {
                let r = try runner.run(s)
                LabTopology.waitIfInterrupted()
                results.append(r)
                if json { emitJSON(scenarioRecord(r, lab: lab)) } else { printResult(r, lab: lab) }
            }
            if json {
                emitJSON(["type": "summary", "scenarios": results.count, "matching": results.filter(\.matches).count,
                          "mismatched": results.filter { !$0.matches }.map(\.scenario.rawValue), "kept": keep])
            } else {
                printSummary(results)
                if keep { printKeepHelp(lab) }
            }
            return results.allSatisfy(\.matches) ? .ok : .escapeFound
        }

        private func selectedScenarios() throws -> [Scenario] {
            let names = scenario.flatMap { $0.split(separator: ",").map(String.init) }
            return names.isEmpty ? Scenario.defaultSet : try names.map(Scenario.named)
        }

        private func printList() {
            print("Scenarios:")
            for s in Scenario.allCases { print("  \(s.rawValue.padding(toLength: 18, withPad: " ", startingAt: 0)) \(s.summary)") }
            print("Rulesets:")
            for r in LabRuleset.builtIn { print("  \(r.name.padding(toLength: 18, withPad: " ", startingAt: 0)) \(r.summary)") }
        }

        private func printTopology(_ lab: LabTopology) {
            print("meshtrace lab: ruleset \(lab.options.ruleset.name) (\(lab.options.backend.rawValue)), "
                  + (captureDir == nil ? "each scenario traced live (NFLOG group \(nflogGroup))"
                                       : "each scenario recorded into \(captureDir!) (NFLOG group \(nflogGroup)) and analyzed"))
            for pod in lab.pods {
                let what: String
                switch pod.role {
                case .node: what = "node: bridge, kubelet probe source \(LabTopology.probeSource), DNS at \(LabTopology.dnsServer)"
                case .client: what = "client pod: ambient rules, ztunnel stand-in"
                case .server: what = "server pod: ambient rules, ztunnel stand-in, app on :\(LabTopology.appPort)"
                case .peer: what = "peer outside the mesh: app on :\(LabTopology.appPort), UDP echo on :\(LabTopology.udpEchoPort)"
                }
                print("  \(pod.name.padding(toLength: 14, withPad: " ", startingAt: 0)) \(pod.addresses.map(\.description).joined(separator: " ").padding(toLength: 28, withPad: " ", startingAt: 0)) \(what)")
            }
            print("")
        }

        private func printResult(_ r: ScenarioResult, lab: LabTopology) {
            let traced = lab.pods.first { $0.role == r.scenario.tracedRole }!
            print("── \(r.scenario.rawValue): \(r.scenario.summary)")
            print("   traced in    \(traced.role.rawValue) pod (\(traced.name))")
            print("   app got      \(r.appOutcome)")
            print("   expected     \(r.expected.verdict.rawValue) — \(r.expected.because)")
            print("   kernel shows \(r.kernelVerdict?.rawValue ?? "no result (the traffic failed)")")
            print("   meshtrace    \(r.traced?.verdict?.rawValue ?? (r.traced == nil ? "not traced" : "no verdict (the connection was not seen)"))")
            for line in r.evidence { print("     \(line)") }
            if let report = r.traced?.report, !report.isEmpty {
                for line in report.split(whereSeparator: \.isNewline) { print("     | \(line)") }
            }
            print("   \(r.matches ? "as expected" : "DOES NOT MATCH the scenario's truth")\n")
        }

        private func printSummary(_ results: [ScenarioResult]) {
            func col(_ s: String, _ n: Int) -> String { s.padding(toLength: n, withPad: " ", startingAt: 0) }
            print(col("scenario", 19) + col("expected", 18) + col("kernel", 18) + col("meshtrace", 18) + "result")
            for r in results {
                print(col(r.scenario.rawValue, 19) + col(r.expected.verdict.rawValue, 18)
                      + col(r.kernelVerdict?.rawValue ?? "-", 18) + col(r.traced?.verdict?.rawValue ?? "-", 18)
                      + (r.matches ? "ok" : "MISMATCH"))
            }
        }

        // --json: JSON Lines, one record for the lab, one per scenario, one summary (docs/LAB.md).
        private func emitJSON(_ object: [String: Any]) {
            guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]) else { return }
            print(String(decoding: data, as: UTF8.self))
        }

        private func topologyRecord(_ lab: LabTopology) -> [String: Any] {
            ["type": "lab", "ruleset": lab.options.ruleset.name, "backend": lab.options.backend.rawValue,
             "pods": lab.pods.map { ["role": $0.role.rawValue, "netns": $0.name, "addresses": $0.addresses.map(\.description)] }]
        }

        private func scenarioRecord(_ r: ScenarioResult, lab: LabTopology) -> [String: Any] {
            let traced = lab.pods.first { $0.role == r.scenario.tracedRole }!
            var o: [String: Any] = ["type": "scenario", "scenario": r.scenario.rawValue, "summary": r.scenario.summary,
                                    "traced_pod": traced.role.rawValue, "netns": traced.name, "app": r.appOutcome,
                                    "expected": r.expected.verdict.rawValue, "because": r.expected.because,
                                    "evidence": r.evidence, "matches": r.matches]
            o["kernel"] = r.kernelVerdict?.rawValue ?? NSNull()
            o["meshtrace"] = r.traced?.verdict?.rawValue ?? NSNull()
            o["report"] = r.traced?.report ?? ""
            if let files = r.traced?.files, !files.isEmpty { o["files"] = files }
            return o
        }

        private func printKeepHelp(_ lab: LabTopology) {
            let exe = lab.options.executable
            print("""

            The lab stays up (--keep). Try:
              ip netns exec \(lab.client.name) \(exe) _app get \(lab.server.ipv4):80
              ip netns exec \(lab.client.name) iptables-save -c
              \(exe) trace --netns \(lab.client.name)
              cat \(lab.runDirectory)/*.log
            Remove it with: \(exe) lab down --lab \(LabTopology.labID(of: lab.client.name) ?? 0)   (or every kept lab: \(exe) lab down)
            """)
        }
    }

    struct Down: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "down", abstract: "Remove the lab namespaces (mt-l*) left by earlier runs (--keep, killed runs), with their processes.")

        @Flag(name: .long, help: "Also remove labs whose meshtrace process still runs.")
        var all = false

        @Option(name: .long, help: "Remove only this lab: the number in its namespace names (mt-l<ID>-n), as --keep prints it.")
        var lab: Int32?

        func run() throws {
            try reportingErrors {
                let removed = try LabTopology.removeAll(includingRunning: all || lab != nil, only: lab)
                print(removed.isEmpty ? "no lab namespaces" : "removed \(removed.joined(separator: " "))")
                return .ok
            }
        }
    }
}

/// The running meshtrace binary: the lab starts it again inside the namespaces for the stand-ins.
func selfExecutable() throws -> String {
    let path = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
    guard FileManager.default.isExecutableFile(atPath: path) else {
        throw MeshtraceError(.missingTool, "cannot find meshtrace's own executable (/proc/self/exe)")
    }
    return path
}
