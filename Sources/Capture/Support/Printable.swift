// Text that comes from a capture file (a pcapng interface's if_name, an NFLOG record's prefix) is the file's
// writer's to choose: control characters in it would reach the operator's terminal as escape sequences (clear
// the screen, retitle the window, hide the rest of a line). They are shown as `\xHH` / `\u{HHHH}` instead, once,
// where such text is first taken in (interned), so every report prints the same visible form.

extension String {
    /// This text with C0 controls, DEL and C1 controls written as visible escapes (the backslash too, so the
    /// escaped form cannot be mistaken for text that was written that way); itself when it has none.
    var printable: String { escapingControls(backslash: true) }

    /// This text with its control characters written as visible escapes, backslashes left as they are: for a
    /// message that only quotes outside text (`MeshtraceError`), where no name has to be read back.
    var controlsEscaped: String { escapingControls(backslash: false) }

    private func escapingControls(backslash: Bool) -> String {
        guard unicodeScalars.contains(where: { $0.isControlCharacter || (backslash && $0 == "\\") }) else { return self }
        var out = ""
        for s in unicodeScalars {
            if backslash && s == "\\" { out += "\\\\" }
            else if s.isControlCharacter {
                out += s.value < 0x100 ? "\\x" + String(s.value, radix: 16, uppercase: false).leftPadded(2)
                                       : "\\u{" + String(s.value, radix: 16) + "}"
            } else { out.unicodeScalars.append(s) }
        }
        return out
    }

    private func leftPadded(_ width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}

extension Unicode.Scalar {
    /// C0 (U+0000-001F), DEL and C1 (U+0080-009F).
    fileprivate var isControlCharacter: Bool { value < 0x20 || (value >= 0x7f && value < 0xa0) }
}

/// "1 connection", "2 connections": `noun` counted, with `then` after it ("1 packet captured"). For summaries, written
/// once a run: the per-packet lines write their bytes without a String.
public func counted<N: BinaryInteger>(_ n: N, _ noun: String, then: String = "") -> String {
    "\(n) \(noun)\(n == 1 ? "" : "s")\(then)"
}
