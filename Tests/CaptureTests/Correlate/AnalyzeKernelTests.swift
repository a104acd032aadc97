import XCTest
@testable import Capture
#if canImport(Glibc)
import Glibc
#endif

/// `tcpdump -w` running in a namespace until stopped. Ready once the file header is on disk.
final class BackgroundCapture {
    let path: String
    private let process = Process()

    init(netns: ScratchNetns, interface: String, path: String) throws {
        self.path = path
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        // -Z root: Debian's tcpdump drops to its own user and could not write into the test's directory.
        // --immediate-mode: with TPACKET_V3 the packets of a partly filled block are lost when SIGINT stops it.
        // No -s: for nflog:G libpcap sizes its netlink read buffer from the snaplen, and a small one truncates the
        // kernel's batched datagrams (records lost, the last one cut).
        process.arguments = ["netns", "exec", netns.name, "tcpdump", "-i", interface, "-n", "-U", "-Z", "root", "--immediate-mode",
                             "-w", path]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            if let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber, size.intValue >= 24 { return }
            usleep(20_000)
        }
        stop()
        throw MeshtraceError(.kernelRefused, "tcpdump -i \(interface) did not start within 5 s")
    }

    func stop() {
        guard process.isRunning else { return }
        // SIGINT ends tcpdump without draining what is still queued on its socket: on a loaded machine (CI) the
        // last NFLOG batch can still be on its way. Wait until the file has stopped growing (bounded) first.
        var lastSize = -1, stableSince = Date()
        let settleDeadline = Date().addingTimeInterval(5)
        while Date() < settleDeadline {
            let size = ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber)?.intValue ?? 0
            if size != lastSize { lastSize = size; stableSince = Date() }
            else if Date().timeIntervalSince(stableSince) >= 0.6 { break }
            usleep(50_000)
        }
        kill(process.processIdentifier, SIGINT)
        let deadline = Date().addingTimeInterval(5)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }
}

/// Ground truth the test creates: the lab's pods loaded with the seed ruleset, the ztunnel stand-in, NFLOG twins added
/// by hand with meshtrace prefixes, real connections; conntrack in the pod is the independent oracle for the tuples.
final class AnalyzeKernelTests: KernelTestCase {
    private var labs: [LabTopology] = []
    private var captures: [BackgroundCapture] = []
    private var directory: URL!

    override func setUpWithError() throws {
        try super.setUpWithError()
        try XCTSkipIf(Command.which("tcpdump") == nil || Command.which("conntrack") == nil, "tcpdump and conntrack are needed")
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: AnalyzeCommandTests.executable), "build meshtrace first")
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("mt-akt-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        for c in captures { c.stop() }
        captures.removeAll()
        for lab in labs { lab.teardown() }
        labs.removeAll()
        if let directory, ProcessInfo.processInfo.environment["MESHTRACE_KEEP_TEST_FILES"] == nil {
            try? FileManager.default.removeItem(at: directory)
        }
        super.tearDown()
    }

    private var seedPath: String { ProjectPaths.reference.appendingPathComponent("rulesets/seed-ambient-pod.iptables-save.txt").path }

    private func makeLab() throws -> LabTopology {
        let lab = try LabTopology(options: LabOptions(executable: AnalyzeCommandTests.executable))
        labs.append(lab)
        return lab
    }

    /// Inserts an NFLOG twin of `table chain #position` (same match, right before it), tagged as meshtrace does.
    private func addTwin(_ lab: LabTopology, _ pod: LabPod, ruleset: Ruleset, table: String, chain: String, position: Int,
                         group: Int) throws {
        let rule = try XCTUnwrap(ruleset.tables.first { $0.name == table }?.chain(chain)?.rules[position - 1])
        let tag = RuleTag(family: .v4, table: table, chain: chain, position: .rule(position),
                          textHash: RuleTag.textHash(rule.canonicalText))
        let match = rule.matchText.split(separator: " ").map(String.init)
        try pod.netns.run([lab.iptables(), "-t", table, "-I", chain, String(position)] + match
                          + ["-m", "comment", "--comment", "meshtrace", "-j", "NFLOG", "--nflog-group", String(group),
                             "--nflog-prefix", tag.prefix, "--nflog-size", "128"])
    }

    /// An observation point: every packet at this hook, first in the built-in chain.
    private func addObservation(_ lab: LabTopology, _ pod: LabPod, table: String, chain: String, outgoing: Bool, group: Int) throws {
        let tag = RuleTag(family: .v4, table: table, chain: chain, position: outgoing ? .observeOut : .observeIn)
        try pod.netns.run([lab.iptables(), "-t", table, "-I", chain, "1", "-m", "comment", "--comment", "meshtrace",
                           "-j", "NFLOG", "--nflog-group", String(group), "--nflog-prefix", tag.prefix, "--nflog-size", "128"])
    }

    private func capture(_ pod: LabPod, group: Int, name: String) throws -> (any: BackgroundCapture, nflog: BackgroundCapture) {
        let any = try BackgroundCapture(netns: pod.netns, interface: "any", path: directory.appendingPathComponent("\(name)-any.pcap").path)
        captures.append(any)
        let nflog = try BackgroundCapture(netns: pod.netns, interface: "nflog:\(group)", path: directory.appendingPathComponent("\(name)-nflog.pcap").path)
        captures.append(nflog)
        return (any, nflog)
    }

    private func analyze(_ files: [String], extra: [String] = []) throws -> (status: Int32, records: [[String: Any]], text: String) {
        let json = try AnalyzeCommandTests.analyze(files + ["--rules", seedPath, "--json"] + extra)
        let text = try AnalyzeCommandTests.analyze(files + ["--rules", seedPath, "--color", "never"] + extra)
        XCTAssertEqual(json.status, text.status)
        return (json.status, jsonLines(json.stdout), text.stdout + text.stderr)
    }

    /// conntrack -L lines in a pod, e.g. "tcp 6 117 TIME_WAIT src=A dst=B sport=P dport=80 src=127.0.0.1 dst=A sport=15001 dport=P ...".
    private func conntrack(_ pod: LabPod) -> [String] {
        pod.netns.attempt(["conntrack", "-L"]).stdout.split(whereSeparator: \.isNewline).map(String.init)
    }

    private func field(_ line: String, _ name: String, occurrence: Int = 0) -> String? {
        let hits = line.split(separator: " ").filter { $0.hasPrefix(name + "=") }
        return occurrence < hits.count ? String(hits[occurrence].dropFirst(name.count + 1)) : nil
    }

    private func connections(_ records: [[String: Any]]) -> [[String: Any]] { records.filter { $0["type"] as? String == "connection" } }
    private func original(_ c: [String: Any]) -> [String: Any] { c["original"] as? [String: Any] ?? [:] }

    func testOutboundConnectionIsOneTimelineRedirectedTo15001AndJoinedToZtunnelsHBONEConnection() throws {
        let lab = try makeLab()
        let client = lab.client, server = lab.server
        let ruleset = try RulesetLoader.load(file: seedPath)
        let group = 3171
        try addTwin(lab, client, ruleset: ruleset, table: "nat", chain: "ISTIO_OUTPUT", position: 4, group: group)
        try addObservation(lab, client, table: "mangle", chain: "POSTROUTING", outgoing: true, group: group)
        let files = try capture(client, group: group, name: "client")

        let reply = try lab.runApp(["_app", "get", "\(server.ipv4):\(LabTopology.appPort)"], in: client)
        XCTAssertTrue(reply.ok, reply.stderr)
        // nfnetlink_log flushes a group's batch after at most a second (its default flush timeout).
        usleep(1_300_000)
        files.any.stop(); files.nflog.stop()

        // The oracle: conntrack's entries for the app's connection (reply from 127.0.0.1:15001) and ztunnel's (to :15008).
        let ct = conntrack(client)
        let appEntry = try XCTUnwrap(ct.first { $0.contains("dst=\(server.ipv4)") && $0.contains("dport=80 ") && $0.contains("sport=15001") },
                                     ct.joined(separator: "\n"))
        let appPort = try XCTUnwrap(field(appEntry, "sport").flatMap(Int.init))
        let hboneEntry = try XCTUnwrap(ct.first { $0.contains("dst=\(server.ipv4)") && $0.contains("dport=15008 ") }, ct.joined(separator: "\n"))
        let hbonePort = try XCTUnwrap(field(hboneEntry, "sport").flatMap(Int.init))

        let (status, records, text) = try analyze([files.any.path, files.nflog.path])
        XCTAssertEqual(status, 0, text)
        let all = connections(records)
        let app = try XCTUnwrap(all.first { original($0)["sport"] as? Int == appPort && original($0)["dport"] as? Int == 80 }, text)
        XCTAssertEqual(app["kind"] as? String, "app-outbound", text)
        XCTAssertEqual(original(app)["dst"] as? String, server.ipv4.description)
        XCTAssertEqual(original(app)["src"] as? String, client.ipv4.description)
        let redirect = try XCTUnwrap(app["redirect"] as? [String: Any], text)
        XCTAssertEqual(redirect["type"] as? String, "redirect")
        XCTAssertEqual(redirect["to_port"] as? Int, 15001)
        XCTAssertEqual(redirect["original_dst"] as? String, "\(server.ipv4):80")
        let aliases = app["aliases"] as? [[String: Any]] ?? []
        XCTAssertTrue(aliases.contains { $0["dst"] as? String == "127.0.0.1" && $0["dport"] as? Int == 15001 }, text)

        let events = app["events"] as? [[String: Any]] ?? []
        // The REDIRECT twin's hit on the pre-NAT SYN, with role and original destination.
        let hitEvent = try XCTUnwrap(events.first { ($0["hit"] as? [String: Any])?["role"] as? String == "outbound-capture" }, text)
        XCTAssertEqual(hitEvent["point"] as? String, "nf:OUTPUT")
        XCTAssertEqual((hitEvent["tuple"] as? [String: Any])?["dport"] as? Int, 80)
        XCTAssertEqual(((hitEvent["hit"] as? [String: Any])?["action"] as? [String: Any])?["original_dst"] as? String, "\(server.ipv4):80")
        // The lo leg: the app's packets to 127.0.0.1:15001, and the replies from the original destination.
        XCTAssertTrue(events.contains { $0["point"] as? String == "lo" && ($0["tuple"] as? [String: Any])?["dport"] as? Int == 15001 }, text)
        XCTAssertTrue(events.contains { $0["point"] as? String == "lo" && $0["reply"] as? Bool == true
            && ($0["tuple"] as? [String: Any])?["src"] as? String == server.ipv4.description }, text)
        XCTAssertFalse(events.contains { ($0["point"] as? String).map { $0 != "lo" && !$0.hasPrefix("nf:") } ?? false },
                       "the app's connection itself never appears on eth0")

        // The hop: joined to ztunnel's 0x539 connection to server:15008, with its evidence.
        let hops = app["hops"] as? [[String: Any]] ?? []
        let hop = try XCTUnwrap(hops.first, text)
        XCTAssertEqual(hop["direction"] as? String, "outbound")
        XCTAssertEqual(hop["confidence"] as? String, "high", text)
        let evidence = Set((hop["evidence"] as? [[String: Any]] ?? []).compactMap { $0["kind"] as? String })
        XCTAssertTrue(evidence.isSuperset(of: ["ztunnel-mark", "original-destination", "timing", "unique"]), "\(evidence)")
        let inner = try XCTUnwrap(all.first { $0["id"] as? Int == hop["inner"] as? Int })
        XCTAssertEqual(inner["kind"] as? String, "hbone-outbound")
        XCTAssertEqual(original(inner)["sport"] as? Int, hbonePort)
        XCTAssertEqual(original(inner)["dport"] as? Int, 15008)
        XCTAssertEqual(inner["marks"] as? [Int], [0x539], text)
        XCTAssertTrue((inner["events"] as? [[String: Any]] ?? []).contains { $0["point"] as? String == "any" }, "HBONE leg on eth0")

        let summary = try XCTUnwrap(records.last)
        XCTAssertEqual(summary["escapes"] as? Int, 0, text)
        // Every packet tcpdump reads from the two files was analysed.
        let tcpdumpCount = try [files.any.path, files.nflog.path].map {
            try Command.run(["tcpdump", "-n", "-r", $0]).stdout.split(whereSeparator: \.isNewline).count
        }.reduce(0, +)
        XCTAssertEqual(summary["packets"] as? Int, tcpdumpCount)
    }

    func testInboundHBONEIsJoinedToZtunnelsConnectionIntoTheAppWithConnmark0x111() throws {
        let lab = try makeLab()
        let client = lab.client, server = lab.server
        let ruleset = try RulesetLoader.load(file: seedPath)
        let group = 3172
        try addTwin(lab, server, ruleset: ruleset, table: "mangle", chain: "ISTIO_PRERT", position: 1, group: group)
        try addTwin(lab, server, ruleset: ruleset, table: "mangle", chain: "ISTIO_OUTPUT", position: 1, group: group)
        let files = try capture(server, group: group, name: "server")

        let reply = try lab.runApp(["_app", "get", "\(server.ipv4):\(LabTopology.appPort)"], in: client)
        XCTAssertTrue(reply.ok, reply.stderr)
        // nfnetlink_log flushes a group's batch after at most a second (its default flush timeout).
        usleep(1_300_000)
        files.any.stop(); files.nflog.stop()

        let ct = conntrack(server)
        let appLeg = try XCTUnwrap(ct.first { $0.contains("src=\(client.ipv4) dst=\(server.ipv4)") && $0.contains("dport=80 ") && $0.contains("mark=273") },
                                   ct.joined(separator: "\n"))
        let legPort = try XCTUnwrap(field(appLeg, "sport").flatMap(Int.init))

        let (status, records, text) = try analyze([files.any.path, files.nflog.path], extra: ["--pod-ip", server.ipv4.description])
        XCTAssertEqual(status, 0, text)
        let all = connections(records)
        let inner = try XCTUnwrap(all.first { original($0)["sport"] as? Int == legPort && original($0)["dport"] as? Int == 80 }, text)
        XCTAssertEqual(inner["kind"] as? String, "ztunnel-to-app", text)
        XCTAssertEqual(original(inner)["src"] as? String, client.ipv4.description, "from the original client address")
        XCTAssertEqual(Set(inner["marks"] as? [Int] ?? []), [0x539, 0x111], text)
        let events = inner["events"] as? [[String: Any]] ?? []
        XCTAssertTrue(events.contains { ($0["hit"] as? [String: Any])?["role"] as? String == "connmark-set" && $0["reply"] as? Bool == false }, text)
        XCTAssertTrue(events.contains { ($0["hit"] as? [String: Any])?["role"] as? String == "connmark-restore" && $0["reply"] as? Bool == true }, text)
        let hop = try XCTUnwrap((inner["hops"] as? [[String: Any]])?.first, text)
        XCTAssertEqual(hop["direction"] as? String, "inbound")
        XCTAssertEqual(hop["confidence"] as? String, "high", text)
        let outer = try XCTUnwrap(all.first { $0["id"] as? Int == hop["outer"] as? Int })
        XCTAssertEqual(outer["kind"] as? String, "hbone-inbound")
        XCTAssertEqual(original(outer)["dport"] as? Int, 15008)
        XCTAssertEqual(original(outer)["src"] as? String, client.ipv4.description)
        let evidence = Set((hop["evidence"] as? [[String: Any]] ?? []).compactMap { $0["kind"] as? String })
        XCTAssertTrue(evidence.isSuperset(of: ["client-address", "ztunnel-mark", "ztunnel-connmark"]), "\(evidence)")
    }

    func testAnAppThatSetsZtunnelsMarkItselfIsReportedAsAnEscape() throws {
        let lab = try makeLab()
        let client = lab.client, server = lab.server
        let ruleset = try RulesetLoader.load(file: seedPath)
        let group = 3173
        try addTwin(lab, client, ruleset: ruleset, table: "nat", chain: "ISTIO_OUTPUT", position: 4, group: group)
        try addObservation(lab, client, table: "mangle", chain: "POSTROUTING", outgoing: true, group: group)
        let files = try capture(client, group: group, name: "forged")

        _ = try lab.runApp(["_app", "get", "--mark", "0x539", "\(server.ipv4):\(LabTopology.appPort)"], in: client)
        // nfnetlink_log flushes a group's batch after at most a second (its default flush timeout).
        usleep(1_300_000)
        files.any.stop(); files.nflog.stop()

        // The oracle: conntrack shows the app's connection to server:80 was not redirected (no 15001 in the reply tuple).
        let ct = conntrack(client)
        let entry = try XCTUnwrap(ct.first { $0.contains("dst=\(server.ipv4)") && $0.contains("dport=80 ") }, ct.joined(separator: "\n"))
        XCTAssertFalse(entry.contains("sport=15001"), entry)
        let port = try XCTUnwrap(field(entry, "sport").flatMap(Int.init))

        let (status, records, text) = try analyze([files.any.path, files.nflog.path])
        XCTAssertEqual(status, ExitStatus.escapeFound.rawValue, text)
        let findings = records.filter { $0["type"] as? String == "finding" && $0["escape"] as? Bool == true }
        let finding = try XCTUnwrap(findings.first { ($0["tuple"] as? [String: Any])?["sport"] as? Int == port }, text)
        XCTAssertEqual(finding["class"] as? String, "forged-ztunnel-mark")
        XCTAssertFalse((finding["frames"] as? [[Int]] ?? []).isEmpty)
        XCTAssertTrue(text.contains("!! ESCAPE (forged-ztunnel-mark"), text)
    }
}
