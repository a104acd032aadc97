import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Rule hits as they happen: the NFLOG group's messages decoded into records by the one NFLOG decoder.
/// Losses are counted two ways and never ignored: recv() failing with ENOBUFS (the kernel dropped messages
/// because the socket buffer was full) and gaps in NFULA_SEQ (which say exactly how many).
public final class NflogSource {
    public let socket: NflogSocket
    public let index: UInt16
    private var decoder: PacketDecoder
    private var buffer: UnsafeMutableRawBufferPointer
    private var expectedSequence: UInt32?
    /// Messages the kernel numbered but meshtrace never received (NFULA_SEQ gaps).
    public private(set) var sequenceGap: UInt64 = 0
    public private(set) var recordsRead: UInt64 = 0
    /// The kernel's time of the last record read that had one (`Int64.min` before the first): how far this source
    /// has been read, in the time the capture's packets carry too.
    public private(set) var lastKernelNanos = Int64.min
    /// The slots of records without a kernel time, read since the last record that had one (in this `drain`).
    private let unstamped: UnsafeMutablePointer<UnsafeMutablePointer<PacketRecord>>
    /// Whether `drain` gives a record without a kernel time the next stamped record's time (true), or leaves it
    /// the receipt time (false, the default). Only for a trace without a capture: with one, events are retimed from their packets,
    /// and the records are placed in the order they were read (one source's backlog, then the other's). After a
    /// stall, the NFLOG backlog would then move the correlator's clock through the whole stall before the
    /// capture's packets of it are placed, and finish connections whose lo leg is still to come (split them).
    /// Stamped on receipt, a backlog reads as one instant and moves the clock once.
    public var stampsFromSequence = false
    /// At most this many wait for a later time; a longer run keeps its receipt times. Far below the hold ring's
    /// capacity, so a waiting slot cannot be written with another record before its time is settled.
    static let unstampedCapacity = 1024

    public init(index: UInt16, tags: RuleTagTable, options: NflogSocket.Options) throws {
        self.index = index
        socket = try NflogSocket(options)
        decoder = PacketDecoder(tags: tags)
        // One datagram can carry a batch of messages (queue threshold); 1 MiB holds any batch the kernel sends.
        buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 8)
        unstamped = .allocate(capacity: NflogSource.unstampedCapacity)
    }

    deinit { buffer.deallocate(); unstamped.deallocate() }

    public var fd: Int32 { socket.fd }
    /// `--filter`: the decoder marks each record selected or not (`PacketDecoder.selector`).
    public var selector: ConnectionFilter? {
        get { decoder.selector }
        set { decoder.selector = newValue }
    }
    public var overruns: Int { socket.overruns }

    /// Reads up to `limit` datagrams that are waiting and decodes each record in place into the slot `slot`
    /// gives (the tracer's hold ring: no copy of the record on its way in), then hands it to `body` with the
    /// raw message TLVs (valid during the call); `body` says whether it kept the record. Returns the number of
    /// records, and whether the socket was read empty (false: `limit` datagrams were read and more may be waiting).
    @discardableResult
    public func drain(limit: Int, slot: () -> UnsafeMutablePointer<PacketRecord>,
                      _ body: (UnsafeMutablePointer<PacketRecord>, UnsafeRawBufferPointer) -> Bool) -> (records: Int, emptied: Bool) {
        var records = 0
        // The kernel adds NFULA_TIMESTAMP at PREROUTING, INPUT and FORWARD only, and sends events in batches (up to
        // the flush timeout, 10 ms): stamped on receipt, a batch's OUTPUT events would all read as happening after
        // every PREROUTING event in it (an app's SYN after the SYN-ACK). The kernel numbers events in the order it
        // logs them (NFULA_SEQ; batches keep that order), so an event without a time happened before the next one
        // that has a time: it takes that time when it is earlier than the receipt time. Sorted with the hooks'
        // rank (OUTPUT before PREROUTING at equal times), the timeline then reads in the kernel's order. Events
        // with no later stamped event in this pass keep their receipt time, an upper bound too.
        var waiting = 0
        for _ in 0..<limit {
            let n: Int
            switch socket.receive(into: buffer) {
            case .bytes(let count): n = count
            case .overrun: continue      // counted; the sequence gap says how many were lost
            case .empty: return (records, true)
            }
            let now = NflogSource.realtime()
            NflogSocket.forEachPacket(in: UnsafeRawBufferPointer(rebasing: buffer[0..<n])) { tlvs, family, group in
                recordsRead += 1
                records += 1
                let record = slot()
                record.pointee.ref = FrameRef(source: index, frame: recordsRead)
                record.pointee.time = now
                decoder.decodeNflogAttributes(tlvs, family: family, group: group, byteOrder: .host, into: &record.pointee)
                // The stored fields: `nflog` would copy all of them into an optional, twice per event.
                var stamped = false
                if record.pointee.hasNflog, let kernel = record.pointee.nflogFields.kernelTime {
                    record.pointee.time = kernel
                    lastKernelNanos = kernel.totalNanoseconds
                    stamped = true
                    if waiting > 0 { settle(waiting, before: kernel); waiting = 0 }
                }
                if record.pointee.hasNflog, let seq = record.pointee.nflogFields.sequence { account(seq) }
                // A record the caller did not keep leaves its slot to the next one: only kept ones wait.
                if body(record, tlvs), !stamped, stampsFromSequence, waiting < NflogSource.unstampedCapacity {
                    unstamped[waiting] = record
                    waiting += 1
                }
            }
        }
        return (records, false)
    }

    /// The waiting records happened before an event the kernel stamped `kernel`.
    private func settle(_ count: Int, before kernel: Timestamp) {
        for i in 0..<count where kernel < unstamped[i].pointee.time { unstamped[i].pointee.time = kernel }
    }

    private func account(_ seq: UInt32) {
        if let expected = expectedSequence, seq != expected {
            // Wrapping subtraction: a gap across the 2^32 wrap still counts right.
            let gap = seq &- expected
            if gap < 1 << 31 { sequenceGap += UInt64(gap) }
        }
        expectedSequence = seq &+ 1
    }

    static func realtime() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(seconds: Int64(ts.tv_sec), nanoseconds: Int32(ts.tv_nsec))
    }

    public func close() { socket.close() }
}
