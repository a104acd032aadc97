import XCTest
@testable import Capture
#if canImport(Glibc)
import Glibc
#endif

/// The lab against the real kernel: namespaces, the ambient rules, the ztunnel stand-in, real connections.
/// Every test checks what it claims against facts the lab does not produce itself (conntrack, rule counters,
/// tcpdump on the wire, the namespace and process lists).
final class LabTests: KernelTestCase {
    private var labs: [LabTopology] = []

    override func tearDown() {
        for lab in labs { lab.teardown() }
        labs.removeAll()
        super.tearDown()
    }

    private var executable: String { ProjectPaths.meshtrace }

    private func makeLab(_ configure: (inout LabOptions) -> Void = { _ in }) throws -> LabTopology {
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        var o = LabOptions(executable: executable)
        configure(&o)
        let lab = try LabTopology(options: o)
        labs.append(lab)
        return lab
    }

    /// True once `pid` has exited (a zombie waiting for its reaper counts as exited), waiting up to 3 s.
    private func gone(_ pid: Int32) -> Bool {
        let deadline = Date().addingTimeInterval(3)
        repeat {
            if kill(pid, 0) != 0 { return true }
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            if let close = stat.lastIndex(of: ")"), stat[stat.index(close, offsetBy: 2)...].hasPrefix("Z") { return true }
            usleep(50_000)
        } while Date() < deadline
        return false
    }

    private func conntrack(_ pod: LabPod) -> [String] {
        pod.netns.attempt(["conntrack", "-L"]).stdout.split(whereSeparator: \.isNewline).map(String.init)
    }

    /// `[packets, bytes]` of the first rule in `table` whose iptables-save line contains `needle`.
    private func counter(_ lab: LabTopology, _ pod: LabPod, table: String, _ needle: String) throws -> Int {
        let save = try pod.netns.run([lab.options.backend == .iptablesLegacy ? "iptables-legacy-save" : "iptables-nft-save",
                                      "-c", "-t", table]).stdout
        let line = try XCTUnwrap(save.split(whereSeparator: \.isNewline).first { $0.contains(needle) }, "no rule with \(needle)")
        let packets = line.dropFirst().prefix { $0 != ":" }
        return Int(packets) ?? -1
    }

    func testOutboundRequestIsRedirectedTo15001AndTunnelledToTheServersHBONEListener() throws {
        try XCTSkipIf(Command.which("conntrack") == nil, "conntrack is needed as the independent oracle")
        let lab = try makeLab()
        let dir = lab.runDirectory + "/t"
        let runner = ScenarioRunner(lab: lab, tracing: PacketCaptureTracing(directory: dir, interface: "eth0"))
        let result = try runner.run(.outbound)

        XCTAssertEqual(result.kernelVerdict, .captured, result.evidence.joined(separator: "\n"))
        XCTAssertTrue(result.appOutcome.hasPrefix("server answered \(lab.client.ipv4):"), result.appOutcome)
        let ct = conntrack(lab.client).joined(separator: "\n")
        // The app's connection: original destination server:80, reply from the REDIRECT target 127.0.0.1:15001.
        XCTAssertTrue(ct.contains("src=\(lab.client.ipv4) dst=\(lab.server.ipv4)") && ct.contains("dport=80 src=127.0.0.1"), ct)
        XCTAssertTrue(ct.contains("sport=15001"), ct)
        // ztunnel's own connection to the server pod's HBONE port.
        XCTAssertTrue(ct.contains("dst=\(lab.server.ipv4)") && ct.contains("dport=15008"), ct)
        XCTAssertGreaterThan(try counter(lab, lab.client, table: "nat", "--to-ports 15001"), 0)

        // On the wire (client eth0) the request only travels inside the tunnel: no plaintext, only :15008.
        let pcap = try XCTUnwrap(result.traced?.files.first)
        let read = try Command.run(["tcpdump", "-n", "-A", "-r", pcap])
        let wire = read.stdout
        XCTAssertTrue(wire.contains("\(lab.server.ipv4).15008"), "\(pcap): \(read.stderr) \(wire)")
        XCTAssertFalse(wire.contains("GET / HTTP/1.0"), "the tunnel must be opaque on the wire")
        XCTAssertFalse(wire.contains("\(lab.server.ipv4).80:"), "the app's connection must not leave the pod as such")
    }

    func testInboundHBONEReachesTheAppFromTheClientAddressAndRepliesReturnThroughConnmark0x111() throws {
        try XCTSkipIf(Command.which("conntrack") == nil, "conntrack is needed as the independent oracle")
        let lab = try makeLab()
        let result = try ScenarioRunner(lab: lab).run(.inboundHBONE)

        XCTAssertEqual(result.kernelVerdict, .captured, result.evidence.joined(separator: "\n"))
        // The app saw the client pod's address (IP_TRANSPARENT), not the server's own.
        XCTAssertTrue(result.appOutcome.hasPrefix("server answered \(lab.client.ipv4):"), result.appOutcome)
        let ct = conntrack(lab.server)
        // ztunnel's app leg: client address -> server:80, connmark 0x111 (273) set by mangle ISTIO_PRERT.
        XCTAssertTrue(ct.contains { $0.contains("src=\(lab.client.ipv4) dst=\(lab.server.ipv4)") && $0.contains("dport=80 src=\(lab.server.ipv4)") && $0.contains("mark=273") },
                      ct.joined(separator: "\n"))
        XCTAssertTrue(ct.contains { $0.contains("dport=15008") && $0.contains("sport=15008") }, ct.joined(separator: "\n"))
        // The reply really took the connmark path: restored in mangle OUTPUT and kept from nat capture.
        XCTAssertGreaterThan(try counter(lab, lab.server, table: "mangle", "CONNMARK --set-xmark 0x111/0xfff"), 0)
        XCTAssertGreaterThan(try counter(lab, lab.server, table: "mangle", "CONNMARK --restore-mark"), 0)
    }

    /// The recorded NFLOG capture keeps every twin's record whole: a full packet arriving (the app's reply looping
    /// through lo with mark 0x111) makes a record over 256 bytes, which libpcap cuts to the file's snaplen when
    /// reading it back. Those records were lost to `analyze` ("3 packets only partly decoded").
    func testRecordedNflogRecordsAreReadBackWhole() throws {
        let lab = try makeLab()
        let runner = ScenarioRunner(lab: lab, tracing: PacketCaptureTracing(directory: lab.runDirectory + "/n", nflogGroup: 4103))
        let result = try runner.run(.inboundHBONE)
        let files = try XCTUnwrap(result.traced?.files)
        let nflog = try XCTUnwrap(files.first { $0.hasSuffix("-nflog.pcap") }, "\(files)")
        // Independent of meshtrace's reader: the classic pcap header's snaplen against each record's length.
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: nflog)))
        func le32(_ at: Int) -> Int { Int(bytes[at]) | Int(bytes[at + 1]) << 8 | Int(bytes[at + 2]) << 16 | Int(bytes[at + 3]) << 24 }
        XCTAssertEqual(le32(0), 0xa1b2c3d4, "a little-endian µs pcap from tcpdump")
        let snaplen = le32(16)
        var offset = 24, records = 0, longest = 0
        while offset + 16 <= bytes.count {
            let length = le32(offset + 8)
            longest = max(longest, length)
            XCTAssertLessThanOrEqual(length, snaplen, "record \(records + 1) is longer than the file's snaplen")
            offset += 16 + length; records += 1
        }
        XCTAssertGreaterThan(longest, 256, "a record over 256 bytes (an arriving packet with its hardware header) was met")
        let analyze = try Command.run([executable, "analyze", "--json"] + files.filter { $0.hasSuffix(".pcap") })
        let line = try XCTUnwrap(analyze.stdout.split(whereSeparator: \.isNewline).last.map(String.init))
        let summary = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], line)
        XCTAssertEqual(summary["damaged_packets"] as? Int, 0, line)
        XCTAssertEqual(summary["nflog_records"] as? Int, records, line)
    }

    func testEveryScenarioEndsAsItsKnownTruthOnTheSeedRuleset() throws {
        try XCTSkipIf(Command.which("conntrack") == nil, "conntrack is needed as the independent oracle")
        let lab = try makeLab { $0.dualStack = true }
        let runner = ScenarioRunner(lab: lab, tracing: PacketCaptureTracing(directory: lab.runDirectory + "/c", nflogGroup: 4101))
        for scenario in Scenario.allCases {
            let r = try runner.run(scenario)
            XCTAssertEqual(r.kernelVerdict, r.expected.verdict, "\(scenario.rawValue): \(r.appOutcome)\n\(r.evidence.joined(separator: "\n"))")
            // What meshtrace's engine made of the NFLOG twins and the packets, against the same truth.
            XCTAssertEqual(r.traced?.verdict, r.expected.verdict, "\(scenario.rawValue): meshtrace said\n\(r.traced?.report ?? "nothing")")
            if scenario == .ztunnelDown {
                XCTAssertTrue(r.appOutcome.localizedCaseInsensitiveContains("refused"), "\(scenario.rawValue): \(r.appOutcome)")
            } else {
                XCTAssertFalse(r.appOutcome.contains("meshtrace:"), "\(scenario.rawValue): the traffic failed: \(r.appOutcome)")
            }
            // Independent of the stand-ins' logs: a client-side TCP scenario was captured iff conntrack shows the
            // app's connection answered by the 15001 REDIRECT target.
            let ct = r.evidence.filter { $0.hasPrefix("conntrack client:") }
            let redirected = ct.contains { $0.contains("sport=15001") }
            switch scenario {
            case .outbound, .passthrough, .markEscape, .ruleDeleted, .foreignAccept, .ipv6Escape, .outboundIPv6:
                XCTAssertEqual(redirected, r.expected.verdict == .captured, "\(scenario.rawValue): \(ct)")
            case .udp: XCTAssertFalse(redirected, "\(scenario.rawValue): \(ct)")
            default: break
            }
        }
        // The mutations were undone: the 15001 rule is back, once, and nothing foreign stayed.
        let nat = try lab.client.netns.run(["iptables-nft-save", "-t", "nat"]).stdout
        XCTAssertEqual(nat.components(separatedBy: "--to-ports 15001").count - 1, 1)
        XCTAssertFalse(nat.contains("--dport 80 -j ACCEPT"))
    }

    func testLiveTracingJudgesScenariosAsTheirTruthAndLeavesTheRulesAsTheyWere() throws {
        let lab = try makeLab()
        // Rules as text, without comments and the chains' packet counters (traffic moves those).
        func rules() throws -> [String] {
            try lab.client.netns.run(["iptables-nft-save"]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
                .map { $0.replacingOccurrences(of: #"\[\d+:\d+\]"#, with: "[]", options: .regularExpression) }
        }
        let before = try rules()
        let runner = ScenarioRunner(lab: lab, tracing: LiveTraceTracing(group: 4103))
        for scenario in [Scenario.outbound, .inboundHBONE, .probe, .markEscape, .foreignAccept, .ztunnelDown, .outbound] {
            let r = try runner.run(scenario)
            XCTAssertEqual(r.kernelVerdict, r.expected.verdict, "\(scenario.rawValue): \(r.evidence)")
            XCTAssertEqual(r.traced?.verdict, r.expected.verdict, "\(scenario.rawValue): meshtrace trace said\n\(r.traced?.report ?? "nothing")")
            XCTAssertTrue(r.traced?.report.contains("rule hits (meshtrace / kernel counter)") == true)
        }
        let after = try rules()
        XCTAssertEqual(after, before, "the twins must be gone and the ruleset restored after the mutation")
    }

    func testIstioDefaultRulesetCapturesDNSAndIPv6WhileTracedLive() throws {
        let lab = try makeLab { $0.ruleset = .istioDefault; $0.dualStack = true }
        let runner = ScenarioRunner(lab: lab, tracing: LiveTraceTracing(group: 4104))
        var dnsEvidence: [String] = []
        for scenario in [Scenario.dns, .outboundIPv6, .ipv6Escape] {
            let r = try runner.run(scenario)
            if scenario == .dns { dnsEvidence = r.evidence }
            XCTAssertEqual(r.kernelVerdict, r.expected.verdict, "\(scenario.rawValue): \(r.evidence)")
            XCTAssertEqual(r.traced?.verdict, r.expected.verdict, "\(scenario.rawValue): meshtrace trace said\n\(r.traced?.report ?? "nothing")")
        }
        XCTAssertEqual(Scenario.dns.expectation(ruleset: .istioDefault).verdict, .captured)
        XCTAssertEqual(Scenario.outboundIPv6.expectation(ruleset: .istioDefault).verdict, .captured)
        // ztunnel's upstream query went out marked 0x539 and into conntrack zone 1 (the raw table's CT rule).
        if Command.which("conntrack") != nil {
            XCTAssertTrue(dnsEvidence.contains { $0.hasPrefix("conntrack") && $0.contains("dport=53") && $0.contains("zone=1") },
                          dnsEvidence.joined(separator: "\n"))
        }
        XCTAssertTrue(dnsEvidence.contains { $0.hasPrefix("client ztunnel: dns ") }, dnsEvidence.joined(separator: "\n"))
        XCTAssertTrue(lab.log(of: lab.client, "ztunnel").contains("outbound [fd00:10:244::110]"))
    }

    func testTproxyEraInboundCaptureReachesTransparentListenersWhileTracedLive() throws {
        let lab = try makeLab { $0.ruleset = .tproxyEra }
        let runner = ScenarioRunner(lab: lab, tracing: LiveTraceTracing(group: 4105))
        for scenario in [Scenario.inboundPlaintext, .inboundHBONE, .probe, .outbound] {
            let r = try runner.run(scenario)
            XCTAssertEqual(r.kernelVerdict, r.expected.verdict, "\(scenario.rawValue): \(r.evidence)")
            XCTAssertEqual(r.traced?.verdict, r.expected.verdict, "\(scenario.rawValue): meshtrace trace said\n\(r.traced?.report ?? "nothing")")
            if scenario == .inboundPlaintext {
                // No NAT with TPROXY: conntrack shows the peer's connection unrewritten, yet ztunnel took it.
                XCTAssertTrue(r.evidence.contains { $0.hasPrefix("server ztunnel: inbound \(lab.peer.ipv4)") }, "\(r.evidence)")
                XCTAssertTrue(r.traced?.report.contains("TPROXY") == true)
            }
        }
        XCTAssertGreaterThan(try counter(lab, lab.server, table: "mangle", "--on-port 15006"), 0)
    }

    func testNativeNftablesAndLegacyBackendsCaptureAndTheirMutationsEscape() throws {
        for configure in [{ (o: inout LabOptions) in o.ruleset = .nftNative; o.backend = .nftables },
                          { (o: inout LabOptions) in o.backend = .iptablesLegacy }] {
            let lab = try makeLab(configure)
            let runner = ScenarioRunner(lab: lab, tracing: PacketCaptureTracing(directory: lab.runDirectory + "/c", nflogGroup: 4102))
            for scenario in [Scenario.outbound, .dns, .ruleDeleted, .foreignAccept] {
                let r = try runner.run(scenario)
                let label = "\(lab.options.ruleset.name)/\(lab.options.backend.rawValue) \(scenario.rawValue)"
                XCTAssertEqual(r.kernelVerdict, r.expected.verdict, "\(label): \(r.evidence)")
                XCTAssertEqual(r.traced?.verdict, r.expected.verdict, "\(label): meshtrace said\n\(r.traced?.report ?? "nothing")")
            }
            if lab.options.backend == .iptablesLegacy {
                // The rules really are in the legacy backend, and only there.
                XCTAssertTrue(try lab.client.netns.run(["iptables-legacy-save"]).stdout.contains("ISTIO_OUTPUT"))
                XCTAssertFalse(try lab.client.netns.run(["iptables-nft-save"]).stdout.contains("ISTIO_OUTPUT"))
            } else {
                XCTAssertTrue(try lab.client.netns.run(["nft", "list", "ruleset"]).stdout.contains("istio-ambient-nat"))
            }
            lab.teardown()
        }
    }

    func testTeardownLeavesNoNamespaceVethRuleOrProcess() throws {
        let linksBefore = try Command.run(["ip", "-o", "link"]).stdout.split(whereSeparator: \.isNewline).map { $0.split(separator: ":")[1] }
        let rulesBefore = try Command.run(["iptables-save"]).stdout.filter { !$0.isNumber }
        let lab = try makeLab()
        let names = lab.pods.map(\.name)
        let pids = lab.runningPids
        XCTAssertEqual(pids.count, 5, "two ztunnels, three apps")
        _ = try ScenarioRunner(lab: lab).run(.outbound)
        lab.teardown()

        let netns = try Command.run(["ip", "netns", "list"]).stdout
        for n in names { XCTAssertFalse(netns.contains(n), "\(n) remains") }
        for p in pids { XCTAssertTrue(gone(p), "process \(p) remains") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: lab.runDirectory))
        let linksAfter = try Command.run(["ip", "-o", "link"]).stdout.split(whereSeparator: \.isNewline).map { $0.split(separator: ":")[1] }
        XCTAssertEqual(Set(linksAfter).subtracting(linksBefore), [], "links appeared in the root namespace")
        XCTAssertEqual(try Command.run(["iptables-save"]).stdout.filter { !$0.isNumber }, rulesBefore)
    }

    func testAFailureWhileBuildingRemovesWhatWasMade() throws {
        // A "meshtrace" that exits at once: the stand-ins never come up, the build fails half-way.
        var o = LabOptions(executable: "/bin/false")
        o.ruleset = .seed
        let before = try Command.run(["ip", "netns", "list"]).stdout
        XCTAssertThrowsError(try LabTopology(options: o)) { e in
            XCTAssertEqual((e as? MeshtraceError)?.code, .kernelRefused)
            XCTAssertTrue("\(e)".contains("stand-in"), "\(e)")
        }
        let after = try Command.run(["ip", "netns", "list"]).stdout
        let ours = after.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("mt-l\(getpid())-") && !before.contains($0) }
        XCTAssertEqual(ours, [], "namespaces of the failed build remain")
    }

    func testLabJSONHasOneRecordPerScenarioAndASummary() throws {
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let r = try Command.run([executable, "lab", "--json", "--scenario", "probe,udp"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let records = try r.stdout.split(whereSeparator: \.isNewline).map {
            try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])
        }
        XCTAssertEqual(records.map { $0["type"] as? String }, ["lab", "scenario", "scenario", "summary"])
        XCTAssertEqual(records[1]["scenario"] as? String, "probe")
        XCTAssertEqual(records[1]["expected"] as? String, "bypass by design")
        XCTAssertEqual(records[1]["meshtrace"] as? String, "bypass by design")
        XCTAssertEqual(records[2]["kernel"] as? String, "bypass by design")
        XCTAssertEqual(records[3]["matching"] as? Int, 2)
    }

    /// `--multiplex-tunnels` reaches the stand-ins: the service scenario's connection is a second stream of the tunnel
    /// the outbound scenario opened (their evidence quotes the stand-ins' logs), and both come out as expected.
    func testLabWithMultiplexedTunnelsSendsTheSecondConnectionThroughTheFirstOnesTunnel() throws {
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let r = try Command.run([executable, "lab", "--json", "--multiplex-tunnels", "--scenario", "outbound,service"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let records = try r.stdout.split(whereSeparator: \.isNewline).map {
            try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])
        }
        XCTAssertEqual(records.last?["matching"] as? Int, 2)
        // "client ztunnel: outbound APP -> DST: hbone new|pooled TUNNEL -> HBONE (multiplexed)"
        func tunnel(_ record: [String: Any]) -> (String, UInt16)? {
            let prefix = "client ztunnel: "
            for line in record["evidence"] as? [String] ?? [] where line.hasPrefix(prefix) {
                if let carried = CarriedLine(line.dropFirst(prefix.count)), carried.multiplexed, let reuse = carried.reuse {
                    return (String(reuse), carried.via)
                }
            }
            return nil
        }
        let scenarios = records.filter { $0["type"] as? String == "scenario" }
        XCTAssertEqual(scenarios.count, 2)
        let first = try XCTUnwrap(scenarios.first.flatMap(tunnel), "\(scenarios.first ?? [:])")
        let second = try XCTUnwrap(scenarios.last.flatMap(tunnel), "\(scenarios.last ?? [:])")
        XCTAssertEqual(first.0, "new")
        XCTAssertEqual(second.0, "pooled")
        XCTAssertEqual(first.1, second.1, "the same tunnel")
    }

    /// The reaper of a process that made namespaces: `sh -c … meshtrace-reaper <pid>` (`OrphanReaper`).
    private func reapers(of pid: Int32) -> [Int32] {
        let r = (try? Command.run(["pgrep", "-f", "meshtrace-reaper \(pid)$"]))?.stdout ?? ""
        return r.split(whereSeparator: \.isNewline).compactMap { Int32($0) }
    }

    private func labNamespaces(_ prefix: String) throws -> [String] {
        try Command.run(["ip", "netns", "list"]).stdout.split(whereSeparator: \.isNewline)
            .map { String($0.split(separator: " ")[0]) }.filter { $0.hasPrefix(prefix) }
    }

    /// A lab whose process is killed (SIGKILL: no handler, no teardown runs; a test process that traps is the same
    /// case) is removed by its reaper: namespaces, the stand-ins in them, the run directory. Until the twenty-fifth
    /// session such a lab stayed until `meshtrace lab down`.
    /// `meshtrace lab` started with several scenarios, once its four namespaces and five stand-ins are up (the
    /// caller stops it); its namespaces' prefix and the stand-ins' pids.
    private func startLab() throws -> (Process, prefix: String, standIns: [Int32]) {
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: executable), "build meshtrace first (swift build)")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = ["lab", "--scenario", "outbound,udp,probe,passthrough,mark-escape"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        let prefix = "mt-l\(p.processIdentifier)-"
        var standIns: [Int32] = []
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            standIns = try labNamespaces(prefix).flatMap { ns in
                ((try? Command.run(["ip", "netns", "pids", ns]))?.stdout ?? "").split(whereSeparator: \.isNewline).compactMap { Int32($0) }
            }
            if standIns.count >= 5 { break }
            usleep(50_000)
        }
        XCTAssertGreaterThanOrEqual(standIns.count, 5, "the lab did not come up")
        return (p, prefix, standIns)
    }

    func testALabWhoseProcessIsKilledIsRemovedByItsReaper() throws {
        let (p, prefix, standIns) = try startLab()
        let pid = p.processIdentifier
        defer { _ = try? LabTopology.removeAll(only: pid) }
        XCTAssertEqual(try labNamespaces(prefix).count, 4)
        let runDirectories = { () -> [String] in
            ((try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? []).filter { $0.hasPrefix("meshtrace-lab-\(pid)-") }
        }
        XCTAssertEqual(runDirectories().count, 1)
        let reaper = reapers(of: pid)
        XCTAssertEqual(reaper.count, 1, "the lab process has one reaper")

        kill(pid, SIGKILL)
        p.waitUntilExit()
        var left = try labNamespaces(prefix)
        let until = Date().addingTimeInterval(10)
        while (!left.isEmpty || !runDirectories().isEmpty || !reapers(of: pid).isEmpty) && Date() < until {
            usleep(50_000)
            left = try labNamespaces(prefix)
        }
        XCTAssertEqual(left, [], "the killed lab's namespaces stayed")
        XCTAssertEqual(runDirectories(), [], "the killed lab's run directory stayed")
        XCTAssertEqual(reapers(of: pid), [], "the reaper did not end")
        for pid in standIns { XCTAssertTrue(gone(pid), "stand-in \(pid) survived") }
    }

    /// The CLI end to end: Ctrl-C in the middle of a run, then --keep and `lab down`.
    func testInterruptedLabAndLabDownLeaveNothingBehind() throws {
        // SIGINT while the lab is up.
        let (p, prefix, standIns) = try startLab()
        kill(p.processIdentifier, SIGINT)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 128 + SIGINT)
        XCTAssertFalse(try Command.run(["ip", "netns", "list"]).stdout.contains(prefix))
        for pid in standIns { XCTAssertTrue(gone(pid), "stand-in \(pid) survived the interrupt") }

        // --keep leaves it up (stand-ins included), `lab down` removes it.
        let kept = try Command.run([executable, "lab", "--keep", "--scenario", "outbound"])
        XCTAssertEqual(kept.status, 0, kept.stderr)
        // Other labs may run on this machine: look only at the namespaces this run printed.
        let keptPrefix = try XCTUnwrap(kept.stdout.range(of: #"mt-l[0-9]+-"#, options: .regularExpression).map { String(kept.stdout[$0]) })
        // Its creator has exited: its reaper read end of file and must have left the kept lab alone.
        let keptCreator = try XCTUnwrap(LabTopology.labID(of: keptPrefix + "1"))
        let reaperDeadline = Date().addingTimeInterval(10)
        while !reapers(of: keptCreator).isEmpty && Date() < reaperDeadline { usleep(50_000) }
        XCTAssertEqual(reapers(of: keptCreator), [], "the kept lab's reaper did not end")
        let keptNames = try Command.run(["ip", "netns", "list"]).stdout.split(whereSeparator: \.isNewline)
            .map { String($0.split(separator: " ")[0]) }.filter { $0.hasPrefix(keptPrefix) }
        XCTAssertEqual(keptNames.count, 4, "node, client, server, peer")
        let keptPids = keptNames.flatMap { ns in
            ((try? Command.run(["ip", "netns", "pids", ns]))?.stdout ?? "").split(whereSeparator: \.isNewline).compactMap { Int32($0) }
        }
        XCTAssertEqual(keptPids.count, 5)
        // Only this lab: `lab down` alone would also sweep a lab someone else kept on this machine.
        let keptID = try XCTUnwrap(LabTopology.labID(of: try XCTUnwrap(keptNames.first)))
        XCTAssertTrue(kept.stdout.contains("lab down --lab \(keptID)"), kept.stdout)
        // A second kept lab: removing the first leaves its namespaces and its run directory (the stand-ins' logs) alone.
        let other = try Command.run([executable, "lab", "--keep", "--scenario", "outbound"])
        XCTAssertEqual(other.status, 0, other.stderr)
        let otherPrefix = try XCTUnwrap(other.stdout.range(of: #"mt-l[0-9]+-"#, options: .regularExpression).map { String(other.stdout[$0]) })
        let otherID = try XCTUnwrap(LabTopology.labID(of: otherPrefix + "1"))
        defer { _ = try? Command.run([executable, "lab", "down", "--lab", String(otherID)]) }
        let runDirectory = { (out: String) throws -> String in
            try XCTUnwrap(out.range(of: #"/tmp/meshtrace-lab-[0-9]+-[0-9]+"#, options: .regularExpression).map { String(out[$0]) })
        }
        let keptDirectory = try runDirectory(kept.stdout), otherDirectory = try runDirectory(other.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: keptDirectory))
        let down = try Command.run([executable, "lab", "down", "--lab", String(keptID)])
        XCTAssertEqual(down.status, 0, down.stderr)
        let after = try Command.run(["ip", "netns", "list"]).stdout
        for n in keptNames { XCTAssertFalse(after.contains(n)) }
        for pid in keptPids { XCTAssertTrue(gone(pid), "stand-in \(pid) survived lab down") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: keptDirectory))
        XCTAssertTrue(after.contains(otherPrefix), "the other kept lab was swept too")
        XCTAssertTrue(FileManager.default.fileExists(atPath: otherDirectory), "the other kept lab's logs were deleted")
        XCTAssertEqual(try Command.run([executable, "lab", "down", "--lab", String(otherID)]).status, 0)
        XCTAssertFalse(FileManager.default.fileExists(atPath: otherDirectory))
    }

    func testTunnelKeystreamHidesTheHeaderAndRoundTrips() {
        let nonce = (0..<16).map { UInt8($0 * 7) }
        var a = TunnelKeystream(nonce: nonce, direction: .toPeer)
        var b = TunnelKeystream(nonce: nonce, direction: .toPeer)
        let header = TunnelHeader.line(target: Endpoint(IPAddress("10.244.2.10")!, 80))
        let hidden = a.applied(header)
        XCTAssertNotEqual(hidden, header)
        XCTAssertNil(String(bytes: hidden, encoding: .utf8).flatMap { $0.contains("10.244") ? $0 : nil })
        XCTAssertEqual(TunnelHeader.parse(b.applied(hidden)), Endpoint(IPAddress("10.244.2.10")!, 80))
        var other = TunnelKeystream(nonce: nonce, direction: .fromPeer)
        XCTAssertNotEqual(other.applied(header), hidden, "the two directions use different streams")
    }

    func testRulesetFilesAreRecognised() throws {
        let golden = ProjectPaths.reference.appendingPathComponent("rulesets/istio/iptables_master_default_ipv6.golden").path
        try XCTSkipUnless(FileManager.default.fileExists(atPath: golden), "reference rulesets not present")
        let r = try LabRuleset.named(golden)
        XCTAssertEqual(r.form, .iptables)
        XCTAssertTrue(r.capturesDNS)
        XCTAssertTrue(r.text.contains("127.0.0.1/32") && !r.text.contains("::1/128"))
        XCTAssertTrue(r.ipv6Text?.contains("::1/128") == true)
        let nft = try LabRuleset.named(ProjectPaths.reference.appendingPathComponent("rulesets/istio/nft_master_default.nft-list-ruleset.txt").path)
        XCTAssertEqual(nft.form, .nftables)
        XCTAssertThrowsError(try LabRuleset.named("no-such-variant")) { e in
            XCTAssertEqual((e as? MeshtraceError)?.code, .usage)
        }
        XCTAssertThrowsError(try LabRuleset.named("/etc/hostname")) { e in
            XCTAssertEqual((e as? MeshtraceError)?.code, .badInput)
        }
        // A file that looks like iptables-save but does not parse is refused before any namespace is built.
        let garbage = FileManager.default.temporaryDirectory.appendingPathComponent("mt-lab-garbage-\(getpid()).rules")
        try "*nat\n:OUTPUT ACCEPT [0:0]\nthis is not a rule\nCOMMIT\n"
            .write(to: garbage, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: garbage) }
        XCTAssertThrowsError(try LabRuleset.named(garbage.path)) { e in
            XCTAssertEqual((e as? MeshtraceError)?.code, .badInput)
            XCTAssertTrue("\(e)".contains("line 3"), "\(e)")
        }
    }
}
