import Foundation
#if canImport(Glibc)
import Glibc
#endif

// THE raw netlink boundary: a NETLINK_NETFILTER socket subscribed to multicast groups in the calling thread's
// netns, for two kinds of events:
//  - ctnetlink NEW (group 1; UPDATE is group 2): the original and reply tuples of each new connection.
//    Kernels built without CONFIG_NETFILTER_NETLINK_GLUE_CT refuse NFULNL_CFG_F_CONNTRACK, so NFLOG records
//    arrive without NFULA_CT; these events carry the same ctnetlink attributes and fill the gap.
//  - NFT_MSG_TRACE (group NFNLGRP_NFTRACE, 9): the rule-by-rule walk of packets marked `meta nftrace`
//    (`-j TRACE` on iptables-nft), for `--mode trace`.
// Attribute headers are host order; values big-endian. Every byte is read through the shared `ByteReader`.

// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h, nf_tables.h
enum NetfilterNetlink {
    static let protocolNumber: Int32 = 12          // NETLINK_NETFILTER
    static let solNetlink: Int32 = 270             // SOL_NETLINK
    static let addMembership: Int32 = 1            // NETLINK_ADD_MEMBERSHIP
    static let subsysCtnetlink: UInt8 = 1
    static let subsysNftables: UInt8 = 10
    static let ctMsgNew: UInt8 = 0                 // IPCTNL_MSG_CT_NEW (NEW and UPDATE events both use it)
    static let nftMsgTrace: UInt8 = 17             // NFT_MSG_TRACE
    static let headerBytes = 16 + 4                // nlmsghdr + nfgenmsg
}

/// struct sockaddr_nl (linux/netlink.h), which Glibc's module does not export.
private struct NetlinkAddress {
    var family: sa_family_t
    var pad: UInt16
    var pid: UInt32
    var groups: UInt32
}

/// A netfilter netlink event socket in the calling thread's netns.
public final class NetfilterEventSocket {
    public enum Group: UInt32, Sendable {
        case conntrackNew = 1, conntrackUpdate = 2, nftrace = 9
    }

    public let fd: Int32
    /// recv() failures with ENOBUFS: events the kernel dropped.
    public private(set) var overruns = 0

    public init(groups: [Group], receiveBuffer: Int32 = 8 << 20) throws {
        let s = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue),
                       NetfilterNetlink.protocolNumber)
        guard s >= 0 else {
            throw MeshtraceError(.kernelRefused, "netlink socket (NETLINK_NETFILTER): \(String(cString: strerror(errno)))")
        }
        fd = s
        var addr = NetlinkAddress(family: sa_family_t(AF_NETLINK), pad: 0, pid: 0, groups: 0)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<NetlinkAddress>.size)) }
        }
        guard bound == 0 else {
            let e = errno
            Glibc.close(s)
            throw MeshtraceError(.kernelRefused, "binding the netlink socket: \(String(cString: strerror(e)))")
        }
        for g in groups {
            var group = g.rawValue
            guard setsockopt(s, NetfilterNetlink.solNetlink, NetfilterNetlink.addMembership, &group,
                             socklen_t(MemoryLayout<UInt32>.size)) == 0 else {
                let e = errno
                Glibc.close(s)
                if e == EPERM { throw MeshtraceError(.noPrivilege, "netfilter netlink events need CAP_NET_ADMIN: run as root") }
                throw MeshtraceError(.kernelRefused, "joining netlink group \(g): \(String(cString: strerror(e)))")
            }
        }
        var size = receiveBuffer
        if setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            _ = setsockopt(s, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    deinit { Glibc.close(fd) }

    /// Reads one datagram without blocking: its length, 0 when nothing is waiting, -1 after an overrun.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        while true {
            let n = recv(fd, buffer.baseAddress, buffer.count, 0)
            if n >= 0 { return n }
            switch errno {
            case EINTR: continue
            case ENOBUFS: overruns += 1; return -1
            default: return 0
            }
        }
    }

    /// Walks the netfilter netlink messages of one datagram: subsystem, message type, nfgenmsg family and
    /// the attribute area. Truncated or bogus lengths end the walk.
    public static func forEachMessage(in datagram: UnsafeRawBufferPointer,
                                      _ body: (_ subsystem: UInt8, _ message: UInt8, _ family: UInt8, _ attributes: ByteReader) -> Void) {
        var r = ByteReader(datagram)
        while r.remaining >= NetfilterNetlink.headerBytes {
            let start = r.offset
            guard let length = r.u32(.host), let type = r.u16(.host), length >= UInt32(NetfilterNetlink.headerBytes),
                  Int(length) <= datagram.count - start else { return }
            _ = r.skip(2 + 4 + 4)            // flags, seq, portid
            let family = r.u8() ?? 0
            _ = r.skip(3)                     // version, res_id
            if let attrs = r.subReader(Int(length) - NetfilterNetlink.headerBytes) {
                body(UInt8(truncatingIfNeeded: type >> 8), UInt8(truncatingIfNeeded: type), family, attrs)
            }
            let aligned = (Int(length) + 3) & ~3
            guard r.seek(to: min(start + aligned, datagram.count)) else { return }
        }
    }
}

/// One NFT_MSG_TRACE event: a step of a traced packet through an nftables (or iptables-nft) rule.
public struct NftTraceEvent {
    public enum Kind: UInt32, Sendable { case unknown = 0, policy = 1, `return` = 2, rule = 3 }
    /// Same for every event of one packet's walk.
    public var id: UInt32 = 0
    public var kind: Kind = .unknown
    /// Interned table and chain names (ids in the tracer's `RuleTagTable`, so no String per event).
    public var tableID: UInt32 = 0
    public var chainID: UInt32 = 0
    public var ruleHandle: UInt64 = 0
    /// NF_ACCEPT 1, NF_DROP 0, NFT_CONTINUE -1, NFT_JUMP -3, NFT_GOTO -4, NFT_RETURN -5.
    public var verdict: Int32? = nil
    public var nfproto: UInt32 = 0
    public var mark: UInt32? = nil
    public var inputIfindex: UInt32? = nil
    public var outputIfindex: UInt32? = nil
    /// The packet's network and transport headers, present on the first event of each base-chain walk.
    public var network: UnsafeRawBufferPointer? = nil
    public var transport: UnsafeRawBufferPointer? = nil
    public init() {}

    // linux/netfilter/nf_tables.h enum nft_trace_attributes
    static let table: UInt16 = 1, chain: UInt16 = 2, handle: UInt16 = 3, type: UInt16 = 4, verdictAttr: UInt16 = 5
    static let idAttr: UInt16 = 6, networkHeader: UInt16 = 8, transportHeader: UInt16 = 9
    static let iif: UInt16 = 10, oif: UInt16 = 12, markAttr: UInt16 = 14, nfprotoAttr: UInt16 = 15

    /// Decodes the attributes of an NFT_MSG_TRACE message; nil when they are malformed.
    /// `network`/`transport` point into `attributes`' buffer: valid only while it is.
    public static func decode(_ attributes: ByteReader, names: RuleTagTable) -> NftTraceEvent? {
        var e = NftTraceEvent()
        var attrs = NetlinkAttributes(attributes, order: .host)
        while let (type, value) = attrs.next() {
            var v = value
            switch type {
            case table: e.tableID = names.intern(v.rest)
            case chain: e.chainID = names.intern(v.rest)
            case handle: e.ruleHandle = v.be64() ?? 0
            case Self.type: e.kind = Kind(rawValue: v.be32() ?? 0) ?? .unknown
            case verdictAttr:
                var nested = NetlinkAttributes(v, order: .host)
                while let (t, code) = nested.next() {
                    guard t == 1 else { continue }   // NFTA_VERDICT_CODE
                    var c = code
                    e.verdict = c.be32().map { Int32(bitPattern: $0) }
                }
            case idAttr: e.id = v.be32() ?? 0
            case networkHeader: e.network = v.rest
            case transportHeader: e.transport = v.rest
            case iif: e.inputIfindex = v.be32()
            case oif: e.outputIfindex = v.be32()
            case markAttr: e.mark = v.be32()
            case nfprotoAttr: e.nfproto = v.be32() ?? 0
            default: break
            }
        }
        return attrs.failure == .none ? e : nil
    }
}
