import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The pod's packets as libpcap sees them, live: one capture on the `any` device of the pod's netns, which
/// covers lo and every other interface at once, with each packet's direction (LINUX_SLL packet type) and
/// loopback flag. One capture instead of one per interface means one fd, one time order, and one `-w` file
/// that `meshtrace analyze` reads back as is. Must be opened on the thread that entered the netns.
public final class PcapLiveSource {
    public let capture: PcapHandle
    public let index: UInt16
    public let linkType: Int32
    private var decoder: PacketDecoder
    private let writer: PcapDumpWriter?
    /// The pod's one non-loopback interface when it has exactly one (eth0): cooked v1 headers carry no
    /// interface index, so packets that are not loopback are named after it; otherwise they stay "any".
    public let podInterface: String?
    /// Interned once: naming a packet by string took the name table's lock and a lookup per packet.
    private let podInterfaceName: InterfaceName?
    private let anyPoint = CapturePoint.interface("any")
    public private(set) var framesRead: UInt64 = 0
    /// The capture time of the last frame read (`Int64.min` before the first): how far this source has been read.
    public private(set) var lastFrameNanos = Int64.min
    /// True when the kernel drops loopback's leaving copies before they are copied into the ring.
    public let dropsLoopbackCopiesInKernel: Bool

    /// No capture filter: `--filter` selects connections, on the records (`ConnectionFilter`), and a matching
    /// connection's lo leg after a REDIRECT would not pass it.
    public init(index: UInt16, tags: RuleTagTable, snaplen: Int32, writePath: String?) throws {
        self.index = index
        // Not immediate: TPACKET_V3 hands packets over a ring block at a time (when the block fills, or 10 ms
        // after its first packet), one wakeup per block instead of one per packet. The tracer holds records
        // 30 ms anyway, and after the rules are out it reads on for longer than the block timeout, so nothing
        // waits in a half-filled block at the end (tcpdump loses those on SIGINT; see PacketCaptureTracing).
        // 64 MiB: libpcap's V3 blocks are 256 KiB and one retired after 10 ms holds only that long's packets,
        // so the ring needs more bytes than a frame-per-packet (V2) ring for the same lag.
        capture = try PcapHandle.openLive(device: "any", snaplen: snaplen, bufferSize: 64 << 20, immediate: false,
                                          timeoutMilliseconds: 10)
        dropsLoopbackCopiesInKernel = capture.dropLoopbackLeavingCopies(snaplen: snaplen)
        try capture.setNonblocking(true)
        linkType = capture.linkType
        decoder = PacketDecoder(tags: tags)
        let live = capture
        writer = try writePath.map { try PcapDumpWriter(path: $0, like: live) }
        let others = PcapLiveSource.interfaceNames().filter { $0 != "lo" }
        podInterface = others.count == 1 ? others[0] : nil
        podInterfaceName = podInterface.map { InterfaceName($0) }
    }

    public var fd: Int32? { capture.selectableFileDescriptor }
    /// `--filter`: the decoder marks each record selected or not (`PacketDecoder.selector`).
    public var selector: ConnectionFilter? {
        get { decoder.selector }
        set { decoder.selector = newValue }
    }

    /// Decodes up to `limit` waiting packets, each in place into the slot `slot` gives, and hands it to `body`
    /// with its frame bytes (valid during the call).
    @discardableResult
    public func drain(limit: Int, slot: () -> UnsafeMutablePointer<PacketRecord>,
                      _ body: (UnsafeMutablePointer<PacketRecord>, UnsafeRawBufferPointer) -> Void) -> Int {
        var n = 0
        while n < limit {
            guard case .packet(let p) = capture.next() else { break }
            framesRead += 1
            n += 1
            writer?.write(time: p.time, bytes: p.bytes, wireLength: p.wireLength)
            let record = slot()
            record.pointee.ref = FrameRef(source: index, frame: framesRead)
            record.pointee.time = p.time
            lastFrameNanos = p.time.totalNanoseconds
            record.pointee.point = anyPoint
            decoder.decode(linkType: linkType, bytes: p.bytes, wireLength: p.wireLength, into: &record.pointee)
            if let podInterfaceName, !record.pointee.point.isLoopback, record.pointee.point.interfaceName == .any {
                record.pointee.point.interfaceName = podInterfaceName
            }
            body(record, p.bytes)
        }
        return n
    }

    /// Packets the kernel dropped because the capture buffer was full.
    public var dropped: UInt32 { (try? capture.statistics().dropped) ?? 0 }

    public func close() {
        try? writer?.flush()
        writer?.close()
        capture.close()
    }

    /// Flushes and closes the `-w` file; throws when it could not all be written (a full disk, /dev/full), which
    /// `close()` would swallow.
    public func finishWriting() throws {
        try writer?.finish()
    }

    /// Interface names of the calling thread's netns.
    public static func interfaceNames() -> [String] {
        guard let list = if_nameindex() else { return [] }
        defer { if_freenameindex(list) }
        var out: [String] = []
        var p = list
        while p.pointee.if_index != 0, let name = p.pointee.if_name {
            out.append(String(cString: name))
            p += 1
        }
        return out
    }
}
