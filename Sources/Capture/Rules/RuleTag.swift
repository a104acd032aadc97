import Foundation
// meshtrace's NFLOG prefix scheme: how a hit names the rule it twins.
//
//   mt:<family>:<table>:<chain>:<position>:<hash>
//
//   family    4 (iptables), 6 (ip6tables), n (native nftables; the table's own family is in the ruleset);
//             l4 / l6 for the iptables-legacy backend, so a netns whose two backends both hold the ambient rules
//             (Istio's legacy-vs-nft bug) gets a distinct prefix per backend. 4 / 6 are iptables-nft, or any
//             iptables backend in prefixes written before l4 / l6 existed.
//   table     the table name: nat, mangle, raw, filter, or an nft table such as istio-ambient-nat
//   chain     the chain name, ISTIO_OUTPUT, istio-prerouting, ...
//   position  1-based position of the twinned rule among the chain's *original* rules (twins not counted),
//             or an observation point: "in" / "out" (every packet at that hook, before any ambient rule)
//   hash      4 hex digits of FNV-1a over the twinned rule's canonical text, so a hit still maps to
//             its rule when positions moved (Istio re-applied its rules meanwhile); "-" for observation points
//
// NFLOG prefixes are at most 63 bytes plus NUL (NFULA_PREFIX, nf_log's 64-byte buffer). When
// table or chain would make it longer, that name is replaced by "~" and 8 hex digits of its FNV-1a hash,
// and `RuleTag.matches(table:)` / `matches(chain:)` compare through the same hash.

public struct RuleTag: Hashable, Sendable, CustomStringConvertible {
    public enum Family: String, Sendable {
        case v4 = "4", v6 = "6", nft = "n", legacyV4 = "l4", legacyV6 = "l6"
    }
    public enum Position: Hashable, Sendable {
        case rule(Int)
        case observeIn
        case observeOut
    }
    public var family: Family
    public var table: String
    public var chain: String
    public var position: Position
    public var textHash: UInt16?

    public static let maxPrefixBytes = 63

    /// The prefix says the twin is in the iptables-legacy backend (l4 / l6).
    public var isLegacy: Bool { family == .legacyV4 || family == .legacyV6 }

    /// What the printers put before a twin's table name: "legacy " in the iptables-legacy backend, else nothing.
    public var backendWord: StaticString { isLegacy ? "legacy " : "" }

    public init(family: Family, table: String, chain: String, position: Position, textHash: UInt16? = nil) {
        self.family = family; self.table = table; self.chain = chain; self.position = position; self.textHash = textHash
    }

    /// The prefix to put in `--nflog-prefix` / nft `log prefix`. Always at most 63 bytes.
    public var prefix: String {
        let pos: String
        switch position {
        case .rule(let n): pos = String(n)
        case .observeIn: pos = "in"
        case .observeOut: pos = "out"
        }
        let hash = textHash.map { RuleTag.hex($0, width: 4) } ?? "-"
        var t = table, c = chain
        func build() -> String { "mt:\(family.rawValue):\(t):\(c):\(pos):\(hash)" }
        if build().utf8.count > RuleTag.maxPrefixBytes { c = RuleTag.shortName(chain) }
        if build().utf8.count > RuleTag.maxPrefixBytes { t = RuleTag.shortName(table) }
        return build()
    }

    public var description: String { prefix }

    /// Parses a prefix; nil when it is not one of meshtrace's (another tool's NFLOG rule, or empty).
    public init?(prefix: String) {
        let parts = prefix.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6, parts[0] == "mt", let fam = Family(rawValue: String(parts[1])),
              !parts[2].isEmpty, !parts[3].isEmpty else { return nil }
        let pos: Position
        switch parts[4] {
        case "in": pos = .observeIn
        case "out": pos = .observeOut
        default:
            guard let n = Int(parts[4]), n > 0 else { return nil }
            pos = .rule(n)
        }
        var hash: UInt16? = nil
        if parts[5] != "-" {
            guard let h = UInt16(parts[5], radix: 16) else { return nil }
            hash = h
        }
        self.init(family: fam, table: String(parts[2]), chain: String(parts[3]), position: pos, textHash: hash)
    }

    public func matches(table name: String) -> Bool { table == name || table == RuleTag.shortName(name) }
    public func matches(chain name: String) -> Bool { chain == name || chain == RuleTag.shortName(name) }

    public static func shortName(_ name: String) -> String { "~" + hex(fnv1a32(name), width: 8) }

    /// 16-bit hash of a rule's canonical text (see `Rule.canonicalText`).
    public static func textHash(_ canonicalText: String) -> UInt16 {
        let h = fnv1a32(canonicalText)
        return UInt16(truncatingIfNeeded: h ^ (h >> 16))
    }

    public static func fnv1a32(_ s: String) -> UInt32 {
        var h: UInt32 = 0x811c9dc5
        for b in s.utf8 { h = (h ^ UInt32(b)) &* 0x01000193 }
        return h
    }

    static func hex<T: BinaryInteger>(_ v: T, width: Int) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: max(0, width - s.count)) + s
    }
}

/// Interns NFLOG prefixes so a decoded packet carries a 32-bit id instead of a String.
/// Lookups of a prefix seen before do not allocate: the bytes are hashed and compared in place.
public final class RuleTagTable: @unchecked Sendable {
    private var buckets: [UInt32: [UInt32]] = [:]
    private var bytes: [[UInt8]] = [[]]
    private var tags: [RuleTag?] = [nil]
    private var texts: [String] = [""]
    /// Recently seen prefixes by hash (id 0: empty slot). A capture repeats a handful of prefixes on every NFLOG
    /// record; this finds them without the dictionary's hashing of the hash.
    private var recent = [(hash: UInt32, id: UInt32)](repeating: (0, 0), count: 64)
    /// Guards the tables' growth against readers on other threads. Interning itself is for one thread at a time
    /// (the one decoding); reading tags and texts is for any.
    private let lock = NSLock()
    /// Distinct prefixes kept at most. A capture with a new prefix on every NFLOG record (hostile, or garbage) grew
    /// the table, and the summary's rule hits, with the file: 500 000 of them took 414 MB. The rest share one id
    /// (`overflowID`), its text saying so, and are counted together.
    public static let maxPrefixes = 16_384
    /// The id the prefixes past `maxPrefixes` share (0 until the first).
    private var overflowID: UInt32 = 0
    static let overflowText = "(prefixes past the first \(maxPrefixes) distinct ones, counted together)"

    public init() {}

    /// The id for these prefix bytes (without the trailing NUL); 0 for an empty prefix.
    public func intern(_ prefix: UnsafeRawBufferPointer) -> UInt32 {
        var n = prefix.count
        while n > 0 && prefix[n - 1] == 0 { n -= 1 }
        if n == 0 { return 0 }
        let h = RuleTagTable.hash(prefix, n)
        let slot = Int(h & 63)
        let seen = recent[slot]
        if seen.id != 0 && seen.hash == h {
            if holds(seen.id, prefix, n) { return seen.id }
        }
        if let ids = buckets[h] {
            // Indexed, not `for id in ids`: unspecialized (debug) code iterates an Array through a read
            // coroutine whose frame is heap-allocated, one allocation per packet (AllocationTests).
            var k = 0
            while k < ids.count {
                let id = ids[k]
                if holds(id, prefix, n) {
                    recent[slot] = (h, id)
                    return id
                }
                k += 1
            }
        }
        if bytes.count > RuleTagTable.maxPrefixes { return overflow() }
        let copy = [UInt8](UnsafeRawBufferPointer(rebasing: prefix[0..<n]))
        // Printed as kept: a prefix from a capture file may hold control characters (terminal escapes).
        let text = String(decoding: copy, as: UTF8.self).printable
        let tag = RuleTag(prefix: text)
        // Under the lock: `analyze` decodes (and interns) on a read-ahead thread while the correlator reads
        // tags and texts on its own. Lookups of known prefixes above touch only what this thread writes.
        lock.lock()
        let id = UInt32(bytes.count)
        bytes.append(copy)
        texts.append(text)
        tags.append(tag)
        lock.unlock()
        buckets[h, default: []].append(id)
        recent[slot] = (h, id)
        return id
    }

    /// The id shared by the prefixes past `maxPrefixes`: no bytes (so no prefix lookup ever matches it), no tag.
    private func overflow() -> UInt32 {
        if overflowID != 0 { return overflowID }
        lock.lock()
        overflowID = UInt32(bytes.count)
        bytes.append([])
        texts.append(RuleTagTable.overflowText)
        tags.append(nil)
        lock.unlock()
        return overflowID
    }

    /// Whether id `id` is these `n` bytes. Indexed in place: `bytes[i]` as a value would retain the prefix's array.
    @inline(__always)
    private func holds(_ id: UInt32, _ prefix: UnsafeRawBufferPointer, _ n: Int) -> Bool {
        bytes.withUnsafeBufferPointer { all in
            all[Int(id)].count == n && all[Int(id)].withUnsafeBytes { memcmp($0.baseAddress!, prefix.baseAddress!, n) == 0 }
        }
    }

    /// A word at a time (every NFLOG record is interned): the prefix's 8-byte words, then its tail, mixed.
    @inline(__always)
    private static func hash(_ p: UnsafeRawBufferPointer, _ n: Int) -> UInt32 {
        var h: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(n)
        var i = 0
        while i + 8 <= n {
            h = (h ^ p.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* 0xff51_afd7_ed55_8ccd
            h ^= h >> 29
            i += 8
        }
        var tail: UInt64 = 0
        var shift: UInt64 = 0
        while i < n { tail |= UInt64(p[i]) << shift; shift += 8; i += 1 }
        h = (h ^ tail) &* 0xc4ce_b9fe_1a85_ec53
        h ^= h >> 32
        return UInt32(truncatingIfNeeded: h)
    }

    public func intern(_ prefix: String) -> UInt32 {
        var s = prefix
        return s.withUTF8 { intern(UnsafeRawBufferPointer($0)) }
    }

    /// The parsed meshtrace tag, or nil for an empty or foreign prefix.
    public func tag(for id: UInt32) -> RuleTag? {
        lock.lock(); defer { lock.unlock() }
        return Int(id) < tags.count ? tags[Int(id)] : nil
    }
    /// The prefix text as logged.
    public func text(for id: UInt32) -> String {
        lock.lock(); defer { lock.unlock() }
        return Int(id) < texts.count ? texts[Int(id)] : ""
    }
    public var count: Int {
        lock.lock(); defer { lock.unlock() }
        return bytes.count - 1
    }
}

