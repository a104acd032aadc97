import Foundation
import XCTest
@testable import Capture

/// Reads a whole capture through meshtrace's reader (tests may allocate; the reader does not).
struct DecodedCapture {
    var records: [PacketRecord] = []
    var frames: [[UInt8]] = []
    var damage: MeshtraceError?
    var linkType: Int32 = -1
    let tags = RuleTagTable()

    init(_ path: String, interface: String? = nil) throws {
        let source = try PcapFileSource(path: path, index: 0, tags: tags, interfaceName: interface)
        linkType = source.linkType
        var record = PacketRecord()
        while let bytes = source.next(into: &record) {
            records.append(record)
            frames.append(Array(bytes))
        }
        damage = source.damage
    }

    func prefix(_ r: PacketRecord) -> String { tags.text(for: r.nflog?.prefixID ?? 0) }
}

/// An independent decoder's view of the same file: tshark's fields, one row per frame.
enum Tshark {
    static var available: Bool { Command.which("tshark") != nil }

    /// One row per frame. A field that occurs more than once (an ICMP error's outer and quoted headers) gives its
    /// first occurrence, or with `occurrence: "l"` its last.
    static func fields(_ path: String, _ names: [String], filter: String? = nil, occurrence: String = "f") throws -> [[String: String]] {
        var argv = ["tshark", "-n", "-r", path, "-T", "fields", "-E", "separator=|", "-E", "occurrence=\(occurrence)"]
        if let filter { argv += ["-Y", filter] }
        for n in names { argv += ["-e", n] }
        let r = try Command.run(["env", "TZ=UTC"] + argv)
        guard r.ok else { throw MeshtraceError(.missingTool, "tshark failed: \(r.stderr)") }
        return r.stdout.split(separator: "\n").map { line in
            let cols = line.split(separator: "|", omittingEmptySubsequences: false).map(String.init)
            var row: [String: String] = [:]
            for (i, n) in names.enumerated() { row[n] = i < cols.count ? cols[i] : "" }
            return row
        }
    }

    /// "1378492319.615994000" → Timestamp.
    static func epoch(_ text: String) -> Timestamp? {
        let parts = text.split(separator: ".")
        guard parts.count == 2, let s = Int64(parts[0]) else { return nil }
        let frac = String(parts[1].prefix(9)).padding(toLength: 9, withPad: "0", startingAt: 0)
        guard let ns = Int32(frac) else { return nil }
        return Timestamp(seconds: s, nanoseconds: ns)
    }

    /// tshark's absolute time ("Sep  6, 2013 18:31:58.614652000 UTC") → Timestamp.
    static func absolute(_ text: String) -> Timestamp? {
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        let words = text.replacingOccurrences(of: ",", with: "").split(separator: " ")
        guard words.count >= 4, let month = months.firstIndex(of: String(words[0])), let day = Int(words[1]),
              let year = Int(words[2]) else { return nil }
        let clock = words[3].split(separator: ".")
        let hms = clock[0].split(separator: ":").compactMap { Int($0) }
        guard hms.count == 3 else { return nil }
        var c = DateComponents()
        c.year = year; c.month = month + 1; c.day = day; c.hour = hms[0]; c.minute = hms[1]; c.second = hms[2]
        var cal = Calendar(identifier: .gregorian)
        cal.timeZone = TimeZone(identifier: "UTC")!
        guard let date = cal.date(from: c) else { return nil }
        let frac = clock.count > 1 ? String(clock[1]).padding(toLength: 9, withPad: "0", startingAt: 0) : "0"
        return Timestamp(seconds: Int64(date.timeIntervalSince1970), nanoseconds: Int32(frac) ?? 0)
    }

    static func int(_ text: String?) -> Int? {
        guard let t = text, !t.isEmpty else { return nil }
        if t.hasPrefix("0x") { return Int(t.dropFirst(2), radix: 16) }
        return Int(t)
    }
}

/// tcpdump as a second independent decoder.
enum Tcpdump {
    static func read(_ path: String, _ flags: [String]) throws -> [String] {
        let r = try Command.run(["env", "TZ=UTC", "tcpdump"] + flags + ["-r", path])
        guard r.ok else { throw MeshtraceError(.missingTool, "tcpdump failed: \(r.stderr)") }
        return r.stdout.split(separator: "\n").map(String.init)
    }
}

/// Formats a timestamp as tcpdump -tttt does in UTC ("2013-09-06 18:31:59.615994"), with `digits` fraction digits.
func tcpdumpTime(_ t: Timestamp, digits: Int) -> String {
    var cal = Calendar(identifier: .gregorian)
    cal.timeZone = TimeZone(identifier: "UTC")!
    let c = cal.dateComponents([.year, .month, .day, .hour, .minute, .second], from: Date(timeIntervalSince1970: TimeInterval(t.seconds)))
    func two(_ v: Int?) -> String { String(format: "%02d", v ?? 0) }
    let ns = String(format: "%09d", Int(t.nanoseconds))
    return "\(c.year!)-\(two(c.month))-\(two(c.day)) \(two(c.hour)):\(two(c.minute)):\(two(c.second)).\(ns.prefix(digits))"
}

enum ReferenceCaptures {
    /// ../shared/reference/captures when it is beside the checkout, else the copy under Fixtures/captures.
    static func path(_ name: String) -> String {
        let shared = ProjectPaths.reference.appendingPathComponent("captures").appendingPathComponent(name).path
        if FileManager.default.fileExists(atPath: shared) { return shared }
        return ProjectPaths.fixtures.appendingPathComponent("captures").appendingPathComponent(name).path
    }
}
