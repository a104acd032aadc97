import Foundation

// The human view: one block per connection as it finishes (header, redirect, hop with its evidence,
// then one line per packet event), escapes right under their connection and again at the end, then the
// per-rule hit counts and the totals.
//
//   #3 app-outbound  tcp 10.0.1.5:40000 > 10.0.2.2:80  closed, 9 events, 1240 bytes captured, 2.1 ms
//     redirect  REDIRECT to :15001, original destination 10.0.2.2:80 (seen as 10.0.1.5:40000 > 127.0.0.1:15001)
//     hop       outbound → #4 (ztunnel's connection), confidence high
//                 ztunnel-mark          inner connection carries ztunnel's mark 0x539 (frame 6)
//     +0.000000  nf:OUTPUT  out  10.0.1.5:40000 > 10.0.2.2:80  S  nat ISTIO_OUTPUT #4 [outbound-capture] REDIRECT :15001 (original 10.0.2.2:80)
//     +0.000005  lo         out  10.0.1.5:40000 > 127.0.0.1:15001  S

public final class TextReport: ReportSink {
    private let out: ReportBuffer
    public func flushOutput() { out.flush() }
    public var outputClosed: Bool { out.readerGone }
    private let style: Style
    private let showEvents: Bool
    private var escapes: [EscapeFinding] = []
    private var escapesNotListed = 0
    /// `hitWords` by hit id (empty: not written yet).
    private let hitWordsByID = ReportPieces()

    /// - showEvents: false prints only the connection headers (a summary view).
    public init(fileDescriptor: Int32 = STDOUT_FILENO, style: Style = .plain, showEvents: Bool = true) {
        out = ReportBuffer(fileDescriptor: fileDescriptor)
        self.style = style
        self.showEvents = showEvents
    }

    private func styled(_ paint: (Style) -> (String) -> String, _ s: String) {
        if style.enabled { out.text(paint(style)(s)) } else { out.text(s) }
    }

    /// The styled pieces of a packet line written straight into the buffer: `styled` would build a String per
    /// packet. Returns whether a reset is due.
    @inline(__always)
    private func paint(_ sgr: StaticString) -> Bool {
        guard style.enabled else { return false }
        out.byte(0x1b); out.byte(UInt8(ascii: "[")); out.text(sgr); out.byte(UInt8(ascii: "m"))
        return true
    }

    @inline(__always)
    private func unpaint(_ painted: Bool) { if painted { out.text("\u{1B}[0m") } }

    private func mark(_ m: UInt32) {
        let p = paint("33"); out.text("0x"); out.hex(m); unpaint(p)
    }

    private func tuple(_ t: FiveTuple) {
        out.text(IPProto.name(t.proto)); out.byte(0x20)
        tupleColumns(t)
        if isICMP(t) { out.byte(0x20); icmpWords(t) }
    }

    @inline(__always)
    private func isICMP(_ t: FiveTuple) -> Bool { t.proto == IPProto.icmp || t.proto == IPProto.icmpv6 }

    /// An ICMP tuple's message ("port unreachable"), with an echo's identifier ("echo request id 7").
    private func icmpWords(_ t: FiveTuple) {
        out.text(IcmpMessage.name(of: t))
        if FlowKey.isEcho(t) { out.text(" id "); out.unsignedDecimal(UInt64(t.dst.port)) }
    }

    public func connection(_ t: ConnectionTimeline) {
        header(t)
        if showEvents {
            let base = t.events.first?.time.totalNanoseconds ?? t.firstSeen.totalNanoseconds
            for i in t.events.indices { event(t.events[i], base: base) }
            dropped(t)
        }
        out.flushIfFull()
    }

    public var readsCompactEvents: Bool { true }

    /// The same lines as `connection(_:)` prints, read from the correlator's compact events.
    public func connection(_ t: ConnectionTimeline, events: TimelineEventList) {
        header(t)
        if showEvents {
            let base = events.firstTime?.totalNanoseconds ?? t.firstSeen.totalNanoseconds
            let context = events.context
            context.interfaceNameBytes.withUnsafeBufferPointer { nameBytes in
                context.interfaceNameRanges.withUnsafeBufferPointer { nameRanges in
                    events.events.withUnsafeBufferPointer { list in
                        for i in list.indices {
                            compactEvent(list[i], base: base, context: context, nameBytes: nameBytes, nameRanges: nameRanges)
                        }
                    }
                }
            }
            dropped(t)
        }
        out.flushIfFull()
    }

    private func dropped(_ t: ConnectionTimeline) {
        if t.droppedEvents > 0 {
            out.text("    ("); out.decimal(t.droppedEvents); out.text(" more events counted, not listed)\n")
        }
    }

    private func header(_ t: ConnectionTimeline) {
        out.byte(UInt8(ascii: "#")); out.unsignedDecimal(UInt64(t.id)); out.byte(0x20)
        styled(Style.bold, t.kind.rawValue)
        out.text("  ")
        tuple(t.original)
        out.text("  ")
        out.text(t.refused ? "refused" : t.closed ? "closed" : t.endedEarly ? "ended early (too many open)" : "open at end or idle")
        // Every NFLOG event and every captured packet is an event (a line below); bytes are the captured packets'
        // (an NFLOG event repeats a packet, and without a capture there are none).
        out.text(", "); out.decimal(t.packets); out.text(t.packets == 1 ? " event" : " events")
        out.text(", "); out.unsignedDecimal(t.bytes); out.text(" bytes captured, ")
        out.text(formatDelta(t.lastSeen.totalNanoseconds - t.firstSeen.totalNanoseconds))
        out.text(", from "); out.timestamp(t.firstSeen)
        out.byte(0x0a)

        if let r = t.redirect {
            out.text("  redirect  ")
            action(r, styledAsRedirect: true)
            if let alias = t.aliases.first { out.text(" (seen as "); tuple(alias); out.byte(UInt8(ascii: ")")) }
            out.byte(0x0a)
        }
        if !t.marks.isEmpty {
            out.text("  marks     ")
            for (i, m) in t.marks.enumerated() {
                if i > 0 { out.text(", ") }
                mark(m)
            }
            out.byte(0x0a)
        }
        if t.refused {
            out.text("  refused   ")
            if case .redirected(let port, _)? = t.redirect {
                out.text("the SYN, redirected to :"); out.unsignedDecimal(UInt64(port))
                out.text(", was answered by a RST: nothing listens on :"); out.unsignedDecimal(UInt64(port))
                out.text(" in this pod (ztunnel's port)\n")
            } else {
                out.text("the SYN was answered by a RST: nothing listens on "); out.endpoint(t.original.dst); out.byte(0x0a)
            }
        }
        for e in t.icmpErrors {
            out.text("  icmp      ")
            styled(Style.bold, e.message)
            out.text(" from "); out.address(e.from)
            out.text(", "); out.text(formatDelta(max(0, e.time.totalNanoseconds - t.firstSeen.totalNanoseconds)))
            out.text(" after the first packet\n")
        }
        for hop in t.hops { self.hop(hop, from: t) }
    }

    private func hop(_ hop: ZtunnelHop, from t: ConnectionTimeline) {
        let isOuter = hop.outer == t.id
        let other = isOuter ? hop.inner : hop.outer
        out.text("  hop       ")
        out.text(hop.direction.rawValue)
        out.text(isOuter ? " → #" : " ← #")
        out.unsignedDecimal(UInt64(other))
        switch (hop.direction, isOuter) {
        case (.outbound, true): out.text(" (ztunnel's connection onwards)")
        case (.outbound, false): out.text(" (the app's redirected connection)")
        case (.inbound, true): out.text(" (ztunnel's connection into the app)")
        case (.inbound, false): out.text(" (the connection ztunnel received)")
        }
        out.text(", confidence ")
        if hop.confidence == .high { styled(Style.ok, hop.confidence.rawValue) } else { styled(Style.warn, hop.confidence.rawValue) }
        out.byte(0x0a)
        for ev in hop.evidence {
            out.text("              ")
            if let kind = ev.fact.kindWords {
                out.text(kind)
                out.spaces(22 - kind.utf8CodeUnitCount)
                // Worded straight into the buffer; never empty, so always painted (as `styled` would).
                let painted = paint("2")
                var words = out
                ev.fact.word(into: &words)
                unpaint(painted)
            } else {
                out.text(ev.kind)
                out.spaces(22 - ev.kind.utf8.count)
                styled(Style.dim, ev.detail)
            }
            out.byte(0x0a)
        }
    }

    private func event(_ e: borrowing TimelineEvent, base: Int64) {
        eventStart(e.time, base: base)
        let pointWidth: Int
        switch e.point.kind {
        case .interface: out.text(e.point.interface); pointWidth = e.point.interface.utf8.count
        case .netfilter: pointWidth = hookName(e.point.hook)
        case .unknown: out.byte(UInt8(ascii: "?")); pointWidth = 1
        }
        eventPacket(pointWidth: pointWidth, direction: e.direction, tuple: e.tuple, flags: e.tcpFlags, length: e.length)
        if let m = e.mark, m != 0 { out.text("  mark "); mark(m) }
        if let h = e.hit { out.text("  "); hit(h) }
        eventEnd(e.notes)
    }

    /// One packet line from a compact event: the same bytes `event(_:base:)` prints for its `TimelineEvent`.
    @inline(__always)
    private func compactEvent(_ e: CompactEvent, base: Int64, context: EventContext, nameBytes: UnsafeBufferPointer<UInt8>,
                              nameRanges: UnsafeBufferPointer<(start: Int, count: Int)>) {
        eventStart(e.time, base: base)
        let pointWidth: Int
        switch e.pointKind {
        case .interface:
            let range = nameRanges[Int(e.interfaceIndex)]
            out.bytes(UnsafeBufferPointer(rebasing: nameBytes[range.start..<(range.start + range.count)]))
            pointWidth = range.count
        case .netfilter: pointWidth = hookName(e.hook)
        case .unknown: out.byte(UInt8(ascii: "?")); pointWidth = 1
        }
        eventPacket(pointWidth: pointWidth, direction: e.direction, tuple: e.tuple, flags: e.flags, length: e.length)
        if e.hasMark && e.mark != 0 { out.text("  mark "); mark(e.mark) }
        if e.hitID != 0 {
            // What a rule did that depends on the packet (a REDIRECT's original destination, the mark a restore
            // gave) is written per packet; the rest of a hit's words are the same on every packet it hits.
            let perPacket = context.perPacketAction(e)
            out.text("  ")
            hitWords(e.hitID, context: context, withAction: perPacket == nil)
            if let a = perPacket, a != .observed { out.byte(0x20); action(a, styledAsRedirect: false) }
        }
        eventEnd(e.notes)
    }

    /// A hit's rule (or tag), role and, `withAction`, its fixed action, as written the first time (by hit id).
    private func hitWords(_ id: UInt32, context: EventContext, withAction: Bool) {
        out.cached(hitWordsByID, Int(id)) {
            context.withHit(id) { cached in
                guard let cached else { return }
                hitName(cached.hit)
                if withAction, let a = cached.hit.action, a != .observed { out.byte(0x20); action(a, styledAsRedirect: false) }
            }
        }
    }

    @inline(__always)
    private func eventStart(_ time: Timestamp, base: Int64) {
        out.write(room: 40) { w in
            w.text("    +")
            let d = time.totalNanoseconds - base
            if d < 0 { w.byte(UInt8(ascii: "-")) }
            let a = UInt64(abs(d))
            w.unsignedDecimal(a / 1_000_000_000); w.byte(0x2e); w.sixDigits((a % 1_000_000_000) / 1_000)
            w.text("  ")
        }
    }

    /// "nf:HOOK"; returns its width.
    @inline(__always)
    private func hookName(_ hook: NetfilterHook) -> Int {
        out.text("nf:")
        out.text(hook.name)
        return 3 + hook.name.utf8CodeUnitCount
    }

    @inline(__always)
    private func eventPacket(pointWidth: Int, direction: PacketDirection, tuple: FiveTuple, flags: TCPFlags, length: UInt32) {
        let pad = max(0, 15 - pointWidth)
        out.write(room: 5 + pad) { w in
            w.spaces(pad)
            switch direction {
            case .inbound: w.text("in   ")
            case .outbound: w.text("out  ")
            case .unknown: w.text("     ")
            }
        }
        tuplePieces.write(tuple, into: out) { tupleColumns(tuple) }
        if tuple.proto == IPProto.tcp {
            out.write(room: 32) { w in
                w.text("  "); w.tcpFlags(flags)
                w.text("  len "); w.unsignedDecimal(UInt64(length))
            }
        } else {
            out.text("  "); out.text(IPProto.name(tuple.proto))
            if isICMP(tuple) { out.byte(0x20); icmpWords(tuple) }
            out.text("  len "); out.unsignedDecimal(UInt64(length))
        }
    }

    /// `src:port > dst:port` (ICMP: `src > dst`, its type and identifier are words after it); a packet line's are
    /// written once per tuple and copied after that (`tuplePieces`).
    private func tupleColumns(_ t: FiveTuple) {
        if isICMP(t) {
            out.address(t.src.addr); out.text(" > "); out.address(t.dst.addr)
            return
        }
        out.endpoint(t.src); out.text(" > "); out.endpoint(t.dst)
    }
    private let tuplePieces = TuplePieces()

    @inline(__always)
    private func eventEnd(_ notes: DecodeNotes) {
        if !notes.isEmpty {
            out.text("  [")
            for (i, n) in notes.descriptions.enumerated() { if i > 0 { out.text(", ") }; out.text(n) }
            out.byte(UInt8(ascii: "]"))
        }
        out.byte(0x0a)
    }

    private func hit(_ h: RuleHit) { hit(h, action: h.action) }

    /// A hit with the action this packet got (a REDIRECT's original destination is the packet's own).
    private func hit(_ h: borrowing RuleHit, action: RuleAction?) {
        hitName(h)
        if let a = action, a != .observed { out.byte(0x20); self.action(a, styledAsRedirect: false) }
    }

    private func hitName(_ h: borrowing RuleHit) {
        if let rule = h.rule {
            let p = paint("36")
            out.text(h.tag?.backendWord ?? "")
            out.text(rule.table); out.byte(0x20); out.text(rule.chain); out.text(" #"); out.decimal(rule.position)
            unpaint(p)
        } else if let tag = h.tag {
            let p = paint("36")
            out.text(tag.backendWord)
            switch tag.position {
            case .rule(let n): out.text(tag.table); out.byte(0x20); out.text(tag.chain); out.text(" #"); out.decimal(n)
            case .observeIn: out.text("observe "); out.text(tag.table); out.byte(0x20); out.text(tag.chain); out.text(" in")
            case .observeOut: out.text("observe "); out.text(tag.table); out.byte(0x20); out.text(tag.chain); out.text(" out")
            }
            unpaint(p)
        } else {
            out.text("log \""); out.text(h.prefixText); out.byte(0x22)
        }
        if let role = h.role, role != .meshtraceObservation {
            out.text(" ["); let p = paint("35"); out.text(role.rawValue); unpaint(p); out.byte(UInt8(ascii: "]"))
        }
    }

    private func action(_ a: RuleAction, styledAsRedirect: Bool) {
        switch a {
        case .redirected(let port, let original):
            let p = paint("1;34"); out.text("REDIRECT to :"); out.decimal(port); unpaint(p)
            if let o = original {
                out.text(styledAsRedirect ? ", original destination " : " (original ")
                out.endpoint(o)
                if !styledAsRedirect { out.byte(UInt8(ascii: ")")) }
            }
        case .tproxied(let port, let mark):
            styled(Style.redirect, "TPROXY to :\(port)")
            if let m = mark { out.text(" mark "); styled(Style.mark, "0x" + String(m, radix: 16)) }
        case .markSet(let m): out.text("mark set "); styled(Style.mark, "0x" + String(m, radix: 16))
        case .connmarkSet(let m): out.text("connmark set "); styled(Style.mark, "0x" + String(m, radix: 16))
        case .connmarkRestored(let m):
            out.text("connmark restored")
            if let m { out.text(" → mark "); styled(Style.mark, "0x" + String(m, radix: 16)) }
        case .accepted: out.text("ACCEPT")
        case .returned: out.text("RETURN")
        case .jumped(let c): out.text("jump "); out.text(c)
        case .ctZone(let z): out.text("CT zone "); out.unsignedDecimal(UInt64(z))
        case .dropped: styled(Style.warn, "DROP")
        case .observed: out.text("observed")
        case .other(let s): out.text(s)
        }
    }

    public func finding(_ f: EscapeFinding) {
        let label = f.isEscape ? "  !! ESCAPE " : "  -- by design "
        if f.isEscape { styled(Style.escape, label + "(\(f.findingClass.rawValue), confidence \(f.confidence.rawValue))") } else {
            styled(Style.warn, label + "(\(f.findingClass.rawValue))")
        }
        out.text(": "); out.text(f.summary)
        frames(f.frames)
        out.byte(0x0a)
        if f.isEscape {
            if escapes.count < 1000 { escapes.append(f) } else { escapesNotListed += 1 }
        }
        out.flushIfFull()
    }

    private func frames(_ refs: [FrameRef]) {
        guard !refs.isEmpty else { return }
        out.text(refs.count == 1 ? "; proof: frame " : "; proof: frames ")
        for (i, r) in refs.enumerated() {
            if i > 0 { out.text(", ") }
            out.unsignedDecimal(UInt64(r.source)); out.byte(UInt8(ascii: ":")); out.unsignedDecimal(r.frame)
        }
    }

    public func finish(_ s: AnalysisSummary) throws {
        out.byte(0x0a)
        if !s.ruleHits.isEmpty {
            styled(Style.heading, "Rule hits"); out.byte(0x0a)
            for h in s.ruleHits {
                out.text("  ")
                let n = String(h.count)
                out.spaces(9 - n.utf8.count); out.text(n); out.text("  ")
                styled(Style.rule, h.prefix)
                if let r = h.rule {
                    out.text("  ["); styled(Style.role, r.role.rawValue); out.text("]  "); out.text(r.canonicalText)
                }
                out.byte(0x0a)
            }
        }
        styled(Style.heading, "Totals"); out.byte(0x0a)
        out.text("  "); out.decimal(s.packets); out.text(" events ("); out.decimal(s.nflogRecords); out.text(" NFLOG records, ")
        if s.traceSteps > 0 { out.decimal(s.traceSteps); out.text(" TRACE steps, ") }
        out.decimal(s.packets - s.nflogRecords - s.traceSteps); out.text(" packets captured), ")
        out.decimal(s.connections); out.text(s.connections == 1 ? " connection" : " connections")
        if let hidden = s.connectionsFilteredOut {
            out.text(" ("); out.decimal(hidden); out.text(" more not matching --filter)")
        }
        out.text(", ")
        out.decimal(s.hops); out.text(s.hops == 1 ? " ztunnel hop joined\n" : " ztunnel hops joined\n")
        let byDesign = s.findings.count - s.escapes
        out.text("  ")
        if s.escapes > 0 { styled(Style.escape, counted(s.escapes, "escape")) } else { styled(Style.ok, "no escapes") }
        out.text(", "); out.decimal(byDesign); out.text(" uncaptured by design")
        if s.findingsOmitted > 0 { out.text(" ("); out.decimal(s.findingsOmitted); out.text(" more findings not kept)") }
        out.byte(0x0a)
        if s.refusedConnections > 0 || s.connectionsWithIcmpErrors > 0 {
            out.text("  ")
            if s.refusedConnections > 0 {
                styled(Style.warn, counted(s.refusedConnections, "connection", then: " refused (SYN answered by a RST)"))
                if s.connectionsWithIcmpErrors > 0 { out.text(", ") }
            }
            if s.connectionsWithIcmpErrors > 0 {
                styled(Style.warn, counted(s.connectionsWithIcmpErrors, "connection", then: " with ICMP errors"))
            }
            out.byte(0x0a)
        }
        if !s.podAddresses.isEmpty {
            out.text("  pod address: "); out.text(s.podAddresses.map(\.description).joined(separator: ", ")); out.byte(0x0a)
        } else if s.connections > 0 {
            // An Ethernet or raw capture (tcpdump -i eth0) does not say which packets left the pod and has no
            // NFLOG records to tell: the pod's address is not inferred, and "no escapes" would mean nothing.
            out.text("  "); styled(Style.warn, "pod address unknown: no packet was seen leaving or reaching the pod through its interface (an Ethernet or raw capture says no direction; NFLOG records would), so traffic leaving the pod could not be judged; give --pod-ip")
            out.byte(0x0a)
        }
        if s.connectionsEndedEarly > 0 {
            out.text("  "); styled(Style.warn, counted(s.connectionsEndedEarly, "connection", then: " printed early: more were open at once than --max-open keeps (a SYN flood, a scan?); a later packet of one makes a connection of its own"))
            out.byte(0x0a)
        }
        if s.lateRecords > 0 {
            // Live, the reader fell behind on one of its sources; in a file, the file is not in time order.
            out.text("  "); styled(Style.warn, s.live
                ? "\(s.lateRecords) records read more than the close linger after later ones (the reader fell behind on one of its sources): their connections may be split"
                : "\(s.lateRecords) records out of time order, older than the latest one read by more than the close linger (pcapng files joined with cat? give them as separate files, or merge them with mergecap): their connections may be split")
            out.byte(0x0a)
        }
        if s.damagedPackets > 0 {
            out.text("  "); styled(Style.warn, "\(s.damagedPackets) packets only partly decoded"); out.byte(0x0a)
            if s.nflogRecordsCut > 0 {
                out.text("  "); styled(Style.warn, "\(s.nflogRecordsCut) of them NFLOG records cut by the capture's snaplen, so their packet is unknown: record nflog:G without -s (a twin's record is up to ~270 bytes)")
                out.byte(0x0a)
            }
        }
        for d in s.fileDamage { out.text("  "); styled(Style.warn, d); out.byte(0x0a) }
        if s.eventsLost > 0 { out.text("  "); styled(Style.warn, "\(s.eventsLost) events lost"); out.byte(0x0a) }
        if s.readerStalls > 0 {
            out.text("  the reader stood still \(s.readerStalls == 1 ? "once" : "\(s.readerStalls) times") (stopped, or not scheduled): connections were finished only once what came meanwhile had been read")
            out.byte(0x0a)
        }
        if !escapes.isEmpty {
            styled(Style.heading, "Escapes"); out.byte(0x0a)
            for f in escapes {
                out.text("  "); styled(Style.escape, f.findingClass.rawValue)
                if let c = f.connection { out.text(" #"); out.unsignedDecimal(UInt64(c)) }
                out.byte(0x20); tuple(f.tuple)
                out.text(" ("); out.text(f.confidence.rawValue); out.text("): "); out.text(f.summary)
                frames(f.frames)
                out.byte(0x0a)
            }
            if escapesNotListed > 0 { out.text("  ... and "); out.decimal(escapesNotListed); out.text(" more\n") }
        }
        out.flush()
        if out.abandoned { throw MeshtraceError(.badInput, OutputStall.said) }
        if out.writeError != 0 && !out.readerGone {
            throw MeshtraceError(.badInput, "cannot write the report: \(String(cString: strerror(out.writeError)))")
        }
    }
}
