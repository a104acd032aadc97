import XCTest
@testable import Capture

/// `meshtrace verify`: the untouched rulesets give no escape beyond the one every pod has (a process able to set
/// mark 0x539), and each mutation an operator meets in the field is caught with the class and the rule path.
final class VerifierTests: XCTestCase {
    static let seedPath = RulesReference.rulesets.appendingPathComponent("seed-ambient-pod.iptables-save.txt").path
    static var seedText: String { (try? String(contentsOfFile: seedPath, encoding: .utf8)) ?? "" }
    static let forgedMarkPolicy = try! VerifyPolicy(text: "# every pod: a CAP_NET_ADMIN process can set ztunnel's mark\nallow reason forged-mark-0x539\n", origin: "policy")

    func verify(_ text: String, dualStack: Bool = false, policy: VerifyPolicy? = nil) throws -> VerifyReport {
        var pod = PodParameters()
        pod.dualStack = dualStack
        return Verifier(ruleset: try RulesetLoader.load(text: text, origin: "test"), pod: pod, policy: policy).run()
    }

    func result(_ r: VerifyReport, _ id: String) -> ClassVerdict {
        guard let v = r.results.first(where: { $0.packetClass.id == id }) else {
            XCTFail("no class \(id)")
            return ClassVerdict(packetClass: PacketClass(family: .ipv4, proto: .tcp, path: .appToRemote, port: .other, mark: .none),
                                verdict: .dropped(reason: "missing"), path: [], uncertainty: [], packet: "")
        }
        return v
    }

    func testUntouchedRulesetsAreCleanExceptTheForgedMarkClass() throws {
        var files = RulesetParsingTests.referenceFiles
        for f in ["tproxy-era.iptables-save.txt", "ingress-mode.iptables-save.txt", "virtual-interfaces.iptables-save.txt", "dualstack.iptables-save.txt",
                  "nft-dualstack.nft", "legacy-counters.iptables-save.txt", "restore-input.rules", "nft-default.nft.json", "nft-default-handles.nft.txt"] {
            files.append(RulesetParsingTests.fixture(f))
        }
        for url in files {
            let rs = try RulesetLoader.load(file: url.path)
            let report = Verifier(ruleset: rs, policy: Self.forgedMarkPolicy).run()
            XCTAssertEqual(report.escapes.map { "\($0.packetClass.id): \($0.verdict.summary)" }, [], url.lastPathComponent)
            XCTAssertEqual(report.exitStatus, .ok, url.lastPathComponent)
            // Without a policy the forged-mark class is accepted as inherent (listed, not counted)...
            let bare = Verifier(ruleset: rs).run()
            XCTAssertEqual(bare.escapes.count, 0, url.lastPathComponent)
            XCTAssertEqual(bare.exitStatus, .ok, url.lastPathComponent)
            XCTAssertFalse(bare.accepted.isEmpty, url.lastPathComponent)
            XCTAssertTrue(bare.accepted.allSatisfy { $0.acceptedBy == Verifier.inherentAcceptance }, url.lastPathComponent)
            // ...and with --strict it is what remains, and only for TCP (and DNS when captured).
            let strict = Verifier(ruleset: rs, strict: true).run()
            XCTAssertFalse(strict.escapes.isEmpty, url.lastPathComponent)
            XCTAssertTrue(strict.escapes.allSatisfy { $0.verdict.code == "forged-mark-0x539" && $0.packetClass.path == .appToRemote }, url.lastPathComponent)
            XCTAssertEqual(strict.exitStatus, .escapeFound)
        }
    }

    func testVerdictsOfTheSeed() throws {
        let r = try verify(Self.seedText)
        XCTAssertEqual(r.families, [.ipv4])
        XCTAssertEqual(result(r, "v4/tcp/app-remote/other/none").verdict, .captured(port: 15001))
        XCTAssertEqual(result(r, "v4/tcp/app-remote/53/none").verdict, .captured(port: 15001), "DNS capture is off: TCP/53 goes to 15001")
        XCTAssertEqual(result(r, "v4/tcp/app-remote/other/mark-other").verdict, .captured(port: 15001))
        XCTAssertEqual(result(r, "v4/tcp/inbound/app/none").verdict, .captured(port: 15006))
        XCTAssertEqual(result(r, "v4/tcp/inbound/15008/none").verdict, .captured(port: 15008))
        XCTAssertEqual(result(r, "v4/tcp/app-remote/other/mark-0x539").verdict.code, "forged-mark-0x539")
        XCTAssertEqual(result(r, "v4/tcp/ztunnel/15008/mark-0x539").verdict.kind, "bypass")
        for id in ["v4/udp/app-remote/other/none", "v4/udp/app-remote/53/none", "v4/icmp/app-remote/-/none", "v4/sctp/app-remote/app/none",
                   "v4/tcp/app-loopback/app/none", "v4/tcp/app-own-ip/app/none", "v4/tcp/inbound/app/none/probe",
                   "v4/tcp/app-remote/app/none/probe", "v4/tcp/inbound-lo/app/mark-0x539", "v4/tcp/app-remote/other/mark-0x111"] {
            XCTAssertEqual(result(r, id).verdict.kind, "bypass", id)
        }
        // The proof of the forged-mark escape names the capture rule it slipped past.
        XCTAssertTrue(result(r, "v4/tcp/app-remote/other/mark-0x539").path.contains { $0.contains("(outbound-capture) does not match") })
        // ztunnel's inbound connection marks 0x111 on the way in, and the reply gets it back.
        XCTAssertTrue(result(r, "v4/tcp/inbound-lo/app/mark-0x539").path.contains { $0.contains("CONNMARK --set-xmark 0x111/0xfff") })
    }

    func testDnsCaptureOnSendsDnsToZtunnel() throws {
        let rs = try RulesetLoader.load(file: RulesReference.rulesets.appendingPathComponent("istio/iptables_master_default.golden").path)
        let r = Verifier(ruleset: rs).run()
        XCTAssertEqual(result(r, "v4/udp/app-remote/53/none").verdict, .captured(port: 15053))
        XCTAssertEqual(result(r, "v4/tcp/app-remote/53/none").verdict, .captured(port: 15053))
        XCTAssertTrue(result(r, "v4/udp/ztunnel/53/mark-0x539").verdict.summary.contains("zone 1"))
        let v6 = Verifier(ruleset: try RulesetLoader.load(file: RulesReference.rulesets.appendingPathComponent("istio/iptables_master_default_ipv6.golden").path)).run()
        XCTAssertEqual(result(v6, "v6/udp/app-remote/53/none").verdict, .captured(port: 15053))
        XCTAssertEqual(result(v6, "v6/tcp/inbound/app/none/probe").verdict.kind, "bypass")
    }

    func testVariantVerdicts() throws {
        let tproxy = Verifier(ruleset: try RulesetLoader.load(file: RulesetParsingTests.fixture("tproxy-era.iptables-save.txt").path)).run()
        XCTAssertEqual(result(tproxy, "v4/tcp/inbound/app/none").verdict, .captured(port: 15006))
        XCTAssertEqual(result(tproxy, "v4/tcp/inbound/15008/none").verdict, .captured(port: 15008))
        XCTAssertEqual(result(tproxy, "v4/tcp/inbound-lo/app/mark-0x539").verdict.kind, "bypass")
        let ingress = Verifier(ruleset: try RulesetLoader.load(file: RulesetParsingTests.fixture("ingress-mode.iptables-save.txt").path)).run()
        XCTAssertTrue(result(ingress, "v4/tcp/inbound/app/none").verdict.summary.contains("ingress mode"))
        XCTAssertEqual(result(ingress, "v4/tcp/app-remote/other/none").verdict, .captured(port: 15001))
        let nftDual = Verifier(ruleset: try RulesetLoader.load(file: RulesetParsingTests.fixture("nft-dualstack.nft").path)).run()
        XCTAssertEqual(nftDual.families, [.ipv4, .ipv6])
        XCTAssertEqual(result(nftDual, "v6/tcp/app-remote/other/none").verdict, .captured(port: 15001))
        XCTAssertEqual(result(nftDual, "v6/tcp/inbound/app/none").verdict, .captured(port: 15006))
        XCTAssertEqual(result(nftDual, "v6/tcp/inbound/app/none/probe").verdict.kind, "bypass")
    }

    // MARK: mutations

    func testDeletedOutboundCaptureRuleIsAnEscape() throws {
        let text = Self.seedText.split(separator: "\n").filter { !$0.contains("--to-ports 15001") }.joined(separator: "\n")
        let r = try verify(text, policy: Self.forgedMarkPolicy)
        let v = result(r, "v4/tcp/app-remote/other/none")
        XCTAssertEqual(v.verdict.code, "uncaptured-tcp")
        XCTAssertTrue(v.isEscape)
        XCTAssertEqual(r.exitStatus, .escapeFound)
        XCTAssertTrue(r.findings.contains { $0.kind == .missing && $0.message.contains("outbound-capture") })
        // The app's port is no longer captured either, but inbound capture still works.
        XCTAssertEqual(result(r, "v4/tcp/inbound/app/none").verdict, .captured(port: 15006))
    }

    func testForeignAcceptAheadOfTheRedirectIsCaughtWithItsRule() throws {
        var lines = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let k = lines.firstIndex { $0.contains("--to-ports 15001") }!
        lines.insert("-A ISTIO_OUTPUT -p tcp -m tcp --dport 443 -j ACCEPT", at: k)
        let r = try verify(lines.joined(separator: "\n"), policy: Self.forgedMarkPolicy)
        let v = result(r, "v4/tcp/app-remote/other/none")   // other port = 443
        XCTAssertEqual(v.verdict.code, "uncaptured-tcp")
        XCTAssertTrue(v.path.contains { $0.contains("--dport 443 -j ACCEPT") }, "\(v.path)")
        XCTAssertEqual(result(r, "v4/tcp/app-remote/app/none").verdict, .captured(port: 15001))
        XCTAssertTrue(r.findings.contains { $0.kind == .foreign && $0.severity == .problem })
        XCTAssertTrue(r.findings.contains { $0.kind == .outOfOrder && $0.message.contains("outbound-capture") })
        // A foreign rule in the built-in chain ahead of the jump is flagged too.
        var ahead = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let j = ahead.lastIndex { $0 == "-A OUTPUT -j ISTIO_OUTPUT" }!
        ahead.insert("-A OUTPUT -p tcp -j ACCEPT", at: j)
        let rs = try RulesetLoader.load(text: ahead.joined(separator: "\n"), origin: "ahead")
        XCTAssertEqual(rs.allRules.first { $0.text == "-A OUTPUT -p tcp -j ACCEPT" }?.role, .foreign)
        // ACCEPT in nat OUTPUT ends nat for that packet: it never reaches ISTIO_OUTPUT.
        XCTAssertEqual(result(Verifier(ruleset: rs).run(), "v4/tcp/app-remote/other/none").verdict.code, "uncaptured-tcp")
    }

    /// A foreign rule that lets one port or one subnet out is an escape whatever port and remote address the class
    /// samples by default (443, 10.96.0.10): the ports and addresses the rules name are tried too.
    func testForeignBypassOfAPortOrSubnetTheDefaultSampleDoesNotHitIsCaught() throws {
        func with(_ rule: String) throws -> VerifyReport {
            var lines = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            let k = lines.firstIndex { $0.contains("--to-ports 15001") }!
            lines.insert(rule, at: k)
            return try verify(lines.joined(separator: "\n"), policy: Self.forgedMarkPolicy)
        }
        let cases: [(rule: String, code: String, packet: String)] = [
            ("-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN", "uncaptured-tcp", "→ 10.96.0.10:5432"),
            ("-A ISTIO_OUTPUT -p tcp -m multiport --dports 6379,11211 -j ACCEPT", "uncaptured-tcp", "→ 10.96.0.10:6379"),
            ("-A ISTIO_OUTPUT -p tcp -m tcp ! --dport 1:1024 -j ACCEPT", "uncaptured-tcp", "→ 10.96.0.10:"),
            ("-A ISTIO_OUTPUT -p tcp -m tcp --dport 8443 -j DNAT --to-destination 10.1.2.3:443", "dnat", "→ 10.96.0.10:8443"),
            ("-A ISTIO_OUTPUT -d 192.168.0.0/16 -j RETURN", "uncaptured-tcp", "→ 192.168.0.1:"),
            ("-A ISTIO_OUTPUT ! -d 10.0.0.0/8 -j RETURN", "uncaptured-tcp", "→ 11.0.0.0:"),
        ]
        for c in cases {
            let r = try with(c.rule)
            let v = result(r, "v4/tcp/app-remote/other/none")
            XCTAssertEqual(v.verdict.code, c.code, c.rule)
            XCTAssertTrue(v.packet.contains(c.packet), "\(c.rule): \(v.packet)")
            XCTAssertTrue(v.path.contains { $0.contains(c.rule) }, "\(c.rule): \(v.path)")
            XCTAssertEqual(r.exitStatus, .escapeFound, c.rule)
        }
        // A subnet the app reaches is not a probe address: the probe rules' own address is no remote sample.
        let seed = try verify(Self.seedText, policy: Self.forgedMarkPolicy)
        XCTAssertEqual(seed.exitStatus, .ok)
        XCTAssertEqual(result(seed, "v4/tcp/app-remote/other/none").packet, "tcp 10.244.0.10:40000 → 10.96.0.10:443")
    }

    func testMissingIp6tablesRulesInADualStackPod() throws {
        let r = try verify(Self.seedText, dualStack: true, policy: Self.forgedMarkPolicy)
        XCTAssertEqual(r.families, [.ipv4, .ipv6])
        XCTAssertEqual(result(r, "v6/tcp/app-remote/other/none").verdict.code, "ipv6-uncaptured")
        XCTAssertEqual(result(r, "v6/tcp/inbound/app/none").verdict.code, "ipv6-uncaptured")
        XCTAssertEqual(result(r, "v4/tcp/app-remote/other/none").verdict, .captured(port: 15001))
        XCTAssertTrue(r.findings.contains { $0.kind == .missingIPv6 })
        // Only part of the IPv6 rules present: the missing twin is named.
        let dual = try String(contentsOf: RulesetParsingTests.fixture("dualstack.iptables-save.txt"), encoding: .utf8)
        let v6Start = dual.range(of: "# Generated by ip6tables-save")!.lowerBound
        let v6 = String(dual[v6Start...]).split(separator: "\n").filter { !$0.contains("REDIRECT --to-ports 15001") }.joined(separator: "\n")
        let partial = try verify(String(dual[..<v6Start]) + v6, policy: Self.forgedMarkPolicy)
        XCTAssertEqual(result(partial, "v6/tcp/app-remote/other/none").verdict.code, "uncaptured-tcp")
        XCTAssertTrue(partial.findings.contains { $0.kind == .missingIPv6 && $0.message.contains("outbound-capture") })
    }

    func testAnEmptyIPv6FamilyInTheFileIsEvaluatedAndEscapes() throws {
        let text = Self.seedText + "\n# Generated by ip6tables-save v1.8.9 (nf_tables) on Fri Nov 27 23:00:00 2026\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
        let r = try verify(text, policy: Self.forgedMarkPolicy)
        XCTAssertEqual(r.families, [.ipv4, .ipv6])
        XCTAssertEqual(result(r, "v6/tcp/app-remote/other/none").verdict.code, "ipv6-uncaptured")
        XCTAssertEqual(result(r, "v6/udp/app-remote/other/none").verdict.kind, "bypass")
        XCTAssertEqual(r.exitStatus, .escapeFound)
    }

    func testWidenedMarkExclusion() throws {
        func mutated(_ to: String) -> String {
            Self.seedText.replacingOccurrences(of: "! --mark 0x539/0xfff -j REDIRECT --to-ports 15001", with: "! --mark \(to) -j REDIRECT --to-ports 15001")
        }
        let wide = try verify(mutated("0x500/0xf00"), policy: Self.forgedMarkPolicy)
        XCTAssertEqual(result(wide, "v4/tcp/app-remote/other/mark-other").verdict.code, "mark-exclusion-wide")
        XCTAssertEqual(result(wide, "v4/tcp/app-remote/other/none").verdict, .captured(port: 15001))
        XCTAssertEqual(wide.exitStatus, .escapeFound)
        // Everything exempt: every app TCP escapes, unmarked included.
        let all = try verify(mutated("0x0/0x0"), policy: Self.forgedMarkPolicy)
        XCTAssertEqual(result(all, "v4/tcp/app-remote/other/none").verdict.code, "uncaptured-tcp")
        // Mask 0x0 with 0x539: nothing is exempt, so ztunnel's own connection is sent back to ztunnel.
        let loop = try verify(mutated("0x539/0x0"))
        XCTAssertEqual(result(loop, "v4/tcp/ztunnel/15008/mark-0x539").verdict.kind, "loop")
        XCTAssertEqual(result(loop, "v4/tcp/app-remote/other/mark-0x539").verdict, .captured(port: 15001))
    }

    /// A mangle table in the other backend that marks every app TCP packet 0x539 (ztunnel's mark): a bypass the
    /// ambient rules cannot see. Static here, loaded into iptables-legacy by `RulesKernelTests`.
    static let legacyForgedMarkTable = """
        # Generated by iptables-save v1.8.9 on Fri Nov 27 23:00:00 2026
        *mangle
        :PREROUTING ACCEPT [0:0]
        :INPUT ACCEPT [0:0]
        :FORWARD ACCEPT [0:0]
        :OUTPUT ACCEPT [0:0]
        :POSTROUTING ACCEPT [0:0]
        :ISTIO_OUTPUT - [0:0]
        -A OUTPUT -j ISTIO_OUTPUT
        -A ISTIO_OUTPUT -p tcp -j MARK --set-xmark 0x539/0xfff
        COMMIT

        """

    func testRuleOnlyInTheOtherBackend() throws {
        let r = try verify(Self.seedText + "\n" + Self.legacyForgedMarkTable, policy: Self.forgedMarkPolicy)
        XCTAssertTrue(r.findings.contains { $0.kind == .bothBackends })
        let v = result(r, "v4/tcp/app-remote/other/none")
        XCTAssertTrue(v.isEscape, v.verdict.summary)
        XCTAssertTrue(v.path.contains { $0.contains("MARK --set-xmark 0x539/0xfff") })
        // A stale nat copy in legacy without the REDIRECT does not stop iptables-nft's REDIRECT (nat runs until one NATs),
        // but it is a finding.
        let staleNat = Self.seedText.replacingOccurrences(of: "(nf_tables) ", with: "").split(separator: "\n")
            .filter { !$0.contains("15001") }.joined(separator: "\n")
        let both = try verify(Self.seedText + "\n" + staleNat, policy: Self.forgedMarkPolicy)
        XCTAssertTrue(both.findings.contains { $0.kind == .bothBackends })
        XCTAssertEqual(result(both, "v4/tcp/app-remote/other/none").verdict, .captured(port: 15001))
    }

    func testMissingConnmarkRestoreLetsRepliesBypassZtunnel() throws {
        let text = Self.seedText.split(separator: "\n").filter { !$0.contains("--restore-mark") }.joined(separator: "\n")
        let r = try verify(text, policy: Self.forgedMarkPolicy)
        let v = result(r, "v4/tcp/inbound-lo/app/mark-0x539")
        XCTAssertEqual(v.verdict.code, "reply-uncaptured")
        XCTAssertTrue(r.findings.contains { $0.kind == .missing && $0.message.contains("connmark-restore") })
    }

    func testUnknownMatchIsTreatedAsMayMatch() throws {
        var lines = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let k = lines.firstIndex { $0.contains("--to-ports 15001") }!
        lines.insert("-A ISTIO_OUTPUT -p tcp -m statistic --mode random --probability 0.5 -j ACCEPT", at: k)
        let r = try verify(lines.joined(separator: "\n"), policy: Self.forgedMarkPolicy)
        let v = result(r, "v4/tcp/app-remote/other/none")
        XCTAssertEqual(v.verdict.code, "uncaptured-tcp")
        XCTAssertFalse(v.uncertainty.isEmpty)
        XCTAssertTrue(v.uncertainty.joined().contains("statistic"))
    }

    /// An owner match is "may match"; the uncertainty note must say so, not print empty parentheses (it named
    /// only unmodelled matches: `assumed to match ()`).
    func testUncertaintyNamesTheOwnerMatch() throws {
        var lines = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let k = lines.firstIndex { $0.contains("--to-ports 15001") }!
        lines.insert("-A ISTIO_OUTPUT -m owner --uid-owner 1000 -j RETURN", at: k)
        let r = try verify(lines.joined(separator: "\n"), policy: Self.forgedMarkPolicy)
        let v = result(r, "v4/tcp/app-remote/other/none")
        XCTAssertEqual(v.verdict.code, "uncaptured-tcp")
        XCTAssertFalse(v.uncertainty.isEmpty)
        XCTAssertFalse(v.uncertainty.joined().contains("()"), v.uncertainty.joined(separator: " | "))
        XCTAssertTrue(v.uncertainty.joined().contains("owner uid 1000"), v.uncertainty.joined(separator: " | "))
    }

    /// Any process can bind a source port: a foreign `--sport` RETURN/ACCEPT ahead of the capture is an escape for
    /// connections made from that port (outbound), or sent from it (inbound). Only the ephemeral port 40000 was tried.
    func testForeignSourcePortRulesAreWalked() throws {
        var lines = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let k = lines.firstIndex { $0.contains("--to-ports 15001") }!
        lines.insert("-A ISTIO_OUTPUT -p tcp -m tcp --sport 8080 -j RETURN", at: k)
        let j = lines.firstIndex { $0.contains("--to-ports 15006") }!
        lines.insert("-A ISTIO_PRERT -p tcp -m tcp --sport 53 -j ACCEPT", at: j)
        let r = try verify(lines.joined(separator: "\n"), policy: Self.forgedMarkPolicy)
        let out = result(r, "v4/tcp/app-remote/other/none")
        XCTAssertEqual(out.verdict.code, "uncaptured-tcp")
        XCTAssertTrue(out.packet.contains(":8080 →"), out.packet)
        let inb = result(r, "v4/tcp/inbound/app/none")
        XCTAssertEqual(inb.verdict.code, "inbound-uncaptured")
        XCTAssertTrue(inb.packet.contains(":53 →"), inb.packet)
        // The untouched ruleset names no source port: still clean.
        XCTAssertEqual(try verify(Self.seedText, policy: Self.forgedMarkPolicy).escapes.count, 0)
    }

    /// A rule that names a source port and a destination together matches only a packet with both: tried one value
    /// at a time it was never matched, and verify said clean. The rule's values are tried together. And the named
    /// values are tried one dimension at a time, not in every combination (that took 32 s for 96 foreign rules):
    /// the packets per class grow with the values the rules name, not with their product.
    func testARuleNamingTwoValuesIsTriedWithBothAndTheSamplesDoNotMultiply() throws {
        var lines = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let k = lines.firstIndex { $0.contains("--to-ports 15001") }!
        lines.insert("-A ISTIO_OUTPUT -d 192.168.7.0/24 -p tcp -m tcp --sport 8080 -j RETURN", at: k)
        let r = try verify(lines.joined(separator: "\n"), policy: Self.forgedMarkPolicy)
        let out = result(r, "v4/tcp/app-remote/other/none")
        XCTAssertEqual(out.verdict.code, "uncaptured-tcp")
        XCTAssertTrue(out.packet.contains(":8080 → 192.168.7."), out.packet)

        var many = Self.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let m = many.firstIndex { $0.contains("--to-ports 15001") }!
        for i in 0..<32 {
            many.insert("-A ISTIO_OUTPUT -p tcp -m tcp --dport \(5000 + i) -j ACCEPT", at: m)
            many.insert("-A ISTIO_OUTPUT -p tcp -m tcp --sport \(6000 + i) -j ACCEPT", at: m)
            many.insert("-A ISTIO_OUTPUT -d 192.168.\(i).0/24 -j ACCEPT", at: m)
        }
        let verifier = Verifier(ruleset: try RulesetLoader.load(text: many.joined(separator: "\n"), origin: "test"), pod: PodParameters())
        let c = PacketClass(family: .ipv4, proto: .tcp, path: .appToRemote, port: .other, mark: .none, probe: false)
        // Its own values, 32 named of each kind; never 32 × 32 × 32.
        XCTAssertLessThanOrEqual(verifier.packetVariants(c).count, 1 + 3 * 32)
        XCTAssertGreaterThanOrEqual(verifier.packetVariants(c).count, 1 + 3 * 31)
    }

    /// Without istio-cni's ip rule (a live netns that lacks it, or --no-policy-routing) the reply does get mark 0x111
    /// and still leaves: the reason must name the missing ip rule, not say "gets mark 0x111, not 0x111".
    func testReplyEscapeWithoutPolicyRoutingNamesTheIpRule() throws {
        var pod = PodParameters()
        pod.policyRouting = false
        let r = Verifier(ruleset: try RulesetLoader.load(text: Self.seedText, origin: "test"), pod: pod).run()
        let v = result(r, "v4/tcp/inbound-lo/app/mark-0x539")
        XCTAssertEqual(v.verdict.code, "reply-uncaptured")
        XCTAssertFalse(v.verdict.summary.contains("not 0x111"), v.verdict.summary)
        XCTAssertTrue(v.verdict.summary.contains("no ip rule"), v.verdict.summary)
        // A missing restore still says which mark the reply got.
        let text = Self.seedText.split(separator: "\n").filter { !$0.contains("--restore-mark") }.joined(separator: "\n")
        XCTAssertTrue(result(try verify(text), "v4/tcp/inbound-lo/app/mark-0x539").verdict.summary.contains("gets mark 0x0, not 0x111"))
    }

    func testPolicyFiles() throws {
        let p = try VerifyPolicy(text: "allow v4/tcp/app-remote/*/mark-0x539\n\n# ok\nallow reason uncaptured-udp  # by design anyway\n", origin: "p.txt")
        let r = Verifier(ruleset: try RulesetLoader.load(file: Self.seedPath), policy: p).run()
        XCTAssertEqual(r.escapes.count, 0)
        XCTAssertTrue(r.accepted.allSatisfy { $0.acceptedBy?.hasPrefix("p.txt line 1:") == true })
        XCTAssertThrowsError(try VerifyPolicy(text: "allow v4/tcp\npermit everything\n", origin: "bad.txt")) { e in
            XCTAssertEqual((e as? MeshtraceError)?.code, .badInput)
            XCTAssertTrue("\(e)".contains("bad.txt line 2"), "\(e)")
        }
        XCTAssertTrue(VerifyPolicy.glob("v4/tcp/*/mark-0x539", "v4/tcp/app-remote/other/mark-0x539"))
        XCTAssertFalse(VerifyPolicy.glob("v4/udp/*", "v4/tcp/app-remote/other/none"))
    }

    func testNoRulesAtAllIsAnEscapeForEveryTcpClass() throws {
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
        let r = try verify(empty)
        XCTAssertTrue(r.findings.contains { $0.kind == .notAmbient })
        XCTAssertEqual(result(r, "v4/tcp/app-remote/other/none").verdict.code, "ipv4-uncaptured")
        XCTAssertEqual(result(r, "v4/tcp/inbound/app/none").verdict.code, "ipv4-uncaptured")
        XCTAssertEqual(result(r, "v4/udp/app-remote/other/none").verdict.kind, "bypass")
    }
}
