// What only a live trace knows, for people: meshtrace's hit count of each twin beside the kernel's own
// counter for it, the events lost and why, and how conntrack was read. The timelines and the analysis
// summary themselves are printed by the same report sinks `analyze` uses.

public enum TraceSummaryText {
    /// One row per rule meshtrace added: prefix, rule (when known), meshtrace's count, the kernel's count.
    public static func render(_ outcome: TraceOutcome, ruleset: Ruleset?) -> String {
        var out: [String] = []
        let s = outcome.summary
        out.append("trace: \(String(format: "%.1f", outcome.tracedSeconds)) s traced (\(String(format: "%.1f", outcome.seconds)) s with setting up and removing the rules; meshtrace CPU \(String(format: "%.2f", outcome.cpuSeconds)) s, \(outcome.readerPrioritySaid)), \(counted(outcome.nflogEvents, "NFLOG event")), \(counted(outcome.packetsCaptured, "packet", then: " captured"))"
                   + (outcome.traceSteps > 0 ? ", \(counted(outcome.traceSteps, "TRACE step"))" : "")
                   + ", \(counted(s.connections, "connection"))"
                   + (s.connectionsFilteredOut.map { " (\($0) more not matching --filter)" } ?? "")
                   + ", \(counted(s.hops, "ztunnel hop")), \(counted(s.escapes, "escape"))")
        out.append("rule hits (meshtrace / kernel counter):")
        var ourTotal = 0, kernelTotal: UInt64 = 0
        // Only twins still in the pod at the end have a kernel counter to compare with.
        var oursCounted = 0
        for twin in outcome.plan.twins {
            let prefix = twin.tag.prefix
            let ours = outcome.hitCounts[prefix] ?? 0
            let kernel = outcome.kernelCounters[prefix]
            ourTotal += ours
            kernelTotal += kernel ?? 0
            if kernel != nil { oursCounted += ours }
            let what: String
            if let rule = twin.twinned {
                let role = (ruleset?.rule(for: twin.tag)?.role ?? rule.role)
                what = "\(rule.text)" + (role == .other ? "" : "  [\(role.rawValue)]")
            } else {
                what = "(observation point)"
            }
            let k = kernel.map(String.init) ?? "?"
            let mark = kernel.map { UInt64(ours) == $0 ? "" : "  ≠" } ?? ""
            out.append("  \(pad(String(ours), 7)) / \(pad(k, 7))\(mark)  \(prefix)  \(what)")
        }
        let l = outcome.losses
        out.append("  \(pad(String(ourTotal), 7)) / \(pad(String(kernelTotal), 7))  total")
        let gap = Int64(kernelTotal) - Int64(oursCounted)
        out.append(lossLine(l, traceMode: outcome.summary.traceStepsLost != nil))
        if gap != 0 {
            let explained = gap > 0 && Int64(l.nflogEventsLost) >= gap
            out.append(explained
                ? "kernel counted \(gap) more hits than meshtrace received: accounted for by the events lost"
                : "kernel and meshtrace differ by \(gap) hits (packets in flight while the rules were read and removed)")
        }
        for rule in outcome.plan.untwinned { out.append("note: \(rule.said)") }
        if let note = outcome.twinsGoneNote { out.append("note: \(note)") }
        if let note = outcome.conntrackNote { out.append("note: \(note)") }
        if let note = outcome.netnsNote { out.append("note: \(note)") }
        return out.joined(separator: "\n")
    }

    /// What was lost and why; the TRACE steps' part only for `--mode trace`.
    static func lossLine(_ l: TraceLosses, traceMode: Bool) -> String {
        var lost = "events lost: \(l.nflogEventsLost) (NFLOG sequence gaps \(l.nflogSequenceGap), ENOBUFS \(l.nflogOverruns), kernel counted \(l.counterShortfall) more)"
        lost += ", capture drops \(l.pcapDropped)"
        if traceMode {
            lost += ", TRACE steps lost \(l.traceStepsLost) (sequence gaps \(l.traceStepSequenceGap), ENOBUFS \(l.eventSocketOverruns))"
        }
        return lost
    }

    static func pad(_ s: String, _ n: Int) -> String { String(repeating: " ", count: max(0, n - s.count)) + s }
}

extension TraceOutcome {
    /// Twins no longer in the pod when the trace read the kernel's counters at its end: taken out under the running
    /// trace (istio-cni re-applying the pod's rules, `cleanup --force`, an operator). From then on the trace was
    /// blind at their rules, which the counts alone do not show (they read as "packets in flight").
    public var twinsGone: Int { plan.twins.filter { kernelCounters[$0.tag.prefix] == nil }.count }

    public var twinsGoneNote: String? {
        let gone = twinsGone
        guard gone > 0 else { return nil }
        return "\(gone) of \(plan.twins.count) twins were gone from the pod when the trace ended (its rules re-applied by istio-cni? removed by `meshtrace cleanup --force`?): packets through their rules after that were not seen, and their kernel counters are unknown (?)"
    }
}
