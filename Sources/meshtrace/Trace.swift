import ArgumentParser
import Capture
import Foundation

struct Trace: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trace",
        abstract: "Trace a pod's connections through the ambient rules, live.",
        discussion: """
        Adds an NFLOG twin before every ambient rule of the pod's netns (and observation points), captures the \
        pod's interfaces with libpcap, and prints one timeline per connection as it finishes; at the end, the \
        per-rule hit counts next to the kernel's counters, and any events lost. The added rules are removed on \
        exit, Ctrl-C, Ctrl-\\, SIGTERM, SIGHUP, SIGUSR1/2, SIGALRM and errors; after a SIGKILL, `meshtrace cleanup --netns X` removes them. \
        The pod: --netns NAME|PATH, --pid N, or --pod NAMESPACE/NAME (its sandbox's netns, from crictl on this node). \
        Needs root. Exit codes: docs/EXIT-CODES.md (6: NFLOG group busy, 9: leftover rules, 10: events lost \
        with --strict).
        """
    )

    @OptionGroup var pod: PodOptions

    @Option(name: .long, help: "Stop after tracing this many seconds, counted from when the twins are in (default: until Ctrl-C).")
    var duration: Double?

    @Option(name: .long, help: "NFLOG group for the twins (not 0; must be free in the pod's netns).")
    var group: UInt16 = 5153

    @Option(name: .long, help: "tcpdump-syntax filter selecting the connections to show: one is shown, whole, with its ztunnel legs, when any of its packets (captured, or in an NFLOG event, in any NAT view) matches. Compiled by libpcap.")
    var filter: String?

    @Option(name: [.customShort("w"), .long], help: "Write the captured packets to this pcap file (LINUX_SLL, all interfaces).")
    var write: String?

    @Option(name: .long, help: "nflog: NFLOG twins (default). trace: also the kernel's rule-by-rule TRACE walk.")
    var mode: String = "nflog"

    @Option(name: .long, help: "Bytes of each packet copied to meshtrace by the twins (headers only by default; 64 or more).")
    var snaplen: Int = 128

    @Flag(name: .long, help: "Exit 10 when any event was lost (ENOBUFS, NFLOG sequence gaps, capture drops).")
    var strict = false

    @Flag(name: .long, help: "Remove leftover meshtrace rules from a killed run first, instead of refusing to start.")
    var replace = false

    @Flag(name: .long, help: "Trace the node's own network namespace (the one meshtrace runs in, or pid 1's: where a host-network pod lives), which is refused without it: ambient does not capture host-network traffic, and the twins would go into the node's rules.")
    var hostNetns = false

    @Flag(name: .long, help: "Text view: connection headers, hops and findings only, no per-packet lines.")
    var brief = false

    @Flag(name: [.customLong("no-capture"), .customLong("rules-only")],
          help: "Only the rule hits (the NFLOG events), no libpcap capture; --rules-only is the same.")
    var noCapture = false

    @Option(name: .long, help: "Packet events kept per connection; later ones are counted.")
    var maxEvents: Int = CorrelatorOptions.live.maxEventsPerConnection

    @Option(name: .long, help: "Connections kept open at most; past this, the ones seen least lately are printed at once, marked ended early (memory stays bounded under a SYN flood).")
    var maxOpen: Int = CorrelatorOptions.live.maxOpenConnections

    @Flag(name: .long, help: "Keep the reading thread at normal priority (nice -5) instead of yielding the CPU to the pod while it keeps up.")
    var noYield = false

    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard TraceOptions.Mode(rawValue: mode) != nil else { throw ValidationError("--mode takes nflog or trace") }
        try TwinOptionChecks.group(group)
        try TwinOptionChecks.snaplen(snaplen)
        guard maxEvents > 0 else { throw ValidationError("--max-events must be positive") }
        guard maxOpen > 0 else { throw ValidationError("--max-open must be positive") }
        if let duration, !(duration > 0 && duration.isFinite) { throw ValidationError("--duration takes a positive number of seconds") }
    }

    func run() throws {
        try reportingErrors {
            let ref = try pod.resolve()
            if ref.isNodeNetns && !hostNetns {
                throw MeshtraceError.badInput("\(ref.label) is the node's own network namespace (the one meshtrace runs in; a host-network pod's): ambient does not capture its traffic, and tracing it would put twins in the node's rules; pass --host-netns to trace it anyway")
            }
            var options = TraceOptions(netns: ref)
            options.duration = duration
            options.group = group
            options.filter = filter
            options.writePath = write
            options.mode = TraceOptions.Mode(rawValue: mode) ?? .nflog
            options.snaplen = snaplen
            options.replace = replace
            options.capturePackets = !noCapture
            options.yieldToPod = !noYield
            options.correlator.maxOpenConnections = maxOpen
            options.correlator.maxEventsPerConnection = maxEvents
            let tracer = try LiveTracer(options: options)
            let config = output.config
            let printer: ReportSink = config.json ? JSONReport() : TextReport(style: Style(config: config), showEvents: !brief)
            let status = LiveStatusLine(config: config, label: "tracing \(ref.label)")
            tracer.status = status.line.enabled ? status : nil
            let reporter = try Reporter.make(config: config, tags: tracer.tags, title: "meshtrace trace --netns \(ref.label)",
                                             sinks: [StatusClearingSink(status: status), printer])
            let outcome = try tracer.run(reporter: reporter)
            reporter.updateRuleset(tracer.ruleset)
            try reporter.finish(outcome.summary)
            if config.json {
                // stdout stays JSON Lines; the live-only accounting goes to stderr as one line.
                let l = outcome.losses
                FileHandle.standardError.write(Data("meshtrace: trace \(String(format: "%.1f", outcome.tracedSeconds)) s traced (\(String(format: "%.1f", outcome.seconds)) s in all), CPU \(String(format: "%.2f", outcome.cpuSeconds)) s (\(outcome.readerPrioritySaid)), \(counted(outcome.nflogEvents, "NFLOG event")), \(counted(outcome.packetsCaptured, "packet")); events lost \(l.nflogEventsLost), capture drops \(l.pcapDropped)\n".utf8))
                for rule in outcome.plan.untwinned { FileHandle.standardError.write(Data("meshtrace: note: \(rule.said)\n".utf8)) }
                if let note = outcome.twinsGoneNote { FileHandle.standardError.write(Data("meshtrace: note: \(note)\n".utf8)) }
                if let note = outcome.netnsNote { FileHandle.standardError.write(Data("meshtrace: note: \(note)\n".utf8)) }
            } else {
                print(TraceSummaryText.render(outcome, ruleset: tracer.ruleset))
            }
            if outcome.losses.any && strict { return .eventsLost }
            return outcome.summary.escapes > 0 ? .escapeFound : .ok
        }
    }
}

/// Clears the live status line before a timeline or finding is printed on the same terminal.
final class StatusClearingSink: ReportSink {
    let status: LiveStatusLine
    init(status: LiveStatusLine) { self.status = status }
    func connection(_ timeline: ConnectionTimeline) { status.suspend() }
    // It reads no event: say so, or the reporter would materialize every connection's events for it.
    var readsCompactEvents: Bool { true }
    func connection(_ timeline: ConnectionTimeline, events: TimelineEventList) { status.suspend() }
    func finding(_ finding: EscapeFinding) { status.suspend() }
    func finish(_ summary: AnalysisSummary) throws { status.finish() }
}
