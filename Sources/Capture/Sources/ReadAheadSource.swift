import Foundation

/// Reads and decodes a `MergedSource` on a thread of its own, a batch of records at a time, while the caller
/// correlates and prints the batches before: `meshtrace analyze` on two cores.
///
/// Reading and decoding are about a third of an analysis; the correlator and the printers are the rest, and
/// they stay on the caller's thread, in capture order, exactly as without read-ahead (the output is the same
/// bytes). Records are decoded straight into preallocated batch slots and read there by the caller: no record
/// is copied and nothing is allocated per packet. The two threads meet once per batch, under one lock.
///
/// Shared between the threads while both run: the sources and decoders belong to the reading thread alone;
/// the rule tag table is interned by it and read by the correlator under its lock (`RuleTagTable`); interface
/// names are interned under the name table's lock. Frame bytes are not kept, so a report that wants every
/// packet's bytes (pcapng, HTML) reads without read-ahead.
public final class ReadAheadSource {
    public static let batchSize = 1024
    private static let batches = 4

    private let source: MergedSource
    private let slots: UnsafeMutablePointer<PacketRecord>
    private var counts = [Int](repeating: 0, count: ReadAheadSource.batches)
    private var frameBytes = [UInt64](repeating: 0, count: ReadAheadSource.batches)
    private let condition = NSCondition()
    /// Batch numbers, oldest first: decoded and waiting for the caller, and free for the reader.
    private var ready: [Int] = []
    private var free: [Int] = Array(0..<ReadAheadSource.batches)
    private var finished = false
    private var started = false

    public init(_ source: MergedSource) {
        self.source = source
        let n = ReadAheadSource.batches * ReadAheadSource.batchSize
        slots = .allocate(capacity: n)
        slots.initialize(repeating: PacketRecord(), count: n)
        ready.reserveCapacity(ReadAheadSource.batches)
        free.reserveCapacity(ReadAheadSource.batches)
    }

    deinit {
        slots.deinitialize(count: ReadAheadSource.batches * ReadAheadSource.batchSize)
        slots.deallocate()
    }

    /// Calls `body` with every record in capture order, in place, on the calling thread, and with the bytes of
    /// each batch's frames (plus 16 per record, as pcap stores them) once per batch for progress. Returns when
    /// the source has ended; `source.damage` then says whether it ended early.
    public func forEach(_ body: (inout PacketRecord) -> Void, batchDone: (UInt64) -> Void = { _ in }) {
        precondition(!started, "a ReadAheadSource is read once")
        started = true
        let reader = Thread { [self] in read() }
        reader.name = "meshtrace-read-ahead"
        reader.start()
        while true {
            condition.lock()
            while ready.isEmpty && !finished { condition.wait() }
            if ready.isEmpty {
                condition.unlock()
                return
            }
            let b = ready.removeFirst()
            // Read under the lock: the reader writes these arrays (other batches' entries) while we work.
            let n = counts[b], bytes = frameBytes[b]
            condition.unlock()

            let base = slots + b * ReadAheadSource.batchSize
            for i in 0..<n { body(&base[i]) }
            batchDone(bytes)

            condition.lock()
            free.append(b)
            condition.broadcast()
            condition.unlock()
        }
    }

    /// The reading thread: fills free batches until the source ends.
    private func read() {
        while true {
            condition.lock()
            while free.isEmpty { condition.wait() }
            let b = free.removeFirst()
            condition.unlock()

            let base = slots + b * ReadAheadSource.batchSize
            var n = 0
            var bytes: UInt64 = 0
            while n < ReadAheadSource.batchSize, let frame = source.next(into: &base[n]) {
                bytes &+= UInt64(frame.count) &+ 16
                n += 1
            }

            condition.lock()
            counts[b] = n
            frameBytes[b] = bytes
            ready.append(b)
            let end = n < ReadAheadSource.batchSize
            if end { finished = true }
            condition.broadcast()
            condition.unlock()
            if end { return }
        }
    }
}
