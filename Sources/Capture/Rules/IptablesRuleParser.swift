import Foundation

// One iptables rule specification (what follows `-A CHAIN`) → matches + target.
//
// The match part is kept verbatim in `Rule.matchText` so an NFLOG twin (`matchText -j NFLOG ...`) re-parses in
// iptables-restore exactly as the rule it twins. Options meshtrace does not model stay as `.unknown` text, which
// the verifier treats as "may match".

enum IptablesRuleParser {
    typealias Token = IptablesTokenizer.Token

    static func parse(spec: [Token], line: String, family: RuleFamily,
                      onError: (String) -> MeshtraceError) throws -> Rule {
        var matches: [RuleMatch] = []
        var negate = false
        var module: String? = nil          // the last `-m NAME` (or implied by `-p tcp`)
        var markModule = "mark"            // which module `--mark` belongs to
        var targetRange: Range<Int>? = nil // token indices that belong to the target
        var target: RuleTarget = .counterOnly
        var unknownSince: Int? = nil       // start of an unknown module's tokens, for verbatim text

        func text(_ r: Range<Int>) -> String { spec[r].map { $0.quoted ? quote($0.text) : $0.text }.joined(separator: " ") }
        func closeUnknown(_ end: Int) {
            if let s = unknownSince, s < end { matches.append(.unknown(text(s..<end))) }
            unknownSince = nil
        }
        func arg(_ i: Int, _ opt: String) throws -> String {
            guard i + 1 < spec.count else { throw onError("\(opt) needs a value") }
            return spec[i + 1].text
        }

        var i = 0
        while i < spec.count {
            let tok = spec[i].text
            if tok == "!" && !spec[i].quoted {
                guard i + 1 < spec.count else { throw onError("'!' at the end of the rule") }
                negate = true
                i += 1
                continue
            }
            let neg = negate
            negate = false
            switch tok {
            case "-p", "--protocol":
                closeUnknown(i)
                let v = try arg(i, tok)
                if v.lowercased() != "all" && v != "0" {
                    guard let proto = protocolNumber(v) else { throw onError("unknown protocol '\(IptablesParser.excerpt(v))'") }
                    matches.append(.protocolIs(proto, negated: neg))
                }
                module = v.lowercased()
                i += 2
            case "-s", "--source", "--src", "-d", "--destination", "--dst":
                closeUnknown(i)
                let v = try arg(i, tok)
                var cidrs: [CIDR] = []
                for part in v.split(separator: ",") {
                    guard let c = parseCIDR(part, family: family) else { throw onError("bad address '\(IptablesParser.excerpt(String(part)))'") }
                    cidrs.append(c)
                }
                guard !cidrs.isEmpty else { throw onError("\(tok) needs an address") }
                let isSource = tok.hasPrefix("-s") || tok.hasPrefix("--s")
                if cidrs.count == 1 {
                    matches.append(isSource ? .source(cidrs[0], negated: neg) : .destination(cidrs[0], negated: neg))
                } else {
                    matches.append(.anyOf(cidrs.map { isSource ? .source($0, negated: false) : .destination($0, negated: false) }, negated: neg))
                }
                i += 2
            case "-i", "--in-interface", "-o", "--out-interface":
                closeUnknown(i)
                let v = try arg(i, tok)
                guard !v.isEmpty, v.utf8.count <= 16 else { throw onError("bad interface '\(IptablesParser.excerpt(v))'") }
                matches.append(tok.hasPrefix("-i") || tok.hasPrefix("--in") ? .inInterface(v, negated: neg) : .outInterface(v, negated: neg))
                i += 2
            case "-f", "--fragment":
                closeUnknown(i)
                matches.append(.unknown(neg ? "! -f" : "-f"))
                i += 1
            case "-m", "--match":
                closeUnknown(i)
                let v = try arg(i, tok)
                module = v
                if v == "mark" || v == "connmark" { markModule = v }
                if !["tcp", "udp", "mark", "connmark", "conntrack", "state", "owner", "set", "comment", "multiport", "sctp"].contains(v) {
                    unknownSince = i
                }
                i += 2
            case "-j", "--jump", "-g", "--goto":
                closeUnknown(i)
                let name = try arg(i, tok)
                var j = i + 2
                // Target options run until the next match option (iptables-save always puts the target last).
                while j < spec.count, !isMatchStart(spec[j]) { j += 1 }
                let opts = Array(spec[(i + 2)..<j])
                if tok == "-g" || tok == "--goto" {
                    guard opts.isEmpty else { throw onError("-g takes only a chain name") }
                    target = .goto(name)
                } else {
                    target = try parseTarget(name, opts, onError: onError)
                }
                targetRange = i..<j
                i = j
            default:
                guard tok.hasPrefix("-") else {
                    throw onError("unexpected '\(IptablesParser.excerpt(tok))'")
                }
                if unknownSince != nil {
                    // An option of an unknown module: it and its arguments stay in the verbatim text.
                    i += 1
                    while i < spec.count, !spec[i].text.hasPrefix("-") || spec[i].quoted, spec[i].text != "!" { i += 1 }
                    continue
                }
                let consumed = try parseModuleOption(tok, at: i, negated: neg, module: module, markModule: markModule,
                                                     spec: spec, matches: &matches, onError: onError)
                if consumed == 0 {
                    // An option meshtrace does not model, of a known module: keep it verbatim.
                    var j = i + 1
                    while j < spec.count, !spec[j].text.hasPrefix("-") || spec[j].quoted, spec[j].text != "!" { j += 1 }
                    let start = neg ? i - 1 : i
                    matches.append(.unknown((module.map { "-m \($0) " } ?? "") + text(start..<j)))
                    i = j
                } else {
                    i += consumed
                }
            }
        }
        closeUnknown(spec.count)

        // matchText: every token that is not the target, verbatim from the line.
        var matchText = ""
        if spec.isEmpty {
            matchText = ""
        } else if let tr = targetRange {
            var pieces: [String] = []
            if tr.lowerBound > 0 {
                pieces.append(String(line[spec[0].range.lowerBound..<spec[tr.lowerBound - 1].range.upperBound]))
            }
            if tr.upperBound < spec.count {
                pieces.append(String(line[spec[tr.upperBound].range.lowerBound..<spec[spec.count - 1].range.upperBound]))
            }
            matchText = pieces.joined(separator: " ")
        } else {
            matchText = String(line[spec[0].range.lowerBound..<spec[spec.count - 1].range.upperBound])
        }

        return Rule(table: "", chain: "", position: 0, family: family, backend: .unknown, text: "",
                    matchText: matchText, matches: matches, target: target)
    }

    private static func isMatchStart(_ t: Token) -> Bool {
        guard !t.quoted else { return false }
        return ["-m", "--match", "-p", "--protocol", "-s", "--source", "-d", "--destination", "-i", "-o",
                "--in-interface", "--out-interface", "!"].contains(t.text)
    }

    static func quote(_ s: String) -> String {
        "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
    }

    /// Returns how many tokens the option used (0: not modelled).
    private static func parseModuleOption(_ opt: String, at i: Int, negated neg: Bool, module: String?, markModule: String,
                                          spec: [Token], matches: inout [RuleMatch],
                                          onError: (String) -> MeshtraceError) throws -> Int {
        func arg(_ k: Int = 1) throws -> String {
            guard i + k < spec.count else { throw onError("\(opt) needs a value") }
            return spec[i + k].text
        }
        switch opt {
        case "--dport", "--destination-port", "--sport", "--source-port":
            let v = try arg()
            guard let r = parsePortRange(v) else { throw onError("bad port '\(IptablesParser.excerpt(v))'") }
            matches.append(opt.hasPrefix("--d") ? .destinationPort(r, negated: neg) : .sourcePort(r, negated: neg))
            return 2
        case "--dports", "--destination-ports", "--sports", "--source-ports":
            let v = try arg()
            var ranges: [RuleMatch] = []
            for p in v.split(separator: ",") {
                guard let r = parsePortRange(String(p)) else { throw onError("bad port '\(IptablesParser.excerpt(String(p)))'") }
                ranges.append(opt.hasPrefix("--d") ? .destinationPort(r, negated: false) : .sourcePort(r, negated: false))
            }
            guard !ranges.isEmpty else { throw onError("\(opt) needs ports") }
            matches.append(.anyOf(ranges, negated: neg))
            return 2
        case "--mark":
            let v = try arg()
            guard let (value, mask) = parseValueMask(v) else { throw onError("bad mark '\(IptablesParser.excerpt(v))'") }
            matches.append(markModule == "connmark" || module == "connmark"
                           ? .connmark(value: value, mask: mask, negated: neg) : .mark(value: value, mask: mask, negated: neg))
            return 2
        case "--ctstate", "--state":
            let v = try arg()
            let states = Set(v.split(separator: ",").map { $0.uppercased() })
            let known: Set<String> = ["NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "SNAT", "DNAT"]
            guard !states.isEmpty, states.isSubset(of: known) else { throw onError("bad conntrack state '\(IptablesParser.excerpt(v))'") }
            matches.append(.ctstate(states, negated: neg))
            return 2
        case "--uid-owner", "--gid-owner":
            let v = try arg()
            guard let n = UInt32(v.split(separator: "-").first ?? "") else { return 0 }
            matches.append(opt == "--uid-owner" ? .owner(uid: n, gid: nil, socketExists: false, negated: neg)
                                                : .owner(uid: nil, gid: n, socketExists: false, negated: neg))
            return 2
        case "--socket-exists":
            matches.append(.owner(uid: nil, gid: nil, socketExists: true, negated: neg))
            return 1
        case "--match-set":
            let name = try arg(), dir = try arg(2)
            matches.append(.set(name: name, direction: dir, negated: neg))
            return 3
        case "--comment":
            matches.append(.comment(try arg()))
            return 2
        default:
            return 0
        }
    }

    private static func parseTarget(_ name: String, _ opts: [Token], onError: (String) -> MeshtraceError) throws -> RuleTarget {
        var o: [String: String] = [:]
        var flags: Set<String> = []
        var k = 0
        while k < opts.count {
            let key = opts[k].text
            guard key.hasPrefix("--") else { throw onError("unexpected '\(IptablesParser.excerpt(key))' after -j \(name)") }
            if k + 1 < opts.count, !opts[k + 1].text.hasPrefix("--") || opts[k + 1].quoted {
                o[key] = opts[k + 1].text
                k += 2
            } else {
                flags.insert(key)
                k += 1
            }
        }
        func hex(_ key: String) throws -> (UInt32, UInt32)? {
            guard let v = o[key] else { return nil }
            guard let vm = parseValueMask(v) else { throw onError("bad value '\(IptablesParser.excerpt(v))' for \(key)") }
            return vm
        }
        func num(_ v: String?) -> UInt32? { v.flatMap { parseNumber($0) } }
        let verbatim = ([name] + opts.map { $0.quoted ? quote($0.text) : $0.text }).joined(separator: " ")
        switch name {
        case "ACCEPT": return .accept
        case "DROP": return .drop
        case "RETURN": return .return
        case "REJECT": return .reject
        case "TRACE": return .trace
        case "MASQUERADE" where opts.isEmpty: return .masquerade
        case "REDIRECT":
            guard let p = o["--to-ports"] ?? o["--to-port"] else { return .redirect(toPort: nil) }
            guard let r = parsePortRange(p.replacingOccurrences(of: "-", with: ":")) else { throw onError("bad --to-ports '\(IptablesParser.excerpt(p))'") }
            return .redirect(toPort: r.low)
        case "TPROXY":
            guard let p = o["--on-port"], let port = UInt16(p) else { throw onError("TPROXY needs --on-port") }
            let ip = o["--on-ip"].flatMap { IPAddress($0) }
            let mark = try hex("--tproxy-mark")
            return .tproxy(onPort: port, onIP: ip, mark: mark?.0, mask: mark?.1)
        case "DNAT": return .dnat(o["--to-destination"] ?? "")
        case "SNAT": return .snat(o["--to-source"] ?? "")
        case "MARK", "CONNMARK":
            let isConn = name == "CONNMARK"
            if let (v, m) = try hex("--set-xmark") { return isConn ? .connmarkSet(value: v, mask: m) : .setMark(value: v, mask: m) }
            if let (v, m) = try hex("--set-mark") {
                // --set-mark v/m zeroes the mask and ORs v: the same as --set-xmark v/(m|v).
                let mask = (o["--set-mark"]!.contains("/") ? m : 0xffff_ffff) | v
                return isConn ? .connmarkSet(value: v, mask: mask) : .setMark(value: v, mask: mask)
            }
            if let v = num(o["--or-mark"]) { return isConn ? .connmarkSet(value: v, mask: v) : .setMark(value: v, mask: v) }
            if let v = num(o["--and-mark"]) { return isConn ? .connmarkSet(value: 0, mask: ~v) : .setMark(value: 0, mask: ~v) }
            if let v = num(o["--xor-mark"]) { return isConn ? .connmarkSet(value: v, mask: 0) : .setMark(value: v, mask: 0) }
            if isConn, o["--restore-mark"] != nil || flags.contains("--restore-mark") {
                let both = num(o["--mask"])
                return .connmarkRestore(nfmask: num(o["--nfmask"]) ?? both ?? 0xffff_ffff, ctmask: num(o["--ctmask"]) ?? both ?? 0xffff_ffff)
            }
            if isConn, o["--save-mark"] != nil || flags.contains("--save-mark") { return .connmarkSave }
            return .unknown(verbatim)
        case "CT":
            if let z = o["--zone"], let n = UInt16(z) { return .ctZone(n) }
            return .unknown(verbatim)
        case "NFLOG":
            let g = o["--nflog-group"].flatMap { UInt16($0) } ?? 0
            return .nflog(group: g, prefix: o["--nflog-prefix"] ?? "")
        case "LOG":
            return .log(prefix: o["--log-prefix"] ?? "")
        default:
            // An extension meshtrace does not model, or a user chain (checked once the table is complete).
            if knownExtensionTargets.contains(name) { return .unknown(verbatim) }
            guard opts.isEmpty else { throw onError("unknown target '\(IptablesParser.excerpt(name))'") }
            return .jump(name)
        }
    }

    /// xtables target extensions (iptables-extensions(8)) that are not chains.
    static let knownExtensionTargets: Set<String> = [
        "AUDIT", "CHECKSUM", "CLASSIFY", "CLUSTERIP", "CONNSECMARK", "DNPT", "DSCP", "ECN", "HL", "HMARK", "IDLETIMER",
        "LED", "NETMAP", "NFQUEUE", "NOTRACK", "QUEUE", "RATEEST", "SECMARK", "SET", "SNPT", "SYNPROXY", "TCPMSS",
        "TCPOPTSTRIP", "TEE", "TOS", "TTL", "ULOG", "MASQUERADE", "CT", "MARK", "CONNMARK",
    ]

    static func protocolNumber(_ v: String) -> UInt8? {
        switch v.lowercased() {
        case "tcp": return 6
        case "udp": return 17
        case "icmp": return 1
        case "icmpv6", "ipv6-icmp", "icmp6": return 58
        case "sctp": return 132
        case "udplite": return 136
        case "esp": return 50
        case "ah": return 51
        case "gre": return 47
        default: return UInt8(v)
        }
    }

    static func parseNumber(_ s: String) -> UInt32? {
        if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt32(s.dropFirst(2), radix: 16) }
        return UInt32(s)
    }

    /// `0x539/0xfff`, `0x539` (mask all ones), `1337`.
    static func parseValueMask(_ s: String) -> (UInt32, UInt32)? {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let v = parseNumber(String(parts[0])) else { return nil }
        if parts.count == 2 {
            guard let m = parseNumber(String(parts[1])) else { return nil }
            return (v, m)
        }
        return (v, 0xffff_ffff)
    }

    static func parsePortRange(_ s: String) -> PortRange? {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 1 || parts.count == 2 else { return nil }
        let lo = parts[0].isEmpty ? 0 : UInt16(parts[0])
        let hi = parts.count == 2 ? (parts[1].isEmpty ? 65535 : UInt16(parts[1])) : lo
        guard let l = lo, let h = hi, l <= h else { return nil }
        return PortRange(l, h)
    }

    /// `10.0.0.1`, `10.0.0.0/8`, `10.0.0.0/255.0.0.0`, `::1/128`. No names: iptables-save never writes them.
    static func parseCIDR(_ s: Substring, family: RuleFamily?) -> CIDR? {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let addr = IPAddress(parts[0]) else { return nil }
        let full = addr.family == .v4 ? 32 : 128
        guard parts.count == 2 else { return CIDR(address: addr, prefixLength: full) }
        if let n = Int(parts[1]) {
            guard n >= 0, n <= full else { return nil }
            return CIDR(address: addr, prefixLength: n)
        }
        // Dotted netmask: only contiguous masks are expressible as a prefix.
        guard addr.family == .v4, let m = IPAddress.parseV4(parts[1]) else { return nil }
        let ones = m.nonzeroBitCount
        guard ones == 0 || m == ~(UInt32.max >> UInt32(ones)) else { return nil }
        return CIDR(address: addr, prefixLength: ones)
    }
}
