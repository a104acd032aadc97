// The words of a hop's evidence, written once for both readers: a String for whoever reads `detail`
// (the HTML page, tests), the printers' byte buffer for the text and JSON reports, which write them straight
// in without building a String per piece.

extension HopEvidence {
    /// What a piece of evidence says, with its numbers.
    enum Fact: Sendable {
        /// Words given by whoever made the evidence (`init(kind:detail:)`, or a `kind`/`detail` assigned).
        case worded(kind: String, detail: String)
        case ztunnelMark(UInt32, frame: FrameRef)
        case ztunnelConnmark(UInt32)
        case hbonePort(UInt16)
        case passthroughDestination(Endpoint)
        case hboneDestination(IPAddress, original: Endpoint)
        case clientAddress(inner: IPAddress, outer: IPAddress)
        case originalPort(UInt16)
        case timing(nanos: Int64)
        case onlyCandidate(windowNanos: Int64)
        case earliestCandidate(of: Int, windowNanos: Int64)
        /// A join without identity (the app dialled a service VIP, which ztunnel resolved to an endpoint): the earliest
        /// of `of` marked connections (tunnels, passthroughs) no other connection explains that began while it ran;
        /// `takenBackFrom`: the connection that had it by the order, which began earlier and took another.
        /// `chain`: how many joins by the order moved along with this one so that a marked connection left to none
        /// was explained (`Correlator.explainByOrderChain`); 0 when none did.
        case unexplainedMarkedConnection(of: Int, takenBackFrom: ConnectionID?, chain: Int = 0)
        /// A fresh join while `open` tunnels to the same peer, open already, could have carried the connection instead.
        case alsoOpenTunnels(candidates: Int, open: Int, windowNanos: Int64, outbound: Bool)
        /// A pooled join: the tunnel (the inner connection outbound, the outer inbound) was open already, since
        /// `openedBefore` before the connection it carried.
        case pooledTunnel(outbound: Bool, openedBefore: Int64)
        /// A pooled join whose tunnel was first seen mid-stream after the connection began: open before the capture.
        case pooledTunnelBeforeCapture(outbound: Bool)
        /// A pooled join whose tunnel ztunnel opened `openedAfter` after the connection began, for another connection:
        /// this one shared it (`Correlator.sharedTunnel`).
        case sharedTunnel(openedAfter: Int64)
        case onlyOpenTunnel
        /// Chosen among `tunnels` open tunnels by relay timing: `matched` of the carried connection's `packets` data
        /// packets have a twin in this tunnel, in the same direction, within `windowNanos` (relayed before the tunnel's
        /// twin going out, after it coming in); the next best tunnel could have matched `runnerUp` (its twins counted even
        /// where the pairing gave them to another connection).
        /// `blind` of the tunnels no longer kept data packets from the connection's time (`ConnectionState.relayOverflow`).
        /// `passthroughs` of the `tunnels` were ztunnel's passthroughs (plain copies to endpoints outside the mesh), and
        /// `intoPassthrough` says the chosen one is one.
        case relayTiming(outbound: Bool, matched: Int, packets: Int, largestGap: Int64, windowNanos: Int64, tunnels: Int, runnerUp: Int,
                         blind: Int, overruled: Bool, passthroughs: Int = 0, intoPassthrough: Bool = false)
        case newestOpenTunnel(of: Int)
        /// Byte counts that fit a tunnel; `outbound`: the inner connection is the tunnel (else the outer one).
        case bytesConsistent(outbound: Bool, larger: UInt64, smaller: UInt64)
        case bytesInconsistent(outbound: Bool, inner: UInt64, outer: UInt64)

        /// What relay timing compared, after their count: " open tunnels", or with passthroughs among them
        /// " connections of ztunnel's (T open tunnels, P passthroughs)".
        private static func openWords<W: EvidenceWriter>(_ all: Int, _ passthroughs: Int, into w: inout W) {
            guard passthroughs > 0 else { w.words(" open tunnels"); return }
            let tunnels = all - passthroughs
            w.words(" connections of ztunnel's ("); w.signed(Int64(tunnels)); w.words(tunnels == 1 ? " open tunnel, " : " open tunnels, ")
            w.signed(Int64(passthroughs)); w.words(passthroughs == 1 ? " passthrough)" : " passthroughs)")
        }

        private static func blindWords<W: EvidenceWriter>(_ blind: Int, into w: inout W) {
            guard blind > 0 else { return }
            w.words("; "); w.signed(Int64(blind))
            w.words(" of them no longer kept packets from its time (a tunnel past --max-events keeps only its latest data packets): those were not compared")
        }

        /// The kind's words (nil for `.worded`, whose kind is a String).
        var kindWords: StaticString? {
            switch self {
            case .worded: return nil
            case .ztunnelMark: return "ztunnel-mark"
            case .ztunnelConnmark: return "ztunnel-connmark"
            case .hbonePort: return "hbone-port"
            case .passthroughDestination, .hboneDestination: return "original-destination"
            case .clientAddress: return "client-address"
            case .originalPort: return "original-port"
            case .timing: return "timing"
            case .onlyCandidate, .earliestCandidate, .unexplainedMarkedConnection, .alsoOpenTunnels, .onlyOpenTunnel, .newestOpenTunnel: return "unique"
            case .pooledTunnel, .pooledTunnelBeforeCapture, .sharedTunnel: return "pooled-tunnel"
            case .relayTiming: return "relay-timing"
            case .bytesConsistent, .bytesInconsistent: return "bytes"
            }
        }

        /// The detail's words.
        func word<W: EvidenceWriter>(into w: inout W) {
            switch self {
            case .worded(_, let detail):
                w.string(detail)
            case .ztunnelMark(let mark, let f):
                w.words("inner connection carries ztunnel's mark 0x"); w.hex(mark)
                w.words(" (frame "); w.number(UInt64(f.source)); w.words(":"); w.number(f.frame); w.words(")")
            case .ztunnelConnmark(let mark):
                w.words("inner connection has connmark 0x"); w.hex(mark); w.words(" (ztunnel's connection into the pod)")
            case .hbonePort(let port):
                w.words("inner connection goes to :"); w.number(UInt64(port)); w.words(" (HBONE) without being redirected")
            case .passthroughDestination(let e):
                w.words("passthrough destination "); w.endpoint(e); w.words(" equals the app's original destination")
            case .hboneDestination(let a, let original):
                w.words("HBONE destination "); w.address(a); w.words(" equals the app's original destination ")
                w.endpoint(original)
            case .clientAddress(let inner, let outer):
                w.words("inner source "); w.address(inner); w.words(" equals the outer client "); w.address(outer)
            case .originalPort(let port):
                w.words("inner destination port "); w.number(UInt64(port)); w.words(" equals the original destination port")
            case .timing(let nanos):
                w.words("inner connection starts "); w.delta(nanos); w.words(" after the outer one")
            case .onlyCandidate(let window):
                w.words("the only candidate within "); w.delta(window)
            case .earliestCandidate(let n, let window):
                w.words("one of "); w.signed(Int64(n)); w.words(" candidates within "); w.delta(window)
                w.words("; the earliest was chosen")
            case .unexplainedMarkedConnection(let n, let from, let chain):
                w.words("no connection of ztunnel's names the original destination (a service VIP ztunnel resolved to an endpoint): ")
                if chain == 1 {
                    w.words("a marked connection that began while this one ran, which the joins by the order had left to no connection")
                    return
                } else if chain > 1 {
                    w.words("a marked connection that began while this one ran; the joins by the order had left one to no connection, ")
                    w.words("and this join moved with "); w.signed(Int64(chain - 1))
                    w.words(chain == 2 ? " other" : " others"); w.words(" along a chain to explain it")
                    return
                }
                if n <= 1 { w.words("the only marked connection") } else { w.words("one of "); w.signed(Int64(n)); w.words(" marked connections") }
                w.words(" no other connection explains that began while this one ran")
                if let from {
                    w.words(", taken back from #"); w.signed(Int64(from))
                    w.words(", which began earlier and had it by the order, and took another that began while it ran")
                } else if n > 1 { w.words("; the earliest was chosen, as connections without one choose in the order they began") }
            case .alsoOpenTunnels(let n, let open, let window, let outbound):
                if n <= 1 { w.words("the only new candidate within ") } else {
                    w.words("one of "); w.signed(Int64(n)); w.words(" new candidates within ")
                }
                w.delta(window); w.words(", but "); w.signed(Int64(open))
                w.words(open == 1 ? " tunnel" : " tunnels")
                w.words(outbound ? " to the same peer" : " from the same client")
                w.words(", open already, carried packets while it ran and may have carried it instead (pooled)")
                if n > 1 { w.words("; the earliest was chosen") }
            case .pooledTunnel(let outbound, let opened):
                w.words(outbound ? "inner" : "outer"); w.words(" connection (the tunnel) was open already, since ")
                w.delta(opened); w.words(" before the "); w.words(outbound ? "outer" : "inner")
                w.words(" one, and carried packets while it ran: a pooled HBONE connection")
            case .pooledTunnelBeforeCapture(let outbound):
                w.words(outbound ? "inner" : "outer"); w.words(" connection (the tunnel) was open before the capture began (first seen mid-stream, with no SYN, after the ")
                w.words(outbound ? "outer" : "inner"); w.words(" one's SYN), and carried packets while it ran: a pooled HBONE connection")
            case .sharedTunnel(let opened):
                w.words("inner connection (the tunnel) was opened "); w.delta(opened)
                w.words(" after the outer one began, for a connection that began with it, and carried packets while it ran: a pooled HBONE connection both shared")
            case .onlyOpenTunnel:
                w.words("the only open tunnel that fits")
            case .relayTiming(let outbound, let matched, let packets, _, let window, let tunnels, let runnerUp, let blind, true,
                              let passthroughs, let intoPassthrough):
                w.signed(Int64(matched)); w.words(" of "); w.signed(Int64(packets)); w.words(" data packets of the ")
                w.words(outbound ? "outer" : "inner"); w.words(intoPassthrough ? " connection have a twin in this passthrough within "
                                                                              : " connection have a twin in this tunnel within ")
                w.delta(window); w.words(", another of the "); w.signed(Int64(tunnels)); Self.openWords(tunnels, passthroughs, into: &w)
                w.words(" matched "); w.signed(Int64(runnerUp))
                w.words(": the timing points elsewhere, but under load it is noisy, and the join stands on the order ")
                w.words(passthroughs > 0 ? "ztunnel's connections opened in (none is taken" : "the tunnels opened in (no tunnel is taken")
                w.words(" from the connection it was opened for, or left with none, on timing alone)")
                Self.blindWords(blind, into: &w)
            case .relayTiming(let outbound, let matched, let packets, _, let window, let tunnels, _, let blind, _, let passthroughs, _)
                where matched == 0:
                w.words("none of "); w.signed(Int64(packets)); w.words(" data packets of the ")
                w.words(outbound ? "outer" : "inner"); w.words(" connection has a twin within "); w.delta(window)
                w.words(" in any of "); w.signed(Int64(tunnels)); Self.openWords(tunnels, passthroughs, into: &w)
                w.words(" that could have carried it: timing cannot tell which did")
                Self.blindWords(blind, into: &w)
            case .relayTiming(let outbound, let matched, let packets, let gap, let window, let tunnels, let runnerUp, let blind, _,
                              let passthroughs, let intoPassthrough):
                w.signed(Int64(matched)); w.words(" of "); w.signed(Int64(packets)); w.words(" data packets of the ")
                w.words(outbound ? "outer" : "inner"); w.words(intoPassthrough ? " connection have a twin in the passthrough within "
                                                                              : " connection have a twin in the tunnel within ")
                w.delta(window); w.words(" (the largest gap "); w.delta(gap); w.words("); of ")
                w.signed(Int64(tunnels)); Self.openWords(tunnels, passthroughs, into: &w)
                w.words(" that could have carried it, the next best could have matched ")
                w.signed(Int64(runnerUp))
                // Counted as if no other connection had taken a packet: a twin nearer another connection's packet
                // counts for it, so it may be as many as this tunnel's or more.
                if runnerUp >= matched { w.words(" (counting twins nearer other connections' packets)") }
                Self.blindWords(blind, into: &w)
            case .newestOpenTunnel(let n):
                w.words("one of "); w.signed(Int64(n)); w.words(" open tunnels that fit; the newest was chosen")
            case .bytesConsistent(let outbound, let larger, let smaller):
                w.words(outbound ? "inner" : "outer"); w.words(" carried "); w.number(larger); w.words(" payload bytes, ")
                w.words(outbound ? "outer" : "inner"); w.words(" "); w.number(smaller); w.words(": consistent with tunnelling")
            case .bytesInconsistent(let outbound, let inner, let outer):
                w.words(outbound ? "inner" : "outer"); w.words(" carried fewer payload bytes than ")
                w.words(outbound ? "outer" : "inner"); w.words(" ("); w.number(inner); w.words(" vs "); w.number(outer)
                w.words("): not consistent (capture cut?)")
            }
        }
    }
}

/// Where evidence (and a time difference) is worded: a String, or a printer's byte buffer.
protocol EvidenceWriter {
    mutating func words(_ s: StaticString)
    /// Not `words(_:)`: a literal would pick a String overload (String is the default literal type).
    mutating func string(_ s: String)
    mutating func number(_ v: UInt64)
    mutating func signed(_ v: Int64)
    mutating func hex(_ v: UInt32)
    mutating func address(_ a: IPAddress)
    mutating func endpoint(_ e: Endpoint)
}

extension EvidenceWriter {
    /// A time difference for people: "150 µs", "2.0 s", "-3 ns".
    mutating func delta(_ nanos: Int64) {
        let a = abs(nanos)
        if nanos < 0 { words("-") }
        if a < 1_000 { number(UInt64(a)); words(" ns"); return }
        if a < 1_000_000 { number(UInt64(a / 1_000)); words(" µs"); return }
        if a < 1_000_000_000 {
            number(UInt64(a / 1_000_000)); words("."); number(UInt64((a / 100_000) % 10)); words(" ms")
            return
        }
        number(UInt64(a / 1_000_000_000)); words("."); number(UInt64((a / 100_000_000) % 10)); words(" s")
    }
}

/// Evidence worded as a String (`HopEvidence.detail`, `formatDelta`).
struct EvidenceString: EvidenceWriter {
    var text = ""
    mutating func words(_ s: StaticString) { text += String(describing: s) }
    mutating func string(_ s: String) { text += s }
    mutating func number(_ v: UInt64) { text += String(v) }
    mutating func signed(_ v: Int64) { text += String(v) }
    mutating func hex(_ v: UInt32) { text += String(v, radix: 16) }
    mutating func address(_ a: IPAddress) { text += a.description }
    mutating func endpoint(_ e: Endpoint) { text += e.description }
}

extension HopEvidence.Fact {
    var kindText: String {
        if case .worded(let kind, _) = self { return kind }
        return String(describing: kindWords!)
    }
}
