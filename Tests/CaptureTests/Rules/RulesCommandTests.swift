import XCTest
@testable import Capture

/// The built CLI: `meshtrace rules` and `meshtrace verify` exit codes, JSON, DOT, and a live netns.
final class RulesCommandTests: KernelTestCase {
    var binary: String { ProjectPaths.root.appendingPathComponent(".build/debug/meshtrace").path }
    let seed = VerifierTests.seedPath

    override func setUpWithError() throws {
        try super.setUpWithError()
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: binary), "build the CLI first (swift build)")
    }

    func meshtrace(_ args: [String]) throws -> Command.Result { try Command.run([binary] + args) }

    func testVerifyExitCodes() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-rules-cli-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let policy = dir.appendingPathComponent("policy.txt")
        try "allow reason forged-mark-0x539\n".write(to: policy, atomically: true, encoding: .utf8)

        // An untouched pod is clean: the forged-mark class is listed as accepted (inherent), not counted...
        let bare = try meshtrace(["verify", "--rules", seed])
        XCTAssertEqual(bare.status, 0, bare.stdout + bare.stderr)
        XCTAssertTrue(bare.stdout.contains("forged-mark-0x539"))
        XCTAssertTrue(bare.stdout.contains("built-in"))
        // ...unless --strict asks for it, and then a site policy accepts it.
        let strict = try meshtrace(["verify", "--rules", seed, "--strict"])
        XCTAssertEqual(strict.status, 1, strict.stderr)
        let clean = try meshtrace(["verify", "--rules", seed, "--strict", "--policy", policy.path])
        XCTAssertEqual(clean.status, 0, clean.stdout)
        XCTAssertTrue(clean.stdout.contains("result: clean"))

        let mutant = dir.appendingPathComponent("mutant.txt")
        try VerifierTests.seedText.split(separator: "\n").filter { !$0.contains("15001") }.joined(separator: "\n")
            .write(to: mutant, atomically: true, encoding: .utf8)
        let escape = try meshtrace(["verify", "--rules", mutant.path, "--policy", policy.path, "--json"])
        XCTAssertEqual(escape.status, 1)
        let obj = try JSONSerialization.jsonObject(with: Data(escape.stdout.utf8)) as? [String: Any]
        XCTAssertEqual(obj?["result"] as? String, "escape")
        let classes = obj?["classes"] as? [[String: Any]] ?? []
        let tcp = classes.first { $0["class"] as? String == "v4/tcp/app-remote/other/none" }
        XCTAssertEqual(tcp?["code"] as? String, "uncaptured-tcp")
        XCTAssertFalse((tcp?["path"] as? [String] ?? []).isEmpty)

        let garbage = dir.appendingPathComponent("garbage.txt")
        try "*nat\n-A NOPE -j ACCEPT\nCOMMIT\n".write(to: garbage, atomically: true, encoding: .utf8)
        let bad = try meshtrace(["verify", "--rules", garbage.path])
        XCTAssertEqual(bad.status, 2)
        XCTAssertTrue(bad.stderr.hasPrefix("meshtrace: garbage.txt line 2"), bad.stderr)
        XCTAssertEqual(bad.stderr.split(separator: "\n").count, 1)
        let badPolicy = dir.appendingPathComponent("bad-policy.txt")
        try "deny all\n".write(to: badPolicy, atomically: true, encoding: .utf8)
        XCTAssertEqual(try meshtrace(["verify", "--rules", seed, "--policy", badPolicy.path]).status, 2)
        XCTAssertEqual(try meshtrace(["verify", "--rules", RulesetParsingTests.fixture("host-probe.iptables-save.txt").path]).status, 2)
        XCTAssertEqual(try meshtrace(["verify", "--netns", "mt-no-such-netns-\(getpid())"]).status, 4)
    }

    func testRulesJsonAndGraph() throws {
        let r = try meshtrace(["rules", "--rules", seed, "--json"])
        XCTAssertEqual(r.status, 0)
        let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        let variant = obj?["variant"] as? [String: Any]
        XCTAssertEqual(variant?["era"] as? String, "redirect")
        XCTAssertEqual(variant?["backends"] as? [String], ["iptables-nft"])
        let rules = (obj?["tables"] as? [[String: Any]] ?? []).flatMap { ($0["chains"] as? [[String: Any]] ?? []).flatMap { $0["rules"] as? [[String: Any]] ?? [] } }
        XCTAssertEqual(rules.count, 12)
        XCTAssertEqual(rules.filter { $0["role"] as? String == "outbound-capture" }.count, 1)

        let text = try meshtrace(["rules", "--rules", seed])
        XCTAssertTrue(text.stdout.contains("outbound-capture"))
        XCTAssertTrue(text.stdout.contains("findings: none"))

        let dot = try meshtrace(["rules", "--rules", seed, "--graph"])
        XCTAssertTrue(dot.stdout.hasPrefix("digraph"))
        if Command.which("dot") != nil {
            let check = try Command.run(["dot", "-Tsvg"], input: dot.stdout)
            XCTAssertTrue(check.ok, check.stderr)
            XCTAssertTrue(check.stdout.contains("ISTIO_OUTPUT"))
        }
    }

    func testLiveNetns() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: VerifierTests.seedText)
        let rules = try meshtrace(["rules", "--netns", ns.name, "--json"])
        XCTAssertEqual(rules.status, 0, rules.stderr)
        XCTAssertTrue(rules.stdout.contains("\"outbound-capture\""))
        XCTAssertEqual(try meshtrace(["verify", "--netns", ns.ref.path]).status, 1)
        let policy = FileManager.default.temporaryDirectory.appendingPathComponent("mt-rules-live-\(getpid()).txt")
        try "allow reason forged-mark-0x539\n".write(to: policy, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: policy) }
        // Without istio-cni's ip rule the replies of ztunnel's inbound connections cannot return to ztunnel.
        let noRule = try meshtrace(["verify", "--netns", ns.name, "--policy", policy.path, "--json"])
        XCTAssertEqual(noRule.status, 1)
        XCTAssertTrue(noRule.stdout.contains("\"reply-uncaptured\""))
        XCTAssertTrue(noRule.stderr.contains("ip rule"))
        try ns.run(["ip", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"])
        try ns.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
        let withRule = try meshtrace(["verify", "--netns", ns.name, "--policy", policy.path])
        XCTAssertEqual(withRule.status, 0, withRule.stdout)
        // Emptying the nat table opens every TCP class; the live verdict follows.
        try ns.run(["iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"])
        let after = try meshtrace(["verify", "--netns", ns.name, "--json"])
        XCTAssertEqual(after.status, 1)
        XCTAssertTrue(after.stdout.contains("\"uncaptured-tcp\""))
    }
}
