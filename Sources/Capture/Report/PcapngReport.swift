import Foundation
#if canImport(Glibc)
import Glibc
#endif

// `--pcapng FILE`: every packet of the run, one interface per capture point, each packet commented with
// what meshtrace knows about it: the rule hits (the NFLOG twins' prefixes and the rules' ambient roles),
// the marks, the REDIRECT's original destination, its connection and the ztunnel hop that connection is
// part of, and whether it is part of an escape.
//
// Interface captures do not carry rule hits themselves; the NFLOG records of the same packet do. The
// comment of a pcap packet therefore lists the hits of the NFLOG records that share its identity (same
// connection, IP ID, TCP sequence, flags and length) within `samePacketWindow` spooled packets either side.
// Bounded: the window, not the capture, decides the memory used.
//
// Note for readers of the file: libpcap 1.10 (tcpdump) refuses a pcapng whose interfaces differ in link type,
// and even one with two LINKTYPE_RAW interfaces (it compares the first interface's DLT_RAW with the next one's
// LINKTYPE_RAW). Wireshark, tshark and meshtrace's own reader (`PcapngFileReader`) read all of them.

public final class PcapngReport: ReportSink {
    public let path: String
    public static let samePacketWindow = 2048

    /// Names the roles of hits; settable until `finish` (a live trace knows its ruleset only once it ran).
    public var ruleset: Ruleset?
    private let tags: RuleTagTable?
    private let spoolPath: String
    private var spool: BufferedFileOutput?
    private var points: [(linkType: Int32, point: CapturePoint, group: UInt16)] = []
    private var connections: [ConnectionID: ConnectionNote] = [:]
    /// Roles the correlator gave to hits, by prefix: used when no ruleset was given to this sink.
    private var learnedRoles: [String: AmbientRole] = [:]
    private var finished = false

    /// What a comment needs of a connection; kept for every connection until the end, so kept small
    /// (the hop's evidence stays in the text, JSON and HTML reports).
    struct ConnectionNote {
        var kind: ConnectionKind
        var hops: [HopNote] = []
        var escapes: [EscapeFinding.Class] = []
    }
    struct HopNote: Equatable {
        var direction: ZtunnelHop.Direction, outer: ConnectionID, inner: ConnectionID, confidence: Confidence
        init(_ h: ZtunnelHop) { direction = h.direction; outer = h.outer; inner = h.inner; confidence = h.confidence }
    }

    public init(path: String, ruleset: Ruleset? = nil, tags: RuleTagTable? = nil) throws {
        self.path = path; self.ruleset = ruleset; self.tags = tags
        spoolPath = path + ".meshtrace-spool-\(getpid())"
        // Fail now, not at the end of the trace, when the file cannot be written (and name it, not the spool).
        let probe = try BufferedFileOutput(path: path)
        try probe.close()
        spool = try BufferedFileOutput(path: spoolPath)
    }

    deinit { if !finished { unlink(spoolPath) } }

    public func packet(_ record: PacketRecord, frame: UnsafeRawBufferPointer, linkType: Int32, connection: ConnectionID?) {
        guard let spool else { return }
        let index = interfaceIndex(record, linkType: linkType)
        let header = SpooledPacket(record, interface: index, capturedLength: frame.count, connection: connection)
        do {
            try header.encode(to: spool)
            try spool.append(frame)
        } catch {
            // A full disk must not stop the analysis; finish() reports the pcapng as failed.
            self.spool = nil
            spoolError = error
        }
    }
    private var spoolError: Error?

    private func interfaceIndex(_ r: PacketRecord, linkType: Int32) -> UInt32 {
        // A handful of capture points per run: a linear scan compares inline strings without allocating.
        for (i, p) in points.enumerated() where p.linkType == linkType && p.point == r.point { return UInt32(i) }
        points.append((linkType, r.point, r.nflog?.group ?? 0))
        return UInt32(points.count - 1)
    }

    public func connection(_ timeline: ConnectionTimeline) {
        var note = connections[timeline.id] ?? ConnectionNote(kind: timeline.kind)
        note.kind = timeline.kind
        for h in timeline.hops.map(HopNote.init) where !note.hops.contains(h) { note.hops.append(h) }
        connections[timeline.id] = note
        // The partner of a hop may have been emitted before the hop was known: tell it too.
        for h in timeline.hops.map(HopNote.init) {
            for other in [h.outer, h.inner] where other != timeline.id {
                var n = connections[other] ?? ConnectionNote(kind: .unknown)
                if !n.hops.contains(h) { n.hops.append(h) }
                connections[other] = n
            }
        }
        for e in timeline.events {
            if let hit = e.hit, let role = hit.role, learnedRoles[hit.prefixText] == nil {
                learnedRoles[hit.prefixText] = role
            }
        }
    }

    public func finding(_ finding: EscapeFinding) {
        guard let c = finding.connection else { return }
        var n = connections[c] ?? ConnectionNote(kind: .unknown)
        if !n.escapes.contains(finding.findingClass) { n.escapes.append(finding.findingClass) }
        connections[c] = n
    }

    public func finish(_ summary: AnalysisSummary) throws {
        guard !finished else { return }
        finished = true
        defer { unlink(spoolPath) }
        for f in summary.findings { finding(f) }
        if let spoolError { throw MeshtraceError.badInput("pcapng \(path) not written: \(spoolError)") }
        try spool?.close()
        spool = nil

        let writer = try PcapngWriter(path: path, application: "meshtrace")
        let snaplen = UInt32(262_144)
        for p in points {
            try writer.addInterface(PcapngReport.interface(for: p.point, linkType: p.linkType, group: p.group, snaplen: snaplen))
        }
        if points.isEmpty {
            // No packet, no capture point: still one interface, as libpcap (tcpdump) and meshtrace's own reader
            // refuse a pcapng without one.
            try writer.addInterface(PcapngReport.interface(for: .unknown, linkType: LinkType.raw, group: 0, snaplen: snaplen))
        }

        // Two passes over the spool at once: `ahead` indexes the NFLOG hits up to a window in front of
        // the packet being written, so a pcap packet can name hits logged just after it.
        let current = try SpoolReader(path: spoolPath)
        let ahead = try SpoolReader(path: spoolPath)
        var hitsByPacket: [SamePacketKey: [(index: Int, prefixID: UInt32, mark: UInt32?)]] = [:]
        var expiry: [(index: Int, key: SamePacketKey)] = []
        var expiryHead = 0
        var aheadIndex = 0
        var aheadDone = false
        var index = 0
        let window = PcapngReport.samePacketWindow

        while try current.next({ header, bytes in
            while !aheadDone && aheadIndex <= index + window {
                let more = try ahead.next(skipBytes: true) { h, _ in
                    if h.isNflogRecord, h.prefixID != 0, h.connectionID != nil {
                        hitsByPacket[h.samePacketKey, default: []].append((aheadIndex, h.prefixID, h.markValue))
                        expiry.append((aheadIndex, h.samePacketKey))
                    }
                }
                if more { aheadIndex += 1 } else { aheadDone = true }
            }
            while expiryHead < expiry.count && expiry[expiryHead].index < index - window {
                let (old, key) = expiry[expiryHead]
                hitsByPacket[key]?.removeAll { $0.index == old }
                if hitsByPacket[key]?.isEmpty == true { hitsByPacket[key] = nil }
                expiryHead += 1
            }
            if expiryHead > 4096 { expiry.removeFirst(expiryHead); expiryHead = 0 }

            let related = header.connectionID == nil ? [] : (hitsByPacket[header.samePacketKey] ?? [])
            let comment = self.comment(for: header, index: index, samePacket: related)
            try writer.writePacket(interface: header.interface, time: header.time, data: bytes,
                                   originalLength: header.originalLength, comments: [comment])
            index += 1
        }) {}
        try writer.close()
    }

    /// libpcap hands out DLT_ values; files hold LINKTYPE_ values. They differ only for a few, of which
    /// Linux meets DLT_RAW (12, 14 on some BSDs) = LINKTYPE_RAW 101.
    static func linkTypeValue(dlt: Int32) -> UInt16 {
        switch dlt {
        case 12, 14: return 101
        default: return UInt16(truncatingIfNeeded: dlt)
        }
    }

    static func interface(for point: CapturePoint, linkType: Int32, group: UInt16, snaplen: UInt32) -> PcapngInterface {
        let lt = linkTypeValue(dlt: linkType)
        switch point.kind {
        case .interface:
            return PcapngInterface(linkType: lt, name: point.interface.isEmpty ? "?" : point.interface,
                                   description: "libpcap capture on \(point.interface)", snaplen: snaplen)
        case .netfilter:
            return PcapngInterface(linkType: lt, name: "nf:\(point.hook)",
                                   description: "NFLOG group \(group), netfilter hook \(point.hook) (meshtrace rule twins)",
                                   snaplen: snaplen)
        case .unknown:
            return PcapngInterface(linkType: lt, name: "unknown", description: "capture point not known", snaplen: snaplen)
        }
    }

    // MARK: the comment

    func prefixText(_ id: UInt32) -> String { tags?.text(for: id) ?? "prefix#\(id)" }

    /// Per prefix: resolving a rule walks the ruleset and hashes rule text, too slow to repeat per packet.
    private var hitTexts: [UInt32: String] = [:]
    private var lastConnection: (id: ConnectionID, text: String)?

    func hitText(_ id: UInt32) -> String {
        if let t = hitTexts[id] { return t }
        let t = resolveHitText(id)
        hitTexts[id] = t
        return t
    }

    private func resolveHitText(_ id: UInt32) -> String {
        let text = prefixText(id)
        var role: String? = nil
        if let tag = tags?.tag(for: id) {
            switch tag.position {
            case .observeIn: role = "observe-in"
            case .observeOut: role = "observe-out"
            case .rule: role = ruleset?.rule(for: tag)?.role.rawValue
            }
        }
        if role == nil { role = learnedRoles[text]?.rawValue }
        return role.map { "\(text) \($0)" } ?? text
    }

    /// "conn #3 app-outbound; ztunnel hop outbound #3 -> #4 (high)", kept for the run of packets of one connection.
    func connectionText(_ c: ConnectionID) -> String {
        if let last = lastConnection, last.id == c { return last.text }
        let note = connections[c]
        var parts = ["conn #\(c) \(note?.kind.rawValue ?? ConnectionKind.unknown.rawValue)"]
        for h in note?.hops ?? [] {
            parts.append("ztunnel hop \(h.direction.rawValue) #\(h.outer) -> #\(h.inner) (\(h.confidence.rawValue))")
        }
        for e in note?.escapes ?? [] {
            parts.append(e == .byDesign ? "uncaptured by design" : "ESCAPE \(e.rawValue)")
        }
        let text = parts.joined(separator: "; ")
        lastConnection = (c, text)
        return text
    }

    func comment(for p: SpooledPacket, index: Int, samePacket: [(index: Int, prefixID: UInt32, mark: UInt32?)]) -> String {
        var parts: [String] = []
        var hits: [String] = []
        var marks: [UInt32] = []
        if p.isNflogRecord {
            if p.prefixID != 0 { hits.append(hitText(p.prefixID)) }
            if let m = p.markValue, m != 0 { marks.append(m) }
        }
        var also: [String] = []
        for h in samePacket where h.index != index {
            let t = hitText(h.prefixID)
            if p.isNflogRecord { if !also.contains(t) && !hits.contains(t) { also.append(t) } }
            else if !hits.contains(t) { hits.append(t) }
            if let m = h.mark, m != 0, !marks.contains(m) { marks.append(m) }
        }
        if !hits.isEmpty { parts.append("hit " + hits.joined(separator: ", ")) }
        if !also.isEmpty { parts.append("same packet also hit " + also.joined(separator: ", ")) }
        if !marks.isEmpty { parts.append("mark " + marks.map { "0x" + String($0, radix: 16) }.joined(separator: ",")) }
        if let d = p.originalDestination { parts.append("original destination \(d)") }
        if let c = p.connectionID {
            parts.append(connectionText(c))
        } else {
            parts.append("no connection")
        }
        return parts.joined(separator: "; ")
    }
}
