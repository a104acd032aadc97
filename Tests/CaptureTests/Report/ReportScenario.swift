import Foundation
@testable import Capture

// A realistic run for the report tests, built the way the correlator would hand it over: the seed ruleset
// (shared/reference/rulesets/seed-ambient-pod.iptables-save.txt) as a model, and the packet walks of
// AMBIENT.md — outbound to a service through 15001 joined to ztunnel's HBONE connection, inbound HBONE
// joined to ztunnel's connection into the app (connmark 0x111 restored on replies), a kubelet probe, an app
// that forges ztunnel's mark (an escape) and non-DNS UDP (by design). Every packet exists three ways: as
// the `TimelineEvent` in its timeline, as a `PacketRecord`, and as real frame bytes (Ethernet frames, as libpcap gives them
// on Linux, for interface captures, a LINKTYPE_NFLOG record carrying the prefix and mark for NFLOG twins), so
// tshark can decode the frames independently of meshtrace.

struct SyntheticPacket {
    var record: PacketRecord
    var frame: [UInt8]
    var linkType: Int32
    var connection: ConnectionID?
}

struct ReportScenario {
    var ruleset: Ruleset
    var tags = RuleTagTable()
    var timelines: [ConnectionTimeline] = []
    var findings: [EscapeFinding] = []
    var packets: [SyntheticPacket] = []
    var includeNflog = true
    private var clockNs: Int64 = 1_764_000_000_123_456_789
    private var nextIPID: UInt32 = 1000
    private var frameNumber: UInt64 = 0
    static let nflogGroup: UInt16 = 37

    init(includeNflog: Bool = true) {
        ruleset = ReportScenario.seedRuleset()
        self.includeNflog = includeNflog
    }

    // MARK: the ruleset (the seed's rules, by hand: the parser belongs to the rules stage)

    static func rule(_ table: String, _ chain: String, _ pos: Int, _ match: String, _ targetText: String,
                     _ target: RuleTarget, _ role: AmbientRole) -> Rule {
        let text = "-A \(chain) \(match.isEmpty ? "" : match + " ")-j \(targetText)"
        return Rule(table: table, chain: chain, position: pos, family: .ipv4, backend: .iptablesNft, text: text,
                    matchText: match, matches: [], target: target, role: role)
    }

    static func seedRuleset() -> Ruleset {
        let mangle = Table(name: "mangle", family: .ipv4, backend: .iptablesNft, chains: [
            Chain(name: "PREROUTING", hook: .prerouting, policy: .accept,
                  rules: [rule("mangle", "PREROUTING", 1, "", "ISTIO_PRERT", .jump("ISTIO_PRERT"), .jumpToAmbientChain)]),
            Chain(name: "OUTPUT", hook: .output, policy: .accept,
                  rules: [rule("mangle", "OUTPUT", 1, "", "ISTIO_OUTPUT", .jump("ISTIO_OUTPUT"), .jumpToAmbientChain)]),
            Chain(name: "ISTIO_OUTPUT", rules: [
                rule("mangle", "ISTIO_OUTPUT", 1, "-m connmark --mark 0x111/0xfff",
                     "CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                     .connmarkRestore(nfmask: 0xffffffff, ctmask: 0xffffffff), .connmarkRestore)]),
            Chain(name: "ISTIO_PRERT", rules: [
                rule("mangle", "ISTIO_PRERT", 1, "-m mark --mark 0x539/0xfff", "CONNMARK --set-xmark 0x111/0xfff",
                     .connmarkSet(value: 0x111, mask: 0xfff), .connmarkFromZtunnel)]),
        ])
        let nat = Table(name: "nat", family: .ipv4, backend: .iptablesNft, chains: [
            Chain(name: "PREROUTING", hook: .prerouting, policy: .accept,
                  rules: [rule("nat", "PREROUTING", 1, "", "ISTIO_PRERT", .jump("ISTIO_PRERT"), .jumpToAmbientChain)]),
            Chain(name: "OUTPUT", hook: .output, policy: .accept,
                  rules: [rule("nat", "OUTPUT", 1, "", "ISTIO_OUTPUT", .jump("ISTIO_OUTPUT"), .jumpToAmbientChain)]),
            Chain(name: "ISTIO_OUTPUT", rules: [
                rule("nat", "ISTIO_OUTPUT", 1, "-d 169.254.7.127/32 -p tcp -m tcp", "ACCEPT", .accept, .probeBypassOutbound),
                rule("nat", "ISTIO_OUTPUT", 2, "-p tcp -m mark --mark 0x111/0xfff", "ACCEPT", .accept, .ztunnelReplyBypass),
                rule("nat", "ISTIO_OUTPUT", 3, "! -d 127.0.0.1/32 -o lo", "ACCEPT", .accept, .localBypass),
                rule("nat", "ISTIO_OUTPUT", 4, "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff",
                     "REDIRECT --to-ports 15001", .redirect(toPort: 15001), .outboundCapture),
            ]),
            Chain(name: "ISTIO_PRERT", rules: [
                rule("nat", "ISTIO_PRERT", 1, "-s 169.254.7.127/32 -p tcp -m tcp", "ACCEPT", .accept, .probeBypassInbound),
                rule("nat", "ISTIO_PRERT", 2, "! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff",
                     "REDIRECT --to-ports 15006", .redirect(toPort: 15006), .inboundCapture),
            ]),
        ])
        return Ruleset(tables: [mangle, nat], origin: "seed-ambient-pod.iptables-save.txt")
    }

    func rule(_ table: String, _ chain: String, _ position: Int) -> Rule {
        ruleset.tables.first { $0.name == table }!.chain(chain)!.rules[position - 1]
    }

    func tag(for r: Rule) -> RuleTag {
        RuleTag(family: .v4, table: r.table, chain: r.chain, position: .rule(r.position),
                textHash: RuleTag.textHash(r.canonicalText))
    }

    static func observeTag(_ hook: NetfilterHook) -> RuleTag {
        RuleTag(family: .v4, table: "mangle", chain: hook == .output ? "OUTPUT" : "PREROUTING",
                position: hook == .output ? .observeOut : .observeIn)
    }

    // MARK: packets

    static func ep(_ s: String, _ port: UInt16) -> Endpoint { Endpoint(IPAddress(s)!, port) }

    /// One packet of a timeline. NFLOG `hits` come first (one NFLOG record each, at `hook`), then the
    /// interface capture on `device` (nil: not seen by libpcap), all with the same IP ID and sequence.
    mutating func send(_ t: inout ConnectionTimeline, tuple: FiveTuple, isReply: Bool, flags: TCPFlags,
                       payload: UInt32 = 0, mark: UInt32? = nil, hook: NetfilterHook, hits: [RuleTag],
                       actions: [RuleAction?] = [], device: String?, deviceTuple: FiveTuple? = nil) {
        clockNs += 37_000 + Int64(payload) * 3
        let ipID = nextIPID; nextIPID += 1
        let seq = UInt32(truncatingIfNeeded: Int(t.id) &* 7919 &+ t.events.count &* 1000)
        func record(point: CapturePoint, tuple: FiveTuple) -> PacketRecord {
            frameNumber += 1
            var r = PacketRecord()
            r.ref = FrameRef(source: point.kind == .netfilter ? 1 : 0, frame: frameNumber)
            r.time = Timestamp(seconds: clockNs / 1_000_000_000, nanoseconds: Int32(clockNs % 1_000_000_000))
            r.point = point
            r.direction = isReply == (hook == .output) ? .inbound : .outbound
            r.tuple = tuple; r.ipID = ipID; r.ttl = 64; r.tcpFlags = flags; r.tcpSeq = seq
            r.payloadLength = tuple.proto == IPProto.tcp || tuple.proto == IPProto.udp ? payload : 0
            r.ipLength = 20 + (tuple.proto == IPProto.tcp ? 20 : 8) + payload
            r.wireLength = r.ipLength
            return r
        }
        for (i, tag) in hits.enumerated() {
            var r = record(point: .netfilter(hook), tuple: tuple)
            var meta = NflogMeta()
            meta.group = ReportScenario.nflogGroup; meta.hook = hook; meta.hwProtocol = 0x0800; meta.mark = mark ?? 0
            meta.prefixID = tags.intern(tag.prefix)
            if i < actions.count, case .redirected(_, let od?)? = actions[i] {
                var reply = tuple.reversed
                reply.src = Endpoint(IPAddress("127.0.0.1")!, 15001)
                meta.conntrack = ConntrackInfo(original: FiveTuple(proto: tuple.proto, src: tuple.src, dst: od), reply: reply)
            }
            r.nflog = meta
            let ip = ReportScenario.ipv4(r, payload: payload)
            r.wireLength = UInt32(ip.count)
            let frame = ReportScenario.nflogRecord(group: meta.group, hook: hook, mark: meta.mark ?? 0,
                                                   prefix: tag.prefix, payload: ip)
            let hitRule = ruleset.rule(for: tag)
            let isObservation = tag.position == .observeIn || tag.position == .observeOut
            let role: AmbientRole? = hitRule?.role ?? (isObservation ? .meshtraceObservation : nil)
            let action: RuleAction? = i < actions.count ? actions[i] : (isObservation ? .observed : nil)
            t.events.append(TimelineEvent(time: r.time, frame: r.ref, point: r.point, direction: r.direction, tuple: tuple,
                                          isReply: isReply, tcpFlags: flags, length: r.wireLength, mark: mark,
                                          hit: RuleHit(tag: tag, prefixText: tag.prefix, rule: hitRule, role: role, action: action),
                                          notes: []))
            if includeNflog { packets.append(SyntheticPacket(record: r, frame: frame, linkType: LinkType.nflog, connection: t.id)) }
            clockNs += 2_000
        }
        if let device {
            let seen = deviceTuple ?? tuple
            let r = record(point: .interface(device), tuple: seen)
            let frame = ReportScenario.ethernet(device: device, isReply: isReply) + ReportScenario.ipv4(r, payload: payload)
            t.events.append(TimelineEvent(time: r.time, frame: r.ref, point: r.point, direction: r.direction, tuple: seen,
                                          isReply: isReply, tcpFlags: flags, length: UInt32(frame.count), mark: mark, hit: nil, notes: []))
            packets.append(SyntheticPacket(record: r, frame: frame, linkType: LinkType.ethernet, connection: t.id))
            if seen != t.original && seen != t.original.reversed && !t.aliases.contains(seen) { t.aliases.append(seen) }
        }
        if let m = mark, m != 0, !t.marks.contains(m) { t.marks.append(m) }
        t.packets += 1 + hits.count
        t.bytes += UInt64(payload)
        if t.firstSeen == .zero { t.firstSeen = t.events.first?.time ?? .zero }
        t.lastSeen = t.events.last?.time ?? t.lastSeen
    }

    /// A TCP exchange: handshake, one request, one response, close. `forward`/`reply` describe how
    /// each direction's packets pass the rules.
    mutating func tcpExchange(_ t: inout ConnectionTimeline, request: UInt32 = 96, response: UInt32 = 1200,
                              forward: (hook: NetfilterHook, hits: [RuleTag], actions: [RuleAction?], device: String?, seen: FiveTuple?),
                              reply: (hook: NetfilterHook, hits: [RuleTag], device: String?, seen: FiveTuple?),
                              forwardMark: UInt32? = nil, replyMark: UInt32? = nil) {
        let fwd = t.original, rev = t.original.reversed
        let steps: [(Bool, TCPFlags, UInt32)] = [(false, [.syn], 0), (true, [.syn, .ack], 0), (false, [.ack], 0),
                                                 (false, [.psh, .ack], request), (true, [.psh, .ack], response),
                                                 (false, [.fin, .ack], 0), (true, [.fin, .ack], 0), (false, [.ack], 0)]
        for (i, (isReply, flags, len)) in steps.enumerated() {
            if isReply {
                // nat rules see only a connection's first packet; mangle rules see every packet.
                let hits = reply.hits.filter { tag in tag.table != "nat" || i == 1 }
                send(&t, tuple: rev, isReply: true, flags: flags, payload: len, mark: replyMark, hook: reply.hook,
                     hits: hits, device: reply.device, deviceTuple: reply.seen)
            } else {
                let hits = i == 0 ? forward.hits : forward.hits.filter { $0.table != "nat" }
                send(&t, tuple: fwd, isReply: false, flags: flags, payload: len, mark: forwardMark, hook: forward.hook,
                     hits: hits, actions: i == 0 ? forward.actions : [], device: forward.device, deviceTuple: forward.seen)
            }
        }
        t.closed = true
    }

    // MARK: the scenario

    static let pod = "10.0.1.5", peerPod = "10.0.2.7", service = "10.96.0.10", outside = "10.0.3.3"

    /// The walks of AMBIENT.md, then `extraOutbound` more outbound app connections with their hops
    /// (to make the connection index page).
    static func standard(extraOutbound: Int = 0, includeNflog: Bool = true) -> ReportScenario {
        var s = ReportScenario(includeNflog: includeNflog)
        var id: ConnectionID = 1
        s.outbound(&id, appPort: 40000, ztunnelPort: 45000)
        s.inbound(&id)
        s.probe(&id)
        s.forgedMark(&id)
        s.udpByDesign(&id)
        for i in 0..<extraOutbound { s.outbound(&id, appPort: UInt16(41000 + i), ztunnelPort: UInt16(46000 + i)) }
        return s
    }

    mutating func outbound(_ id: inout ConnectionID, appPort: UInt16, ztunnelPort: UInt16) {
        let redirectRule = rule("nat", "ISTIO_OUTPUT", 4)
        let original = FiveTuple(proto: IPProto.tcp, src: Self.ep(Self.pod, appPort), dst: Self.ep(Self.service, 80))
        let onLo = FiveTuple(proto: IPProto.tcp, src: original.src, dst: Self.ep("127.0.0.1", 15001))
        var app = ConnectionTimeline(id: id, kind: .appOutbound, original: original)
        let redirect = RuleAction.redirected(toPort: 15001, originalDestination: original.dst)
        app.redirect = redirect
        tcpExchange(&app, forward: (.output, [tag(for: redirectRule)], [redirect], "lo", onLo),
                    reply: (.prerouting, [], "lo", onLo.reversed))
        let hboneTuple = FiveTuple(proto: IPProto.tcp, src: Self.ep(Self.pod, ztunnelPort), dst: Self.ep(Self.peerPod, 15008))
        var hbone = ConnectionTimeline(id: id + 1, kind: .hboneOutbound, original: hboneTuple)
        tcpExchange(&hbone, request: 180, response: 1300,
                    forward: (.output, [Self.observeTag(.output)], [.observed], "eth0", nil),
                    reply: (.prerouting, [Self.observeTag(.prerouting)], "eth0", nil), forwardMark: 0x539)
        let hop = ZtunnelHop(direction: .outbound, outer: app.id, inner: hbone.id, evidence: [
            HopEvidence(kind: "ztunnel-mark", detail: "connection #\(hbone.id) carries mark 0x539"),
            HopEvidence(kind: "original-destination", detail: "REDIRECT original destination \(original.dst) behind HBONE peer \(Self.peerPod):15008"),
            HopEvidence(kind: "timing", detail: "HBONE SYN 0.4 ms after the app's SYN reached 15001"),
        ], confidence: .high)
        app.hops = [hop]; hbone.hops = [hop]
        timelines.append(app); timelines.append(hbone)
        id += 2
    }

    mutating func inbound(_ id: inout ConnectionID) {
        let hboneTuple = FiveTuple(proto: IPProto.tcp, src: Self.ep(Self.peerPod, 50000), dst: Self.ep(Self.pod, 15008))
        var hbone = ConnectionTimeline(id: id, kind: .hboneInbound, original: hboneTuple)
        tcpExchange(&hbone, forward: (.prerouting, [Self.observeTag(.prerouting)], [.observed], "eth0", nil),
                    reply: (.output, [Self.observeTag(.output)], "eth0", nil), replyMark: 0x539)
        let intoApp = FiveTuple(proto: IPProto.tcp, src: Self.ep(Self.peerPod, 50001), dst: Self.ep(Self.pod, 8080))
        var toApp = ConnectionTimeline(id: id + 1, kind: .ztunnelToApp, original: intoApp)
        tcpExchange(&toApp, forward: (.prerouting, [tag(for: rule("mangle", "ISTIO_PRERT", 1))], [.connmarkSet(0x111)], "lo", nil),
                    reply: (.output, [tag(for: rule("mangle", "ISTIO_OUTPUT", 1)), tag(for: rule("nat", "ISTIO_OUTPUT", 2))], "lo", nil),
                    forwardMark: 0x539, replyMark: 0x111)
        let hop = ZtunnelHop(direction: .inbound, outer: hbone.id, inner: toApp.id, evidence: [
            HopEvidence(kind: "ztunnel-mark", detail: "connection #\(toApp.id) into the app carries mark 0x539"),
            HopEvidence(kind: "client-address", detail: "source \(Self.peerPod) equals the HBONE client address"),
        ], confidence: .high)
        hbone.hops = [hop]; toApp.hops = [hop]
        timelines.append(hbone); timelines.append(toApp)
        id += 2
    }

    mutating func probe(_ id: inout ConnectionID) {
        let tuple = FiveTuple(proto: IPProto.tcp, src: Self.ep("169.254.7.127", 39000), dst: Self.ep(Self.pod, 8080))
        var t = ConnectionTimeline(id: id, kind: .probe, original: tuple)
        tcpExchange(&t, request: 60, response: 40,
                    forward: (.prerouting, [tag(for: rule("nat", "ISTIO_PRERT", 1))], [.accepted], "eth0", nil),
                    reply: (.output, [tag(for: rule("nat", "ISTIO_OUTPUT", 1))], "eth0", nil))
        timelines.append(t)
        id += 1
    }

    mutating func forgedMark(_ id: inout ConnectionID) {
        let tuple = FiveTuple(proto: IPProto.tcp, src: Self.ep(Self.pod, 42424), dst: Self.ep(Self.outside, 443))
        var t = ConnectionTimeline(id: id, kind: .unknown, original: tuple)
        tcpExchange(&t, forward: (.output, [Self.observeTag(.output)], [.observed], "eth0", nil),
                    reply: (.prerouting, [Self.observeTag(.prerouting)], "eth0", nil), forwardMark: 0x539)
        timelines.append(t)
        findings.append(EscapeFinding(findingClass: .forgedZtunnelMark, connection: t.id, tuple: tuple,
                                      summary: "app TCP to \(Self.outside):443 carried ztunnel's mark 0x539 and left through eth0 without a ztunnel hop",
                                      frames: t.events.prefix(3).map(\.frame), confidence: .high))
        id += 1
    }

    mutating func udpByDesign(_ id: inout ConnectionID) {
        let tuple = FiveTuple(proto: IPProto.udp, src: Self.ep(Self.pod, 5353), dst: Self.ep(Self.outside, 9999))
        var t = ConnectionTimeline(id: id, kind: .uncapturedByDesign, original: tuple)
        send(&t, tuple: tuple, isReply: false, flags: [], payload: 48, hook: .output, hits: [Self.observeTag(.output)],
             actions: [.observed], device: "eth0")
        send(&t, tuple: tuple.reversed, isReply: true, flags: [], payload: 48, hook: .prerouting,
             hits: [Self.observeTag(.prerouting)], actions: [.observed], device: "eth0")
        timelines.append(t)
        findings.append(EscapeFinding(findingClass: .byDesign, connection: t.id, tuple: tuple,
                                      summary: "non-DNS UDP is not captured by the ambient rules (by design)",
                                      frames: t.events.map(\.frame), confidence: .high))
        id += 1
    }

    var summary: AnalysisSummary {
        var s = AnalysisSummary()
        s.packets = packets.count
        s.nflogRecords = packets.filter { $0.linkType == LinkType.nflog }.count
        s.connections = timelines.count
        s.hops = timelines.flatMap(\.hops).count / 2
        s.findings = findings
        var counts: [String: (Rule?, Int)] = [:]
        var order: [String] = []
        for t in timelines { for e in t.events { if let h = e.hit {
            if counts[h.prefixText] == nil { order.append(h.prefixText); counts[h.prefixText] = (h.rule, 0) }
            counts[h.prefixText]!.1 += 1
        } } }
        s.ruleHits = order.map { (prefix: $0, tag: RuleTag(prefix: $0), rule: counts[$0]!.0, count: counts[$0]!.1) }
        return s
    }

    /// Feeds the run to a sink the way the engine does: every packet, then timelines, findings, the summary.
    func play(into sink: ReportSink) throws {
        for p in packets {
            p.frame.withUnsafeBytes { sink.packet(p.record, frame: $0, linkType: p.linkType, connection: p.connection) }
        }
        for t in timelines { sink.connection(t) }
        for f in findings { sink.finding(f) }
        try sink.finish(summary)
    }

    // MARK: frame bytes

    /// What libpcap gives on Linux: EN10MB on lo too, with all-zero addresses there.
    static func ethernet(device: String, isReply: Bool) -> [UInt8] {
        let pod: [UInt8] = [0x02, 0x42, 0x0a, 0x00, 0x01, 0x05], gateway: [UInt8] = [0x02, 0x42, 0x0a, 0x00, 0x01, 0x01]
        let zero = [UInt8](repeating: 0, count: 6)
        let (dst, src) = device == "lo" ? (zero, zero) : (isReply ? (pod, gateway) : (gateway, pod))
        return dst + src + [0x08, 0x00]
    }

    static func ipv4(_ r: PacketRecord, payload: UInt32) -> [UInt8] {
        let l4 = r.tuple.proto == IPProto.tcp ? 20 : 8
        let total = 20 + l4 + Int(payload)
        var b = [UInt8](repeating: 0, count: total)
        b[0] = 0x45; b[2] = UInt8(total >> 8); b[3] = UInt8(total & 0xff)
        b[4] = UInt8((r.ipID >> 8) & 0xff); b[5] = UInt8(r.ipID & 0xff); b[6] = 0x40
        b[8] = r.ttl; b[9] = r.tuple.proto
        func put32(_ v: UInt32, _ o: Int) { b[o] = UInt8(v >> 24); b[o+1] = UInt8((v >> 16) & 0xff); b[o+2] = UInt8((v >> 8) & 0xff); b[o+3] = UInt8(v & 0xff) }
        func put16(_ v: UInt16, _ o: Int) { b[o] = UInt8(v >> 8); b[o+1] = UInt8(v & 0xff) }
        put32(r.tuple.src.addr.v4Value, 12); put32(r.tuple.dst.addr.v4Value, 16)
        var sum: UInt32 = 0
        for i in stride(from: 0, to: 20, by: 2) { sum += UInt32(b[i]) << 8 | UInt32(b[i+1]) }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        put16(~UInt16(sum), 10)
        put16(r.tuple.src.port, 20); put16(r.tuple.dst.port, 22)
        if r.tuple.proto == IPProto.tcp {
            put32(r.tcpSeq, 24); put32(r.tcpFlags.contains(.ack) ? 1 : 0, 28)
            b[32] = 0x50; b[33] = r.tcpFlags.rawValue; put16(64240, 34)
        } else {
            put16(UInt16(8 + payload), 24)
        }
        for i in (20 + l4)..<total { b[i] = UInt8(ascii: "x") }
        return b
    }

    /// A LINKTYPE_NFLOG record as `tcpdump -i nflog:G` writes it: family, version, group (big-endian), then
    /// TLVs whose length and type are in the writer's (little-endian) byte order.
    static func nflogRecord(group: UInt16, hook: NetfilterHook, mark: UInt32, prefix: String, payload: [UInt8]) -> [UInt8] {
        var b: [UInt8] = [2, 0, UInt8(group >> 8), UInt8(group & 0xff)]
        func tlv(_ type: UInt16, _ value: [UInt8]) {
            let len = UInt16(4 + value.count)
            b += [UInt8(len & 0xff), UInt8(len >> 8), UInt8(type & 0xff), UInt8(type >> 8)] + value
            b += [UInt8](repeating: 0, count: ((value.count + 3) & ~3) - value.count)
        }
        tlv(1, [0x08, 0x00, hook.rawValue, 0])
        tlv(2, [UInt8(mark >> 24), UInt8((mark >> 16) & 0xff), UInt8((mark >> 8) & 0xff), UInt8(mark & 0xff)])
        tlv(10, Array(prefix.utf8) + [0])
        tlv(9, payload)
        return b
    }
}
