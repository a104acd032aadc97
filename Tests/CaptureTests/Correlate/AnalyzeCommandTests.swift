import XCTest
@testable import Capture

/// `meshtrace analyze` as a user runs it: the built binary, its stdout, stderr and exit code.
final class AnalyzeCommandTests: XCTestCase {
    static var executable: String { ProjectPaths.root.appendingPathComponent(".build/debug/meshtrace").path }
    private var scratch: URL!

    override func setUpWithError() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: Self.executable), "build meshtrace first (swift build)")
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("mt-analyze-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDown() {
        if let scratch { try? FileManager.default.removeItem(at: scratch) }
        super.tearDown()
    }

    static func analyze(_ args: [String]) throws -> Command.Result {
        try Command.run([executable, "analyze"] + args)
    }

    private func file(_ name: String, _ bytes: [UInt8]) throws -> String {
        let url = scratch.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }

    /// `-` reads a capture from stdin, and a FIFO or `<(...)` is read the same way: a pipe can be read once, from its
    /// start, so its first bytes are looked at without being taken (`CaptureStream`). Before, each was refused as
    /// "not a regular file". The report is the file's, byte for byte: classic pcap (libpcap), pcapng (the block
    /// reader), merged with a file, from a writer that sends 2 bytes and then waits, and from a FIFO whose writer
    /// comes later; and `- < FILE` reads the file; a cut stream is damaged input (exit 3) named `stdin`.
    func testACaptureIsReadFromAPipeAsFromItsFile() throws {
        let m = Self.executable
        func sh(_ script: String) throws -> Command.Result { try Command.run(["bash", "-c", script]) }
        let any = ProjectPaths.samples.appendingPathComponent("outbound-client-any.pcap").path
        let nflog = ProjectPaths.samples.appendingPathComponent("outbound-client-nflog.pcap").path
        let pcapng = scratch.appendingPathComponent("both.pcapng").path
        XCTAssertEqual(try Self.analyze([any, nflog, "--pcapng", pcapng, "--quiet"]).status, 0)
        for f in [any, nflog, pcapng] {
            let whole = try Self.analyze([f, "--color", "never"])
            XCTAssertEqual(whole.status, 0, whole.stderr)
            for script in ["cat '\(f)' | '\(m)' analyze - --color never",
                           "(head -c 2; sleep 0.3; cat) < '\(f)' | '\(m)' analyze - --color never",
                           "'\(m)' analyze <(cat '\(f)') --color never",
                           "'\(m)' analyze - --color never < '\(f)'"] {
                let piped = try sh(script)
                XCTAssertEqual(piped.status, 0, "\(script): \(piped.stderr)")
                XCTAssertEqual(piped.stdout, whole.stdout, script)
            }
        }
        let merged = try Self.analyze([any, nflog, "--color", "never"])
        XCTAssertEqual(try sh("cat '\(nflog)' | '\(m)' analyze '\(any)' - --color never").stdout, merged.stdout)
        let fifo = scratch.appendingPathComponent("fifo").path
        XCTAssertEqual(mkfifo(fifo, 0o600), 0)
        XCTAssertEqual(try sh("(sleep 0.3; cat '\(any)' > '\(fifo)') & '\(m)' analyze '\(fifo)' --color never").stdout,
                       try Self.analyze([any, "--color", "never"]).stdout)

        let cut = try sh("head -c 1000 '\(any)' | '\(m)' analyze - --quiet")
        XCTAssertEqual(cut.status, ExitStatus.damagedInput.rawValue, cut.stderr)
        assertOneErrorLine(cut, contains: "stdin: damaged after frame 10")
        let empty = try sh("true | '\(m)' analyze -")
        XCTAssertEqual(empty.status, ExitStatus.badInput.rawValue)
        assertOneErrorLine(empty, contains: "stdin: empty input, not a capture")
        let garbage = try sh("echo not a capture at all | '\(m)' analyze -")
        XCTAssertEqual(garbage.status, ExitStatus.badInput.rawValue)
        assertOneErrorLine(garbage, contains: "stdin: not a pcap or pcapng capture")
        let twice = try sh("true | '\(m)' analyze - -")
        XCTAssertEqual(twice.status, ExitStatus.usage.rawValue, twice.stderr)
    }

    /// Ctrl-C in `tcpdump -w - | meshtrace analyze -` reaches the writer and meshtrace together: the analysis must
    /// finish with what the pipe held when the writer's exit ends it (it died with the writer, its summary and the
    /// connections still open lost). The first SIGINT says so and reading goes on; a second one quits.
    func testAnInterruptWhileReadingAPipeFinishesTheAnalysis() throws {
        let any = try Data(contentsOf: ProjectPaths.samples.appendingPathComponent("outbound-client-any.pcap"))
        func start() throws -> (Process, Pipe, Pipe, Pipe) {
            let p = Process(), input = Pipe(), out = Pipe(), err = Pipe()
            p.executableURL = URL(fileURLWithPath: Self.executable)
            p.arguments = ["analyze", "-", "--brief", "--color", "never"]
            p.standardInput = input
            p.standardOutput = out
            p.standardError = err
            try p.run()
            input.fileHandleForWriting.write(any)
            usleep(500_000)
            return (p, input, out, err)
        }
        func waitForExit(_ p: Process) -> Bool {
            for _ in 0..<200 where p.isRunning { usleep(50_000) }
            return !p.isRunning
        }
        // One interrupt: still reading; the writer's end closes the pipe and the report is whole.
        let (p, input, out, err) = try start()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        kill(p.processIdentifier, SIGINT)
        usleep(300_000)
        XCTAssertTrue(p.isRunning, "the first SIGINT ended the analysis")
        try input.fileHandleForWriting.close()
        XCTAssertTrue(waitForExit(p))
        XCTAssertEqual(p.terminationReason, .exit)
        XCTAssertEqual(p.terminationStatus, 0)
        let report = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertTrue(report.contains("2 connections, 1 ztunnel hop joined"), report)
        let said = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertEqual(said, "meshtrace: interrupted: finishing with what the pipe held (Ctrl-C again to quit)\n")

        // Two: it quits, the writer or not.
        let (q, qInput, _, _) = try start()
        defer { if q.isRunning { kill(q.processIdentifier, SIGKILL) }; try? qInput.fileHandleForWriting.close() }
        kill(q.processIdentifier, SIGINT)
        usleep(200_000)
        kill(q.processIdentifier, SIGINT)
        XCTAssertTrue(waitForExit(q))
        XCTAssertEqual(q.terminationReason, .uncaughtSignal)
    }

    private var nflogSample: String { ProjectPaths.reference.appendingPathComponent("captures/tcpdump-tests-nflog.pcap").path }

    private func assertOneErrorLine(_ r: Command.Result, contains needle: String, file: StaticString = #filePath, line: UInt = #line) {
        let lines = r.stderr.split(whereSeparator: \.isNewline)
        XCTAssertEqual(lines.count, 1, r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("meshtrace: "), r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.contains(needle), "\(needle) not in: \(r.stderr)", file: file, line: line)
    }

    /// An NFLOG capture made with `tcpdump -i nflog:G -s 256` cuts a twin's longer records (attributes plus the packet
    /// copy): the summary says how many, and how to record them whole, beside the partly decoded count that was all
    /// it said.
    func testNflogRecordsCutByTheCapturesSnaplenAreCountedWithTheAdvice() throws {
        let record = Frame.nflog(group: 5153, Frame.attr(1, Frame.be16(0x0800) + [3, 0])
            + Frame.attr(10, Frame.cString("mt:4:nat:ISTIO_OUTPUT:4:06ce"))
            + Frame.attr(9, Frame.ipv4(src: "10.244.1.10", dst: "10.244.2.10", proto: 17,
                                       payload: Frame.udp(sport: 40000, dport: 53, payload: 80))))
        XCTAssertGreaterThan(record.count, 100)
        var cut = PcapFileBuilder(linkType: 239, snaplen: 100)
        cut.add(Array(record.prefix(100)), wireLength: record.count)
        var whole = PcapFileBuilder(linkType: 239)
        whole.add(record)
        for (name, builder, expected) in [("cut.pcap", cut, 1), ("whole.pcap", whole, 0)] {
            let path = try file(name, builder.bytes)
            let json = try Self.analyze([path, "--json"])
            let summary = try XCTUnwrap(json.stdout.split(separator: "\n").last.flatMap {
                try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }, json.stderr)
            XCTAssertEqual((summary["nflog_records_cut"] as? NSNumber)?.intValue ?? 0, expected, name)
            XCTAssertEqual((summary["damaged_packets"] as? NSNumber)?.intValue ?? 0, expected, name)
            let text = try Self.analyze([path, "--color", "never"])
            XCTAssertEqual(text.stdout.contains("1 of them NFLOG records cut by the capture's snaplen"), expected == 1, text.stdout)
            XCTAssertEqual(text.stdout.contains("record nflog:G without -s"), expected == 1, text.stdout)
        }
    }

    /// `--filter` shows the connections with a matching packet, whole, with the connections their ztunnel hop joins:
    /// two samples read as one node, `port 15008` matches only ztunnel's HBONE leg of the first, and the app's
    /// connection it carries is shown with it; the second sample's escaping connection is not shown, so it is not
    /// counted or reported either (exit 0 instead of 1).
    func testAFilterShowsMatchingConnectionsWithTheirHopsAndLeavesOutTheRest() throws {
        let samples = ProjectPaths.root.appendingPathComponent("samples").path
        let files = ["outbound-client", "mark-escape-client"].flatMap { s in ["any", "nflog"].map { "\(samples)/\(s)-\($0).pcap" } }
        func run(_ extra: [String]) throws -> (status: Int32, connections: [[String: Any]], summary: [String: Any]) {
            let r = try Self.analyze(files + ["--rules", "\(samples)/outbound-client-rules.txt", "--json"] + extra)
            let objects = try r.stdout.split(separator: "\n").map { try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]) }
            return (r.status, objects.filter { $0["type"] as? String == "connection" }, try XCTUnwrap(objects.last))
        }
        let all = try run([])
        XCTAssertEqual(all.status, ExitStatus.escapeFound.rawValue)
        XCTAssertEqual(all.connections.count, 3)
        XCTAssertNil(all.summary["connections_filtered_out"])

        let hbone = try run(["--filter", "tcp port 15008"])
        XCTAssertEqual(hbone.status, ExitStatus.ok.rawValue)
        XCTAssertEqual(hbone.connections.compactMap { $0["kind"] as? String }.sorted(), ["app-outbound", "hbone-outbound"])
        XCTAssertEqual(hbone.summary["connections"] as? Int, 2)
        XCTAssertEqual(hbone.summary["connections_filtered_out"] as? Int, 1)
        XCTAssertEqual(hbone.summary["escapes"] as? Int, 0)
        // Shown whole: the app's connection has the same events as without the filter.
        func appEvents(_ connections: [[String: Any]]) -> Int? {
            (connections.first { $0["kind"] as? String == "app-outbound" }?["events"] as? [Any])?.count
        }
        XCTAssertEqual(appEvents(hbone.connections), appEvents(all.connections))
        // Every record is still read and counted.
        XCTAssertEqual(hbone.summary["packets"] as? Int, all.summary["packets"] as? Int)

        let port80 = try run(["--filter", "tcp dst port 80"])
        XCTAssertEqual(port80.status, ExitStatus.escapeFound.rawValue)
        XCTAssertEqual(port80.connections.count, 3)
        XCTAssertEqual(port80.summary["connections_filtered_out"] as? Int, 0)

        let bad = try Self.analyze(files + ["--filter", "tcp port"])
        XCTAssertEqual(bad.status, ExitStatus.usage.rawValue)
        assertOneErrorLine(bad, contains: "bad filter 'tcp port'")
    }

    func testAnEmptyFileIsBadInput() throws {
        let r = try Self.analyze([try file("empty.pcap", [])])
        XCTAssertEqual(r.status, ExitStatus.badInput.rawValue)
        assertOneErrorLine(r, contains: "empty")
    }

    func testAFileThatIsNotACaptureIsBadInput() throws {
        let r = try Self.analyze([try file("text.pcap", Array("this is not a capture, just text\n".utf8))])
        XCTAssertEqual(r.status, ExitStatus.badInput.rawValue)
        assertOneErrorLine(r, contains: "not a pcap")
    }

    func testAMissingFileIsBadInput() throws {
        let r = try Self.analyze([scratch.appendingPathComponent("nope.pcap").path])
        XCTAssertEqual(r.status, ExitStatus.badInput.rawValue)
        assertOneErrorLine(r, contains: "nope.pcap")
    }

    func testAnUnknownLinkTypeIsBadInput() throws {
        // A classic pcap header (µs, little-endian) with link type 147 (USER0), then one 4-byte record.
        var h: [UInt8] = [0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 147, 0, 0, 0]
        h += [1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]
        let r = try Self.analyze([try file("user0.pcap", h)])
        XCTAssertEqual(r.status, ExitStatus.badInput.rawValue)
        assertOneErrorLine(r, contains: "link type 147")
    }

    func testATruncatedCaptureIsDamagedAndWhatWasReadIsStillAnalysed() throws {
        let whole = try Data(contentsOf: URL(fileURLWithPath: nflogSample))
        let cut = Array(whole.prefix(whole.count - 10))
        let r = try Self.analyze([try file("cut.pcap", cut), "--json"])
        XCTAssertEqual(r.status, ExitStatus.damagedInput.rawValue, r.stderr)
        assertOneErrorLine(r, contains: "cut.pcap")
        // tcpdump reads the same frames before the cut: the analysis covered them.
        let tcpdump = try Command.run(["tcpdump", "-n", "-r", scratch.appendingPathComponent("cut.pcap").path])
        let framesBeforeCut = tcpdump.stdout.split(whereSeparator: \.isNewline).count
        let summary = try XCTUnwrap(jsonLines(r.stdout).last)
        XCTAssertEqual(summary["type"] as? String, "summary")
        XCTAssertEqual(summary["packets"] as? Int, framesBeforeCut)
        XCTAssertEqual((summary["file_damage"] as? [String])?.count, 1)
    }

    func testAGarbageRulesFileIsBadInput() throws {
        let rules = try file("rules.txt", Array("*nat\n-A ISTIO_OUTPUT --bogus-flag\nthis is not a rule\n".utf8))
        let r = try Self.analyze([nflogSample, "--rules", rules])
        XCTAssertEqual(r.status, ExitStatus.badInput.rawValue, r.stdout + r.stderr)
        XCTAssertTrue(r.stderr.hasPrefix("meshtrace: "), r.stderr)
    }

    func testNoFileIsAUsageError() throws {
        let r = try Self.analyze([])
        XCTAssertEqual(r.status, ExitStatus.usage.rawValue)
    }

    /// `--max-open N`: a capture of 100 SYNs nobody answers keeps 10 open at most; the rest are printed as they are
    /// pushed out, each once, marked ended early and counted in the summary. 0 is a usage error, for trace too.
    func testMaxOpenEndsTheConnectionsSeenLeastLatelyEarly() throws {
        // LINKTYPE_RAW; each record an IPv4 TCP SYN to 10.0.1.5:80 from its own port.
        var pcap = PcapFileBuilder(linkType: 101)
        for n in 0..<100 {
            let syn = Frame.tcp(sport: 20000 + n, dport: 80, seq: UInt32(n), ack: 0, flags: 0x02)
            pcap.add(Frame.ipv4(src: "93.184.216.4", dst: "10.0.1.5", proto: 6, payload: syn), fraction: UInt32(n * 10))
        }
        let flood = try file("flood.pcap", pcap.bytes)
        let r = try Self.analyze([flood, "--max-open", "10", "--pod-ip", "10.0.1.5", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = jsonLines(r.stdout)
        let connections = lines.filter { $0["type"] as? String == "connection" }
        XCTAssertEqual(connections.count, 100)
        let early = connections.filter { $0["ended_early"] as? Bool == true }.count
        XCTAssertGreaterThanOrEqual(early, 90)
        XCTAssertEqual(lines.last?["connections_ended_early"] as? Int, early)
        let all = try Self.analyze([flood, "--pod-ip", "10.0.1.5", "--json"])
        XCTAssertNil(jsonLines(all.stdout).last?["connections_ended_early"], "the default keeps them all")
        for args in [["analyze", flood], ["trace", "--netns", "mt-none-\(getpid())"]] {
            let zero = try Command.run([Self.executable] + args + ["--max-open", "0"])
            XCTAssertEqual(zero.status, ExitStatus.usage.rawValue, args[0])
            XCTAssertTrue(zero.stderr.contains("--max-open must be positive"), zero.stderr)
        }
        let noEvents = try Command.run([Self.executable, "trace", "--netns", "mt-none-\(getpid())", "--max-events", "0"])
        XCTAssertEqual(noEvents.status, ExitStatus.usage.rawValue)
        XCTAssertTrue(noEvents.stderr.contains("--max-events must be positive"), noEvents.stderr)
    }

    /// A capture whose every NFLOG record has a prefix of its own (hostile, or garbage): the summary lists the first
    /// `RuleTagTable.maxPrefixes` and one entry for the rest, counted together, instead of one per record (500 000
    /// such records took 414 MB and a 500 000-line summary).
    func testAPrefixOnEveryRecordIsCountedPastTheCapInOneEntry() throws {
        // LINKTYPE_NFLOG; each record a PREROUTING event (hook 0) of one TCP packet, with a prefix of its own.
        var pcap = PcapFileBuilder(linkType: 239)
        let records = RuleTagTable.maxPrefixes + 100
        for n in 0..<records {
            let ack = Frame.ipv4(src: "93.184.216.4", dst: "10.0.1.5", proto: 6,
                                 payload: Frame.tcp(sport: 40000, dport: 80, seq: UInt32(n), ack: 0, flags: 0x10))
            let tlvs = Frame.attr(1, Frame.be16(0x0800) + [0, 0]) + Frame.attr(10, Frame.cString("garbage-\(n)")) + Frame.attr(9, ack)
            pcap.add(Frame.nflog(group: 42, tlvs), fraction: UInt32(n % 1_000_000))
        }
        let r = try Self.analyze([try file("prefixes.pcap", pcap.bytes), "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let hits = try XCTUnwrap(jsonLines(r.stdout).last?["rule_hits"] as? [[String: Any]])
        XCTAssertEqual(hits.count, RuleTagTable.maxPrefixes + 1)
        let rest = try XCTUnwrap(hits.first { ($0["prefix"] as? String)?.contains("counted together") == true })
        XCTAssertEqual(rest["count"] as? Int, 100)
        XCTAssertEqual(hits.reduce(0) { $0 + ($1["count"] as? Int ?? 0) }, records)
    }

    /// A pcapng whose sections name more interfaces than the reports number (every packet on an interface of its
    /// own, in two sections of 40 000): the JSON report crashed (a number past the names), and each new name was looked
    /// for by reading every earlier one (20 s). Now the names past `EventContext.maxInterfaceNames` share one entry
    /// that says so; here two sections of 2 500 suffice.
    func testAPcapngNamingMoreInterfacesThanTheReportsNumberIsReadWhole() throws {
        var bytes: [UInt8] = []
        var n = 0
        for section in 0..<2 {
            var b = PcapngFileBuilder(order: .little)
            for i in 0..<2500 { b.addInterface(linkType: 101, name: "s\(section)if\(i)") }
            for i in 0..<2500 {
                n += 1
                let syn = Frame.tcp(sport: 1024 + n, dport: 80, seq: 1, ack: 0, flags: 0x02)
                b.addPacket(interface: UInt32(i), units: UInt64(1_700_000_000_000_000 + n),
                            Frame.ipv4(src: "93.184.216.4", dst: "10.0.1.5", proto: 6, payload: syn))
            }
            bytes += b.bytes
        }
        let r = try Self.analyze([try file("interfaces.pcapng", bytes), "--json"])
        XCTAssertEqual(r.status, 0, String(r.stderr.prefix(2000)))
        let points = jsonLines(r.stdout).filter { $0["type"] as? String == "connection" }
            .compactMap { (($0["events"] as? [[String: Any]])?.first?["point"] as? String) }
        XCTAssertEqual(points.count, 5000)
        XCTAssertEqual(points.first, "s0if0")
        XCTAssertEqual(Set(points).count, EventContext.maxInterfaceNames)
        XCTAssertEqual(points.last, EventContext.moreInterfacesText)
        XCTAssertEqual(points.filter { $0 == EventContext.moreInterfacesText }.count, 5000 - (EventContext.maxInterfaceNames - 1))
    }

    func testACleanCaptureExitsZeroAndTheJSONMatchesTcpdumpsView() throws {
        let r = try Self.analyze([nflogSample, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let records = jsonLines(r.stdout)
        let connections = records.filter { $0["type"] as? String == "connection" }
        // tcpdump's own reading of the four NFLOG records: four DNS answers to distinct client ports.
        let tcpdump = try Command.run(["tcpdump", "-n", "-r", nflogSample]).stdout
        let ports = tcpdump.split(whereSeparator: \.isNewline).compactMap { line -> Int? in
            guard let gt = line.range(of: " > ") else { return nil }
            let dst = line[gt.upperBound...].prefix { $0 != ":" }
            return Int(dst.split(separator: ".").last ?? "")
        }
        XCTAssertEqual(ports.count, 4)
        let analysed = connections.compactMap { ($0["original"] as? [String: Any])?["sport"] as? Int }
        XCTAssertEqual(Set(analysed), Set(ports))
        XCTAssertTrue(connections.allSatisfy { $0["kind"] as? String == "dns" })
        XCTAssertEqual(records.last?["nflog_records"] as? Int, 4)
    }

    func testTheTextViewPrintsABlockPerConnectionAndTotals() throws {
        let r = try Self.analyze([nflogSample, "--color", "never"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("#") }.count, 4)
        XCTAssertTrue(r.stdout.contains("4 events (4 NFLOG records, 0 packets captured), 4 connections"), r.stdout)
        XCTAssertFalse(r.stdout.contains("\u{1B}["), "no colour with --color never")
    }
}

func jsonLines(_ text: String) -> [[String: Any]] {
    text.split(whereSeparator: \.isNewline).compactMap {
        (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any]
    }
}
