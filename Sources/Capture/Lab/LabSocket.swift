import Foundation
#if canImport(Glibc)
import Glibc
#endif

// The lab's only boundary to the socket API (Glibc). The ztunnel stand-in and the app stand-ins speak
// `LabSocket` and `Endpoint`; nothing above this file touches a sockaddr or an errno.

/// Socket options Glibc does not export by name (values from linux/in.h, linux/netfilter_ipv4.h, linux/in6.h).
enum SocketOption {
    static let solIP: Int32 = 0
    static let solIPv6: Int32 = 41
    /// SO_ORIGINAL_DST (linux/netfilter_ipv4.h) on SOL_IP; IP6T_SO_ORIGINAL_DST has the same value on SOL_IPV6.
    static let originalDestination: Int32 = 80
    static let ipTransparent: Int32 = 19
    static let ipv6Transparent: Int32 = 75
    static let ipv6Only: Int32 = 26
    static let soMark: Int32 = 36
}

extension Endpoint {
    /// Parses `10.0.0.1:80` or `[fd00::1]:80`.
    public init?(parsing text: String) {
        let hostPart: Substring, portPart: Substring
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            hostPart = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            portPart = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else { return nil }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
        }
        guard let addr = IPAddress(hostPart), let port = UInt16(portPart) else { return nil }
        self.init(addr, port)
    }
}

/// A socket address in the kernel's layout, for either family.
struct KernelSockaddr {
    var storage = sockaddr_storage()
    var length: socklen_t = 0

    init() {}

    init(_ ep: Endpoint) {
        switch ep.addr.family {
        case .v6:
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = ep.port.bigEndian
            var bytes = [UInt8](repeating: 0, count: 16)
            for i in 0..<8 {
                bytes[i] = UInt8(truncatingIfNeeded: ep.addr.hi >> UInt64(56 - 8 * i))
                bytes[8 + i] = UInt8(truncatingIfNeeded: ep.addr.lo >> UInt64(56 - 8 * i))
            }
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { raw in
                for i in 0..<16 { raw[i] = bytes[i] }
            }
            withUnsafeMutableBytes(of: &storage) { raw in
                withUnsafeBytes(of: sin6) { src in raw.copyMemory(from: src) }
            }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        default:
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = ep.port.bigEndian
            sin.sin_addr.s_addr = ep.addr.v4Value.bigEndian
            withUnsafeMutableBytes(of: &storage) { raw in
                withUnsafeBytes(of: sin) { src in raw.copyMemory(from: src) }
            }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
    }

    var endpoint: Endpoint? {
        withUnsafeBytes(of: storage) { raw -> Endpoint? in
            let family = raw.load(fromByteOffset: 0, as: sa_family_t.self)
            if family == sa_family_t(AF_INET) {
                let sin = raw.load(as: sockaddr_in.self)
                return Endpoint(IPAddress(v4: UInt32(bigEndian: sin.sin_addr.s_addr)), UInt16(bigEndian: sin.sin_port))
            }
            if family == sa_family_t(AF_INET6) {
                let sin6 = raw.load(as: sockaddr_in6.self)
                var hi: UInt64 = 0, lo: UInt64 = 0
                withUnsafeBytes(of: sin6.sin6_addr) { a in
                    for i in 0..<8 { hi = hi << 8 | UInt64(a[i]) }
                    for i in 8..<16 { lo = lo << 8 | UInt64(a[i]) }
                }
                // A v4-mapped peer on a dual-stack socket is reported as the IPv4 address it is.
                if hi == 0 && (lo >> 32) == 0xffff { return Endpoint(IPAddress(v4: UInt32(truncatingIfNeeded: lo)), UInt16(bigEndian: sin6.sin6_port)) }
                return Endpoint(IPAddress(v6: hi, lo), UInt16(bigEndian: sin6.sin6_port))
            }
            return nil
        }
    }

    mutating func withPointer<T>(_ body: (UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> T) -> T {
        var len = length == 0 ? socklen_t(MemoryLayout<sockaddr_storage>.size) : length
        let r = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, &len) }
        }
        length = len
        return r
    }
}

/// One socket file descriptor the lab owns. Not copyable in spirit: whoever holds it closes it once.
public final class LabSocket: @unchecked Sendable {
    public let fd: Int32
    public let family: IPAddress.Family
    private var closed = false
    private let lock = NSLock()

    init(fd: Int32, family: IPAddress.Family) { self.fd = fd; self.family = family }

    deinit { close() }

    public func close() {
        lock.lock(); defer { lock.unlock() }
        guard !closed else { return }
        closed = true
        _ = Glibc.close(fd)
    }

    static func errorText(_ what: String) -> String { "\(what): \(String(cString: strerror(errno)))" }

    private static func make(_ family: IPAddress.Family, _ type: Int32) throws -> LabSocket {
        let domain = family == .v6 ? AF_INET6 : AF_INET
        let fd = socket(domain, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MeshtraceError(.kernelRefused, errorText("socket")) }
        return LabSocket(fd: fd, family: family)
    }

    private func setInt(_ level: Int32, _ name: Int32, _ value: Int32, _ what: String) throws {
        var v = value
        guard setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            throw MeshtraceError(.kernelRefused, LabSocket.errorText("setsockopt \(what)"))
        }
    }

    /// SO_MARK: how ztunnel tells the pod's rules "this packet is mine" (needs CAP_NET_ADMIN).
    func setMark(_ mark: UInt32) throws { try setInt(SOL_SOCKET, SocketOption.soMark, Int32(bitPattern: mark), "SO_MARK") }

    /// IP_TRANSPARENT: lets a socket bind an address the netns does not own (the original client's).
    func setTransparent() throws {
        if family == .v6 { try setInt(SocketOption.solIPv6, SocketOption.ipv6Transparent, 1, "IPV6_TRANSPARENT") }
        else { try setInt(SocketOption.solIP, SocketOption.ipTransparent, 1, "IP_TRANSPARENT") }
    }

    /// TCP_NODELAY: small writes go out at once. A pooled tunnel's end-of-stream frame follows its last data frame;
    /// with Nagle it waited for the peer's delayed ACK (40 ms), and the lab's pooled connections ran at ~50 a second.
    func setNoDelay() {
        var v: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &v, socklen_t(MemoryLayout<Int32>.size))
    }

    func setTimeouts(seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    func bind(_ ep: Endpoint) throws {
        var sa = KernelSockaddr(ep)
        let r = sa.withPointer { p, len in Glibc.bind(fd, p, len.pointee) }
        guard r == 0 else { throw MeshtraceError(.kernelRefused, LabSocket.errorText("bind \(ep)")) }
    }

    /// A TCP listener on every address of the family, optionally marked. `transparent` lets TPROXY rules deliver
    /// to it (xt_TPROXY ignores listeners without IP_TRANSPARENT).
    static func tcpListener(port: UInt16, family: IPAddress.Family, mark: UInt32?, host: IPAddress? = nil,
                            transparent: Bool = false) throws -> LabSocket {
        let s = try make(family, Int32(SOCK_STREAM.rawValue))
        try s.setInt(SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR")
        if family == .v6 { try s.setInt(SocketOption.solIPv6, SocketOption.ipv6Only, 1, "IPV6_V6ONLY") }
        if let mark { try s.setMark(mark) }
        if transparent { try s.setTransparent() }
        let any = family == .v6 ? IPAddress(v6: 0, 0) : IPAddress(v4: 0)
        try s.bind(Endpoint(host ?? any, port))
        guard Glibc.listen(s.fd, 128) == 0 else { throw MeshtraceError(.kernelRefused, errorText("listen :\(port)")) }
        return s
    }

    /// A UDP socket bound to `ep`, optionally marked.
    static func udp(bound ep: Endpoint?, family: IPAddress.Family, mark: UInt32?) throws -> LabSocket {
        let s = try make(family, Int32(SOCK_DGRAM.rawValue))
        // Separate v4 and v6 sockets on one port: without V6ONLY the v6 one would claim the v4 port too.
        if family == .v6 { try s.setInt(SocketOption.solIPv6, SocketOption.ipv6Only, 1, "IPV6_V6ONLY") }
        if let mark { try s.setMark(mark) }
        if let ep { try s.bind(ep) }
        return s
    }

    /// Connects a new TCP socket. `source` binds it first (with `transparent`, to an address the netns does not own).
    static func tcpConnect(to ep: Endpoint, from source: Endpoint? = nil, mark: UInt32? = nil,
                           transparent: Bool = false, timeout: Double = 5) throws -> LabSocket {
        let s = try make(ep.addr.family, Int32(SOCK_STREAM.rawValue))
        if let mark { try s.setMark(mark) }
        if transparent { try s.setTransparent() }
        if let source {
            // A given port may still be held by the same app's earlier socket (TIME_WAIT): reuse it, as an app
            // pinning its source port does.
            if source.port != 0 { try s.setInt(SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR") }
            try s.bind(source)
        }
        // SO_SNDTIMEO bounds connect() too (Linux), so a dropped SYN cannot hang the caller.
        s.setTimeouts(seconds: timeout)
        var sa = KernelSockaddr(ep)
        var r: Int32 = -1
        repeat { r = sa.withPointer { p, len in Glibc.connect(s.fd, p, len.pointee) } } while r != 0 && errno == EINTR
        guard r == 0 else { throw MeshtraceError(.kernelRefused, errorText("connect \(ep)")) }
        return s
    }

    /// Accepts one connection; nil when interrupted or the listener was closed.
    func accept() -> (LabSocket, Endpoint)? {
        var sa = KernelSockaddr()
        var c: Int32 = -1
        repeat { c = sa.withPointer { p, len in Glibc.accept(fd, p, len) } } while c < 0 && errno == EINTR
        if c >= 0 { _ = fcntl(c, F_SETFD, FD_CLOEXEC) }
        guard c >= 0, let peer = sa.endpoint else {
            if c >= 0 { _ = Glibc.close(c) }
            return nil
        }
        return (LabSocket(fd: c, family: family), peer)
    }

    /// The destination the app dialled before REDIRECT rewrote it (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST).
    /// A TPROXY-delivered connection was never NATed (ENOENT): its local address is the original destination.
    func originalDestination() throws -> Endpoint {
        var sa = KernelSockaddr()
        let level = family == .v6 ? SocketOption.solIPv6 : SocketOption.solIP
        let r = sa.withPointer { p, len in getsockopt(fd, level, SocketOption.originalDestination, p, len) }
        if r == 0, let ep = sa.endpoint { return ep }
        if errno == ENOENT, let local = localEndpoint { return local }
        throw MeshtraceError(.kernelRefused, LabSocket.errorText("SO_ORIGINAL_DST"))
    }

    var localEndpoint: Endpoint? {
        var sa = KernelSockaddr()
        let r = sa.withPointer { p, len in getsockname(fd, p, len) }
        return r == 0 ? sa.endpoint : nil
    }

    /// Reads up to `count` bytes into `buffer`; 0 at end of stream, -1 on error or timeout.
    func read(into buffer: UnsafeMutableRawPointer, count: Int) -> Int {
        var n: Int
        repeat { n = Glibc.read(fd, buffer, count) } while n < 0 && errno == EINTR
        return n
    }

    /// Reads exactly `count` bytes into `buffer`; false when the stream ends, fails or times out first.
    func readExactly(into buffer: UnsafeMutableRawPointer, count: Int) -> Bool {
        var got = 0
        while got < count {
            let n = read(into: buffer + got, count: count - got)
            if n <= 0 { return false }
            got += n
        }
        return true
    }

    func writeAll(_ buffer: UnsafeRawPointer, count: Int) -> Bool {
        var done = 0
        while done < count {
            let n = Glibc.write(fd, buffer + done, count - done)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    func writeAll(_ bytes: [UInt8]) -> Bool { bytes.withUnsafeBytes { writeAll($0.baseAddress!, count: $0.count) } }

    /// Reads until `delimiter` (included) or `limit` bytes; nil on error, timeout or early end.
    func readLine(limit: Int = 512, delimiter: UInt8 = 0x0a, transform: ((inout UInt8) -> Void)? = nil) -> [UInt8]? {
        var out: [UInt8] = []
        var byte: UInt8 = 0
        while out.count < limit {
            let n = withUnsafeMutableBytes(of: &byte) { read(into: $0.baseAddress!, count: 1) }
            guard n == 1 else { return nil }
            transform?(&byte)
            out.append(byte)
            if byte == delimiter { return out }
        }
        return nil
    }

    /// Reads until the peer closes or `limit` bytes; what arrived before a timeout is returned.
    func readToEnd(limit: Int = 1 << 20) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while out.count < limit {
            let n = buf.withUnsafeMutableBytes { read(into: $0.baseAddress!, count: $0.count) }
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return out
    }

    func shutdownWrite() { _ = Glibc.shutdown(fd, Int32(SHUT_WR)) }

    func sendTo(_ bytes: [UInt8], _ ep: Endpoint) -> Bool {
        var sa = KernelSockaddr(ep)
        let n = bytes.withUnsafeBytes { b in sa.withPointer { p, len in Glibc.sendto(fd, b.baseAddress, b.count, 0, p, len.pointee) } }
        return n == bytes.count
    }

    func receiveFrom(max: Int = 2048) -> ([UInt8], Endpoint)? {
        var buf = [UInt8](repeating: 0, count: max)
        var sa = KernelSockaddr()
        let n = buf.withUnsafeMutableBytes { b in sa.withPointer { p, len in Glibc.recvfrom(fd, b.baseAddress, b.count, 0, p, len) } }
        guard n >= 0, let ep = sa.endpoint else { return nil }
        return (Array(buf[0..<n]), ep)
    }

    /// Copies bytes both ways until both sides have closed or nothing moved for `idle` seconds.
    /// `transformUp` applies to bytes read from `self` before they are written to `other`; `transformDown` the reverse.
    func relay(with other: LabSocket, idle: Double = 30,
               transformUp: ((UnsafeMutableRawBufferPointer) -> Void)? = nil,
               transformDown: ((UnsafeMutableRawBufferPointer) -> Void)? = nil) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 1024, alignment: 8)
        defer { buffer.deallocate() }
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: other.fd, events: Int16(POLLIN), revents: 0)]
        var open = [true, true]
        let sockets = [self, other]
        let timeoutMs = Int32(idle * 1000)
        while open[0] || open[1] {
            for i in 0..<2 { fds[i].fd = open[i] ? sockets[i].fd : -1; fds[i].revents = 0 }
            let r = poll(&fds, 2, timeoutMs)
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return }
            for i in 0..<2 where open[i] && fds[i].revents != 0 {
                let n = sockets[i].read(into: buffer.baseAddress!, count: buffer.count)
                if n <= 0 {
                    open[i] = false
                    sockets[1 - i].shutdownWrite()
                    if n < 0 { return }
                    continue
                }
                let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                if i == 0 { transformUp?(chunk) } else { transformDown?(chunk) }
                if !sockets[1 - i].writeAll(chunk.baseAddress!, count: n) { return }
            }
        }
    }
}
