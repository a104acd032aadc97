import CNflog
import Foundation
import XCTest
@testable import Capture

/// Live nfnetlink_log messages with NFULNL_CFG_F_CONNTRACK, read from a raw libnetfilter_log socket in a
/// namespace and decoded with `decodeNflogAttributes` (the entry point the live tracer uses). The truth for
/// NFULA_CT is `conntrack -L` in the same namespace; for the rest, the rules and traffic the test made.
final class LiveNflogDecodeTests: KernelTestCase {
    private var listener: Process?

    override func tearDown() {
        if let l = listener, l.isRunning { l.interrupt(); l.waitUntilExit() }
        super.tearDown()
    }

    /// Sets up the REDIRECT path of AMBIENT.md in miniature: the app's connection to 10.88.0.2:80 is redirected
    /// to a listener on 15001, its packets marked 0x539 and its connection 0x111, and logged after NAT on lo.
    private func redirectScenario(group: Int, prefix: String) throws -> ScratchNetns {
        let ns = try makeNetns()
        try ns.run(["ip", "link", "add", "mtd0", "type", "veth", "peer", "name", "mtd1"])
        try ns.run(["ip", "addr", "add", "10.88.0.1/24", "dev", "mtd0"])
        try ns.run(["ip", "link", "set", "mtd0", "up"])
        try ns.run(["ip", "link", "set", "mtd1", "up"])
        try ns.run(["iptables-restore", "--noflush"], input: """
            *nat
            -A OUTPUT -d 10.88.0.2/32 -p tcp --dport 80 -j REDIRECT --to-ports 15001
            COMMIT
            *mangle
            -A OUTPUT -d 10.88.0.2/32 -p tcp -j CONNMARK --set-xmark 0x111/0xfff
            -A OUTPUT -d 10.88.0.2/32 -p tcp -j MARK --set-xmark 0x539/0xffffffff
            -A POSTROUTING -o lo -p tcp --dport 15001 -j NFLOG --nflog-group \(group) --nflog-prefix "\(prefix)"
            COMMIT

            """)
        return ns
    }

    private func runRedirectedConnection(_ ns: ScratchNetns) throws {
        listener = try Command.start(["timeout", "5", "nc", "-l", "15001"], in: ns.ref)
        usleep(300_000)
        ns.attempt(["bash", "-c", "exec 3<>/dev/tcp/10.88.0.2/80; echo hello >&3; sleep 0.2"])
    }

    func testLiveNflogMessagesDecodeThroughTheLiveEntryPoint() throws {
        try XCTSkipUnless(Command.which("nc") != nil, "needs nc")
        let group = 5200 + Int(getpid() % 700)
        let prefix = "mt:4:mangle:POSTROUTING:1:-"
        let ns = try redirectScenario(group: group, prefix: prefix)
        let socket = try NflogTestSocket(netns: ns.name, group: UInt16(group))
        defer { socket.close() }
        try runRedirectedConnection(ns)

        let tags = RuleTagTable()
        var decoder = PacketDecoder(tags: tags)
        var records: [PacketRecord] = []
        let deadline = Date().addingTimeInterval(5)
        while records.count < 3 && Date() < deadline {
            socket.receive { family, group, attributes in
                var r = PacketRecord()
                decoder.decodeNflogAttributes(attributes, family: family, group: group, byteOrder: .host, into: &r)
                records.append(r)
            }
        }
        XCTAssertGreaterThanOrEqual(records.count, 3, "SYN, data and more from the app leg")
        for r in records {
            XCTAssertEqual(r.notes, [], r.notes.descriptions.joined(separator: ", "))
            let m = try XCTUnwrap(r.nflog)
            XCTAssertEqual(Int(m.group), group)
            XCTAssertEqual(m.hook, .postrouting)
            XCTAssertEqual(r.point, .netfilter(.postrouting))
            XCTAssertEqual(r.direction, .outbound)
            XCTAssertEqual(tags.text(for: m.prefixID), prefix)
            XCTAssertEqual(tags.tag(for: m.prefixID)?.chain, "POSTROUTING")
            XCTAssertEqual(m.mark, 0x539)
            XCTAssertNotNil(m.sequence, "NFULNL_CFG_F_SEQ was set")
            XCTAssertEqual(r.tuple.dst, Endpoint(IPAddress("127.0.0.1")!, 15001), "the packet as it is after NAT")
            XCTAssertEqual(r.tuple.src.addr, IPAddress("10.88.0.1"))
            XCTAssertGreaterThan(r.wireLength, 0)
            if socket.conntrackEnabled {
                let ct = try XCTUnwrap(m.conntrack)
                XCTAssertEqual(ct.original.dst, Endpoint(IPAddress("10.88.0.2")!, 80))
            } else {
                XCTAssertNil(m.conntrack)
            }
        }
        XCTAssertTrue(records.contains { $0.tcpFlags == .syn })
        XCTAssertTrue(records.contains { $0.payloadLength == 6 })
        let sequences = records.compactMap { $0.nflog?.sequence }
        XCTAssertEqual(sequences, Array(sequences[0]..<(sequences[0] + UInt32(sequences.count))), "no gaps")
    }

    /// NFULA_CT carries ctnetlink's attributes. Kernels without CONFIG_NETFILTER_NETLINK_GLUE_CT (this
    /// machine's) refuse NFULNL_CFG_F_CONNTRACK, so the same attributes are taken from a ctnetlink dump of
    /// the namespace's table and checked against `conntrack -L`.
    func testCtnetlinkAttributesDecodeLikeTheConntrackTool() throws {
        try XCTSkipUnless(Command.which("conntrack") != nil && Command.which("nc") != nil, "needs conntrack and nc")
        let ns = try redirectScenario(group: 5900 + Int(getpid() % 90), prefix: "x")
        try runRedirectedConnection(ns)
        let entries = try CtnetlinkDump.entries(netns: ns.name)
        let table = try ns.run(["conntrack", "-L", "-o", "id"]).stdout
        let redirected = entries.filter { $0.original.dst == Endpoint(IPAddress("10.88.0.2")!, 80) }
        XCTAssertEqual(redirected.count, 1, "\(entries)")
        XCTAssertEqual(entries.count, table.split(separator: "\n").count)
        for ct in entries {
            let line = try XCTUnwrap(table.split(separator: "\n").first { $0.contains("id=\(ct.id)") },
                                     "conntrack -L has no entry id=\(ct.id)\n\(table)")
            // "tcp 6 119 TIME_WAIT src=10.88.0.1 dst=10.88.0.2 sport=S dport=80 src=127.0.0.1 dst=10.88.0.1
            //  sport=15001 dport=S [ASSURED] mark=273 use=1 id=N"
            let words = line.split(separator: " ")
            let fields = words.filter { $0.contains("=") }.map { $0.split(separator: "=", maxSplits: 1) }
            func all(_ key: String) -> [String] { fields.filter { $0[0] == key }.map { String($0[1]) } }
            XCTAssertEqual(Int(words[1]), Int(ct.original.proto))
            XCTAssertEqual(all("src"), [ct.original.src.addr.description, ct.reply.src.addr.description])
            XCTAssertEqual(all("dst"), [ct.original.dst.addr.description, ct.reply.dst.addr.description])
            if ct.original.proto == IPProto.tcp || ct.original.proto == IPProto.udp {
                XCTAssertEqual(all("sport"), ["\(ct.original.src.port)", "\(ct.reply.src.port)"])
                XCTAssertEqual(all("dport"), ["\(ct.original.dst.port)", "\(ct.reply.dst.port)"])
            }
            XCTAssertEqual(all("mark").first.flatMap { UInt32($0) } ?? 0, ct.mark)
            XCTAssertEqual(all("zone").first.flatMap { UInt16($0) } ?? 0, ct.zone)
        }
        let ct = try XCTUnwrap(redirected.first)
        XCTAssertEqual(ct.reply.src, Endpoint(IPAddress("127.0.0.1")!, 15001))
        XCTAssertTrue(ct.isDestinationNATed)
        XCTAssertEqual(ct.mark, 0x111)
        XCTAssertNotEqual(ct.status & 0x20, 0, "IPS_DST_NAT_DONE")
    }
}

/// Dumps a namespace's conntrack table over raw ctnetlink (IPCTNL_MSG_CT_GET with NLM_F_DUMP).
enum CtnetlinkDump {
    static func entries(netns: String) throws -> [ConntrackInfo] {
        let fd = try NflogTestSocket.inNetns(netns) { socket(16 /* AF_NETLINK */, Int32(SOCK_RAW.rawValue), 12 /* NETLINK_NETFILTER */) }
        guard fd >= 0 else { throw MeshtraceError(.kernelRefused, "netlink socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        // nlmsghdr (host order) + nfgenmsg: family AF_UNSPEC dumps both families.
        var request = [UInt8](repeating: 0, count: 20)
        request.withUnsafeMutableBytes { b in
            b.storeBytes(of: UInt32(20), toByteOffset: 0, as: UInt32.self)
            b.storeBytes(of: UInt16(1 << 8 | 1), toByteOffset: 4, as: UInt16.self)  // CTNETLINK, IPCTNL_MSG_CT_GET
            b.storeBytes(of: UInt16(0x1 | 0x300), toByteOffset: 6, as: UInt16.self) // NLM_F_REQUEST | NLM_F_DUMP
            b.storeBytes(of: UInt32(1), toByteOffset: 8, as: UInt32.self)
        }
        guard send(fd, request, request.count, 0) == request.count else {
            throw MeshtraceError(.kernelRefused, "ctnetlink dump request: \(String(cString: strerror(errno)))")
        }
        var out: [ConntrackInfo] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        for _ in 0..<100 {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { throw MeshtraceError(.kernelRefused, "ctnetlink dump: no answer") }
            var offset = 0
            var done = false
            try buffer.withUnsafeBytes { b in
                while offset + 16 <= n {
                    let length = Int(b.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
                    let type = b.loadUnaligned(fromByteOffset: offset + 4, as: UInt16.self)
                    guard length >= 16, offset + length <= n else { throw MeshtraceError(.kernelRefused, "bad netlink message") }
                    if type == 3 { done = true } // NLMSG_DONE
                    if type == 2 { throw MeshtraceError(.kernelRefused, "ctnetlink dump refused") } // NLMSG_ERROR
                    if type == 1 << 8 { // IPCTNL_MSG_CT_NEW
                        let attrs = UnsafeRawBufferPointer(rebasing: b[(offset + 20)..<(offset + length)])
                        guard let ct = ConntrackInfo(ctnetlinkAttributes: attrs) else {
                            throw MeshtraceError(.badInput, "undecodable ctnetlink entry")
                        }
                        out.append(ct)
                    }
                    offset += (length + 3) & ~3
                }
            }
            if done { return out }
        }
        throw MeshtraceError(.kernelRefused, "ctnetlink dump did not end")
    }
}

/// A bare nfnetlink_log socket bound inside a namespace: created with setns on this thread, then the thread
/// goes back to its own namespace (the socket stays in the one it was created in).
final class NflogTestSocket {
    private var handle: OpaquePointer?
    private var groupHandle: OpaquePointer?
    private let fd: Int32
    private var buffer = [UInt8](repeating: 0, count: 1 << 17)

    /// False when the kernel refused NFULNL_CFG_F_CONNTRACK (built without CONFIG_NETFILTER_NETLINK_GLUE_CT).
    private(set) var conntrackEnabled = true

    /// setns(2) is a GNU extension the Glibc module does not import.
    private static let setns: @convention(c) (Int32, Int32) -> Int32 = unsafeBitCast(dlsym(nil, "setns")!, to: (@convention(c) (Int32, Int32) -> Int32).self)

    /// Runs `body` with this thread inside `netns`, then returns the thread to its own namespace.
    static func inNetns<T>(_ netns: String, _ body: () throws -> T) throws -> T {
        let cloneNewNet: Int32 = 0x4000_0000
        let home = open("/proc/thread-self/ns/net", O_RDONLY)
        let target = open("/var/run/netns/\(netns)", O_RDONLY)
        defer { Glibc.close(home); Glibc.close(target) }
        guard home >= 0, target >= 0, setns(target, cloneNewNet) == 0 else {
            throw MeshtraceError(.noSuchNetns, "cannot enter \(netns)")
        }
        defer { precondition(setns(home, cloneNewNet) == 0, "could not return to the test's netns") }
        return try body()
    }

    init(netns: String, group: UInt16) throws {
        let (h, gh) = try NflogTestSocket.inNetns(netns) { () throws -> (OpaquePointer, OpaquePointer) in
            guard let h = nflog_open() else { throw MeshtraceError(.kernelRefused, "nflog_open failed") }
            guard let gh = nflog_bind_group(h, group) else {
                nflog_close(h)
                throw MeshtraceError(.nflogGroupBusy, "group \(group) busy")
            }
            return (h, gh)
        }
        handle = h
        groupHandle = gh
        guard nflog_set_mode(gh, UInt8(NFULNL_COPY_PACKET), 0xffff) >= 0 else {
            throw MeshtraceError(.kernelRefused, "nflog copy mode refused: \(String(cString: strerror(errno)))")
        }
        if nflog_set_flags(gh, UInt16(NFULNL_CFG_F_CONNTRACK | NFULNL_CFG_F_SEQ)) < 0 {
            conntrackEnabled = false
            guard nflog_set_flags(gh, UInt16(NFULNL_CFG_F_SEQ)) >= 0 else {
                throw MeshtraceError(.kernelRefused, "NFULNL_CFG_F_SEQ refused: \(String(cString: strerror(errno)))")
            }
        }
        fd = nflog_fd(h)
        var timeout = timeval(tv_sec: 0, tv_usec: 300_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// One recv; calls `each` with (family, group, TLVs) for every NFULNL_MSG_PACKET in it.
    func receive(_ each: (UInt8, UInt16, UnsafeRawBufferPointer) -> Void) {
        buffer.withUnsafeMutableBytes { buf in
            let n = recv(fd, buf.baseAddress, buf.count, 0)
            guard n > 0 else { return }
            var offset = 0
            while offset + 20 <= n {
                let length = Int(buf.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
                let type = buf.loadUnaligned(fromByteOffset: offset + 4, as: UInt16.self)
                guard length >= 20, offset + length <= n else { return }
                if type == UInt16(NFNL_SUBSYS_ULOG << 8) | UInt16(NFULNL_MSG_PACKET.rawValue) {
                    let family = buf[offset + 16]
                    let group = UInt16(buf[offset + 18]) << 8 | UInt16(buf[offset + 19])
                    each(family, group, UnsafeRawBufferPointer(rebasing: buf[(offset + 20)..<(offset + length)]))
                }
                offset += (length + 3) & ~3
            }
        }
    }

    func close() {
        if let gh = groupHandle { nflog_unbind_group(gh) }
        if let h = handle { nflog_close(h) }
        groupHandle = nil
        handle = nil
    }
}
