import ArgumentParser
import Capture
import Foundation

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Is there a packet that leaves the pod (or reaches the app) without passing ztunnel? Evaluates every packet class against the rules.",
        discussion: """
        Each class (family × protocol × path × port class × mark, and the probe address) ends as captured by
        ztunnel (port), bypass by design (reason), or ESCAPE, with the rule path that proves it. See docs/VERIFY.md.
        Examples:
          meshtrace verify --rules pod.iptables-save.txt
          sudo meshtrace verify --pid 4242 --ipv6 --policy site-policy.txt --json
        Exit codes: 0 clean (or every escape accepted by --policy; the forged-mark class is accepted unless --strict), 1 escape found, 2 bad input.
        """
    )

    @OptionGroup var source: RulesetSourceOptions

    @Flag(name: .long, help: "One JSON object on stdout (docs/VERIFY.md).")
    var json = false

    @Option(name: .long, help: "A policy file: lines 'allow CLASS-GLOB' or 'allow reason CODE' accept escapes a site allows.")
    var policy: String?

    @Flag(name: .long, help: "Count the class every correct ruleset has (a process that sets ztunnel's mark 0x539 itself) as an escape.")
    var strict = false

    @Flag(name: .long, help: "The pod is dual-stack: evaluate IPv6 even when no rule mentions it (missing ip6tables rules are escapes).")
    var ipv6 = false

    @Option(name: .long, help: "The pod's IPv4 address (default 10.244.0.10).")
    var podIp: String?

    @Option(name: .long, help: "The pod's IPv6 address (default fd00:10:244::10).")
    var podIp6: String?

    @Option(name: .long, help: "The pod's interface (default eth0).")
    var interface: String = "eth0"

    @Option(name: .long, help: "The app's port (default 8080).")
    var appPort: UInt16 = 8080

    @Flag(name: .long, help: "Assume istio-cni's ip rule (fwmark 0x111/0xfff lookup 100) is absent.")
    var noPolicyRouting = false

    @Flag(name: .long, help: "List every class under its verdict.")
    var all = false

    @Option(name: .long, help: "Also write a self-contained HTML page: escapes first, every class with its rule path, the rule flow.")
    var html: String?

    func run() throws {
        try reportingErrors {
            let rs = try source.load()
            try Verifier.checkVerifiable(rs)
            var pod = PodParameters()
            pod.dualStack = ipv6
            pod.interface = interface
            pod.appPort = appPort
            pod.policyRouting = !noPolicyRouting
            if !noPolicyRouting, let ref = try source.liveNetns(), let r = try? Command.run(["ip", "rule", "show"], in: ref), r.ok,
               !PodParameters.hasIstioPolicyRouting(ipRuleShow: r.stdout) {
                // Without istio-cni's ip rule, mark 0x111 does not send replies back to ztunnel: evaluate it that way.
                pod.policyRouting = false
                FileHandle.standardError.write(Data("meshtrace: note: \(ref) has no 'ip rule fwmark 0x111/0xfff lookup 100' (istio-cni adds it): evaluating without it\n".utf8))
            }
            if let podIp {
                guard let a = IPAddress(podIp), a.family == .v4 else { throw MeshtraceError(.usage, "--pod-ip \(podIp) is not an IPv4 address") }
                pod.podIPv4 = a
            }
            if let podIp6 {
                guard let a = IPAddress(podIp6), a.family == .v6 else { throw MeshtraceError(.usage, "--pod-ip6 \(podIp6) is not an IPv6 address") }
                pod.podIPv6 = a
            }
            let pol = try policy.map { try VerifyPolicy.load(file: $0) }
            let report = Verifier(ruleset: rs, pod: pod, policy: pol, strict: strict).run()
            if let html { var c = OutputConfig(); c.htmlPath = html; try Reporter.writeVerificationHTML(config: c, report: report, ruleset: rs) }
            print(json ? report.json() : report.text(showAll: all), terminator: json ? "\n" : "")
            return report.exitStatus
        }
    }
}
