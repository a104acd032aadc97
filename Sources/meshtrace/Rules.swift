import ArgumentParser
import Capture
import Foundation

/// Where `rules` and `verify` read the ruleset from: a file, or a live pod netns.
struct RulesetSourceOptions: ParsableArguments {
    @Option(name: .long, help: "A ruleset file: iptables-save / ip6tables-save output, iptables-restore input, an Istio golden, nft list ruleset, or nft -j list ruleset.")
    var rules: String?

    @Option(name: .long, help: "Read the live rules of this network namespace (a name under /var/run/netns, or a path).")
    var netns: String?

    @Option(name: .long, help: "Read the live rules of this process's network namespace.")
    var pid: Int32?

    @Option(name: .long, help: ArgumentHelp("Read the live rules of this Kubernetes pod on this node, NAMESPACE/NAME (found with crictl).", valueName: "namespace/name"))
    var pod: String?

    func validate() throws {
        let given = [rules != nil, netns != nil, pid != nil, pod != nil].filter { $0 }.count
        guard given == 1 else { throw ValidationError("give exactly one of --rules FILE, --netns NAME|PATH, --pid N, --pod NAMESPACE/NAME") }
    }

    /// The live netns, when one was named.
    func liveNetns() throws -> NetnsRef? {
        guard rules == nil else { return nil }
        return try PodOptions.resolve(netns: netns, pid: pid, pod: pod)
    }

    func load() throws -> Ruleset {
        if let rules { return try RulesetLoader.load(file: rules) }
        try Command.requireRoot("reading a pod's live rules")
        let ref = try PodOptions.resolve(netns: netns, pid: pid, pod: pod)
        return try RulesetLoader.load(netns: ref)
    }
}

struct Rules: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rules",
        abstract: "Show a pod's ruleset as ambient sees it: each rule's role, the variant, and what is foreign, missing, duplicated or out of order.",
        discussion: """
        Examples:
          meshtrace rules --rules pod.iptables-save.txt
          sudo meshtrace rules --netns cni-1234 --json
          meshtrace rules --rules ruleset.nft --graph --graph-out flow.svg
        Exit codes: 0 no structural problem, 1 problems found, 2 bad input. See docs/RULES.md.
        """
    )

    @OptionGroup var source: RulesetSourceOptions

    @Flag(name: .long, help: "One JSON object on stdout (docs/RULES.md).")
    var json = false

    @Flag(name: .long, help: "Print the chain flow as Graphviz DOT (hooks → chains → rules with roles).")
    var graph = false

    @Option(name: .long, help: "With --graph: write to this file instead of stdout; a .svg name renders it with `dot -Tsvg`.")
    var graphOut: String?

    func run() throws {
        try reportingErrors {
            var reads: [RulesetLoader.BackendRead] = []
            let rs: Ruleset
            if let ref = try source.liveNetns() {
                try Command.requireRoot("reading a pod's live rules")
                (rs, reads) = try RulesetLoader.loadWithReport(netns: ref)
            } else {
                rs = try source.load()
            }
            let analysis = RulesetAnalysis(rs)
            if graph {
                let dot = RulesetGraph.dot(rs)
                if let out = graphOut {
                    try RulesetGraph.write(dot: dot, to: out)
                } else {
                    print(dot, terminator: "")
                }
                return .ok
            }
            if json {
                print(RulesetReport.json(rs, analysis))
            } else {
                for r in reads {
                    print("read: \(r.command.joined(separator: " ")): \(r.ok ? "\(r.tables) table(s)" : "skipped")\(r.note.map { " (\($0.trimmingCharacters(in: .whitespacesAndNewlines)))" } ?? "")")
                }
                print(RulesetReport.text(rs, analysis), terminator: "")
            }
            return .ok
        }
    }
}
