// Every printer is a sink of the same records (the pwru idea: events are plain typed records, and the text,
// JSON, pcapng and HTML printers all consume them). `Reporter` fans one stream out to the sinks chosen.

public protocol ReportSink: AnyObject {
    /// Every packet, after the correlator placed it (nil: it joined no connection). For sinks that keep packets
    /// (pcapng); `frame` is the captured bytes in `linkType` framing, valid only during the call.
    func packet(_ record: PacketRecord, frame: UnsafeRawBufferPointer, linkType: Int32, connection: ConnectionID?)
    /// A connection's timeline once it is finished (closed, idle, or at the end of input).
    func connection(_ timeline: ConnectionTimeline)
    /// The same, with the events still in the correlator's compact form (`timeline.events` is empty). Only sinks
    /// that say `readsCompactEvents` get this call from the `Reporter`; the default fills `timeline.events` and
    /// calls `connection(_:)`.
    func connection(_ timeline: ConnectionTimeline, events: TimelineEventList)
    /// True for printers that read `TimelineEventList` directly (the text report): a million-packet capture then
    /// never builds a million `TimelineEvent`s.
    var readsCompactEvents: Bool { get }
    /// An escape finding, as soon as it is established.
    func finding(_ finding: EscapeFinding)
    /// The end: totals, rule hit counts, losses. Sinks flush and close their files here.
    func finish(_ summary: AnalysisSummary) throws
    /// Writes out what the sink holds buffered (nothing when nothing is). A live trace calls it after every
    /// reader pass, so a timeline appears when its connection finishes, not when 64 KiB of output have gathered.
    func flushOutput()
    /// True once the reader of the sink's output went away (EPIPE: `meshtrace trace | head`). A live trace then
    /// stops, as tcpdump does, instead of tracing into a closed pipe until its duration runs out.
    var outputClosed: Bool { get }
}

extension ReportSink {
    public func flushOutput() {}
    public var outputClosed: Bool { false }
    public func packet(_ record: PacketRecord, frame: UnsafeRawBufferPointer, linkType: Int32, connection: ConnectionID?) {}
    public func finding(_ finding: EscapeFinding) {}
    public func connection(_ timeline: ConnectionTimeline, events: TimelineEventList) {
        var t = timeline
        t.events = events.materialize()
        connection(t)
    }
    public var readsCompactEvents: Bool { false }
}

/// Fans records out to several sinks.
public final class Reporter: ReportSink {
    public private(set) var sinks: [ReportSink]
    /// True when some sink wants every packet (so the caller keeps frame bytes around for it).
    public var wantsPackets: Bool
    public init(sinks: [ReportSink] = [], wantsPackets: Bool = false) { self.sinks = sinks; self.wantsPackets = wantsPackets }
    public func add(_ sink: ReportSink, wantsPackets: Bool = false) {
        sinks.append(sink)
        if wantsPackets { self.wantsPackets = true }
    }
    public func packet(_ record: PacketRecord, frame: UnsafeRawBufferPointer, linkType: Int32, connection: ConnectionID?) {
        guard wantsPackets else { return }
        for s in sinks { s.packet(record, frame: frame, linkType: linkType, connection: connection) }
    }
    public func connection(_ timeline: ConnectionTimeline) { for s in sinks { s.connection(timeline) } }
    /// Compact events go as they are to the sinks that read them; the others share one materialized timeline.
    public func connection(_ timeline: ConnectionTimeline, events: TimelineEventList) {
        var materialized: ConnectionTimeline? = nil
        for s in sinks {
            if s.readsCompactEvents {
                s.connection(timeline, events: events)
            } else {
                if materialized == nil {
                    var t = timeline
                    t.events = events.materialize()
                    materialized = t
                }
                s.connection(materialized!)
            }
        }
    }
    public var readsCompactEvents: Bool { true }
    public func finding(_ finding: EscapeFinding) { for s in sinks { s.finding(finding) } }
    public func finish(_ summary: AnalysisSummary) throws { for s in sinks { try s.finish(summary) } }
    public func flushOutput() { for s in sinks { s.flushOutput() } }
    public var outputClosed: Bool { sinks.contains { $0.outputClosed } }
}

/// What the user asked for on the command line, shared by analyze, trace, verify and lab.
public struct OutputConfig: Sendable {
    public enum ColorMode: String, Sendable, CaseIterable { case auto, always, never }
    public var json: Bool = false
    public var pcapngPath: String? = nil
    public var htmlPath: String? = nil
    public var color: ColorMode = .auto
    /// Progress / live status line on stderr (only when stderr is a terminal, unless forced).
    public var progress: Bool = true
    public init() {}
}
