import Foundation

// One SVG sequence diagram per flow: a connection, or the two connections of a ztunnel hop drawn together
// (the app's connection to 15001 and ztunnel's HBONE connection; or the inbound HBONE connection and
// ztunnel's connection into the app). Four lifelines, as the packet walks of AMBIENT.md go:
//
//     app  —  netfilter (rule hits)  —  ztunnel  —  peer / HBONE
//
// An NFLOG hit is an arrow into the netfilter lifeline labelled with the rule, its role and what it did
// (REDIRECT → :15001, original destination, marks); the same packet seen by libpcap continues from there
// to where it was delivered. Replies are dashed. A diagram has at most `maxArrows` arrows: the first
// ones and the last few (the close) are drawn, and the rest is counted, never silently dropped.

struct SequenceDiagram {
    static let maxArrows = 60
    static let tailArrows = 10

    enum Lifeline: Int, CaseIterable { case app = 0, netfilter, ztunnel, peer }
    static let x: [Lifeline: Int] = [.app: 170, .netfilter: 430, .ztunnel: 690, .peer: 950]
    static let width = 1180
    static let rowHeight = 30
    static let top = 56

    /// Which lifeline opened the connection and which accepted it.
    static func ends(of t: ConnectionTimeline) -> (initiator: Lifeline, responder: Lifeline) {
        switch t.kind {
        case .appOutbound: return (.app, .ztunnel)
        case .hboneOutbound, .ztunnelPassthrough: return (.ztunnel, .peer)
        case .hboneInbound, .inboundPlaintext: return (.peer, .ztunnel)
        case .ztunnelToApp: return (.ztunnel, .app)
        case .probe: return (.peer, .app)
        case .dns: return t.redirect != nil ? (.app, .ztunnel) : (.app, .peer)
        case .local: return (.app, .peer)
        case .uncapturedByDesign, .unknown:
            // The first packet's way tells who opened it: leaving the pod (OUTPUT hook, outbound) is the app.
            guard let first = t.events.first else { return (.app, .peer) }
            let leaving = first.isReply ? false : (first.direction == .outbound || first.point.hook == .output)
            return leaving ? (.app, .peer) : (.peer, .app)
        }
    }

    static func lifelineNames(_ timelines: [ConnectionTimeline]) -> [Lifeline: (String, String)] {
        var names: [Lifeline: (String, String)] = [
            .app: ("app", ""), .netfilter: ("netfilter", "rule hits"), .ztunnel: ("ztunnel", "15001 · 15006 · 15008"),
            .peer: ("peer", ""),
        ]
        for t in timelines {
            let (i, r) = ends(of: t)
            if i == .app || r == .app { names[.app] = ("app", (i == .app ? t.original.src.addr : t.original.dst.addr).description) }
            if r == .peer {
                let label = t.kind == .hboneOutbound ? "HBONE peer" : "peer"
                names[.peer] = (label, t.original.dst.description)
            } else if i == .peer {
                let label = t.kind == .hboneInbound ? "HBONE client" : (t.kind == .probe ? "kubelet probe" : "client")
                names[.peer] = (label, t.original.src.addr.description)
            }
        }
        return names
    }

    /// The SVG for one flow. `escapes`: connections with an escape finding (drawn red).
    static func render(timelines: [ConnectionTimeline], escapes: Set<ConnectionID>) -> String {
        let marker = "ah\(timelines.first?.id ?? 0)"
        var events: [(TimelineEvent, ConnectionTimeline)] = []
        for t in timelines { for e in t.events { events.append((e, t)) } }
        events.sort { $0.0.time < $1.0.time }
        let notKept = timelines.reduce(0) { $0 + $1.droppedEvents }

        var shown: [(TimelineEvent, ConnectionTimeline)?] = events.map { $0 }
        var elided = 0
        if events.count > maxArrows {
            let head = maxArrows - tailArrows
            elided = events.count - maxArrows
            shown = Array(events[0..<head]).map { $0 } + [nil] + Array(events[(events.count - tailArrows)...]).map { $0 }
        }
        let extraRow = notKept > 0 && elided == 0 ? 1 : 0
        let height = top + (shown.count + extraRow) * rowHeight + 20
        let start = events.first?.0.time ?? .zero
        let names = lifelineNames(timelines)
        let ids = timelines.map { String($0.id) }.joined(separator: " ")

        var s = "<svg class=\"seq\" xmlns=\"http://www.w3.org/2000/svg\" data-conns=\"\(ids)\" "
        s += "width=\"\(width)\" height=\"\(height)\" viewBox=\"0 0 \(width) \(height)\" role=\"img\" "
        s += "aria-label=\"sequence diagram of connection \(HTML.escape(timelines.map { "#\($0.id)" }.joined(separator: " and ")))\">"
        s += "<defs><marker id=\"\(marker)\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">"
        s += "<path d=\"M0,0 L10,5 L0,10 z\" fill=\"#394355\"/></marker></defs>"
        for l in Lifeline.allCases {
            let cx = x[l]!
            let (name, sub) = names[l]!
            let cls = l == .netfilter ? "lifehead nf" : (l == .ztunnel ? "lifehead zt" : "lifehead")
            s += "<line class=\"life\" x1=\"\(cx)\" y1=\"44\" x2=\"\(cx)\" y2=\"\(height - 8)\"/>"
            s += "<rect class=\"\(cls)\" x=\"\(cx - 78)\" y=\"6\" width=\"156\" height=\"38\" rx=\"6\"/>"
            s += "<text class=\"lifename\" x=\"\(cx)\" y=\"22\" text-anchor=\"middle\">\(HTML.escape(name))</text>"
            s += "<text class=\"lifename\" x=\"\(cx)\" y=\"37\" text-anchor=\"middle\" style=\"font-weight:400;font-size:10.5px\">\(HTML.escape(sub))</text>"
        }

        var y = top
        var previousHit: (ConnectionID, Bool, TCPFlags)? = nil
        for item in shown {
            y += rowHeight
            guard let (e, t) = item else {
                s += "<text class=\"elided\" x=\"\(x[.app]! - 60)\" y=\"\(y - 8)\">… \(elided) more events of this flow not drawn (the first \(maxArrows - tailArrows) and the last \(tailArrows) are) …</text>"
                previousHit = nil
                continue
            }
            let (initiator, responder) = ends(of: t)
            let sender = e.isReply ? responder : initiator
            let receiver = e.isReply ? initiator : responder
            let isEscape = escapes.contains(t.id)
            let ms = Double(e.time.totalNanoseconds - start.totalNanoseconds) / 1e6
            s += "<text class=\"time\" x=\"4\" y=\"\(y - 4)\">+\(format(ms)) ms</text>"
            s += "<text class=\"time\" x=\"4\" y=\"\(y + 8)\">#\(t.id)</text>"

            let from: Lifeline, to: Lifeline
            var label: String
            var cls = "arrow"
            var labelClass = "lbl"
            if e.point.kind == .netfilter {
                from = sender; to = .netfilter
                label = "\(flagsText(e, t)) · \(e.point.hook) · \(hitText(e.hit))"
                cls += " hit"; labelClass += " hit"
                previousHit = (t.id, e.isReply, e.tcpFlags)
            } else {
                if let p = previousHit, p.0 == t.id, p.1 == e.isReply, p.2 == e.tcpFlags { from = .netfilter } else { from = sender }
                to = receiver
                label = "\(flagsText(e, t)) · \(e.point) · \(e.tuple.src) → \(e.tuple.dst)"
                previousHit = nil
            }
            if let m = e.mark, m != 0 {
                label += " · mark 0x\(String(m, radix: 16))"
                if !cls.contains("hit") { cls += " marked" }
            }
            if !e.notes.isEmpty { label += " · " + e.notes.descriptions.joined(separator: ", ") }
            if e.isReply { cls += " reply" }
            if isEscape { cls += " esc"; labelClass += " esc" }
            let x1 = x[from]!, x2 = x[to]!
            let dir = x2 >= x1 ? 1 : -1
            let full = label
            if label.count > 112 { label = String(label.prefix(111)) + "…" }
            // A label that would run off the right edge ends at the edge instead (about 6.7 px a character).
            var lx = min(x1, x2) + 6
            var anchor = ""
            if lx + Int(Double(label.count) * 6.7) > width - 4 { lx = width - 4; anchor = " text-anchor=\"end\"" }
            // The whole label on hover only where the drawn one is cut: titles would double the page's size.
            s += label == full ? "<g>" : "<g><title>\(HTML.escape(full))</title>"
            if from == to {
                s += "<path class=\"\(cls)\" d=\"M\(x1),\(y - 2) h24 v8 h-22\" marker-end=\"url(#\(marker))\"/>"
            } else {
                s += "<line class=\"\(cls)\" x1=\"\(x1 + dir * 2)\" y1=\"\(y)\" x2=\"\(x2 - dir * 3)\" y2=\"\(y)\" marker-end=\"url(#\(marker))\"/>"
            }
            if to == .netfilter { s += "<rect class=\"hitbox\" x=\"\(x2 - 5)\" y=\"\(y - 5)\" width=\"10\" height=\"10\" rx=\"2\"/>" }
            s += "<text class=\"\(labelClass)\" x=\"\(lx)\" y=\"\(y - 5)\"\(anchor)>\(HTML.escape(label))</text></g>"
        }
        if extraRow == 1 {
            y += rowHeight
            s += "<text class=\"elided\" x=\"\(x[.app]! - 60)\" y=\"\(y - 8)\">… \(notKept) more events were counted but not kept by the correlator …</text>"
        } else if notKept > 0 {
            s += "<text class=\"elided\" x=\"\(x[.app]! - 60)\" y=\"\(height - 6)\">(and \(notKept) events counted but not kept by the correlator)</text>"
        }
        s += "</svg>"
        return s
    }

    static func flagsText(_ e: TimelineEvent, _ t: ConnectionTimeline) -> String {
        if t.original.proto == IPProto.tcp {
            // Words, not tcpdump's letters: a diagram is read by more people than a trace.
            var words: [String] = []
            if e.tcpFlags.contains(.syn) { words.append("SYN") }
            if e.tcpFlags.contains(.fin) { words.append("FIN") }
            if e.tcpFlags.contains(.rst) { words.append("RST") }
            if e.tcpFlags.contains(.psh) { words.append("PSH") }
            if e.tcpFlags.contains(.ack) { words.append("ACK") }
            return words.isEmpty ? "TCP" : words.joined(separator: "-")
        }
        return IPProto.name(t.original.proto).uppercased() + " \(e.length)B"
    }

    static func hitText(_ hit: RuleHit?) -> String {
        guard let hit else { return "observed" }
        var parts: [String] = []
        let backend = hit.tag?.backendWord ?? ""
        if let r = hit.rule {
            parts.append("\(backend)\(r.table) \(r.chain) #\(r.position)")
        } else if let tag = hit.tag {
            switch tag.position {
            case .rule(let n): parts.append("\(backend)\(tag.table) \(tag.chain) #\(n)")
            case .observeIn, .observeOut: parts.append("observed")
            }
        } else {
            parts.append(hit.prefixText)
        }
        if let role = hit.role, role != .meshtraceObservation { parts.append(role.rawValue) }
        if let a = hit.action { let t = actionText(a); if !t.isEmpty && t != "observed" { parts.append(t) } }
        return parts.joined(separator: " · ")
    }

    static func actionText(_ a: RuleAction) -> String {
        switch a {
        case .redirected(let port, let od): return "REDIRECT → :\(port)" + (od.map { " (original destination \($0))" } ?? "")
        case .tproxied(let port, let mark): return "TPROXY → :\(port)" + (mark.map { " mark 0x\(String($0, radix: 16))" } ?? "")
        case .markSet(let m): return "mark ← 0x\(String(m, radix: 16))"
        case .connmarkSet(let m): return "connmark ← 0x\(String(m, radix: 16))"
        case .connmarkRestored(let m): return "mark ← connmark" + (m.map { " 0x\(String($0, radix: 16))" } ?? "")
        case .accepted: return "ACCEPT"
        case .returned: return "RETURN"
        case .jumped(let c): return "→ \(c)"
        case .ctZone(let z): return "CT zone \(z)"
        case .dropped: return "DROP"
        case .observed: return "observed"
        case .other(let s): return s
        }
    }

    static func format(_ ms: Double) -> String { String(format: "%.3f", ms) }
}
