import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A report sink that turns meshtrace's own records (timelines, findings) into a scenario's verdict, so the lab
/// judges what the engine found, not what the lab knows.
public final class LabVerdictSink: ReportSink {
    public private(set) var timelines: [ConnectionTimeline] = []
    public private(set) var findings: [EscapeFinding] = []
    /// Bounded: a scenario makes a handful of connections; a runaway capture must not grow this.
    private let limit = 4096

    public init() {}

    public func connection(_ timeline: ConnectionTimeline) {
        if timelines.count < limit { timelines.append(timeline) }
    }

    public func finding(_ finding: EscapeFinding) {
        if findings.count < limit { findings.append(finding) }
    }

    public func finish(_ summary: AnalysisSummary) throws {
        // Findings kept only in the summary (a sink attached late) count too.
        for f in summary.findings where !findings.contains(where: { $0.tuple == f.tuple && $0.findingClass == f.findingClass }) {
            findings.append(f)
        }
    }

    /// The verdict for the scenario's own connection: escape when meshtrace reported an escape; captured when the
    /// connection to the scenario's destination was redirected to ztunnel, is one of ztunnel's, or joins a hop;
    /// bypass by design when meshtrace classed it as a probe or as traffic the rules do not capture by design.
    public func verdict(for scenario: Scenario, lab: LabTopology) -> LabVerdict? {
        if findings.contains(where: \.isEscape) { return .escape }
        let targets = scenario.destinations(lab)
        let subject = timelines.filter { t in
            targets.contains(t.original.dst) || t.aliases.contains { targets.contains($0.dst) }
                || (scenario == .probe && t.original.src.addr == LabTopology.probeSource)
        }
        // Refused at ztunnel's port: redirected, its SYN answered by a RST. Before `captured`: it is app-outbound.
        if subject.contains(where: { $0.refused && $0.redirect != nil }) { return .refused }
        let capturedKinds: Set<ConnectionKind> = [.appOutbound, .hboneInbound, .inboundPlaintext, .ztunnelToApp, .hboneOutbound]
        if subject.contains(where: { capturedKinds.contains($0.kind) || !$0.hops.isEmpty }) { return .captured }
        if subject.contains(where: { $0.kind == .dns && $0.redirect != nil }) { return .captured }
        if subject.contains(where: { [.probe, .uncapturedByDesign, .dns].contains($0.kind) }) { return .bypass }
        if findings.contains(where: { $0.findingClass == .byDesign && targets.contains($0.tuple.dst) }) { return .bypass }
        return nil
    }
}

extension Scenario {
    /// The destinations the scenario's connection is seen going to inside the traced pod.
    public func destinations(_ lab: LabTopology) -> [Endpoint] {
        let server = Endpoint(lab.server.ipv4, LabTopology.appPort)
        switch self {
        case .outbound, .markEscape, .ruleDeleted, .foreignAccept, .inboundPlaintext, .probe, .ztunnelDown: return [server]
        case .inboundHBONE: return [Endpoint(lab.server.ipv4, 15008), server]
        case .passthrough: return [Endpoint(lab.peer.ipv4, LabTopology.appPort)]
        case .service: return [Endpoint(LabTopology.serviceVIP, LabTopology.appPort)]
        case .serviceOutside: return [Endpoint(LabTopology.outsideServiceVIP, LabTopology.appPort)]
        case .dns: return [LabTopology.dnsServer]
        case .udp: return [Endpoint(lab.peer.ipv4, LabTopology.udpEchoPort)]
        case .ipv6Escape, .outboundIPv6: return lab.server.ipv6.map { [Endpoint($0, LabTopology.appPort)] } ?? [server]
        }
    }
}

/// The offline engine over one scenario's capture files — exactly what `meshtrace analyze FILES --rules R` runs:
/// `MergedSource` → `Correlator` → sinks (the text report into a buffer, and the verdict sink).
public enum LabCaptureAnalysis {
    public static func analyze(files: [String], rulesFile: String?, podAddresses: [IPAddress],
                               scenario: Scenario, lab: LabTopology, output: OutputConfig = OutputConfig()) throws -> LabTraceFinding {
        let captures = files.filter { $0.hasSuffix(".pcap") }
        guard !captures.isEmpty else { return LabTraceFinding(verdict: nil, report: "") }
        let ruleset = try rulesFile.map { try RulesetLoader.load(file: $0) }
        let tags = RuleTagTable()
        let source = try MergedSource(paths: captures, tags: tags)
        let textPath = "\(lab.runDirectory)/.\(scenario.rawValue)-report.txt"
        let fd = open(textPath, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw MeshtraceError(.kernelRefused, "cannot write \(textPath)") }
        defer { close(fd); unlink(textPath) }
        let verdicts = LabVerdictSink()
        let reporter = try Reporter.make(config: output.perScenario(scenario), ruleset: ruleset, tags: tags,
                                         title: "meshtrace lab: \(scenario.rawValue) (recorded)",
                                         sinks: [TextReport(fileDescriptor: fd, style: Style(enabled: false), showEvents: true), verdicts])
        var options = CorrelatorOptions()
        options.podAddresses = podAddresses
        let correlator = Correlator(tags: tags, ruleset: ruleset, options: options, sink: reporter)
        var record = PacketRecord()
        var count = 0
        while count < 1_000_000, let frame = source.next(into: &record) {
            let id = correlator.ingest(record)
            if reporter.wantsPackets { reporter.packet(record, frame: frame, linkType: source.currentLinkType, connection: id) }
            count += 1
        }
        try reporter.finish(correlator.finish())
        let text = (try? String(contentsOfFile: textPath, encoding: .utf8)) ?? ""
        return LabTraceFinding(verdict: verdicts.verdict(for: scenario, lab: lab), report: text, files: files)
    }
}
