import XCTest
@testable import Capture

/// The shared reference rulesets (`../shared/reference/rulesets`), or the copy in Fixtures/rulesets/reference when the
/// repository is checked out alone (a fresh CI clone).
enum RulesReference {
    static var rulesets: URL {
        let shared = ProjectPaths.reference.appendingPathComponent("rulesets")
        if FileManager.default.fileExists(atPath: shared.appendingPathComponent("seed-ambient-pod.iptables-save.txt").path) { return shared }
        return ProjectPaths.fixtures.appendingPathComponent("rulesets/reference")
    }
}

/// Every reference ruleset parses into the one model with the roles Istio's own rule texts say, and every form of
/// the same ruleset (save output, golden, nft text, nft JSON, restore input) reads the same.
final class RulesetParsingTests: XCTestCase {
    static var referenceFiles: [URL] {
        let dir = RulesReference.rulesets
        let top = (try? FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)) ?? []
        let istio = (try? FileManager.default.contentsOfDirectory(at: dir.appendingPathComponent("istio"), includingPropertiesForKeys: nil)) ?? []
        return (top + istio).filter { !$0.hasDirectoryPath && $0.pathExtension != "md" }.sorted { $0.path < $1.path }
    }
    static func fixture(_ name: String) -> URL { ProjectPaths.fixtures.appendingPathComponent("rulesets/\(name)") }

    /// The role a rule's own text announces, by the markers Istio's rules carry (independent of the labeller's logic).
    static func roleFromText(_ raw: String, chain: String) -> AmbientRole {
        let text = raw.replacingOccurrences(of: "0x00000", with: "0x")
        let inbound = chain == "ISTIO_PRERT" || chain == "istio-prerouting"
        if text.contains("ISTIO_") && (text.hasPrefix("-A PREROUTING") || text.hasPrefix("-A OUTPUT")) { return .jumpToAmbientChain }
        if text.hasPrefix("jump istio-") { return .jumpToAmbientChain }
        if text.contains("15001") { return .outboundCapture }
        if text.contains("15006") { return .inboundCapture }
        if text.contains("15053") { return .dnsCapture }
        if text.contains("zone") { return .dnsConntrackZone }
        if text.contains("restore-mark") || text.contains("meta mark set ct mark") { return .connmarkRestore }
        if text.contains("set-xmark 0x111") || text.contains("ct mark set") { return .connmarkFromZtunnel }
        if text.contains("169.254.7.127") || text.contains("e9ac:") || text.contains("fd16:9254") { return inbound ? .probeBypassInbound : .probeBypassOutbound }
        if text.contains("0x111") { return .ztunnelReplyBypass }
        if text.contains("lo") { return .localBypass }
        return .other
    }

    func testEveryReferenceRulesetParsesWithTheRolesItsTextAnnounces() throws {
        let files = Self.referenceFiles
        XCTAssertGreaterThanOrEqual(files.count, 10, "reference rulesets not found under \(RulesReference.rulesets.path)")
        for url in files {
            let rs = try RulesetLoader.load(file: url.path)
            let text = try String(contentsOf: url, encoding: .utf8)
            // As many rules as the file has rule lines.
            let ruleLines = text.split(separator: "\n").filter {
                let l = $0.trimmingCharacters(in: .whitespaces)
                if l.hasPrefix("-A ") || l.hasPrefix("[") { return true }
                if l.hasPrefix("add rule ") { return true }
                if url.lastPathComponent.contains("nft-list") { return !l.isEmpty && !l.hasPrefix("table") && !l.hasPrefix("chain") && !l.hasPrefix("type") && l != "}" }
                return false
            }
            XCTAssertEqual(rs.allRules.count, ruleLines.count, url.lastPathComponent)
            for r in rs.allRules {
                XCTAssertEqual(r.role, Self.roleFromText(r.text, chain: r.chain), "\(url.lastPathComponent): \(r.chain) \(r.text)")
                XCTAssertGreaterThan(r.line, 0)
                XCTAssertTrue(text.split(separator: "\n", omittingEmptySubsequences: false)[r.line - 1].contains(r.text.split(separator: " ").last.map(String.init) ?? "?"),
                              "line \(r.line) of \(url.lastPathComponent) is not where '\(r.text)' came from")
            }
            let analysis = RulesetAnalysis(rs)
            XCTAssertEqual(analysis.problems, [], "\(url.lastPathComponent): \(analysis.problems.map(\.message))")
            XCTAssertEqual(analysis.variant.era, .redirect, url.lastPathComponent)
        }
    }

    func testVariantsAreDetected() throws {
        func variant(_ url: URL) throws -> RulesetVariant { RulesetAnalysis(try RulesetLoader.load(file: url.path)).variant }
        let ref = RulesReference.rulesets
        let seed = try variant(ref.appendingPathComponent("seed-ambient-pod.iptables-save.txt"))
        XCTAssertFalse(seed.dnsCapture)
        XCTAssertEqual(seed.backends, [.iptablesNft])
        XCTAssertTrue(seed.ipv4 && !seed.ipv6)
        let dns = try variant(ref.appendingPathComponent("istio/iptables_master_default.iptables-legacy-save.txt"))
        XCTAssertTrue(dns.dnsCapture)
        XCTAssertEqual(dns.backends, [.iptablesLegacy])
        let v6 = try variant(ref.appendingPathComponent("istio/iptables_master_default_ipv6.golden"))
        XCTAssertTrue(v6.ipv4 && v6.ipv6)
        XCTAssertEqual(v6.probeAddresses.map(\.description), ["169.254.7.127", "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"])
        let nft = try variant(ref.appendingPathComponent("istio/nft_master_default.nft-list-ruleset.txt"))
        XCTAssertEqual(nft.backends, [.nftables])
        XCTAssertTrue(nft.dnsCapture)

        let tproxy = try variant(Self.fixture("tproxy-era.iptables-save.txt"))
        XCTAssertEqual(tproxy.era, .tproxy)
        XCTAssertFalse(tproxy.ingressMode)
        let ingress = try variant(Self.fixture("ingress-mode.iptables-save.txt"))
        XCTAssertEqual(ingress.era, .none)
        XCTAssertTrue(ingress.ingressMode)
        let vif = try variant(Self.fixture("virtual-interfaces.iptables-save.txt"))
        XCTAssertEqual(vif.virtualInterfaces, ["net1", "kubevirt0"])
        let host = try variant(Self.fixture("host-probe.iptables-save.txt"))
        XCTAssertTrue(host.hostProbeRules)
        let dual = try variant(Self.fixture("dualstack.iptables-save.txt"))
        XCTAssertTrue(dual.ipv4 && dual.ipv6)
        XCTAssertTrue(dual.probeAddresses.contains(AmbientLabeler.defaultProbeV6))
        let nftDual = try variant(Self.fixture("nft-dualstack.nft"))
        XCTAssertTrue(nftDual.ipv4 && nftDual.ipv6)
        XCTAssertEqual(nftDual.backends, [.nftables])
    }

    func testRolesOfTheVariantsWrittenFromAmbientMd() throws {
        let tproxy = try RulesetLoader.load(file: Self.fixture("tproxy-era.iptables-save.txt").path)
        let prert = tproxy.tables.first { $0.name == "mangle" }!.chain("ISTIO_PRERT")!.rules.map(\.role)
        XCTAssertEqual(prert, [.connmarkFromZtunnel, .probeBypassInbound, .loopbackAccept, .inboundHboneTproxy, .establishedAccept, .inboundCaptureTproxy])
        if case .tproxy(let port, let ip, let mark, let mask) = tproxy.tables.first(where: { $0.name == "mangle" })!.chain("ISTIO_PRERT")!.rules[3].target {
            XCTAssertEqual(port, 15008); XCTAssertEqual(ip, IPAddress("0.0.0.0")); XCTAssertEqual(mark, 0x111); XCTAssertEqual(mask, 0xfff)
        } else { XCTFail("TPROXY target not parsed") }
        let vif = try RulesetLoader.load(file: Self.fixture("virtual-interfaces.iptables-save.txt").path)
        XCTAssertEqual(vif.tables.first { $0.name == "nat" }!.chain("ISTIO_PRERT")!.rules.map(\.role),
                       [.virtualInterfaceCapture, .virtualInterfaceReturn, .virtualInterfaceCapture, .virtualInterfaceReturn, .probeBypassInbound, .inboundCapture])
        let host = try RulesetLoader.load(file: Self.fixture("host-probe.iptables-save.txt").path)
        let snat = host.allRules.first { $0.chain == "ISTIO_POSTRT" }!
        XCTAssertEqual(snat.role, .hostProbeSNAT)
        XCTAssertTrue(snat.matches.contains(.owner(uid: nil, gid: nil, socketExists: true, negated: false)))
        XCTAssertTrue(snat.matches.contains(.set(name: "istio-inpod-probes-v4", direction: "dst", negated: false)))
        XCTAssertEqual(snat.target, .snat("169.254.7.127"))
        // KUBE-POSTROUTING's MASQUERADE --random-fully is an extension meshtrace does not model: kept verbatim.
        XCTAssertTrue(host.allRules.contains { $0.target == .masquerade || $0.target == .unknown("MASQUERADE --random-fully") })
    }

    /// The same ruleset in its other forms reads the same: restore input with -I/-N equals the seed's save output;
    /// the legacy render with counters equals the golden's v4 block; nft JSON and `nft -a` text equal the nft golden.
    func testEveryFormOfOneRulesetReadsTheSame() throws {
        func key(_ rs: Ruleset) -> [String] {
            rs.tables.sorted { $0.name < $1.name }.flatMap { t in
                t.chains.sorted { $0.name < $1.name }.flatMap { c in c.rules.map { "\(t.name) \(c.name) \($0.position) \($0.role.rawValue) \($0.matches) \($0.target)" } }
            }
        }
        let ref = RulesReference.rulesets
        let seed = try RulesetLoader.load(file: ref.appendingPathComponent("seed-ambient-pod.iptables-save.txt").path)
        let restore = try RulesetLoader.load(file: Self.fixture("restore-input.rules").path)
        XCTAssertEqual(key(restore), key(seed))
        XCTAssertEqual(restore.allRules.map(\.canonicalText).sorted(), seed.allRules.map(\.canonicalText).sorted())

        let golden = try RulesetLoader.load(file: ref.appendingPathComponent("istio/iptables_master_default.golden").path)
        let counters = try RulesetLoader.load(file: Self.fixture("legacy-counters.iptables-save.txt").path)
        XCTAssertEqual(counters.tables.map(\.backend), [.iptablesLegacy, .iptablesLegacy, .iptablesLegacy])
        // The golden writes "-s 169.254.7.127" where save prints "/32", and "--to-port": the model does not care.
        XCTAssertEqual(key(counters), key(golden))
        XCTAssertFalse(counters.allRules.contains { $0.text.contains("[") }, "counters leaked into the rule text")

        let nftGolden = try RulesetLoader.load(file: ref.appendingPathComponent("istio/nft_master_default.golden").path)
        let nftList = try RulesetLoader.load(file: ref.appendingPathComponent("istio/nft_master_default.nft-list-ruleset.txt").path)
        let nftJSON = try RulesetLoader.load(file: Self.fixture("nft-default.nft.json").path)
        let nftHandles = try RulesetLoader.load(file: Self.fixture("nft-default-handles.nft.txt").path)
        XCTAssertEqual(key(nftList), key(nftGolden))
        XCTAssertEqual(key(nftJSON), key(nftGolden))
        XCTAssertEqual(key(nftHandles), key(nftGolden))
        XCTAssertTrue(nftJSON.allRules.allSatisfy { $0.handle != nil })
        XCTAssertTrue(nftHandles.allRules.allSatisfy { $0.handle != nil })
        XCTAssertEqual(Set(nftJSON.allRules.map(\.handle)), Set(nftHandles.allRules.map(\.handle)))
        // nft's own rewrite of Istio's connmark rule keeps its meaning: set-xmark 0x111/0xfff.
        let cm = nftList.allRules.first { $0.role == .connmarkFromZtunnel }!
        XCTAssertEqual(cm.target, .connmarkSet(value: 0x111, mask: 0xfff))
        XCTAssertEqual(nftList.allRules.first { $0.role == .connmarkRestore }!.target, .connmarkRestore(nfmask: 0xffff_ffff, ctmask: 0xffff_ffff))
    }

    func testMatchTextIsTheVerbatimMatchPartAndReparses() throws {
        let ref = RulesReference.rulesets
        let seed = try RulesetLoader.load(file: ref.appendingPathComponent("seed-ambient-pod.iptables-save.txt").path)
        let redirect = seed.allRules.first { $0.role == .outboundCapture }!
        XCTAssertEqual(redirect.matchText, "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff")
        XCTAssertEqual(redirect.text, "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001")
        // A twin is matchText plus an NFLOG target; read back it has the same matches.
        for r in seed.allRules {
            let twin = "*\(r.table)\n:\(r.chain) - [0:0]\n-A \(r.chain) \(r.matchText) -j NFLOG --nflog-group 7 --nflog-prefix \"mt:4:x:y:1:-\"\nCOMMIT\n"
            let back = try RulesetLoader.load(text: twin, origin: "twin").allRules[0]
            XCTAssertEqual(back.matches, r.matches, r.text)
            XCTAssertEqual(back.target, .nflog(group: 7, prefix: "mt:4:x:y:1:-"))
            XCTAssertEqual(back.role, .meshtraceTwin)
        }
        let nft = try RulesetLoader.load(file: ref.appendingPathComponent("istio/nft_master_default.nft-list-ruleset.txt").path)
        let out = nft.allRules.first { $0.role == .outboundCapture }!
        XCTAssertEqual(out.matchText, "meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0x00000fff != 0x00000539")
        XCTAssertFalse(nft.allRules.contains { $0.text.contains("packets") }, "nft counters leaked into the rule text")
    }

    func testMeshtraceRulesAreLabelledAndDoNotShiftPositions() throws {
        let text = """
        *nat
        :OUTPUT ACCEPT [0:0]
        :ISTIO_OUTPUT - [0:0]
        -A OUTPUT -j ISTIO_OUTPUT
        -A ISTIO_OUTPUT -m comment --comment meshtrace -j NFLOG --nflog-group 9 --nflog-prefix "mt:4:nat:ISTIO_OUTPUT:1:-"
        -A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
        -A ISTIO_OUTPUT -m comment --comment "meshtrace" -j NFLOG --nflog-group 9 --nflog-prefix "mt:4:nat:ISTIO_OUTPUT:in:-"
        -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
        COMMIT
        """
        let rs = try RulesetLoader.load(text: text, origin: "twins")
        let rules = rs.tables[0].chain("ISTIO_OUTPUT")!.rules
        XCTAssertEqual(rules.map(\.role), [.meshtraceTwin, .probeBypassOutbound, .meshtraceObservation, .outboundCapture])
        XCTAssertEqual(rules.filter { !$0.isMeshtraceRule }.map(\.position), [1, 2])
        let tag = RuleTag(family: .v4, table: "nat", chain: "ISTIO_OUTPUT", position: .rule(2), textHash: RuleTag.textHash(rules[3].canonicalText))
        XCTAssertEqual(rs.rule(for: tag)?.role, .outboundCapture)
        let analysis = RulesetAnalysis(rs)
        XCTAssertFalse(analysis.findings.contains { $0.rule?.isMeshtraceRule == true }, "meshtrace's own rules were flagged")
    }

    func testNftStatementsIstioHasUsed() throws {
        let text = """
        table inet t {
            chain output {
                type nat hook output priority -100; policy accept;
                oifname "eth*" ip6 daddr != ::1/128 meta l4proto { tcp, udp } th dport { 53, 80-90 } counter packets 3 bytes 180 redirect to :15053
                ct state established,related accept
                meta skuid 1337 return
                ip saddr @probes tcp sport 443 meta mark set 0x539 comment "x"
                icmp type echo-request accept
                tcp dport 15008 tproxy ip to :15008 meta mark set 0x111
                meta nfproto ipv6 log group 5 prefix "mt:n:t:output:in:-"
            }
        }
        """
        let rs = try RulesetLoader.load(text: text, origin: "nft")
        let r = rs.allRules
        XCTAssertEqual(r.count, 7)
        XCTAssertEqual(r[0].matches, [
            .outInterface("eth+", negated: false), .family(.ipv6, negated: false),
            .destination(CIDR(address: IPAddress("::1")!, prefixLength: 128), negated: true),
            .anyOf([.protocolIs(6, negated: false), .protocolIs(17, negated: false)], negated: false),
            .anyOf([.destinationPort(PortRange(53), negated: false), .destinationPort(PortRange(80, 90), negated: false)], negated: false),
        ])
        XCTAssertEqual(r[0].target, .redirect(toPort: 15053))
        XCTAssertEqual(r[1].matches, [.ctstate(["ESTABLISHED", "RELATED"], negated: false)])
        XCTAssertEqual(r[2].matches, [.owner(uid: 1337, gid: nil, socketExists: false, negated: false)])
        XCTAssertEqual(r[2].target, .return)
        XCTAssertTrue(r[3].matches.contains(.set(name: "probes", direction: "src", negated: false)))
        XCTAssertEqual(r[3].target, .setMark(value: 0x539, mask: 0xffff_ffff))
        XCTAssertTrue(r[4].matches.contains { if case .unknown(let s) = $0 { return s.contains("icmp type echo-request") }; return false })
        if case .tproxy(let p, _, _, _) = r[5].target { XCTAssertEqual(p, 15008) } else { XCTFail("tproxy") }
        XCTAssertEqual(r[6].target, .nflog(group: 5, prefix: "mt:n:t:output:in:-"))
        XCTAssertEqual(r[6].role, .meshtraceObservation)
    }
}
