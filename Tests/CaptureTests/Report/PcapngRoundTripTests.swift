import XCTest
@testable import Capture

/// `meshtrace analyze IN --pcapng OUT`, then `meshtrace analyze OUT`: meshtrace's own reader (libpcap) gives
/// the same timelines, findings and totals from the annotated file as from the original capture.
final class PcapngRoundTripTests: XCTestCase {
    var dir: URL!
    var meshtrace: String { ProjectPaths.root.appendingPathComponent(".build/debug/meshtrace").path }

    override func setUpWithError() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: meshtrace), "build the CLI first (swift build)")
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-roundtrip-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// Analyses `input` writing the annotated pcapng, analyses that, and compares the JSON Lines.
    func roundTrip(_ input: String, extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws -> (annotated: String, json: String) {
        // Same file-name stem: the reader names a capture point without an interface name after its file.
        let out = dir.appendingPathComponent("annotated")
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        let annotated = out.appendingPathComponent(URL(fileURLWithPath: input).deletingPathExtension().lastPathComponent + ".pcapng").path
        let html = dir.appendingPathComponent("report.html").path
        let first = try Command.run([meshtrace, "analyze", input, "--json", "--quiet", "--pcapng", annotated, "--html", html] + extra)
        XCTAssertTrue([0, 1].contains(first.status), first.stderr, file: file, line: line)
        XCTAssertTrue(FileManager.default.fileExists(atPath: html), file: file, line: line)
        let second = try Command.run([meshtrace, "analyze", annotated, "--json", "--quiet"] + extra)
        XCTAssertEqual(second.status, first.status, second.stderr, file: file, line: line)
        XCTAssertFalse(first.stdout.isEmpty, file: file, line: line)
        XCTAssertEqual(second.stdout, first.stdout, "same timelines, findings and totals", file: file, line: line)
        return (annotated, first.stdout)
    }

    func testAReferenceCaptureRoundTrips() throws {
        for name in ["tcpdump-tests-tcp-handshake-nano.pcap", "tcpdump-tests-nflog.pcap"] {
            let path = ProjectPaths.reference.appendingPathComponent("captures/\(name)").path
            guard FileManager.default.fileExists(atPath: path) else { throw XCTSkip("\(path) not here (../shared is beside the checkout only on the dev machine)") }
            let (annotated, json) = try roundTrip(path)
            XCTAssertTrue(json.contains("\"type\":\"connection\""), json)
            let r = try Command.run(["tshark", "-r", annotated, "-T", "fields", "-e", "frame.comment"])
            XCTAssertTrue(r.ok, r.stderr)
            XCTAssertFalse(r.stdout.split(separator: "\n").contains { !$0.contains("conn #") && !$0.contains("no connection") })
        }
    }

    func testTheScenarioRoundTripsThroughLibpcap() throws {
        // The input: the scenario's interface packets (lo and eth0, EN10MB) written as plain pcapng, converted to
        // classic pcap by tcpdump, so meshtrace reads a file it did not write.
        guard Command.which("tcpdump") != nil else { throw XCTSkip("tcpdump is not installed") }
        let scenario = ReportScenario.standard(extraOutbound: 3, includeNflog: false)
        let plain = dir.appendingPathComponent("plain.pcapng").path
        let writer = try PcapngWriter(path: plain)
        try writer.addInterface(PcapngInterface(linkType: 1, name: "eth0"))
        for p in scenario.packets {
            try p.frame.withUnsafeBytes { try writer.writePacket(interface: 0, time: p.record.time, data: $0, originalLength: UInt32(p.frame.count)) }
        }
        try writer.close()
        let pcap = dir.appendingPathComponent("input.pcap").path
        let conv = try Command.run(["tcpdump", "-r", plain, "-w", pcap])
        XCTAssertTrue(conv.ok, conv.stderr)
        let (_, json) = try roundTrip(pcap, extra: ["--pod-ip", ReportScenario.pod])
        XCTAssertGreaterThanOrEqual(json.components(separatedBy: "\"type\":\"connection\"").count - 1, 4, json)
    }
}
