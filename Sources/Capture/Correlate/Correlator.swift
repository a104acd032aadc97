// The correlation engine: one for offline analysis and live tracing.
//
// Packets arrive one at a time, from libpcap interface captures and NFLOG records, in roughly capture-time
// order. Each is placed on one logical connection, whatever view of it the packet shows:
//   - the app's pre-NAT view (`app → S:80`, NFLOG at nat OUTPUT before the REDIRECT),
//   - the post-NAT view on lo (`app → 127.0.0.1:15001`),
//   - the replies on lo, de-NATed at POSTROUTING (`S:80 → app`).
// REDIRECT never rewrites the source, so all views share the initiator's endpoint; NFULA_CT tuples link
// them exactly, and without conntrack the views are linked by that endpoint plus TCP sequence numbers
// (NFLOG records are stamped on receipt in batches, so time cannot be trusted to order them).
//
// Connections are emitted to the sink when they close (FIN both ways, or RST) plus a short linger, or
// when they idle out by capture time, so memory stays bounded however long the capture is.

public final class Correlator {
    public let tags: RuleTagTable
    public let ruleset: Ruleset?
    public let options: CorrelatorOptions
    public let sink: ReportSink

    private let table = FlowTable<FlowKey>()
    private let byInitiator = FlowTable<InitiatorKey>()
    /// Open TCP connections by their first SYN (sender address and ISN): finds the NAT view of a connection whose
    /// source port the kernel changed, where `byInitiator` (the same initiator endpoint) cannot.
    private let bySYN = FlowTable<SYNKey>(capacity: 256)
    private var open: [ConnectionState] = []
    private var nextID: ConnectionID = 1
    private var now: Int64 = .min
    private var nextSweep: Int64 = .min
    private var sweepInterval: Int64 { options.sweepIntervalNanos }

    /// Interface names and rule hits by number, shared with the event lists handed to the sinks.
    private let context: EventContext
    private var hitCounts: [Int] = []

    private var podVotes: [IPAddress: Int] = [:]
    private var podVotesTotal = 0
    private var inferredPod: [IPAddress] = []
    private var podInferenceDirty = false
    private static let podVoteLimit = 4096

    /// Hop candidate lists, roughly in first-seen order (pruned from the front by age). The outbound ones are
    /// scanned no more (the joins look in the index by address and the start-order indexes below); they keep the
    /// order connections were listed in (`ConnectionState.outerListed`), which breaks ties, and whether one is listed.
    private var outerOutbound: [ConnectionState] = []
    private var innerOutbound: [ConnectionState] = []
    /// The outbound candidates again, by address: app connections by their original destination, tunnels by their
    /// peer. Only an identity match joins before emission, and it needs the two addresses to agree, so a new
    /// connection looks only at those filed under its address. Without it every new connection scanned every
    /// candidate, and connections to a service VIP (no tunnel names it) stay candidates until they are emitted:
    /// thousands under load (a VIP load cost the tracer ~5 times a pod-address one). A connection is filed once per
    /// address it takes; an entry under an address it no longer has is stale and dropped when its list is pruned.
    /// Each list is in the order its connections began (`CandidateList`), so a look reads only the window of starts
    /// a join allows.
    private var outerOutboundByAddress: [IPAddress: CandidateList] = [:]
    private var innerOutboundByAddress: [IPAddress: CandidateList] = [:]
    /// The outbound candidates once more, in the order they began: app connections (`outerOutbound`) and tunnels
    /// (`innerOutbound`). The joins at emission for an app connection that no tunnel names (a service VIP) look at
    /// the apps that began before it and at the tunnels that began around it, a window of either, not at every
    /// candidate (under a VIP load thousands wait to be emitted, and each emission scanned them all).
    private var appsByStart = StartOrderIndex()
    private var tunnelsByStart = StartOrderIndex()
    /// The app connections `earlierAppsChoose` gathers, kept between calls (empty between them).
    private var earlierApps: [ConnectionState] = []
    /// `explainByOrderChain`'s searches in one batch: the app connections on the chain so far or found to lead to no
    /// end (kept from a failed search to the next; cleared when one succeeds or is cut off by a bound), and how many
    /// the search looked at.
    private var chainVisited: Set<ObjectIdentifier> = []
    private var chainLooks = 0
    /// Tunnels the order chains' searches looked for connections to take (tests: the searches' cost; each looks at
    /// the app connections open around the tunnel's start).
    private(set) var orderChainStepsInAll = 0
    /// Whether any of `chainApps` could end a chain (no tunnel opened for it, or a pooled one): none, and no search
    /// can succeed.
    private var chainMayEnd = false
    /// The app connections a chain may move (`explainByOrderChain`), listed once a batch, when a tunnel first needs
    /// them, with their `vipWindow`s (the tunnels' start times each may take) indexed.
    private var chainApps: [ConnectionState] = []
    private var chainWindowFrom: [Int64] = [], chainWindowTo: [Int64] = []
    private var chainWindows = SpanIndex()
    /// `chainStep`'s scratch: the connections whose window holds a tunnel's start.
    private var chainNear: [Int] = []
    private var chainAppsListed = false
    /// The start-order indexes' entries, live and stale (tests: memory stays bounded by the open connections).
    var startOrderEntries: (apps: Int, tunnels: Int) { (appsByStart.entries.count, tunnelsByStart.entries.count) }
    /// The event room a new connection gets when no emitted one's array is spare (`newConnection`).
    static let firstEventRoom = 4
    /// Hops joined so far (tests: which record's look made a join).
    var hopsJoined: Int { summary.hops }
    /// Connections on the inbound candidate lists (tests: the lists let go of connections that are gone).
    var inboundCandidatesListed: Int { outerInbound.count + innerInbound.count }
    /// Filings since the last pruning of every list (amortized: the lists nobody scans are pruned too).
    private var filings = 0
    private var pruneAllAt = 4096
    /// Appends to the full outbound lists so far (`ConnectionState.outerListed`).
    private var listings = 0
    private var outerInbound: [ConnectionState] = []
    private var innerInbound: [ConnectionState] = []
    /// Lengths at which the inbound lists are pruned next (`listInbound`).
    private var outerInboundPruneAt = 64
    private var innerInboundPruneAt = 64
    /// Open connections to the HBONE port, either way: the tunnels a pooled join may find (see `pooledTunnel`).
    private var tunnels: [ConnectionState] = []
    /// Beside each tunnel, what `pooledTunnel` filters on first, so it reads only the few tunnels open across a
    /// connection's start and not every object in the list (with unpooled tunnels, ~1500 lingering ones live): when it
    /// began (Int64.min when not from its SYN: it may have been open before the capture) and when it closed
    /// (Int64.max while open). Either may be more permissive than the object, never less.
    private var tunnelBegan: [Int64] = []
    private var tunnelClosed: [Int64] = []
    /// Pooled joins listed on the tunnel's own timeline; later ones are listed only on the app's side, so a
    /// tunnel that carries thousands of connections keeps no more than this many links.
    static let maxPooledLinksListed = 16

    private var summary = AnalysisSummary()
    private var findingsOmitted = 0
    private var escapesKept = 0
    private var byDesignKept = 0
    private var redirectTargetPorts: Set<UInt16>
    /// When the last few emitted connections redirected to ztunnel's DNS port began, and the resolver each asked
    /// (`explainedByDNSProxy`).
    private var dnsCaptureStarts: [(start: Int64, resolver: IPAddress)] = []
    /// Scratch memory for `sortEvents` (up to 1024 events), made once: a temporary allocation that size is a heap
    /// allocation, and one per re-sorted connection showed in the profile.
    private let sortKeys = UnsafeMutablePointer<(Int64, Int, Int)>.allocate(capacity: 1024)
    private let sortScratch = UnsafeMutablePointer<CompactEvent>.allocate(capacity: 1024)
    /// `options.interfaceName`, interned once.
    private let givenInterfaceName: InterfaceName?

    public private(set) var peakOpenConnections = 0
    public var openConnectionCount: Int { open.count }
    /// The pod's addresses: given, or inferred from the traffic so far.
    public var podAddresses: [IPAddress] { options.podAddresses.isEmpty ? currentInferredPod() : options.podAddresses }

    public init(tags: RuleTagTable, ruleset: Ruleset?, options: CorrelatorOptions = CorrelatorOptions(), sink: ReportSink) {
        self.tags = tags
        self.ruleset = ruleset
        givenInterfaceName = options.interfaceName.map { InterfaceName($0) }
        var options = options
        if let ruleset {
            // The probe bypass rules name the address the node SNATs kubelet's probes to; a ruleset may use another
            // than Istio's defaults (the ipv6 golden does). A default its rules do not name, for a family they
            // name one of, is captured like any other client: taken for a probe, it hid ztunnel's hop.
            let named = RulesetAnalysis(ruleset).variant.probeAddresses
            if !named.isEmpty {
                options.probeAddresses = named + options.probeAddresses.filter { d in !named.contains { $0.family == d.family } }
            }
        }
        self.options = options
        self.sink = sink
        context = EventContext(tags: tags, ruleset: ruleset)
        var ports: Set<UInt16> = [options.outboundCapturePort, options.inboundPlaintextPort, options.dnsCapturePort]
        for rule in ruleset?.allRules ?? [] {
            switch rule.target {
            case .redirect(let p?): ports.insert(p)
            case .tproxy(let p, _, _, _): ports.insert(p)
            default: break
            }
        }
        redirectTargetPorts = ports
        if options.showsOnlySelected { summary.connectionsFilteredOut = 0 }
    }

    deinit {
        sortKeys.deallocate()
        sortScratch.deallocate()
    }

    // MARK: - The hot path

    /// Places one packet on its connection and returns that connection (nil for packets that carry no
    /// usable tuple: not IP, non-first fragments).
    @discardableResult
    public func ingest(_ r: borrowing PacketRecord) -> ConnectionID? {
        var record = copy r
        return place(&record)
    }

    /// `ingest(_:)` for a caller that reads every packet into one record variable: passed by address, the record
    /// is not copied. Across the module boundary a borrowed argument from a `var` (or a pointer's `pointee`) is
    /// copied whole for the call, ~420 bytes per packet. The record is not changed.
    @discardableResult
    public func ingest(inPlace r: inout PacketRecord) -> ConnectionID? { place(&r) }

    // The per-packet functions below take the record `inout` although none changes it: a ~420-byte record
    // passed by value is copied onto the stack for each call (the live tracer's records come cold from its hold
    // ring, and the copy stalled on them), while an `inout` one is passed by address.
    @inline(__always)
    private func place(_ r: inout PacketRecord) -> ConnectionID? {
        summary.packets += 1
        let t = r.time.totalNanoseconds
        if t > now { now = t } else if now - t > options.closeLingerNanos { summary.lateRecords += 1 }
        if now >= nextSweep && !sweepsHeld {
            if nextSweep != .min { sweep() }
            nextSweep = now + sweepInterval
        }

        var hitID: UInt32 = 0
        let nf = NflogFacts(r)
        if nf.present {
            summary.nflogRecords += 1
            hitID = nf.prefixID
            if hitID != 0 { countHit(hitID) }
        }
        if !r.notes.intersection(Correlator.damageNotes).isEmpty {
            summary.damagedPackets += 1
            if r.notes.isSuperset(of: [.truncatedNflog, .snaplenCut]) { summary.nflogRecordsCut += 1 }
        }
        guard r.isIP, !r.notes.contains(.nonFirstFragment) else { return nil }

        if options.podAddresses.isEmpty && podVotesTotal < Correlator.podVoteLimit { votePodAddress(&r, nf) }

        // An ICMP error belongs to the connection of the packet it quotes (any of its NAT views): a port
        // unreachable answering DNS redirected to a 15053 nobody listens on is that query's, not a connection of
        // its own. Quoting nothing known (its connection began before the capture, or is gone), it is its own.
        if _slowPath(r.hasQuoted), let c = quotedConnection(r.quoted) {
            c.addIcmpError(IcmpError(time: r.time, from: r.tuple.src.addr, proto: r.tuple.proto, type: r.icmpType, code: r.icmpCode))
            record(&r, nf, hitID: hitID, on: c)
            return c.id
        }

        // Most packets belong to a connection already in the table and change nothing about which one: placed
        // through an unretained reference (the table holds the connection throughout, and `record` removes
        // none), which saves a retain and a release per packet (~3 % of an analysis).
        if let known = table.unretained(FlowKey(r.tuple)) {
            let placed: ConnectionID? = known._withUnsafeGuaranteedRef { c in
                if !c.conntrackApplied, nf.hasConntrack { return nil }
                // Its tuple was reused lately: the record may be the connection's before it (the slow path looks).
                if c.previousOnTuple != nil { return nil }
                // A SYN may be the first of this view, whose other view went through a remapped source port
                // (`joinRemappedViews`): the slow path looks.
                if r.tuple.proto == IPProto.tcp,
                   (r.tcpFlags.contains(.syn) && !r.tcpFlags.contains(.ack) && c.synKey == nil) || isFreshSYN(&r, on: c) { return nil }
                record(&r, nf, hitID: hitID, on: c)
                return c.id
            }
            if let placed { return placed }
        }
        // A record that may open a connection, with the table full: the connections seen least lately go first.
        if _slowPath(open.count >= options.maxOpenConnections) { endLeastRecent() }
        guard let c = connection(for: &r, nf) else {
            // A late record of a connection already emitted, whose tuple another one holds now: on neither.
            if now - t <= options.closeLingerNanos { summary.lateRecords += 1 }
            return nil
        }
        record(&r, nf, hitID: hitID, on: c)
        return c.id
    }

    /// The connection an ICMP error's quoted packet belongs to: one of its views, or (a view not seen) the
    /// connection its sender's endpoint began, when the quoted other end is that connection's (or it was seen only
    /// redirected). An error conntrack de-NATed (seen on lo, or at PREROUTING) quotes the original destination of a
    /// packet seen only redirected: that is the connection's original view.
    private func quotedConnection(_ q: FiveTuple) -> ConnectionState? {
        let key = FlowKey(q)
        if let c = table[key] { return c }
        guard q.proto == IPProto.tcp || q.proto == IPProto.udp else { return nil }
        func sameOtherEnd(_ c: ConnectionState, _ e: Endpoint) -> Bool {
            e == c.responder || e == c.natResponder || e == c.initiator || e == c.natInitiator
        }
        if let c = byInitiator[InitiatorKey(proto: q.proto, endpoint: q.src)] {
            if sameOtherEnd(c, q.dst) { return c }
            guard c.initiator == q.src, c.natResponder != nil, !c.originalKnown, !isRedirectTarget(q.dst) else { return nil }
            addView(c, otherEnd: q.dst, key: key)
            return c
        }
        // An error about a packet the pod's side sent back (a reply): quoted from the responder.
        if let c = byInitiator[InitiatorKey(proto: q.proto, endpoint: q.dst)], sameOtherEnd(c, q.src) { return c }
        return nil
    }

    /// Moves the capture clock to `time` with no packet, and emits what that finishes: closed connections past
    /// their linger, idle ones past the idle timeout. Live tracing calls it on a timer, so a connection that ends
    /// just before the pod goes quiet is printed then and not at the end. The linger is also the hop join's grace
    /// period (a closing app connection waits that long for ztunnel's leg), so `time` must not run ahead of the
    /// capture's clock: a time earlier than the latest packet's changes nothing.
    public func advance(to time: Timestamp) {
        let t = time.totalNanoseconds
        guard t > now else { return }
        now = t
        guard !sweepsHeld else { return }
        sweep()
        nextSweep = now + sweepInterval
    }

    /// Live: while held, the clock moves with the records but finishes nothing (no sweep). The live reader holds
    /// sweeps while it places the backlog a stall left in the kernel's buffers (`StallGate`): placed one source's
    /// backlog before the other's, a record far later than the rest (an NFLOG event stamped on receipt after the
    /// stall) would otherwise move the clock past a connection's linger and finish it before its records from the
    /// other source are placed, which then make a second, headless connection. `resumeSweeps()` sweeps at once.
    public private(set) var sweepsHeld = false
    public func holdSweeps() { sweepsHeld = true }
    public func resumeSweeps() {
        guard sweepsHeld else { return }
        sweepsHeld = false
        sweep()
        nextSweep = now + sweepInterval
    }

    private static let damageNotes: DecodeNotes = [.truncatedLink, .truncatedIP, .truncatedTransport, .badIPHeader,
                                                   .badNflogTLV, .truncatedNflog, .badConntrack]

    /// The connection a record goes on; nil for a late record of a connection already emitted whose tuple another
    /// connection holds now.
    private func connection(for r: inout PacketRecord, _ nf: NflogFacts) -> ConnectionState? {
        let key = FlowKey(r.tuple)
        var c: ConnectionState
        if let known = table[key] {
            c = known
            if let previous = previousOwner(of: &r, holder: known) { return lateRecord(&r, key: key, of: previous) }
            if r.tuple.proto == IPProto.tcp, isFreshSYN(&r, on: c) {
                // The 4-tuple was reused (or two sockets share it across views): a new SYN with another ISN.
                retire(c)
                c = newConnection(r, key: key)
                c.previousOnTuple = known
            }
            if r.tuple.proto == IPProto.tcp, c.synKey == nil, r.tcpFlags.contains(.syn), !r.tcpFlags.contains(.ack),
               let other = bySYN[SYNKey(addr: r.tuple.src.addr, isn: r.tcpSeq)], other !== c,
               let joined = joinRemappedViews(c, other) {
                c = joined
            }
        } else if let linked = linkNATView(&r, key: key) {
            // A late view of a connection whose tuple was reused: placed, and nothing more.
            if linked.retired { return lateRecord(&r, key: key, of: linked) }
            c = linked
        } else {
            c = newConnection(r, key: key)
        }
        if !c.conntrackApplied, nf.hasConntrack, let ct = r.nflogFields.conntrack {
            c = applyConntrack(ct, to: c)
        }
        return c
    }

    /// The connection `holder` replaced on its tuple, when the TCP record is that one's and not `holder`'s by its
    /// sequence numbers: its SYN (the ISN), or a segment whose sequence number (or acknowledgment) lies just past that
    /// one's ISN and not past `holder`'s. A live reader behind on one source gets a connection's packets from it after
    /// the port was reused (under load, ztunnel's within tens of ms); read by time they would make a connection of
    /// their own (a tunnel's marked copies: a forged mark) or, a late SYN, end the new one.
    private func previousOwner(of r: inout PacketRecord, holder: ConnectionState) -> ConnectionState? {
        guard let p = holder.previousOnTuple, r.tuple.proto == IPProto.tcp else { return nil }
        let forward = sentByInitiator(&r, of: p)
        guard forward || r.tuple.dst == p.initiator || r.tuple.dst == p.natInitiator else { return nil }
        return sequenceDistance(&r, p, forward: forward) < sequenceDistance(&r, holder, forward: sentByInitiator(&r, of: holder)) ? p : nil
    }

    /// How far past `c`'s ISN on its side the record's sequence number lies (or its acknowledgment, past the other
    /// side's), within what `c` has sent and a margin; UInt32.max when it is not in `c`'s sequence space or nothing
    /// tells.
    private func sequenceDistance(_ r: inout PacketRecord, _ c: ConnectionState, forward: Bool) -> UInt32 {
        let sent = forward ? c.payloadForward : c.payloadReply, got = forward ? c.payloadReply : c.payloadForward
        let own = forward ? c.isnForward : c.isnReply, other = forward ? c.isnReply : c.isnForward
        var d = UInt32.max
        if let isn = own {
            let s = r.tcpSeq &- isn
            if UInt64(s) <= sent + Correlator.sequenceMargin { d = s }
        }
        if d == .max, r.tcpFlags.contains(.ack), let isn = other {
            let a = r.tcpAck &- isn &- 1
            if UInt64(a) <= got + Correlator.sequenceMargin { d = a }
        }
        return d
    }
    /// Bytes a segment may lie past what its connection is known to have sent and still be its (1 MiB: a late record
    /// of a connection whose other copies were all read; a random ISN lands this close 1 time in 4096).
    static let sequenceMargin: UInt64 = 1 << 20

    /// Places a late record on the connection its tuple had before (`previousOnTuple`, retired), seeing it in the
    /// record's view too (not in the flow table: `addView`). Nil when that one was emitted.
    private func lateRecord(_ r: inout PacketRecord, key: FlowKey, of p: ConnectionState) -> ConnectionState? {
        guard !p.emitted else { return nil }
        if !p.keys.contains(key) { addView(p, otherEnd: sentByInitiator(&r, of: p) ? r.tuple.dst : r.tuple.src, key: key) }
        return p
    }

    /// Whether the record was sent by `c`'s initiator (from the app's endpoint, or through its remapped one).
    @inline(__always)
    private func sentByInitiator(_ r: inout PacketRecord, of c: ConnectionState) -> Bool {
        r.tuple.src == c.initiator || (c.natInitiator != nil && r.tuple.src == c.natInitiator.unsafelyUnwrapped)
    }

    @inline(__always)
    private func isFreshSYN(_ r: inout PacketRecord, on c: ConnectionState) -> Bool {
        guard r.tcpFlags.contains(.syn), !r.tcpFlags.contains(.ack) else { return false }
        if let isn = c.isnForward { return isn != r.tcpSeq }
        // The capture missed the handshake, and here is a SYN from the initiator whose sequence number sits just
        // before the data already seen: that handshake's SYN arriving late (libpcap stamps NFLOG records when it
        // receives them, batched up to a second after), not a new connection reusing the tuple.
        if let low = c.lowestSeqForward, r.tuple.src == c.initiator {
            let distance = Int32(bitPattern: low &- r.tcpSeq)
            if distance > 0 && distance <= 1 << 20 { return false }
        }
        return c.isClosed
    }

    private func newConnection(_ r: PacketRecord, key: FlowKey) -> ConnectionState {
        let (initiator, responder, fromSYN) = initiatorAndResponder(r)
        let c = ConnectionState(id: nextID, tuple: r.tuple, initiator: initiator, responder: responder)
        nextID &+= 1
        c.initiatorFromSYN = fromSYN
        c.firstSeenNanos = now
        c.timeline.firstSeen = r.time
        c.timeline.lastSeen = r.time
        // Room for a few events first: a SYN nobody answers (a scan, a flood, a capture of one direction) makes a
        // connection that stays until the idle timeout, and 32 events' room was 3.3 KB of its ~4.9. One that goes
        // on gets room for 64 at its fifth (`record`): as many allocations as before for the usual ~70 events.
        if let spare = spareEventArrays.popLast() { c.events = spare } else {
            c.events.reserveCapacity(min(Correlator.firstEventRoom, options.maxEventsPerConnection))
        }
        if isRedirectTarget(responder) {
            c.natResponder = responder
        } else {
            c.originalKnown = true
        }
        c.keys.reserveCapacity(4)   // the original and the NAT views: one allocation, not one per view
        c.keys.append(key)
        table[key] = c
        byInitiator[InitiatorKey(proto: r.tuple.proto, endpoint: initiator)] = c
        c.openIndex = open.count
        open.append(c)
        if r.tuple.proto == IPProto.tcp && responder.port == options.hbonePort {
            c.tunnelIndex = tunnels.count
            tunnels.append(c)
            tunnelBegan.append(fromSYN ? c.firstSeenNanos : .min)
            tunnelClosed.append(.max)
        }
        if open.count > peakOpenConnections { peakOpenConnections = open.count }
        return c
    }

    /// Who opened the connection: the SYN's sender; else the side that does not look like a listener.
    private func initiatorAndResponder(_ r: PacketRecord) -> (Endpoint, Endpoint, Bool) {
        let src = r.tuple.src, dst = r.tuple.dst
        if r.tuple.proto == IPProto.icmp || r.tuple.proto == IPProto.icmpv6 {
            // ICMP has no listener ports: the sender of a request (or of an error) starts it. An echo reply's
            // receiver sent the request: its end is the request's (type << 8), the other the identifier.
            guard FlowKey.isEchoReply(r.tuple) else { return (src, dst, false) }
            let request: UInt16 = r.tuple.proto == IPProto.icmp ? 8 << 8 : 128 << 8
            return (Endpoint(dst.addr, request), Endpoint(src.addr, dst.port), false)
        }
        if r.tuple.proto == IPProto.tcp && r.tcpFlags.contains(.syn) {
            return r.tcpFlags.contains(.ack) ? (dst, src, true) : (src, dst, true)
        }
        if isRedirectTarget(src) || (looksLikeListener(src.port) && !looksLikeListener(dst.port)) {
            return (dst, src, false)
        }
        return (src, dst, false)
    }

    private func looksLikeListener(_ port: UInt16) -> Bool {
        port == options.hbonePort || port == 53 || redirectTargetPorts.contains(port) || (port != 0 && port < 32768 && port < 10000)
    }

    /// A post-REDIRECT destination: ztunnel's capture ports on a loopback address (nat OUTPUT REDIRECT
    /// goes to 127.0.0.1 / ::1), or on the pod's own address (nat PREROUTING REDIRECT keeps the
    /// interface's primary address and changes only the port).
    @inline(__always)
    private func isRedirectTarget(_ e: Endpoint) -> Bool {
        guard redirectTargetPorts.contains(e.port) else { return false }
        if e.addr.isLoopback { return true }
        return e.port == options.inboundPlaintextPort || (!options.podAddresses.isEmpty && options.podAddresses.contains(e.addr))
    }

    /// Finds the connection this packet is another NAT view of, by the shared initiator endpoint, checked
    /// against the TCP sequence space so two sockets that reuse a source port are not merged.
    private func linkNATView(_ r: inout PacketRecord, key: FlowKey) -> ConnectionState? {
        let proto = r.tuple.proto
        guard proto == IPProto.tcp || proto == IPProto.udp else { return nil }
        let bySource = byInitiator[InitiatorKey(proto: proto, endpoint: r.tuple.src)]
        if let c = bySource, natCompatible(c, otherEnd: r.tuple.dst, r, forward: true) {
            addView(c, otherEnd: r.tuple.dst, key: key)
            return c
        }
        let byDestination = byInitiator[InitiatorKey(proto: proto, endpoint: r.tuple.dst)]
        if let c = byDestination, natCompatible(c, otherEnd: r.tuple.src, r, forward: false) {
            addView(c, otherEnd: r.tuple.src, key: key)
            return c
        }
        if proto == IPProto.tcp, r.tcpFlags.contains(.syn) {
            if !r.tcpFlags.contains(.ack) {
                if let c = bySYN[SYNKey(addr: r.tuple.src.addr, isn: r.tcpSeq)], remappedViewCompatible(c, r) {
                    addRemappedView(c, r, key: key)
                    return c
                }
            } else if let c = bySYN[SYNKey(addr: r.tuple.dst.addr, isn: r.tcpAck &- 1)], remappable(c),
                      isNATView(c), !isRedirectTarget(r.tuple.src) {
                // The app's view of the SYN-ACK (de-NATed on lo: original destination to the app's own port),
                // with the SYN seen only redirected: through the remapped port, or from the app's own port while
                // another socket on that port held it in `byInitiator`.
                if c.initiator != r.tuple.dst { adoptAppInitiator(c, r.tuple.dst) }
                addView(c, otherEnd: r.tuple.src, key: key)
                return c
            }
        }
        // A view the connection holding these endpoints has not seen: the one it replaced on its tuple, read late
        // (`previousOwner`; retired, the caller places the record on it without the lookups).
        if let holder = bySource ?? byDestination, let previous = previousOwner(of: &r, holder: holder) { return previous }
        return nil
    }

    // A connection seen in one NAT view only: the app's (pre-NAT destination known, no redirect target yet) or the
    // REDIRECTed one (to 127.0.0.1:15001 or the pod's :15006, the original destination not yet known).
    private func isAppView(_ c: ConnectionState) -> Bool { c.natResponder == nil && c.originalKnown }
    private func isNATView(_ c: ConnectionState) -> Bool { c.natResponder != nil && !c.originalKnown }

    /// Whether `c`, found by its SYN in `bySYN`, may still take its other view through a remapped source port: open,
    /// not yet joined so, begun by a SYN, and recent. The ISN makes the match; this keeps it to live connections.
    private func remappable(_ c: ConnectionState) -> Bool {
        !c.emitted && c.mergedInto == nil && c.natInitiator == nil && c.initiatorFromSYN
            && now - c.lastSeenNanos <= 2_000_000_000
    }

    /// Whether a SYN with the ISN of `c`'s first SYN, from the same address, is `c` in the other NAT view: one side is
    /// the app's pre-NAT view, the other the REDIRECTed one. From another port, the kernel changed the source port on
    /// the way (its reply tuple would have clashed with another connection's); from the same port, another socket
    /// took the endpoint in `byInitiator` (Linux shares an ephemeral port between connections to different
    /// destinations: one of ztunnel's, begun between the app's two views).
    private func remappedViewCompatible(_ c: ConnectionState, _ r: PacketRecord) -> Bool {
        guard remappable(c) else { return false }
        // The SYN redirected: c must be the app's view; the SYN the app's: c the redirected view.
        return isRedirectTarget(r.tuple.dst) ? isAppView(c) : isNATView(c)
    }

    /// `c`, first seen through its remapped port, takes the app's own endpoint as its initiator.
    private func adoptAppInitiator(_ c: ConnectionState, _ app: Endpoint) {
        c.natInitiator = c.initiator
        c.initiator = app
        c.timeline.original.src = app
        if !c.retired { byInitiator[InitiatorKey(proto: c.proto, endpoint: app)] = c }
    }

    /// Two connections that are one: the app's view (begun by the reply, say) and the REDIRECTed view through a
    /// remapped source port, whose SYNs carry the same ISN. Nil when they are not that pair.
    private func joinRemappedViews(_ x: ConnectionState, _ y: ConnectionState) -> ConnectionState? {
        // `y` came from the SYN index (a TCP connection begun by its SYN); `x` is the connection this SYN was found on.
        guard x.proto == IPProto.tcp, remappable(y), !x.emitted, x.mergedInto == nil, x.natInitiator == nil,
              x.initiator.addr == y.initiator.addr, x.initiator.port != y.initiator.port else { return nil }
        let app: ConnectionState, nat: ConnectionState
        if isAppView(x) && isNATView(y) { (app, nat) = (x, y) } else if isAppView(y) && isNATView(x) { (app, nat) = (y, x) } else { return nil }
        let appInitiator = app.initiator, appResponder = app.responder
        let natInitiator = nat.initiator, natResponder = nat.natResponder.unsafelyUnwrapped
        let (keep, gone) = x.id < y.id ? (x, y) : (y, x)
        merge(gone, into: keep)
        keep.initiator = appInitiator
        keep.responder = appResponder
        keep.originalKnown = true
        keep.natInitiator = natInitiator
        keep.natResponder = natResponder
        keep.timeline.original = FiveTuple(proto: keep.proto, src: appInitiator, dst: appResponder)
        if !isRedirectWithOriginal(keep.timeline.redirect) {
            keep.timeline.redirect = .redirected(toPort: natResponder.port, originalDestination: appResponder)
        }
        byInitiator[InitiatorKey(proto: keep.proto, endpoint: appInitiator)] = keep
        reconsiderHops(keep)
        return keep
    }

    private func addRemappedView(_ c: ConnectionState, _ r: PacketRecord, key: FlowKey) {
        if r.tuple.src == c.initiator {
            // Not remapped: the same endpoint (`remappedViewCompatible`).
        } else if isRedirectTarget(r.tuple.dst) {
            c.natInitiator = r.tuple.src
        } else {
            adoptAppInitiator(c, r.tuple.src)   // first seen redirected
        }
        addView(c, otherEnd: r.tuple.dst, key: key)
    }

    private func natCompatible(_ c: ConnectionState, otherEnd: Endpoint, _ r: PacketRecord, forward: Bool) -> Bool {
        guard !c.emitted, c.mergedInto == nil else { return false }
        if let closed = c.closedAt, now - closed > options.closeLingerNanos { return false }
        let target = isRedirectTarget(otherEnd)
        // ztunnel's own connections (its mark) are never redirected to it: a redirected view from the endpoint of
        // one is another connection sharing its port (Linux shares an ephemeral port between destinations, and a
        // multiplexed tunnel lives for minutes).
        if target { guard c.natResponder == nil, !c.sawZtunnelMark else { return false } } else { guard !c.originalKnown else { return false } }
        if r.tuple.proto == IPProto.udp {
            return now - c.lastSeenNanos <= 2_000_000_000
        }
        let window: UInt32 = 1 << 30
        if forward {
            if r.tcpFlags.contains(.syn) && !r.tcpFlags.contains(.ack) {
                return c.isnForward == nil ? now - c.lastSeenNanos <= 2_000_000_000 : c.isnForward == r.tcpSeq
            }
            if let isn = c.isnForward { return r.tcpSeq &- isn < window }
            if let isn = c.isnReply, r.tcpFlags.contains(.ack) { return r.tcpAck &- isn &- 1 < window }
        } else {
            if r.tcpFlags.contains(.syn) {
                if let isn = c.isnForward { return r.tcpAck == isn &+ 1 }
                return c.isnReply == nil || c.isnReply == r.tcpSeq
            }
            if let isn = c.isnReply { return r.tcpSeq &- isn < window }
            if let isn = c.isnForward, r.tcpFlags.contains(.ack) { return r.tcpAck &- isn &- 1 < window }
        }
        return now - c.lastSeenNanos <= 2_000_000_000
    }

    private func addView(_ c: ConnectionState, otherEnd: Endpoint, key: FlowKey) {
        c.keys.append(key)
        // A connection whose tuple was reused takes its views late, but not the lookups: they are the new one's (`retire`).
        if !c.retired { table[key] = c }
        if isRedirectTarget(otherEnd) {
            c.natResponder = otherEnd
        } else {
            c.responder = otherEnd
            c.originalKnown = true
            c.timeline.original.dst = otherEnd
        }
        if let nat = c.natResponder, c.timeline.redirect == nil {
            c.timeline.redirect = .redirected(toPort: nat.port, originalDestination: c.originalKnown ? c.responder : nil)
        }
        c.eventsNeedSorting = true
        reconsiderHops(c)
    }

    /// NFULA_CT names both tuples exactly: register both views, merging a view first seen on its own.
    private func applyConntrack(_ ct: ConntrackInfo, to c: ConnectionState) -> ConnectionState {
        c.conntrackApplied = true
        if (ct.mark & options.markMask) == options.ztunnelConnmark { c.sawZtunnelConnmark = true }
        guard ct.isDestinationNATed, ct.original.proto == c.proto else { return c }
        let natForward = ct.reply.reversed
        var target = c
        for view in [ct.original, natForward] {
            let k = FlowKey(view)
            if let other = table[k], other !== target {
                let (keep, gone) = other.id < target.id ? (other, target) : (target, other)
                merge(gone, into: keep)
                target = keep
            } else if table[k] == nil {
                target.keys.append(k)
                table[k] = target
            }
        }
        target.conntrackApplied = true
        target.initiator = ct.original.src
        target.responder = ct.original.dst
        target.originalKnown = true
        target.natResponder = ct.reply.src
        if natForward.src != ct.original.src { target.natInitiator = natForward.src }
        target.timeline.original = ct.original
        if target.timeline.redirect == nil || !isRedirectWithOriginal(target.timeline.redirect) {
            target.timeline.redirect = .redirected(toPort: ct.reply.src.port, originalDestination: ct.original.dst)
        }
        byInitiator[InitiatorKey(proto: ct.original.proto, endpoint: ct.original.src)] = target
        reconsiderHops(target)
        return target
    }

    private func isRedirectWithOriginal(_ a: RuleAction?) -> Bool {
        if case .redirected(_, let o?)? = a { return o.addr.family != .none }
        return false
    }

    private func record(_ r: inout PacketRecord, _ nf: NflogFacts, hitID: UInt32, on c: ConnectionState) {
        let forward = sentByInitiator(&r, of: c)
        var point = r.point
        var factsChanged = false
        if nf.present {
            if point.kind != .netfilter { point = .netfilter(nf.hook) }
            if !c.sawNflog { c.sawNflog = true; factsChanged = true }
        } else if point.kind == .interface && !point.isLoopback, let name = givenInterfaceName, point.interfaceName == .any {
            point.interfaceName = name
        }

        var restoredMark: UInt32? = nil
        if hitID != 0 {
            switch context.actionKind(hitID) {
            case .redirect(let port):
                if !c.sawRedirectHit { c.sawRedirectHit = true; factsChanged = true }
                if !isRedirectWithOriginal(c.timeline.redirect) && forward {
                    c.timeline.redirect = .redirected(toPort: port, originalDestination: r.tuple.dst)
                }
            case .tproxy(let port, let mark):
                // TPROXY leaves the destination as it was: no NAT view tells of it, only the hit.
                if c.timeline.redirect == nil && forward { c.timeline.redirect = .tproxied(toPort: port, mark: mark) }
            case .connmarkRestore:
                // The twin logs the packet before the restore: the mark it gets is the connection's connmark.
                restoredMark = (nf.hasConntrack ? r.nflogFields.conntrack?.mark : nil) ?? (c.sawZtunnelConnmark ? options.ztunnelConnmark : nil)
            case .connmarkSet(let v):
                if !c.timeline.marks.contains(v) { c.timeline.marks.append(v) }
                if (v & options.markMask) == options.ztunnelConnmark && !c.sawZtunnelConnmark {
                    c.sawZtunnelConnmark = true; factsChanged = true
                }
            case .plain:
                break
            }
        }

        let mark = nf.mark
        if let m = mark, m != 0 {
            if !c.timeline.marks.contains(m) { c.timeline.marks.append(m) }
            let masked = m & options.markMask
            if masked == options.ztunnelMark && forward {
                if c.ztunnelMarkFrames.isEmpty { factsChanged = true }
                c.ztunnelMarkFrames.appendBounded(r.ref, limit: 4)
            } else if masked == options.ztunnelConnmark && !c.sawZtunnelConnmark {
                c.sawZtunnelConnmark = true; factsChanged = true
            }
        }

        // Where the packet was: lo, another interface (which way), or a hook.
        switch point.kind {
        case .interface:
            if point.isLoopback {
                if !c.sawLoopback { c.sawLoopback = true; factsChanged = true }
            } else if forward {
                if r.direction == .inbound {
                    if !c.initiatorArrivedFromOutside { c.initiatorArrivedFromOutside = true; factsChanged = true }
                    c.arrivedFrames.appendBounded(r.ref, limit: 8)
                } else {
                    if r.direction == .outbound && !c.initiatorSentLocally { c.initiatorSentLocally = true; factsChanged = true }
                    if c.leftFrames.isEmpty { factsChanged = true }
                    c.leftFrames.appendBounded(r.ref, limit: 8)
                }
            }
        case .netfilter:
            if forward, nf.present {
                let hook = nf.hook
                switch hook {
                case .output, .postrouting:
                    if !c.initiatorSentLocally { c.initiatorSentLocally = true; factsChanged = true }
                    // ifindex 1 is lo in every netns. At OUTPUT the route is the pre-REDIRECT one, so only
                    // POSTROUTING tells where the packet really left.
                    if hook == .postrouting, let out = nf.outputIfindex, out != 1 {
                        if c.leftFrames.isEmpty { factsChanged = true }
                        c.leftFrames.appendBounded(r.ref, limit: 8)
                    } else if hook == .postrouting, nf.outputIfindex == 1, !c.sawLoopback {
                        c.sawLoopback = true; factsChanged = true
                    }
                case .prerouting, .input:
                    if let inIf = nf.inputIfindex {
                        if inIf == 1 {
                            if !c.sawLoopback { c.sawLoopback = true; factsChanged = true }
                        } else if !c.initiatorArrivedFromOutside {
                            c.initiatorArrivedFromOutside = true; factsChanged = true
                            c.arrivedFrames.appendBounded(r.ref, limit: 8)
                        }
                    }
                default: break
                }
            }
        case .unknown:
            break
        }

        // Counters: every event is a packet seen; bytes only from interface captures, since an NFLOG record
        // repeats a packet an interface capture also shows (`-i any` shows a lo packet once, as incoming).
        c.timeline.packets += 1
        if r.selected { c.selected = true }
        if point.kind == .interface {
            c.timeline.bytes &+= UInt64(r.ipLength != 0 ? r.ipLength : r.wireLength)
            if forward { c.payloadForward &+= UInt64(r.payloadLength) } else { c.payloadReply &+= UInt64(r.payloadLength) }
        }
        if r.time < c.timeline.firstSeen { c.timeline.firstSeen = r.time; c.eventsNeedSorting = true }
        // The packet's own time (an interface capture's, or the kernel's stamp on an NFLOG record), not a receipt
        // time: what tells when a connection began, and when its initiator first sent payload.
        if forward && (point.kind == .interface || (r.hasNflog && r.nflogFields.hadKernelTimestamp && r.nflogFields.kernelTime == r.time)) {
            if r.tcpFlags.contains(.syn) && !r.tcpFlags.contains(.ack) && !c.startExact {
                c.startExact = true
                if !c.hopLinks.isEmpty { undoJoinsBeforeStart(of: c) }
            }
            if r.payloadLength > 0 { c.firstForwardDataNanos = min(c.firstForwardDataNanos, r.time.totalNanoseconds) }
        }
        if c.timeline.lastSeen < r.time { c.timeline.lastSeen = r.time } else if r.time < c.timeline.lastSeen { c.eventsNeedSorting = true }
        c.lastSeenNanos = now

        if r.tuple.proto == IPProto.tcp { trackTCP(&r, forward: forward, on: c) }

        if point.kind == .netfilter {
            c.sawNetfilterEvent = true
        } else if point.kind == .interface {
            let t = r.time.totalNanoseconds
            if t < c.interfaceFirstNanos { c.interfaceFirstNanos = t }
            if t > c.interfaceLastNanos { c.interfaceLastNanos = t }
        }
        if c.events.count < options.maxEventsPerConnection {
            if c.events.count == Correlator.firstEventRoom && c.events.capacity < 64 {
                c.events.reserveCapacity(min(64, options.maxEventsPerConnection))
            }
            c.events.append(CompactEvent(
                time: r.time, frame: r.ref, tuple: r.tuple, length: r.ipLength != 0 ? r.ipLength : r.wireLength,
                mark: mark ?? 0, hitID: hitID, restoredMark: restoredMark ?? 0, notes: r.notes,
                ipID: r.ipID, seq: r.tcpSeq, ack: r.tcpAck,
                interfaceIndex: point.kind == .interface ? context.interfaceIndex(point.interfaceName) : 0,
                pointKind: point.kind, hook: point.hook, isLoopback: point.isLoopback, direction: r.direction,
                flags: r.tcpFlags, hasMark: mark != nil, hasRestoredMark: restoredMark != nil, forward: forward))
        } else {
            c.timeline.droppedEvents += 1
            // A long-lived tunnel's later data still counts for relay timing.
            let length = r.ipLength != 0 ? r.ipLength : r.wireLength
            if c.responder.port == options.hbonePort && r.tuple.proto == IPProto.tcp
                && Correlator.isRelayData(pointKind: point.kind, isLoopback: point.isLoopback, flags: r.tcpFlags, length: length, loopback: false) {
                c.keepRelayDatum(RelayDatum(time: r.time.totalNanoseconds, length: length, forward: forward), capacity: options.relayDataKept)
            }
        }

        if factsChanged { reconsiderHops(c) }
    }

    private func trackTCP(_ r: inout PacketRecord, forward: Bool, on c: ConnectionState) {
        let f = r.tcpFlags
        if forward && c.isnForward == nil && !f.contains(.syn) {
            if let low = c.lowestSeqForward {
                if Int32(bitPattern: r.tcpSeq &- low) < 0 { c.lowestSeqForward = r.tcpSeq }
            } else {
                c.lowestSeqForward = r.tcpSeq
            }
        }
        if f.contains(.syn) {
            if f.contains(.ack) {
                if c.isnReply == nil { c.isnReply = r.tcpSeq }
            } else if forward, c.isnForward == nil {
                c.isnForward = r.tcpSeq
                if !c.initiatorFromSYN { c.initiatorFromSYN = true }
                if c.synKey == nil { registerSYN(c, addr: r.tuple.src.addr, isn: r.tcpSeq) }
            }
        }
        if f.contains(.fin) { if forward { c.finForward = true } else { c.finReply = true } }
        if f.contains(.rst) {
            c.reset = true
            if !forward { c.resetByResponder = true }
        } else if !c.pastHandshake && !f.contains(.syn) && (forward ? f.contains(.ack) : r.payloadLength > 0) {
            c.pastHandshake = true
        }
        if !c.timeline.closed && (c.reset || (c.finForward && c.finReply)) {
            // Closed already when its tuple was reused (`retire`), and now its late FIN or RST is read: closed
            // then, and it shows closed.
            markClosed(c)
            c.timeline.closed = true
        }
    }

    /// Once per connection: out of line, so `trackTCP` (every TCP packet) stays small.
    @inline(never)
    private func registerSYN(_ c: ConnectionState, addr: IPAddress, isn: UInt32) {
        let k = SYNKey(addr: addr, isn: isn)
        c.synKey = k
        bySYN[k] = c
    }

    // MARK: - Rule hits

    @inline(__always)
    private func countHit(_ id: UInt32) {
        let i = Int(id)
        if i >= hitCounts.count { hitCounts.append(contentsOf: repeatElement(0, count: i + 1 - hitCounts.count)) }
        hitCounts[i] += 1
    }

    // MARK: - Pod address inference

    private func votePodAddress(_ r: inout PacketRecord, _ nf: NflogFacts) {
        var addr: IPAddress? = nil
        if r.point.kind == .interface && !r.point.isLoopback {
            if r.direction == .outbound { addr = r.tuple.src.addr } else if r.direction == .inbound { addr = r.tuple.dst.addr }
        } else if nf.present, (nf.mark ?? 0) & options.markMask != options.ztunnelMark {
            // ztunnel's packets into the app carry the client's address (IP_TRANSPARENT) and mark 0x539.
            if nf.hook == .output || nf.hook == .postrouting { addr = r.tuple.src.addr }
        }
        guard let a = addr, Correlator.couldBePodAddress(a) else { return }
        podVotes[a, default: 0] += 1
        podVotesTotal += 1
        podInferenceDirty = true
    }

    /// A pod's own address is unicast and routable: not loopback, unspecified, multicast, broadcast or link-local
    /// (a veth's fe80:: address sends neighbour discovery and MLD, and multicast it hears comes in addressed to
    /// ff02::...; counted, either outvoted a pod's IPv6 address in a capture with little other IPv6).
    static func couldBePodAddress(_ a: IPAddress) -> Bool {
        switch a.family {
        case .v4:
            let v = a.v4Value, first = v >> 24
            return first != 0 && first != 127 && first < 224 && (v >> 16) != 0xa9fe
        case .v6:
            let top = a.hi >> 48
            return !(a.hi == 0 && a.lo <= 1) && (top >> 8) != 0xff && (top & 0xffc0) != 0xfe80
        case .none:
            return false
        }
    }

    private func currentInferredPod() -> [IPAddress] {
        if podInferenceDirty {
            podInferenceDirty = false
            var best: [IPAddress.Family: (IPAddress, Int)] = [:]
            for (a, n) in podVotes where n > (best[a.family]?.1 ?? 0) { best[a.family] = (a, n) }
            inferredPod = best.values.map(\.0).sorted()
        }
        return inferredPod
    }

    func isLocal(_ a: IPAddress) -> Bool { isLocal(a, pod: podAddresses) }

    /// `isLocal(_:)` with the pod's addresses already read.
    func isLocal(_ a: IPAddress, pod: [IPAddress]) -> Bool { a.isLoopback || pod.contains(a) }

    func isProbe(_ a: IPAddress) -> Bool { options.probeAddresses.contains(a) }

    /// The initiator is in the pod (the app, or ztunnel's own sockets other than its IP_TRANSPARENT ones).
    func initiatorIsLocal(_ c: ConnectionState) -> Bool { initiatorIsLocal(c, pod: podAddresses) }

    /// `initiatorIsLocal(_:)` with the pod's addresses already read.
    func initiatorIsLocal(_ c: ConnectionState, pod: [IPAddress]) -> Bool {
        if c.initiator.addr.isLoopback { return true }
        if !pod.isEmpty { return pod.contains(c.initiator.addr) }
        return c.initiatorSentLocally && !c.initiatorArrivedFromOutside && !c.sawZtunnelConnmark
    }

    // MARK: - The ztunnel hop

    private func reconsiderHops(_ c: ConnectionState) {
        guard c.proto == IPProto.tcp, !c.emitted, c.mergedInto == nil else { return }
        let roles = candidateRoles(c)
        if roles.contains(.outerOutbound) && !c.pendingRoles.contains(.outerOutbound) {
            c.pendingRoles.insert(.outerOutbound); list(c, .outerOutbound, in: &outerOutbound)
        }
        if roles.contains(.innerOutbound) && !c.pendingRoles.contains(.innerOutbound) {
            c.pendingRoles.insert(.innerOutbound); list(c, .innerOutbound, in: &innerOutbound)
        }
        if roles.contains(.outerInbound) && !c.pendingRoles.contains(.outerInbound) {
            c.pendingRoles.insert(.outerInbound); listInbound(c, .outerInbound, in: &outerInbound, pruneAt: &outerInboundPruneAt)
        }
        if roles.contains(.innerInbound) && !c.pendingRoles.contains(.innerInbound) {
            c.pendingRoles.insert(.innerInbound); listInbound(c, .innerInbound, in: &innerInbound, pruneAt: &innerInboundPruneAt)
        }
        if c.pendingRoles.contains(.outerOutbound) && !c.hasOutboundHop && c.originalKnown && c.outerFiledUnder != c.responder.addr {
            if let old = c.outerFiledUnder { unfile(c, from: old, in: &outerOutboundByAddress) }
            c.outerFiledUnder = c.responder.addr
            file(c, in: &outerOutboundByAddress, asOuter: true)
            filed()
        }
        if c.pendingRoles.contains(.innerOutbound) && !c.hasOutboundHop && c.innerFiledUnder != c.responder.addr {
            if let old = c.innerFiledUnder { unfile(c, from: old, in: &innerOutboundByAddress) }
            c.innerFiledUnder = c.responder.addr
            file(c, in: &innerOutboundByAddress, asOuter: false)
            filed()
        }
        if roles.contains(.outerOutbound) && !c.hasOutboundHop, let (z, ev, conf, n) = identityPartner(for: c, asOuter: true) {
            join(.outbound, outer: c, inner: z, evidence: ev, confidence: conf, candidates: n)
        }
        if roles.contains(.innerOutbound) && !c.hasOutboundHop, let (a, ev, conf, n) = identityPartner(for: c, asOuter: false) {
            join(.outbound, outer: a, inner: c, evidence: ev, confidence: conf, candidates: n)
        }
        if roles.contains(.outerInbound) && !c.hasInboundHop {
            if let (i, ev, conf, n) = bestPartner(for: c, among: &innerInbound, asOuter: true) {
                join(.inbound, outer: c, inner: i, evidence: ev, confidence: conf, candidates: n)
            }
        }
        if roles.contains(.innerInbound) && !c.hasInboundHop {
            if let (h, ev, conf, n) = bestPartner(for: c, among: &outerInbound, asOuter: false) {
                join(.inbound, outer: h, inner: c, evidence: ev, confidence: conf, candidates: n)
            }
        }
    }

    /// The outbound identity join for `c`: among the candidates filed under its address (an app's original
    /// destination is a tunnel's peer), those that began within the hop window of it. Nil for an app whose original
    /// destination is not known (no identity yet).
    ///
    /// Only the window is read, and the list is not pruned for the look (`CandidateList` prunes as it grows), so what
    /// a prune would drop is skipped here instead: the same candidates are weighed either way. A kept tunnel that
    /// ztunnel pools (one stream at a time) has every app connection to its pod filed beside it unjoined until they
    /// are emitted, thousands under load, and when relay timing freed it, or a record changed what it shows, it read
    /// them all, to find none that began within the window of its own start long ago (40 % of the tracer's CPU).
    private func identityPartner(for c: ConnectionState, asOuter: Bool) -> (ConnectionState, [HopEvidence], Confidence, Int)? {
        if asOuter && !c.originalKnown { return nil }
        let key = c.responder.addr
        // An app connection looks among the tunnels, a tunnel among the app connections.
        guard let list = asOuter ? innerOutboundByAddress[key] : outerOutboundByAddress[key] else { return nil }
        // `beganAsIfOpenedFor`'s window: the tunnel began from `hopSlackNanos` before the app's connection to
        // `hopWindowNanos` after it; and not before the prune's horizon.
        let from = asOuter ? c.firstSeenNanos - options.hopSlackNanos : c.firstSeenNanos - options.hopWindowNanos
        let to = asOuter ? c.firstSeenNanos + options.hopWindowNanos : c.firstSeenNanos + options.hopSlackNanos
        let horizon = candidateHorizon
        var strongest: ConnectionState?, strong = 0
        var i = list.lowerBound(max(from, horizon))
        while i < list.entries.count {
            let e = list.entries[i]
            i += 1
            guard e.first <= to else { break }
            let p = e.conn
            // What a prune drops is skipped (the horizon is the window's lower bound already).
            guard p !== c, isLiveCandidate(p, filedUnder: key, asOuter: !asOuter, horizon: horizon) else { continue }
            let outer = asOuter ? c : p, inner = asOuter ? p : c
            guard outer.originalKnown, inner.responder.addr == outer.responder.addr,
                  mayBeOpenedFor(outer: outer, inner: inner, joining: c, direction: .outbound),
                  identityMatches(outer: outer, inner: inner, direction: .outbound) else { continue }
            strong += 1
            // The earliest; of equals, the first listed (the full list's order).
            if strongest.map({ p.firstSeenNanos < $0.firstSeenNanos
                || (p.firstSeenNanos == $0.firstSeenNanos && listed(p, asOuter: !asOuter) < listed($0, asOuter: !asOuter)) }) ?? true {
                strongest = p
            }
        }
        guard let strongest else { return nil }
        // No evidence yet (`bestPartner`).
        return (strongest, [], .low, strong)
    }

    private func listed(_ c: ConnectionState, asOuter: Bool) -> Int { asOuter ? c.outerListed : c.innerListed }

    /// Appends `c` to a full outbound candidate list, stamping the order (`ConnectionState.outerListed`).
    private func list(_ c: ConnectionState, _ role: HopRoles, in list: inout [ConnectionState]) {
        list.append(c)
        listings += 1
        if role == .outerOutbound {
            c.outerListed = listings
            appsByStart.add(c, stamp: listings) { waiting($0, asOuter: true) }
        } else if role == .innerOutbound {
            c.innerListed = listings
            tunnelsByStart.add(c, stamp: listings) { waiting($0, asOuter: false) }
        }
    }

    /// Appends `c` to an inbound candidate list, and prunes the list when it has doubled since it last was. Otherwise
    /// only a look from the other side prunes it (`bestPartner`), and a pod that gets connections from outside but no
    /// ztunnel leg into it (a capture of one side, a flood of SYNs) kept every one of them, emitted or not, to the end.
    private func listInbound(_ c: ConnectionState, _ role: HopRoles, in list: inout [ConnectionState], pruneAt: inout Int) {
        self.list(c, role, in: &list)
        guard list.count >= pruneAt else { return }
        pruneCandidates(&list, outbound: false)
        pruneAt = max(64, 2 * list.count)
    }

    /// Files `c` under its address (`responder`) in the outbound index, at its place by when it began. It is not
    /// there: an entry goes when its connection leaves the address (`unfile`) or is dropped by pruning (which
    /// unfiles it). Looking first cost a scan of the address's list per filing, and under a service VIP that list
    /// holds every connection waiting to be emitted (6 % of the tracer's CPU under a VIP load). The list is pruned
    /// when it has doubled since it was last (not at every look): an entry costs a prune once, not once per look.
    private func file(_ c: ConnectionState, in index: inout [IPAddress: CandidateList], asOuter: Bool) {
        let key = c.responder.addr
        index[key, default: CandidateList()].insert(c)
        if index[key]!.entries.count >= index[key]!.pruneAt {
            let horizon = candidateHorizon
            index[key]!.prune { p in unfileUnlessLive(p, filedUnder: key, asOuter: asOuter, horizon: horizon) }
        }
    }

    /// Takes `c`'s entry out from under an address it no longer has (rare: its original destination learned anew).
    private func unfile(_ c: ConnectionState, from key: IPAddress, in index: inout [IPAddress: CandidateList]) {
        index[key]?.remove(c)
        if index[key]?.entries.isEmpty == true { index[key] = nil }
    }

    /// One more filing; every so often every candidate list is pruned, the index's and the full ones (which no join
    /// scans now), so none grows with lists nobody looks at (the start-order indexes compact themselves). Called
    /// after `file`, once its access to the index has ended (this prunes the list filed into too).
    private func filed() {
        filings += 1
        guard filings >= pruneAllAt else { return }
        let kept = pruneAll(&outerOutboundByAddress, asOuter: true) + pruneAll(&innerOutboundByAddress, asOuter: false)
        pruneCandidates(&outerOutbound, outbound: true)
        pruneCandidates(&innerOutbound, outbound: true)
        filings = 0
        pruneAllAt = max(4096, 2 * (kept + outerOutbound.count + innerOutbound.count))
    }

    /// Prunes every list of one side of the outbound index, drops the empty ones; returns how many entries are left.
    private func pruneAll(_ index: inout [IPAddress: CandidateList], asOuter: Bool) -> Int {
        var kept = 0
        let horizon = candidateHorizon
        for key in Array(index.keys) {
            index[key]!.prune { p in unfileUnlessLive(p, filedUnder: key, asOuter: asOuter, horizon: horizon) }
            let n = index[key]!.entries.count
            if n == 0 { index[key] = nil }
            kept += n
        }
        return kept
    }

    private func candidateRoles(_ c: ConnectionState) -> HopRoles {
        var roles: HopRoles = []
        if isProbe(c.initiator.addr) || isProbe(c.responder.addr) { return roles }
        let local = initiatorIsLocal(c)
        if let nat = c.natResponder {
            if nat.port == options.outboundCapturePort { roles.insert(.outerOutbound) }
            if nat.port == options.inboundPlaintextPort { roles.insert(.outerInbound) }
            return roles
        }
        if local {
            if !c.responder.addr.isLoopback && !isLocal(c.responder.addr)
                && (c.sawZtunnelMark || c.responder.port == options.hbonePort) {
                roles.insert(.innerOutbound)
            }
        } else if !c.initiator.addr.isLoopback {
            if c.initiatorArrivedFromOutside && !c.sawLoopback {
                roles.insert(.outerInbound)
            } else if c.sawLoopback || c.sawZtunnelMark || c.sawZtunnelConnmark {
                // On lo with a foreign source address: only ztunnel's IP_TRANSPARENT sockets send those.
                if !c.initiatorArrivedFromOutside { roles.insert(.innerInbound) }
            }
        }
        return roles
    }

    /// The inbound join for `c`: among the other side's candidates (`identityPartner` is the outbound one).
    private func bestPartner(for c: ConnectionState, among list: inout [ConnectionState],
                             asOuter: Bool) -> (ConnectionState, [HopEvidence], Confidence, Int)? {
        pruneCandidates(&list, outbound: false)
        // Counted as they are met, not gathered into arrays (two allocations and a retain per candidate, for
        // every connection that may be one side of a hop).
        var strongest: ConnectionState?, strong = 0
        for p in list where p !== c && !p.emitted && p.mergedInto == nil {
            let outer = asOuter ? c : p, inner = asOuter ? p : c
            // Only an identity match joins here, and that needs the addresses to agree: checked first.
            guard inner.initiator.addr == outer.initiator.addr,
                  mayBeOpenedFor(outer: outer, inner: inner, joining: c, direction: .inbound) else { continue }
            if identityMatches(outer: outer, inner: inner, direction: .inbound) {
                strong += 1
                // The earliest; of equals, the first met.
                if strongest.map({ p.firstSeenNanos < $0.firstSeenNanos }) ?? true { strongest = p }
            }
        }
        guard let strongest else { return nil }
        // No evidence yet: a hop's evidence and confidence are worked out when the first of its connections is
        // emitted (`emit`), once the late NFLOG batches are in; wording them here for every join was wasted.
        return (strongest, [], .low, strong)
    }

    /// Whether `inner` may have been opened for `outer` (`c`, the connection looking, is one of them), by what both
    /// show apart from identity: neither joined already, the order and time they began in, the tunnel still open.
    private func mayBeOpenedFor(outer: ConnectionState, inner: ConnectionState, joining c: ConnectionState,
                                direction: ZtunnelHop.Direction) -> Bool {
        if direction == .outbound ? (outer.hasOutboundHop && outer !== c) || (inner.hasOutboundHop && inner !== c)
                                  : (outer.hasInboundHop && outer !== c) || (inner.hasInboundHop && inner !== c) { return false }
        return beganAsIfOpenedFor(outer: outer, inner: inner, direction: direction)
    }

    /// `mayBeOpenedFor` without its first rule (neither joined already).
    private func beganAsIfOpenedFor(outer: ConnectionState, inner: ConnectionState, direction: ZtunnelHop.Direction) -> Bool {
        let dt = inner.firstSeenNanos - outer.firstSeenNanos
        guard dt >= -options.hopSlackNanos && dt <= options.hopWindowNanos else { return false }
        // The slack is for times stamped on receipt; with the outer start exact, the order is the kernel's.
        guard inCausalOrder(outer: outer, inner: inner, direction: direction) else { return false }
        // A tunnel that had closed before the connection it would carry began carried none of it (within the
        // slack, a tunnel freed by relay timing looked again and took a connection 450 ms younger than it).
        let tunnel = direction == .outbound ? inner : outer, carried = direction == .outbound ? outer : inner
        if let closed = tunnel.closedAt, closed < carried.firstSeenNanos { return false }
        // A tunnel first seen mid-stream before the app's connection began was not opened for it: if it carried
        // it, it was pooled (`pooledTunnel`, tried at emission, says so instead of timing). Nor was one first
        // seen mid-stream after a connection whose SYN the capture has: it was open before the capture began
        // (a live trace started while ztunnel's pooled tunnel sat idle sees it first with the bytes it carries).
        if direction == .outbound && !inner.initiatorFromSYN && (dt < 0 || outer.initiatorFromSYN) { return false }
        // Inbound likewise: an HBONE tunnel into the pod seen mid-stream, carrying a connection into the app whose
        // SYN was captured, was there before it.
        if direction == .inbound && outer.responder.port == options.hbonePort && !outer.initiatorFromSYN
            && inner.initiatorFromSYN { return false }
        return true
    }

    /// The tunnel an app connection with no identity match went through (it dialled a service VIP, which ztunnel
    /// resolved to an endpoint: no tunnel names the VIP): the earliest connection carrying ztunnel's mark (a tunnel to
    /// a pod's :15008, or a passthrough to an endpoint outside the mesh) that no app explains and that began while the
    /// app's connection ran (within `vipSkewNanos` either side: times
    /// stamped on receipt; for one still open, any since it began), and how many such tunnels there were. Tried only
    /// when the app's connection is emitted, so its own tunnel had every chance to show up, after the identity and
    /// pooled joins, and with the connections that began before it choosing first (`lastChanceJoins`): ztunnel opens
    /// their tunnels in the order it accepted them. One that began after the app's connection had ended cannot have
    /// carried it. A process forging ztunnel's mark while such a connection is open may be taken for its passthrough:
    /// the count of unexplained marked connections stays right, the one flagged may be the wrong one.
    private func vipTunnel(for c: ConnectionState) -> (ConnectionState, Int)? {
        // First seen mid-stream, it began before the capture: when, and so which tunnel ztunnel opened after it, the
        // order cannot tell (a tunnel open before the capture, pooled, is for `pooledTunnel`). Taking the first new
        // tunnel after it was seen took another connection's: a long-lived connection to a VIP, open when a live trace
        // started, shifted every later VIP join by one (41 % right instead of 90 %).
        guard c.initiatorFromSYN else { return nil }
        let (from, to) = vipWindow(of: c)
        var chosen: ConnectionState?, count = 0
        var i = tunnelsByStart.lowerBound(from)
        while i < tunnelsByStart.entries.count, tunnelsByStart.entries[i].first <= to {
            let e = tunnelsByStart.entries[i]
            i += 1
            let p = e.conn
            // A tunnel to a pod's :15008, or a passthrough: ztunnel's own connection to an endpoint outside the mesh
            // (a service whose pods are not in ambient yet), marked as its tunnels are.
            guard p !== c, waiting(e, asOuter: false), p.sawZtunnelMark, !began(p, afterTheEndOf: c),
                  mayBeOpenedFor(outer: c, inner: p, joining: c, direction: .outbound) else { continue }
            count += 1
            // The earliest by when it began (of equals, the first listed): entries are in the order their first
            // records came in.
            if chosen.map({ p.startedNanos < $0.startedNanos }) ?? true { chosen = p }
        }
        return chosen.map { ($0, count) }
    }

    /// The start times (`firstSeenNanos`) of the tunnels `vipTunnel` may take for `c`: from `vipSkewNanos` before it
    /// began; until it has closed, any since (its last packet so far may be the request it waits on), then up to
    /// `vipSkewNanos` after its last packet; never more than the hop window after it began (`mayBeOpenedFor`).
    private func vipWindow(of c: ConnectionState) -> (from: Int64, to: Int64) {
        let end = c.closedAt != nil ? c.lastSeenNanos + Correlator.vipSkewNanos : .max
        return (c.firstSeenNanos - Correlator.vipSkewNanos, min(end, c.firstSeenNanos + options.hopWindowNanos))
    }

    /// Whether `p` began after `c` had ended: `c` closed, and `p`'s SYN, at the packet's own time, came after `c`'s
    /// last packet. Such a tunnel did not carry it. Both on the packets' clock: `c` closed, its last record's time is
    /// no earlier than its FIN or RST (an NFLOG record stamped on receipt is late, not early), where the correlator's
    /// clock when that record came (`lastSeenNanos`) may run ahead of it by an NFLOG flush or more. (Not its last
    /// packet captured on an interface: a closing record may come from NFLOG before the capture's copies of the
    /// packets before it; tried so, the mixed-service live test failed 23 runs in 45.)
    private func began(_ p: ConnectionState, afterTheEndOf c: ConnectionState) -> Bool {
        c.closedAt != nil && p.startExact && p.timeline.firstSeen > c.timeline.lastSeen
    }

    /// For a VIP connection that ended with no tunnel left for it (`vipTunnel` found none): one that began while it
    /// ran but went, by the order, to a connection that began before it, when that connection can take another
    /// unexplained one instead. The order alone chose: ztunnel opened the two tunnels the other way round (a
    /// connection that began later and ended sooner, its tunnel opened first), and left so, the tunnel opened last
    /// read as a forged mark and this connection went to some pooled tunnel. Returns that tunnel, the count
    /// `vipTunnel` would give, and the connection it was taken from (already joined to its other one).
    private func vipExchange(for c: ConnectionState) -> (ConnectionState, Int, ConnectionID)? {
        guard c.initiatorFromSYN, c.closedAt != nil else { return nil }
        let (from, to) = vipWindow(of: c)
        var i = tunnelsByStart.lowerBound(from)
        while i < tunnelsByStart.entries.count, tunnelsByStart.entries[i].first <= to {
            let e = tunnelsByStart.entries[i]
            i += 1
            let p = e.conn
            guard p !== c, isCurrent(e, asOuter: false), p.sawZtunnelMark, p.hopLinks.count == 1, let link = p.hopLinks.first,
                  link.byStartOrder, link.outer !== c, !link.outer.emitted, link.outer.startedNanos < c.startedNanos,
                  !began(p, afterTheEndOf: c) else { continue }
            // Joined, it is no candidate for `mayBeOpenedFor`; the other connection's own look (`vipTunnel`) does
            // not see it, so cannot take it again.
            guard beganAsIfOpenedFor(outer: c, inner: p, direction: .outbound),
                  let (other, n) = vipTunnel(for: link.outer) else { continue }
            let earlier = link.outer
            unlink(link)
            join(.outbound, outer: earlier, inner: other, evidence: [], confidence: .low, candidates: n).byStartOrder = true
            // Its count: this tunnel, and the other connection's new one when it too began while this one ran.
            let alsoMine = other.firstSeenNanos <= to && !began(other, afterTheEndOf: c)
            return (p, alsoMine ? 2 : 1, earlier.id)
        }
        return nil
    }

    /// A marked connection of ztunnel's out of the pod (a tunnel, a passthrough) still explained by no app connection
    /// as it is emitted, after every join of its batch: before it reads as a forged mark, the joins by the order
    /// (`vipTunnel`, a service VIP's) move along a chain. It goes to a connection that could have been carried by it
    /// (the VIP rule's window and its causal rules), whose tunnel goes to another, and so on, to a connection with no
    /// tunnel opened for it (none, or a pooled one whose tunnel keeps another connection). Why: the order shifts when
    /// ztunnel's thread for one connection starves for milliseconds (its tunnel opens after later connections'), each
    /// connection after takes the next one's tunnel, and the last of the shift goes to a pooled tunnel or none; the
    /// tunnel it left then read as a forged mark on a healthy pod (3 of 120 runs of the VIP live test, debug build).
    /// Only joins by the order move, only connections not yet emitted, and only while each one stays plausible by
    /// the rules it was made by; at most `orderChainSteps` moves and `orderChainLooks` candidates looked at, so a
    /// process forging the mark costs a bounded search. Such a process's connection, begun while a VIP connection
    /// without a tunnel of its own ran, is taken for that connection's: as with `vipTunnel`, the count of
    /// unexplained marked connections stays right when there are more of them than such VIP connections.
    private func explainByOrderChain(_ t: ConnectionState) {
        guard !t.emitted, t.mergedInto == nil, t.sawZtunnelMark, !t.hasOutboundHop, t.initiatorFromSYN,
              t.pendingRoles.contains(.innerOutbound), initiatorIsLocal(t) else { return }
        if !chainAppsListed {
            // The app connections not yet emitted (the start-order index drops joined ones from its front, and these
            // are mostly joined), in the order they began, so that of equals the first to begin is taken.
            for c in open where c.pendingRoles.contains(.outerOutbound) && c.mergedInto == nil && c.initiatorFromSYN {
                chainApps.append(c)
            }
            chainApps.sort { ($0.firstSeenNanos, $0.id) < ($1.firstSeenNanos, $1.id) }
            chainWindows = SpanIndex()
            for (k, c) in chainApps.enumerated() {
                let (from, to) = vipWindow(of: c)
                chainWindows.add(k, began: from, closed: to)
                chainWindowFrom.append(from)
                chainWindowTo.append(to)
            }
            chainWindows.sort()
            chainAppsListed = true
            chainMayEnd = chainApps.contains(where: mayEndAChain)
        }
        // Under a steady VIP load every app connection has its tunnel: each forged mark's search would go through its
        // neighbourhood for an end that is not there.
        guard chainMayEnd else { return }
        chainLooks = 0
        guard let path = orderChain(from: t) else { return }
        for (a, _) in path {
            while let link = carriedLink(of: a, outbound: true) { unlink(link) }
        }
        // The joins moved: what led nowhere may lead somewhere now.
        chainVisited.removeAll(keepingCapacity: true)
        defer { chainMayEnd = chainApps.contains(where: mayEndAChain) }
        for (a, tunnel) in path {
            // Not one of a count of candidates (its evidence says it moved along a chain); 2 so that no rule reads
            // it as the only one.
            let link = join(.outbound, outer: a, inner: tunnel, evidence: [], confidence: .low, candidates: 2)
            link.byStartOrder = true
            link.chain = path.count
        }
    }

    /// `explainByOrderChain` for each connection of a batch about to be emitted; the candidate app connections are
    /// listed once for the batch (only if some tunnel needs them) and dropped after it, so no connection outlives its
    /// emission through them.
    private func explainByOrderChains(_ batch: [ConnectionState]) {
        chainAppsListed = false
        // One visited set for the batch's searches: an app connection a failed search went through leads to no end
        // until a join moves (the augmenting-path argument), so the next search does not go through it again, and
        // a process forging the mark on many connections costs about one search a batch, not one each.
        chainVisited.removeAll(keepingCapacity: true)
        for c in batch { explainByOrderChain(c) }
        chainApps.removeAll(keepingCapacity: true)
        chainWindowFrom.removeAll(keepingCapacity: true)
        chainWindowTo.removeAll(keepingCapacity: true)
    }

    /// The moves that explain tunnel `t` (`explainByOrderChain`): each an app connection and the tunnel it takes,
    /// the last one's connection without a tunnel opened for it. A depth-first search over `chainStep`'s choices,
    /// kept on an explicit stack rather than the thread's: a chain of `orderChainSteps` recursive calls took more
    /// than 512 KB of stack in the debug build, and the live reader's thread has 1 MB (`NetnsThread.stackSize`).
    private func orderChain(from t: ConnectionState) -> [(ConnectionState, ConnectionState)]? {
        // levels[k]: a tunnel to explain and the moves left to try for it, the closest last; moved[k]: the connection
        // taking levels[k]'s tunnel, its own tunnel levels[k + 1]'s.
        var levels: [(tunnel: ConnectionState, moves: [(ConnectionState, HopLink)])] = []
        var moved: [ConnectionState] = []
        var tunnel = t
        // Cut off by a bound (`orderChainSteps`, `orderChainLooks`), a failed search did not go all the way through
        // what it visited: a later one, starting nearer an end, may, so it forgets it.
        var cut = false
        while true {
            if levels.count < Correlator.orderChainSteps {
                guard let (end, moves) = chainStep(for: tunnel) else {
                    chainVisited.removeAll(keepingCapacity: true)
                    return nil
                }
                if let end { return zip(moved, levels.map(\.tunnel)).map { ($0, $1) } + [(end, tunnel)] }
                levels.append((tunnel, moves.reversed()))
            } else {
                // Cut off here, not gone through: a shallower path may still go through it.
                chainVisited.remove(ObjectIdentifier(moved.removeLast()))
                cut = true
            }
            // The next move: the closest untried one at the deepest level that has one, of the connections no
            // search went through since that level was listed.
            var next: (ConnectionState, HopLink)?
            while next == nil, !levels.isEmpty {
                if let move = levels[levels.count - 1].moves.popLast() {
                    if !chainVisited.contains(ObjectIdentifier(move.0)) { next = move }
                } else {
                    levels.removeLast()
                    if !moved.isEmpty { moved.removeLast() }
                }
            }
            guard let (a, link) = next else {
                if cut { chainVisited.removeAll(keepingCapacity: true) }
                return nil
            }
            chainVisited.insert(ObjectIdentifier(a))
            moved.append(a)
            tunnel = link.inner
        }
    }

    /// Whether app connection `a` could end a chain (`chainStep`'s `endsHere`, whatever the tunnel): it has no tunnel
    /// opened for it (none, or a pooled one).
    private func mayEndAChain(_ a: ConnectionState) -> Bool {
        guard let link = carriedLink(of: a, outbound: true) else { return true }
        return link.pooled
    }

    /// One step of `orderChain` for tunnel `t`: of the connections it could have carried, one without a tunnel opened
    /// for it (the chain ends there), else those with a join by the order, whose tunnel then needs another
    /// connection, the closest first: of equals, the one that began last before `t` (ztunnel connects on as it
    /// accepts). Nil when the search has looked at `orderChainLooks` connections.
    private func chainStep(for t: ConnectionState) -> (end: ConnectionState?, moves: [(ConnectionState, HopLink)])? {
        orderChainStepsInAll += 1
        var end: (ConnectionState, Int64)?, moves: [(ConnectionState, HopLink, Int64)] = []
        let tBegan = t.startedNanos
        chainWindows.openDuring(t.firstSeenNanos, t.firstSeenNanos, began: chainWindowFrom, closed: chainWindowTo, into: &chainNear)
        for k in chainNear {
            let a = chainApps[k]
            chainLooks += 1
            guard chainLooks <= Correlator.orderChainLooks else { return nil }
            guard !a.emitted, !chainVisited.contains(ObjectIdentifier(a)), !began(t, afterTheEndOf: a),
                  beganAsIfOpenedFor(outer: a, inner: t, direction: .outbound) else { continue }
            // How far before the tunnel it began (later than the tunnel: after every one that began before it).
            let gap = tBegan >= a.startedNanos ? tBegan - a.startedNanos : Int64.max / 2 + (a.startedNanos - tBegan)
            let link = carriedLink(of: a, outbound: true)
            if let link, identityMatches(outer: a, inner: link.inner, direction: .outbound) { continue }
            let endsHere: Bool
            if let link, link.pooled {
                // Off a pooled tunnel only when that tunnel keeps a connection (or never listed this one), and not
                // once the tunnel is printed (it may have listed this one as carried).
                let tunnel = link.inner
                endsHere = !tunnel.emitted && (!tunnel.hopLinks.contains { $0 === link }
                    || tunnel.hopLinks.contains { $0 !== link && $0.hop.direction == .outbound })
            } else {
                endsHere = link == nil
            }
            if endsHere {
                if end.map({ gap < $0.1 }) ?? true { end = (a, gap) }
            } else if let link, !link.pooled, link.byStartOrder, !link.inner.emitted {
                moves.append((a, link, gap))
            }
        }
        if let end { return (end.0, []) }
        moves.sort { ($0.2, $0.0.id) < ($1.2, $1.0.id) }
        return (nil, moves.map { ($0.0, $0.1) })
    }

    /// The tunnel a connection with no hop of its own went through when ztunnel reused one it had open (HBONE
    /// connections are pooled per destination): an open connection to the HBONE port that started before this
    /// connection, was not closed before it began, carried packets after it began, and names the same peer: outbound,
    /// ztunnel's tunnel from the pod to the app's original destination address; inbound, a tunnel into the pod's
    /// HBONE port from the client address ztunnel's connection into the app carries. Returns the newest such tunnel
    /// and how many there were. Tried only when the connection is emitted without a hop, so a tunnel opened for it
    /// always wins over a pooled one. `anyPeer` (outbound): a marked tunnel to any peer, for an app connection to a
    /// service VIP, which no tunnel names.
    private func pooledTunnel(for c: ConnectionState, outbound: Bool, excluding: ConnectionState? = nil,
                              anyPeer: Bool = false) -> (ConnectionState, Int)? {
        guard c.proto == IPProto.tcp, !outbound || c.originalKnown else { return nil }
        let start = c.firstSeenNanos
        var chosen: ConnectionState?
        var count = 0
        for i in tunnels.indices where tunnelBegan[i] <= start && tunnelClosed[i] >= start {
            let p = tunnels[i]
            guard p !== c && p !== excluding && !p.emitted && p.mergedInto == nil else { continue }
            // Begun before the connection: seen so, or seen only mid-stream (open before the capture began) while
            // the connection's own SYN was captured, or both seen only mid-stream (both open before the capture: which
            // was seen first says nothing).
            let bothBeforeCapture = !p.initiatorFromSYN && !c.initiatorFromSYN
            guard p.responder.port == options.hbonePort, p.lastSeenNanos >= start,
                  p.firstSeenNanos <= start || (!p.initiatorFromSYN && c.initiatorFromSYN) || bothBeforeCapture else { continue }
            if let closed = p.closedAt, closed < start { continue }
            if outbound {
                guard anyPeer ? p.sawZtunnelMark : p.responder.addr == c.responder.addr, initiatorIsLocal(p) else { continue }
                // A connection open before the capture began went through a tunnel open before it too, not through
                // one the capture saw open: under a VIP load that would be another connection's, and every join after
                // it would shift by one.
                if anyPeer && !c.initiatorFromSYN && p.initiatorFromSYN { continue }
            } else {
                guard p.initiator.addr == c.initiator.addr, !initiatorIsLocal(p) else { continue }
            }
            count += 1
            if chosen.map({ p.firstSeenNanos > $0.firstSeenNanos }) ?? true { chosen = p }
        }
        return chosen.map { ($0, count) }
    }

    // MARK: - Relay timing

    /// Which of several open tunnels carried a connection. ztunnel pools HBONE connections, so a connection may have
    /// gone through any tunnel to its peer that was open while it ran; the joins above take the earliest new tunnel
    /// or the newest open one, and under concurrency that was the wrong one nearly every time (a pooled connection
    /// took the next new tunnel, whose own connection took the next, and so on). What tells them apart is relay
    /// timing: ztunnel writes a connection's bytes into the tunnel that carries them within a few hundred µs of
    /// reading them, in a packet at least as long, and a reply back out of it likewise. For the carried connections
    /// of a batch with more than one candidate tunnel, every data packet is paired with at most one tunnel packet,
    /// shortest gaps first, so a tunnel packet that another connection's packet explains better is not counted for
    /// both; each connection then goes to the tunnel that matched most of its packets (of equals, the smaller total
    /// gap), and that tunnel's matched packets stay claimed for later batches. Run at emission, once per connection,
    /// from the events already kept: nothing is added to the per-packet path.
    private func relinkByRelayTiming(_ batch: [ConnectionState]) {
        // The connections that may have been carried, and the span of their lives.
        var wanted: [(leg: ConnectionState, outbound: Bool)] = []
        var from = Int64.max, to = Int64.min
        for c in batch where !c.emitted && c.mergedInto == nil && c.proto == IPProto.tcp {
            if c.pendingRoles.contains(.outerOutbound) && c.originalKnown { wanted.append((c, true)) }
            else if c.pendingRoles.contains(.innerInbound) { wanted.append((c, false)) }
            else { continue }
            from = min(from, c.firstSeenNanos)
            to = max(to, c.lastSeenNanos)
        }
        guard !wanted.isEmpty else { return }
        // ztunnel's passthroughs (a service with endpoints outside the mesh) that connections of the batch are joined to
        // by the order alone: with a tunnel that carries several connections, the connections that went through it
        // opened nothing, and the order gave them the passthroughs of connections that began with them.
        var passthroughs: [ConnectionState] = []
        for (c, outbound) in wanted where outbound {
            if let link = carriedLink(of: c, outbound: true), link.byStartOrder, isPassthrough(link.inner), !link.inner.emitted,
               !identityMatches(outer: c, inner: link.inner, direction: .outbound) {
                passthroughs.append(link.inner)
            }
        }
        // One walk of the tunnel list per batch (a busy capture keeps ~1500 lingering ones), grouping those open in
        // that span by their far end: the peer outbound, the client inbound.
        var byPeer: [IPAddress: SpanIndex] = [:], byClient: [IPAddress: SpanIndex] = [:]
        var near = 0
        for i in tunnels.indices where tunnelBegan[i] <= to && tunnelClosed[i] >= from {
            let t = tunnels[i]
            guard !t.emitted, t.mergedInto == nil, t.responder.port == options.hbonePort else { continue }
            near += 1
            if initiatorIsLocal(t) {
                byPeer[t.responder.addr, default: SpanIndex()].add(i, began: tunnelBegan[i], closed: tunnelClosed[i])
            } else {
                byClient[t.initiator.addr, default: SpanIndex()].add(i, began: tunnelBegan[i], closed: tunnelClosed[i])
            }
        }
        guard near > 0 else { return }
        for k in byPeer.keys { byPeer[k]!.sort() }
        for k in byClient.keys { byClient[k]!.sort() }
        var during: [Int] = []
        var legs: [(leg: ConnectionState, outbound: Bool, tunnels: [Int])] = []
        var candidates: [ConnectionState] = []
        var candidateIndex: [ObjectIdentifier: Int] = [:]
        func candidate(_ t: ConnectionState) -> Int {
            if let k = candidateIndex[ObjectIdentifier(t)] { return k }
            candidateIndex[ObjectIdentifier(t)] = candidates.count
            candidates.append(t)
            return candidates.count - 1
        }
        // Every peer's tunnels, for a service VIP's connections when passthroughs are in play (below).
        let anyPeer = passthroughs.isEmpty ? [] : Array(byPeer.values)
        for (c, outbound) in wanted {
            let current = carriedLink(of: c, outbound: outbound)
            // Printed with the tunnel, the join stands.
            if let current, tunnelOf(current).emitted { continue }
            var mine: [Int] = []
            // The tunnels it may have gone through, by the index of their far end's.
            let open: [SpanIndex]
            var markedOnly = false
            if !passthroughs.isEmpty, outbound, byPeer[c.responder.addr] == nil, c.initiatorFromSYN, let current,
               !identityMatches(outer: c, inner: current.inner, direction: .outbound) {
                // A service VIP's connection, joined, in a batch with passthroughs joined by the order: the
                // passthroughs that could have been opened for it and the marked tunnels to any peer open while it
                // ran, each passthrough packet paired with one connection's (a plain copy relays within
                // microseconds). One with no join keeps to the tunnels' rule below.
                let window = vipWindow(of: c)
                for p in passthroughs where p.firstSeenNanos >= window.from && p.firstSeenNanos <= window.to
                    && !began(p, afterTheEndOf: c) && beganAsIfOpenedFor(outer: c, inner: p, direction: .outbound)
                    && !mine.contains(where: { candidates[$0] === p }) {
                    mine.append(candidate(p))
                }
                open = anyPeer
                markedOnly = true
            } else {
                // Outbound, the tunnels to the app's original destination; for a service VIP, which no tunnel goes to
                // (ztunnel resolved it to a pod), the tunnels to the pod its tunnel goes to.
                let peer = outbound && byPeer[c.responder.addr] == nil ? current.map { $0.inner.responder.addr } : c.responder.addr
                guard let one = outbound ? peer.flatMap({ byPeer[$0] }) : byClient[c.initiator.addr] else { continue }
                // Joined to a passthrough connection, or inbound to a plaintext one (15006): no tunnel to choose.
                if let current, tunnelOf(current).responder.port != options.hbonePort { continue }
                open = [one]
            }
            for index in open {
                index.openDuring(c.firstSeenNanos, c.lastSeenNanos, began: tunnelBegan, closed: tunnelClosed, into: &during)
                for i in during where tunnels[i] !== c && (!markedOnly || tunnels[i].sawZtunnelMark) && openByPacketTime(i, during: c) {
                    mine.append(candidate(tunnels[i]))
                }
            }
            // The tunnel (or passthrough) it is joined to now is one too, open during its life or not: a fresh join may
            // have taken a tunnel opened after it ended (its own was taken by another connection, and a later one came
            // within the hop window); carrying nothing while it ran, that one loses to the tunnel that did.
            if let current {
                let t = tunnelOf(current)
                if t.tunnelIndex >= 0 || isPassthrough(t), !mine.contains(where: { candidates[$0] === t }) { mine.append(candidate(t)) }
            }
            if mine.count >= 2 { legs.append((c, outbound, mine)) }
        }
        guard !legs.isEmpty else { return }
        func passthroughsAmong(_ ks: [Int]) -> Int { passthroughs.isEmpty ? 0 : ks.reduce(0) { $0 + (isPassthrough(candidates[$1]) ? 1 : 0) } }

        let pairing = pairRelays(legs: legs, candidates: candidates, from: from, to: to)
        let carriedFrom = pairing.carriedFrom, pairings = pairing.pairings, relayed = pairing.relayed
        let pairedTo = pairing.pairedTo, packets = pairing.packets, blind = pairing.blind, votes = pairing.votes

        // Each leg's choice: the tunnel that matched most of its packets (of equals, the smaller total gap).
        var choices: [RelayChoice] = []
        for (li, l) in legs.enumerated() {
            var best: Int?
            for k in l.tunnels {
                guard let v = votes[li * candidates.count + k] else { continue }
                if let b = best, let bv = votes[li * candidates.count + b] {
                    if v.count > bv.count || (v.count == bv.count && v.total < bv.total) { best = k }
                } else {
                    best = k
                }
            }
            let current = carriedLink(of: l.leg, outbound: l.outbound)
            guard let b = best else {
                // No packet of it lines up with any of the tunnels (ztunnel slower than the window, or no data): the
                // join stands on the rest, and says that timing could not tell.
                if let current, packets[li] > 0 {
                    current.relay = RelayMatch(matched: 0, packets: packets[li], largestGap: 0, tunnels: l.tunnels.count,
                                               passthroughs: passthroughsAmong(l.tunnels), runnerUp: 0,
                                               blind: blind[li])
                    current.finalized = false
                }
                continue
            }
            // How many of its packets a tunnel could have relayed, as if no other connection had taken a packet.
            func couldMatch(_ k: Int) -> Int {
                var n = 0
                for a in carriedFrom[li] ..< carriedFrom[li + 1] where pairings[a].contains(where: { relayed[$0.relayed].tunnel == k }) {
                    n += 1
                }
                return n
            }
            // The next best counted so: two tunnels opened together whose packets both fall in the window for two
            // connections are told apart only by which pairing is shorter, and the loser's packets, taken by the
            // other connection, must not read as "matched 0".
            var runnerUp = 0
            for k in l.tunnels where k != b { runnerUp = max(runnerUp, couldMatch(k)) }
            let v = votes[li * candidates.count + b] ?? (0, 0, 0)
            let match = RelayMatch(matched: v.count, packets: packets[li], largestGap: v.largest, tunnels: l.tunnels.count,
                                   passthroughs: passthroughsAmong(l.tunnels),
                                   runnerUp: runnerUp, blind: blind[li])
            // Decisive: every packet matched in the chosen tunnel, every tunnel's packets could be compared, and no
            // other tunnel could have relayed any of them; or the tunnel it is joined to opened after it ended (a fresh
            // join within the hop window, its own tunnel taken by another connection), so carried none of it. (One
            // closed before it began is never joined to it: `mayBeOpenedFor` and `pooledTunnel` leave those out.)
            let impossible = current.map { tunnelOf($0).firstSeenNanos > l.leg.lastSeenNanos } ?? false
            let decisive = impossible || (match.matched == packets[li] && blind[li] == 0 && runnerUp == 0)
            choices.append((li, current, b, match, decisive))
        }
        let moving = standingMoves(choices, legs: legs, candidates: candidates)
        // Links to tunnels the timing does not bear out go first, so that a new tunnel freed by one connection is
        // joined fresh (not pooled) by the connection it was opened for.
        // What a connection kept on (or put back on) the tunnel it is joined to says: that tunnel's match, and the
        // one the timing pointed to as the next best. Nil: that tunnel is not among the candidates.
        func keptMatch(_ c: RelayChoice, on current: HopLink) -> (tunnel: Int?, match: RelayMatch) {
            let l = legs[c.leg]
            let own = l.tunnels.first { candidates[$0] === tunnelOf(current) }
            let v = own.flatMap { votes[c.leg * candidates.count + $0] }
            return (own, RelayMatch(matched: v?.count ?? 0, packets: packets[c.leg], largestGap: v?.largest ?? 0,
                                    tunnels: l.tunnels.count, passthroughs: passthroughsAmong(l.tunnels), runnerUp: c.match.matched,
                                    blind: blind[c.leg], overruled: true))
        }
        var moves: [(leg: ConnectionState, outbound: Bool, tunnel: ConnectionState, match: RelayMatch, left: HopLink?, kept: RelayMatch?)] = []
        var freed: [ConnectionState] = []
        for (i, c) in choices.enumerated() {
            let l = legs[c.leg]
            var k = c.tunnel, match = c.match
            if !moving[i], let current = c.current, tunnelOf(current) !== candidates[k] {
                // Kept against the timing.
                let kept = keptMatch(c, on: current)
                guard let own = kept.tunnel else {
                    current.relay = kept.match
                    current.finalized = false
                    continue
                }
                k = own
                match = kept.match
            }
            let tunnel = candidates[k]
            // The chosen tunnel's packets this connection was paired with are claimed for later batches.
            for a in carriedFrom[c.leg] ..< carriedFrom[c.leg + 1] where pairedTo[a] >= 0 && relayed[pairedTo[a]].tunnel == k {
                let event = relayed[pairedTo[a]].event
                if event >= 0 { tunnel.relayClaimed.append(Int32(event)) } else { tunnel.relayOverflow[-1 - event].claimed = true }
            }
            if let current = c.current, tunnelOf(current) === tunnel {
                current.relay = match
                current.finalized = false
                continue
            }
            // What it would say if it stayed (the move may be undone below).
            if let current = c.current {
                unlink(current)
                freed.append(tunnelOf(current))
            }
            moves.append((l.leg, l.outbound, tunnel, match, c.current, c.current.map { keptMatch(c, on: $0).match }))
        }
        var joined: [HopLink] = []
        for m in moves {
            let direction: ZtunnelHop.Direction = m.outbound ? .outbound : .inbound
            let hasOwnJoin = m.tunnel.hopLinks.contains { $0.hop.direction == direction && !$0.pooled }
            // Opened for this connection: outbound, after it began; inbound, before it and within the hop window.
            let gap = m.outbound ? m.tunnel.firstSeenNanos - m.leg.firstSeenNanos : m.leg.firstSeenNanos - m.tunnel.firstSeenNanos
            let fresh = !hasOwnJoin && m.tunnel.initiatorFromSYN && gap >= 0 && gap <= options.hopWindowNanos
            // A passthrough carries one connection: never a pooled join.
            let link = join(direction, outer: m.outbound ? m.leg : m.tunnel, inner: m.outbound ? m.tunnel : m.leg,
                            evidence: [], confidence: .low, candidates: m.match.tunnels,
                            pooled: !fresh && !isPassthrough(m.tunnel))
            link.relay = m.match
            joined.append(link)
        }
        // A tunnel left with no connection goes back among the candidates (they drop joined ones) and looks again:
        // the connection it was opened for may have begun after the one that had taken it.
        for t in freed where !t.emitted { lookAgain(t) }
        // Still with none: the move is undone, decisive or not. Its connection may well have gone through the other
        // tunnel, but then the one it leaves was opened for a connection already joined elsewhere, and that chain is
        // not for timing alone to unpick; a tunnel none explains would read as a forged mark. Undoing one move can
        // leave the tunnel it had moved to with none, so this runs until nothing changes.
        var undone = [Bool](repeating: false, count: moves.count)
        var changed = true
        while changed {
            changed = false
            for (i, m) in moves.enumerated() where !undone[i] {
                guard let old = m.left else { continue }
                let t = tunnelOf(old)
                guard !(old.hop.direction == .outbound ? t.hasOutboundHop : t.hasInboundHop) else { continue }
                unlink(joined[i])
                let back = join(old.hop.direction, outer: old.outer, inner: old.inner, evidence: [], confidence: .low,
                                candidates: old.candidates, pooled: old.pooled)
                back.relay = m.kept
                undone[i] = true
                changed = true
            }
        }
        // Tunnels that could have relayed a connection's packets but are not the one it is joined to.
        for (li, l) in legs.enumerated() {
            let own = carriedLink(of: l.leg, outbound: l.outbound).map(tunnelOf)
            for a in carriedFrom[li] ..< carriedFrom[li + 1] {
                for p in pairings[a] where candidates[relayed[p.relayed].tunnel] !== own {
                    candidates[relayed[p.relayed].tunnel].relayCouldHaveCarried = true
                }
            }
        }
    }

    /// Whether tunnel `i`, open during `c`'s life by the correlator's clock (`SpanIndex`), was open then by the times
    /// its packets carry too. Live, that clock runs ahead of the packets (NFLOG records stamped on receipt, up to the
    /// instance's flush timeout late), and a connection of 1-2 ms seemed to overlap every tunnel of the 10 ms around
    /// it: 20-40 at 3000 connections a second, where a few were open, each counted in its evidence ("of 34 open
    /// tunnels") and compared packet by packet. The tunnel that carried a connection was open while it ran, by its
    /// packets' times: outbound, ztunnel connects on after the app's SYN, and the reply comes back out of the tunnel
    /// before the app's last packet; inbound, the tunnel brought the request before ztunnel connected into the app
    /// and takes the reply after. So one whose packets all came before `c`'s first or after its last carried none of
    /// it, and relay timing (which pairs packets up to a window apart) no longer counts it or lets it pair. One with
    /// no interface packets (or a connection with none: a trace without a capture) is judged by the correlator's
    /// clock alone, as is an end that is unknown (a tunnel opened before the capture, or still open).
    private func openByPacketTime(_ i: Int, during c: ConnectionState) -> Bool {
        let t = tunnels[i]
        guard c.interfaceFirstNanos != .max, t.interfaceFirstNanos != .max else { return true }
        if tunnelBegan[i] != .min && t.interfaceFirstNanos > c.interfaceLastNanos { return false }
        if tunnelClosed[i] != .max && t.interfaceLastNanos < c.interfaceFirstNanos { return false }
        return true
    }

    /// A leg's choice in relay timing (`relinkByRelayTiming`): the tunnel that matched most of its packets, the join
    /// it has now, what the timing says, and whether that is decisive.
    private typealias RelayChoice = (leg: Int, current: HopLink?, tunnel: Int, match: RelayMatch, decisive: Bool)

    /// ztunnel's plain connection out of the pod to an endpoint outside the mesh (not to a pod's HBONE port): what the
    /// classifier calls `ztunnelPassthrough` (marked, from the pod, to neither loopback nor the pod itself).
    private func isPassthrough(_ c: ConnectionState) -> Bool {
        c.proto == IPProto.tcp && c.sawZtunnelMark && c.responder.port != options.hbonePort && initiatorIsLocal(c)
            && !isLocal(c.responder.addr)
    }

    /// The tunnel of a join: its inner side outbound, its outer side inbound.
    private func tunnelOf(_ link: HopLink) -> ConnectionState { link.hop.direction == .outbound ? link.inner : link.outer }

    /// Which of relay timing's choices move their connection (true). Under load relay timing is noisy: ztunnel's
    /// relay delay (hundreds of µs) is longer than the gap between connections, so another tunnel's packet is often
    /// nearer than the connection's own (half the time, at 3000 connections a second through the lab's stand-in). A
    /// move that is not decisive must therefore keep two things that do not depend on it:
    /// - a tunnel opened for a connection keeps it (`pooled == false`: the order the tunnels opened in is the
    ///   better witness), unless a connection with no join of its own, a pooled one, or one whose move is
    ///   decisive takes its place, or the move is part of a chain that ends where it displaces no one;
    /// - no tunnel is left with no connection: ztunnel opened or kept each one for some connection, and one that
    ///   none explains reads as a forged mark, an escape.
    /// Otherwise the join stands, and its evidence says that the timing pointed elsewhere.
    private func standingMoves(_ choices: [RelayChoice], legs: [(leg: ConnectionState, outbound: Bool, tunnels: [Int])],
                               candidates: [ConnectionState]) -> [Bool] {
        var moving = [Bool](repeating: false, count: choices.count)
        var incoming: [ObjectIdentifier: (all: Int, unowned: Int)] = [:], leaving: [ObjectIdentifier: Int] = [:]
        func count(_ i: Int, _ d: Int) {
            let c = choices[i]
            incoming[ObjectIdentifier(candidates[c.tunnel]), default: (0, 0)].all += d
            if c.decisive || (c.current?.pooled ?? true) { incoming[ObjectIdentifier(candidates[c.tunnel]), default: (0, 0)].unowned += d }
            if let current = c.current { leaving[ObjectIdentifier(tunnelOf(current)), default: 0] += d }
        }
        for (i, c) in choices.enumerated() where c.current.map({ tunnelOf($0) !== candidates[c.tunnel] }) ?? true {
            moving[i] = true
            count(i, 1)
        }
        // A chain of moves that ends at a tunnel where it displaces no one: a pooled connection took the next
        // connection's new tunnel, whose connection took the next one's, and so on, while the pooled tunnel it went
        // through carried no other connection then (none, or only ones that had ended, or ones that leave a pooled
        // join themselves). Each move of such a chain stands; a ring of moves among new tunnels' connections
        // (swapped on timing alone), or one onto a tunnel whose connection was running and stays, does not: under
        // load that is what noise looks like.
        var choiceOf: [ObjectIdentifier: Int] = [:]
        for (j, c) in choices.enumerated() { if let current = c.current { choiceOf[ObjectIdentifier(current)] = j } }
        var chain: [UInt8] = []   // 0 not looked at, 1 looking (a ring), 2 ends well, 3 does not
        // Bounded: a chain longer than this is not followed (it does not end well), so a batch of thousands cannot
        // recurse that deep.
        func endsWell(_ i: Int, depth: Int = 0) -> Bool {
            if chain[i] == 1 || depth > Correlator.relayChainLimit { return false }
            if chain[i] >= 2 { return chain[i] == 2 }
            chain[i] = 1
            let c = choices[i], l = legs[c.leg], target = candidates[c.tunnel]
            let direction: ZtunnelHop.Direction = l.outbound ? .outbound : .inbound
            var well = true
            for link in target.hopLinks where link.hop.direction == direction {
                // A connection the tunnel carried that had ended before this one began displaces no one: ztunnel
                // kept the tunnel (pooled) and this one may well have gone through it.
                let carried = l.outbound ? link.outer : link.inner
                if carried.emitted || carried.lastSeenNanos < l.leg.firstSeenNanos { continue }
                guard let j = choiceOf[ObjectIdentifier(link)], j != i, moving[j] else { well = false; break }
                // A connection that leaves a pooled join (or moves decisively) anchors the chain, ring or not.
                if choices[j].decisive || choices[j].current?.pooled == true { continue }
                guard endsWell(j, depth: depth + 1) else { well = false; break }
            }
            chain[i] = well ? 2 : 3
            return well
        }
        var settled = false
        while !settled {
            settled = true
            // A passthrough carries one connection: a move onto one stands only if it is the only one and the
            // connection joined to it now moves off it.
            var held: [Int] = []
            for (i, c) in choices.enumerated() where moving[i] && isPassthrough(candidates[c.tunnel]) {
                let target = candidates[c.tunnel]
                let vacated = target.hopLinks.allSatisfy { link in
                    link.hop.direction != .outbound || choiceOf[ObjectIdentifier(link)].map { moving[$0] } ?? false
                }
                if !vacated || (incoming[ObjectIdentifier(target)]?.all ?? 0) > 1 { held.append(i) }
            }
            for i in held { moving[i] = false; count(i, -1); settled = false }
            chain = [UInt8](repeating: 0, count: choices.count)
            for (i, c) in choices.enumerated() where moving[i] && !c.decisive {
                guard let current = c.current else { continue }
                let left = tunnelOf(current), id = ObjectIdentifier(left)
                let kept: Bool
                if !current.pooled {
                    kept = (incoming[id]?.unowned ?? 0) > 0 || endsWell(i)
                } else {
                    // It keeps a connection: of every one it carried, listed on it or not (counted by the listed ones
                    // alone, more than 16 leaving a busy tunnel held all but 16 back). Should the ones it lists all
                    // leave, the last loop of `relinkByRelayTiming` puts one back: those are what explain it.
                    kept = left.carriedLinks > (leaving[id] ?? 0) || (incoming[id]?.all ?? 0) > 0
                }
                if !kept { moving[i] = false; count(i, -1); settled = false }
            }
        }
        return moving
    }

    /// What relay timing paired in one batch (`relinkByRelayTiming`): each data packet of a connection that may have
    /// been carried with the tunnel packets that could be its relay, then one relayed packet to each.
    private struct RelayPairing {
        /// Where each leg's data packets that have a pairing (numbered as met) begin: leg li's are
        /// carriedFrom[li] ..< carriedFrom[li + 1] in `pairings` and `pairedTo`.
        var carriedFrom: [Int]
        /// Each carried packet's pairings, shortest gap first.
        var pairings: [[(gap: Int64, relayed: Int)]]
        /// The tunnel packets paired with any: (candidate, index into its events, or -1 - its overflow ring's slot).
        var relayed: [(tunnel: Int, event: Int)]
        /// The relayed packet each carried one was given (-1: none).
        var pairedTo: [Int]
        /// Per leg: its data packets compared, and how many of its tunnels no longer kept packets from its time.
        var packets: [Int]
        var blind: [Int]
        /// Per leg and tunnel (leg * candidates.count + tunnel): packets given, their total and largest gap.
        var votes: [Int: (count: Int, total: Int64, largest: Int64)]
    }

    private func pairRelays(legs: [(leg: ConnectionState, outbound: Bool, tunnels: [Int])], candidates: [ConnectionState],
                            from: Int64, to: Int64) -> RelayPairing {
        // Every pairing within the window: the carried packet first going towards the far end (app to tunnel
        // outbound, tunnel to app inbound), the tunnel's first coming back. Packets are numbered as met: `carried`
        // (leg, event) and `relayed` (candidate, event), with each carried packet's pairings, shortest gap first.
        let window = options.relayWindowNanos
        var carried: [(leg: Int, event: Int)] = []
        var pairings: [[(gap: Int64, relayed: Int)]] = []
        var relayed: [(tunnel: Int, event: Int)] = []
        // Each candidate's data packets not claimed yet, read once for the batch (many legs share a tunnel):
        // tunnelData[tunnelDataFrom[k] ..< tunnelDataFrom[k + 1]], each numbered in `relayed` when first paired.
        // `event` is an index into the tunnel's events, or -1 - i for its overflow ring's slot i (the packets past
        // the event limit), of which only those within the batch's span are read.
        var tunnelData: [(time: Int64, length: UInt32, forward: Bool, event: Int)] = []
        var tunnelDataFrom = [Int](repeating: 0, count: candidates.count + 1)
        for (k, tunnel) in candidates.enumerated() {
            tunnelDataFrom[k] = tunnelData.count
            tunnel.events.withUnsafeBufferPointer { events in
                for j in events.indices where Correlator.isRelayData(events[j], loopback: false)
                    && !tunnel.relayClaimed.contains(Int32(j)) {
                    tunnelData.append((events[j].time.totalNanoseconds, events[j].length, events[j].forward, j))
                }
            }
            tunnel.relayOverflow.withUnsafeBufferPointer { ring in
                for i in ring.indices where !ring[i].claimed && ring[i].time >= from - window && ring[i].time <= to + window {
                    tunnelData.append((ring[i].time, ring[i].length, ring[i].forward, -1 - i))
                }
            }
        }
        tunnelDataFrom[candidates.count] = tunnelData.count
        var relayedOf = [Int](repeating: -1, count: tunnelData.count)
        var packets = [Int](repeating: 0, count: legs.count)
        var blind = [Int](repeating: 0, count: legs.count)
        // Each leg's carried packets are appended together: carried[carriedFrom[li] ..< carriedFrom[li + 1]].
        var carriedFrom = [Int](repeating: 0, count: legs.count + 1)
        for (li, l) in legs.enumerated() {
            carriedFrom[li] = carried.count
            defer { carriedFrom[li + 1] = carried.count }
            // A tunnel whose ring had to let go of packets from this connection's time (or before it).
            for k in l.tunnels where candidates[k].relayOverflowLostUntil >= l.leg.firstSeenNanos - window {
                blind[li] += 1
            }
            l.leg.events.withUnsafeBufferPointer { legEvents in
                for e in legEvents.indices where Correlator.isRelayData(legEvents[e], loopback: true) {
                    if packets[li] == Correlator.relayPacketsCompared { break }
                    packets[li] += 1
                    let ev = legEvents[e]
                    let t = ev.time.totalNanoseconds
                    let carriedFirst = l.outbound == ev.forward
                    var mine: [(gap: Int64, relayed: Int)] = []
                    for k in l.tunnels {
                        for x in tunnelDataFrom[k] ..< tunnelDataFrom[k + 1] {
                            let te = tunnelData[x]
                            guard te.forward == ev.forward else { continue }
                            let gap = carriedFirst ? te.time - t : t - te.time
                            guard gap > 0 && gap <= window else { continue }
                            // The tunnel wraps the bytes (TLS, HTTP/2 frames): never shorter, unless segmented.
                            if ev.length <= 1400 && te.length < ev.length { continue }
                            var r = relayedOf[x]
                            if r < 0 {
                                r = relayed.count
                                relayed.append((k, te.event))
                                relayedOf[x] = r
                            }
                            mine.append((gap, r))
                        }
                    }
                    guard !mine.isEmpty else { continue }
                    mine.sort { ($0.gap, $0.relayed) < ($1.gap, $1.relayed) }
                    carried.append((li, e))
                    pairings.append(mine)
                }
            }
        }

        // Shortest gaps first, each packet paired once; then a carried packet left out takes a packet paired
        // already if that one's partner can move to another (augmenting paths): one connection's close pairing must
        // not leave another's only one out (a pooled tunnel's request 1.9 ms after the app's, another connection's
        // 0.4 ms, where that other's own tunnel relayed it 0.5 ms after).
        var pairedTo = [Int](repeating: -1, count: carried.count)
        var pairedFrom = [Int](repeating: -1, count: relayed.count)
        var order: [(gap: Int64, carried: Int, relayed: Int)] = []
        for (a, mine) in pairings.enumerated() { for p in mine { order.append((p.gap, a, p.relayed)) } }
        order.sort { ($0.gap, $0.carried, $0.relayed) < ($1.gap, $1.carried, $1.relayed) }
        for p in order where pairedTo[p.carried] < 0 && pairedFrom[p.relayed] < 0 {
            pairedTo[p.carried] = p.relayed
            pairedFrom[p.relayed] = p.carried
        }
        var seen = [Bool](repeating: false, count: relayed.count)
        var visited: [Int] = []
        // A bounded search per packet left out: a busy pod's batch holds thousands of packets, and an unbounded
        // one made this quadratic in the batch (the live trace fell behind and lost events).
        var budget = 0
        func augment(_ a: Int) -> Bool {
            for p in pairings[a] where !seen[p.relayed] {
                guard budget > 0 else { return false }
                budget -= 1
                seen[p.relayed] = true
                visited.append(p.relayed)
                if pairedFrom[p.relayed] < 0 || augment(pairedFrom[p.relayed]) {
                    pairedTo[a] = p.relayed
                    pairedFrom[p.relayed] = a
                    return true
                }
            }
            return false
        }
        for a in carried.indices.sorted(by: { (pairings[$0][0].gap, $0) < (pairings[$1][0].gap, $1) }) where pairedTo[a] < 0 {
            for r in visited { seen[r] = false }
            visited.removeAll(keepingCapacity: true)
            budget = Correlator.relayAugmentBudget
            _ = augment(a)
        }
        var votes: [Int: (count: Int, total: Int64, largest: Int64)] = [:]
        for (a, r) in pairedTo.enumerated() where r >= 0 {
            let li = carried[a].leg, k = relayed[r].tunnel
            let gap = pairings[a].first { $0.relayed == r }!.gap
            var v = votes[li * candidates.count + k] ?? (0, 0, 0)
            v.count += 1; v.total += gap; v.largest = max(v.largest, gap)
            votes[li * candidates.count + k] = v
        }
        return RelayPairing(carriedFrom: carriedFrom, pairings: pairings, relayed: relayed,
                            pairedTo: pairedTo, packets: packets, blind: blind, votes: votes)
    }


    /// Spans of time by the index of what they belong to (into arrays of their starts and ends), so that those open
    /// during a given time are found without walking them all. Relay timing: the tunnels to one far end open at some
    /// time during a batch (indices into `tunnels`): a busy batch holds ~1500 to the same peer (a second of
    /// connections), of which a connection overlaps a few; walking them all for each connection made relay timing
    /// ~10 % of a live trace's CPU at 3000 connections a second, and quadratic in a file's batch. The order chain:
    /// the windows in which the app connections may have been carried by a tunnel (`chainApps`, `vipWindow`).
    private struct SpanIndex {
        /// Closed ones that lived at most `shortLife`, by when they opened (then index): one open during
        /// [first, last] opened in [first - longestShort, last].
        var short: [(began: Int64, index: Int)] = []
        /// The longest life among `short` (a few ms in the lab: the search's window).
        var longestShort: Int64 = 0
        /// The others (still open, opened before the capture, or long-lived: pooled), by index.
        var long: [Int] = []
        static let shortLife: Int64 = 1_000_000_000

        mutating func add(_ i: Int, began: Int64, closed: Int64) {
            if began != .min && closed != .max && closed - began <= SpanIndex.shortLife {
                short.append((began, i))
                longestShort = max(longestShort, closed - began)
            } else {
                long.append(i)
            }
        }

        mutating func sort() { short.sort { ($0.began, $0.index) < ($1.began, $1.index) } }

        /// The indices of those open at some time in [first, last], ascending (the order a walk of all would give).
        func openDuring(_ first: Int64, _ last: Int64, began: [Int64], closed: [Int64], into out: inout [Int]) {
            out.removeAll(keepingCapacity: true)
            let start = first < .min + longestShort ? .min : first - longestShort
            var lo = 0, hi = short.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if short[mid].began < start { lo = mid + 1 } else { hi = mid }
            }
            while lo < short.count && short[lo].began <= last {
                if closed[short[lo].index] >= first { out.append(short[lo].index) }
                lo += 1
            }
            for i in long where began[i] <= last && closed[i] >= first { out.append(i) }
            out.sort()
        }
    }

    /// The join of a connection that may have been carried, to the tunnel said to carry it: the app's connection as
    /// the outer side outbound, ztunnel's connection into the app as the inner side inbound.
    private func carriedLink(of c: ConnectionState, outbound: Bool) -> HopLink? {
        c.hopLinks.first { outbound ? ($0.hop.direction == .outbound && $0.outer === c)
                                    : ($0.hop.direction == .inbound && $0.inner === c) }
    }

    /// Data packets read for relay timing, per carried connection: its request and reply, and then some.
    static let relayPacketsCompared = 16
    /// The longest chain of moves relay timing follows (`relinkByRelayTiming`).
    static let relayChainLimit = 64
    /// How much earlier than an app connection a tunnel without an identity match may seem to begin and still be
    /// taken for it, or begin after it ended (`vipTunnel`): times stamped on receipt.
    static let vipSkewNanos: Int64 = 50_000_000
    /// At most this many joins move to explain one tunnel (`explainByOrderChain`), and this many app connections are
    /// looked at in all: a shift by the order ran over dozens of connections in the live tests (a stand-in thread
    /// starved 5-15 ms; 124 moves the longest seen), and the search stays bounded for a process that forges the mark
    /// again and again (and the searches of one batch do not go through the same connections twice).
    static let orderChainSteps = 512
    static let orderChainLooks = 100_000
    /// Tunnel packets one search for a packet left out may look at (`relinkByRelayTiming`).
    static let relayAugmentBudget = 64

    /// A packet captured on an interface (NFLOG copies would count it twice) that carries bytes: PSH, or longer
    /// than any header (IPv6 40 + TCP 60).
    private static func isRelayData(_ e: CompactEvent, loopback: Bool) -> Bool {
        // An ICMP error placed on a tunnel (`place`) is no data it relayed.
        e.tuple.proto == IPProto.tcp && isRelayData(pointKind: e.pointKind, isLoopback: e.isLoopback, flags: e.flags, length: e.length, loopback: loopback)
    }

    private static func isRelayData(pointKind: CapturePoint.Kind, isLoopback: Bool, flags: TCPFlags, length: UInt32,
                                    loopback: Bool) -> Bool {
        pointKind == .interface && isLoopback == loopback && !flags.contains(.syn) && (flags.contains(.psh) || length > 100)
    }

    /// Takes a join back (relay timing chose another tunnel).
    private func unlink(_ link: HopLink) {
        link.outer.hopLinks.removeAll { $0 === link }
        link.inner.hopLinks.removeAll { $0 === link }
        tunnelOf(link).carriedLinks -= 1
        if link.hop.direction == .outbound {
            link.outer.hasOutboundHop = link.outer.hopLinks.contains { $0.hop.direction == .outbound }
            link.inner.hasOutboundHop = link.inner.hopLinks.contains { $0.hop.direction == .outbound }
        } else {
            link.outer.hasInboundHop = link.outer.hopLinks.contains { $0.hop.direction == .inbound }
            link.inner.hasInboundHop = link.inner.hopLinks.contains { $0.hop.direction == .inbound }
        }
        summary.hops -= 1
    }

    /// The evidence for a join and the confidence it earns. Identity (same destination, same client) is what a
    /// join rests on; ztunnel's mark and a lone candidate raise it; timing is reported, never decisive.
    private func hopEvidence(outer: ConnectionState, inner: ConnectionState, direction: ZtunnelHop.Direction,
                             candidates: Int, pooled: Bool = false, relay: RelayMatch? = nil,
                             takenBackFrom: ConnectionID? = nil, chain: Int = 0) -> ([HopEvidence], Confidence) {
        var evidence: [HopEvidence] = []
        // The most a hop gets: mark, connmark, two identity pieces, timing, uniqueness, and bytes (added later).
        evidence.reserveCapacity(7)
        var hasMark = false
        if let f = inner.ztunnelMarkFrames.first {
            hasMark = true
            evidence.append(HopEvidence(.ztunnelMark(options.ztunnelMark, frame: f)))
        }
        if direction == .inbound && inner.sawZtunnelConnmark {
            hasMark = true
            evidence.append(HopEvidence(.ztunnelConnmark(options.ztunnelConnmark)))
        }
        if direction == .outbound && !hasMark && inner.responder.port == options.hbonePort {
            hasMark = true
            evidence.append(HopEvidence(.hbonePort(options.hbonePort)))
        }
        let identity = identityEvidence(outer: outer, inner: inner, direction: direction, into: &evidence)
        if pooled {
            // Timing says nothing about a reused tunnel; that it was open, and whether it was the only one, does.
            // Never high: which of the tunnel's streams carried this connection is not visible below TLS.
            let outboundTunnel = direction == .outbound
            let tunnel = outboundTunnel ? inner : outer, carried = outboundTunnel ? outer : inner
            let opened = firstPacketGap(from: tunnel, to: carried)
            evidence.append(HopEvidence(opened < 0 && !tunnel.initiatorFromSYN
                ? .pooledTunnelBeforeCapture(outbound: outboundTunnel)
                : opened < 0 && outboundTunnel ? .sharedTunnel(openedAfter: -opened)
                : .pooledTunnel(outbound: outboundTunnel, openedBefore: opened)))
            if let relay {
                return relayEvidence(relay, identity: identity, hasMark: hasMark, direction: direction,
                                     intoPassthrough: direction == .outbound && isPassthrough(inner), into: &evidence)
            }
            evidence.append(HopEvidence(candidates <= 1 ? .onlyOpenTunnel : .newestOpenTunnel(of: candidates)))
            return (evidence, identity && hasMark && candidates <= 1 ? .medium : .low)
        }
        evidence.append(HopEvidence(.timing(nanos: firstPacketGap(from: outer, to: inner))))
        if let relay {
            return relayEvidence(relay, identity: identity, hasMark: hasMark, direction: direction,
                                 intoPassthrough: direction == .outbound && isPassthrough(inner), into: &evidence)
        }
        // A tunnel to the same peer that was open already when the app's connection began, and carried packets while
        // it ran, could have carried it instead (ztunnel pools them): the fresh one is then not the only candidate.
        // Counted here, once per hop, when whether it carried packets afterwards is known.
        // Inbound likewise: an HBONE tunnel into the pod from the same client, open already when ztunnel's connection
        // into the app began.
        let openTunnels = direction == .outbound ? (pooledTunnel(for: outer, outbound: true, excluding: inner)?.1 ?? 0)
                                                 : (pooledTunnel(for: inner, outbound: false, excluding: outer)?.1 ?? 0)
        let unique = candidates <= 1 && openTunnels == 0
        evidence.append(HopEvidence(!identity && direction == .outbound
            ? .unexplainedMarkedConnection(of: candidates, takenBackFrom: takenBackFrom, chain: chain)
            : openTunnels > 0 ? .alsoOpenTunnels(candidates: candidates, open: openTunnels, windowNanos: options.hopWindowNanos,
                               outbound: direction == .outbound)
            : unique ? .onlyCandidate(windowNanos: options.hopWindowNanos)
            : .earliestCandidate(of: candidates, windowNanos: options.hopWindowNanos)))
        let confidence: Confidence
        if identity && unique && hasMark { confidence = .high }
        else if identity && (unique || hasMark) { confidence = .medium }
        else { confidence = .low }
        return (evidence, confidence)
    }

    /// A join among several open tunnels rests on relay timing: never high (another tunnel could have carried it, and
    /// below TLS no packet names its stream); medium only when every data packet of the carried connection has a twin
    /// in this tunnel, no other tunnel matched as many, and every tunnel's packets could be compared.
    private func relayEvidence(_ relay: RelayMatch, identity: Bool, hasMark: Bool, direction: ZtunnelHop.Direction,
                               intoPassthrough: Bool, into evidence: inout [HopEvidence]) -> ([HopEvidence], Confidence) {
        evidence.append(HopEvidence(.relayTiming(outbound: direction == .outbound, matched: relay.matched, packets: relay.packets,
                                                 largestGap: relay.largestGap, windowNanos: options.relayWindowNanos,
                                                 tunnels: relay.tunnels, runnerUp: relay.runnerUp, blind: relay.blind,
                                                 overruled: relay.overruled, passthroughs: relay.passthroughs,
                                                 intoPassthrough: intoPassthrough)))
        let clean = relay.matched == relay.packets && relay.runnerUp < relay.matched && relay.blind == 0
        return (evidence, identity && hasMark && clean ? .medium : .low)
    }

    /// How long after `a`'s first packet `b`'s came, as their timelines print them: the earliest time of any
    /// record of each. Not `firstSeenNanos` (the correlator's clock when the connection was first placed): live, that
    /// is often an NFLOG OUTPUT event stamped on receipt, up to a batch after its packet, and the events are
    /// retimed from their captured packets only at emission, which never moves a timeline's earliest time (a
    /// receipt time is later than the packet's, a captured or kernel-stamped one is the packet's).
    private func firstPacketGap(from a: ConnectionState, to b: ConnectionState) -> Int64 {
        b.timeline.firstSeen.totalNanoseconds - a.timeline.firstSeen.totalNanoseconds
    }

    /// Evidence that names the same destination or client on both sides; without one, a join needs a lone marked candidate.
    /// Whether `identityEvidence` has something to say, without wording it (tested for every candidate pair).
    private func identityMatches(outer: ConnectionState, inner: ConnectionState, direction: ZtunnelHop.Direction) -> Bool {
        switch direction {
        case .outbound:
            guard outer.originalKnown else { return false }
            let original = outer.responder
            return inner.responder == original
                || (inner.responder.port == options.hbonePort && inner.responder.addr == original.addr)
        case .inbound:
            guard inner.initiator.addr == outer.initiator.addr else { return false }
            return outer.responder.port == options.hbonePort || outer.responder.port == inner.responder.port
        }
    }

    /// Appends the identity evidence for a join, all or nothing; false when there is none.
    private func identityEvidence(outer: ConnectionState, inner: ConnectionState, direction: ZtunnelHop.Direction,
                                  into evidence: inout [HopEvidence]) -> Bool {
        switch direction {
        case .outbound:
            guard outer.originalKnown else { return false }
            let original = outer.responder
            if inner.responder == original {
                evidence.append(HopEvidence(.passthroughDestination(inner.responder)))
                return true
            }
            if inner.responder.port == options.hbonePort && inner.responder.addr == original.addr {
                evidence.append(HopEvidence(.hboneDestination(inner.responder.addr, original: original)))
                return true
            }
            return false
        case .inbound:
            guard inner.initiator.addr == outer.initiator.addr else { return false }
            // Plaintext inbound (not to HBONE's port): ztunnel connects on to the port the client asked for.
            let portCounts = outer.responder.port != options.hbonePort
            if portCounts && outer.responder.port != inner.responder.port { return false }
            evidence.append(HopEvidence(.clientAddress(inner: inner.initiator.addr, outer: outer.initiator.addr)))
            if portCounts { evidence.append(HopEvidence(.originalPort(inner.responder.port))) }
            return true
        }
    }

    /// Whether an entry of `appsByStart` (`asOuter`) or `tunnelsByStart` is one of the outbound candidates still
    /// without a join: not stale, not emitted or merged, not joined. However long ago it began: unlike the lists
    /// an identity join looks in (a tunnel is joined by identity when its SYN comes), a connection joined only
    /// when it is emitted (a service VIP's) may have run for minutes by then (a gRPC connection to a service),
    /// and so may its tunnel; aged out, the tunnel read as a forged mark.
    private func waiting(_ e: StartOrderIndex.Entry, asOuter: Bool) -> Bool {
        isCurrent(e, asOuter: asOuter) && !e.conn.hasOutboundHop
    }

    /// Whether an entry of `appsByStart` (`asOuter`) or `tunnelsByStart` is its connection's latest (a connection
    /// listed again has a newer one) and the connection is still to be emitted, joined or not.
    private func isCurrent(_ e: StartOrderIndex.Entry, asOuter: Bool) -> Bool {
        let p = e.conn
        return e.stamp == (asOuter ? p.outerListed : p.innerListed) && !p.emitted && p.mergedInto == nil
    }

    /// Drops candidates that can no longer be joined: too old, emitted, merged, or already joined in this
    /// direction. Joins happen within milliseconds in a healthy capture, so the lists stay short. (The outbound
    /// index's lists prune with `unfileUnlessLive`.)
    private func pruneCandidates(_ list: inout [ConnectionState], outbound: Bool) {
        let horizon = candidateHorizon
        list.removeAll { p in
            p.emitted || p.mergedInto != nil || p.firstSeenNanos < horizon || (outbound ? p.hasOutboundHop : p.hasInboundHop)
        }
    }

    /// Candidates that began before this can no longer be joined fresh (the hop window, its slack, and the linger).
    private var candidateHorizon: Int64 { now - options.hopWindowNanos - options.hopSlackNanos - options.closeLingerNanos }

    /// Whether an entry of the outbound index under `key` (app connections when `asOuter`) is still a candidate: its
    /// connection still filed there, not emitted, merged or joined, and begun at `horizon` or later.
    @inline(__always)
    private func isLiveCandidate(_ p: ConnectionState, filedUnder key: IPAddress, asOuter: Bool, horizon: Int64) -> Bool {
        (asOuter ? p.outerFiledUnder : p.innerFiledUnder) == key && !p.emitted && p.mergedInto == nil
            && p.firstSeenNanos >= horizon && !p.hasOutboundHop
    }

    /// A prune's test: true (drop it) when the entry is no longer a candidate, after unfiling its connection from `key`
    /// (unless it is filed elsewhere now).
    private func unfileUnlessLive(_ p: ConnectionState, filedUnder key: IPAddress, asOuter: Bool, horizon: Int64) -> Bool {
        if isLiveCandidate(p, filedUnder: key, asOuter: asOuter, horizon: horizon) { return false }
        if asOuter { if p.outerFiledUnder == key { p.outerFiledUnder = nil } } else if p.innerFiledUnder == key { p.innerFiledUnder = nil }
        return true
    }

    @discardableResult
    private func join(_ direction: ZtunnelHop.Direction, outer: ConnectionState, inner: ConnectionState,
                      evidence: [HopEvidence], confidence: Confidence, candidates: Int, pooled: Bool = false) -> HopLink {
        let link = HopLink(hop: ZtunnelHop(direction: direction, outer: outer.id, inner: inner.id,
                                           evidence: evidence, confidence: confidence),
                           outer: outer, inner: inner, candidates: candidates)
        link.pooled = pooled
        tunnelOf(link).carriedLinks += 1
        if pooled {
            // The tunnel lists the first few connections it carried; each connection lists its tunnel.
            let tunnel = direction == .outbound ? inner : outer, carried = direction == .outbound ? outer : inner
            carried.hopLinks.append(link)
            if tunnel.hopLinks.lazy.filter(\.pooled).count < Correlator.maxPooledLinksListed { tunnel.hopLinks.append(link) }
        } else {
            outer.hopLinks.append(link)
            inner.hopLinks.append(link)
            contest(link)
        }
        if direction == .outbound { outer.hasOutboundHop = true; inner.hasOutboundHop = true } else {
            outer.hasInboundHop = true; inner.hasInboundHop = true
        }
        summary.hops += 1
        return link
    }

    /// Whether `inner` could have been opened for `outer` by the order they began in, once the outer connection's
    /// start is exact (its SYN at the packet's own time; the inner one's earliest time is never early): ztunnel
    /// connects on only after it accepted the app's connection (outbound), or read the request a tunnel brought
    /// (inbound through HBONE: after the tunnel's first payload). A tunnel opened earlier that carried the
    /// connection was pooled (`pooledTunnel`, at emission). Without an exact start, anything within the slack.
    private func inCausalOrder(outer: ConnectionState, inner: ConnectionState, direction: ZtunnelHop.Direction) -> Bool {
        guard outer.startExact else { return true }
        if inner.timeline.firstSeen < outer.timeline.firstSeen { return false }
        return direction == .outbound || outer.responder.port != options.hbonePort
            || inner.timeline.firstSeen.totalNanoseconds >= outer.firstForwardDataNanos
    }

    /// A connection joined before its SYN came with the packet's own time (its first record was stamped on receipt,
    /// and the join allowed for that): a fresh join on its outer side whose inner connection began before it was not
    /// opened for it (`beganAsIfOpenedFor`'s causal order), and is undone; both look again.
    private func undoJoinsBeforeStart(of c: ConnectionState) {
        let wrong = c.hopLinks.filter { $0.outer === c && !$0.pooled && $0.relay == nil
            && !inCausalOrder(outer: c, inner: $0.inner, direction: $0.hop.direction) }
        guard !wrong.isEmpty else { return }
        for link in wrong { unlink(link) }
        lookAgain(c)
        for link in wrong where !link.inner.emitted { lookAgain(link.inner) }
    }

    /// A connection whose join was taken back goes back among the candidates it left (they drop joined ones) and
    /// looks again.
    private func lookAgain(_ c: ConnectionState) {
        func back(_ role: HopRoles, _ joined: Bool, _ list: inout [ConnectionState]) {
            if c.pendingRoles.contains(role) && !joined && !list.contains(where: { $0 === c }) { self.list(c, role, in: &list) }
        }
        back(.outerOutbound, c.hasOutboundHop, &outerOutbound)
        back(.innerOutbound, c.hasOutboundHop, &innerOutbound)
        func backInbound(_ role: HopRoles, _ list: inout [ConnectionState], _ pruneAt: inout Int) {
            if c.pendingRoles.contains(role) && !c.hasInboundHop && !list.contains(where: { $0 === c }) {
                listInbound(c, role, in: &list, pruneAt: &pruneAt)
            }
        }
        backInbound(.outerInbound, &outerInbound, &outerInboundPruneAt)
        backInbound(.innerInbound, &innerInbound, &innerInboundPruneAt)
        reconsiderHops(c)
    }

    /// ztunnel's own connections out of the pod, emitted lately: their keys, oldest first in a ring, and when each was
    /// last seen. A reader far behind (live, `late_records`) gets a connection's last packets after it was emitted;
    /// they make a connection of their own, with no SYN and no join, and that must not read as a forged mark.
    private var emittedMarked: [FlowKey: Int64] = [:]
    private var emittedMarkedRing: [(key: FlowKey, lastSeen: Int64)] = []
    private var emittedMarkedNext = 0
    private func rememberEmittedMarked(_ key: FlowKey, lastSeen: Int64) {
        let kept = options.emittedTunnelsKept
        guard kept > 0 else { return }
        if emittedMarkedRing.count < kept {
            emittedMarkedRing.append((key, lastSeen))
        } else {
            // The oldest goes, unless its tuple was emitted again since (a reused port): that entry is the newer one's.
            let old = emittedMarkedRing[emittedMarkedNext]
            if emittedMarked[old.key] == old.lastSeen { emittedMarked[old.key] = nil }
            emittedMarkedRing[emittedMarkedNext] = (key, lastSeen)
            emittedMarkedNext = (emittedMarkedNext + 1) % kept
        }
        emittedMarked[key] = lastSeen
    }

    /// The rest of a marked connection already emitted: begun without a SYN, on the tuple of one emitted lately, its
    /// first packet within the close linger and the hop window of that one's last.
    func isTailOfEmitted(_ c: ConnectionState) -> Bool {
        guard !c.initiatorFromSYN, let key = c.keys.first, let last = emittedMarked[key] else { return false }
        return c.timeline.firstSeen.totalNanoseconds - last <= options.closeLingerNanos + options.hopWindowNanos
    }

    /// The last fresh joins, outbound and inbound (`contest`).
    private var recentFreshJoins: [[HopLink?]] = [[HopLink?](repeating: nil, count: Correlator.recentJoinsCompared),
                                                  [HopLink?](repeating: nil, count: Correlator.recentJoinsCompared)]
    private var recentFreshNext = [0, 0]
    static let recentJoinsCompared = 8

    /// A fresh join is the only candidate only if no other assignment fits: when the tunnel of one of the last few
    /// fresh joins in its direction could have carried this connection, and this tunnel that one's, the two could
    /// be swapped (under concurrency ztunnel's order is not the order its connections began in), and neither is
    /// unique. Without this a connection whose own tunnel an earlier connection had taken was joined to the next
    /// tunnel as "the only candidate", at high confidence: 3 of the 7 high inbound joins of a concurrent capture.
    private func contest(_ link: HopLink) {
        let d = link.hop.direction == .outbound ? 0 : 1
        for case let other? in recentFreshJoins[d] where other !== link && other.inner.hopLinks.contains(where: { $0 === other }) {
            if couldCarry(tunnelOf(other), carriedOf(link), link.hop.direction)
                && couldCarry(tunnelOf(link), carriedOf(other), link.hop.direction) {
                link.candidates = max(link.candidates, 2)
                if !other.finalized { other.candidates = max(other.candidates, 2) }
            }
        }
        recentFreshJoins[d][recentFreshNext[d]] = link
        recentFreshNext[d] = (recentFreshNext[d] + 1) % Correlator.recentJoinsCompared
    }

    /// The carried side of a join: the app's connection outbound, ztunnel's connection into the app inbound.
    private func carriedOf(_ link: HopLink) -> ConnectionState { link.hop.direction == .outbound ? link.outer : link.inner }

    /// Whether tunnel `t` could have been opened for connection `c` (the fresh joins' rules: identity, the order they
    /// began in, a tunnel still open).
    private func couldCarry(_ t: ConnectionState, _ c: ConnectionState, _ direction: ZtunnelHop.Direction) -> Bool {
        let (outer, inner) = direction == .outbound ? (c, t) : (t, c)
        guard identityMatches(outer: outer, inner: inner, direction: direction) else { return false }
        if let closed = t.closedAt, closed < c.firstSeenNanos { return false }
        return inCausalOrder(outer: outer, inner: inner, direction: direction)
    }

    // MARK: - Merging and emission

    private func merge(_ gone: ConnectionState, into keep: ConnectionState) {
        let gk = InitiatorKey(proto: gone.proto, endpoint: gone.initiator)
        if byInitiator[gk] === gone { byInitiator[gk] = nil }
        for k in gone.keys where table[k] === gone {
            table[k] = keep
            if !keep.keys.contains(k) { keep.keys.append(k) }
        }
        let room = options.maxEventsPerConnection - keep.events.count
        if room > 0 { keep.events.append(contentsOf: gone.events.prefix(room)) }
        keep.selected = keep.selected || gone.selected
        keep.sawNetfilterEvent = keep.sawNetfilterEvent || gone.sawNetfilterEvent
        keep.interfaceFirstNanos = min(keep.interfaceFirstNanos, gone.interfaceFirstNanos)
        keep.interfaceLastNanos = max(keep.interfaceLastNanos, gone.interfaceLastNanos)
        keep.timeline.droppedEvents += gone.timeline.droppedEvents + max(0, gone.events.count - max(0, room))
        for d in gone.relayOverflow where !d.claimed { keep.keepRelayDatum(d, capacity: options.relayDataKept) }
        keep.relayOverflowLostUntil = max(keep.relayOverflowLostUntil, gone.relayOverflowLostUntil)
        keep.timeline.packets += gone.timeline.packets
        keep.timeline.bytes &+= gone.timeline.bytes
        if gone.timeline.firstSeen < keep.timeline.firstSeen { keep.timeline.firstSeen = gone.timeline.firstSeen }
        keep.startExact = keep.startExact || gone.startExact
        keep.firstForwardDataNanos = min(keep.firstForwardDataNanos, gone.firstForwardDataNanos)
        if keep.timeline.lastSeen < gone.timeline.lastSeen { keep.timeline.lastSeen = gone.timeline.lastSeen }
        // The one kept is the older (the lower id), and a connection's `firstSeenNanos` is the correlator's clock when
        // it was made, which never goes back: the start stays, and so do its entries in the start-order indexes.
        assert(keep.firstSeenNanos <= gone.firstSeenNanos, "a merge keeps the connection made first")
        keep.lastSeenNanos = max(keep.lastSeenNanos, gone.lastSeenNanos)
        for m in gone.timeline.marks where !keep.timeline.marks.contains(m) { keep.timeline.marks.append(m) }
        keep.isnForward = keep.isnForward ?? gone.isnForward
        keep.isnReply = keep.isnReply ?? gone.isnReply
        keep.natInitiator = keep.natInitiator ?? gone.natInitiator
        if keep.previousOnTuple == nil, gone.previousOnTuple !== keep { keep.previousOnTuple = gone.previousOnTuple }
        if let k = gone.synKey, bySYN[k] === gone {
            if keep.synKey == nil { keep.synKey = k; bySYN[k] = keep } else { bySYN[k] = nil }
        }
        keep.finForward = keep.finForward || gone.finForward
        keep.finReply = keep.finReply || gone.finReply
        keep.reset = keep.reset || gone.reset
        keep.resetByResponder = keep.resetByResponder || gone.resetByResponder
        keep.pastHandshake = keep.pastHandshake || gone.pastHandshake
        for e in gone.timeline.icmpErrors { keep.addIcmpError(e) }
        if keep.closedAt == nil { keep.closedAt = gone.closedAt }
        if keep.tunnelIndex >= 0 {
            tunnelBegan[keep.tunnelIndex] = .min
            tunnelClosed[keep.tunnelIndex] = .max
        }
        keep.timeline.closed = keep.timeline.closed || gone.timeline.closed
        keep.ztunnelMarkFrames += gone.ztunnelMarkFrames.prefix(max(0, 4 - keep.ztunnelMarkFrames.count))
        keep.sawZtunnelConnmark = keep.sawZtunnelConnmark || gone.sawZtunnelConnmark
        keep.sawNflog = keep.sawNflog || gone.sawNflog
        keep.sawLoopback = keep.sawLoopback || gone.sawLoopback
        keep.leftFrames += gone.leftFrames.prefix(max(0, 8 - keep.leftFrames.count))
        keep.arrivedFrames += gone.arrivedFrames.prefix(max(0, 8 - keep.arrivedFrames.count))
        keep.sawRedirectHit = keep.sawRedirectHit || gone.sawRedirectHit
        keep.initiatorSentLocally = keep.initiatorSentLocally || gone.initiatorSentLocally
        keep.initiatorArrivedFromOutside = keep.initiatorArrivedFromOutside || gone.initiatorArrivedFromOutside
        keep.payloadForward &+= gone.payloadForward
        keep.payloadReply &+= gone.payloadReply
        if keep.timeline.redirect == nil { keep.timeline.redirect = gone.timeline.redirect }
        keep.hasOutboundHop = keep.hasOutboundHop || gone.hasOutboundHop
        keep.hasInboundHop = keep.hasInboundHop || gone.hasInboundHop
        for link in gone.hopLinks {
            if link.outer === gone { link.outer = keep; link.hop.outer = keep.id }
            if link.inner === gone { link.inner = keep; link.hop.inner = keep.id }
            keep.hopLinks.append(link)
        }
        gone.hopLinks = []
        keep.carriedLinks += gone.carriedLinks
        gone.carriedLinks = 0
        keep.eventsNeedSorting = true
        gone.mergedInto = keep
        removeFromOpen(gone)
        gone.emitted = true
    }

    /// An app's DNS query redirected to ztunnel's DNS proxy (15053).
    func isCapturedDNS(_ c: ConnectionState) -> Bool { redirectPort(of: c) == options.dnsCapturePort }

    /// ztunnel's DNS proxy asks the pod's resolver from its own sockets (mark 0x539), over TCP when the UDP answer
    /// came back truncated (hickory's resolver, `src/dns/forwarder.rs`): such a connection to :53 is explained by an
    /// app query to the same resolver, captured to 15053, that began shortly before it (the hop window; its slack
    /// the other way). Only the same resolver: a 0x539 connection to another host's :53 stays a finding.
    func explainedByDNSProxy(_ c: ConnectionState) -> Bool {
        guard c.responder.port == 53 else { return false }
        let from = c.firstSeenNanos - options.hopWindowNanos, to = c.firstSeenNanos + options.hopSlackNanos
        let resolver = c.responder.addr
        if dnsCaptureStarts.contains(where: { $0.start >= from && $0.start <= to && $0.resolver == resolver }) { return true }
        return open.contains { $0 !== c && $0.firstSeenNanos >= from && $0.firstSeenNanos <= to && isCapturedDNS($0)
            && $0.responder.addr == resolver }
    }

    private func removeFromOpen(_ c: ConnectionState) {
        let t = c.tunnelIndex
        if t >= 0, t < tunnels.count, tunnels[t] === c {
            let last = tunnels.removeLast()
            let began = tunnelBegan.removeLast(), closed = tunnelClosed.removeLast()
            if last !== c { tunnels[t] = last; tunnelBegan[t] = began; tunnelClosed[t] = closed; last.tunnelIndex = t }
            c.tunnelIndex = -1
        }
        let i = c.openIndex
        guard i >= 0, i < open.count, open[i] === c else { return }
        let last = open.removeLast()
        if last !== c { open[i] = last; last.openIndex = i }
        c.openIndex = -1
    }

    /// A connection replaced by a new one on the same tuple: closed now if it was not, and out of the lookups, so
    /// its tuple and its endpoints go to the new one; emitted after the close linger like any other, so its late
    /// records (`previousOwner`) still find it.
    private func retire(_ c: ConnectionState) {
        c.retired = true
        markClosed(c)
        leaveLookups(c)
        c.previousOnTuple = nil
    }

    /// `c` closed now, unless it had already (its tunnel's close time too, for relay timing).
    private func markClosed(_ c: ConnectionState) {
        guard c.closedAt == nil else { return }
        c.closedAt = now
        if c.tunnelIndex >= 0 { tunnelClosed[c.tunnelIndex] = now }
    }

    /// `c` no longer answers for its tuples in the flow table nor for its initiator's endpoint (or its remapped one)
    /// in `byInitiator`: retired (they are the new connection's) or emitted.
    private func leaveLookups(_ c: ConnectionState) {
        for k in c.keys where table[k] === c { table[k] = nil }
        let ik = InitiatorKey(proto: c.proto, endpoint: c.initiator)
        if byInitiator[ik] === c { byInitiator[ik] = nil }
        if let nat = c.natInitiator {
            let nk = InitiatorKey(proto: c.proto, endpoint: nat)
            if byInitiator[nk] === c { byInitiator[nk] = nil }
        }
    }

    /// More connections open than `options.maxOpenConnections`: the 1/16 of them whose last packet is oldest are
    /// emitted now, as a sweep would emit them (their joins first), each not closed yet marked ended early and
    /// counted. Only a flood (SYNs nobody answers, a scan) fills the table; it then costs one pass over it every 1/16
    /// of the cap of new connections, and the memory stays what that many connections hold. Also while a live reader
    /// holds sweeps (`holdSweeps`): a backlog placed then may split a connection, but memory comes first.
    private func endLeastRecent() {
        let n = open.count
        let k = max(1, min(n, options.maxOpenConnections / 16))
        // The k-th smallest last-seen time (a selection, not a sort: the table is large when this runs), then the
        // connections at or below it, up to k.
        var times = open.map(\.lastSeenNanos)
        let threshold = Correlator.select(&times, k - 1)
        var batch: [ConnectionState] = []
        batch.reserveCapacity(k)
        for c in open where c.lastSeenNanos < threshold { batch.append(c) }
        for c in open where batch.count < k && c.lastSeenNanos == threshold { batch.append(c) }
        // A closed one only loses the rest of its linger (a port reused many times over lingers that way): not ended
        // early, and not counted.
        for c in batch where c.closedAt == nil {
            c.endedEarly = true
            summary.connectionsEndedEarly += 1
        }
        batch.sort { $0.id < $1.id }
        emit(batch)
    }

    /// The `k`-th smallest of `values` (0-based; the array is reordered): Hoare's selection, the middle of three as
    /// the pivot.
    static func select(_ values: inout [Int64], _ k: Int) -> Int64 {
        var lo = 0, hi = values.count - 1
        while lo < hi {
            let mid = lo + (hi - lo) / 2
            let pivot = max(min(values[lo], values[mid]), min(max(values[lo], values[mid]), values[hi]))
            var i = lo, j = hi
            while i <= j {
                while values[i] < pivot { i += 1 }
                while values[j] > pivot { j -= 1 }
                if i <= j { values.swapAt(i, j); i += 1; j -= 1 }
            }
            if k <= j { hi = j } else if k >= i { lo = i } else { return values[k] }
        }
        return values[k]
    }

    private func sweep() {
        var ready: [ConnectionState] = []
        for c in open {
            if let closed = c.closedAt {
                if now - closed >= options.closeLingerNanos { ready.append(c) }
            } else {
                let idle = c.proto == IPProto.tcp ? options.tcpIdleTimeoutNanos : options.otherIdleTimeoutNanos
                if now - c.lastSeenNanos >= idle { ready.append(c) }
            }
        }
        if ready.isEmpty { return }
        ready.sort { $0.id < $1.id }
        emit(ready)
    }

    /// Emits connections that finish together (a sweep, the end, one retired connection), in this order. Each gets
    /// its last-chance joins first, all of them before the first is emitted, so a tunnel emitted in the same batch
    /// is still there for the connections it carried.
    private func emit(_ batch: [ConnectionState]) {
        for c in batch { lastChanceJoins(c) }
        relinkByRelayTiming(batch)
        explainByOrderChains(batch)
        // Evidence too, before any is emitted: it looks at the tunnels still open (`hopEvidence`).
        for c in batch where !c.emitted { for link in c.hopLinks { finalize(link) } }
        for c in batch { emitJoined(c) }
    }

    private func finalize(_ link: HopLink) {
        guard !link.finalized else { return }
        link.finalized = true
        let (ev, conf) = hopEvidence(outer: link.outer, inner: link.inner, direction: link.hop.direction,
                                     candidates: link.candidates, pooled: link.pooled, relay: link.relay,
                                     takenBackFrom: link.takenBackFrom, chain: link.chain)
        link.hop.evidence = ev
        link.hop.confidence = conf
        addByteEvidence(&link.hop, outer: link.outer, inner: link.inner)
    }

    /// The joins a connection about to be emitted may still get: outbound, a tunnel opened for it (late), a pooled
    /// tunnel to its destination, then a tunnel without an identity match (the app dialled a service VIP, which
    /// ztunnel resolved to a pod); inbound, a pooled tunnel.
    private func lastChanceJoins(_ c: ConnectionState) {
        guard !c.emitted, c.mergedInto == nil else { return }
        if c.pendingRoles.contains(.outerOutbound) && !c.hasOutboundHop {
            // Connections that began before this one and are still without a tunnel choose first, in the order they
            // began: with VIPs, ztunnel's tunnels match no app's destination, and came in the order it accepted the
            // connections; this one, emitted first, would otherwise take an earlier one's tunnel, and so on down
            // the line (under concurrency, all but one such tunnel read as forged marks when each was left to a
            // lone-tunnel rule).
            earlierAppsChoose(before: c.firstSeenNanos, excluding: c)
            outboundLastChance(c)
        } else if c.pendingRoles.contains(.innerOutbound) && !c.hasOutboundHop && c.sawZtunnelMark {
            // A tunnel emitted before the app connection it carried is: closed and swept first. With a VIP that app
            // joins only at its own emission, too late: the tunnel would read as a forged mark, and the next app,
            // taking the tunnel after, shifts every later join by one. The apps that began before it (within the
            // VIP rule's skew) choose now, in that order.
            earlierAppsChoose(before: c.firstSeenNanos + Correlator.vipSkewNanos + 1, excluding: c)
        }
        if c.pendingRoles.contains(.innerInbound) && !c.hasInboundHop, let (h, n) = pooledTunnel(for: c, outbound: false) {
            join(.inbound, outer: h, inner: c, evidence: [], confidence: .low, candidates: n, pooled: true)
        }
    }

    /// The app connections still without a tunnel that began before `before` take their last-chance joins, in the
    /// order they began (`lastChanceJoins`).
    private func earlierAppsChoose(before: Int64, excluding c: ConnectionState) {
        appsByStart.dropFront { !waiting($0, asOuter: true) }
        // Gathered first: a join may list a connection again (a contest), which adds to the index. Into an array kept
        // between calls, so an emission allocates nothing for it (nothing below calls back in here).
        earlierApps.removeAll(keepingCapacity: true)
        var i = appsByStart.head
        while i < appsByStart.entries.count, appsByStart.entries[i].first < before {
            let e = appsByStart.entries[i]
            if e.conn !== c && waiting(e, asOuter: true) { earlierApps.append(e.conn) }
            i += 1
        }
        for e in earlierApps where !e.hasOutboundHop { outboundLastChance(e) }
        earlierApps.removeAll(keepingCapacity: true)
    }

    private func outboundLastChance(_ c: ConnectionState) {
        guard !c.hasOutboundHop, !c.emitted, c.mergedInto == nil else { return }
        if let (z, ev, conf, n) = identityPartner(for: c, asOuter: true) {
            join(.outbound, outer: c, inner: z, evidence: ev, confidence: conf, candidates: n)
        } else if let (z, n) = pooledTunnel(for: c, outbound: true) {
            // A tunnel ztunnel opened earlier to the same destination and kept (pooled): an identity match, so
            // before a tunnel that matches none.
            join(.outbound, outer: c, inner: z, evidence: [], confidence: .low, candidates: n, pooled: true)
        } else if let (z, n) = vipTunnel(for: c) {
            join(.outbound, outer: c, inner: z, evidence: [], confidence: .low, candidates: n).byStartOrder = true
        } else if let (z, n, from) = vipExchange(for: c) {
            let link = join(.outbound, outer: c, inner: z, evidence: [], confidence: .low, candidates: n)
            link.byStartOrder = true
            link.takenBackFrom = from
        } else if let (z, n) = pooledTunnel(for: c, outbound: true, anyPeer: true) {
            // A VIP's connection through a tunnel ztunnel kept open to the pod it resolved the VIP to (pooled, perhaps
            // opened before the capture began): no new tunnel, and none names the VIP.
            join(.outbound, outer: c, inner: z, evidence: [], confidence: .low, candidates: n, pooled: true)
        } else if let (z, n) = sharedTunnel(for: c) {
            join(.outbound, outer: c, inner: z, evidence: [], confidence: .low, candidates: n, pooled: true)
        }
    }

    /// The tunnel a connection with no hop of its own shared with another one that began with it. ztunnel sends the
    /// connections to a destination as HTTP/2 streams over one HBONE connection; one that comes while that
    /// connection is being opened for another waits for it and goes through it too, so the tunnel began after it did,
    /// and is joined (fresh) to the connection it was opened for. Every rule above wants a tunnel no connection
    /// explains or one open before this connection began: such a connection was left with no hop (1 of 10 in a
    /// lab run of 5 concurrent connections over one multiplexed tunnel). The tunnel: ztunnel's connection from the
    /// pod, opened after this connection's SYN (so open while it ran), within the hop window and before this
    /// connection's last packet, joined already to the connection it was opened for, to the connection's original
    /// destination (when none goes there, a marked one to any peer: a service VIP). The earliest (the one ztunnel
    /// was opening when this connection came) and how many there were; the last rule tried, so a tunnel of its own
    /// or a pooled one always wins.
    private func sharedTunnel(for c: ConnectionState) -> (ConnectionState, Int)? {
        guard c.proto == IPProto.tcp, c.originalKnown, c.initiatorFromSYN else { return nil }
        let start = c.firstSeenNanos
        let latest = min(start + options.hopWindowNanos, c.lastSeenNanos)
        var samePeer: (ConnectionState, Int)?, anyPeer: (ConnectionState, Int)?
        // `tunnelBegan` is the start of a tunnel whose SYN was seen (else .min): begun after this one's.
        for i in tunnels.indices where tunnelBegan[i] > start && tunnelBegan[i] <= latest {
            let p = tunnels[i]
            guard p !== c, !p.emitted, p.mergedInto == nil, initiatorIsLocal(p), p.responder.port == options.hbonePort,
                  !began(p, afterTheEndOf: c),
                  p.hopLinks.contains(where: { $0.hop.direction == .outbound && !$0.pooled }) else { continue }
            func take(_ best: inout (ConnectionState, Int)?) {
                if let (b, n) = best { best = (p.firstSeenNanos < b.firstSeenNanos ? p : b, n + 1) } else { best = (p, 1) }
            }
            if p.responder.addr == c.responder.addr { take(&samePeer) } else if p.sawZtunnelMark { take(&anyPeer) }
        }
        return samePeer ?? anyPeer
    }

    private func emitJoined(_ c: ConnectionState) {
        guard !c.emitted else { return }
        c.emitted = true
        c.previousOnTuple = nil
        leaveLookups(c)
        if let k = c.synKey, bySYN[k] === c { bySYN[k] = nil }
        removeFromOpen(c)

        var t = c.timeline
        t.original = FiveTuple(proto: c.proto, src: c.initiator, dst: c.responder)
        // Its SYN answered by a RST from the other end, no SYN-ACK seen at any point, and nothing past the handshake
        // (a SYN-ACK the capture missed): nothing listened there.
        t.refused = c.resetByResponder && c.isnForward != nil && c.isnReply == nil && !c.pastHandshake
        t.endedEarly = c.endedEarly
        t.aliases = []
        if let nat = c.natResponder {
            t.aliases.append(FiveTuple(proto: c.proto, src: c.natInitiator ?? c.initiator, dst: nat))
        }
        if c.sawNetfilterEvent && c.sawInterfaceEvent && retimeNetfilterEvents(c, &t) { c.eventsNeedSorting = true }
        if c.eventsNeedSorting { sortEvents(c) }
        if !t.icmpErrors.isEmpty { Correlator.settleIcmpErrorTimes(&t.icmpErrors, c.events) }
        var events = TimelineEventList(events: c.events, initiator: c.initiator, natInitiator: c.natInitiator, context: context)
        c.events = []
        t.hops = c.hopLinks.map { link in
            finalize(link)
            return link.hop
        }
        let (kind, findings) = classify(c)
        t.kind = kind
        // After its own classification, which asks whether it is the tail of one emitted before. Only ztunnel's own
        // connections out of the pod (a tunnel, a passthrough), whose tails would read as a forged mark.
        if c.sawZtunnelMark, kind == .hboneOutbound || kind == .ztunnelPassthrough, let key = c.keys.first {
            rememberEmittedMarked(key, lastSeen: c.timeline.lastSeen.totalNanoseconds)
        }
        if isCapturedDNS(c) {
            if dnsCaptureStarts.count == 16 { dnsCaptureStarts.removeFirst() }
            dnsCaptureStarts.append((c.firstSeenNanos, c.responder.addr))
        }
        // With a filter: shown when a packet of its own matched, or one of a connection a hop joins it to (the
        // app's connection and ztunnel's leg for it are shown together, whichever matched).
        let shown = !options.showsOnlySelected || c.selected || c.hopLinks.contains { $0.outer.selected || $0.inner.selected }
        if !shown {
            // Both ends of a plain hop are hidden together: counted once, from the outer side.
            summary.hops -= c.hopLinks.reduce(0) { $0 + ($1.outer === c ? 1 : 0) }
        }
        c.hopLinks = []
        if shown {
            summary.connections += 1
            if t.refused { summary.refusedConnections += 1 }
            if !t.icmpErrors.isEmpty { summary.connectionsWithIcmpErrors += 1 }
            sink.connection(t, events: events)
        } else {
            summary.connectionsFilteredOut = (summary.connectionsFilteredOut ?? 0) + 1
        }
        recycle(&events)
        if shown { for f in findings { report(f) } }
    }

    /// Emitted connections' event arrays, emptied, for new connections: one allocation (and its growth) saved per
    /// connection. Bounded, so memory stays bounded by the open connections.
    private var spareEventArrays: [[CompactEvent]] = []

    private func recycle(_ list: inout TimelineEventList) {
        var events = list.events
        list = TimelineEventList(events: [], initiator: list.initiator, natInitiator: nil, context: context)
        // At most 64 arrays (live: as many as there are open connections, so the spares never outnumber the arrays
        // in use), of at most 128 events: an array that grew past that (a long connection, a huge --max-events)
        // is not parked.
        let bound = options.spareEventArraysFollowOpenConnections ? max(64, open.count) : 64
        guard spareEventArrays.count < bound, events.capacity <= 128 else { return }
        // The array is ours alone unless a sink kept the list; then emptying it gets new storage of the same size.
        events.removeAll(keepingCapacity: true)
        spareEventArrays.append(events)
    }

    /// libpcap stamps NFLOG records when it receives them, in batches up to a second late. An NFLOG event that
    /// copies a packet also captured on an interface (same IP ID, TCP seq/ack and flags, same direction) takes that
    /// packet's time, so the timeline reads in the order the kernel handled the packet.
    private func retimeNetfilterEvents(_ c: ConnectionState, _ t: inout ConnectionTimeline) -> Bool {
        var changed = false
        c.events.withUnsafeMutableBufferPointer { ev in
            if ev.count <= 512 {
                // The interface events' identities, packed, in event order: the scan for each NFLOG event reads
                // these few words instead of whole events, and the first match wins (as the map below keeps the
                // first). Quadratic, so only up to the default 512 events kept per connection.
                withUnsafeTemporaryAllocation(of: (UInt64, UInt64, Int).self, capacity: ev.count) { wire in
                    var n = 0
                    for j in ev.indices where ev[j].pointKind == .interface {
                        let (a, b, _) = ev[j].packedIdentity
                        wire[n] = (a, b, j)
                        n += 1
                    }
                    guard n > 0 else { return }
                    for i in ev.indices where ev[i].pointKind == .netfilter {
                        let (a, b, _) = ev[i].packedIdentity
                        for k in 0..<n where wire[k].0 == a && wire[k].1 == b {
                            let j = wire[k].2
                            if ev[i].time != ev[j].time { ev[i].time = ev[j].time; changed = true }
                            break
                        }
                    }
                }
            } else {
                var wire: [PacketIdentity: Timestamp] = [:]
                for e in ev where e.pointKind == .interface {
                    let k = PacketIdentity(e)
                    if wire[k] == nil { wire[k] = e.time }
                }
                for i in ev.indices where ev[i].pointKind == .netfilter {
                    if let time = wire[PacketIdentity(ev[i])], time != ev[i].time { ev[i].time = time; changed = true }
                }
            }
        }
        if changed && t.droppedEvents == 0, var first = c.events.first?.time {
            var last = first
            c.events.withUnsafeBufferPointer { ev in
                for i in ev.indices {
                    let time = ev[i].time
                    if time < first { first = time }
                    if last < time { last = time }
                }
            }
            t.firstSeen = first
            t.lastSeen = last
        }
        return changed
    }

    /// Each ICMP error's time is its earliest copy's, once NFLOG copies took their captured packet's time: the copy
    /// read first may be a locally sent error's NFLOG record at OUTPUT, which has no kernel stamp (receipt time,
    /// ~10 ms late), while lo captured the same error at once.
    static func settleIcmpErrorTimes(_ errors: inout [IcmpError], _ events: [CompactEvent]) {
        for i in errors.indices {
            let port = UInt16(errors[i].type) << 8 | UInt16(errors[i].code)
            for e in events where e.tuple.proto == errors[i].proto && e.tuple.src.port == port && e.time < errors[i].time {
                errors[i].time = e.time
            }
        }
    }

    /// By time; at equal times the kernel's order: OUTPUT/POSTROUTING hooks run before a packet is captured
    /// leaving (lo's copy too), PREROUTING/INPUT after it is captured arriving. Stable otherwise.
    private func sortEvents(_ c: ConnectionState) {
        func rank(_ e: CompactEvent) -> Int {
            guard e.pointKind == .netfilter else { return 1 }
            switch e.hook {
            case .output, .postrouting: return 0
            default: return 2
            }
        }
        // Usually already in order once retimed: one pass, no allocation, settles that.
        let inOrder = c.events.withUnsafeBufferPointer { ev -> Bool in
            guard ev.count > 1 else { return true }
            var previous = (ev[0].time.totalNanoseconds, rank(ev[0]))
            for i in 1..<ev.count {
                let key = (ev[i].time.totalNanoseconds, rank(ev[i]))
                if key.0 < previous.0 || (key.0 == previous.0 && key.1 < previous.1) { return false }
                previous = key
            }
            return true
        }
        if inOrder { return }
        let n = c.events.count
        if n <= 1024 {
            // Nearly in order (NFLOG events retimed a few places back): a stable insertion sort of (time, rank,
            // index) keys moves only what is out of place; then one pass builds the sorted events.
            do {
                let keys = sortKeys
                c.events.withUnsafeBufferPointer { ev in
                    for i in 0..<n { keys[i] = (ev[i].time.totalNanoseconds, rank(ev[i]), i) }
                }
                for i in 1..<n {
                    let x = keys[i]
                    var j = i - 1
                    while j >= 0 && (x.0 < keys[j].0 || (x.0 == keys[j].0 && x.1 < keys[j].1)) {
                        keys[j + 1] = keys[j]
                        j -= 1
                    }
                    keys[j + 1] = x
                }
                // Rewritten in place from a copy: no new array.
                c.events.withUnsafeMutableBufferPointer { ev in
                    let old = sortScratch
                    old.initialize(from: ev.baseAddress!, count: n)
                    for k in 0..<n { ev[k] = old[keys[k].2] }
                    old.deinitialize(count: n)
                }
            }
            return
        }
        let keys = c.events.map { ($0.time.totalNanoseconds, rank($0)) }
        let order = keys.indices.sorted { a, b in
            if keys[a].0 != keys[b].0 { return keys[a].0 < keys[b].0 }
            return keys[a].1 != keys[b].1 ? keys[a].1 < keys[b].1 : a < b
        }
        if order.elementsEqual(keys.indices) { return }
        c.events = order.map { c.events[$0] }
    }

    private func addByteEvidence(_ hop: inout ZtunnelHop, outer: ConnectionState, inner: ConnectionState) {
        let outerBytes = outer.payloadForward + outer.payloadReply
        let innerBytes = inner.payloadForward + inner.payloadReply
        guard outerBytes > 0, innerBytes > 0 else { return }
        // HBONE/mTLS wraps the app's bytes, so the tunnel carries at least as many.
        let consistent = hop.direction == .outbound ? innerBytes >= outerBytes : outerBytes >= innerBytes
        let outbound = hop.direction == .outbound
        hop.evidence.append(HopEvidence(consistent
            ? .bytesConsistent(outbound: outbound, larger: max(innerBytes, outerBytes), smaller: min(innerBytes, outerBytes))
            : .bytesInconsistent(outbound: outbound, inner: innerBytes, outer: outerBytes)))
    }

    private func report(_ f: EscapeFinding) {
        let limit = f.isEscape ? options.maxFindingsKept : options.maxFindingsKept / 10
        let kept = f.isEscape ? escapesKept : byDesignKept
        if kept < limit {
            summary.findings.append(f)
            if f.isEscape { escapesKept += 1 } else { byDesignKept += 1 }
        } else {
            findingsOmitted += 1
        }
        sink.finding(f)
    }

    /// Ends the analysis: emits every connection still open (by id) and returns the totals.
    @discardableResult
    public func finish() -> AnalysisSummary {
        let rest = open.sorted { $0.id < $1.id }
        emit(rest)
        outerOutbound = []; innerOutbound = []; outerInbound = []; innerInbound = []
        outerOutboundByAddress = [:]; innerOutboundByAddress = [:]
        appsByStart.removeAll(); tunnelsByStart.removeAll()
        var s = summary
        s.ruleHits = []
        for (i, n) in hitCounts.enumerated() where n > 0 {
            let id = UInt32(i)
            let tag = tags.tag(for: id)
            s.ruleHits.append((prefix: tags.text(for: id), tag: tag, rule: tag.flatMap { ruleset?.rule(for: $0) }, count: n))
        }
        s.ruleHits.sort { $0.prefix < $1.prefix }
        s.findingsOmitted = findingsOmitted
        s.podAddresses = podAddresses
        return s
    }
}

/// The NFLOG fields the correlator reads, taken out of the record once per packet.
struct NflogFacts {
    var present = false
    var hook = NetfilterHook.unknown
    var prefixID: UInt32 = 0
    var mark: UInt32? = nil
    var inputIfindex: UInt32? = nil
    var outputIfindex: UInt32? = nil
    var hasConntrack = false

    @inline(__always)
    init(_ r: borrowing PacketRecord) {
        guard r.hasNflog else { return }
        present = true
        hook = r.nflogFields.hook
        prefixID = r.nflogFields.prefixID
        mark = r.nflogFields.mark
        inputIfindex = r.nflogFields.inputIfindex
        outputIfindex = r.nflogFields.outputIfindex
        hasConntrack = r.nflogFields.hasConntrack
    }
}

func hex(_ v: UInt32) -> String { String(v, radix: 16) }

func formatDelta(_ nanos: Int64) -> String {
    var words = EvidenceString()
    words.delta(nanos)
    return words.text
}

extension Array where Element == FrameRef {
    /// Appends while fewer than `limit` are kept; the first append reserves all `limit` (one allocation, not one
    /// per doubling).
    @inline(__always)
    mutating func appendBounded(_ ref: FrameRef, limit: Int) {
        guard count < limit else { return }
        if isEmpty { reserveCapacity(limit) }
        append(ref)
    }
}
