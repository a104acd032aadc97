// The libpcap boundary: the only file that calls libpcap. Pointers and return codes become Swift
// values and thrown `MeshtraceError`s here; nothing above this file touches a pcap_t.

import CPcap
#if canImport(Glibc)
import Glibc
#endif

/// One packet as libpcap handed it out. `bytes` points into libpcap's buffer: valid until the next read
/// on the same handle.
public struct PcapPacket {
    public var time: Timestamp
    public var wireLength: UInt32
    public var bytes: UnsafeRawBufferPointer
    /// The record's own 32-bit seconds and fraction (in ns) as libpcap read them from a file, before `time` folds
    /// them: libpcap sign-extends both, and a µs fraction of 4.29 s or more overflowed `time`'s 32-bit nanoseconds
    /// (`Timestamp(pcapSeconds:fractionNanoseconds:)` reads them as the format defines them).
    public var fileSeconds: UInt32 = 0
    public var fileFractionNanoseconds: UInt64 = 0
}

/// libpcap's counters for a live capture (pcap_stats).
public struct PcapStatistics: Sendable, Equatable {
    public var received: UInt32
    /// Dropped because the capture buffer was full (ps_drop): packets the trace did not see.
    public var dropped: UInt32
    public var interfaceDropped: UInt32
}

/// A libpcap capture handle: a file being read, or an activated live device (an interface, `any`, `nflog:G`).
public final class PcapHandle: @unchecked Sendable {
    public enum ReadResult {
        case packet(PcapPacket)
        /// Live capture: the read timeout passed (or nonblocking and nothing waiting).
        case timeout
        /// File: no more packets. Live: `breakLoop()` was called.
        case end
        /// libpcap failed; for a file, "truncated dump file; ..." means the file ends inside a record.
        case error(String)
    }

    private var handle: OpaquePointer?
    /// The file path or device name, for messages.
    public let name: String
    /// True when `time` of packets is nanosecond-exact (ns files, or live with nanosecond stamps).
    public let nanosecondTimestamps: Bool

    /// A device capture rather than a file.
    public let isLive: Bool

    private init(handle: OpaquePointer, name: String, isLive: Bool) {
        self.handle = handle
        self.name = name
        self.isLive = isLive
        nanosecondTimestamps = pcap_get_tstamp_precision(handle) == PCAP_TSTAMP_PRECISION_NANO
    }

    deinit { close() }

    // MARK: opening

    /// Opens a pcap (µs or ns) or pcapng file; timestamps come out in nanoseconds either way.
    public static func openOffline(path: String) throws -> PcapHandle {
        var errbuf = [CChar](repeating: 0, count: Int(PCAP_ERRBUF_SIZE))
        // A classic µs file is read at µs, as written: asked for ns, libpcap multiplies the sign-extended 32-bit
        // fraction by 1000 itself, and a fraction of 2^31 µs or more came out negative (`fileFractionNanoseconds`).
        let precision = isClassicMicrosecondFile(path) ? PCAP_TSTAMP_PRECISION_MICRO : PCAP_TSTAMP_PRECISION_NANO
        guard let p = pcap_open_offline_with_tstamp_precision(path, UInt32(precision), &errbuf) else {
            throw MeshtraceError.badInput("\(path): \(String(cString: errbuf))")
        }
        return PcapHandle(handle: p, name: path, isLive: false)
    }

    /// Opens a classic pcap (or a pcapng libpcap reads) from a stream already open, read from where it stands;
    /// `microseconds`: the classic µs magic (see `openOffline(path:)`). libpcap closes `file` with the handle.
    public static func openOffline(file: UnsafeMutablePointer<FILE>, name: String, microseconds: Bool) throws -> PcapHandle {
        var errbuf = [CChar](repeating: 0, count: Int(PCAP_ERRBUF_SIZE))
        let precision = microseconds ? PCAP_TSTAMP_PRECISION_MICRO : PCAP_TSTAMP_PRECISION_NANO
        guard let p = pcap_fopen_offline_with_tstamp_precision(file, UInt32(precision), &errbuf) else {
            fclose(file)
            throw MeshtraceError.badInput("\(name): \(String(cString: errbuf))")
        }
        return PcapHandle(handle: p, name: name, isLive: false)
    }

    /// True when `path` starts with the classic pcap magic of µs timestamps (either byte order).
    private static func isClassicMicrosecondFile(_ path: String) -> Bool {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var magic: UInt32 = 0
        guard read(fd, &magic, 4) == 4 else { return false }
        return magic == 0xa1b2_c3d4 || magic == UInt32(0xa1b2_c3d4).byteSwapped
    }

    /// Creates and activates a live capture on `device` in the current network namespace (the caller's
    /// thread must already be inside the pod's netns). `nflog:G` opens NFLOG group G the same way.
    /// - Parameters:
    ///   - snaplen: bytes kept per packet.
    ///   - bufferSize: kernel capture buffer in bytes (bursts are lost, and counted in `ps_drop`, beyond it).
    ///   - immediate: deliver each packet as it arrives instead of when the buffer fills.
    ///   - timeoutMilliseconds: how long a blocking read waits before returning `.timeout`.
    public static func openLive(device: String, snaplen: Int32 = 262_144, bufferSize: Int32 = 4 << 20,
                                immediate: Bool = true, promiscuous: Bool = false,
                                timeoutMilliseconds: Int32 = 100) throws -> PcapHandle {
        var errbuf = [CChar](repeating: 0, count: Int(PCAP_ERRBUF_SIZE))
        guard let p = pcap_create(device, &errbuf) else {
            throw MeshtraceError.badInput("cannot capture on \(device): \(String(cString: errbuf))")
        }
        _ = pcap_set_snaplen(p, snaplen)
        _ = pcap_set_promisc(p, promiscuous ? 1 : 0)
        _ = pcap_set_timeout(p, timeoutMilliseconds)
        _ = pcap_set_buffer_size(p, bufferSize)
        _ = pcap_set_immediate_mode(p, immediate ? 1 : 0)
        // Not every device can stamp in ns (nflog cannot); then it stays µs, scaled up on read.
        _ = pcap_set_tstamp_precision(p, Int32(PCAP_TSTAMP_PRECISION_NANO))
        let status = pcap_activate(p)
        if status < 0 {
            let detail = String(cString: pcap_geterr(p))
            pcap_close(p)
            throw activationError(device: device, status: status, detail: detail)
        }
        return PcapHandle(handle: p, name: device, isLive: true)
    }

    private static func activationError(device: String, status: Int32, detail: String) -> MeshtraceError {
        let why = detail.isEmpty ? String(cString: pcap_statustostr(status)) : detail
        switch status {
        case PCAP_ERROR_NO_SUCH_DEVICE:
            return MeshtraceError.badInput("no capture device \(device) in this network namespace: \(why)")
        case PCAP_ERROR_PERM_DENIED, PCAP_ERROR_PROMISC_PERM_DENIED:
            return MeshtraceError(.noPrivilege, "capturing on \(device) needs root (CAP_NET_RAW): \(why)")
        default:
            // A group another socket in this netns already bound: the kernel answers the bind with EPERM (even
            // for root) or EBUSY, which libpcap words as "Can't listen on group index: Operation not permitted".
            if device.hasPrefix("nflog"), why.contains("listen on group") || why.contains("busy") {
                return MeshtraceError(.nflogGroupBusy, "cannot capture on \(device): \(why) (is another listener on that group?)")
            }
            return MeshtraceError(.kernelRefused, "cannot capture on \(device): \(why)")
        }
    }

    // MARK: facts about the capture

    /// The DLT of the packets (see `LinkType`; RAW files report DLT_RAW 12, not 101).
    public var linkType: Int32 { handle.map { pcap_datalink($0) } ?? -1 }
    public var snapshotLength: Int32 { handle.map { pcap_snapshot($0) } ?? 0 }
    /// True when the file was written on a machine of the other byte order.
    public var isSwapped: Bool { handle.map { pcap_is_swapped($0) == 1 } ?? false }

    // MARK: reading

    /// The next packet. For files: `.end` at a clean end, `.error` for a damaged one.
    public func next() -> ReadResult {
        guard let handle else { return .end }
        errno = 0
        var header: UnsafeMutablePointer<pcap_pkthdr>? = nil
        var data: UnsafePointer<u_char>? = nil
        switch pcap_next_ex(handle, &header, &data) {
        case 1:
            guard let h = header?.pointee else { return .error("libpcap returned a packet without a header") }
            let fraction = Int64(h.ts.tv_usec)
            let time = Timestamp(seconds: Int64(h.ts.tv_sec),
                                 nanoseconds: Int32(truncatingIfNeeded: nanosecondTimestamps ? fraction : fraction * 1000))
            let bytes = UnsafeRawBufferPointer(start: data, count: Int(h.caplen))
            let fractionField = UInt64(UInt32(truncatingIfNeeded: h.ts.tv_usec))
            return .packet(PcapPacket(time: time, wireLength: h.len, bytes: bytes,
                                      fileSeconds: UInt32(truncatingIfNeeded: h.ts.tv_sec),
                                      fileFractionNanoseconds: nanosecondTimestamps ? fractionField : fractionField * 1000))
        case 0:
            return .timeout
        case PCAP_ERROR_BREAK:
            return .end
        default:
            // libpcap's nflog reader reports a nonblocking recv's EAGAIN as an error instead of "no packet".
            let failure = errno
            if isLive && (failure == EAGAIN || failure == EWOULDBLOCK) { return .timeout }
            return .error(String(cString: pcap_geterr(handle)))
        }
    }

    /// Files: makes the next read start at `offset` in the file (`PcapRecordReader` hands a file over to libpcap
    /// at the first record it does not take). libpcap reads a file sequentially through its FILE, so moving that
    /// is all it takes.
    public func seek(toFileOffset offset: Int64) -> Bool {
        guard let handle, !isLive, let file = pcap_file(handle) else { return false }
        return fseeko(file, off_t(offset), SEEK_SET) == 0
    }

    // MARK: live controls

    /// Compiles and installs a tcpdump-syntax filter (classic BPF). A bad expression is a usage error.
    public func setFilter(_ expression: String) throws {
        guard let handle else { return }
        var program = bpf_program()
        guard pcap_compile(handle, &program, expression, 1, PCAP_NETMASK_UNKNOWN) == 0 else {
            throw MeshtraceError(.usage, "bad filter '\(expression)': \(String(cString: pcap_geterr(handle)))")
        }
        defer { pcap_freecode(&program) }
        guard pcap_setfilter(handle, &program) == 0 else {
            throw MeshtraceError(.kernelRefused, "cannot install filter '\(expression)' on \(name): \(String(cString: pcap_geterr(handle)))")
        }
    }

    public func setNonblocking(_ on: Bool) throws {
        guard let handle else { return }
        var errbuf = [CChar](repeating: 0, count: Int(PCAP_ERRBUF_SIZE))
        guard pcap_setnonblock(handle, on ? 1 : 0, &errbuf) == 0 else {
            throw MeshtraceError(.kernelRefused, "\(name): cannot set nonblocking: \(String(cString: errbuf))")
        }
    }

    /// A packet on lo reaches a packet socket twice, leaving (PACKET_OUTGOING) and arriving. libpcap drops the
    /// leaving copy, but only after the kernel copied it into the ring: half of a pod's loopback traffic (the
    /// app's legs to ztunnel) copied for nothing. This socket filter drops it in the kernel: classic BPF on the
    /// packet type and interface index (SKF_AD_PKTTYPE, SKF_AD_IFINDEX), which `any` captures in LINUX_SLL cannot
    /// express in pcap filter syntax. Kept packets are cut at `snaplen`, as libpcap's own filters do. With a
    /// `setFilter`, libpcap's filter takes the socket instead and the leaving copies go back to being dropped
    /// after the copy. Live `any` captures only (PcapLiveSource). Returns false (and changes nothing) when the kernel refuses the filter.
    public func dropLoopbackLeavingCopies(snaplen: Int32) -> Bool {
        guard isLive, let fd = selectableFileDescriptor else { return false }
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

    /// A descriptor to poll(2) for readability, when the device has one.
    public var selectableFileDescriptor: Int32? {
        guard let handle else { return nil }
        let fd = pcap_get_selectable_fd(handle)
        return fd >= 0 ? fd : nil
    }

    /// Waits until the capture has something to read or `timeoutMilliseconds` pass; false on timeout.
    /// On Linux, immediate mode makes libpcap ignore the read timeout: a blocking `next()` with no traffic never
    /// returns (only `breakLoop()` ends it). Live readers should `setNonblocking(true)` and wait here.
    public func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        guard let fd = selectableFileDescriptor else { return true }
        var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&entry, 1, timeoutMilliseconds) > 0
    }

    public func statistics() throws -> PcapStatistics {
        guard let handle else { throw MeshtraceError(.kernelRefused, "\(name): capture is closed") }
        var s = pcap_stat()
        guard pcap_stats(handle, &s) == 0 else {
            throw MeshtraceError(.kernelRefused, "\(name): cannot read capture statistics: \(String(cString: pcap_geterr(handle)))")
        }
        return PcapStatistics(received: s.ps_recv, dropped: s.ps_drop, interfaceDropped: s.ps_ifdrop)
    }

    /// Makes a blocked or future `next()` return `.end`; safe from another thread or a signal handler.
    public func breakLoop() {
        if let handle { pcap_breakloop(handle) }
    }

    public func close() {
        if let handle { pcap_close(handle) }
        handle = nil
    }
}

/// Writes a classic pcap file with `pcap_dump` (what `-w` produces; pcapng with comments is the report
/// stage's own writer). Nanosecond files by default, so timestamps survive exactly.
/// A tcpdump-syntax filter compiled by libpcap for one link type and run in userspace on bytes already read
/// (pcap_offline_filter): how `trace --filter` decides which connections to show.
public final class PcapFilterProgram: @unchecked Sendable {
    private var program = bpf_program()
    public let linkType: Int32

    /// Compiles `expression` for frames of `linkType` (a DLT value). A bad expression is a usage error.
    public init(_ expression: String, linkType: Int32) throws {
        self.linkType = linkType
        guard let dead = pcap_open_dead(linkType, 262_144) else {
            throw MeshtraceError(.kernelRefused, "libpcap could not open a handle to compile the filter")
        }
        defer { pcap_close(dead) }
        guard pcap_compile(dead, &program, expression, 1, PCAP_NETMASK_UNKNOWN) == 0 else {
            throw MeshtraceError(.usage, "bad filter '\(expression)': \(String(cString: pcap_geterr(dead)))")
        }
    }

    deinit { pcap_freecode(&program) }

    /// Whether the frame passes the filter. `wireLength` is the packet's length before any snaplen cut.
    public func matches(_ bytes: UnsafeRawBufferPointer, wireLength: UInt32) -> Bool {
        guard let base = bytes.baseAddress else { return false }
        var header = pcap_pkthdr()
        header.caplen = UInt32(bytes.count)
        header.len = max(wireLength, UInt32(bytes.count))
        return pcap_offline_filter(&program, &header, base.assumingMemoryBound(to: UInt8.self)) != 0
    }
}

public final class PcapDumpWriter: @unchecked Sendable {
    private var dead: OpaquePointer?
    private var dumper: OpaquePointer?
    public let path: String
    private let nanosecond: Bool

    /// A writer for packets of one link type.
    public init(path: String, linkType: Int32, snaplen: Int32 = 262_144, nanosecond: Bool = true) throws {
        self.path = path
        self.nanosecond = nanosecond
        guard let d = pcap_open_dead_with_tstamp_precision(linkType, snaplen,
                                                           UInt32(nanosecond ? PCAP_TSTAMP_PRECISION_NANO : PCAP_TSTAMP_PRECISION_MICRO)) else {
            throw MeshtraceError.badInput("cannot write \(path): libpcap does not know link type \(linkType)")
        }
        dead = d
        guard let w = pcap_dump_open(d, path) else {
            let why = String(cString: pcap_geterr(d))
            pcap_close(d)
            dead = nil
            throw MeshtraceError.badInput("cannot write \(path): \(why)")
        }
        dumper = w
    }

    /// A writer with the link type and snaplen of a live capture.
    public convenience init(path: String, like capture: PcapHandle) throws {
        try self.init(path: path, linkType: capture.linkType, snaplen: capture.snapshotLength)
    }

    public func write(time: Timestamp, bytes: UnsafeRawBufferPointer, wireLength: UInt32) {
        guard let dumper else { return }
        var header = pcap_pkthdr()
        header.ts.tv_sec = Int(time.seconds)
        header.ts.tv_usec = Int(nanosecond ? Int64(time.nanoseconds) : Int64(time.nanoseconds) / 1000)
        header.caplen = UInt32(bytes.count)
        header.len = max(wireLength, UInt32(bytes.count))
        let user = UnsafeMutableRawPointer(dumper).assumingMemoryBound(to: u_char.self)
        let start = bytes.baseAddress?.assumingMemoryBound(to: u_char.self)
        withUnsafePointer(to: header) { pcap_dump(user, $0, start) }
    }

    public func flush() throws {
        guard let dumper else { return }
        guard pcap_dump_flush(dumper) == 0 else {
            throw MeshtraceError.badInput("cannot write \(path): \(String(cString: strerror(errno)))")
        }
        // pcap_dump reports nothing: a write that failed earlier (ENOSPC) is only in the stream's error flag.
        if let file = pcap_dump_file(dumper), ferror(file) != 0 {
            throw MeshtraceError.badInput("cannot write \(path): a write failed (disk full?); the file is incomplete")
        }
    }

    /// Flushes and closes; throws when any of the file could not be written (after closing it).
    public func finish() throws {
        defer { close() }
        try flush()
    }

    public func close() {
        if let dumper { pcap_dump_close(dumper) }
        if let dead { pcap_close(dead) }
        dumper = nil
        dead = nil
    }

    deinit { close() }
}

extension PcapHandle {
    /// libpcap's name for a DLT ("IEEE802_11"), or "unknown".
    public static func linkTypeName(_ linkType: Int32) -> String {
        guard let name = pcap_datalink_val_to_name(linkType) else { return "unknown" }
        return String(cString: name)
    }
}
