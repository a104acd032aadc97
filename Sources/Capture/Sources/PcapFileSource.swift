// Reading one capture file: opening it with clear errors for what is not a capture, then handing out
// decoded records one at a time into the caller's record, with the raw frame for writers that copy it.
// Classic pcap (µs and ns) is opened by libpcap and its records are read in blocks by `PcapRecordReader`
// (libpcap reads whatever that reader does not take: other versions, damage); pcapng through
// `PcapngFileReader`, which keeps each packet's interface (link type and name) that libpcap 1.10 hides or refuses.

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
    /// The file's link type (pcapng: its first interface's, or the first one meshtrace decodes among those described
    /// before the first packet; interfaces may differ, see `currentLinkType`).
    public let linkType: Int32
    public let snapshotLength: Int32
    /// The capture point of the file's (first) interface; an NFLOG file's records name their hook instead.
    public let point: CapturePoint
    public private(set) var decoder: PacketDecoder
    public private(set) var framesRead: UInt64 = 0
    public private(set) var damage: MeshtraceError? = nil
    public private(set) var currentLinkType: Int32
    /// pcapng interface names (if_name) in interface order, as far as read; empty for classic pcap.
    public var interfaceNames: [String?] { pcapng?.interfaces.map(\.name) ?? [] }

    private let capture: PcapHandle?
    /// Classic pcap records read in blocks while `inBlocks`, until the first record it leaves to libpcap
    /// (`capture`). A `let` and a flag rather than an optional `var`: reading a `var` class reference costs a
    /// retain and a release per packet.
    private let records: PcapRecordReader?
    /// `records`, for the per-packet call without a retain and a release around it (`records` keeps it alive).
    private let recordsRef: Unmanaged<PcapRecordReader>?
    private var inBlocks: Bool
    /// True while classic pcap records are read by `PcapRecordReader` rather than libpcap (tests check which
    /// path a file took).
    var readsRecordsInBlocks: Bool { inBlocks }
    private let pcapng: PcapngFileReader?
    private let interfaceName: String?
    /// Capture point per pcapng interface, made once per interface block.
    private var points: [CapturePoint] = []
    /// The pcapng section `points` were made for.
    private var pointsSection = 0
    private var ended = false
    /// The frame `advance()` read and `decodePending(into:)` has not decoded yet: its bytes stay valid until the
    /// next `advance()`.
    private var pendingBytes = UnsafeRawBufferPointer(start: nil, count: 0)
    private var pendingTime = Timestamp.zero
    private var pendingWireLength: UInt32 = 0
    private var pendingInterface = 0

    /// Opens `path`. `interfaceName` names the capture point when the caller knows it; otherwise a pcapng
    /// interface's if_name, else "any" for cooked captures ("lo" per packet when the cooked header says
    /// loopback), the hook for NFLOG, and the file's stem for the rest (`lo.pcap` → lo). `selector` (`--filter`)
    /// marks each record selected or not as it is decoded.
    public init(path: String, index: UInt16 = 0, tags: RuleTagTable, interfaceName: String? = nil,
                selector: ConnectionFilter? = nil) throws {
        self.path = path
        self.index = index
        self.interfaceName = interfaceName
        let stream = CaptureStream.isStream(path)
        // `-` with a file on stdin (`< capture.pcap`) is read as that file, through /dev/stdin.
        let file = path == CaptureStream.stdinName && !stream ? "/dev/stdin" : path
        if !stream { try PcapFileSource.checkReadable(file) }
        decoder = PacketDecoder(tags: tags)
        decoder.selector = selector
        var classic: PcapHandle? = nil
        switch try PcapFileSource.open(path: file, name: CaptureStream.displayName(path), index: index, stream: stream) {
        case .pcapng(let reader):
            pcapng = reader
            capture = nil
            linkType = reader.leadInterface?.linkType ?? -1
            snapshotLength = Int32(clamping: reader.leadInterface?.snaplen ?? 0)
        case .classic(let handle):
            capture = handle
            // A file's records are read in blocks (below); a stream's by libpcap alone.
            classic = stream ? nil : handle
            pcapng = nil
            linkType = handle.linkType
            snapshotLength = handle.snapshotLength
            decoder.nestedByteOrder = handle.isSwapped ? ByteOrder.host.swapped : .host
        }
        currentLinkType = linkType
        guard LinkType.isSupported(linkType) else {
            let names = ["EN10MB", "LINUX_SLL", "LINUX_SLL2", "RAW", "IPV4", "IPV6", "NULL", "LOOP", "NFLOG"]
            throw MeshtraceError.badInput("\(path): link type \(linkType) (\(PcapFileSource.linkTypeName(linkType))) is not supported; meshtrace reads \(names.joined(separator: ", "))")
        }
        point = PcapFileSource.point(linkType: linkType, given: interfaceName, recorded: pcapng?.leadInterface?.name,
                                     path: CaptureStream.displayName(path))
        let type = linkType
        // Not a stream's: the block reader opens the file again to read it in blocks.
        records = classic.flatMap { PcapRecordReader.open(path: file, snapshot: $0.snapshotLength, linkType: type) }
        inBlocks = records != nil
        recordsRef = records.map { Unmanaged.passUnretained($0) }
    }

    public func next(into record: inout PacketRecord) -> UnsafeRawBufferPointer? {
        guard advance() != nil else { return nil }
        return decodePending(into: &record)
    }

    /// Reads the next frame without decoding it and returns its capture time (nil at the end, or on damage).
    /// `MergedSource` orders files by this time and decodes only the frame it hands out, straight into the
    /// caller's record: no decoded record is parked and copied per packet.
    func advance() -> Timestamp? {
        guard !ended else { return nil }
        if let pcapng {
            switch pcapng.next() {
            case .packet(let time, let wireLength, let bytes, let interface):
                if pointsSection != pcapng.sectionsRead {
                    // A new section numbers its interfaces from 0 again, with their own names and link types.
                    points.removeAll(keepingCapacity: true)
                    pointsSection = pcapng.sectionsRead
                }
                while points.count < pcapng.interfaces.count {
                    let i = pcapng.interfaces[points.count]
                    points.append(PcapFileSource.point(linkType: i.linkType, given: interfaceName, recorded: i.name, path: path))
                }
                framesRead += 1
                currentLinkType = pcapng.interfaces[interface].linkType
                pending(time: time, wireLength: wireLength, bytes: bytes, interface: interface)
                return time
            case .end, .interfaceAdded:
                ended = true
                return nil
            case .damaged(let why):
                endDamaged(why)
                return nil
            }
        }
        if inBlocks {
            switch recordsRef.unsafelyUnwrapped._withUnsafeGuaranteedRef({ $0.next() }) {
            case .packet(let time, let wireLength, let bytes):
                framesRead += 1
                pending(time: time, wireLength: wireLength, bytes: bytes, interface: 0)
                return time
            case .end:
                ended = true
                return nil
            case .irregular(let offset):
                // libpcap reads on from this record: it decides what the damage is and words it.
                inBlocks = false
                guard capture!.seek(toFileOffset: offset) else {
                    endDamaged("cannot seek to offset \(offset)")
                    return nil
                }
            }
        }
        switch capture!.next() {
        case .packet(let p):
            framesRead += 1
            // libpcap 1.10 sign-extends the record's 32-bit fields: the same unsigned reading as the block reader's.
            let time = Timestamp(pcapSeconds: p.fileSeconds, fractionNanoseconds: p.fileFractionNanoseconds)
            pending(time: time, wireLength: p.wireLength, bytes: p.bytes, interface: 0)
            return time
        case .end, .timeout:
            ended = true
            return nil
        case .error(let message):
            endDamaged(message)
            return nil
        }
    }

    @inline(__always)
    private func pending(time: Timestamp, wireLength: UInt32, bytes: UnsafeRawBufferPointer, interface: Int) {
        pendingTime = time
        pendingWireLength = wireLength
        pendingBytes = bytes
        pendingInterface = interface
    }

    /// Decodes the frame the last `advance()` read into `record` and returns its bytes.
    func decodePending(into record: inout PacketRecord) -> UnsafeRawBufferPointer {
        record.ref = FrameRef(source: index, frame: framesRead)
        record.time = pendingTime
        if let pcapng {
            record.point = points[pendingInterface]
            // Without libpcap nothing swapped the NFLOG TLV headers: they are in the section's byte order.
            decoder.nflogByteOrder = pcapng.order
            decoder.nestedByteOrder = pcapng.order
            decoder.decode(linkType: currentLinkType, bytes: pendingBytes, wireLength: pendingWireLength, into: &record)
        } else {
            record.point = point
            decoder.decode(linkType: linkType, bytes: pendingBytes, wireLength: pendingWireLength, into: &record)
        }
        return pendingBytes
    }

    private func endDamaged(_ why: String) {
        ended = true
        damage = .damaged("\(CaptureStream.displayName(path)): damaged after frame \(framesRead) (\(why)); the \(framesRead) frames before it were analysed")
    }

    public func close() {
        ended = true
        capture?.close()
    }

    private static func point(linkType: Int32, given: String?, recorded: String?, path: String) -> CapturePoint {
        if let given { return .interface(given) }
        if linkType == LinkType.nflog { return .netfilter(.unknown) }
        if let recorded, !recorded.isEmpty { return .interface(recorded) }
        switch linkType {
        case LinkType.linuxSLL, LinkType.linuxSLL2: return .interface("any")
        default:
            let stem = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
            return .interface(stem.isEmpty ? "?" : stem)
        }
    }

    private enum Opened {
        case pcapng(PcapngFileReader)
        case classic(PcapHandle)
    }

    /// Opens the file by its magic number. A pipe (`stream`) is sniffed without taking its first bytes and read
    /// once from its start (`CaptureStream`).
    private static func open(path: String, name: String, index: UInt16, stream: Bool) throws -> Opened {
        var file: UnsafeMutablePointer<FILE>? = nil
        var magic: UInt32 = 0
        if stream {
            let opened = try CaptureStream.open(path)
            guard let f = fdopen(opened.fd, "rb") else {
                let e = errno
                Glibc.close(opened.fd)
                throw MeshtraceError.badInput("\(name): \(String(cString: strerror(e)))")
            }
            file = f
            magic = opened.magic
        }
        if file != nil ? magic == PcapngFileReader.sectionHeaderType : PcapngFileReader.isPcapng(path: path) {
            do {
                return .pcapng(try file.map { try PcapngFileReader(file: $0, path: name) } ?? PcapngFileReader(path: path))
            } catch PcapngFileReader.OpenError.system(let code) where code == EMFILE || code == ENFILE {
                throw PcapFileSource.tooManyOpenFiles(path: path, index: index)
            } catch PcapngFileReader.OpenError.system(let code) {
                throw MeshtraceError.badInput("\(name): \(String(cString: strerror(code)))")
            }
        }
        do {
            let micro: UInt32 = 0xa1b2_c3d4
            return .classic(try file.map { try PcapHandle.openOffline(file: $0, name: name, microseconds: magic == micro || magic == micro.byteSwapped) }
                            ?? PcapHandle.openOffline(path: path))
        } catch let e as MeshtraceError {
            throw PcapFileSource.explainOpenFailure(path: name, index: index, libpcapMessage: e.message)
        }
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

    private static func explainOpenFailure(path: String, index: UInt16, libpcapMessage: String) -> MeshtraceError {
        // libpcap's words are precise but terse; lead with what the user needs to know.
        let detail = libpcapMessage.hasPrefix(path + ": ") ? String(libpcapMessage.dropFirst(path.count + 2)) : libpcapMessage
        if detail.contains(String(cString: strerror(EMFILE))) || detail.contains(String(cString: strerror(ENFILE))) {
            return tooManyOpenFiles(path: path, index: index)
        }
        if detail.contains("unknown file format") {
            return .badInput("\(path): not a pcap or pcapng capture (unknown magic number)")
        }
        if detail.contains("truncated") {
            return .badInput("\(path): the capture's file header is truncated (\(detail))")
        }
        return .badInput("\(path): cannot read as a capture (\(detail))")
    }

    /// Every file of a run stays open until the end (they are merged in time order), two descriptors per classic pcap:
    /// a run of many rotated captures (`tcpdump -G`, `-C`) can pass the process's limit. Not a bad capture.
    static func tooManyOpenFiles(path: String, index: UInt16) -> MeshtraceError {
        .badInput("\(path): cannot open: too many open files (capture \(Int(index) + 1) of this run; every capture stays open until the end: raise the limit with ulimit -n, or join the captures first with mergecap)")
    }

    static func linkTypeName(_ linkType: Int32) -> String {
        LinkType.isSupported(linkType) ? LinkType.name(linkType) : PcapHandle.linkTypeName(linkType)
    }
}
