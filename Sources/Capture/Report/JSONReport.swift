import Foundation

// JSON Lines (docs/JSON.md): one `connection` record per finished connection, one `finding` record per
// finding right after its connection, and one `summary` record at the end. Written by hand into a byte
// buffer: a record per connection of a million-packet capture must not cost more than the analysis.

public final class JSONReport: ReportSink {
    public static let schemaVersion = 1
    private let out: ReportBuffer
    public func flushOutput() { out.flush() }
    public var outputClosed: Bool { out.readerGone }
    private var comma = false
    /// `hitRule` of each hit id and each interface name as written the first time, copied after that.
    private let hitWords = ReportPieces()
    private let interfaceWords = ReportPieces()

    public init(fileDescriptor: Int32 = STDOUT_FILENO) {
        out = ReportBuffer(fileDescriptor: fileDescriptor)
    }

    // MARK: - Small writers

    @inline(__always)
    private func key(_ k: StaticString) {
        out.jsonKey(k, comma: comma)
        comma = true
    }
    @inline(__always) private func open(_ b: UInt8) { out.byte(b); comma = false }
    @inline(__always) private func close(_ b: UInt8) { out.byte(b); comma = true }
    @inline(__always) private func element() { if comma { out.byte(UInt8(ascii: ",")) }; comma = true }

    private func endpointString(_ e: Endpoint) {
        out.byte(0x22); out.endpoint(e); out.byte(0x22)
    }
    private func addressString(_ a: IPAddress) { out.byte(0x22); out.address(a); out.byte(0x22) }

    /// A tuple object. One connection's events carry a few tuples (its NAT views, both ways) over and over:
    /// the last few written are kept as bytes and copied.
    private func tuple(_ t: FiveTuple) {
        tuplePieces.write(t, into: out) { writeTuple(t) }
        comma = true
    }
    private let tuplePieces = TuplePieces()

    private func writeTuple(_ t: FiveTuple) {
        open(UInt8(ascii: "{"))
        key("proto"); out.byte(0x22); out.text(IPProto.name(t.proto)); out.byte(0x22)
        key("src"); addressString(t.src.addr)
        key("sport"); out.unsignedDecimal(UInt64(t.src.port))
        key("dst"); addressString(t.dst.addr)
        key("dport"); out.unsignedDecimal(UInt64(t.dst.port))
        close(UInt8(ascii: "}"))
    }

    private func frame(_ f: FrameRef) {
        open(UInt8(ascii: "["))
        out.unsignedDecimal(UInt64(f.source)); out.byte(UInt8(ascii: ",")); out.unsignedDecimal(f.frame)
        close(UInt8(ascii: "]"))
    }

    private func time(_ t: Timestamp) { out.byte(0x22); out.timestamp(t); out.byte(0x22) }

    private func action(_ a: RuleAction) {
        open(UInt8(ascii: "{"))
        key("type")
        switch a {
        case .redirected(let port, let original):
            out.text("\"redirect\""); key("to_port"); out.unsignedDecimal(UInt64(port))
            if let o = original { key("original_dst"); endpointString(o) }
        case .tproxied(let port, let mark):
            out.text("\"tproxy\""); key("to_port"); out.unsignedDecimal(UInt64(port))
            if let m = mark { key("mark"); out.unsignedDecimal(UInt64(m)) }
        case .markSet(let m): out.text("\"mark-set\""); key("mark"); out.unsignedDecimal(UInt64(m))
        case .connmarkSet(let m): out.text("\"connmark-set\""); key("connmark"); out.unsignedDecimal(UInt64(m))
        case .connmarkRestored(let m):
            out.text("\"connmark-restore\"")
            if let m { key("mark"); out.unsignedDecimal(UInt64(m)) }
        case .accepted: out.text("\"accept\"")
        case .returned: out.text("\"return\"")
        case .jumped(let c): out.text("\"jump\""); key("chain"); out.jsonString(c)
        case .ctZone(let z): out.text("\"ct-zone\""); key("zone"); out.unsignedDecimal(UInt64(z))
        case .dropped: out.text("\"drop\"")
        case .observed: out.text("\"observe\"")
        case .other(let s): out.text("\"other\""); key("text"); out.jsonString(s)
        }
        close(UInt8(ascii: "}"))
    }

    private func hit(_ h: RuleHit) {
        hitRule(h)
        if let a = h.action { key("action"); action(a) }
        close(UInt8(ascii: "}"))
    }

    /// A hit's object up to its action: the same for every packet of one hit id.
    private func hitRule(_ h: RuleHit) {
        open(UInt8(ascii: "{"))
        key("prefix"); out.jsonString(h.prefixText)
        if let tag = h.tag {
            key("table"); out.jsonString(tag.table)
            key("chain"); out.jsonString(tag.chain)
            key("position")
            switch tag.position {
            case .rule(let n): out.decimal(n)
            case .observeIn: out.text("\"in\"")
            case .observeOut: out.text("\"out\"")
            }
            if tag.isLegacy { key("backend"); out.text("\"iptables-legacy\"") }
        }
        if let text = h.ruleCanonicalText { key("rule"); out.jsonString(text) }
        if let role = h.role { key("role"); out.byte(0x22); out.text(role.rawValue); out.byte(0x22) }
    }

    private func event(_ e: TimelineEvent) {
        eventRecord(time: e.time, frame: e.frame, pointKind: e.point.kind, hook: e.point.hook,
                    interface: { out.jsonString(e.point.interface) }, direction: e.direction, tuple: e.tuple,
                    isReply: e.isReply, flags: e.tcpFlags, length: e.length, mark: e.mark,
                    hit: { if let h = e.hit { key("hit"); hit(h) } }, notes: e.notes)
    }

    /// `event(_:)` for a compact event: the same bytes. Never inlined: in a caller as large as `connection` the
    /// optimizer stops inlining, and every literal piece and key of the event (~12) became a call that tested
    /// its length at run time; in this function they are inlined and their lengths known.
    @inline(never)
    private func compactEvent(_ e: CompactEvent, events: TimelineEventList, context: EventContext) {
        eventRecord(time: e.time, frame: e.frame, pointKind: e.pointKind, hook: e.hook,
                    interface: { interfaceName(e.interfaceIndex, context: context) }, direction: e.direction,
                    tuple: e.tuple, isReply: events.isReply(e), flags: e.flags, length: e.length,
                    mark: e.hasMark ? e.mark : nil, hit: { if e.hitID != 0 { compactHit(e, context: context) } },
                    notes: e.notes)
    }

    /// One event object; the two event forms differ only in where the interface name and the hit come from.
    @inline(__always)
    private func eventRecord(time t: Timestamp, frame f: FrameRef, pointKind: CapturePoint.Kind, hook: NetfilterHook,
                             interface: () -> Void, direction: PacketDirection, tuple tu: FiveTuple, isReply: Bool,
                             flags: TCPFlags, length: UInt32, mark: UInt32?, hit: () -> Void, notes: DecodeNotes) {
        // Written as a few fixed pieces (the keys and punctuation between the values are always the same), each
        // stretch of them through one cursor into room reserved once: a trace writes ~70 of these objects per
        // connection.
        let seconds = out.secondsDigits(t.seconds)
        out.write(room: 128) { w in
            w.text("{\"time\":\""); w.timestamp(t, seconds: seconds)
            w.text("\",\"frame\":["); w.unsignedDecimal(UInt64(f.source)); w.byte(UInt8(ascii: ","))
            w.unsignedDecimal(f.frame)
            w.text("],\"point\":")
            switch pointKind {
            case .interface: break
            case .netfilter: w.text("\"nf:"); w.text(hook.name); w.byte(0x22)
            case .unknown: w.text("\"?\"")
            }
        }
        if pointKind == .interface { interface() }
        switch direction {
        case .inbound: out.text(",\"dir\":\"in\",\"tuple\":")
        case .outbound: out.text(",\"dir\":\"out\",\"tuple\":")
        case .unknown: out.text(",\"dir\":null,\"tuple\":")
        }
        tuple(tu)
        out.write(room: 96) { w in
            w.text(isReply ? ",\"reply\":true" : ",\"reply\":false")
            if tu.proto == IPProto.tcp { w.text(",\"flags\":\""); w.tcpFlags(flags); w.byte(0x22) }
        }
        if tu.proto == IPProto.icmp || tu.proto == IPProto.icmpv6 {
            out.text(",\"icmp\":")
            out.jsonString(IcmpMessage.name(of: tu))
        }
        out.write(room: 64) { w in
            w.text(",\"len\":"); w.unsignedDecimal(UInt64(length))
            if let m = mark { w.text(",\"mark\":"); w.unsignedDecimal(UInt64(m)) }
        }
        comma = true
        hit()
        if !notes.isEmpty {
            key("notes"); open(UInt8(ascii: "["))
            for n in notes.descriptions { element(); out.jsonString(n) }
            close(UInt8(ascii: "]"))
        }
        close(UInt8(ascii: "}"))
    }

    /// `"hit":{...}` of a compact event: the rule's part written once per hit id and copied after that. The
    /// action is written per packet only where it differs from packet to packet (a REDIRECT's original
    /// destination, a restored mark); for every other hit the whole object, action included, is copied.
    private func compactHit(_ e: CompactEvent, context: EventContext) {
        let perPacket = context.perPacketAction(e)
        key("hit")
        out.cached(hitWords, Int(e.hitID)) {
            context.withHit(e.hitID) { cached in
                guard let cached else { return }
                hitRule(cached.hit)
                if perPacket == nil, let a = cached.hit.action { key("action"); action(a) }
            }
        }
        comma = true
        if let a = perPacket { key("action"); action(a) }
        close(UInt8(ascii: "}"))
    }

    /// An interface name as a JSON string, escaped once per name.
    private func interfaceName(_ index: UInt16, context: EventContext) {
        out.cached(interfaceWords, Int(index)) { out.jsonString(context.interfaceNames[Int(index)]) }
    }

    private func evidence(_ ev: HopEvidence) {
        open(UInt8(ascii: "{"))
        key("kind")
        if let kind = ev.fact.kindWords { out.byte(0x22); out.text(kind); out.byte(0x22) } else { out.jsonString(ev.kind) }
        key("detail")
        if case .worded(_, let detail) = ev.fact {
            out.jsonString(detail)
        } else {
            // The correlator's own words: addresses, numbers and fixed text, nothing JSON would escape.
            var words = out
            out.byte(0x22); ev.fact.word(into: &words); out.byte(0x22)
        }
        close(UInt8(ascii: "}"))
    }

    // MARK: - Records

    public func connection(_ t: ConnectionTimeline) {
        connectionStart(t)
        for e in t.events { element(); event(e) }
        connectionEnd(t)
    }

    public var readsCompactEvents: Bool { true }

    /// The same record as `connection(_:)` writes, with the events read from the correlator's compact form
    /// (a live trace or a long capture never builds a `TimelineEvent` per packet).
    public func connection(_ t: ConnectionTimeline, events: TimelineEventList) {
        connectionStart(t)
        let context = events.context
        events.events.withUnsafeBufferPointer { list in
            for i in list.indices { element(); compactEvent(list[i], events: events, context: context) }
        }
        connectionEnd(t)
    }

    private func connectionStart(_ t: ConnectionTimeline) {
        open(UInt8(ascii: "{"))
        key("type"); out.text("\"connection\"")
        key("id"); out.unsignedDecimal(UInt64(t.id))
        key("kind"); out.byte(0x22); out.text(t.kind.rawValue); out.byte(0x22)
        key("original"); tuple(t.original)
        key("aliases"); open(UInt8(ascii: "["))
        for a in t.aliases { element(); tuple(a) }
        close(UInt8(ascii: "]"))
        if let r = t.redirect { key("redirect"); action(r) }
        key("marks"); open(UInt8(ascii: "["))
        for m in t.marks { element(); out.unsignedDecimal(UInt64(m)) }
        close(UInt8(ascii: "]"))
        if !t.icmpErrors.isEmpty {
            key("icmp_errors"); open(UInt8(ascii: "["))
            for e in t.icmpErrors {
                element(); open(UInt8(ascii: "{"))
                key("time"); time(e.time)
                key("from"); out.byte(0x22); out.address(e.from); out.byte(0x22)
                key("type"); out.unsignedDecimal(UInt64(e.type))
                key("code"); out.unsignedDecimal(UInt64(e.code))
                key("message"); out.jsonString(e.message)
                close(UInt8(ascii: "}"))
            }
            close(UInt8(ascii: "]"))
        }
        key("first_seen"); time(t.firstSeen)
        key("last_seen"); time(t.lastSeen)
        key("packets"); out.decimal(t.packets)
        key("bytes"); out.unsignedDecimal(t.bytes)
        key("closed"); out.text(t.closed ? "true" : "false")
        if t.refused { key("refused"); out.text("true") }
        if t.endedEarly { key("ended_early"); out.text("true") }
        key("hops"); open(UInt8(ascii: "["))
        for h in t.hops {
            element(); open(UInt8(ascii: "{"))
            key("direction"); out.byte(0x22); out.text(h.direction.rawValue); out.byte(0x22)
            key("outer"); out.unsignedDecimal(UInt64(h.outer))
            key("inner"); out.unsignedDecimal(UInt64(h.inner))
            key("confidence"); out.byte(0x22); out.text(h.confidence.rawValue); out.byte(0x22)
            key("evidence"); open(UInt8(ascii: "["))
            for ev in h.evidence { element(); evidence(ev) }
            close(UInt8(ascii: "]"))
            close(UInt8(ascii: "}"))
        }
        close(UInt8(ascii: "]"))
        key("events"); open(UInt8(ascii: "["))
    }

    private func connectionEnd(_ t: ConnectionTimeline) {
        close(UInt8(ascii: "]"))
        key("events_not_listed"); out.decimal(t.droppedEvents)
        close(UInt8(ascii: "}"))
        out.byte(0x0a)
        comma = false
        out.flushIfFull()
    }

    private func findingBody(_ f: EscapeFinding) {
        open(UInt8(ascii: "{"))
        key("type"); out.text("\"finding\"")
        key("class"); out.byte(0x22); out.text(f.findingClass.rawValue); out.byte(0x22)
        key("escape"); out.text(f.isEscape ? "true" : "false")
        key("connection"); if let c = f.connection { out.unsignedDecimal(UInt64(c)) } else { out.text("null") }
        key("tuple"); tuple(f.tuple)
        key("summary"); out.jsonString(f.summary)
        key("confidence"); out.byte(0x22); out.text(f.confidence.rawValue); out.byte(0x22)
        key("frames"); open(UInt8(ascii: "["))
        for r in f.frames { element(); frame(r) }
        close(UInt8(ascii: "]"))
        close(UInt8(ascii: "}"))
    }

    public func finding(_ f: EscapeFinding) {
        findingBody(f)
        out.byte(0x0a)
        comma = false
        out.flushIfFull()
    }

    public func finish(_ s: AnalysisSummary) throws {
        open(UInt8(ascii: "{"))
        key("type"); out.text("\"summary\"")
        key("schema"); out.decimal(JSONReport.schemaVersion)
        key("packets"); out.decimal(s.packets)
        key("nflog_records"); out.decimal(s.nflogRecords)
        key("connections"); out.decimal(s.connections)
        if let hidden = s.connectionsFilteredOut { key("connections_filtered_out"); out.decimal(hidden) }
        key("hops"); out.decimal(s.hops)
        key("escapes"); out.decimal(s.escapes)
        key("by_design"); out.decimal(s.findings.count - s.escapes)
        key("findings_omitted"); out.decimal(s.findingsOmitted)
        key("damaged_packets"); out.decimal(s.damagedPackets)
        if s.lateRecords > 0 { key("late_records"); out.decimal(s.lateRecords) }
        if s.refusedConnections > 0 { key("refused"); out.decimal(s.refusedConnections) }
        if s.connectionsEndedEarly > 0 { key("connections_ended_early"); out.decimal(s.connectionsEndedEarly) }
        if s.connectionsWithIcmpErrors > 0 { key("with_icmp_errors"); out.decimal(s.connectionsWithIcmpErrors) }
        if s.nflogRecordsCut > 0 { key("nflog_records_cut"); out.decimal(s.nflogRecordsCut) }
        if s.traceSteps > 0 { key("trace_steps"); out.decimal(s.traceSteps) }
        if let lost = s.traceStepsLost { key("trace_steps_lost"); out.decimal(lost) }
        key("file_damage"); open(UInt8(ascii: "["))
        for d in s.fileDamage { element(); out.jsonString(d) }
        close(UInt8(ascii: "]"))
        key("pod_addresses"); open(UInt8(ascii: "["))
        for a in s.podAddresses { element(); addressString(a) }
        close(UInt8(ascii: "]"))
        key("rule_hits"); open(UInt8(ascii: "["))
        for h in s.ruleHits {
            element(); open(UInt8(ascii: "{"))
            key("prefix"); out.jsonString(h.prefix)
            key("count"); out.decimal(h.count)
            if h.tag?.isLegacy == true { key("backend"); out.text("\"iptables-legacy\"") }
            if let r = h.rule {
                key("table"); out.jsonString(r.table)
                key("chain"); out.jsonString(r.chain)
                key("position"); out.decimal(r.position)
                key("rule"); out.jsonString(r.canonicalText)
                key("role"); out.byte(0x22); out.text(r.role.rawValue); out.byte(0x22)
            }
            close(UInt8(ascii: "}"))
        }
        close(UInt8(ascii: "]"))
        if s.live {
            key("events_lost"); out.decimal(s.eventsLost)
            if s.readerStalls > 0 { key("reader_stalls"); out.decimal(s.readerStalls) }
            if s.readerRaises > 0 {
                key("reader_raises"); out.decimal(s.readerRaises)
                key("reader_raised_cpu_ms"); out.unsignedDecimal(s.readerRaisedCPUNanos / 1_000_000)
            }
            key("kernel_counters"); open(UInt8(ascii: "{"))
            for (k, v) in s.kernelCounters.sorted(by: { $0.key < $1.key }) {
                element(); out.jsonString(k); out.byte(UInt8(ascii: ":")); out.unsignedDecimal(v)
            }
            close(UInt8(ascii: "}"))
        }
        key("findings"); open(UInt8(ascii: "["))
        for f in s.findings where f.isEscape { element(); findingBody(f) }
        close(UInt8(ascii: "]"))
        close(UInt8(ascii: "}"))
        out.byte(0x0a)
        comma = false
        out.flush()
        if out.abandoned { throw MeshtraceError(.badInput, OutputStall.said) }
        if out.writeError != 0 && !out.readerGone {
            throw MeshtraceError(.badInput, "cannot write the JSON report: \(String(cString: strerror(out.writeError)))")
        }
    }
}
