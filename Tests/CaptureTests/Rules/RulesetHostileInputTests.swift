import XCTest
@testable import Capture

/// Garbage, truncated and hostile ruleset text gives a `.badInput` error naming the line, never a crash or a hang.
final class RulesetHostileInputTests: XCTestCase {
    func expectBadInput(_ text: String, mentioning needle: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try RulesetLoader.load(text: text, origin: "in.txt"), file: file, line: line) { e in
            guard let m = e as? MeshtraceError else { return XCTFail("not a MeshtraceError: \(e)", file: file, line: line) }
            XCTAssertEqual(m.code, .badInput, file: file, line: line)
            XCTAssertTrue(m.message.contains(needle), "'\(m.message)' does not mention '\(needle)'", file: file, line: line)
            XCTAssertFalse(m.message.contains("\n"), file: file, line: line)
        }
    }

    func testTruncatedAndMalformedTextNamesTheLine() {
        let seed = (try? String(contentsOfFile: VerifierTests.seedPath, encoding: .utf8)) ?? ""
        let cut = seed.split(separator: "\n").prefix(20).joined(separator: "\n")
        expectBadInput(cut, mentioning: "line 17")            // "*nat" opened on line 17, never committed
        expectBadInput("*nat\n-A NOPE -j ACCEPT\nCOMMIT\n", mentioning: "line 2")
        expectBadInput("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n", mentioning: "line 3")
        expectBadInput("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -s 10.0.0.300 -j ACCEPT\nCOMMIT\n", mentioning: "line 3")
        expectBadInput("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -m comment --comment \"open -j ACCEPT\nCOMMIT\n", mentioning: "line 3")
        expectBadInput("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j ISTIO_MISSING\nCOMMIT\n", mentioning: "line 3")
        expectBadInput("*nat\n:OUTPUT ACCEPT [0:0]\n-I OUTPUT 5 -j ACCEPT\nCOMMIT\n", mentioning: "line 3")
        expectBadInput("*bogus\nCOMMIT\n", mentioning: "line 1")
        expectBadInput("hello world\n", mentioning: "line 1")
        expectBadInput("\n\n-A OUTPUT -j ACCEPT\n", mentioning: "line 3")
        expectBadInput("table inet t {\n  chain c {\n    ip daddr 1.2.3.4 accept\n", mentioning: "truncated")
        expectBadInput("table inet t {\n  chain c {\n    ip daddr 1.2.3.999 accept\n  }\n}\n", mentioning: "line 3")
        expectBadInput("table inet t {\n  chain c {\n    jump nowhere\n  }\n}\n", mentioning: "nowhere")
        expectBadInput("{\"nftables\": [{\"table\": {\"family\": \"inet\", \"name\": \"t\"}}, {\"rule\": {\"family\": \"inet\", \"table\": \"t\", \"chain\": \"c\", \"expr\": []}}]}", mentioning: "item 2")
        expectBadInput("{\"nftables\": [", mentioning: "JSON")
        expectBadInput("*nat\n\u{0}\nCOMMIT\n", mentioning: "binary")
        expectBadInput("", mentioning: "empty")
        expectBadInput("\n \n", mentioning: "empty")
    }

    /// The excerpt of a bad line in an error reaches the operator's terminal: its control characters, C1 ones too
    /// (U+009B is a CSI on many terminals), are shown as escapes, the same way as a capture's names.
    func testAnErrorShowsTheBadLinesControlCharactersAsEscapes() {
        expectBadInput("*nat\n:OUTPUT ACCEPT [0:0]\n\u{9B}2J\u{1B}]0;x\u{7}\nCOMMIT\n", mentioning: "\\x9b2J\\x1b]0;x\\x07")
    }

    func testHostileSizesDoNotHang() {
        let long = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT " + String(repeating: "-p tcp ", count: 5000) + "-j ACCEPT\nCOMMIT\n"
        expectBadInput(long, mentioning: "line 3")
        let deep = "table inet t {\n chain c {\n  tcp dport " + String(repeating: "{ ", count: 3000) + "\n"
        expectBadInput(deep, mentioning: "in.txt")
        // Many rules are fine and fast.
        var many = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        for i in 0..<5000 { many += "-A OUTPUT -d 10.\(i / 256 % 256).\(i % 256).1/32 -p tcp --dport \(i % 60000 + 1) -j ACCEPT\n" }
        many += "COMMIT\n"
        let start = Date()
        XCTAssertEqual(try RulesetLoader.load(text: many, origin: "many").allRules.count, 5000)
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
    }

    /// Random iptables rule specifications: every one parses or is a one-line `.badInput` naming line 4.
    func testRandomIptablesSpecs() {
        var rng = SplitMix(seed: 0x6970_7473)
        let words = ["!", "-p", "tcp", "udp", "-s", "-d", "10.0.0.0/8", "::1", "-i", "-o", "lo", "-m", "mark", "connmark", "--mark",
                     "0x539/0xfff", "--dport", "--sport", "53", "1:2", "-j", "-g", "ACCEPT", "REDIRECT", "--to-ports", "15001",
                     "TPROXY", "--on-port", "--tproxy-mark", "CONNMARK", "--set-xmark", "--restore-mark", "MARK", "CT", "--zone",
                     "NFLOG", "--nflog-prefix", "\"mt:4:a:b:1:-\"", "-m", "comment", "--comment", "\"x y\"", "multiport",
                     "--dports", "80,443", "conntrack", "--ctstate", "NEW", "owner", "--uid-owner", "1337", "set", "--match-set",
                     "s", "dst", "statistic", "--mode", "random", "ISTIO_OUTPUT", "DNAT", "--to-destination", "1.2.3.4", "-f"]
        fuzzWordSequences(&rng, words: words, maxWords: 10, errorLine: 4,
                          probe: PacketClass(family: .ipv4, proto: .tcp, path: .appToRemote, port: .other, mark: .ztunnel)) { spec in
            "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT \(spec)\nCOMMIT\n"
        }
    }

    /// 3000 random sequences of 1...`maxWords` of `words`, each placed in a ruleset by `text`: every one parses (and
    /// its verdict for `probe` is worked out without trapping) or is a one-line `.badInput`, naming `errorLine`
    /// when given.
    private func fuzzWordSequences(_ rng: inout SplitMix, words: [String], maxWords: UInt64, errorLine: Int?,
                                   probe: PacketClass, text: (String) -> String) {
        for i in 0..<3000 {
            let n = 1 + Int(rng.next() % maxWords)
            let sequence = (0..<n).map { _ in words[Int(rng.next() % UInt64(words.count))] }.joined(separator: " ")
            do {
                let rs = try RulesetLoader.load(text: text(sequence), origin: "fuzz\(i)")
                _ = Verifier(ruleset: rs).evaluate(probe)
            } catch let e as MeshtraceError {
                XCTAssertEqual(e.code, .badInput, "'\(sequence)': \(e.message)")
                if let errorLine { XCTAssertTrue(e.message.contains("line \(errorLine)"), "'\(sequence)': \(e.message)") }
            } catch {
                XCTFail("'\(sequence)': \(error)")
            }
        }
    }

    /// Random sequences of nft statement words inside a chain: every one parses or is a one-line `.badInput`.
    func testRandomNftStatements() {
        var rng = SplitMix(seed: 0x6e66_7473)
        let words = ["meta", "mark", "&", "and", "0xfff", "==", "!=", "<", ">=", "0x539", "ct", "state", "established", ",",
                     "related", "ip", "ip6", "saddr", "daddr", "10.0.0.1", "::1", "/", "tcp", "udp", "th", "dport", "sport", "53",
                     "1-2", "{", "}", "counter", "packets", "bytes", "1", "accept", "drop", "jump", "goto", "c", "redirect", "to",
                     ":15001", "tproxy", "dnat", "snat", "log", "prefix", "\"p\"", "group", "set", "zone", "comment", "oifname",
                     "\"lo\"", "l4proto", "nfproto", "ipv4", "skuid", "notrack", "masquerade", "@s", "icmp", "type", "reject", "with"]
        fuzzWordSequences(&rng, words: words, maxWords: 9, errorLine: nil,
                          probe: PacketClass(family: .ipv4, proto: .tcp, path: .appToRemote, port: .dns, mark: .none)) { stmt in
            "table inet t {\n chain c {\n }\n chain d {\n  \(stmt)\n }\n}\n"
        }
    }

    /// Random mutations of every real ruleset: each parse either succeeds or is a one-line `.badInput`; parsed
    /// results can be verified without trapping.
    func testRandomMutationsOfRealRulesets() throws {
        var rng = SplitMix(seed: 0x6d74_7275_6c65)
        var texts: [String] = []
        for url in RulesetParsingTests.referenceFiles { texts.append(try String(contentsOf: url, encoding: .utf8)) }
        for f in ["nft-default.nft.json", "restore-input.rules", "tproxy-era.iptables-save.txt", "nft-dualstack.nft"] {
            texts.append(try String(contentsOf: RulesetParsingTests.fixture(f), encoding: .utf8))
        }
        let junk: [String] = ["!", "\"", "{", "}", ";", "-j", "-A", "*nat", "COMMIT", "::", "/", "0x", "\t", "\n", "-m mark --mark", "jump", "\\", "é", "\u{7f}", "[1:2]", "# handle 9", "-I X 0"]
        var parsed = 0, rejected = 0
        for i in 0..<1500 {
            var bytes = Array(texts[i % texts.count].utf8)
            for _ in 0..<(1 + Int(rng.next() % 4)) {
                guard !bytes.isEmpty else { break }
                let at = Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 5 {
                case 0: bytes.remove(at: at)
                case 1: bytes.insert(contentsOf: Array(junk[Int(rng.next() % UInt64(junk.count))].utf8), at: at)
                case 2: bytes.removeSubrange(at..<bytes.count)                     // truncation
                case 3: bytes[at] = UInt8(truncatingIfNeeded: rng.next())
                default:
                    let other = Int(rng.next() % UInt64(bytes.count))
                    bytes.swapAt(at, other)
                }
            }
            let text = String(decoding: bytes, as: UTF8.self)
            do {
                let rs = try RulesetLoader.load(text: text, origin: "mutant\(i)")
                parsed += 1
                if i % 25 == 0 { _ = Verifier(ruleset: rs).run() }
                _ = RulesetAnalysis(rs)
                _ = RulesetGraph.dot(rs)
            } catch let e as MeshtraceError {
                rejected += 1
                XCTAssertEqual(e.code, .badInput, "mutant \(i): \(e.message)")
                XCTAssertTrue(e.message.contains("mutant\(i)"), "mutant \(i): message does not name the input: \(e.message)")
            }
        }
        XCTAssertGreaterThan(parsed, 50)
        XCTAssertGreaterThan(rejected, 50)
    }
}

/// A small deterministic generator, so a failing mutant can be reproduced.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
