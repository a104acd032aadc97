// Several captures from one node (an `-i any` capture plus an `nflog:G` capture, or one file per
// interface) read as one stream, ordered by timestamp: a k-way merge that holds one pending packet per
// source. Each source's frame buffer stays valid while its packet waits, because a source is only
// advanced after its pending packet was handed out.

public final class MergedSource: PacketSource {
    private let sources: [PacketSource]
    private var heads: [PacketRecord]
    private var headBytes: [UnsafeRawBufferPointer?]
    private var headLinkTypes: [Int32]
    private var primed = false
    /// The source whose packet was handed out last: advanced on the next call.
    private var handedOut = -1
    /// The same sources when all are files (always, for `init(paths:)`): merged by each file's next frame time,
    /// read before decoding, so only the frame handed out is decoded, straight into the caller's record.
    /// Unmanaged, and with the heads in raw memory: the merge runs once per packet, and every reference read
    /// out of an array costs a retain and a release (`sources` keeps the files alive).
    private let allFiles: Bool
    private let files: UnsafeMutablePointer<Unmanaged<PcapFileSource>>
    private let headTimes: UnsafeMutablePointer<Timestamp>
    private let headLive: UnsafeMutablePointer<Bool>
    public private(set) var currentLinkType: Int32 = -1

    public init(_ sources: [PacketSource]) {
        self.sources = sources
        heads = Array(repeating: PacketRecord(), count: sources.count)
        headBytes = Array(repeating: nil, count: sources.count)
        headLinkTypes = Array(repeating: -1, count: sources.count)
        let files = sources.compactMap { $0 as? PcapFileSource }
        allFiles = files.count == sources.count
        self.files = .allocate(capacity: files.count)
        self.files.initialize(from: files.map { Unmanaged.passUnretained($0) }, count: files.count)
        headTimes = .allocate(capacity: sources.count)
        headTimes.initialize(repeating: .zero, count: sources.count)
        headLive = .allocate(capacity: sources.count)
        headLive.initialize(repeating: false, count: sources.count)
    }

    deinit {
        files.deallocate()
        headTimes.deallocate()
        headLive.deallocate()
    }

    /// Opens each file as a `PcapFileSource` numbered by its position (`FrameRef.source`), each decoding with
    /// `selector` (`--filter`) when given.
    public convenience init(paths: [String], tags: RuleTagTable, interfaceNames: [String?] = [],
                            selector: ConnectionFilter? = nil) throws {
        guard paths.count <= Int(UInt16.max) else { throw MeshtraceError.badInput("too many capture files (\(paths.count))") }
        var files: [PacketSource] = []
        for (i, path) in paths.enumerated() {
            let name = i < interfaceNames.count ? interfaceNames[i] : nil
            files.append(try PcapFileSource(path: path, index: UInt16(i), tags: tags, interfaceName: name, selector: selector))
        }
        self.init(files)
    }

    public func next(into record: inout PacketRecord) -> UnsafeRawBufferPointer? {
        // One file (the common `analyze FILE`): nothing to merge, no record copied through a head slot.
        if sources.count == 1 {
            let bytes = sources[0].next(into: &record)
            currentLinkType = sources[0].currentLinkType
            return bytes
        }
        if allFiles { return nextFrame(into: &record) }
        if !primed {
            primed = true
            for i in sources.indices { advance(i) }
        } else if handedOut >= 0 {
            advance(handedOut)
        }
        var best = -1
        for i in sources.indices where headBytes[i] != nil {
            if best < 0 || heads[i].time < heads[best].time { best = i }
        }
        handedOut = best
        guard best >= 0 else { return nil }
        // Swapped, not copied: the head slot is refilled from scratch (every field) before it is looked at
        // again, and a swap moves the record's inline strings without a retain and a release per packet.
        swap(&record, &heads[best])
        currentLinkType = headLinkTypes[best]
        return headBytes[best]
    }

    private func nextFrame(into record: inout PacketRecord) -> UnsafeRawBufferPointer? {
        let n = sources.count
        if !primed {
            primed = true
            for i in 0..<n { advanceFile(i) }
        } else if handedOut >= 0 {
            advanceFile(handedOut)
        }
        var best = -1
        for i in 0..<n where headLive[i] {
            if best < 0 || headTimes[i] < headTimes[best] { best = i }
        }
        handedOut = best
        guard best >= 0 else { return nil }
        return files[best]._withUnsafeGuaranteedRef { file in
            currentLinkType = file.currentLinkType
            return file.decodePending(into: &record)
        }
    }

    @inline(__always)
    private func advanceFile(_ i: Int) {
        let t = files[i]._withUnsafeGuaranteedRef { $0.advance() }
        headTimes[i] = t ?? .zero
        headLive[i] = t != nil
    }

    /// Every source's damage, in source order, as one message (nil when all ended cleanly).
    public var damage: MeshtraceError? {
        let damaged = sources.compactMap(\.damage)
        guard let first = damaged.first else { return nil }
        return damaged.count == 1 ? first : .damaged(damaged.map(\.message).joined(separator: "; "))
    }

    private func advance(_ i: Int) {
        headBytes[i] = sources[i].next(into: &heads[i])
        headLinkTypes[i] = sources[i].currentLinkType
    }
}
