// The correlator's two lookups per packet (a connection by its direction-free 5-tuple, and by its initiator's
// endpoint for NAT views) in an open-addressing table: linear probing over one array of keys and one of
// connections, deletion by backward shift (no tombstones, so probe chains stay short however many connections
// come and go). `Dictionary` hashed every key with SipHash-1-3 (seeding, combining and finalizing were ~5 % of
// an analysis); these keys are a few machine words that a multiply-xorshift mixes well. A random per-table seed
// goes into the mix, so a capture cannot be crafted offline to make every tuple collide.

protocol FlowTableKey: Equatable {
    /// A well-mixed hash of the key's words, seeded.
    func mixedHash(_ seed: UInt64) -> UInt64
}

@inline(__always)
func fmix64(_ x: UInt64) -> UInt64 {
    var h = x
    h ^= h >> 33
    h &*= 0xff51_afd7_ed55_8ccd
    h ^= h >> 33
    h &*= 0xc4ce_b9fe_1a85_ec53
    h ^= h >> 33
    return h
}

extension FlowKey: FlowTableKey {
    @inline(__always)
    func mixedHash(_ seed: UInt64) -> UInt64 {
        var h = seed ^ (aLo &* 0x9E37_79B9_7F4A_7C15)
        h = (h ^ bLo) &* 0xC2B2_AE3D_27D4_EB4F
        h = (h ^ aHi ^ (bHi &* 31)) &* 0x1656_67B1_9E37_79F9
        return fmix64(h ^ (UInt64(aPort) << 48 | UInt64(bPort) << 32 | UInt64(proto) << 16 | UInt64(aFamily) << 8 | UInt64(bFamily)))
    }
}

extension InitiatorKey: FlowTableKey {
    @inline(__always)
    func mixedHash(_ seed: UInt64) -> UInt64 {
        var h = seed ^ (endpoint.addr.lo &* 0x9E37_79B9_7F4A_7C15)
        h = (h ^ endpoint.addr.hi) &* 0xC2B2_AE3D_27D4_EB4F
        h ^= UInt64(endpoint.port) << 32 | UInt64(proto) << 16 | UInt64(endpoint.addr.family.rawValue)
        return fmix64(h)
    }
}

extension SYNKey: FlowTableKey {
    @inline(__always)
    func mixedHash(_ seed: UInt64) -> UInt64 {
        var h = seed ^ (addr.lo &* 0x9E37_79B9_7F4A_7C15)
        h = (h ^ addr.hi) &* 0xC2B2_AE3D_27D4_EB4F
        h ^= UInt64(isn) << 16 | UInt64(addr.family.rawValue)
        return fmix64(h)
    }
}

/// Connections by key. A slot is in use when its value is non-nil; its key is initialized exactly then.
final class FlowTable<Key: FlowTableKey> {
    private var keys: UnsafeMutablePointer<Key>
    private var values: UnsafeMutablePointer<ConnectionState?>
    private var capacity: Int
    private var mask: Int
    private(set) var count = 0
    private let seed: UInt64

    init(capacity requested: Int = 1024) {
        var c = 16
        while c < requested { c <<= 1 }
        capacity = c
        mask = c - 1
        keys = .allocate(capacity: c)
        values = .allocate(capacity: c)
        values.initialize(repeating: nil, count: c)
        seed = UInt64.random(in: .min ... .max)
    }

    deinit {
        for i in 0..<capacity where values[i] != nil { (keys + i).deinitialize(count: 1) }
        values.deinitialize(count: capacity)
        keys.deallocate()
        values.deallocate()
    }

    @inline(__always)
    private func home(_ key: Key) -> Int { Int(truncatingIfNeeded: key.mixedHash(seed)) & mask }

    /// The slot holding `key`, or -1.
    @inline(__always)
    private func slot(of key: Key) -> Int {
        var i = home(key)
        while values[i] != nil {
            if keys[i] == key { return i }
            i = (i + 1) & mask
        }
        return -1
    }

    /// The connection under `key` without taking a reference: valid only while the table still holds it.
    @inline(__always)
    func unretained(_ key: Key) -> Unmanaged<ConnectionState>? {
        let i = slot(of: key)
        return i < 0 ? nil : Unmanaged.passUnretained(values[i].unsafelyUnwrapped)
    }

    subscript(key: Key) -> ConnectionState? {
        @inline(__always) get {
            let i = slot(of: key)
            return i < 0 ? nil : values[i]
        }
        set {
            if let newValue { insert(key, newValue) } else { remove(key) }
        }
    }

    private func insert(_ key: Key, _ value: ConnectionState) {
        var i = home(key)
        while values[i] != nil {
            if keys[i] == key { values[i] = value; return }
            i = (i + 1) & mask
        }
        (keys + i).initialize(to: key)
        values[i] = value
        count += 1
        // At most half full: linear probing stays at a probe or two.
        if count * 2 > capacity { grow() }
    }

    private func remove(_ key: Key) {
        var hole = slot(of: key)
        guard hole >= 0 else { return }
        (keys + hole).deinitialize(count: 1)
        values[hole] = nil
        count -= 1
        // Backward shift: pull later members of the probe run into the hole when their home allows it.
        var j = (hole + 1) & mask
        while values[j] != nil {
            let h = home(keys[j])
            // `j` may move to `hole` unless its home lies cyclically in (hole, j].
            let stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j)
            if !stays {
                (keys + hole).moveInitialize(from: keys + j, count: 1)
                values[hole] = values[j]
                values[j] = nil
                hole = j
            }
            j = (j + 1) & mask
        }
    }

    private func grow() {
        let oldKeys = keys, oldValues = values, oldCapacity = capacity
        capacity <<= 1
        mask = capacity - 1
        keys = .allocate(capacity: capacity)
        values = .allocate(capacity: capacity)
        values.initialize(repeating: nil, count: capacity)
        for i in 0..<oldCapacity {
            guard let v = oldValues[i] else { continue }
            var j = home(oldKeys[i])
            while values[j] != nil { j = (j + 1) & mask }
            (keys + j).moveInitialize(from: oldKeys + i, count: 1)
            values[j] = v
        }
        oldValues.deinitialize(count: oldCapacity)
        oldKeys.deallocate()
        oldValues.deallocate()
    }
}
