import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What meshtrace's engine reported for one scenario's traced pod.
public struct LabTraceFinding: Sendable {
    /// The verdict meshtrace's analysis gives the scenario's connection; nil when the engine gives none.
    public var verdict: LabVerdict?
    /// The timelines (or other report text) as meshtrace prints them.
    public var report: String
    /// Capture files written for this scenario (kept for `scripts/record-samples`).
    public var files: [String] = []

    public init(verdict: LabVerdict?, report: String, files: [String] = []) {
        self.verdict = verdict; self.report = report; self.files = files
    }
}

/// The engine that watches a scenario. The lab calls `start` before the scenario's traffic and `stop` after it.
public protocol LabTracing: AnyObject {
    func start(pod: LabPod, scenario: Scenario, lab: LabTopology) throws
    func stop() throws -> LabTraceFinding
}

/// The result of one scenario: its truth, what the kernel shows, what meshtrace found.
public struct ScenarioResult: Sendable {
    public var scenario: Scenario
    public var expected: ScenarioExpectation
    /// The verdict read from kernel-side facts (which stand-in logged the connection, who the app saw);
    /// nil when the traffic itself failed.
    public var kernelVerdict: LabVerdict?
    /// What the app got (first line of the reply) or why it failed.
    public var appOutcome: String
    /// The lines (stand-in logs, conntrack entries) the kernel verdict rests on.
    public var evidence: [String]
    public var traced: LabTraceFinding?

    /// True when the kernel's evidence and, when the scenario was traced, meshtrace's verdict both equal the truth.
    /// A trace that gave no verdict does not match: silence is not agreement.
    public var matches: Bool {
        kernelVerdict == expected.verdict && (traced == nil || traced?.verdict == expected.verdict)
    }
}

/// Runs scenarios against a lab: applies the scenario's rule change, runs its traffic with the tracer on,
/// reads the kernel-side facts, and puts the ruleset back.
public final class ScenarioRunner {
    public let lab: LabTopology
    public var tracing: LabTracing?

    public init(lab: LabTopology, tracing: LabTracing? = nil) { self.lab = lab; self.tracing = tracing }

    public func run(_ scenario: Scenario) throws -> ScenarioResult {
        let traced = pod(scenario.tracedRole)
        if scenario.needsDualStack && !lab.options.dualStack {
            throw MeshtraceError(.usage, "scenario \(scenario.rawValue) needs a dual-stack lab (LabOptions.dualStack)")
        }
        let logs = LogCursor(lab: lab)
        let haveConntrack = Command.which("conntrack") != nil
        if haveConntrack { _ = traced.netns.attempt(["conntrack", "-F"]) }
        try mutate(scenario)
        defer { try? restore(scenario) }

        try tracing?.start(pod: traced, scenario: scenario, lab: lab)
        let outcome = traffic(scenario)
        // Let the last FINs and the stand-ins' log lines land before reading them.
        usleep(300_000)
        var finding: LabTraceFinding?
        if let tracing { finding = try tracing.stop() }

        let new = logs.newLines()
        var evidence = new.map { "\($0.0): \($0.1)" }
        if haveConntrack {
            let ct = traced.netns.attempt(["conntrack", "-L"]).stdout
            evidence += ct.split(whereSeparator: \.isNewline).map { "conntrack \(traced.role.rawValue): \($0)" }
        }
        return ScenarioResult(scenario: scenario, expected: scenario.expectation(ruleset: lab.options.ruleset),
                              kernelVerdict: outcome.ok || scenario == .ztunnelDown ? kernelVerdict(scenario, new, app: outcome) : nil,
                              appOutcome: outcome.text, evidence: evidence, traced: finding)
    }

    private func pod(_ role: LabPod.Role) -> LabPod { lab.pods.first { $0.role == role }! }

    // MARK: traffic

    private struct Outcome { var ok: Bool; var text: String }

    private func traffic(_ s: Scenario) -> Outcome {
        let server = "\(lab.server.ipv4):\(LabTopology.appPort)"
        let args: [String]
        let from: LabPod
        switch s {
        case .outbound, .inboundHBONE, .ruleDeleted, .foreignAccept: (from, args) = (lab.client, ["_app", "get", server])
        case .service: (from, args) = (lab.client, ["_app", "get", "\(LabTopology.serviceVIP):\(LabTopology.appPort)"])
        case .serviceOutside: (from, args) = (lab.client, ["_app", "get", "\(LabTopology.outsideServiceVIP):\(LabTopology.appPort)"])
        case .ztunnelDown: (from, args) = (lab.client, ["_app", "get", "--timeout", "2", server])
        case .markEscape: (from, args) = (lab.client, ["_app", "get", "--mark", "0x539", server])
        case .inboundPlaintext: (from, args) = (lab.peer, ["_app", "get", server])
        case .probe: (from, args) = (lab.node, ["_app", "get", "--source", LabTopology.probeSource.description, server])
        case .passthrough: (from, args) = (lab.client, ["_app", "get", "\(lab.peer.ipv4):\(LabTopology.appPort)"])
        case .dns: (from, args) = (lab.client, ["_app", "udp", "--dns", "server.lab.mesh", LabTopology.dnsServer.description])
        case .udp: (from, args) = (lab.client, ["_app", "udp", "\(lab.peer.ipv4):\(LabTopology.udpEchoPort)"])
        case .ipv6Escape, .outboundIPv6:
            let v6 = lab.server.ipv6.map { "[\($0)]:\(LabTopology.appPort)" } ?? server
            (from, args) = (lab.client, ["_app", "get", v6])
        }
        guard let r = try? lab.runApp(args, in: from) else { return Outcome(ok: false, text: "could not run the app") }
        let first = r.stdout.split(whereSeparator: \.isNewline)
        let body = first.last.map(String.init) ?? ""
        return r.ok ? Outcome(ok: true, text: body) : Outcome(ok: false, text: r.stderr.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    // MARK: kernel-side verdict

    /// Reads the verdict from what the stand-ins logged: a ztunnel line for the connection means captured; the
    /// app answering without one means it passed ztunnel by (bypass or escape, per the scenario's design).
    private func kernelVerdict(_ s: Scenario, _ lines: [(String, String)], app: Outcome) -> LabVerdict? {
        func logged(_ who: String, _ needle: String) -> Bool { lines.contains { $0.0 == who && $0.1.contains(needle) } }
        let server = "\(lab.server.ipv4):\(LabTopology.appPort)"
        switch s {
        case .outbound, .ruleDeleted, .foreignAccept, .markEscape:
            return logged("client ztunnel", "outbound") && logged("client ztunnel", "-> \(server)") ? .captured : .escape
        case .passthrough:
            return logged("client ztunnel", "passthrough") ? .captured : .escape
        case .serviceOutside:
            return logged("client ztunnel", "(service, endpoint \(lab.peer.ipv4):\(LabTopology.appPort)): passthrough") ? .captured : .escape
        case .service:
            return logged("client ztunnel", "(service, endpoint \(server))") && logged("client ztunnel", "-> \(lab.server.ipv4):15008") ? .captured : .escape
        case .ipv6Escape, .outboundIPv6:
            return logged("client ztunnel", "outbound") ? .captured : .escape
        case .inboundHBONE:
            return logged("server ztunnel", "hbone") ? .captured : .escape
        case .inboundPlaintext:
            return logged("server ztunnel", "inbound \(lab.peer.ipv4)") ? .captured : .escape
        case .probe:
            return logged("server ztunnel", LabTopology.probeSource.description) ? .captured
                : (logged("server app", "served \(LabTopology.probeSource)") ? .bypass : .escape)
        case .udp:
            return logged("client ztunnel", "udp") ? .captured : .bypass
        case .dns:
            if logged("client ztunnel", "dns ") { return .captured }
            return lab.options.ruleset.capturesDNS ? .escape : .bypass
        case .ztunnelDown:
            // The app was refused, and neither ztunnel nor the server saw it: it reached no listener.
            if app.ok { return logged("client ztunnel", "outbound") ? .captured : .escape }
            guard app.text.localizedCaseInsensitiveContains("refused"), !logged("server app", "served") else { return nil }
            return .refused
        }
    }

    // MARK: rule changes

    private func mutate(_ s: Scenario) throws {
        let c = lab.client
        switch s {
        case .ruleDeleted:
            if lab.options.ruleset.form == .nftables {
                let h = try nftHandle(of: "redirect to :15001", in: c)
                try c.netns.run(["nft", "delete", "rule", "inet", "istio-ambient-nat", "istio-output", "handle", "\(h)"])
            } else {
                let (_, rule) = try iptablesRule(containing: "--to-ports 15001", chain: "ISTIO_OUTPUT", in: c)
                try c.netns.run([lab.iptables(), "-t", "nat", "-D"] + rule.dropFirst(1).map(String.init))
            }
        case .foreignAccept:
            if lab.options.ruleset.form == .nftables {
                let h = try nftHandle(of: "redirect to :15001", in: c)
                try c.netns.run(["nft", "insert", "rule", "inet", "istio-ambient-nat", "istio-output", "position", "\(h)",
                                 "tcp", "dport", "\(LabTopology.appPort)", "accept"])
            } else {
                let (position, _) = try iptablesRule(containing: "--to-ports 15001", chain: "ISTIO_OUTPUT", in: c)
                try c.netns.run([lab.iptables(), "-t", "nat", "-I", "ISTIO_OUTPUT", "\(position)", "-p", "tcp",
                                 "--dport", "\(LabTopology.appPort)", "-j", "ACCEPT"])
            }
        case .ztunnelDown:
            lab.stopZtunnel(in: c)
        case .ipv6Escape:
            // The variant may carry ip6tables rules; this scenario is the pod where they are missing.
            if lab.options.ruleset.form == .iptables, lab.options.ruleset.ipv6Text != nil {
                for table in ["nat", "mangle", "raw"] {
                    _ = c.netns.attempt([lab.iptables(v6: true), "-t", table, "-F"])
                    _ = c.netns.attempt([lab.iptables(v6: true), "-t", table, "-X"])
                }
            }
        default: break
        }
    }

    private func restore(_ s: Scenario) throws {
        switch s {
        case .ruleDeleted, .foreignAccept, .ipv6Escape: try lab.loadRuleset(into: lab.client)
        case .ztunnelDown: try lab.startZtunnel(in: lab.client)
        default: break
        }
    }

    /// The 1-based position and the `-A ...` words of the first rule in `chain` (nat) whose text contains `needle`.
    private func iptablesRule(containing needle: String, chain: String, in pod: LabPod) throws -> (Int, [Substring]) {
        let rules = try pod.netns.run([lab.iptables(), "-t", "nat", "-S", chain]).stdout
            .split(whereSeparator: \.isNewline).filter { $0.hasPrefix("-A \(chain) ") }
        guard let i = rules.firstIndex(where: { $0.contains(needle) }) else {
            throw MeshtraceError(.kernelRefused, "no rule with '\(needle)' in nat \(chain) of \(pod.name)")
        }
        return (i + 1, rules[i].split(separator: " "))
    }

    private func nftHandle(of needle: String, in pod: LabPod) throws -> Int {
        let text = try pod.netns.run(["nft", "-a", "list", "chain", "inet", "istio-ambient-nat", "istio-output"]).stdout
        for line in text.split(whereSeparator: \.isNewline) where line.contains(needle) {
            if let r = line.range(of: "# handle "), let h = Int(line[r.upperBound...].trimmingCharacters(in: .whitespaces)) { return h }
        }
        throw MeshtraceError(.kernelRefused, "no nft rule with '\(needle)' in \(pod.name)")
    }
}

/// Remembers how much of each stand-in log was already read, so a scenario sees only its own lines.
private final class LogCursor {
    private let lab: LabTopology
    private var offsets: [String: Int] = [:]
    private let sources: [(String, LabPod, String)]

    init(lab: LabTopology) {
        self.lab = lab
        sources = [("client ztunnel", lab.client, "ztunnel"), ("server ztunnel", lab.server, "ztunnel"),
                   ("server app", lab.server, "app"), ("peer app", lab.peer, "app"), ("node app", lab.node, "app")]
        for (label, pod, kind) in sources { offsets[label] = lab.log(of: pod, kind).utf8.count }
    }

    func newLines() -> [(String, String)] {
        var out: [(String, String)] = []
        for (label, pod, kind) in sources {
            let text = lab.log(of: pod, kind)
            let start = offsets[label] ?? 0
            let fresh = String(decoding: text.utf8.dropFirst(start), as: UTF8.self)
            for line in fresh.split(whereSeparator: \.isNewline) { out.append((label, String(line))) }
        }
        return out
    }
}
