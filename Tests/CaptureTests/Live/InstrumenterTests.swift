import XCTest
@testable import Capture

/// The rules meshtrace adds to a pod's netns: twins right before each ambient rule, nothing else touched,
/// and everything gone again afterwards, whatever happened in between.
final class InstrumenterTests: KernelTestCase {
    static var seed: String {
        (try? String(contentsOf: ProjectPaths.reference.appendingPathComponent("rulesets/seed-ambient-pod.iptables-save.txt"), encoding: .utf8)) ?? ""
    }
    static var nftGolden: String {
        (try? String(contentsOf: ProjectPaths.reference.appendingPathComponent("rulesets/istio/nft_master_default.nft-list-ruleset.txt"), encoding: .utf8)) ?? ""
    }

    /// Rules as a person compares them: save output without counters and date comments.
    static func rulesText(_ ns: ScratchNetns) throws -> String {
        var out = ""
        for tool in ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"] {
            out += try ns.run([tool]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
                .map { $0.hasPrefix(":") ? String($0.split(separator: "[")[0]) : String($0) }.joined(separator: "\n")
        }
        let nft = try ns.run(["nft", "list", "ruleset"]).stdout
        out += nft.replacingOccurrences(of: #"counter packets \d+ bytes \d+"#, with: "counter", options: .regularExpression)
        return out
    }

    func testSeedRulesetGetsATwinBeforeEveryAmbientRuleAndComesBackUnchanged() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: Self.seed)
        let before = try Self.rulesText(ns)

        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5301), parse: Instrumenter.parseHome)
        let plan = try instrumenter.install()
        // 8 nat rules + 4 mangle rules in the seed, each twinned; the unconditional jumps at the top of mangle
        // PREROUTING/OUTPUT already see every packet, so no separate observation points there.
        XCTAssertEqual(plan.twins.filter { !$0.isObservation }.count, 12)

        let saved = try ns.run(["iptables-save"]).stdout
        let lines = saved.split(separator: "\n").map(String.init)
        // Each twin is followed by the rule it twins, with the same match text.
        var checked = 0
        for (i, line) in lines.enumerated() where line.contains("--comment meshtrace") {
            let next = lines[i + 1]
            XCTAssertFalse(next.contains("meshtrace"), "twin followed by another meshtrace rule: \(line)")
            let twinMatch = line.components(separatedBy: " -m comment --comment meshtrace").first!
            let ruleMatch = next.components(separatedBy: " -j ").first!
            XCTAssertEqual(twinMatch, ruleMatch)
            checked += 1
        }
        XCTAssertEqual(checked, 12)
        XCTAssertEqual(try instrumenter.leftovers().count, 12)

        XCTAssertEqual(try instrumenter.remove(), 12)
        XCTAssertEqual(try Self.rulesText(ns), before)
        XCTAssertEqual(try instrumenter.leftovers().count, 0)
    }

    func testRemovalFindsTwinsAfterIstioReappliedItsRules() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: Self.seed)
        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5302), parse: Instrumenter.parseHome)
        try instrumenter.install()
        // istio-cni reconciling: a rule inserted at the top of ISTIO_OUTPUT moves every position.
        try ns.run(["iptables", "-t", "nat", "-I", "ISTIO_OUTPUT", "1", "-p", "udp", "-j", "RETURN"])
        let reapplied = try ns.run(["iptables-save"]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
        let left = try Instrumenter(netns: ns.ref, settings: InstrumentationSettings(), parse: Instrumenter.parseHome).remove()
        XCTAssertEqual(left, 12)
        let after = try ns.run(["iptables-save"]).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
        XCTAssertFalse(after.contains { $0.contains("meshtrace") })
        XCTAssertTrue(after.contains("-A ISTIO_OUTPUT -p udp -j RETURN"))
        XCTAssertEqual(after, reapplied.filter { !$0.contains("meshtrace") })
    }

    func testLeftoversMakeTheNextInstallRefuseUnlessReplacing() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: Self.seed)
        try Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5303), parse: Instrumenter.parseHome).install()
        let second = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5303), parse: Instrumenter.parseHome)
        XCTAssertThrowsError(try second.install()) { error in
            XCTAssertEqual((error as? MeshtraceError)?.code, .leftovers)
        }
        try second.install(replace: true)
        XCTAssertEqual(try second.leftovers().count, 12)
        try second.remove()
    }

    func testNativeNftablesRulesetGetsTwinsByHandle() throws {
        let ns = try makeNetns()
        try ns.run(["nft", "-f", "-"], input: Self.nftGolden)
        let before = try Self.rulesText(ns)
        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5304), parse: Instrumenter.parseHome)
        let plan = try instrumenter.install()
        let ruleCount = Self.nftGolden.split(separator: "\n").filter { $0.contains("counter packets") || $0.contains("\tjump ") }.count
        XCTAssertEqual(plan.twins.filter { !$0.isObservation }.count, ruleCount)
        let listed = try ns.run(["nft", "list", "ruleset"]).stdout
        XCTAssertEqual(listed.components(separatedBy: "comment \"meshtrace\"").count - 1, plan.twins.count)
        // The connmark restore's twin carries only the match, never the `meta mark set` statement.
        XCTAssertFalse(listed.split(separator: "\n").contains { $0.contains("meshtrace") && $0.contains(" set ") })
        try instrumenter.remove()
        XCTAssertEqual(try Self.rulesText(ns), before)
    }

    /// A rule whose match changes shared state gets no twin: a copy evaluated first would drain a hashlimit bucket,
    /// set or remove a recent entry, update an nft dynamic set (and its per-element limit) or a named limit before the
    /// rule reads it, changing the pod's verdicts. Pure matches keep their twins; the plan says which rules have none.
    func testRulesWhoseMatchChangesSharedStateGetNoTwin() throws {
        let foreign = [
            "-A PREROUTING -p tcp -m tcp --dport 7777 -m hashlimit --hashlimit-above 1/hour --hashlimit-burst 2 --hashlimit-name hb -j DROP",
            "-A PREROUTING -p tcp -m recent --set --name knock --rsource",
            "-A PREROUTING -p tcp -m recent --rcheck --name knock --rsource -j MARK --set-xmark 0x9/0xff",
            "-A PREROUTING -p tcp -m limit --limit 5/sec -j MARK --set-xmark 0x8/0xff",
        ]
        let text = Self.seed.replacingOccurrences(of: "-A PREROUTING -j ISTIO_PRERT", with: (foreign + ["-A PREROUTING -j ISTIO_PRERT"]).joined(separator: "\n"),
                                                  options: [], range: Self.seed.range(of: "-A PREROUTING -j ISTIO_PRERT"))
        XCTAssertTrue(text.contains("hashlimit"))
        let rs = try RulesetLoader.load(text: text, origin: "seed+foreign")
        let plan = try InstrumentationPlan.make(tables: Instrumenter.homes(of: rs), settings: InstrumentationSettings(group: 5307))
        XCTAssertEqual(plan.untwinned.map(\.reason), ["-m hashlimit", "-m recent --set"])
        XCTAssertEqual(plan.untwinned.map(\.position), [1, 2])
        let twinned = plan.twins.compactMap { $0.twinned?.text }
        XCTAssertFalse(twinned.contains { $0.contains("hashlimit") || $0.contains("--set --name knock") }, "\(twinned)")
        XCTAssertTrue(twinned.contains { $0.contains("--rcheck") }, "a read-only recent check keeps its twin")
        XCTAssertTrue(twinned.contains { $0.contains("-m limit") }, "an anonymous limit is the twin's own")
        XCTAssertTrue(PlanText.render(plan, netns: nil).contains("# note: iptables-nft mangle PREROUTING #1 has no twin (its match `-m hashlimit`"))

        let nft = Self.nftGolden.replacingOccurrences(of: "\t\tjump istio-prerouting", with: """
        \t\ttcp dport 7777 update @seen { ip saddr limit rate over 1/minute burst 1 packets } drop
        \t\ttcp dport 7778 limit name "lim1" accept
        \t\ttcp dport 7779 ip saddr @seen accept
        \t\tjump istio-prerouting
        """, options: [], range: Self.nftGolden.range(of: "\t\tjump istio-prerouting"))
        XCTAssertTrue(nft.contains("update @seen"))
        let nplan = try InstrumentationPlan.make(tables: Instrumenter.homes(of: try RulesetLoader.load(text: nft, origin: "nft")),
                                                 settings: InstrumentationSettings(group: 5307))
        XCTAssertEqual(nplan.untwinned.map(\.reason), ["update @seen", "limit name"])
        XCTAssertTrue(nplan.twins.contains { $0.matchText.contains("ip saddr @seen") }, "a set lookup is a pure match")
    }

    /// `plan`'s step 4 saves the rules of every home that got twins: it saved the first home's only
    /// (iptables-nft-save), so a dual-stack pod's IPv6 hits, or a legacy home's, mapped to no rule in `analyze`.
    func testPlanSavesTheRulesOfEveryInstrumentedHome() throws {
        let v4 = try String(contentsOf: ProjectPaths.samples.appendingPathComponent("rulesets/istio-default-dns.iptables-save.txt"), encoding: .utf8)
        let v6 = try String(contentsOf: ProjectPaths.samples.appendingPathComponent("rulesets/istio-default-dns.ip6tables-save.txt"), encoding: .utf8)
        let rs = try RulesetLoader.load(text: v4 + v6, origin: "dual-stack")
        let plan = try InstrumentationPlan.make(tables: Instrumenter.homes(of: rs), settings: InstrumentationSettings(group: 5308))
        XCTAssertEqual(Set(plan.changes.map(\.home.family)).count, 2, "\(plan.changes.map(\.home))")
        let text = PlanText.render(plan, netns: nil)
        XCTAssertTrue(text.contains("{ iptables-nft-save; ip6tables-nft-save; } > pod-rules.txt"), text)
        // One home: its own save command, as before.
        let single = PlanText.render(try InstrumentationPlan.make(tables: Instrumenter.homes(of: try RulesetLoader.load(text: v4, origin: "v4")),
                                                                  settings: InstrumentationSettings(group: 5308)), netns: nil)
        XCTAssertTrue(single.contains("\niptables-nft-save > pod-rules.txt"), single)
    }

    func testNetnsWithoutAmbientRulesIsRefusedAndLeftAlone() throws {
        let ns = try makeNetns()
        let before = try Self.rulesText(ns)
        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5305), parse: Instrumenter.parseHome)
        XCTAssertThrowsError(try instrumenter.install()) { error in
            XCTAssertEqual((error as? MeshtraceError)?.code, .badInput)
        }
        XCTAssertEqual(try Self.rulesText(ns), before)
    }

    func testPlanFromFileRendersRestoreInputThatAppliesAndRemovesCleanly() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: Self.seed)
        let before = try Self.rulesText(ns)
        let rs = try RulesetLoader.load(text: Self.seed, origin: "seed")
        let plan = try InstrumentationPlan.make(tables: Instrumenter.homes(of: rs), settings: InstrumentationSettings(group: 5306))
        for change in plan.changes { try ns.run(["iptables-nft-restore", "--noflush"], input: plan.applyScript(change)) }
        XCTAssertEqual(try ns.run(["iptables-save"]).stdout.components(separatedBy: "--comment meshtrace").count - 1, plan.twins.count)
        for change in plan.changes { try ns.run(["iptables-nft-restore", "--noflush"], input: plan.xtablesRemovalScript(change)) }
        XCTAssertEqual(try Self.rulesText(ns), before)
    }

    func testIstioDefaultWithIPv6AndTheRawTableIsTwinnedInBothFamiliesAndRestored() throws {
        let ns = try makeNetns()
        let dir = ProjectPaths.reference.appendingPathComponent("rulesets/istio")
        try ns.run(["iptables-restore"], input: String(contentsOf: dir.appendingPathComponent("iptables_master_default.iptables-save.txt"), encoding: .utf8))
        try ns.run(["ip6tables-restore"], input: String(contentsOf: dir.appendingPathComponent("iptables_master_default_ipv6.ip6tables-save.txt"), encoding: .utf8))
        let before = try Self.rulesText(ns)
        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5307), parse: Instrumenter.parseHome)
        let plan = try instrumenter.install()
        XCTAssertEqual(Set(plan.ambientHomes.map(\.family)), [.ipv4, .ipv6])
        // The DNS variant's CT-zone rules live in raw: they are twinned too.
        XCTAssertTrue(plan.twins.contains { $0.table == "raw" && $0.home.family == .ipv4 })
        XCTAssertTrue(plan.twins.contains { $0.table == "raw" && $0.home.family == .ipv6 })
        let v4 = try ns.run(["iptables-save"]).stdout, v6 = try ns.run(["ip6tables-save"]).stdout
        XCTAssertTrue(v4.contains("mt:4:nat:ISTIO_OUTPUT:"))
        XCTAssertTrue(v6.contains("mt:6:nat:ISTIO_OUTPUT:"))
        XCTAssertEqual(v4.components(separatedBy: "--comment meshtrace").count - 1 + v6.components(separatedBy: "--comment meshtrace").count - 1,
                       plan.twins.count)
        try instrumenter.remove()
        XCTAssertEqual(try Self.rulesText(ns), before)
    }

    func testLegacyBackendIsInstrumentedWithLegacyToolsAndRestored() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-legacy-restore"], input: Self.seed)
        let before = try Self.rulesText(ns)
        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5308), parse: Instrumenter.parseHome)
        let plan = try instrumenter.install()
        XCTAssertEqual(plan.ambientHomes, [RuleHome(backend: .iptablesLegacy, family: .ipv4)])
        XCTAssertEqual(try ns.run(["iptables-legacy-save"]).stdout.components(separatedBy: "--comment meshtrace").count - 1, 12)
        XCTAssertFalse(try ns.run(["iptables-nft-save"]).stdout.contains("meshtrace"))
        try instrumenter.remove()
        XCTAssertEqual(try Self.rulesText(ns), before)
    }

    /// Istio's legacy-vs-nft bug: both backends hold a full ambient ruleset, and the kernel runs both. Each twin's
    /// prefix names its backend (l4 for legacy), so hits and kernel counters are told apart, and each maps back to
    /// its own backend's rule.
    func testBothBackendsAreTwinnedWithPrefixesOfTheirOwn() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-legacy-restore"], input: Self.seed)
        try ns.run(["iptables-nft-restore"], input: Self.seed)
        let before = try Self.rulesText(ns)
        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5310), parse: Instrumenter.parseHome)
        let plan = try instrumenter.install()
        XCTAssertEqual(Set(plan.ambientHomes), [RuleHome(backend: .iptablesNft, family: .ipv4), RuleHome(backend: .iptablesLegacy, family: .ipv4)])
        XCTAssertEqual(plan.twins.count, 24)
        XCTAssertEqual(Set(plan.twins.map(\.tag.prefix)).count, 24, "every twin has a prefix of its own")
        let legacy = try ns.run(["iptables-legacy-save"]).stdout, nft = try ns.run(["iptables-nft-save"]).stdout
        XCTAssertEqual(legacy.components(separatedBy: "--nflog-prefix \"mt:l4:").count - 1, 12, legacy)
        XCTAssertFalse(legacy.contains("--nflog-prefix \"mt:4:"))
        XCTAssertEqual(nft.components(separatedBy: "--nflog-prefix \"mt:4:").count - 1, 12, nft)
        XCTAssertFalse(nft.contains("mt:l4:"))
        for twin in plan.twins where !twin.isObservation {
            let rule = try XCTUnwrap(instrumenter.ruleset.rule(for: twin.tag), twin.tag.prefix)
            XCTAssertEqual(rule.backend, twin.home.backend, twin.tag.prefix)
            XCTAssertEqual(rule.canonicalText, twin.twinned?.canonicalText)
        }
        XCTAssertEqual(try instrumenter.remove(), 24)
        XCTAssertEqual(try Self.rulesText(ns), before)
    }

    func testRemovalAfterIstioRewroteAWholeTableLeavesExactlyIstiosRules() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: Self.seed)
        let before = try Self.rulesText(ns)
        let instrumenter = Instrumenter(netns: ns.ref, settings: InstrumentationSettings(group: 5309), parse: Instrumenter.parseHome)
        try instrumenter.install()
        // istio-cni reconciling with a full restore of the nat table: its chains are flushed and recreated, so
        // the nat twins are gone; the mangle twins are still there.
        let natOnly = Self.seed.components(separatedBy: "*nat")[1]
        try ns.run(["iptables-restore", "--table=nat"], input: "*nat" + natOnly)
        XCTAssertEqual(try instrumenter.leftovers().count, 4)
        XCTAssertEqual(try Instrumenter(netns: ns.ref, settings: InstrumentationSettings(), parse: Instrumenter.parseHome).remove(), 4)
        XCTAssertEqual(try Self.rulesText(ns), before)
    }
}
