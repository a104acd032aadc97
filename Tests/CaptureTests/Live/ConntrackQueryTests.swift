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
        var answers: (found: ConntrackInfo?, missing: ConntrackInfo?, missingV6: ConntrackInfo?)
        var counts: (asked: UInt64, found: UInt64, notFound: UInt64, failed: UInt64) = (0, 0, 0, 0)
        var threadError: Error?
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            defer { done.signal() }
            do {
                try NetnsThread.enter(ns.ref)
                // Something listens on 15001 (a connection refused at once would not do: the kernel kills the
                // entry of a SYN answered by a RST). The closed connection's entry stays for seconds.
                let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                defer { close(listener) }
                var listen15001 = sockaddr_in()
                listen15001.sin_family = sa_family_t(AF_INET); listen15001.sin_port = UInt16(15001).bigEndian
                listen15001.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
                let size = socklen_t(MemoryLayout<sockaddr_in>.size)
                guard withUnsafePointer(to: &listen15001, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, size) } }) == 0,
                      listen(listener, 4) == 0 else {
                    throw MeshtraceError(.kernelRefused, "listen on 127.0.0.1:15001: \(String(cString: strerror(errno)))")
                }
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                defer { close(fd) }
                var local = sockaddr_in(), remote = sockaddr_in()
                local.sin_family = sa_family_t(AF_INET); local.sin_port = UInt16(40123).bigEndian
                local.sin_addr.s_addr = UInt32(0x0a09_0901).bigEndian
                remote.sin_family = sa_family_t(AF_INET); remote.sin_port = UInt16(80).bigEndian
                remote.sin_addr.s_addr = UInt32(0x0a09_0909).bigEndian
                guard withUnsafePointer(to: &local, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, size) } }) == 0 else {
                    throw MeshtraceError(.kernelRefused, "bind: \(String(cString: strerror(errno)))")
                }
                guard withUnsafePointer(to: &remote, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, size) } }) == 0 else {
                    throw MeshtraceError(.kernelRefused, "connect through the REDIRECT: \(String(cString: strerror(errno)))")
                }
                let query = try ConntrackQuery()
                answers.found = query.entry(original: original)
                var absent = original
                absent.src.port = 40124
                answers.missing = query.entry(original: absent)
                let v6 = FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v6: 0xfd00 << 48, 1), 40123),
                                   dst: Endpoint(IPAddress(v6: 0xfd00 << 48, 2), 80))
                answers.missingV6 = query.entry(original: v6)
                counts = (query.asked, query.found, query.notFound, query.failed)
            } catch { threadError = error }
        }
        thread.start()
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        if let threadError { throw threadError }

        // The kernel's own account of the connection, read with the conntrack tool.
        let listed = try ns.run(["conntrack", "-L", "-p", "tcp", "--orig-dst", "10.9.9.9"]).stdout
        XCTAssertTrue(listed.contains("src=127.0.0.1 dst=10.9.9.1 sport=15001 dport=40123"), "conntrack -L: \(listed)")
        let info = try XCTUnwrap(answers.found, "no answer for \(original); conntrack -L: \(listed)")
        XCTAssertEqual(info.original, original)
        XCTAssertEqual(info.reply, FiveTuple(proto: IPProto.tcp, src: Endpoint(IPAddress(v4: 0x7f00_0001), 15001),
                                             dst: Endpoint(IPAddress(v4: 0x0a09_0901), 40123)))
        XCTAssertTrue(info.isDestinationNATed)
        // A tuple conntrack has no entry for, in either family, is "not found", not a malformed query.
        XCTAssertNil(answers.missing)
        XCTAssertNil(answers.missingV6)
        XCTAssertEqual(counts.asked, 3)
        XCTAssertEqual(counts.found, 1)
        XCTAssertEqual(counts.notFound, 2)
        XCTAssertEqual(counts.failed, 0)
    }
}
