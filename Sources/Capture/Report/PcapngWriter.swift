import Foundation
#if canImport(Glibc)
import Glibc
#endif

// A pcapng writer, from the format's specification (IETF draft-ietf-opsawg-pcapng): one Section Header
// Block, then an Interface Description Block per capture point, then Enhanced Packet Blocks.
// libpcap's pcap_dump writes classic pcap only, which has neither interface names nor packet
// comments; both are what this file is for.
//
// Every block is written little-endian; the byte-order magic in the SHB tells readers so.
// Timestamps are nanoseconds since the epoch (if_tsresol = 9 on every interface), so NFLOG and
// interface captures keep their full resolution.

/// Appends bytes to a file through one reused buffer: nothing allocates per write once the buffer has grown.
final class BufferedFileOutput {
    let path: String
    private var fd: Int32
    private var buffer: [UInt8] = []
    private let flushAt: Int
    private(set) var bytesWritten: UInt64 = 0

    init(path: String, flushAt: Int = 1 << 18) throws {
        self.path = path; self.flushAt = flushAt
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw MeshtraceError.badInput("cannot write \(path): \(String(cString: strerror(errno)))") }
        buffer.reserveCapacity(flushAt + 65_536)
    }

    deinit { if fd >= 0 { Glibc.close(fd) } }

    func append(_ bytes: UnsafeRawBufferPointer) throws {
        buffer.append(contentsOf: bytes)
        bytesWritten += UInt64(bytes.count)
        if buffer.count >= flushAt { try flush() }
    }
    func append(_ v: UInt8) throws { try withUnsafeBytes(of: v) { try append($0) } }
    func append(le v: UInt16) throws { try withUnsafeBytes(of: v.littleEndian) { try append($0) } }
    func append(le v: UInt32) throws { try withUnsafeBytes(of: v.littleEndian) { try append($0) } }
    func append(le v: UInt64) throws { try withUnsafeBytes(of: v.littleEndian) { try append($0) } }
    func append(zeros n: Int) throws { for _ in 0..<n { try append(UInt8(0)) } }
    func append(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try append($0) } }

    func flush() throws {
        var done = 0
        while done < buffer.count {
            let n = buffer.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                throw MeshtraceError.badInput("cannot write \(path): \(String(cString: strerror(errno)))")
            }
            done += n
        }
        buffer.removeAll(keepingCapacity: true)
    }

    func close() throws {
        try flush()
        if fd >= 0 {
            let rc = Glibc.close(fd)
            fd = -1
            if rc != 0 { throw MeshtraceError.badInput("cannot write \(path): \(String(cString: strerror(errno)))") }
        }
    }
}

/// One capture point as a pcapng interface.
public struct PcapngInterface: Hashable, Sendable {
    /// A LINKTYPE_ value (1 EN10MB, 101 RAW, 113 LINUX_SLL, 239 NFLOG, 276 LINUX_SLL2, ...).
    public var linkType: UInt16
    /// if_name: "lo", "eth0", "nf:OUTPUT".
    public var name: String
    /// if_description, for people.
    public var description: String?
    /// 0 is "no limit" in the spec, but libpcap requires every interface of a file to have the same
    /// snaplen, so all interfaces get the same one.
    public var snaplen: UInt32
    public init(linkType: UInt16, name: String, description: String? = nil, snaplen: UInt32 = 262_144) {
        self.linkType = linkType; self.name = name; self.description = description; self.snaplen = snaplen
    }
}

public final class PcapngWriter {
    enum BlockType {
        static let sectionHeader: UInt32 = 0x0A0D_0D0A
        static let interfaceDescription: UInt32 = 0x0000_0001
        static let enhancedPacket: UInt32 = 0x0000_0006
    }
    enum Option {
        static let endOfOptions: UInt16 = 0
        static let comment: UInt16 = 1
        static let shbUserApplication: UInt16 = 4
        static let ifName: UInt16 = 2
        static let ifDescription: UInt16 = 3
        static let ifTimestampResolution: UInt16 = 9
    }
    static let byteOrderMagic: UInt32 = 0x1A2B_3C4D

    private let out: BufferedFileOutput
    public private(set) var interfaces: [PcapngInterface] = []
    public private(set) var packetsWritten = 0

    /// Creates (or truncates) the file and writes the section header.
    public init(path: String, application: String = "meshtrace") throws {
        out = try BufferedFileOutput(path: path)
        let options = PcapngWriter.options([(Option.shbUserApplication, Array(application.utf8))])
        // SHB body: magic, version 1.0, section length -1 (unknown: the file is written in one pass).
        let bodyLength = 4 + 2 + 2 + 8 + options.count
        try out.append(le: BlockType.sectionHeader)
        try out.append(le: UInt32(12 + bodyLength))
        try out.append(le: PcapngWriter.byteOrderMagic)
        try out.append(le: UInt16(1))
        try out.append(le: UInt16(0))
        try out.append(le: UInt64.max)
        try out.append(options)
        try out.append(le: UInt32(12 + bodyLength))
    }

    /// Adds an interface; its index is what `writePacket(interface:...)` takes. Interfaces must all be
    /// added before the packets that use them.
    @discardableResult
    public func addInterface(_ interface: PcapngInterface) throws -> UInt32 {
        var opts: [(UInt16, [UInt8])] = [(Option.ifName, Array(interface.name.utf8))]
        if let d = interface.description { opts.append((Option.ifDescription, Array(d.utf8))) }
        opts.append((Option.ifTimestampResolution, [9]))  // 10^-9 s
        let options = PcapngWriter.options(opts)
        let total = UInt32(12 + 8 + options.count)
        try out.append(le: BlockType.interfaceDescription)
        try out.append(le: total)
        try out.append(le: interface.linkType)
        try out.append(le: UInt16(0))
        try out.append(le: interface.snaplen)
        try out.append(options)
        try out.append(le: total)
        interfaces.append(interface)
        return UInt32(interfaces.count - 1)
    }

    /// One Enhanced Packet Block. `comments` become one opt_comment each (UTF-8, as the spec requires).
    public func writePacket(interface: UInt32, time: Timestamp, data: UnsafeRawBufferPointer, originalLength: UInt32,
                            comments: [String] = []) throws {
        precondition(Int(interface) < interfaces.count, "pcapng interface \(interface) was never added")
        let captured = min(data.count, Int(interfaces[Int(interface)].snaplen))
        let padded = (captured + 3) & ~3
        // An option value is at most 65535 bytes; a longer comment is cut (never in practice).
        let commentBytes = comments.filter { !$0.isEmpty }.map { Array($0.utf8.prefix(65_532)) }
        var optionBytes = 0
        for c in commentBytes { optionBytes += 4 + ((c.count + 3) & ~3) }
        if optionBytes > 0 { optionBytes += 4 }
        let total = UInt32(12 + 20 + padded + optionBytes)
        let ns = UInt64(bitPattern: max(0, time.totalNanoseconds))
        try out.append(le: BlockType.enhancedPacket)
        try out.append(le: total)
        try out.append(le: interface)
        try out.append(le: UInt32(truncatingIfNeeded: ns >> 32))
        try out.append(le: UInt32(truncatingIfNeeded: ns))
        try out.append(le: UInt32(captured))
        try out.append(le: max(originalLength, UInt32(captured)))
        try out.append(UnsafeRawBufferPointer(rebasing: data[0..<captured]))
        try out.append(zeros: padded - captured)
        if optionBytes > 0 {
            for bytes in commentBytes {
                try out.append(le: Option.comment)
                try out.append(le: UInt16(bytes.count))
                try out.append(bytes)
                try out.append(zeros: ((bytes.count + 3) & ~3) - bytes.count)
            }
            try out.append(le: Option.endOfOptions)
            try out.append(le: UInt16(0))
        }
        try out.append(le: total)
        packetsWritten += 1
    }

    public func close() throws { try out.close() }

    /// Options encoded (code, length, value padded to 4 bytes), ended by opt_endofopt.
    static func options(_ list: [(UInt16, [UInt8])]) -> [UInt8] {
        var b: [UInt8] = []
        func le16(_ v: UInt16) { b.append(UInt8(v & 0xff)); b.append(UInt8(v >> 8)) }
        for (code, value) in list {
            let v = value.prefix(65_532)
            le16(code); le16(UInt16(v.count))
            b.append(contentsOf: v)
            b.append(contentsOf: [UInt8](repeating: 0, count: ((v.count + 3) & ~3) - v.count))
        }
        le16(Option.endOfOptions); le16(0)
        return b
    }
}
