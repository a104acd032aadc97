import Foundation

// Every failure the tool reports: one line for a person, and an exit code a script can test.
// The codes are documented in docs/EXIT-CODES.md; keep the two in step.

public enum ExitStatus: Int32, Sendable {
    /// Success; for analyze/verify/trace/lab: no escape found.
    case ok = 0
    /// Analysis ran and found at least one escape.
    case escapeFound = 1
    /// The input is not usable: not a capture, garbage ruleset, unknown link type, empty file.
    case badInput = 2
    /// The input was read but is damaged (truncated file or records); what could be read was analysed.
    case damagedInput = 3
    /// The named network namespace (or pid) does not exist.
    case noSuchNetns = 4
    /// Missing privileges (not root / no CAP_NET_ADMIN).
    case noPrivilege = 5
    /// The NFLOG group is already bound by another listener in that netns.
    case nflogGroupBusy = 6
    /// A tool meshtrace drives (iptables, nft, ip, ...) is not installed.
    case missingTool = 7
    /// The kernel refused an operation (rules could not be applied; they were rolled back).
    case kernelRefused = 8
    /// Leftover meshtrace rules were found (trace refuses to stack a second set; run `meshtrace cleanup`).
    case leftovers = 9
    /// Events were lost (ENOBUFS / sequence gaps) and `--strict` was given.
    case eventsLost = 10
    /// Command-line usage error (swift-argument-parser's own code).
    case usage = 64
}

public struct MeshtraceError: Error, CustomStringConvertible, Sendable {
    public var code: ExitStatus
    public var message: String
    public init(_ code: ExitStatus, _ message: String) {
        self.code = code
        // One line, always: a multi-line message from a tool's stderr is folded. And nothing in it drives the
        // terminal: a message may quote a bad ruleset line, a file name or a tool's output, whose control
        // characters (C1 ones too) are shown as escapes.
        self.message = message.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty }.joined(separator: "; ").controlsEscaped
    }
    public var description: String { message }

    public static func badInput(_ m: String) -> MeshtraceError { .init(.badInput, m) }
    public static func damaged(_ m: String) -> MeshtraceError { .init(.damagedInput, m) }
}

