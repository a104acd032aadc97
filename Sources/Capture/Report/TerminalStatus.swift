import Foundation
#if canImport(Glibc)
import Glibc
#endif

// One self-rewriting line on stderr: the progress of an offline analysis, or a live trace's status.
// It is drawn only when stderr is a terminal (a log file must not fill with carriage returns) and not
// `--quiet`. It redraws with "\r" and pads with spaces over the previous text instead of using ANSI
// erase codes, so it is correct on any terminal and NO_COLOR users get no escape codes at all.
// Redraws are throttled (at most every `interval`), so calling `update` per packet stays cheap.

/// The line itself: draws, throttles, clears.
public final class TerminalStatusLine {
    public let enabled: Bool
    private let write: (String) -> Void
    private let interval: Double
    private var lastDraw: Double = -.infinity
    private var lastWidth = 0

    /// `write` receives the exact bytes for the terminal (tests pass their own).
    public init(enabled: Bool, interval: Double = 0.1, write: @escaping (String) -> Void) {
        self.enabled = enabled; self.interval = interval; self.write = write
    }

    /// The line on stderr when stderr is a terminal and the user did not ask for `--quiet`.
    public convenience init(config: OutputConfig) {
        self.init(enabled: config.progress && isatty(STDERR_FILENO) == 1) { text in
            var t = text
            t.withUTF8 { buf in _ = Glibc.write(STDERR_FILENO, buf.baseAddress, buf.count) }
        }
    }

    /// True when enough time passed since the last redraw; callers skip formatting otherwise.
    public func due(now: Double = monotonicSeconds()) -> Bool { enabled && now - lastDraw >= interval }

    public func draw(_ text: String, now: Double = monotonicSeconds()) {
        guard enabled else { return }
        lastDraw = now
        let width = text.count
        write("\r" + text + String(repeating: " ", count: max(0, lastWidth - width)))
        lastWidth = width
    }

    /// Removes the line (before other output goes to the same terminal, and at the end).
    public func clear() {
        guard enabled, lastWidth > 0 else { return }
        write("\r" + String(repeating: " ", count: lastWidth) + "\r")
        lastWidth = 0
        lastDraw = -.infinity
    }
}

public func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// "reading capture.pcap  412 MB / 1.2 GB  34%  180 MB/s  0:04 left" for long offline analyses.
public final class ProgressLine {
    public let line: TerminalStatusLine
    private let label: String
    private let total: UInt64?
    private var started: Double?
    private var startBytes: UInt64 = 0

    public init(label: String, totalBytes: UInt64?, line: TerminalStatusLine) {
        self.label = label; self.total = totalBytes; self.line = line
    }

    public convenience init(config: OutputConfig, label: String, totalBytes: UInt64?) {
        self.init(label: label, totalBytes: totalBytes, line: TerminalStatusLine(config: config))
    }

    /// Total size of the given files (for `totalBytes`); nil when a size is unknown (a pipe).
    public static func totalSize(of paths: [String]) -> UInt64? {
        var sum: UInt64 = 0
        for p in paths {
            guard let attrs = try? FileManager.default.attributesOfItem(atPath: p),
                  let n = (attrs[.size] as? NSNumber)?.uint64Value, n > 0 else { return nil }
            sum += n
        }
        return sum
    }

    /// Call as often as you like (per packet is fine): it redraws at most ten times a second.
    public func update(bytesRead: UInt64, now: Double = monotonicSeconds()) {
        if started == nil { started = now; startBytes = bytesRead }
        guard line.due(now: now) else { return }
        line.draw(text(bytesRead: bytesRead, now: now), now: now)
    }

    public func text(bytesRead: UInt64, now: Double) -> String {
        let elapsed = now - (started ?? now)
        // No rate until half a second of reading: the first reads say nothing about the speed.
        let rate: Double? = elapsed >= 0.5 ? Double(bytesRead &- startBytes) / elapsed : nil
        var parts = ["\(label)", formatBytes(bytesRead)]
        if let total, total > 0 {
            parts[1] += " / " + formatBytes(total)
            parts.append("\(Int(min(1, Double(bytesRead) / Double(total)) * 100))%")
        }
        if let rate {
            parts.append(formatBytes(UInt64(max(0, rate))) + "/s")
            if let total, rate > 0, bytesRead < total {
                parts.append(formatDuration(Double(total - bytesRead) / rate) + " left")
            }
        }
        return parts.joined(separator: "  ")
    }

    public func finish() { line.clear() }
}

/// "tracing pod-a  1,240 events/s  0 dropped  12 open  0:35" for `meshtrace trace`.
public final class LiveStatusLine {
    public let line: TerminalStatusLine
    private let label: String
    private var started: Double?
    private var windowStart: Double = 0
    private var windowEvents = 0
    private var rate: Double = 0

    public init(label: String, line: TerminalStatusLine) { self.label = label; self.line = line }

    public convenience init(config: OutputConfig, label: String) {
        self.init(label: label, line: TerminalStatusLine(config: config))
    }

    /// `events`: total NFLOG + pcap events so far; `dropped`: events lost (ENOBUFS, sequence gaps);
    /// `openConnections`: timelines not yet finished.
    public func update(events: Int, dropped: Int, openConnections: Int, now: Double = monotonicSeconds()) {
        if started == nil { started = now; windowStart = now; windowEvents = events }
        // The rate is over the last second or so, not since the start: a burst shows as a burst.
        if now - windowStart >= 1 {
            rate = Double(events - windowEvents) / (now - windowStart)
            windowStart = now; windowEvents = events
        }
        guard line.due(now: now) else { return }
        line.draw(text(dropped: dropped, openConnections: openConnections, now: now), now: now)
    }

    public func text(dropped: Int, openConnections: Int, now: Double) -> String {
        let elapsed = now - (started ?? now)
        return [label, "\(formatCount(Int(rate.rounded()))) events/s", "\(formatCount(dropped)) dropped",
                "\(formatCount(openConnections)) open", formatDuration(elapsed)].joined(separator: "  ")
    }

    /// Clear before printing a finished timeline on the same terminal; the next update redraws.
    public func suspend() { line.clear() }
    public func finish() { line.clear() }
}

func formatBytes(_ n: UInt64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"]
    var v = Double(n), i = 0
    while v >= 1000 && i < units.count - 1 { v /= 1000; i += 1 }
    return i == 0 ? "\(n) B" : String(format: v < 10 ? "%.1f" : "%.0f", v) + " " + units[i]
}

func formatCount(_ n: Int) -> String {
    let s = String(n.magnitude)
    var out = ""
    for (i, c) in s.enumerated() {
        if i > 0 && (s.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return n < 0 ? "-" + out : out
}

func formatDuration(_ seconds: Double) -> String {
    let s = Int(seconds.rounded(.down))
    return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60)
                     : String(format: "%d:%02d", s / 60, s % 60)
}
