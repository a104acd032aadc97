// `meshtrace plan` output: shell an operator can paste, in four steps (add, collect, remove, analyze).

public enum PlanText {
    public static func render(_ plan: InstrumentationPlan, netns: NetnsRef?) -> String {
        let enter = netns.map { "nsenter --net=\($0.path) -- " } ?? ""
        let twins = plan.twins.filter { !$0.isObservation }.count
        let points = plan.twins.count - twins
        var out: [String] = []
        out.append("# meshtrace plan\(netns.map { " for netns \($0.label)" } ?? ""): \(twins) NFLOG twins and \(points) observation points, group \(plan.settings.group)")
        out.append("# ambient rules found in: \(plan.ambientHomes.map(\.description).joined(separator: ", "))")
        for rule in plan.untwinned { out.append("# note: \(rule.said)") }
        if netns == nil { out.append("# run these inside the pod's netns (nsenter -t <pod pid> -n, or ip netns exec)") }
        out.append("")
        out.append("# 1. add the twins (one transaction per table; nothing is flushed)")
        for change in plan.changes {
            out.append("\(enter)\(change.home.applyCommand.joined(separator: " ")) <<'EOF'")
            out.append(plan.applyScript(change).trimmingTrailingNewline)
            out.append("EOF")
        }
        out.append("")
        out.append("# 2. collect (stop with Ctrl-C); group \(plan.settings.group) must not be in use by anyone else in the netns")
        out.append("\(enter)tcpdump -i nflog:\(plan.settings.group) -w pod-nflog.pcap &")
        out.append("\(enter)tcpdump -i any -w pod-any.pcap &")
        out.append("")
        out.append("# 3. remove the twins (found by their exact spec / comment \"meshtrace\"), or: meshtrace cleanup\(netns.map { " \($0.commandLine)" } ?? "")")
        for change in plan.changes {
            if change.home.isNftables {
                out.append("\(enter)nft -a list ruleset | awk '/^table /{f=$2;t=$3} /^\\tchain /{c=$2} /comment \"meshtrace\"/{print \"delete rule\", f, t, c, \"handle\", $NF}' | \(enter)nft -f -")
            } else {
                out.append("\(enter)\(change.home.applyCommand.joined(separator: " ")) <<'EOF'")
                out.append(plan.xtablesRemovalScript(change).trimmingTrailingNewline)
                out.append("EOF")
            }
        }
        out.append("")
        out.append("# 4. analyze (the rules file maps each hit back to its rule and role)")
        // Every home that got twins: its hits map to its rules only if its rules are in the file. The iptables homes
        // (v4, v6, legacy) share one file; nft text cannot join them, so it gets its own (analyze takes one).
        var homes: [RuleHome] = []
        for change in plan.changes where !homes.contains(change.home) { homes.append(change.home) }
        let xtables = homes.filter { !$0.isNftables }.map { "\(enter)\($0.saveCommand.joined(separator: " "))" }
        let nft = homes.first { $0.isNftables }.map { "\(enter)\($0.saveCommand.joined(separator: " "))" }
        let saved = xtables.isEmpty ? (nft ?? "\(enter)iptables-save") : xtables.count == 1 ? xtables[0] : "{ \(xtables.joined(separator: "; ")); }"
        out.append("\(saved) > pod-rules.txt   # before step 3, or any time: twins are ignored")
        if let nft, !xtables.isEmpty {
            out.append("\(nft) > pod-rules.nft   # the nftables home's rules (a second analyze with --rules pod-rules.nft maps its hits)")
        }
        out.append("meshtrace analyze pod-nflog.pcap pod-any.pcap --rules pod-rules.txt")
        return out.joined(separator: "\n")
    }
}

extension String {
    var trimmingTrailingNewline: String {
        var s = self
        while s.hasSuffix("\n") { s.removeLast() }
        return s
    }
}
