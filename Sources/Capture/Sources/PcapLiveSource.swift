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
    /// True when the kernel drops loopback's leaving copies before they are copied into the ring.
    public let dropsLoopbackCopiesInKernel: Bool

    public init(index: UInt16, tags: RuleTagTable, snaplen: Int32, filter: String?, writePath: String?) throws {
        self.index = index
        // Not immediate: TPACKET_V3 hands packets over a ring block at a time (when the block fills, or 10 ms
        // after its first packet), one wakeup per block instead of one per packet. The tracer holds records
        // 30 ms anyway, and after the rules are out it reads on for longer than the block timeout, so nothing
        // waits in a half-filled block at the end (tcpdump loses those on SIGINT; see PacketCaptureTracing).
        // 64 MiB: libpcap's V3 blocks are 256 KiB and one retired after 10 ms holds only that long's packets,
        // so the ring needs more bytes than a frame-per-packet (V2) ring for the same lag.
        capture = try PcapHandle.openLive(device: "any", snaplen: snaplen, bufferSize: 64 << 20, immediate: false,
                                          timeoutMilliseconds: 10)
        if let filter, !filter.isEmpty {
            try capture.setFilter(filter)
            dropsLoopbackCopiesInKernel = false
        } else if let fd = capture.selectableFileDescriptor {
            dropsLoopbackCopiesInKernel = PcapLiveSource.dropLoopbackCopies(fd: fd, snaplen: snaplen)
        } else {
            dropsLoopbackCopiesInKernel = false
        }
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

    /// A packet on lo reaches a packet socket twice, leaving (PACKET_OUTGOING) and arriving. libpcap drops the
    /// leaving copy, but only after the kernel copied it into the ring: half of a pod's loopback traffic (the
    /// app's legs to ztunnel) copied for nothing. This socket filter drops it in the kernel: classic BPF on the
    /// packet type and interface index (SKF_AD_PKTTYPE, SKF_AD_IFINDEX), which `any` captures in LINUX_SLL cannot
    /// express in pcap filter syntax. Kept packets are cut at `snaplen`, as libpcap's own filters do. With a
    /// `--filter`, libpcap's filter takes the socket instead and the leaving copies go back to being dropped
    /// after the copy. Returns false (and changes nothing) when the kernel refuses the filter.
    static func dropLoopbackCopies(fd: Int32, snaplen: Int32) -> Bool {
        let lo = if_nametoindex("lo")
        guard lo != 0 else { return false }
        let ldAbsWord: UInt16 = 0x20, jeqK: UInt16 = 0x15, retK: UInt16 = 0x06
        let ancillary: UInt32 = 0xffff_f000   // SKF_AD_OFF (-0x1000)
        let pktType: UInt32 = 4, ifIndex: UInt32 = 8, packetOutgoing: UInt32 = 4
        // (code, jt, jf, k)
        let program: [(UInt16, UInt8, UInt8, UInt32)] = [
            (ldAbsWord, 0, 0, ancillary + pktType),
            (jeqK, 0, 2, packetOutgoing),          // leaving: look at the interface; else keep
            (ldAbsWord, 0, 0, ancillary + ifIndex),
            (jeqK, 1, 0, lo),                      // lo: drop; else keep
            (retK, 0, 0, UInt32(max(snaplen, 1))),
            (retK, 0, 0, 0),
        ]
        // struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }, struct sock_fprog { u16 len; sock_filter *filter; }
        let instructions = UnsafeMutableRawPointer.allocate(byteCount: program.count * 8, alignment: 8)
        defer { instructions.deallocate() }
        for (i, ins) in program.enumerated() {
            let at = instructions + i * 8
            at.storeBytes(of: ins.0, toByteOffset: 0, as: UInt16.self)
            at.storeBytes(of: ins.1, toByteOffset: 2, as: UInt8.self)
            at.storeBytes(of: ins.2, toByteOffset: 3, as: UInt8.self)
            at.storeBytes(of: ins.3, toByteOffset: 4, as: UInt32.self)
        }
        let fprog = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 8)
        defer { fprog.deallocate() }
        fprog.initializeMemory(as: UInt8.self, repeating: 0, count: 16)
        fprog.storeBytes(of: UInt16(program.count), toByteOffset: 0, as: UInt16.self)
        fprog.storeBytes(of: UInt(bitPattern: instructions), toByteOffset: 8, as: UInt.self)
        let soAttachFilter: Int32 = 26
        return setsockopt(fd, SOL_SOCKET, soAttachFilter, fprog, 16) == 0
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
