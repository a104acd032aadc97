import ArgumentParser
import Capture

struct Plan: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract: "Print the exact commands that add and remove meshtrace's NFLOG twins, without running them.",
        discussion: """
        For an operator who collects with `tcpdump -i nflog:G` and analyzes later with `meshtrace analyze`. \
        With --netns/--pid the live rules are read (nothing is changed); with --rules FILE the commands are \
        for the rules in that file (iptables-save or nft list ruleset output of the pod).
        """
    )

    @OptionGroup var pod: PodOptions

    @Option(name: .long, help: "Plan for the rules in this file instead of a live netns.")
    var rules: String?

    @Option(name: .long, help: "NFLOG group the twins log to (not 0).")
    var group: UInt16 = 5153

    @Option(name: .long, help: "Bytes of each packet the twins copy (headers only by default; 64 or more).")
    var snaplen: Int = 128

    @Flag(name: .long, help: "No observation points, only twins.")
    var noObserve = false

    func validate() throws {
        try TwinOptionChecks.group(group)
        guard (rules != nil) != pod.isGiven else {
            throw ValidationError("give either --rules FILE or --netns NAME|PATH / --pid N / --pod NAMESPACE/NAME")
        }
        try TwinOptionChecks.snaplen(snaplen)
    }

    func run() throws {
        try reportingErrors {
            let settings = InstrumentationSettings(group: group, snaplen: snaplen, observe: !noObserve)
            let tables: [(home: RuleHome, table: Table)]
            var ref: NetnsRef? = nil
            if let rules {
                tables = Instrumenter.homes(of: try RulesetLoader.load(file: rules))
            } else {
                let r = try pod.resolve()
                ref = r
                let instrumenter = Instrumenter(netns: r, settings: settings, parse: Instrumenter.parseHome)
                var all: [(home: RuleHome, table: Table)] = []
                let homes = try instrumenter.readHomes()
                try instrumenter.refuseIfBeingTraced(homes, ownGroup: nil)
                for saved in homes {
                    if !saved.ownRules.isEmpty {
                        throw MeshtraceError(.leftovers, "\(saved.ownRules.count) meshtrace rules are already in \(r) (\(saved.home)): run `meshtrace cleanup \(r.commandLine)` first")
                    }
                    for t in try Instrumenter.parseHome(saved.home, saved.text) { all.append((saved.home, t)) }
                }
                tables = all
            }
            let plan = try InstrumentationPlan.make(tables: tables, settings: settings)
            guard !plan.ambientHomes.isEmpty else {
                throw MeshtraceError(.badInput, "no ambient rules (ISTIO_* chains or istio-* nft tables) in \(rules ?? ref?.label ?? "?"): nothing to twin")
            }
            print(PlanText.render(plan, netns: ref))
            return .ok
        }
    }
}
