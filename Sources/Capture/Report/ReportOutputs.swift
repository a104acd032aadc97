// The one place the file outputs a user asked for (`--pcapng FILE`, `--html FILE`) become sinks, so each
// command wires them with one line:
//
//     let reporter = try Reporter.make(config: output.config, ruleset: ruleset, tags: tags,
//                                      title: "meshtrace analyze run.pcap", sinks: [textSink])
//
// The text and JSON printers stay with their command; this adds the pcapng and HTML sinks beside them.

extension Reporter {
    /// A reporter fanning out to `sinks` plus the file outputs in `config`.
    /// - ruleset: the pod's rules when known (`--rules`, or read live); names roles and draws the rule flow.
    /// - tags: the decoder's prefix table, so spooled NFLOG hits can be named in the pcapng comments.
    /// - title: what the run was, for the HTML page ("meshtrace analyze samples/outbound.pcapng").
    public static func make(config: OutputConfig, ruleset: Ruleset? = nil, tags: RuleTagTable? = nil,
                            title: String = "meshtrace", sinks: [ReportSink] = []) throws -> Reporter {
        let reporter = Reporter(sinks: sinks)
        try reporter.addFileOutputs(config, ruleset: ruleset, tags: tags, title: title)
        return reporter
    }

    /// Adds the pcapng and HTML sinks `config` asks for (none when neither flag was given).
    public func addFileOutputs(_ config: OutputConfig, ruleset: Ruleset? = nil, tags: RuleTagTable? = nil,
                               title: String = "meshtrace") throws {
        if let path = config.pcapngPath {
            add(try PcapngReport(path: path, ruleset: ruleset, tags: tags), wantsPackets: true)
        }
        if let path = config.htmlPath {
            add(try HTMLReport(path: path, title: title, ruleset: ruleset))
        }
    }

    /// Gives the file outputs the ruleset once it is known (a live trace reads it after the sinks were made).
    public func updateRuleset(_ ruleset: Ruleset?) {
        guard let ruleset else { return }
        for s in sinks {
            if let p = s as? PcapngReport { p.ruleset = ruleset }
            if let h = s as? HTMLReport { h.ruleset = ruleset }
        }
    }

    /// `meshtrace verify --html FILE`: writes the verdict page when `config` asks for one.
    public static func writeVerificationHTML(config: OutputConfig, ruleset: Ruleset?, rows: [VerdictRow],
                                             title: String = "meshtrace verify", notes: [String] = []) throws {
        guard let path = config.htmlPath else { return }
        try HTMLVerificationReport.write(path: path, title: title, ruleset: ruleset, rows: rows, notes: notes)
    }
}
