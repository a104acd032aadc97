import XCTest
@testable import Capture

/// Colour end to end: `meshtrace analyze` into a pipe, into a terminal (util-linux `script` gives it a pty),
/// with NO_COLOR, and with `--color always|never`.
final class TerminalColourCommandTests: XCTestCase {
    var dir: URL!
    var capture: String!
    var meshtrace: String { ProjectPaths.root.appendingPathComponent(".build/debug/meshtrace").path }
    let escape = "\u{1B}["

    override func setUpWithError() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: meshtrace), "build the CLI first (swift build)")
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("mt-colour-\(getpid())-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        // Input: the scenario's interface packets, with its forged-mark escape (escapes are painted red).
        let scenario = ReportScenario.standard(includeNflog: false)
        capture = dir.appendingPathComponent("run.pcapng").path
        let writer = try PcapngWriter(path: capture)
        try writer.addInterface(PcapngInterface(linkType: 1, name: "eth0"))
        for p in scenario.packets {
            try p.frame.withUnsafeBytes { try writer.writePacket(interface: 0, time: p.record.time, data: $0, originalLength: UInt32(p.frame.count)) }
        }
        try writer.close()
    }
    override func tearDown() { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// Runs the analysis through `script`, so stdout and stderr are a terminal; returns what the terminal got.
    func onATerminal(_ args: [String], env: [String: String]) throws -> String {
        guard Command.which("script") != nil else { throw XCTSkip("util-linux script is not installed") }
        let log = dir.appendingPathComponent("typescript-\(UUID().uuidString.prefix(6))").path
        let assignments = env.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let command = "env -u NO_COLOR \(assignments) TERM=xterm \(meshtrace) analyze \(capture!) \(args.joined(separator: " "))"
        let r = try Command.run(["script", "-q", "-e", "-c", command, log])
        XCTAssertTrue([0, 1].contains(r.status), r.stdout + r.stderr)
        return try String(contentsOfFile: log, encoding: .utf8)
    }

    func testColourOnlyWhereItBelongs() throws {
        let piped = try Command.run([meshtrace, "analyze", capture, "--pod-ip", ReportScenario.pod])
        XCTAssertFalse(piped.stdout.isEmpty)
        XCTAssertFalse(piped.stdout.contains(escape), "a pipe gets no escape codes")
        XCTAssertFalse(piped.stderr.contains(escape))
        let forced = try Command.run([meshtrace, "analyze", capture, "--pod-ip", ReportScenario.pod, "--color", "always"])
        XCTAssertTrue(forced.stdout.contains(escape), "--color always paints even a pipe")
        XCTAssertTrue(forced.stdout.contains("\u{1B}[1;31m"), "the escape finding in bold red")

        let terminal = try onATerminal(["--pod-ip", ReportScenario.pod], env: [:])
        XCTAssertTrue(terminal.contains(escape), "a terminal gets colour")
        let noColor = try onATerminal(["--pod-ip", ReportScenario.pod], env: ["NO_COLOR": "1"])
        XCTAssertFalse(noColor.contains(escape), "NO_COLOR: not one escape code, on stdout or in the progress line")
        XCTAssertTrue(noColor.contains("#1 "), "the report itself is there")
        let never = try onATerminal(["--pod-ip", ReportScenario.pod, "--color", "never"], env: [:])
        XCTAssertFalse(never.contains(escape))
    }
}
