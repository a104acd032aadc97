import Foundation
#if canImport(Glibc)
import Glibc
#endif

// Colour for the text views. One decision, made once per stream: colour when the stream is a terminal
// and NO_COLOR is unset (https://no-color.org: "present and not an empty string" turns colour off),
// unless `--color always|never` says otherwise. TERM=dumb terminals get none either.

/// ANSI styling for text written to one stream. A disabled style returns its input unchanged, so callers
/// style unconditionally: `style.escape("ESCAPE")`.
public struct Style: Sendable {
    public let enabled: Bool

    public init(enabled: Bool) { self.enabled = enabled }

    /// The style for stdout (or another descriptor) under the user's `--color` choice.
    public init(config: OutputConfig, fileDescriptor: Int32 = STDOUT_FILENO,
                environment: [String: String] = ProcessInfo.processInfo.environment) {
        self.init(enabled: Style.colorEnabled(mode: config.color, isTerminal: isatty(fileDescriptor) == 1,
                                              environment: environment))
    }

    public static func colorEnabled(mode: OutputConfig.ColorMode, isTerminal: Bool, environment: [String: String]) -> Bool {
        switch mode {
        case .always: return true
        case .never: return false
        case .auto:
            if let v = environment["NO_COLOR"], !v.isEmpty { return false }
            if environment["TERM"] == "dumb" { return false }
            return isTerminal
        }
    }

    public static let plain = Style(enabled: false)

    /// An escape finding, or anything that means "traffic left without ztunnel".
    public func escape(_ s: String) -> String { paint(s, "1;31") }
    /// A rule (its prefix or text).
    public func rule(_ s: String) -> String { paint(s, "36") }
    /// An ambient role name.
    public func role(_ s: String) -> String { paint(s, "35") }
    /// Packet marks and connmarks.
    public func mark(_ s: String) -> String { paint(s, "33") }
    /// A redirect and its target.
    public func redirect(_ s: String) -> String { paint(s, "1;34") }
    /// Good news: captured by ztunnel, clean verdict.
    public func ok(_ s: String) -> String { paint(s, "32") }
    /// Bypass by design, losses, damaged input.
    public func warn(_ s: String) -> String { paint(s, "33") }
    /// Secondary detail: frame references, evidence.
    public func dim(_ s: String) -> String { paint(s, "2") }
    public func bold(_ s: String) -> String { paint(s, "1") }
    /// A connection block's first line.
    public func heading(_ s: String) -> String { paint(s, "1;4") }

    private func paint(_ s: String, _ sgr: String) -> String {
        enabled && !s.isEmpty ? "\u{1B}[\(sgr)m\(s)\u{1B}[0m" : s
    }
}
