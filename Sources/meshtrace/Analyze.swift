import ArgumentParser
import Capture
import Foundation

struct Analyze: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "analyze",
        abstract: "Per-connection timelines from captures: which rule hit which packet, marks, redirects, the ztunnel hop, escapes.",
        discussion: """
        Reads pcap (µs and ns; libpcap opens each file, records are read in blocks) and pcapng (meshtrace's own
        block reader: libpcap refuses mixed link types): EN10MB, LINUX_SLL (tcpdump -i any), LINUX_SLL2,
        RAW, NULL/LOOP and NFLOG (tcpdump -i nflog:G). Several files from one node are merged into one
        analysis, e.g. an `-i any` capture plus an `nflog:G` capture of meshtrace's NFLOG twins
        (see `meshtrace plan`). `-` reads a capture from stdin, and a FIFO or `<(...)` is read the same way, as it
        comes: timelines are printed as their connections finish.

        Examples:
          meshtrace analyze any.pcap nflog.pcap --rules pod.iptables-save.txt
          meshtrace analyze capture.pcapng --pod-ip 10.244.1.5 --json | jq 'select(.type=="finding")'
          ssh node tcpdump -i any -U -w - | meshtrace analyze -

        Exit codes: 0 no escape, 1 an escape was found (also in a damaged capture), 2 bad input
        (not a capture, unknown link type, empty file, bad --rules file), 3 damaged input and no escape
        (what could be read was analysed), 64 usage. JSON schema: docs/JSON.md.
        """
    )

    @Argument(help: "Capture files from one node (pcap or pcapng); - for stdin.")
    var files: [String] = []

    @Option(name: .long, help: "The pod's ruleset (iptables-save / nft list ruleset output): adds each hit's rule text and ambient role.")
    var rules: String?

    @Option(name: .customLong("pod-ip"), help: "The pod's address (repeat for IPv4 and IPv6). Inferred from the traffic when not given.")
    var podIPs: [String] = []

    @Option(name: .long, help: "Name for the pod's non-loopback interface when the capture does not carry one (tcpdump -i any).")
    var interfaceName: String?

    @Flag(name: .long, help: "Text view: connection headers, hops and findings only, no per-packet lines.")
    var brief = false

    @Option(name: .long, help: "tcpdump-syntax filter selecting the connections to show: one is shown, whole, with its ztunnel legs, when any of its packets (captured, or in an NFLOG record, in any NAT view) matches. Compiled by libpcap.")
    var filter: String?

    @Option(name: .long, help: "Packet events kept per connection; later ones are counted.")
    var maxEvents: Int = 512

    @Option(name: .long, help: "Connections kept open at most; past this, the ones seen least lately are printed at once, marked ended early (memory stays bounded under a SYN flood).")
    var maxOpen: Int = CorrelatorOptions().maxOpenConnections

    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard !files.isEmpty else { throw ValidationError("give at least one capture file") }
        guard files.filter({ $0 == "-" }).count <= 1 else { throw ValidationError("- (stdin) can be given once") }
        for ip in podIPs where IPAddress(ip) == nil { throw ValidationError("--pod-ip \(ip) is not an IPv4 or IPv6 address") }
        guard maxEvents > 0 else { throw ValidationError("--max-events must be positive") }
        guard maxOpen > 0 else { throw ValidationError("--max-open must be positive") }
    }

    func run() throws {
        try reportingErrors { try analyze() }
    }

    private func analyze() throws -> ExitStatus {
        let config = output.config
        // A bad --filter is a usage error before any file is read.
        let selector = try filter.flatMap { $0.isEmpty ? nil : try ConnectionFilter($0) }
        let ruleset = try rules.map { try RulesetLoader.load(file: $0) }
        let tags = RuleTagTable()
        let source = try MergedSource(paths: files, tags: tags, selector: selector)
        if files.contains(where: CaptureStream.isStream) { CaptureStream.finishOnFirstInterrupt() }

        let main: ReportSink = config.json
            ? JSONReport()
            : TextReport(style: Style(config: config), showEvents: !brief)
        let reporter = try Reporter.make(config: config, ruleset: ruleset, tags: tags,
                                         title: "meshtrace analyze " + files.joined(separator: " "), sinks: [main])

        var options = CorrelatorOptions()
        options.podAddresses = podIPs.compactMap { IPAddress($0) }
        options.interfaceName = interfaceName
        options.maxEventsPerConnection = maxEvents
        options.maxOpenConnections = maxOpen
        options.showsOnlySelected = selector != nil
        let correlator = Correlator(tags: tags, ruleset: ruleset, options: options, sink: reporter)

        let progress = ProgressLine(config: config, label: "reading " + files.joined(separator: " + "),
                                    totalBytes: ProgressLine.totalSize(of: files))
        var bytesRead: UInt64 = 24
        if reporter.wantsPackets {
            // pcapng and HTML keep every packet's bytes: one thread, each frame handed over as it is read.
            var record = PacketRecord()
            var count = 0
            while let frame = source.next(into: &record) {
                let id = correlator.ingest(inPlace: &record)
                reporter.packet(record, frame: frame, linkType: source.currentLinkType, connection: id)
                bytesRead &+= UInt64(frame.count) &+ 16
                count &+= 1
                if count & 0xfff == 0 { progress.update(bytesRead: bytesRead) }
            }
        } else {
            // Reading and decoding on a second thread, correlating and printing on this one, in capture order.
            ReadAheadSource(source).forEach({ correlator.ingest(inPlace: &$0) }, batchDone: { bytes in
                bytesRead &+= bytes
                progress.update(bytesRead: bytesRead)
            })
        }
        progress.line.clear()

        var summary = correlator.finish()
        let damage = source.damage
        if let damage { summary.fileDamage.append(damage.message) }
        try reporter.finish(summary)

        if summary.escapes > 0 {
            if let damage { FileHandle.standardError.write(Data("meshtrace: \(damage.message)\n".utf8)) }
            return .escapeFound
        }
        if let damage { throw damage }
        return .ok
    }
}
