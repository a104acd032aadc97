import CNflog
import Foundation
#if canImport(Glibc)
import Glibc
#endif

// THE libnetfilter_log boundary: the only file that calls it. libnetfilter_log binds and configures the
// group; the messages themselves are read raw from its socket and their TLVs decoded by the one NFLOG
// decoder (`PacketDecoder.decodeNflogAttributes`), the same that reads `tcpdump -i nflog:G` files.
//
// NFLOG instances are per network namespace: the socket must be opened by a thread that is already in the
// pod's netns (see `NetnsThread`).

/// One bound NFLOG group in the calling thread's netns.
public final class NflogSocket {
    public struct Options: Sendable {
        public var group: UInt16
        /// Bytes of each packet to copy (NFULNL_COPY_PACKET range). Headers only by default.
        public var copyRange: UInt32 = 128
        /// Ask for NFULA_CT (needs the kernel's nfnetlink glue, CONFIG_NETFILTER_NETLINK_GLUE_CT).
        public var conntrack: Bool = true
        /// Kernel flush timeout in 1/100 s and queue threshold: small, so events arrive while connections run.
        public var flushTimeout: UInt32 = 1
        public var queueThreshold: UInt32 = 16
        /// Bytes the kernel batches into one message before sending (nflog_set_nlbufsiz; the kernel allows
        /// up to 128 KiB). 64 KiB holds ~250 headers-only events: one recv() and one wakeup for all of them.
        public var batchBytes: UInt32 = 64 << 10
        /// SO_RCVBUF(FORCE) bytes: room for bursts before the kernel drops (ENOBUFS).
        public var receiveBuffer: Int32 = 16 << 20
        /// Legacy TRACE: also bind nfnetlink_log as this netns's nf_log backend for IPv4/IPv6 (group 0).
        public var bindAsLogger: Bool = false
        public init(group: UInt16) { self.group = group }
    }

    private var handle: OpaquePointer?
    private var groupHandle: OpaquePointer?
    public let fd: Int32
    public let options: Options
    /// False when the kernel refused NFULNL_CFG_F_CONNTRACK (no nfnetlink glue): NFULA_CT will be absent.
    public private(set) var conntrackAttached = false
    /// Why NFULA_CT is unavailable, for the summary.
    public private(set) var conntrackProblem: String?
    /// recv() failures with ENOBUFS: the kernel dropped messages because the buffer was full.
    public private(set) var overruns = 0

    public init(_ options: Options) throws {
        self.options = options
        guard let h = nflog_open() else {
            let e = errno
            if e == EPERM || e == EACCES { throw MeshtraceError(.noPrivilege, "opening an NFLOG socket needs CAP_NET_ADMIN: run as root") }
            throw MeshtraceError(.kernelRefused, "nflog_open: \(String(cString: strerror(e)))")
        }
        handle = h
        fd = nflog_fd(h)
        do {
            if options.bindAsLogger {
                for pf in [UInt16(AF_INET), UInt16(AF_INET6)] {
                    priorLoggers[pf] = NflogSocket.currentLogger(pf)
                    _ = nflog_unbind_pf(h, pf)
                    guard nflog_bind_pf(h, pf) >= 0 else {
                        throw MeshtraceError(.kernelRefused, "binding nfnetlink_log as the nf_log backend (legacy TRACE): \(String(cString: strerror(errno)))")
                    }
                }
            }
            guard let gh = nflog_bind_group(h, options.group) else {
                let e = errno
                // The kernel answers EBUSY (older kernels EPERM) when another socket in this netns holds the group.
                if e == EBUSY || e == EPERM || e == EEXIST {
                    throw MeshtraceError(.nflogGroupBusy, "NFLOG group \(options.group) is already in use in this netns (another meshtrace, or tcpdump -i nflog:\(options.group)?): pick another with --group")
                }
                throw MeshtraceError(.kernelRefused, "binding NFLOG group \(options.group): \(String(cString: strerror(e)))")
            }
            groupHandle = gh
            guard nflog_set_mode(gh, UInt8(NFULNL_COPY_PACKET), options.copyRange) >= 0 else {
                throw MeshtraceError(.kernelRefused, "NFLOG copy mode: \(String(cString: strerror(errno)))")
            }
            let seq = UInt16(NFULNL_CFG_F_SEQ)
            if options.conntrack {
                if nflog_set_flags(gh, seq | UInt16(NFULNL_CFG_F_CONNTRACK)) >= 0 {
                    conntrackAttached = true
                } else {
                    // EOPNOTSUPP: the kernel lacks CONFIG_NETFILTER_NETLINK_GLUE_CT (or nf_conntrack_netlink).
                    conntrackProblem = "the kernel does not attach conntrack to NFLOG (NFULNL_CFG_F_CONNTRACK: \(String(cString: strerror(errno))))"
                }
            }
            if !conntrackAttached {
                guard nflog_set_flags(gh, seq) >= 0 else {
                    throw MeshtraceError(.kernelRefused, "NFLOG sequence numbers: \(String(cString: strerror(errno)))")
                }
            }
            _ = nflog_set_timeout(gh, options.flushTimeout)
            _ = nflog_set_qthresh(gh, options.queueThreshold)
            _ = nflog_set_nlbufsiz(gh, options.batchBytes)
            var size = options.receiveBuffer
            if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
                _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            }
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
        } catch {
            close()
            throw error
        }
    }

    deinit { close() }

    /// nf_log backends of this netns before `bindAsLogger` changed them ("NONE", "nf_log_ipv4", ...).
    public private(set) var priorLoggers: [UInt16: String] = [:]

    /// The nf_log backend bound for a protocol family in the calling thread's netns (/proc/sys/net is per netns).
    static func currentLogger(_ pf: UInt16) -> String {
        let text = (try? String(contentsOfFile: "/proc/sys/net/netfilter/nf_log/\(pf)", encoding: .utf8)) ?? "NONE"
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Takes `recorded` as the backends to put back where this socket found nfnetlink_log already bound (left by a
    /// killed run that recorded the true ones). Before the netns thread starts reading, or on it.
    public func adoptPriorLoggers(_ recorded: [UInt16: String]) {
        for (pf, prior) in recorded where priorLoggers[pf] == "nfnetlink_log" { priorLoggers[pf] = prior }
    }

    /// Puts the netns's nf_log backends back as they were before `bindAsLogger`. Must run on the thread that is
    /// in the pod's netns (it may write /proc/sys/net/netfilter/nf_log/PF there).
    public func restoreLoggers() {
        for (pf, prior) in priorLoggers {
            if prior == "NONE", let h = handle {
                _ = nflog_unbind_pf(h, pf)
            } else if prior != "nfnetlink_log", let f = fopen("/proc/sys/net/netfilter/nf_log/\(pf)", "w") {
                fputs(prior, f)
                fclose(f)
            }
        }
        priorLoggers = [:]
    }

    public func close() {
        if let gh = groupHandle { _ = nflog_unbind_group(gh); groupHandle = nil }
        if let h = handle { _ = nflog_close(h); handle = nil }
    }

    /// What one receive produced.
    public enum Receive { case bytes(Int), empty, overrun }

    /// Reads one datagram (possibly several netlink messages) without blocking.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Receive {
        while true {
            let n = recv(fd, buffer.baseAddress, buffer.count, 0)
            if n > 0 { return .bytes(n) }
            if n == 0 { return .empty }
            switch errno {
            case EINTR: continue
            case ENOBUFS: overruns += 1; return .overrun
            default: return .empty
            }
        }
    }

    /// Walks the netlink messages of one datagram and hands each NFLOG packet message's TLV area to `body`
    /// (with its nfgenmsg family and group). Other messages (acks, errors) are skipped.
    public static func forEachPacket(in datagram: UnsafeRawBufferPointer,
                                     _ body: (_ tlvs: UnsafeRawBufferPointer, _ family: UInt8, _ group: UInt16) -> Void) {
        let packetType = UInt16(NFNL_SUBSYS_ULOG) << 8 | UInt16(NFULNL_MSG_PACKET.rawValue)
        forEachNetlinkMessage(in: datagram) { type, _, payload in
            // nfgenmsg: family, version, then the group (res_id) big-endian.
            if type == packetType, payload.count >= 4 {
                let group = UInt16(bigEndian: payload.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
                body(UnsafeRawBufferPointer(rebasing: payload[4...]), payload[0], group)
            }
            return true
        }
    }
}
