// A finished connection's packet events as the correlator kept them: compact plain values plus the tables
// that name them (interface names, rule hits by prefix id). The text printer reads them in this form; a
// sink that wants `TimelineEvent`s (JSON, HTML, pcapng, tests) gets them materialized once, by the reporter.
// A million-packet capture has a million events: building a ~300-byte `TimelineEvent` with its strings and
// rule reference for each, only to print it and drop it, cost more than the correlation itself.

/// The events of one finished connection, in timeline order (retimed and sorted).
public struct TimelineEventList {
    var events: [CompactEvent]
    /// The connection's initiator: events from the other side are replies.
    let initiator: Endpoint
    /// The initiator in the REDIRECTed view when the kernel changed its source port (`ConnectionState.natInitiator`).
    let natInitiator: Endpoint?
    let context: EventContext

    /// Whether the event went from the responder to the initiator (in either NAT view).
    @inline(__always)
    func isReply(_ e: CompactEvent) -> Bool {
        e.tuple.src != initiator && (natInitiator == nil || e.tuple.src != natInitiator.unsafelyUnwrapped)
    }

    public var count: Int { events.count }
    public var isEmpty: Bool { events.isEmpty }
    /// The first event's time (the base of a text timeline's offsets).
    public var firstTime: Timestamp? { events.first?.time }

    /// The events as the `TimelineEvent`s of `ConnectionTimeline.events`.
    public func materialize() -> [TimelineEvent] {
        var out: [TimelineEvent] = []
        out.reserveCapacity(events.count)
        for e in events {
            var hit: RuleHit? = nil
            if e.hitID != 0 {
                hit = context.cachedHit(e.hitID).hit
                if let a = context.perPacketAction(e) { hit!.action = a }
            }
            let point: CapturePoint
            switch e.pointKind {
            case .interface: point = CapturePoint(kind: .interface, interface: context.interfaceNames[Int(e.interfaceIndex)],
                                                  isLoopback: e.isLoopback)
            case .netfilter: point = .netfilter(e.hook)
            case .unknown: point = .unknown
            }
            out.append(TimelineEvent(time: e.time, frame: e.frame, point: point, direction: e.direction, tuple: e.tuple,
                                     isReply: isReply(e), tcpFlags: e.flags, length: e.length,
                                     mark: e.hasMark ? e.mark : nil, hit: hit, notes: e.notes))
        }
        return out
    }
}

/// What the correlator's compact events refer to by number: interface names and rule hits. Shared by the
/// correlator (which fills it) and the event lists it hands out.
final class EventContext {
    let tags: RuleTagTable
    let ruleset: Ruleset?
    /// Interface names by `CompactEvent.interfaceIndex`; 0 is "?".
    private(set) var interfaceNames: [String] = ["?"]
    /// The same names as UTF-8, back to back, and each one's start and length there: printers copy a name's
    /// bytes rather than go through a String per packet line.
    private(set) var interfaceNameBytes: [UInt8] = [UInt8(ascii: "?")]
    private(set) var interfaceNameRanges: [(start: Int, count: Int)] = [(0, 1)]
    /// `interfaceIndex` by `InterfaceName.id` (UInt16.max: not numbered yet).
    private var indexByNameID: [UInt16] = []
    private var hitCache: [CachedHit?] = []
    /// `hitCache[i]?.actionKind`, kept apart: the correlator asks for it on every NFLOG record and the printers on
    /// every hit, and reading it (or testing `hitCache[i]` for nil) copies the hit's strings and rule reference.
    /// nil: the hit is not built yet.
    private var actionKinds: [ActionKind?] = []

    init(tags: RuleTagTable, ruleset: Ruleset?) {
        self.tags = tags
        self.ruleset = ruleset
    }

    enum ActionKind {
        case plain
        case redirect(UInt16)
        /// TPROXY (the 1.21-1.23 inbound capture): the packet keeps its destination; the connection's redirect.
        case tproxy(UInt16, UInt32?)
        case connmarkRestore
        case connmarkSet(UInt32)
    }

    struct CachedHit {
        var hit: RuleHit
        var actionKind: ActionKind
    }

    @inline(__always)
    func interfaceIndex(_ name: InterfaceName) -> UInt16 {
        let id = Int(name.id)
        if id < indexByNameID.count, indexByNameID[id] != UInt16.max { return indexByNameID[id] }
        return numberInterface(name)
    }

    /// Names numbered at most. A capture names a handful of interfaces; a hostile pcapng of many sections can name
    /// one per packet: past 65 534 the number named no name, and printing such a packet crashed (and each new name was
    /// looked for by reading every earlier one). Past this, names share one entry, numbered `maxInterfaceNames`, that
    /// says so.
    static let maxInterfaceNames = 4096
    static let moreInterfacesText = "(interfaces past the first \(maxInterfaceNames))"

    private func numberInterface(_ name: InterfaceName) -> UInt16 {
        // The name table gives each name one id, so an id not numbered yet is a name not listed yet; "?" is 0 from the
        // start.
        let i: UInt16
        if name == .questionMark {
            i = 0
        } else if interfaceNames.count < EventContext.maxInterfaceNames {
            i = appendInterfaceName(name.string)
        } else {
            if interfaceNames.count == EventContext.maxInterfaceNames { _ = appendInterfaceName(EventContext.moreInterfacesText) }
            i = UInt16(EventContext.maxInterfaceNames)
        }
        let id = Int(name.id)
        if id >= indexByNameID.count { indexByNameID.append(contentsOf: repeatElement(UInt16.max, count: id + 1 - indexByNameID.count)) }
        indexByNameID[id] = i
        return i
    }

    private func appendInterfaceName(_ text: String) -> UInt16 {
        let i = UInt16(interfaceNames.count)
        interfaceNames.append(text)
        interfaceNameRanges.append((interfaceNameBytes.count, text.utf8.count))
        interfaceNameBytes.append(contentsOf: text.utf8)
        return i
    }

    func cachedHit(_ id: UInt32) -> CachedHit {
        let i = Int(id)
        if i < hitCache.count, let h = hitCache[i] { return h }
        if i >= hitCache.count { hitCache.append(contentsOf: repeatElement(nil, count: i + 1 - hitCache.count)) }
        let built = buildHit(id)
        hitCache[i] = built
        if i >= actionKinds.count { actionKinds.append(contentsOf: repeatElement(nil, count: i + 1 - actionKinds.count)) }
        actionKinds[i] = built.actionKind
        return built
    }

    /// The cached hit's action kind alone (no copy of the hit's strings), building the entry when new.
    @inline(__always)
    func actionKind(_ id: UInt32) -> ActionKind {
        let i = Int(id)
        if i < actionKinds.count, let kind = actionKinds[i] { return kind }
        return cachedHit(id).actionKind
    }

    /// What the rule behind `e`'s hit did that depends on the packet: a REDIRECT's original destination (the
    /// packet's destination before NAT), the mark a CONNMARK restore gave. nil when the rule's action is the same
    /// on every packet it hits (then the cached hit's own action says it). Every printer asks here.
    @inline(__always)
    func perPacketAction(_ e: CompactEvent) -> RuleAction? {
        switch actionKind(e.hitID) {
        case .redirect(let port): return .redirected(toPort: port, originalDestination: e.tuple.dst)
        case .connmarkRestore: return .connmarkRestored(e.hasRestoredMark ? e.restoredMark : nil)
        case .plain, .connmarkSet, .tproxy: return nil
        }
    }

    /// Calls `body` with the cached hit for `id` in place (no copy, no reference counting), built first when new:
    /// never nil (the optional is the cache's slot type).
    @inline(__always)
    func withHit<T>(_ id: UInt32, _ body: (borrowing CachedHit?) -> T) -> T {
        let i = Int(id)
        if i >= actionKinds.count || actionKinds[i] == nil { _ = cachedHit(id) }
        return hitCache.withUnsafeBufferPointer { body($0[i]) }
    }

    private func buildHit(_ id: UInt32) -> CachedHit {
        let tag = tags.tag(for: id)
        let text = tags.text(for: id)
        var kind = ActionKind.plain
        guard let tag else { return CachedHit(hit: RuleHit(tag: nil, prefixText: text), actionKind: .plain) }
        switch tag.position {
        case .observeIn, .observeOut:
            return CachedHit(hit: RuleHit(tag: tag, prefixText: text, role: .meshtraceObservation, action: .observed),
                             actionKind: .plain)
        case .rule:
            break
        }
        guard let rule = ruleset?.rule(for: tag) else {
            return CachedHit(hit: RuleHit(tag: tag, prefixText: text), actionKind: .plain)
        }
        let action: RuleAction
        switch rule.target {
        case .redirect(let p):
            action = .redirected(toPort: p ?? 0, originalDestination: nil); kind = .redirect(p ?? 0)
        case .tproxy(let port, _, let mark, _): action = .tproxied(toPort: port, mark: mark); kind = .tproxy(port, mark)
        case .setMark(let v, _): action = .markSet(v)
        case .connmarkSet(let v, _): action = .connmarkSet(v); kind = .connmarkSet(v)
        case .connmarkRestore: action = .connmarkRestored(nil); kind = .connmarkRestore
        case .connmarkSave: action = .other("CONNMARK --save-mark")
        case .accept: action = .accepted
        case .return: action = .returned
        case .jump(let c), .goto(let c): action = .jumped(c)
        case .ctZone(let z): action = .ctZone(z)
        case .drop, .reject: action = .dropped
        case .nflog, .log, .trace, .counterOnly: action = .observed
        case .dnat(let s): action = .other("DNAT \(s)")
        case .snat(let s): action = .other("SNAT \(s)")
        case .masquerade: action = .other("MASQUERADE")
        case .unknown(let s): action = .other(s)
        }
        return CachedHit(hit: RuleHit(tag: tag, prefixText: text, rule: rule, role: rule.role, action: action), actionKind: kind)
    }
}
