// pcapng files, block by block. libpcap 1.10 reads pcapng but refuses a file whose interfaces have
// different link types ("an interface has a type 113 different from the type of the first interface")
// and does not expose interface names or which interface a packet came from. meshtrace's own annotated
// pcapng has one interface per capture point (NFLOG hooks next to cooked captures), and tshark/dumpcap write
// one per `-i`, so these files are read here: every packet gets its interface's link type and name.
//
// Only plain file reading: no C library. Blocks are read into one reusable buffer that grows to the largest
// block seen, so reading does not allocate per packet.

import Foundation
#if canImport(Glibc)
import Glibc
#endif

final class PcapngFileReader {
    struct Interface {
        var linkType: Int32
        var name: String?
        /// Timestamp units per second (if_tsresol; default microseconds).
        var unitsPerSecond: UInt64 = 1_000_000
        /// if_tsoffset: seconds added to every timestamp.
        var offsetSeconds: Int64 = 0
        var snaplen: UInt32
    }

    enum ReadResult {
        case packet(time: Timestamp, wireLength: UInt32, bytes: UnsafeRawBufferPointer, interface: Int)
        case end
        case damaged(String)
        /// An interface description block was read (only `readBlock` returns this).
        case interfaceAdded
    }

    static let sectionHeaderType: UInt32 = 0x0A0D_0D0A
    private static let byteOrderMagic: UInt32 = 0x1A2B_3C4D
    /// Larger blocks are treated as damage rather than allocated (a bogus length must not exhaust memory).
    private static let maxBlockLength = 64 << 20

    private let file: UnsafeMutablePointer<FILE>
    /// The current section's byte order (the writer's): NFLOG TLV headers inside are in it.
    private(set) var order: ByteOrder = .host
    private(set) var interfaces: [Interface] = []
    /// Interfaces one section may describe: a node has a few dozen; Wireshark's own writers a few per capture.
    static let maxInterfaces = 65_536
    /// How many section header blocks were read: a new section restarts interface numbering at 0, so what a
    /// caller keeps per interface index is stale when this changes (`cat a.pcapng b.pcapng` is one valid file).
    private(set) var sectionsRead = 0
    private var buffer: UnsafeMutableRawBufferPointer
    private var blocksRead = 0
    /// The interface that speaks for the file (`PcapFileSource.linkType`, its point and the unsupported-link-type
    /// error): the first one meshtrace decodes among those described before the first packet, else the first.
    private(set) var leadInterface: Interface? = nil
    /// What ended the look-ahead over the interfaces before the first packet (that packet, the end, damage):
    /// `next()` returns it first. A packet's bytes are still in `buffer`.
    private var lookahead: ReadResult? = nil

    /// True when the file starts with the pcapng section header block type.
    static func isPcapng(path: String) -> Bool {
        guard let f = fopen(path, "rb") else { return false }
        defer { fclose(f) }
        var magic: UInt32 = 0
        guard fread(&magic, 4, 1, f) == 1 else { return false }
        return magic == sectionHeaderType  // the same bytes in either byte order
    }

    /// The file could not be opened (errno): `PcapFileSource` words it.
    enum OpenError: Error { case system(Int32) }

    /// Opens the file and reads up to the first interface description, so the first link type is known.
    convenience init(path: String) throws {
        guard let f = fopen(path, "rb") else { throw OpenError.system(errno) }
        try self.init(file: f, path: path)
    }

    /// Reads `file` from where it stands (a stream: `CaptureStream`), and closes it at the end.
    init(file f: UnsafeMutablePointer<FILE>, path: String) throws {
        file = f
        buffer = .allocate(byteCount: 64 << 10, alignment: 8)
        // Fully initialised here: if this throws, deinit closes the file and frees the buffer.
        try readUntilFirstInterface(path: path)
    }

    deinit {
        fclose(file)
        buffer.deallocate()
    }

    private func readUntilFirstInterface(path: String) throws {
        while true {
            switch readBlock() {
            case .interfaceAdded:
                // dumpcap and mergecap describe every interface up front: read them all, so a file whose first
                // interface is one meshtrace does not decode (802.11, USB) is still read for its others.
                leadInterface = interfaces[0]
                while true {
                    let r = readBlock()
                    guard case .interfaceAdded = r else {
                        lookahead = r
                        break
                    }
                    if let lead = leadInterface, !LinkType.isSupported(lead.linkType), let last = interfaces.last,
                       LinkType.isSupported(last.linkType) {
                        leadInterface = last
                    }
                }
                return
            case .packet:
                // Cannot happen: packet blocks before any interface are reported as damage.
                throw MeshtraceError.badInput("\(path): packet before any interface description block")
            case .end:
                if blocksRead == 0 { throw MeshtraceError.badInput("\(path): the capture's file header is truncated") }
                throw MeshtraceError.badInput("\(path): pcapng file without an interface description block")
            case .damaged(let why):
                throw blocksRead <= 1 ? MeshtraceError.badInput("\(path): the capture's file header is truncated or bad (\(why))")
                                      : MeshtraceError.badInput("\(path): pcapng damaged before its first interface description, nothing to analyse (\(why))")
            }
        }
    }

    /// The next packet, the end, or damage (interface blocks are taken in on the way).
    func next() -> ReadResult {
        if let r = lookahead {
            lookahead = nil
            return r
        }
        while true {
            let r = readBlock()
            if case .interfaceAdded = r { continue }
            return r
        }
    }

    @inline(__always)
    private func u32(_ offset: Int) -> UInt32 {
        let v = buffer.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
        return order == .host ? v : v.byteSwapped
    }

    @inline(__always)
    private func u16(_ offset: Int) -> UInt16 {
        let v = buffer.loadUnaligned(fromByteOffset: offset, as: UInt16.self)
        return order == .host ? v : v.byteSwapped
    }

    /// Reads blocks until a packet, the end, or damage.
    private func readBlock() -> ReadResult {
        while true {
            // Block type and total length.
            let got = fread(buffer.baseAddress, 1, 8, file)
            if got == 0 { return .end }
            guard got == 8 else { return .damaged("truncated block header") }
            let rawType = buffer.loadUnaligned(fromByteOffset: 0, as: UInt32.self)
            let isSection = rawType == PcapngFileReader.sectionHeaderType
            if isSection {
                // The section's byte order is in its byte-order magic, right after the length.
                guard fread(buffer.baseAddress! + 8, 1, 4, file) == 4 else { return .damaged("truncated section header") }
                let magic = buffer.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
                if magic == PcapngFileReader.byteOrderMagic { order = .host }
                else if magic.byteSwapped == PcapngFileReader.byteOrderMagic { order = ByteOrder.host.swapped }
                else { return .damaged("bad byte-order magic in section header") }
                interfaces.removeAll(keepingCapacity: true)
                sectionsRead += 1
            }
            let type = u32(0)
            let length = Int(u32(4))
            guard length >= 12, length % 4 == 0, length <= PcapngFileReader.maxBlockLength else {
                return .damaged("bad block length \(length) in block \(blocksRead + 1)")
            }
            if length > buffer.count {
                let bigger = UnsafeMutableRawBufferPointer.allocate(byteCount: max(length, buffer.count * 2), alignment: 8)
                bigger.copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[0..<12]))
                buffer.deallocate()
                buffer = bigger
            }
            let already = isSection ? 12 : 8
            guard fread(buffer.baseAddress! + already, 1, length - already, file) == length - already else {
                return .damaged("truncated block \(blocksRead + 1) (type \(type), \(length) bytes)")
            }
            blocksRead += 1
            guard Int(u32(length - 4)) == length else {
                return .damaged("block \(blocksRead) trailing length does not match its length \(length)")
            }
            let body = 8..<(length - 4)
            switch type {
            case PcapngFileReader.sectionHeaderType:
                // Version 1.0, or 1.2 (written by some old libpcap), as libpcap accepts: another version's blocks
                // need not mean what they mean in 1.0.
                guard length >= 28 else { return .damaged("short section header block") }
                let major = u16(12), minor = u16(14)
                guard major == 1 && (minor == 0 || minor == 2) else {
                    return .damaged("unsupported pcapng version \(major).\(minor) in section \(sectionsRead)")
                }
                continue
            case 1:
                // A section describes its interfaces before their packets, and each costs memory for the rest of it:
                // a hostile file of nothing but descriptions (1 M in 40 MB took 186 MB) stops here.
                guard interfaces.count < PcapngFileReader.maxInterfaces else {
                    return .damaged("more than \(PcapngFileReader.maxInterfaces) interfaces described in one section")
                }
                guard let interface = parseInterface(body) else { return .damaged("bad interface description block") }
                interfaces.append(interface)
                return .interfaceAdded
            case 6:
                // Enhanced packet: interface id, timestamp high/low, captured length, original length, data.
                guard body.count >= 20 else { return .damaged("short enhanced packet block") }
                let id = Int(u32(8))
                let captured = Int(u32(20))
                guard id < interfaces.count else { return .damaged("packet names interface \(id), which was not described") }
                guard captured <= body.count - 20 else { return .damaged("enhanced packet block shorter than its captured length") }
                let units = UInt64(u32(12)) << 32 | UInt64(u32(16))
                return .packet(time: time(units, interfaces[id]), wireLength: u32(24),
                               bytes: UnsafeRawBufferPointer(rebasing: buffer[28..<(28 + captured)]), interface: id)
            case 3:
                // Simple packet: original length, data up to the block's end (interface 0, no timestamp).
                guard body.count >= 4, !interfaces.isEmpty else { return .damaged("bad simple packet block") }
                let wire = u32(8)
                let captured = min(Int(wire), body.count - 4, Int(interfaces[0].snaplen == 0 ? UInt32.max : interfaces[0].snaplen))
                return .packet(time: .zero, wireLength: wire,
                               bytes: UnsafeRawBufferPointer(rebasing: buffer[12..<(12 + captured)]), interface: 0)
            case 2:
                // Obsolete packet block: u16 interface id, u16 drops, timestamp, captured, original length, data.
                guard body.count >= 20 else { return .damaged("short packet block") }
                let id = Int(u16(8))
                let captured = Int(u32(20))
                guard id < interfaces.count, captured <= body.count - 20 else { return .damaged("bad packet block") }
                let units = UInt64(u32(12)) << 32 | UInt64(u32(16))
                return .packet(time: time(units, interfaces[id]), wireLength: u32(24),
                               bytes: UnsafeRawBufferPointer(rebasing: buffer[28..<(28 + captured)]), interface: id)
            default:
                continue // name resolution, interface statistics, custom, decryption secrets: not needed
            }
        }
    }

    private func time(_ units: UInt64, _ interface: Interface) -> Timestamp {
        let perSecond = interface.unitsPerSecond
        let seconds = units / perSecond
        let rest = units % perSecond
        // rest * 1e9 / perSecond, exact for binary resolutions (2^-20 s) and without overflow for any.
        let nanos = perSecond.dividingFullWidth(rest.multipliedFullWidth(by: 1_000_000_000)).quotient
        return Timestamp(seconds: Int64(truncatingIfNeeded: seconds) &+ interface.offsetSeconds,
                         nanoseconds: Int32(truncatingIfNeeded: nanos))
    }

    private func parseInterface(_ body: Range<Int>) -> Interface? {
        guard body.count >= 8 else { return nil }
        var interface = Interface(linkType: Int32(u16(8)), name: nil, snaplen: u32(12))
        var at = 16
        while at + 4 <= body.upperBound {
            let code = u16(at), size = Int(u16(at + 2))
            guard at + 4 + size <= body.upperBound else { return nil }
            let value = UnsafeRawBufferPointer(rebasing: buffer[(at + 4)..<(at + 4 + size)])
            switch code {
            case 0: return interface
            case 2: // if_name
                let n = value.firstIndex(of: 0) ?? value.count
                interface.name = String(decoding: UnsafeRawBufferPointer(rebasing: value[0..<n]), as: UTF8.self)
            case 9 where size >= 1: // if_tsresol: 10^-v, or 2^-(v & 0x7f) when the top bit is set
                let v = value[0]
                let exponent = UInt64(v & 0x7f)
                if v & 0x80 == 0 {
                    guard exponent <= 18 else { return nil }
                    var p: UInt64 = 1
                    for _ in 0..<exponent { p *= 10 }
                    interface.unitsPerSecond = p
                } else {
                    guard exponent <= 63 else { return nil }
                    interface.unitsPerSecond = 1 << exponent
                }
                if interface.unitsPerSecond == 0 { return nil }
            case 14 where size == 8: // if_tsoffset
                let raw = value.loadUnaligned(as: UInt64.self)
                interface.offsetSeconds = Int64(bitPattern: order == .host ? raw : raw.byteSwapped)
            default: break
            }
            at += 4 + (size + 3) & ~3
        }
        return interface
    }
}
