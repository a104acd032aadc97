// The outbound candidates filed under one address (`Correlator`'s index by address), in the order they began.
//
// A join may pair an app connection only with a tunnel that began within a window of it (`hopSlackNanos` before to
// `hopWindowNanos` after), so a look finds the window's start by halving and reads on to its end, instead of reading
// every candidate. A connection's `firstSeenNanos` never changes once it is made, so an entry keeps its place.
//
// Entries whose connection is done with (emitted, merged, joined, filed elsewhere) are not dropped at each look: the
// list is pruned when it has doubled since it was last (16 entries at least), and the looks skip them meanwhile.

struct CandidateList {
    struct Entry {
        let first: Int64
        let conn: ConnectionState
    }

    private(set) var entries: [Entry] = []
    /// The size at which `insert` wants a prune: twice what the last one kept.
    private(set) var pruneAt = 16

    /// Adds `c` at its place by its start (after those that began at the same time); nearly always at the end.
    mutating func insert(_ c: ConnectionState) {
        let e = Entry(first: c.firstSeenNanos, conn: c)
        if let last = entries.last, last.first > e.first {
            entries.insert(e, at: upperBound(e.first))
        } else {
            entries.append(e)
        }
    }

    /// The first position whose entry began at or after `t`.
    func lowerBound(_ t: Int64) -> Int {
        var lo = 0, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].first < t { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The first position whose entry began after `t`.
    private func upperBound(_ t: Int64) -> Int {
        var lo = 0, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].first <= t { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// Drops the entries `gone` says to, and sets the next prune at twice what is left.
    mutating func prune(_ gone: (ConnectionState) -> Bool) {
        entries.removeAll { gone($0.conn) }
        pruneAt = max(16, 2 * entries.count)
    }

    mutating func remove(_ c: ConnectionState) {
        entries.removeAll { $0.conn === c }
    }
}
