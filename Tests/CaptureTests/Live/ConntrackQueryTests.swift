import XCTest
@testable import Capture
#if canImport(Glibc)
import Glibc
#endif

/// `ConntrackQuery` against the kernel: a real REDIRECTed connection in a scratch netns, checked against what
/// the `conntrack` tool prints for it.
final class ConntrackQueryTests: KernelTestCase {
    func testAsksConntrackForARedirectedConnectionByItsOriginalTuple() throws {
        // 10.9.9.0/24 is routed through the veth; the REDIRECT sends the SYN to lo before it would leave.
        let (ns, _) = try makeNetnsPair("10.9.9.1", "10.9.9.2")
        try ns.run(["ip", "link", "set", "lo", "up"])
        try ns.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.9.9.9", "--dport", "80",
                    "-j", "REDIRECT", "--to-ports", "15001"])
        let original = FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v4: 0x0a09_0901), 40123),
                                 dst: Endpoint(IPAddress(v4: 0x0a09_0909), 80))
        var absent = original
        absent.src.port = 40124
        let v6 = FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v6: 0xfd00 << 48, 1), 40123),
                           dst: Endpoint(IPAddress(v6: 0xfd00 << 48, 2), 80))
        let (answers, query) = try connectAndAsk(ns, original, listenOn: Endpoint(IPAddress(v4: 0x7f00_0001), 15001),
                                                 then: [absent, v6])

        // The kernel's own account of the connection, read with the conntrack tool.
        let listed = try ns.run(["conntrack", "-L", "-p", "tcp", "--orig-dst", "10.9.9.9"]).stdout
        XCTAssertTrue(listed.contains("src=127.0.0.1 dst=10.9.9.1 sport=15001 dport=40123"), "conntrack -L: \(listed)")
        let info = try XCTUnwrap(answers[0], "no answer for \(original); conntrack -L: \(listed)")
        XCTAssertEqual(info.original, original)
        XCTAssertEqual(info.reply, FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v4: 0x7f00_0001), 15001),
                                             dst: Endpoint(IPAddress(v4: 0x0a09_0901), 40123)))
        XCTAssertTrue(info.isDestinationNATed)
        // A tuple conntrack has no entry for, in either family, is "not found", not a malformed query.
        XCTAssertNil(answers[1])
        XCTAssertNil(answers[2])
        XCTAssertEqual(query.asked, 3)
        XCTAssertEqual(query.found, 1)
        XCTAssertEqual(query.notFound, 2)
        XCTAssertEqual(query.failed, 0)
    }

    func testAsksConntrackForARedirectedIPv6Connection() throws {
        let (ns, _) = try makeNetnsPair("10.9.9.1", "10.9.9.2")
        try ns.run(["ip", "link", "set", "lo", "up"])
        try ns.run(["ip", "-6", "addr", "add", "fd00::1/64", "dev", "eth0", "nodad"])
        try ns.run(["ip6tables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00::9", "--dport", "80",
                    "-j", "REDIRECT", "--to-ports", "15001"])
        let prefix: UInt64 = 0xfd00 << 48
        let original = FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v6: prefix, 1), 40123),
                                 dst: Endpoint(IPAddress(v6: prefix, 9), 80))
        let (answers, query) = try connectAndAsk(ns, original, listenOn: Endpoint(IPAddress(v6: 0, 1), 15001), then: [])

        let listed = try ns.run(["conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--orig-dst", "fd00::9"]).stdout
        XCTAssertTrue(listed.contains("src=::1 dst=fd00::1 sport=15001 dport=40123"), "conntrack -L: \(listed)")
        let info = try XCTUnwrap(answers[0], "no answer for \(original); conntrack -L: \(listed)")
        XCTAssertEqual(info.original, original)
        XCTAssertEqual(info.reply, FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v6: 0, 1), 15001),
                                             dst: Endpoint(IPAddress(v6: prefix, 1), 40123)))
        XCTAssertEqual(query.found, 1)
        XCTAssertEqual(query.failed, 0)
    }

    /// Inside `ns`: listens on `listener` (the REDIRECT's target), connects from `original.src` to
    /// `original.dst` and closes, then asks conntrack for `original` and each of `more`.
    /// Something must listen: the kernel kills the entry of a SYN answered by a RST at once, while a closed
    /// connection's entry stays for seconds.
    private func connectAndAsk(_ ns: ScratchNetns, _ original: FiveTuple, listenOn listener: Endpoint,
                               then more: [FiveTuple]) throws -> ([ConntrackInfo?], ConntrackQuery) {
        var answers: [ConntrackInfo?] = []
        var query: ConntrackQuery?
        var threadError: Error?
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            defer { done.signal() }
            do {
                try NetnsThread.enter(ns.ref)
                let server = try Self.socket(bound: listener)
                defer { close(server) }
                guard listen(server, 4) == 0 else { throw Self.failure("listen on \(listener)") }
                let client = try Self.socket(bound: original.src)
                defer { close(client) }
                guard Self.withAddress(original.dst, { connect(client, $0, $1) }) == 0 else {
                    throw Self.failure("connect to \(original.dst) through the REDIRECT")
                }
                let q = try ConntrackQuery()
                answers = ([original] + more).map { q.entry(original: $0) }
                query = q
            } catch { threadError = error }
        }
        thread.start()
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        if let threadError { throw threadError }
        return (answers, try XCTUnwrap(query))
    }

    private static func socket(bound endpoint: Endpoint) throws -> Int32 {
        let fd = Glibc.socket(endpoint.addr.family == .v6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw failure("socket") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard withAddress(endpoint, { bind(fd, $0, $1) }) == 0 else {
            close(fd)
            throw failure("bind \(endpoint)")
        }
        return fd
    }

    private static func withAddress(_ e: Endpoint, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
        if e.addr.family == .v6 {
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_port = e.port.bigEndian
            withUnsafeMutableBytes(of: &a.sin6_addr) { raw in
                raw.storeBytes(of: e.addr.hi.bigEndian, toByteOffset: 0, as: UInt64.self)
                raw.storeBytes(of: e.addr.lo.bigEndian, toByteOffset: 8, as: UInt64.self)
            }
            return withUnsafePointer(to: &a) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
            }
        }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = e.port.bigEndian
        a.sin_addr.s_addr = e.addr.v4Value.bigEndian
        return withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }

    private static func failure(_ what: String) -> MeshtraceError {
        MeshtraceError(.kernelRefused, "\(what): \(String(cString: strerror(errno)))")
    }
}
