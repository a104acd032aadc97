import XCTest
#if canImport(Glibc)
import Glibc
#endif
@testable import Capture

/// The static verdicts checked against what the kernel does: a pod netns loaded with a real ruleset, a peer netns
/// on a veth, real connections with socat (SO_MARK via setsockopt), and where each one really arrived, plus
/// conntrack's record of the NAT and the rule counters. Also: reading a live netns through every backend, and
/// NFLOG twins built from `matchText` being accepted by iptables-restore and nft.
final class RulesKernelTests: KernelTestCase {
    let podIP = "10.77.0.2", peerIP = "10.77.0.1"
    var scratch: URL!

    override func setUpWithError() throws {
        try super.setUpWithError()
        try XCTSkipUnless(Command.which("socat") != nil, "socat is needed (scripts/setup --test installs it)")
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("mt-rules-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDown() {
        stopListeners()
        if let scratch { try? FileManager.default.removeItem(at: scratch) }
        super.tearDown()
    }

    /// A pod netns and a peer netns joined by a veth (eth0 on both sides).
    func makePodAndPeer() throws -> (pod: ScratchNetns, peer: ScratchNetns) {
        let (pod, peer) = try makeNetnsPair(podIP, peerIP)
        return (pod, peer)
    }

    var pod: PodParameters {
        var p = PodParameters()
        p.podIPv4 = IPAddress(podIP)!
        p.remoteIPv4 = IPAddress(peerIP)!
        p.interface = "eth0"
        p.appPort = 8080
        p.otherPort = 9443
        return p
    }

    /// A one-shot listener whose received bytes land in a file; `spec` is a socat address (TCP-LISTEN:..., UDP-RECV:...).
    func listen(_ ns: ScratchNetns, _ spec: String, _ name: String) throws -> URL {
        let out = scratch.appendingPathComponent(name)
        try? FileManager.default.removeItem(at: out)
        // Started as our own child (not through `sh ... &`): a backgrounded grandchild would inherit the descriptor
        // Foundation's Process uses to notice a child's exit, and Command.run would wait for it forever.
        listeners.append(try Command.start(["socat", "-u", "\(spec),reuseaddr", "OPEN:\(out.path),creat"], in: ns.ref))
        return out
    }

    var listeners: [Process] = []

    /// Ends the listeners this test started, so the next case binds its ports afresh.
    func stopListeners() {
        for p in listeners where p.isRunning { p.terminate() }
        for p in listeners {
            let deadline = Date().addingTimeInterval(2)
            while p.isRunning && Date() < deadline { usleep(20_000) }
        }
        listeners.removeAll()
    }

    func received(_ url: URL) -> String { (try? String(contentsOf: url, encoding: .utf8)) ?? "" }

    func waitForListener(_ ns: ScratchNetns, port: Int, udp: Bool = false) {
        let deadline = Date().addingTimeInterval(3)
        while Date() < deadline {
            let r = ns.attempt(["ss", udp ? "-lun" : "-ltn"])
            if r.stdout.contains(":\(port) ") { return }
            usleep(50_000)
        }
    }

    func send(_ ns: ScratchNetns, _ text: String, to spec: String) {
        _ = ns.attempt(["sh", "-c", "echo \(text) | socat -u -T 3 - \(spec),connect-timeout=2"])
    }

    /// Waits (bounded) until some listener file holds the payload.
    func arrival(_ token: String, among files: [String: URL]) -> String? {
        let deadline = Date().addingTimeInterval(3)
        while Date() < deadline {
            for (name, url) in files where received(url).contains(token) { return name }
            usleep(50_000)
        }
        return nil
    }

    func ruleCounter(_ ns: ScratchNetns, containing needle: String) throws -> Int {
        let save = try ns.run(["iptables-save", "-c", "-t", "nat"]).stdout
        guard let line = save.split(separator: "\n").first(where: { $0.contains(needle) }),
              let close = line.firstIndex(of: ":") else { return -1 }
        return Int(line.dropFirst().prefix(upTo: close)) ?? -1
    }

    /// Sends one outbound TCP connection from the pod; returns where it arrived: "ztunnel:15001" or "peer".
    func outboundTCP(_ p: ScratchNetns, _ q: ScratchNetns, mark: UInt32?, token: String) throws -> String? {
        stopListeners()
        let z = try listen(p, "TCP-LISTEN:15001", "z-\(token)")
        let peer = try listen(q, "TCP-LISTEN:8080,bind=\(peerIP)", "peer-\(token)")
        waitForListener(p, port: 15001); waitForListener(q, port: 8080)
        if let mark {
            // socat 1.7.4 applies setsockopt-int only after connect(); the mark must be on the socket before the SYN.
            markedConnect(netns: p.ref.path, to: peerIP, port: 8080, mark: mark, payload: token)
        } else {
            send(p, token, to: "TCP:\(peerIP):8080")
        }
        return arrival(token, among: ["ztunnel:15001": z, "peer": peer])
    }

    /// A process that sets SO_MARK (as ztunnel does, and as any CAP_NET_ADMIN process can): a thread that enters the
    /// pod netns (setns is per thread for network namespaces), marks a TCP socket, connects and sends.
    func markedConnect(netns: String, to host: String, port: UInt16, mark: UInt32, payload: String) {
        let done = DispatchSemaphore(value: 0)
        let t = Thread {
            defer { done.signal() }
            let nsfd = open(netns, O_RDONLY)
            guard nsfd >= 0, rulesTestSetns(nsfd, 0x4000_0000 /* CLONE_NEWNET */) == 0 else { return }
            close(nsfd)
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { return }
            defer { close(fd) }
            var m = mark
            guard setsockopt(fd, SOL_SOCKET, SO_MARK, &m, socklen_t(MemoryLayout<UInt32>.size)) == 0 else { return }
            var tv = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = port.bigEndian
            inet_pton(AF_INET, host, &addr.sin_addr)
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard rc == 0 else { return }
            let bytes = Array((payload + "\n").utf8)
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        }
        t.start()
        _ = done.wait(timeout: .now() + 5)
    }

    func staticVerdict(_ rs: Ruleset, _ id: String) -> VerifyVerdict {
        let r = Verifier(ruleset: rs, pod: pod).run()
        return r.results.first { $0.packetClass.id == id }!.verdict
    }

    /// What "arrived at" means for a static verdict: captured(P) → ztunnel's listener P; leaving directly → the peer.
    func expectedArrival(_ v: VerifyVerdict) -> String {
        switch v {
        case .captured(let p): return "ztunnel:\(p)"
        default: return "peer"
        }
    }

    func testStaticVerdictsMatchTheKernelForTheSeed() throws {
        let (p, q) = try makePodAndPeer()
        let seedPath = VerifierTests.seedPath
        try p.run(["iptables-restore"], input: try String(contentsOfFile: seedPath, encoding: .utf8))
        let rs = try RulesetLoader.load(file: seedPath)

        // App → remote TCP: captured by 15001; conntrack records the REDIRECT, the rule's counter moves.
        let before = try ruleCounter(p, containing: "--to-ports 15001")
        let plain = staticVerdict(rs, "v4/tcp/app-remote/app/none")
        XCTAssertEqual(plain, .captured(port: 15001))
        XCTAssertEqual(try outboundTCP(p, q, mark: nil, token: "plain"), expectedArrival(plain))
        XCTAssertGreaterThan(try ruleCounter(p, containing: "--to-ports 15001"), before)
        if Command.which("conntrack") != nil {
            let ct = p.attempt(["conntrack", "-L", "-p", "tcp", "--orig-port-dst", "8080"]).stdout
            XCTAssertTrue(ct.contains("dst=\(peerIP)") && ct.contains("sport=15001"), "conntrack shows no redirect to 15001: \(ct)")
        }

        // App TCP with SO_MARK 0x539: the static escape is real, the SYN reaches the peer.
        let counter = try ruleCounter(p, containing: "--to-ports 15001")
        let marked = staticVerdict(rs, "v4/tcp/app-remote/app/mark-0x539")
        XCTAssertEqual(marked.code, "forged-mark-0x539")
        XCTAssertEqual(try outboundTCP(p, q, mark: 0x539, token: "marked"), expectedArrival(marked))
        XCTAssertEqual(try ruleCounter(p, containing: "--to-ports 15001"), counter, "the marked SYN hit the REDIRECT rule")

        // Non-DNS UDP: by design, it reaches the peer directly.
        XCTAssertEqual(staticVerdict(rs, "v4/udp/app-remote/other/none").kind, "bypass")
        stopListeners()
        let udp = try listen(q, "UDP-RECV:9443,bind=\(peerIP)", "udp")
        waitForListener(q, port: 9443, udp: true)
        send(p, "udptoken", to: "UDP:\(peerIP):9443")
        XCTAssertEqual(arrival("udptoken", among: ["peer": udp]), "peer")

        // App → 127.0.0.1: stays on lo, untouched by the REDIRECT.
        XCTAssertEqual(staticVerdict(rs, "v4/tcp/app-loopback/app/none").kind, "bypass")
        stopListeners()
        let z = try listen(p, "TCP-LISTEN:15001", "z-lo")
        let local = try listen(p, "TCP-LISTEN:8080,bind=127.0.0.1", "local")
        waitForListener(p, port: 8080)
        send(p, "lotoken", to: "TCP:127.0.0.1:8080")
        XCTAssertEqual(arrival("lotoken", among: ["ztunnel:15001": z, "local": local]), "local")

        // Inbound from the peer: the app port is captured by 15006, the HBONE port lands on 15008 unredirected.
        for (port, id) in [(8080, "v4/tcp/inbound/app/none"), (15008, "v4/tcp/inbound/15008/none")] {
            let v = staticVerdict(rs, id)
            stopListeners()
            let z6 = try listen(p, "TCP-LISTEN:15006", "z6-\(port)")
            let target = port == 15008 ? try listen(p, "TCP-LISTEN:15008", "z8") : try listen(p, "TCP-LISTEN:8080,bind=\(podIP)", "app")
            waitForListener(p, port: 15006); waitForListener(p, port: port)
            send(q, "in\(port)", to: "TCP:\(podIP):\(port)")
            let got = arrival("in\(port)", among: ["ztunnel:15006": z6, port == 15008 ? "ztunnel:15008" : "app": target])
            XCTAssertEqual(got, expectedArrival(v) == "peer" ? "app" : expectedArrival(v), id)
        }
    }

    func testDeletedRedirectChangesBothVerdicts() throws {
        let (p, q) = try makePodAndPeer()
        let text = VerifierTests.seedText.split(separator: "\n").filter { !$0.contains("--to-ports 15001") }.joined(separator: "\n") + "\n"
        try p.run(["iptables-restore"], input: text)
        let rs = try RulesetLoader.load(text: text, origin: "mutant")
        let v = staticVerdict(rs, "v4/tcp/app-remote/app/none")
        XCTAssertEqual(v.code, "uncaptured-tcp")
        XCTAssertEqual(try outboundTCP(p, q, mark: nil, token: "nocapture"), expectedArrival(v))
    }

    func testForeignAcceptAheadOfTheRedirectInTheKernel() throws {
        let (p, q) = try makePodAndPeer()
        var lines = VerifierTests.seedText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        lines.insert("-A ISTIO_OUTPUT -p tcp -m tcp --dport 8080 -j ACCEPT", at: lines.firstIndex { $0.contains("--to-ports 15001") }!)
        let text = lines.joined(separator: "\n")
        try p.run(["iptables-restore"], input: text)
        let v = staticVerdict(try RulesetLoader.load(text: text, origin: "mutant"), "v4/tcp/app-remote/app/none")
        XCTAssertEqual(v.code, "uncaptured-tcp")
        XCTAssertEqual(try outboundTCP(p, q, mark: nil, token: "foreign"), expectedArrival(v))
    }

    /// Two backends in one netns: the kernel runs both. A stale iptables-legacy copy without the REDIRECT does not
    /// stop iptables-nft's REDIRECT (nat chains run until one NATs); a legacy MARK 0x539 rule does open a hole.
    func testTwoBackendsInTheKernel() throws {
        let legacyStale = VerifierTests.seedText.replacingOccurrences(of: "(nf_tables) ", with: "")
            .split(separator: "\n").filter { !$0.contains("15001") }.joined(separator: "\n") + "\n"
        do {
            let (p, q) = try makePodAndPeer()
            try p.run(["iptables-nft-restore"], input: VerifierTests.seedText)
            try p.run(["iptables-legacy-restore"], input: legacyStale)
            let live = try RulesetLoader.load(netns: p.ref)
            XCTAssertEqual(Set(live.ambientBackends), [.iptablesNft, .iptablesLegacy])
            let v = staticVerdict(live, "v4/tcp/app-remote/app/none")
            XCTAssertEqual(try outboundTCP(p, q, mark: nil, token: "twobackends"), expectedArrival(v), "static: \(v.summary)")
        }
        do {
            let (p, q) = try makePodAndPeer()
            try p.run(["iptables-nft-restore"], input: VerifierTests.seedText)
            try p.run(["iptables-legacy-restore"], input: VerifierTests.legacyForgedMarkTable)
            let live = try RulesetLoader.load(netns: p.ref)
            let v = staticVerdict(live, "v4/tcp/app-remote/app/none")
            XCTAssertTrue(v.isFailure, v.summary)
            XCTAssertEqual(try outboundTCP(p, q, mark: nil, token: "legacymark"), expectedArrival(v), "static: \(v.summary)")
        }
    }

    func testStaticVerdictsMatchTheKernelForNativeNftables() throws {
        let (p, q) = try makePodAndPeer()
        let golden = RulesReference.rulesets.appendingPathComponent("istio/nft_master_default.golden").path
        try p.run(["nft", "-f", golden])
        let rs = try RulesetLoader.load(file: golden)
        let plain = staticVerdict(rs, "v4/tcp/app-remote/app/none")
        XCTAssertEqual(try outboundTCP(p, q, mark: nil, token: "nftplain"), expectedArrival(plain))
        let marked = staticVerdict(rs, "v4/tcp/app-remote/app/mark-0x539")
        XCTAssertEqual(try outboundTCP(p, q, mark: 0x539, token: "nftmarked"), expectedArrival(marked))
        XCTAssertNotEqual(expectedArrival(plain), expectedArrival(marked))
    }

    /// IPv6 in a dual-stack pod: with only iptables rules, the static verdict says v6 TCP escapes, and a real v6
    /// connection reaches the peer; with the ip6tables rules loaded too, both say it is captured by 15001.
    func testMissingIp6tablesRulesLetIPv6Escape() throws {
        let (p, q) = try makePodAndPeer()
        try p.run(["ip", "-6", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"])
        try q.run(["ip", "-6", "addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad"])
        var params = pod
        params.dualStack = true
        params.podIPv6 = IPAddress("fd00:77::2")!
        params.remoteIPv6 = IPAddress("fd00:77::1")!

        func v6Arrival(_ token: String) throws -> String? {
            stopListeners()
            let z = try listen(p, "TCP6-LISTEN:15001", "z6-\(token)")
            let peer = try listen(q, "TCP6-LISTEN:8080,bind=[fd00:77::1]", "p6-\(token)")
            waitForListener(p, port: 15001); waitForListener(q, port: 8080)
            send(p, token, to: "TCP6:[fd00:77::1]:8080")
            return arrival(token, among: ["ztunnel:15001": z, "peer": peer])
        }

        let dual = try String(contentsOf: RulesetParsingTests.fixture("dualstack.iptables-save.txt"), encoding: .utf8)
        let split = dual.range(of: "# Generated by ip6tables-save")!.lowerBound
        let v4Only = String(dual[..<split])
        try p.run(["iptables-restore"], input: v4Only)
        let onlyV4 = Verifier(ruleset: try RulesetLoader.load(text: v4Only, origin: "v4 only"), pod: params).run()
        let escaped = onlyV4.results.first { $0.packetClass.id == "v6/tcp/app-remote/app/none" }!.verdict
        XCTAssertEqual(escaped.code, "ipv6-uncaptured")
        XCTAssertEqual(try v6Arrival("v6escape"), expectedArrival(escaped))

        try p.run(["ip6tables-restore"], input: String(dual[split...]))
        let both = Verifier(ruleset: try RulesetLoader.load(text: dual, origin: "dual"), pod: params).run()
        let captured = both.results.first { $0.packetClass.id == "v6/tcp/app-remote/app/none" }!.verdict
        XCTAssertEqual(captured, .captured(port: 15001))
        XCTAssertEqual(try v6Arrival("v6captured"), expectedArrival(captured))
    }

    func testLoadingALiveNetnsReadsEveryBackendOnce() throws {
        let ns = try makeNetns()
        let seed = try RulesetLoader.load(file: VerifierTests.seedPath)
        let goldenPath = RulesReference.rulesets.appendingPathComponent("istio/nft_master_default.golden").path
        let nft = try RulesetLoader.load(file: goldenPath)
        try ns.run(["iptables-nft-restore"], input: VerifierTests.seedText)
        try ns.run(["nft", "-f", goldenPath])
        let live = try RulesetLoader.load(netns: ns.ref)
        XCTAssertEqual(Set(live.ambientBackends), [.iptablesNft, .nftables])
        // The ip nat/mangle tables iptables-nft made appear in `nft list ruleset` too; they are counted once.
        XCTAssertEqual(live.allRules.count, seed.allRules.count + nft.allRules.count)
        XCTAssertEqual(live.allRules.filter { $0.backend == .iptablesNft }.map(\.canonicalText).sorted(), seed.allRules.map(\.canonicalText).sorted())
        XCTAssertTrue(live.allRules.filter { $0.backend == .nftables }.allSatisfy { $0.handle != nil })
        XCTAssertEqual(live.allRules.filter { $0.backend == .nftables }.map(\.role), nft.allRules.map(\.role))
        XCTAssertTrue(RulesetAnalysis(live).findings.contains { $0.kind == .bothBackends })

        let legacyNs = try makeNetns()
        try legacyNs.run(["iptables-legacy-restore"], input: VerifierTests.seedText)
        let legacy = try RulesetLoader.load(netns: legacyNs.ref)
        XCTAssertEqual(legacy.ambientBackends, [.iptablesLegacy])
        XCTAssertEqual(legacy.allRules.map(\.canonicalText).sorted(), seed.allRules.map(\.canonicalText).sorted())
        XCTAssertEqual(legacy.allRules.map(\.role).sorted { $0.rawValue < $1.rawValue }, seed.allRules.map(\.role).sorted { $0.rawValue < $1.rawValue })
    }

    /// NFLOG twins are `matchText` + an NFLOG target, inserted right before the rule: the kernel accepts every one,
    /// and reading back, the original rules keep their positions and roles.
    func testTwinsBuiltFromMatchTextAreAcceptedByTheKernel() throws {
        let ns = try makeNetns()
        try ns.run(["iptables-restore"], input: VerifierTests.seedText)
        let before = try RulesetLoader.load(netns: ns.ref)
        for t in before.tables {
            var input = "*\(t.name)\n"
            for c in t.chains {
                for r in c.rules.reversed() {
                    let tag = RuleTag(family: .v4, table: t.name, chain: c.name, position: .rule(r.position), textHash: RuleTag.textHash(r.canonicalText))
                    input += "-I \(c.name) \(r.position) \(r.matchText) -m comment --comment meshtrace -j NFLOG --nflog-group 7 --nflog-prefix \"\(tag.prefix)\"\n"
                }
            }
            input += "COMMIT\n"
            try ns.run(["iptables-restore", "--noflush"], input: input)
        }
        let after = try RulesetLoader.load(netns: ns.ref)
        XCTAssertEqual(after.allRules.count, 2 * before.allRules.count)
        XCTAssertEqual(after.allRules.filter { !$0.isMeshtraceRule }.map(\.canonicalText), before.allRules.map(\.canonicalText))
        XCTAssertEqual(after.allRules.filter { !$0.isMeshtraceRule }.map(\.position), before.allRules.map(\.position))
        for twin in after.allRules where twin.isMeshtraceRule {
            guard case .nflog(_, let prefix) = twin.target, let tag = RuleTag(prefix: prefix) else { XCTFail("twin without tag"); continue }
            let original = after.rule(for: tag)
            XCTAssertNotNil(original)
            XCTAssertEqual(original?.matches, twin.matches.filter { $0 != .comment("meshtrace") })
        }
        XCTAssertEqual(RulesetAnalysis(after).problems, [], "twins were taken for foreign rules")

        // nft: `matchText log group G prefix P` is valid nft.
        let nftNs = try makeNetns()
        let golden = RulesReference.rulesets.appendingPathComponent("istio/nft_master_default.golden").path
        try nftNs.run(["nft", "-f", golden])
        let nft = try RulesetLoader.load(netns: nftNs.ref)
        var script = ""
        for t in nft.tables { for c in t.chains { for r in c.rules {
            script += "add rule inet \(t.name) \(c.name) \(r.matchText) log group 7 prefix \"mt:n:x:y:\(r.position):-\"\n"
        } } }
        XCTAssertNoThrow(try nftNs.run(["nft", "-f", "-"], input: script))
        XCTAssertEqual(try RulesetLoader.load(netns: nftNs.ref).allRules.filter { $0.role == .meshtraceTwin }.count, nft.allRules.count)
    }
}

// setns(2) is a GNU extension Glibc's module map does not export; it is a plain libc symbol.
@_silgen_name("setns")
private func rulesTestSetns(_ fd: Int32, _ nstype: Int32) -> Int32
