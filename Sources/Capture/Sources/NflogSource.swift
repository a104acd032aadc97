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
    /// Records that came without NFULA_TIMESTAMP (locally generated packets) and were stamped on receipt.
    public private(set) var stampedOnReceipt: UInt64 = 0

    public init(index: UInt16, tags: RuleTagTable, options: NflogSocket.Options) throws {
        self.index = index
        socket = try NflogSocket(options)
        decoder = PacketDecoder(tags: tags)
        // One datagram can carry a batch of messages (queue threshold); 1 MiB holds any batch the kernel sends.
        buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 8)
    }

    deinit { buffer.deallocate() }

    public var fd: Int32 { socket.fd }
    /// `--filter`: the decoder marks each record selected or not (`PacketDecoder.selector`).
    public var selector: ConnectionFilter? {
        get { decoder.selector }
        set { decoder.selector = newValue }
    }
    public var overruns: Int { socket.overruns }

    /// Reads up to `limit` datagrams that are waiting and decodes each record in place into the slot `slot`
    /// gives (the tracer's hold ring: no copy of the record on its way in), then hands it to `body` with the
    /// raw message TLVs (valid during the call). Returns the number of records, and whether the socket was read
    /// empty (false: `limit` datagrams were read and more may be waiting).
    @discardableResult
    public func drain(limit: Int, slot: () -> UnsafeMutablePointer<PacketRecord>,
                      _ body: (UnsafeMutablePointer<PacketRecord>, UnsafeRawBufferPointer) -> Void) -> (records: Int, emptied: Bool) {
        var records = 0
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
                if record.pointee.hasNflog, let kernel = record.pointee.nflogFields.kernelTime {
                    record.pointee.time = kernel
                } else {
                    stampedOnReceipt += 1
                }
                if record.pointee.hasNflog, let seq = record.pointee.nflogFields.sequence { account(seq) }
                body(record, tlvs)
            }
        }
        return (records, false)
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
