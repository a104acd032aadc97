import XCTest
@testable import Capture

final class TerminalStyleTests: XCTestCase {
    let escape = "\u{1B}["

    func config(_ mode: OutputConfig.ColorMode, quiet: Bool = false) -> OutputConfig {
        var c = OutputConfig(); c.color = mode; c.progress = !quiet; return c
    }

    func testAutoColourOnlyOnATerminalWithoutNoColor() {
        XCTAssertTrue(Style.colorEnabled(mode: .auto, isTerminal: true, environment: [:]))
        XCTAssertFalse(Style.colorEnabled(mode: .auto, isTerminal: false, environment: [:]))
        XCTAssertFalse(Style.colorEnabled(mode: .auto, isTerminal: true, environment: ["NO_COLOR": "1"]))
        // no-color.org: an empty NO_COLOR does not count.
        XCTAssertTrue(Style.colorEnabled(mode: .auto, isTerminal: true, environment: ["NO_COLOR": ""]))
        XCTAssertFalse(Style.colorEnabled(mode: .auto, isTerminal: true, environment: ["TERM": "dumb"]))
        XCTAssertTrue(Style.colorEnabled(mode: .always, isTerminal: false, environment: ["NO_COLOR": "1"]))
        XCTAssertFalse(Style.colorEnabled(mode: .never, isTerminal: true, environment: [:]))
    }

    func testAPipeGetsNoEscapeCodesUnlessColourIsForced() throws {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        defer { close(fds[0]); close(fds[1]) }
        let piped = Style(config: config(.auto), fileDescriptor: fds[1], environment: [:])
        let forced = Style(config: config(.always), fileDescriptor: fds[1], environment: ["NO_COLOR": "1"])
        for f in [piped.escape, piped.rule, piped.role, piped.mark, piped.ok, piped.warn, piped.dim, piped.bold, piped.heading, piped.redirect] {
            XCTAssertEqual(f("ESCAPE"), "ESCAPE")
        }
        XCTAssertEqual(forced.escape("ESCAPE"), "\u{1B}[1;31mESCAPE\u{1B}[0m")
        XCTAssertTrue(forced.dim("frame 3").hasPrefix(escape))
    }

    func testATerminalGetsColourAndNoColorTurnsItOff() throws {
        // A pseudo-terminal is a real terminal for isatty().
        // /dev/ptmx by hand: Glibc's Swift module hides posix_openpt/grantpt/ptsname, and the ioctl numbers
        // TIOCSPTLCK / TIOCGPTN are function-like macros (values of the generic encoding: x86_64, arm64).
        let master = open("/dev/ptmx", O_RDWR | O_NOCTTY)
        try XCTSkipIf(master < 0, "no pseudo-terminals here")
        defer { close(master) }
        var unlock: Int32 = 0, number: UInt32 = 0
        XCTAssertEqual(ioctl(master, UInt(0x4004_5431), &unlock), 0)
        XCTAssertEqual(ioctl(master, UInt(0x8004_5430), &number), 0)
        let slave = open("/dev/pts/\(number)", O_RDWR | O_NOCTTY)
        XCTAssertGreaterThanOrEqual(slave, 0)
        defer { close(slave) }
        XCTAssertTrue(Style(config: config(.auto), fileDescriptor: slave, environment: [:]).enabled)
        XCTAssertFalse(Style(config: config(.auto), fileDescriptor: slave, environment: ["NO_COLOR": "yes"]).enabled)
        XCTAssertFalse(Style(config: config(.never), fileDescriptor: slave, environment: [:]).enabled)
    }

    func testProgressLineRedrawsInPlaceThrottledAndClears() {
        var out = ""
        let line = TerminalStatusLine(enabled: true, interval: 0.1) { out += $0 }
        let progress = ProgressLine(label: "reading run.pcap", totalBytes: 10_000_000, line: line)
        progress.update(bytesRead: 1_000_000, now: 100.0)
        progress.update(bytesRead: 1_500_000, now: 100.05)  // within 100 ms: not drawn
        progress.update(bytesRead: 5_000_000, now: 102.0)
        XCTAssertEqual(out.filter { $0 == "\r" }.count, 2)
        XCTAssertTrue(out.contains("reading run.pcap  5.0 MB / 10 MB  50%  2.0 MB/s  0:02 left"), out)
        XCTAssertFalse(out.contains(escape), "no escape codes: padding clears the line")
        out = ""
        progress.finish()
        XCTAssertTrue(out.hasPrefix("\r") && out.hasSuffix("\r") && out.filter { $0 != " " } == "\r\r")
    }

    func testStatusLinesStaySilentWhenStderrIsNotATerminalOrQuiet() {
        var out = ""
        let off = TerminalStatusLine(enabled: false) { out += $0 }
        let live = LiveStatusLine(label: "tracing pod", line: off)
        live.update(events: 10, dropped: 0, openConnections: 1, now: 1)
        live.update(events: 5000, dropped: 3, openConnections: 2, now: 3)
        live.finish()
        XCTAssertEqual(out, "")
        // Under `swift test`, stderr is not a terminal or the test is quiet: both give a disabled line.
        XCTAssertFalse(TerminalStatusLine(config: config(.always, quiet: true)).enabled)
        if isatty(STDERR_FILENO) == 0 { XCTAssertFalse(TerminalStatusLine(config: config(.always)).enabled) }
    }

    func testLiveStatusShowsTheRecentRateDropsAndOpenConnections() {
        var out = ""
        let live = LiveStatusLine(label: "tracing pod-a", line: TerminalStatusLine(enabled: true) { out += $0 })
        live.update(events: 0, dropped: 0, openConnections: 0, now: 10)
        live.update(events: 2_500, dropped: 0, openConnections: 4, now: 11)
        live.update(events: 3_000, dropped: 7, openConnections: 12, now: 12.5)
        XCTAssertTrue(out.contains("\rtracing pod-a  333 events/s  7 dropped  12 open  0:02"), out)
        XCTAssertTrue(out.contains("2,500 events/s"), out)
        out = ""
        live.suspend()
        XCTAssertTrue(out.hasPrefix("\r"))
        live.update(events: 3_100, dropped: 7, openConnections: 1, now: 12.6)
        XCTAssertTrue(out.contains("1 open"), "redrawn after a suspend without waiting: \(out)")
    }

    func testByteAndCountFormats() {
        XCTAssertEqual(formatBytes(999), "999 B")
        XCTAssertEqual(formatBytes(1_234_567), "1.2 MB")
        XCTAssertEqual(formatBytes(987_000_000_000), "987 GB")
        XCTAssertEqual(formatCount(1_234_567), "1,234,567")
        XCTAssertEqual(formatDuration(3725), "1:02:05")
    }
}
