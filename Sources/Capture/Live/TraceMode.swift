import Foundation

// `--mode trace`: the kernel's own rule-by-rule walk, joined into the timelines as rule hits.
//
//  - nf_tables (iptables-nft and native nft): packets get `meta nftrace set 1` from meshtrace's own table
//    `inet meshtrace` (base chains just before raw), and the kernel then reports every rule they traverse in
//    every nft table, iptables-nft's included, as NFT_MSG_TRACE on NFNLGRP_NFTRACE. A table of its own means
//    no iptables table is created or touched for TRACE, and removal is one `delete table`.
//  - iptables-legacy: `-t raw -j TRACE` logs through nf_log; nfnetlink_log bound as the netns's logger
//    (`nflog_bind_pf`) delivers it as NFLOG on group 0 with the prefix `TRACE: table:chain:type:rulenum `,
//    where rulenum counts meshtrace's twins too: it is mapped back to the original rule's position.
//
// Each step becomes a record carrying the prefix `TRACE: table:chain:type:position`, with the packet's tuple
// from the trace's network/transport headers, so the correlator places it on the same connection.

enum TraceRules {
    static let nftTable = "meshtrace"

    /// The comment that records, on the legacy TRACE rules, the nf_log backends binding nfnetlink_log replaced
    /// ("mt-nf_log:2=nf_log_ipv4,10=nf_log_ipv6"): after a SIGKILL the binding stays, and `cleanup` (any removal)
    /// puts them back from it.
    static let loggerCommentPrefix = "mt-nf_log:"

    static func loggerComment(_ prior: [UInt16: String]) -> String? {
        let parts = prior.sorted { $0.key < $1.key }
            .filter { !$0.value.isEmpty && $0.value.allSatisfy { $0.isLetter || $0.isNumber || $0 == "_" } }
            .map { "\($0.key)=\($0.value)" }
        return parts.isEmpty ? nil : loggerCommentPrefix + parts.joined(separator: ",")
    }

    /// The nf_log backends recorded on leftover legacy TRACE rules, by protocol family.
    static func recordedLoggers(in homes: [SavedRules]) -> [UInt16: String] {
        var out: [UInt16: String] = [:]
        for saved in homes where saved.home.backend == .iptablesLegacy {
            for rule in saved.ownRules {
                guard let r = rule.spec.range(of: loggerCommentPrefix) else { continue }
                let text = rule.spec[r.upperBound...].prefix { $0 != "\"" && $0 != " " }
                for pair in text.split(separator: ",") {
                    let kv = pair.split(separator: "=", maxSplits: 1)
                    if kv.count == 2, let pf = UInt16(kv[0]) { out[pf] = String(kv[1]) }
                }
            }
        }
        return out
    }

    /// Puts back nf_log backends a killed legacy `--mode trace` left bound to nfnetlink_log, when no one reads
    /// group 0 (a running trace restores its own when it ends) and the binding is still nfnetlink_log's.
    /// Returns false when it left them because group 0 is being read (a running trace: it restores its own).
    @discardableResult
    static func restoreLoggers(netns: NetnsRef, recorded: [UInt16: String]) throws -> Bool {
        guard !recorded.isEmpty else { return true }
        guard !(try Instrumenter.boundNflogGroups(in: netns)).contains(0) else { return false }
        for (pf, prior) in recorded.sorted(by: { $0.key < $1.key }) where prior != "nfnetlink_log" {
            let path = "/proc/sys/net/netfilter/nf_log/\(pf)"
            let now = try Command.run(["cat", path], in: netns)
            guard now.ok, now.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "nfnetlink_log" else { continue }
            let r = try Command.run(["sh", "-c", "printf %s \"$1\" > \"$2\"", "sh", prior, path], in: netns)
            guard r.ok else {
                throw MeshtraceError(.kernelRefused, "could not put back nf_log backend \(prior) for family \(pf) in netns \(netns): \(r.stderr)")
            }
        }
        return true
    }

    static func install(netns: NetnsRef, homes: [RuleHome], priorLoggers: [UInt16: String] = [:]) throws {
        let nfTables = homes.contains { $0.backend == .iptablesNft || $0.backend == .nftables }
        if nfTables {
            let script = """
            add table inet \(nftTable)
            add chain inet \(nftTable) prerouting { type filter hook prerouting priority -350; policy accept; }
            add chain inet \(nftTable) output { type filter hook output priority -350; policy accept; }
            add rule inet \(nftTable) prerouting meta nftrace set 1 comment "\(InstrumentationSettings.comment)"
            add rule inet \(nftTable) output meta nftrace set 1 comment "\(InstrumentationSettings.comment)"

            """
            let r = try Command.run(["nft", "-f", "-"], in: netns, input: script)
            guard r.ok else { throw MeshtraceError(.kernelRefused, "nft refused the TRACE table: \(r.stderr)") }
        }
        for home in homes where home.backend == .iptablesLegacy {
            let record = TraceRules.loggerComment(priorLoggers).map { " -m comment --comment \"\($0)\"" } ?? ""
            let input = "*raw\n-I PREROUTING 1 -m comment --comment meshtrace\(record) -j TRACE\n-I OUTPUT 1 -m comment --comment meshtrace\(record) -j TRACE\nCOMMIT\n"
            let r = try Command.run(home.applyCommand, in: netns, input: input)
            guard r.ok else { throw MeshtraceError(.kernelRefused, "\(home.restoreTool) refused the TRACE rules: \(r.stderr)") }
        }
    }

    /// Original rule positions by nft handle ("nfproto table chain handle" → position), meshtrace's rules skipped.
    /// `own`: meshtrace's twins, whose steps are not shown (they are not the pod's rules).
    static func handlePositions(netns: NetnsRef) throws -> (positions: [String: Int], own: Set<String>) {
        guard Command.which("nft") != nil else { return ([:], []) }
        let r = try Command.run(["nft", "-a", "list", "ruleset"], in: netns)
        guard r.ok else { return ([:], []) }
        var out: [String: Int] = [:]
        var own: Set<String> = []
        var family = 0, table = "", chain = "", position = 0
        for raw in r.stdout.split(separator: "\n") {
            let line = raw.trimmingCharacters(in: .whitespaces)
            let words = line.split(separator: " ")
            if line.hasPrefix("table "), words.count >= 3 {
                family = ["inet": 1, "ip": 2, "ip6": 10][String(words[1])] ?? 0
                table = String(words[2])
            } else if line.hasPrefix("chain "), words.count >= 2 {
                chain = String(words[1]); position = 0
            } else if let h = SavedRules.number(after: "# handle ", in: line), !line.hasPrefix("type ") {
                if SavedRules.isOwn(Substring(line)) { own.insert("\(family) \(table) \(chain) \(h)"); continue }
                position += 1
                out["\(family) \(table) \(chain) \(h)"] = position
            }
        }
        return (out, own)
    }

    /// Removes meshtrace's TRACE table (the legacy TRACE rules carry the comment and go with the twins).
    /// Removes `--mode trace`'s nft table; true when there was one.
    @discardableResult
    static func remove(netns: NetnsRef) throws -> Bool {
        guard Command.which("nft") != nil else { return false }
        let list = try Command.run(["nft", "list", "tables"], in: netns)
        guard list.ok, list.stdout.contains("table inet \(nftTable)\n") || list.stdout.hasSuffix("table inet \(nftTable)") else { return false }
        let r = try Command.run(["nft", "delete", "table", "inet", nftTable], in: netns)
        guard r.ok else { throw MeshtraceError(.kernelRefused, "could not remove nft table inet \(nftTable): \(r.stderr)") }
        return true
    }
}

/// Turns TRACE steps into records for the correlator.
final class TraceJoiner {
    private let tags: RuleTagTable
    private var decoder: PacketDecoder
    /// What a step's record needs of its packet: the tuple, and what identifies the packet in the other sources
    /// (IP ID, TCP flags, sequence and acknowledgement numbers). Without them a step is not the same packet as
    /// its NFLOG events and capture: its SYN would carry ISN 0, and the twins' SYN, with the real one, would
    /// start a second connection of the same tuple.
    struct TracedPacket {
        var tuple: FiveTuple
        var flags: TCPFlags
        var ipID: UInt32
        var seq: UInt32
        var ack: UInt32
        var ipLength: UInt32
    }
    /// The last decoded headers per trace id: only the first event of a base-chain walk carries them.
    private var tuples: [UInt32: TracedPacket] = [:]
    private var tupleOrder: [UInt32] = []
    private var scratch = [UInt8](repeating: 0, count: 512)
    private(set) var steps: UInt64 = 0
    /// "family table chain handle" → original rule position, from the nft listing at install time.
    var positions: [String: Int] = [:]
    var ownHandles: Set<String> = []
    /// The hook of each trace id's walk so far: user chains (ISTIO_*) inherit it from the base chain.
    private var hooks: [UInt32: NetfilterHook] = [:]
    private var names: RuleTagTable

    init(tags: RuleTagTable) {
        self.tags = tags
        self.names = RuleTagTable()
        decoder = PacketDecoder(tags: RuleTagTable())
    }

    /// Builds a record from one NFT_MSG_TRACE message; nil for steps that are not rules or have no packet.
    func record(_ attrs: ByteReader, family: UInt8, into record: inout PacketRecord) -> Bool? {
        guard let e = NftTraceEvent.decode(attrs, names: names) else { return nil }
        let table = names.text(for: e.tableID), chain = names.text(for: e.chainID)
        if table == TraceRules.nftTable { return nil }
        if let net = e.network {
            let n = min(net.count, 256)
            var t = e.transport.map { min($0.count, 256) } ?? 0
            t = min(t, scratch.count - n)
            scratch.withUnsafeMutableBytes { buf in
                buf.baseAddress!.copyMemory(from: net.baseAddress!, byteCount: n)
                if t > 0, let tr = e.transport { (buf.baseAddress! + n).copyMemory(from: tr.baseAddress!, byteCount: t) }
            }
            var probe = PacketRecord()
            scratch.withUnsafeBytes { buf in
                decoder.decode(linkType: LinkType.raw, bytes: UnsafeRawBufferPointer(rebasing: buf[0..<(n + t)]),
                               wireLength: UInt32(n + t), into: &probe)
            }
            if probe.isIP {
                if tuples[e.id] == nil {
                    tupleOrder.append(e.id)
                    if tupleOrder.count > 4096 { tuples.removeValue(forKey: tupleOrder.removeFirst()) }
                }
                tuples[e.id] = TracedPacket(tuple: probe.tuple, flags: probe.tcpFlags, ipID: probe.ipID,
                                            seq: probe.tcpSeq, ack: probe.tcpAck, ipLength: probe.ipLength)
            }
        }
        guard let packet = tuples[e.id] else { return nil }
        let kind: String
        switch e.kind {
        case .rule: kind = "rule"
        case .return: kind = "return"
        case .policy: kind = "policy"
        case .unknown: return nil
        }
        let key = "\(family) \(table) \(chain) \(e.ruleHandle)"
        // Steps through meshtrace's own twins, and the implicit end-of-chain steps (no handle), are not the
        // pod's rules: leave them out.
        if kind == "rule" && (e.ruleHandle == 0 || ownHandles.contains(key)) { return nil }
        if kind == "return" { return nil }
        let position = kind == "policy" ? "0" : (positions[key].map(String.init) ?? "h\(e.ruleHandle)")
        if let hook = InstrumentationPlan.builtinHook(chain) ?? TraceJoiner.nftHook(chain) {
            if hooks[e.id] == nil, hooks.count > 4096 { hooks.removeAll(keepingCapacity: true) }
            hooks[e.id] = hook
        }
        steps += 1
        var meta = NflogMeta()
        meta.mark = e.mark
        meta.inputIfindex = e.inputIfindex
        meta.outputIfindex = e.outputIfindex
        meta.prefixID = tags.intern("TRACE: \(table):\(chain):\(kind):\(position)")
        record = PacketRecord()
        record.ref = FrameRef(source: 4, frame: steps)
        record.time = NflogSource.realtime()
        record.point = .netfilter(hooks[e.id] ?? .unknown)
        record.tuple = packet.tuple
        record.tcpFlags = packet.flags
        record.ipID = packet.ipID
        record.tcpSeq = packet.seq
        record.tcpAck = packet.ack
        record.ipLength = packet.ipLength
        record.wireLength = packet.ipLength
        record.nflog = meta
        return true
    }

    /// Native nft base chains are named after their hooks by convention (Istio: prerouting, output).
    static func nftHook(_ chain: String) -> NetfilterHook? {
        switch chain {
        case "prerouting": return .prerouting
        case "output": return .output
        case "input": return .input
        case "postrouting": return .postrouting
        default: return nil
        }
    }

    /// "table:chain:rulenum" of the live legacy rules → the original rule's position, or nil for meshtrace's own.
    var legacyPositions: [String: Int?] = [:]

    /// Reads the instrumented legacy IPv4 rules once: legacy TRACE's rulenum counts every rule in the chain,
    /// meshtrace's twins and TRACE rules included.
    static func legacyPositions(netns: NetnsRef) throws -> [String: Int?] {
        let r = try Command.run(["iptables-legacy-save"], in: netns)
        guard r.ok else { return [:] }
        var out: [String: Int?] = [:]
        var table = ""
        var counts: [String: (all: Int, original: Int)] = [:]
        for line in r.stdout.split(separator: "\n") {
            if line.hasPrefix("*") { table = String(line.dropFirst()); continue }
            guard line.hasPrefix("-A ") else { continue }
            let chain = line.split(separator: " ")[1]
            let key = "\(table):\(chain)"
            var c = counts[key] ?? (0, 0)
            c.all += 1
            if SavedRules.isOwn(line) {
                out["\(key):\(c.all)"] = .some(nil)
            } else {
                c.original += 1
                out["\(key):\(c.all)"] = c.original
            }
            counts[key] = c
        }
        return out
    }

    /// Legacy TRACE arrives as NFLOG on group 0 with `TRACE: table:chain:type:rulenum`; steps through
    /// meshtrace's own rules are left out and rulenum becomes the original rule's position.
    func rewriteLegacy(_ record: inout PacketRecord, instrumenter: Instrumenter) -> Bool {
        guard var meta = record.nflog else { return false }
        let text = tags.text(for: meta.prefixID)
        guard text.hasPrefix("TRACE: ") else { return false }
        let parts = text.dropFirst(7).trimmingCharacters(in: .whitespaces).split(separator: ":")
        guard parts.count == 4 else { return false }
        let position: Int
        switch parts[2] {
        case "rule":
            guard let known = legacyPositions["\(parts[0]):\(parts[1]):\(parts[3])"], let original = known else { return false }
            position = original
        case "policy": position = 0
        default: return false
        }
        meta.prefixID = tags.intern("TRACE: \(parts[0]):\(parts[1]):\(parts[2]):\(position)")
        record.nflog = meta
        steps += 1
        return true
    }
}
