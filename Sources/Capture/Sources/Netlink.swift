import Foundation
#if canImport(Glibc)
import Glibc
#endif

// THE raw netlink boundary: NETLINK_NETFILTER sockets in the calling thread's netns, for
//  - NFT_MSG_TRACE events (multicast group NFNLGRP_NFTRACE, 9): the rule-by-rule walk of packets marked
//    `meta nftrace` (`-j TRACE` on iptables-nft), for `--mode trace`;
//  - ctnetlink queries (IPCTNL_MSG_CT_GET) for one conntrack entry: kernels built without
//    CONFIG_NETFILTER_NETLINK_GLUE_CT refuse NFULNL_CFG_F_CONNTRACK, so NFLOG records arrive without NFULA_CT,
//    and the answer carries the same ctnetlink attributes.
// Attribute headers are host order; values big-endian. Every byte is read through the shared `ByteReader`.

// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h, nf_tables.h
enum NetfilterNetlink {
    static let protocolNumber: Int32 = 12          // NETLINK_NETFILTER
    static let solNetlink: Int32 = 270             // SOL_NETLINK
    static let addMembership: Int32 = 1            // NETLINK_ADD_MEMBERSHIP
    static let subsysCtnetlink: UInt8 = 1
    static let subsysNftables: UInt8 = 10
    static let ctMsgNew: UInt8 = 0                 // IPCTNL_MSG_CT_NEW (also the type of a GET's answer)
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
        case nftrace = 9
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
        forEachNetlinkMessage(in: datagram) { type, _, payload in
            var p = ByteReader(payload)
            guard let family = p.u8(), p.skip(3) else { return false }     // nfgenmsg: family, version, res_id
            body(UInt8(truncatingIfNeeded: type >> 8), UInt8(truncatingIfNeeded: type), family, p)
            return true
        }
    }
}

/// Walks the netlink messages of one datagram: each one's type, sequence number and payload (what follows the
/// 16-byte nlmsghdr). `body` returns false to stop; truncated or bogus lengths end the walk. The one walk for
/// every netlink socket meshtrace reads (NFLOG batches, TRACE events, conntrack answers): headers are loaded
/// directly, as NFLOG's hundreds of messages per batch want.
@inline(__always)
func forEachNetlinkMessage(in datagram: UnsafeRawBufferPointer,
                           _ body: (_ type: UInt16, _ sequence: UInt32, _ payload: UnsafeRawBufferPointer) -> Bool) {
    var offset = 0
    while datagram.count - offset >= 16 {
        let length = Int(datagram.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
        guard length >= 16, length <= datagram.count - offset else { return }
        let type = datagram.loadUnaligned(fromByteOffset: offset + 4, as: UInt16.self)
        let sequence = datagram.loadUnaligned(fromByteOffset: offset + 8, as: UInt32.self)
        guard body(type, sequence, UnsafeRawBufferPointer(rebasing: datagram[(offset + 16)..<(offset + length)])) else { return }
        offset += min((length + 3) & ~3, datagram.count - offset)
    }
}

/// Asks conntrack for one entry by its original tuple (IPCTNL_MSG_CT_GET), in the calling thread's netns.
///
/// This is how a REDIRECT/DNAT twin's hit learns its original destination where NFLOG cannot attach NFULA_CT
/// (kernels without CONFIG_NETFILTER_NETLINK_GLUE_CT). Only those hits need it: one query per NATed connection.
/// Subscribing to ctnetlink NEW events instead made the kernel build and multicast an event for every new
/// connection of the pod (~7 µs each on this VM, two per connection through ztunnel), and made conntrack keep
/// its event extension on every entry while a listener existed.
///
/// The kernel answers within the send() (netlink requests to the kernel run in the sender's context), so the
/// answer is read without waiting: a missing answer is counted, never waited for.
public final class ConntrackQuery {
    public let fd: Int32
    private var sequence: UInt32 = 0
    private let portID: UInt32
    private let request = UnsafeMutableRawBufferPointer.allocate(byteCount: 128, alignment: 4)
    private let answer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4)
    /// Queries sent, entries found, and queries conntrack had no entry for (ENOENT: gone, or never confirmed
    /// because the packet was dropped) or that failed otherwise.
    public private(set) var asked: UInt64 = 0
    public private(set) var found: UInt64 = 0
    public private(set) var notFound: UInt64 = 0
    public private(set) var failed: UInt64 = 0

    // linux/netfilter/nfnetlink_conntrack.h
    private static let ctMsgGet: UInt16 = 1
    private static let nested: UInt16 = 0x8000                   // NLA_F_NESTED
    private static let nlmsgError: UInt16 = 2                    // NLMSG_ERROR
    private static let requestFlag: UInt16 = 1                   // NLM_F_REQUEST

    public init() throws {
        let s = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue),
                       NetfilterNetlink.protocolNumber)
        guard s >= 0 else {
            request.deallocate(); answer.deallocate()
            throw MeshtraceError(.kernelRefused, "netlink socket (NETLINK_NETFILTER): \(String(cString: strerror(errno)))")
        }
        var addr = NetlinkAddress(family: sa_family_t(AF_NETLINK), pad: 0, pid: 0, groups: 0)
        var length = socklen_t(MemoryLayout<NetlinkAddress>.size)
        let bound = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(s, $0, length) == 0 && getsockname(s, $0, &length) == 0
            }
        }
        guard bound else {
            let e = errno
            Glibc.close(s)
            request.deallocate(); answer.deallocate()
            throw MeshtraceError(.kernelRefused, "binding the conntrack query socket: \(String(cString: strerror(e)))")
        }
        fd = s
        portID = addr.pid
    }

    deinit {
        Glibc.close(fd)
        request.deallocate()
        answer.deallocate()
    }

    /// The conntrack entry whose original direction is `tuple` (zone 0, where Istio's captured connections
    /// are; only ztunnel's own upstream DNS uses zone 1, and it is not NATed). nil when there is none.
    public func entry(original tuple: FiveTuple) -> ConntrackInfo? {
        // Ports identify the entry only for these; ICMP would need its id/type/code attributes.
        switch tuple.proto {
        case IPProto.tcp, IPProto.udp, IPProto.sctp, 136 /* UDP-Lite */: break
        default: return nil
        }
        guard tuple.src.addr.family != .none,
              tuple.src.addr.family == tuple.dst.addr.family else { return nil }
        asked += 1
        sequence &+= 1
        let length = build(tuple)
        guard send(fd, request.baseAddress, length, 0) == length else { failed += 1; return nil }
        while true {
            let n = recv(fd, answer.baseAddress, answer.count, Int32(MSG_DONTWAIT))
            if n < 0 {
                if errno == EINTR { continue }
                failed += 1            // EAGAIN: no answer (none is waited for); ENOBUFS: it was dropped
                return nil
            }
            var result: ConntrackInfo?? = nil   // .none: not ours yet; .some(nil): ours, no entry
            walk(UnsafeRawBufferPointer(rebasing: answer[0..<n]), into: &result)
            if let settled = result { return settled }
        }
    }

    /// nlmsghdr, nfgenmsg, CTA_TUPLE_ORIG { CTA_TUPLE_IP { src, dst }, CTA_TUPLE_PROTO { num, sport, dport } }.
    private func build(_ t: FiveTuple) -> Int {
        let p = request.baseAddress!
        var at = 0
        func u8(_ v: UInt8) { p.storeBytes(of: v, toByteOffset: at, as: UInt8.self); at += 1 }
        func u16(_ v: UInt16) { p.storeBytes(of: v, toByteOffset: at, as: UInt16.self); at += 2 }
        func u32(_ v: UInt32) { p.storeBytes(of: v, toByteOffset: at, as: UInt32.self); at += 4 }
        func pad() { while at & 3 != 0 { u8(0) } }
        /// Starts an attribute; returns where its length goes (written by `close`).
        func open(_ type: UInt16) -> Int { let start = at; u16(0); u16(type); return start }
        func close(_ start: Int) { p.storeBytes(of: UInt16(at - start), toByteOffset: start, as: UInt16.self); pad() }
        let v4 = t.src.addr.family == .v4
        u32(0)                                                    // length, below
        u16(UInt16(NetfilterNetlink.subsysCtnetlink) << 8 | ConntrackQuery.ctMsgGet)
        u16(ConntrackQuery.requestFlag)
        u32(sequence)
        u32(portID)
        u8(UInt8(v4 ? AF_INET : AF_INET6)); u8(0); u16(0)          // nfgenmsg: family, NFNETLINK_V0, res_id
        let orig = open(1 | ConntrackQuery.nested)                 // CTA_TUPLE_ORIG
        let ip = open(1 | ConntrackQuery.nested)                   // CTA_TUPLE_IP
        for (i, a) in [t.src.addr, t.dst.addr].enumerated() {
            let attr = open(UInt16(v4 ? 1 + i : 3 + i))            // CTA_IP_V4_SRC/DST, CTA_IP_V6_SRC/DST
            if v4 { u32(a.v4Value.bigEndian) } else { u32(UInt32(truncatingIfNeeded: a.hi >> 32).bigEndian)
                u32(UInt32(truncatingIfNeeded: a.hi).bigEndian); u32(UInt32(truncatingIfNeeded: a.lo >> 32).bigEndian)
                u32(UInt32(truncatingIfNeeded: a.lo).bigEndian) }
            close(attr)
        }
        close(ip)
        let proto = open(2 | ConntrackQuery.nested)                // CTA_TUPLE_PROTO
        let num = open(1); u8(t.proto); close(num)                 // CTA_PROTO_NUM
        let sport = open(2); u16(t.src.port.bigEndian); close(sport)
        let dport = open(3); u16(t.dst.port.bigEndian); close(dport)
        close(proto)
        close(orig)
        p.storeBytes(of: UInt32(at), toByteOffset: 0, as: UInt32.self)
        return at
    }

    /// Settles `result` from the message answering the current sequence number; answers to earlier queries
    /// (which were counted as failed when they did not come in time) are skipped.
    private func walk(_ datagram: UnsafeRawBufferPointer, into result: inout ConntrackInfo??) {
        forEachNetlinkMessage(in: datagram) { type, seq, payload in
            guard seq == sequence else { return true }
            var p = ByteReader(payload)
            if type == ConntrackQuery.nlmsgError {
                // struct nlmsgerr: a negative errno (0 would be an acknowledgement, which is not asked for).
                let code = p.u32(.host).map { Int32(bitPattern: $0) } ?? -EIO
                if code == -ENOENT { notFound += 1 } else { failed += 1 }
                result = .some(nil)
                return false
            }
            guard type == UInt16(NetfilterNetlink.subsysCtnetlink) << 8 | UInt16(NetfilterNetlink.ctMsgNew),
                  p.skip(4) else { return true }                      // nfgenmsg
            let info = ConntrackDecoder.decode(p, order: .host)
            if info == nil { failed += 1 } else { found += 1 }
            result = .some(info)
            return false
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
