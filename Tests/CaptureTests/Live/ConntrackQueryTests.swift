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
        // Written by the thread below before `done`, read here after it.
        final class Outcome: @unchecked Sendable {
            var answers: [ConntrackInfo?] = []
            var query: ConntrackQuery?
            var threadError: Error?
        }
        let out = Outcome()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            defer { done.signal() }
            do {
                try NetnsThread.enter(ns.ref)
                let server = try LabSocket.tcpListener(port: listener.port, family: listener.addr.family, mark: nil,
                                                       host: listener.addr)
                defer { server.close() }
                let client = try LabSocket.tcpConnect(to: original.dst, from: original.src)
                defer { client.close() }
                let q = try ConntrackQuery()
                out.answers = ([original] + more).map { q.entry(original: $0) }
                out.query = q
            } catch { out.threadError = error }
        }
        thread.start()
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        if let threadError = out.threadError { throw threadError }
        return (out.answers, try XCTUnwrap(out.query))
    }
}
