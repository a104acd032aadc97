// Reading one capture file: opening it with clear errors for what is not a capture, then handing out
// decoded records one at a time into the caller's record, with the raw frame for writers that copy it.

import Foundation

/// Anything that yields decoded packets: one file, several merged, a live capture.
public protocol PacketSource: AnyObject {
    /// Decodes the next packet into `record` and returns its raw frame bytes, valid until the next call;
    /// nil when the source has ended (cleanly, or on damage: see `damage`).
    func next(into record: inout PacketRecord) -> UnsafeRawBufferPointer?
    /// Link type (DLT) of the frame `next` returned last.
    var currentLinkType: Int32 { get }
    /// Set when the source ended early on a damaged input; everything before the damage was delivered.
    /// Report it (exit `.damagedInput`) after the analysis has finished with what was read.
    var damage: MeshtraceError? { get }
}

public final class PcapFileSource: PacketSource {
    public let path: String
    /// This file's number in `FrameRef.source`.
    public let index: UInt16
    public let linkType: Int32
    public let snapshotLength: Int32
    /// The capture point every packet of the file gets (an NFLOG file's records name their hook instead).
    public let point: CapturePoint
    public private(set) var decoder: PacketDecoder
    public private(set) var framesRead: UInt64 = 0
    public private(set) var damage: MeshtraceError? = nil
    public var currentLinkType: Int32 { linkType }
    private let capture: PcapHandle
    private var ended = false

    /// Opens `path`. `interfaceName` names the capture point when the caller knows it (pcapng interface names
    /// are not exposed by libpcap); otherwise: "any" for cooked captures ("lo" per packet when the cooked
    /// header says loopback), the hook for NFLOG, and the file's stem for the rest (`lo.pcap` → lo).
    public init(path: String, index: UInt16 = 0, tags: RuleTagTable, interfaceName: String? = nil) throws {
        self.path = path
        self.index = index
        try PcapFileSource.checkReadable(path)
        do {
            capture = try PcapHandle.openOffline(path: path)
        } catch let e as MeshtraceError {
            throw PcapFileSource.explainOpenFailure(path: path, libpcapMessage: e.message)
        }
        linkType = capture.linkType
        snapshotLength = capture.snapshotLength
        guard LinkType.isSupported(linkType) else {
            let names = ["EN10MB", "LINUX_SLL", "LINUX_SLL2", "RAW", "IPV4", "IPV6", "NULL", "LOOP", "NFLOG"]
            throw MeshtraceError.badInput("\(path): link type \(linkType) (\(PcapFileSource.linkTypeName(linkType))) is not supported; meshtrace reads \(names.joined(separator: ", "))")
        }
        decoder = PacketDecoder(tags: tags)
        decoder.nestedByteOrder = capture.isSwapped ? ByteOrder.host.swapped : .host
        if let interfaceName {
            point = .interface(interfaceName)
        } else {
            switch linkType {
            case LinkType.linuxSLL, LinkType.linuxSLL2: point = .interface("any")
            case LinkType.nflog: point = .netfilter(.unknown)
            default:
                let stem = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
                point = .interface(stem.isEmpty ? "?" : stem)
            }
        }
    }

    public func next(into record: inout PacketRecord) -> UnsafeRawBufferPointer? {
        guard !ended else { return nil }
        switch capture.next() {
        case .packet(let p):
            framesRead += 1
            record.ref = FrameRef(source: index, frame: framesRead)
            record.time = p.time
            record.point = point
            decoder.decode(linkType: linkType, bytes: p.bytes, wireLength: p.wireLength, into: &record)
            return p.bytes
        case .end, .timeout:
            ended = true
            return nil
        case .error(let message):
            ended = true
            damage = .damaged("\(path): damaged after frame \(framesRead) (\(message)); the \(framesRead) frames before it were analysed")
            return nil
        }
    }

    public func close() {
        ended = true
        capture.close()
    }

    private static func checkReadable(_ path: String) throws {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw MeshtraceError.badInput("\(path): \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw MeshtraceError.badInput("\(path): not a regular file")
        }
        guard st.st_size > 0 else {
            throw MeshtraceError.badInput("\(path): empty file, not a capture")
        }
    }

    private static func explainOpenFailure(path: String, libpcapMessage: String) -> MeshtraceError {
        // libpcap's words are precise but terse; lead with what the user needs to know.
        let detail = libpcapMessage.hasPrefix(path + ": ") ? String(libpcapMessage.dropFirst(path.count + 2)) : libpcapMessage
        if detail.contains("unknown file format") {
            return .badInput("\(path): not a pcap or pcapng capture (unknown magic number)")
        }
        if detail.contains("truncated") {
            return .badInput("\(path): the capture's file header is truncated (\(detail))")
        }
        return .badInput("\(path): cannot read as a capture (\(detail))")
    }

    static func linkTypeName(_ linkType: Int32) -> String {
        LinkType.isSupported(linkType) ? LinkType.name(linkType) : PcapHandle.linkTypeName(linkType)
    }
}
