import XCTest
@testable import Capture

/// The annotated pcapng, read back by an independent decoder: tshark (Wireshark 4.0's dissectors) and libpcap (tcpdump).
final class PcapngReportTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-pcapng-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    func tshark(_ args: [String]) throws -> Command.Result {
        guard Command.which("tshark") != nil else { throw XCTSkip("tshark is not installed (scripts/setup --test)") }
        return try Command.run(["tshark"] + args)
    }

    /// tshark's stderr, minus its note about running as root (it is about tshark, not the file).
    func warnings(_ r: Command.Result) -> [String] {
        r.stderr.split(separator: "\n").map(String.init).filter { !$0.contains("could be dangerous") && !$0.isEmpty }
    }

    func write(_ scenario: ReportScenario, name: String = "run.pcapng") throws -> String {
        let path = dir.appendingPathComponent(name).path
        let sink = try PcapngReport(path: path, ruleset: scenario.ruleset, tags: scenario.tags)
        try scenario.play(into: sink)
        return path
    }

    func testEveryPacketCarriesItsRuleHitsMarkConnectionAndHopReadBackByTshark() throws {
        let scenario = ReportScenario.standard()
        let path = try write(scenario)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".meshtrace-spool-\(getpid())"), "spool removed")

        let r = try tshark(["-r", path, "-T", "fields", "-E", "separator=|", "-e", "frame.number", "-e", "frame.interface_name",
                            "-e", "nflog.prefix", "-e", "ip.id", "-e", "frame.comment"])
        XCTAssertTrue(r.ok, r.stderr)
        XCTAssertEqual(warnings(r), [], "tshark complains about the file")
        let rows = r.stdout.split(separator: "\n").map { $0.split(separator: "|", omittingEmptySubsequences: false).map(String.init) }
        XCTAssertEqual(rows.count, scenario.packets.count, "every packet written")

        for (row, p) in zip(rows, scenario.packets) {
            XCTAssertEqual(row.count, 5, "\(row)")
            let (iface, prefix, ipID, comment) = (row[1], row[2], row[3], row[4])
            XCTAssertEqual(UInt32(ipID.dropFirst(2), radix: 16), p.record.ipID, "frame \(row[0]) is the packet given")
            let conn = p.connection!
            let timeline = scenario.timelines.first { $0.id == conn }!
            XCTAssertTrue(comment.contains("conn #\(conn) \(timeline.kind.rawValue)"), "frame \(row[0]): \(comment)")
            for hop in timeline.hops {
                XCTAssertTrue(comment.contains("ztunnel hop \(hop.direction.rawValue) #\(hop.outer) -> #\(hop.inner) (high)"),
                              "frame \(row[0]): \(comment)")
            }
            if p.linkType == LinkType.nflog {
                // tshark's own NFLOG dissector reads the prefix from the frame: the comment names the same rule.
                XCTAssertEqual(iface, "nf:\(p.record.point.hook)")
                let tag = RuleTag(prefix: prefix)!
                XCTAssertTrue(comment.hasPrefix("hit \(prefix) "), "frame \(row[0]): \(comment)")
                if case .rule = tag.position {
                    let role = scenario.ruleset.rule(for: tag)!.role.rawValue
                    XCTAssertTrue(comment.hasPrefix("hit \(prefix) \(role)"), "frame \(row[0]): \(comment)")
                }
                if let m = p.record.nflog?.mark, m != 0 {
                    XCTAssertTrue(comment.contains("mark 0x\(String(m, radix: 16))"), "frame \(row[0]): \(comment)")
                }
            } else {
                XCTAssertEqual(iface, p.record.point.interface)
                // The hits of this packet's NFLOG twins (same IP ID) are named on the interface copy too.
                let twins = scenario.packets.filter { $0.linkType == LinkType.nflog && $0.record.ipID == p.record.ipID }
                for t in twins {
                    XCTAssertTrue(comment.contains(scenario.tags.text(for: t.record.nflog!.prefixID)), "frame \(row[0]): \(comment)")
                }
                if twins.isEmpty { XCTAssertFalse(comment.contains("hit "), "frame \(row[0]): \(comment)") }
            }
        }

        let redirected = rows.filter { $0[4].contains("outbound-capture") }
        XCTAssertFalse(redirected.isEmpty)
        for row in redirected where row[2].contains("ISTIO_OUTPUT:4") {
            XCTAssertTrue(row[4].contains("original destination \(ReportScenario.service):80"), row[4])
        }
        let escapes = rows.filter { $0[4].contains("ESCAPE forged-ztunnel-mark") }
        let forged = scenario.findings.first { $0.findingClass == .forgedZtunnelMark }!.connection!
        XCTAssertEqual(escapes.count, scenario.packets.filter { $0.connection == forged }.count)
    }

    func testOneInterfacePerCapturePointWithNanosecondTimestamps() throws {
        let scenario = ReportScenario.standard()
        let path = try write(scenario)
        let r = try tshark(["-r", path, "-T", "fields", "-e", "frame.interface_name", "-e", "frame.time_epoch", "-e", "frame.encap_type"])
        XCTAssertTrue(r.ok, r.stderr)
        let rows = r.stdout.split(separator: "\n").map { $0.split(separator: "\t").map(String.init) }
        XCTAssertEqual(Set(rows.map { $0[0] }), ["lo", "eth0", "nf:OUTPUT", "nf:PREROUTING"])
        for (row, p) in zip(rows, scenario.packets) {
            XCTAssertEqual(row[1], p.record.time.description, "nanoseconds survive (if_tsresol 9)")
        }
        // tshark's capinfos view: the interfaces carry their link types (RAW 7 / NFLOG in Wireshark's WTAP_ENCAP numbering).
        let encaps = Dictionary(grouping: rows, by: { $0[0] }).mapValues { Set($0.map { $0[2] }) }
        XCTAssertEqual(encaps["lo"]?.count, 1)
        XCTAssertNotEqual(encaps["lo"], encaps["nf:OUTPUT"])
    }

    func testLibpcapReadsAFileOfOneLinkType() throws {
        guard Command.which("tcpdump") != nil else { throw XCTSkip("tcpdump is not installed") }
        let scenario = ReportScenario.standard(includeNflog: false)
        let path = try write(scenario, name: "interfaces.pcapng")
        let r = try Command.run(["tcpdump", "-nn", "-r", path])
        XCTAssertTrue(r.ok, r.stderr)
        XCTAssertEqual(r.stdout.split(separator: "\n").count, scenario.packets.count)
        XCTAssertTrue(r.stdout.contains("\(ReportScenario.pod).40000 > 127.0.0.1.15001: Flags [S]"), r.stdout)
    }

    func testCommentsSurviveASpoolLargerThanTheSamePacketWindow() throws {
        let scenario = ReportScenario.standard(extraOutbound: 200)
        XCTAssertGreaterThan(scenario.packets.count, 2 * PcapngReport.samePacketWindow)
        let path = try write(scenario)
        let r = try tshark(["-r", path, "-T", "fields", "-e", "frame.comment"])
        XCTAssertTrue(r.ok, r.stderr)
        let comments = r.stdout.split(separator: "\n")
        XCTAssertEqual(comments.count, scenario.packets.count)
        let last = scenario.timelines.last!
        XCTAssertTrue(comments.last!.contains("conn #\(last.id) \(last.kind.rawValue)"))
        XCTAssertEqual(comments.filter { $0.contains("ztunnel hop outbound") }.count,
                       scenario.packets.filter { p in scenario.timelines.first { $0.id == p.connection }!.hops.contains { $0.direction == .outbound } }.count)
    }

    func testAnUnwritablePathIsAClearError() {
        XCTAssertThrowsError(try PcapngReport(path: "/nonexistent-dir/x.pcapng")) { e in
            XCTAssertEqual((e as? MeshtraceError)?.code, .badInput)
            // The file asked for is named, not the temporary spool beside it.
            XCTAssertFalse("\(e)".contains("spool"), "\(e)")
            XCTAssertTrue("\(e)".contains("/nonexistent-dir/x.pcapng"), "\(e)")
        }
        XCTAssertThrowsError(try HTMLReport(path: "/nonexistent-dir/x.html")) { e in
            XCTAssertEqual((e as? MeshtraceError)?.code, .badInput)
            XCTAssertFalse("\(e)".contains("spool"), "\(e)")
            XCTAssertTrue("\(e)".contains("/nonexistent-dir/x.html"), "\(e)")
        }
    }
}

final class EmptyRunReportTests: XCTestCase {
    func testARunWithoutPacketsGivesValidEmptyFiles() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-empty-\(getpid())-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        var config = OutputConfig()
        config.pcapngPath = dir.appendingPathComponent("empty.pcapng").path
        config.htmlPath = dir.appendingPathComponent("empty.html").path
        let reporter = try Reporter.make(config: config, title: "empty")
        XCTAssertTrue(reporter.wantsPackets)
        try reporter.finish(AnalysisSummary())
        let html = try String(contentsOfFile: config.htmlPath!, encoding: .utf8)
        XCTAssertTrue(html.contains("No connections."))
        XCTAssertTrue(html.hasSuffix("</html>\n"))
        if Command.which("tshark") != nil {
            let r = try Command.run(["tshark", "-r", config.pcapngPath!])
            XCTAssertTrue(r.ok, r.stderr)
            XCTAssertEqual(r.stdout, "")
        }
        // libpcap and meshtrace itself refuse a pcapng without an interface block: the empty file has one, and no
        // packet (an empty capture's --pcapng could not be read back before).
        let own = try PcapFileSource(path: config.pcapngPath!, tags: RuleTagTable())
        var record = PacketRecord()
        XCTAssertNil(own.next(into: &record))
        XCTAssertNil(own.damage)
        let libpcap = try PcapHandle.openOffline(path: config.pcapngPath!)
        defer { libpcap.close() }
        guard case .end = libpcap.next() else { return XCTFail("libpcap read a packet or an error") }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted(), ["empty.html", "empty.pcapng"], "no spool left")
    }
}
