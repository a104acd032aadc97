// Connections in the order they began, for the joins that look at a window of start times (a service VIP's app
// connection and the tunnels ztunnel opened around it) instead of at every candidate.
//
// Entries are kept sorted by (`firstSeenNanos`, stamp): the stamp is the order they were added in, so equal start
// times keep that order. An entry is never updated; the correlator adds a connection again when it is listed again
// (a new stamp: a join undone), and treats an entry whose stamp is not its connection's latest as stale. A
// connection's `firstSeenNanos` never changes once it is made (a merge keeps the older connection's). Stale and
// finished entries are dropped from the front as they age, and all of them whenever the index has doubled since it
// was last compacted, so it holds at most about twice as many entries as there are candidates (4096 at least).

struct StartOrderIndex {
    struct Entry {
        let first: Int64
        let stamp: Int
        let conn: ConnectionState
    }

    private(set) var entries: [Entry] = []
    /// Entries before this have been dropped (`dropFront`); the array is shifted down now and then.
    private(set) var head = 0
    /// The size at which `add` compacts next: twice what the last compaction kept, 4096 at least. The front alone is
    /// not enough: it is dropped only up to the oldest entry still waiting, and one that waits for an hour (a
    /// long-lived connection no tunnel explains) would keep every entry behind it.
    private var compactAt = 4096

    var count: Int { entries.count - head }

    /// Adds `c` at its place by its start; nearly always at the end (connections are listed as they appear).
    /// `keep` says which entries a compaction keeps.
    mutating func add(_ c: ConnectionState, stamp: Int, keeping keep: (Entry) -> Bool) {
        let e = Entry(first: c.firstSeenNanos, stamp: stamp, conn: c)
        var i = entries.count
        while i > head, entries[i - 1].first > e.first || (entries[i - 1].first == e.first && entries[i - 1].stamp > stamp) {
            i -= 1
            // Far from the end (a connection listed long after it began, or listed again when a join was undone):
            // find the place by halving instead.
            if entries.count - i > 16 { i = lowerBound(after: e.first, stamp: stamp); break }
        }
        entries.insert(e, at: i)
        if count >= compactAt {
            compact(keeping: keep)
            compactAt = max(4096, 2 * count)
        }
    }

    /// The first position at or after `head` whose entry began at or after `t`.
    func lowerBound(_ t: Int64) -> Int {
        var lo = head, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].first < t { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The first position whose entry sorts after (`t`, `stamp`).
    private func lowerBound(after t: Int64, stamp: Int) -> Int {
        var lo = head, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].first < t || (entries[mid].first == t && entries[mid].stamp <= stamp) { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// Drops entries from the front while `gone` says so.
    mutating func dropFront(while gone: (Entry) -> Bool) {
        while head < entries.count, gone(entries[head]) { head += 1 }
        if head > 1024 && head * 2 > entries.count { entries.removeSubrange(0 ..< head); head = 0 }
    }

    /// Keeps only the entries `keep` says to.
    private mutating func compact(keeping keep: (Entry) -> Bool) {
        entries.removeSubrange(0 ..< head)
        head = 0
        entries.removeAll { !keep($0) }
    }

    mutating func removeAll() {
        entries = []
        head = 0
    }
}
