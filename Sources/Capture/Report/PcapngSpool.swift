import Foundation
#if canImport(Glibc)
import Glibc
#endif

// The annotated pcapng can only be written at the end: a packet's ztunnel hop is known only once both
// connections of the hop were correlated, long after the packet went by. Holding every frame in memory
// would grow with the capture, so packets are spooled to a temporary file as they arrive (a fixed
// header with what is known at that moment, then the frame bytes) and read back once in `finish`.

/// What the spool keeps of one packet besides its bytes. Fixed size on disk (`encodedSize`).
struct SpooledPacket {
    static let encodedSize = 72
    static let noConnection = UInt32.max

    var seconds: Int64 = 0
    var nanoseconds: Int32 = 0
    var capturedLength: UInt32 = 0
    var originalLength: UInt32 = 0
    var interface: UInt32 = 0
    var connection: UInt32 = SpooledPacket.noConnection
    /// The NFLOG prefix, interned (`RuleTagTable`); 0 for interface captures and empty prefixes.
    var prefixID: UInt32 = 0
    var mark: UInt32 = 0
    var ipID: UInt32 = 0
    var tcpSeq: UInt32 = 0
    var payloadLength: UInt32 = 0
    var flags: UInt8 = 0
    var proto: UInt8 = 0
    var tcpFlags: UInt8 = 0
    var originalDestination: Endpoint? = nil

    static let hasMark: UInt8 = 1
    static let isNflog: UInt8 = 2

    init() {}

    init(_ r: PacketRecord, interface: UInt32, capturedLength: Int, connection: ConnectionID?) {
        seconds = r.time.seconds; nanoseconds = r.time.nanoseconds
        self.capturedLength = UInt32(capturedLength)
        originalLength = max(r.wireLength, UInt32(capturedLength))
        self.interface = interface
        self.connection = connection ?? SpooledPacket.noConnection
        ipID = r.ipID; tcpSeq = r.tcpSeq; payloadLength = r.payloadLength
        proto = r.tuple.proto; tcpFlags = r.tcpFlags.rawValue
        if let n = r.nflog {
            flags |= SpooledPacket.isNflog
            prefixID = n.prefixID
            if let m = n.mark { mark = m; flags |= SpooledPacket.hasMark }
            if let ct = n.conntrack, ct.isDestinationNATed { originalDestination = ct.original.dst }
        }
    }

    var time: Timestamp { Timestamp(seconds: seconds, nanoseconds: nanoseconds) }
    var connectionID: ConnectionID? { connection == SpooledPacket.noConnection ? nil : connection }
    var isNflogRecord: Bool { flags & SpooledPacket.isNflog != 0 }
    var markValue: UInt32? { flags & SpooledPacket.hasMark != 0 ? mark : nil }

    /// The same packet seen at several points (its NFLOG twins' hits and its pcap copies) shares this key:
    /// NAT rewrites addresses and ports, not the IP ID, the TCP sequence or the length.
    var samePacketKey: SamePacketKey {
        SamePacketKey(connection: connection, proto: proto, ipID: ipID, tcpSeq: tcpSeq, tcpFlags: tcpFlags,
                      payloadLength: payloadLength)
    }

    func encode(to out: BufferedFileOutput) throws {
        try out.append(le: UInt64(bitPattern: seconds))
        try out.append(le: UInt32(bitPattern: nanoseconds))
        try out.append(le: capturedLength)
        try out.append(le: originalLength)
        try out.append(le: interface)
        try out.append(le: connection)
        try out.append(le: prefixID)
        try out.append(le: mark)
        try out.append(le: ipID)
        try out.append(le: tcpSeq)
        try out.append(le: payloadLength)
        try out.append(flags)
        try out.append(proto)
        try out.append(tcpFlags)
        let d = originalDestination
        try out.append(d?.addr.family.rawValue ?? 0)
        try out.append(le: d?.port ?? 0)
        try out.append(le: UInt16(0))
        try out.append(le: d?.addr.hi ?? 0)
        try out.append(le: d?.addr.lo ?? 0)
    }

    init(decoding b: UnsafeRawBufferPointer) {
        func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: b.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
        func u64(_ o: Int) -> UInt64 { UInt64(littleEndian: b.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
        seconds = Int64(bitPattern: u64(0))
        nanoseconds = Int32(bitPattern: u32(8))
        capturedLength = u32(12); originalLength = u32(16); interface = u32(20); connection = u32(24)
        prefixID = u32(28); mark = u32(32); ipID = u32(36); tcpSeq = u32(40); payloadLength = u32(44)
        flags = b[48]; proto = b[49]; tcpFlags = b[50]
        if let family = IPAddress.Family(rawValue: b[51]), family != .none {
            let port = UInt16(littleEndian: b.loadUnaligned(fromByteOffset: 52, as: UInt16.self))
            originalDestination = Endpoint(IPAddress(family: family, hi: u64(56), lo: u64(64)), port)
        }
    }
}

struct SamePacketKey: Hashable {
    var connection: UInt32
    var proto: UInt8
    var ipID: UInt32
    var tcpSeq: UInt32
    var tcpFlags: UInt8
    var payloadLength: UInt32
}

/// Reads a spool file front to back through one buffer.
final class SpoolReader {
    private var fd: Int32
    private var buffer: [UInt8]
    private var start = 0
    private var end = 0
    private var eof = false
    let path: String

    init(path: String, bufferSize: Int = 1 << 20) throws {
        self.path = path
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw MeshtraceError.badInput("cannot read back \(path): \(String(cString: strerror(errno)))") }
        buffer = [UInt8](repeating: 0, count: max(bufferSize, 2 * 65_536 + SpooledPacket.encodedSize))
    }

    deinit { if fd >= 0 { Glibc.close(fd) } }

    /// Makes `n` bytes available at `start`; false at a clean end of file.
    private func fill(_ n: Int) throws -> Bool {
        if end - start >= n { return true }
        if start > 0 {
            let live = end - start
            buffer.withUnsafeMutableBytes { b in
                if live > 0 { memmove(b.baseAddress!, b.baseAddress! + start, live) }
            }
            start = 0; end = live
        }
        if n > buffer.count { buffer.append(contentsOf: [UInt8](repeating: 0, count: n - buffer.count)) }
        while end < n && !eof {
            let got = buffer.withUnsafeMutableBytes { b in read(fd, b.baseAddress! + end, b.count - end) }
            if got < 0 {
                if errno == EINTR { continue }
                throw MeshtraceError.badInput("cannot read back \(path): \(String(cString: strerror(errno)))")
            }
            if got == 0 { eof = true } else { end += got }
        }
        if end - start >= n { return true }
        if end == start { return false }
        throw MeshtraceError.badInput("spool file \(path) ends inside a record")
    }

    /// The next packet's header, and its bytes valid until the next call (nil for `skipBytes`).
    func next(skipBytes: Bool = false, _ body: (SpooledPacket, UnsafeRawBufferPointer) throws -> Void) throws -> Bool {
        guard try fill(SpooledPacket.encodedSize) else { return false }
        let header = buffer.withUnsafeBytes {
            SpooledPacket(decoding: UnsafeRawBufferPointer(rebasing: $0[start..<(start + SpooledPacket.encodedSize)]))
        }
        start += SpooledPacket.encodedSize
        let n = Int(header.capturedLength)
        guard try fill(n) || n == 0 else { throw MeshtraceError.badInput("spool file \(path) ends inside a record") }
        try buffer.withUnsafeBytes { b in
            try body(header, skipBytes ? UnsafeRawBufferPointer(start: nil, count: 0)
                                       : UnsafeRawBufferPointer(rebasing: b[start..<(start + n)]))
        }
        start += n
        return true
    }
}
