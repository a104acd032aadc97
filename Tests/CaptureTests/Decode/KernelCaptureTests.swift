import Foundation
import XCTest
@testable import Capture

/// Captures recorded in the test with tcpdump from real traffic in namespaces (lo, veth, `-i any` SLL and
/// SLL2, `nflog:G` with marks and prefixes, pcapng via editcap), decoded by meshtrace and compared field by
/// field with tshark's decode of the same files, and with what the test itself set up (marks, prefixes, hooks).
final class KernelCaptureTests: KernelTestCase {
    private var dir: URL!
    private var background: [Process] = []

    override func setUpWithError() throws {
        try super.setUpWithError()
        try XCTSkipUnless(Tshark.available && Command.which("tcpdump") != nil, "needs tcpdump and tshark")
        dir = try makeTemporaryDirectory()
    }

    override func tearDown() {
        for p in background where p.isRunning { p.interrupt(); p.waitUntilExit() }
        background.removeAll()
        if let dir { try? FileManager.default.removeItem(at: dir) }
        super.tearDown()
    }

    /// Starts `argv` inside `ns` in the background; stderr goes to a file the caller can poll.
    private func start(_ ns: ScratchNetns, _ argv: [String], log: String) throws -> (Process, URL) {
        let logURL = dir.appendingPathComponent(log)
        XCTAssertTrue(FileManager.default.createFile(atPath: logURL.path, contents: nil), "cannot create a scratch file")
        let p = try Command.start(argv, in: ns.ref, stderr: try FileHandle(forWritingTo: logURL))
        background.append(p)
        return (p, logURL)
    }

    private func waitFor(_ what: String, in log: URL, seconds: Double = 10) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let text = try? String(contentsOf: log, encoding: .utf8), text.contains(what) { return }
            usleep(50_000)
        }
        throw MeshtraceError(.kernelRefused, "timed out waiting for '\(what)' in \(log.lastPathComponent)")
    }

    private func stop(_ p: Process) {
        guard p.isRunning else { return }
        p.interrupt()
        let deadline = Date().addingTimeInterval(5)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
    }

    private static let group = 4242 + Int(getpid() % 1000)

    func testRealCapturesDecodeLikeTshark() throws {
        let a = try makeNetns(), b = try makeNetns()
        let vethA = "mtv\(getpid() % 100000)a", vethB = "mtv\(getpid() % 100000)b"
        try a.run(["ip", "link", "add", vethA, "type", "veth", "peer", "name", vethB, "netns", b.name])
        try a.run(["ip", "addr", "add", "10.77.0.1/24", "dev", vethA])
        try a.run(["ip", "addr", "add", "fd77::1/64", "dev", vethA, "nodad"])
        try a.run(["ip", "link", "set", vethA, "up"])
        try b.run(["ip", "addr", "add", "10.77.0.2/24", "dev", vethB])
        try b.run(["ip", "addr", "add", "fd77::2/64", "dev", vethB, "nodad"])
        try b.run(["ip", "link", "set", vethB, "up"])

        let group = KernelCaptureTests.group
        let outPrefix = "mt:4:mangle:OUTPUT:2:abcd", inPrefix = "mt:4:mangle:INPUT:in:-"
        let out6Prefix = "mt:6:mangle:OUTPUT:2:abcd", in6Prefix = "mt:6:mangle:INPUT:in:-"
        func rules(_ peer: String, _ outP: String, _ inP: String) -> String {
            """
            *mangle
            -A OUTPUT -d \(peer) -j MARK --set-xmark 0x539/0xffffffff
            -A OUTPUT -d \(peer) -j NFLOG --nflog-group \(group) --nflog-prefix "\(outP)"
            -A INPUT -s \(peer) -j NFLOG --nflog-group \(group) --nflog-prefix "\(inP)"
            COMMIT

            """
        }
        try a.run(["iptables-restore", "--noflush"], input: rules("10.77.0.2", outPrefix, inPrefix))
        try a.run(["ip6tables-restore", "--noflush"], input: rules("fd77::2", out6Prefix, in6Prefix))

        let files = ["any": dir.appendingPathComponent("any.pcap").path,
                     "sll2": dir.appendingPathComponent("sll2.pcap").path,
                     "veth": dir.appendingPathComponent("veth.pcap").path,
                     "lo": dir.appendingPathComponent("lo.pcap").path,
                     "nflog": dir.appendingPathComponent("nflog.pcap").path]
        let captures: [(String, [String])] = [
            ("any", ["-i", "any", "-y", "LINUX_SLL"]), ("sll2", ["-i", "any", "-y", "LINUX_SLL2"]), ("veth", ["-i", vethA]),
            ("lo", ["-i", "lo"]), ("nflog", ["-i", "nflog:\(group)"]),
        ]
        var running: [Process] = []
        for (name, args) in captures {
            let (p, log) = try start(a, ["tcpdump", "-n", "-U", "--immediate-mode", "-s", "262144"] + args + ["-w", files[name]!], log: "\(name).log")
            try waitFor("listening on", in: log)
            running.append(p)
        }

        // dumpcap (through tshark) on two interfaces writes one pcapng with an interface block per device.
        let multiPath = dir.appendingPathComponent("multi.pcapng").path
        let (multi, multiLog) = try start(a, ["tshark", "-n", "-q", "-i", "lo", "-i", vethA, "-w", multiPath], log: "multi.log")
        try waitFor("Capturing on", in: multiLog)
        running.append(multi)

        // Real traffic: TCP with data to a listener, TCP and UDP to closed ports (RST, ICMP unreachable), pings;
        // IPv4 and IPv6 over the veth, and a ping on lo.
        let (listener, _) = try start(b, ["timeout", "10", "nc", "-l", "10.77.0.2", "8080"], log: "nc.log")
        usleep(300_000)
        a.attempt(["bash", "-c", "echo hello > /dev/tcp/10.77.0.2/8080"])
        a.attempt(["bash", "-c", "echo x > /dev/tcp/fd77::2/8081"])
        a.attempt(["bash", "-c", "echo x > /dev/udp/10.77.0.2/5353; echo y > /dev/udp/fd77::2/5353"])
        try a.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.77.0.2"])
        try a.run(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", "fd77::2"])
        try a.run(["ping", "-c", "1", "-W", "1", "127.0.0.1"])
        // nfnetlink_log batches messages and flushes a batch after at most 1 s (NFULNL_TIMEOUT_DEFAULT).
        usleep(1_500_000)
        for p in running { stop(p) }
        stop(listener)

        // Cooked `-i any`: SLL with direction and lo detected from ARPHRD_LOOPBACK.
        let any = try DecodedCapture(files["any"]!)
        XCTAssertEqual(any.linkType, LinkType.linuxSLL)
        try assertMatchesTshark(any, files["any"]!, cooked: true)
        XCTAssertTrue(any.records.contains { $0.point.interface == "lo" && $0.point.isLoopback && $0.tuple.dst.addr == IPAddress("127.0.0.1") })
        XCTAssertTrue(any.records.contains { $0.point.interface == "any" && !$0.point.isLoopback && $0.direction == .outbound
            && $0.tuple.dst == Endpoint(IPAddress("10.77.0.2")!, 8080) && $0.tcpFlags == .syn })
        XCTAssertTrue(any.records.contains { $0.tuple.src.port == 8080 && $0.direction == .inbound })

        let sll2 = try DecodedCapture(files["sll2"]!)
        XCTAssertEqual(sll2.linkType, LinkType.linuxSLL2)
        try assertMatchesTshark(sll2, files["sll2"]!, cooked: true)
        // "7: mtv123a@if6: <...": the index before the colon.
        let ifindex = UInt32(try a.run(["ip", "-o", "link", "show", "dev", vethA]).stdout.split(separator: ":")[0])
        XCTAssertTrue(sll2.records.contains { $0.ifindex == ifindex && $0.tuple.dst.port == 8080 })

        let veth = try DecodedCapture(files["veth"]!)
        XCTAssertEqual(veth.linkType, LinkType.ethernet)
        try assertMatchesTshark(veth, files["veth"]!, cooked: false)
        XCTAssertTrue(veth.records.allSatisfy { $0.point.interface == "veth" && !$0.point.isLoopback })

        let lo = try DecodedCapture(files["lo"]!)
        try assertMatchesTshark(lo, files["lo"]!, cooked: false)
        XCTAssertTrue(lo.records.allSatisfy { $0.point.isLoopback })
        XCTAssertFalse(lo.records.isEmpty)

        // NFLOG: prefix, hook, mark, family, tuple, flags.
        let nflog = try DecodedCapture(files["nflog"]!)
        XCTAssertEqual(nflog.linkType, LinkType.nflog)
        try assertMatchesTshark(nflog, files["nflog"]!, cooked: false)
        let rows = try Tshark.fields(files["nflog"]!, ["nflog.prefix", "nflog.hook", "nflog.family", "nflog.res_id",
                                                        "nflog.ifindex_indev", "nflog.ifindex_outdev", "nflog.uid", "nflog.gid"])
        XCTAssertEqual(rows.count, nflog.records.count)
        var sawPrefixes = Set<String>()
        for (r, row) in zip(nflog.records, rows) {
            let m = try XCTUnwrap(r.nflog)
            let prefix = nflog.prefix(r)
            sawPrefixes.insert(prefix)
            XCTAssertEqual(row["nflog.prefix"], prefix)
            XCTAssertEqual(Tshark.int(row["nflog.hook"]), Int(m.hook.rawValue))
            XCTAssertEqual(Tshark.int(row["nflog.res_id"]), group)
            XCTAssertEqual(Int(m.group), group)
            XCTAssertEqual(Tshark.int(row["nflog.family"]) == 10 ? IPAddress.Family.v6 : .v4, r.tuple.src.addr.family)
            XCTAssertEqual(Tshark.int(row["nflog.ifindex_indev"]), m.inputIfindex.map(Int.init))
            XCTAssertEqual(Tshark.int(row["nflog.ifindex_outdev"]), m.outputIfindex.map(Int.init))
            XCTAssertEqual(Tshark.int(row["nflog.uid"]), m.uid.map(Int.init))
            XCTAssertEqual(Tshark.int(row["nflog.gid"]), m.gid.map(Int.init))
            let tag = try XCTUnwrap(nflog.tags.tag(for: m.prefixID), prefix)
            XCTAssertEqual(tag.table, "mangle")
            // What the test set up: OUTPUT packets carry the mark set just before the twin; INPUT ones none.
            switch m.hook {
            case .output:
                XCTAssertEqual(tag.chain, "OUTPUT")
                XCTAssertEqual(m.mark, 0x539)
                XCTAssertEqual(r.direction, .outbound)
                XCTAssertEqual(r.point, .netfilter(.output))
                XCTAssertEqual(m.outputIfindex, ifindex)
            case .input:
                XCTAssertEqual(tag.chain, "INPUT")
                XCTAssertNil(m.mark)
                XCTAssertEqual(r.direction, .inbound)
                XCTAssertEqual(m.inputIfindex, ifindex)
            default:
                XCTFail("unexpected hook \(m.hook)")
            }
            XCTAssertEqual(tag.family == .v6, r.tuple.src.addr.family == .v6)
        }
        XCTAssertEqual(sawPrefixes, [outPrefix, inPrefix, out6Prefix, in6Prefix])
        XCTAssertTrue(nflog.records.contains { $0.tuple.proto == IPProto.tcp && $0.payloadLength == 6 && $0.nflog?.hook == .output })
        XCTAssertTrue(nflog.records.contains { $0.tuple.proto == IPProto.icmpv6 && $0.icmpType == 129 && $0.nflog?.hook == .input },
                      nflog.records.map { "\($0.nflog!.hook) \($0.tuple) \($0.icmpType) \($0.notes.descriptions)" }.joined(separator: "; "))

        // pcapng written by editcap: the same records as the pcap it came from.
        for name in ["any", "nflog"] {
            let ng = dir.appendingPathComponent("\(name).pcapng").path
            let r = try Command.run(["editcap", "-F", "pcapng", files[name]!, ng])
            XCTAssertTrue(r.ok, r.stderr)
            let original = try DecodedCapture(files[name]!)
            let converted = try DecodedCapture(ng, interface: name == "any" ? "any" : nil)
            XCTAssertNil(converted.damage)
            XCTAssertEqual(converted.records.count, original.records.count)
            for (x, y) in zip(original.records, converted.records) {
                XCTAssertEqual(x.time, y.time)
                XCTAssertEqual(x.tuple, y.tuple)
                XCTAssertEqual(x.tcpFlags, y.tcpFlags)
                XCTAssertEqual(x.point, y.point)
                XCTAssertEqual(x.nflog, y.nflog)
                XCTAssertEqual(x.notes, y.notes)
            }
            try assertMatchesTshark(converted, ng, cooked: name == "any")
        }

        // Per-packet interface names from the pcapng interface blocks, as tshark reports them.
        let multiCapture = try DecodedCapture(multiPath)
        XCTAssertNil(multiCapture.damage)
        let names = try Tshark.fields(multiPath, ["frame.interface_name"]).map { $0["frame.interface_name"]! }
        XCTAssertEqual(multiCapture.records.map(\.point.interface), names)
        XCTAssertEqual(Set(names), ["lo", vethA])
        XCTAssertTrue(multiCapture.records.allSatisfy { $0.point.isLoopback == ($0.point.interface == "lo") })
        try assertMatchesTshark(multiCapture, multiPath, cooked: false)

        // Several files of one node merged: every frame once, in time order. A capture file need not be in time
        // order itself (a ring fed by two CPUs can hold a packet stamped on one after a later-stamped one from the
        // other), and CI saw the merged stream go back once, so the merge is held to what a merge can do: it goes
        // back only where the file the record comes from went back.
        let merged = try MergedSource(paths: [files["any"]!, files["nflog"]!, files["veth"]!], tags: RuleTagTable())
        var rec = PacketRecord()
        var last = Timestamp.zero
        var lastOf = [Timestamp.zero, .zero, .zero]
        var perSource = [0, 0, 0]
        while merged.next(into: &rec) != nil {
            let source = Int(rec.ref.source)
            XCTAssertFalse(rec.time < last && !(rec.time < lastOf[source]),
                           "merged stream goes back in time (\(rec.time) after \(last)) where file \(source) did not")
            last = rec.time
            lastOf[source] = rec.time
            perSource[source] += 1
            XCTAssertEqual(merged.currentLinkType, [LinkType.linuxSLL, LinkType.nflog, LinkType.ethernet][source])
        }
        XCTAssertEqual(perSource, [any.records.count, nflog.records.count, veth.records.count])
        XCTAssertNil(merged.damage)
    }

    /// Every record against tshark's decode of the same frame.
    private func assertMatchesTshark(_ c: DecodedCapture, _ path: String, cooked: Bool,
                                     file: StaticString = #filePath, line: UInt = #line) throws {
        var names = ["frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "ip.proto", "ipv6.nxt",
                     "ip.id", "ip.ttl", "ipv6.hlim", "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport",
                     "tcp.flags", "tcp.seq_raw", "tcp.ack_raw", "tcp.len", "icmp.type", "icmp.code", "icmpv6.type",
                     "icmp.ident", "icmpv6.echo.identifier"]
        if cooked { names += ["sll.pkttype"] }
        let rows = try Tshark.fields(path, names)
        XCTAssertEqual(rows.count, c.records.count, "frames in \(path)", file: file, line: line)
        for (r, row) in zip(c.records, rows) {
            let at = "\(path) frame \(r.ref.frame)"
            XCTAssertEqual(Tshark.epoch(row["frame.time_epoch"]!), r.time, at, file: file, line: line)
            XCTAssertEqual(Tshark.int(row["frame.len"]), Int(r.wireLength), at, file: file, line: line)
            let v6 = !(row["ipv6.src"] ?? "").isEmpty
            let src = v6 ? row["ipv6.src"]! : row["ip.src"]!
            let dst = v6 ? row["ipv6.dst"]! : row["ip.dst"]!
            XCTAssertEqual(src, r.isIP ? r.tuple.src.addr.description : "", at, file: file, line: line)
            XCTAssertEqual(dst, r.isIP ? r.tuple.dst.addr.description : "", at, file: file, line: line)
            guard r.isIP else { continue }
            // tshark's ipv6.nxt is the fixed header's; meshtrace's proto is the one after the extension headers.
            if !r.notes.contains(.ipv6ExtensionHeaders) {
                XCTAssertEqual(Tshark.int(v6 ? row["ipv6.nxt"] : row["ip.proto"]), Int(r.tuple.proto), at, file: file, line: line)
            }
            XCTAssertEqual(Tshark.int(v6 ? row["ipv6.hlim"] : row["ip.ttl"]), Int(r.ttl), at, file: file, line: line)
            if !v6 { XCTAssertEqual(Tshark.int(row["ip.id"]), Int(r.ipID), at, file: file, line: line) }
            switch r.tuple.proto {
            case IPProto.tcp:
                XCTAssertEqual(Tshark.int(row["tcp.srcport"]), Int(r.tuple.src.port), at, file: file, line: line)
                XCTAssertEqual(Tshark.int(row["tcp.dstport"]), Int(r.tuple.dst.port), at, file: file, line: line)
                XCTAssertEqual(Tshark.int(row["tcp.flags"]).map { UInt8($0 & 0x3f) }, r.tcpFlags.rawValue, at, file: file, line: line)
                XCTAssertEqual(Tshark.int(row["tcp.seq_raw"]), Int(r.tcpSeq), at, file: file, line: line)
                XCTAssertEqual(Tshark.int(row["tcp.ack_raw"]), Int(r.tcpAck), at, file: file, line: line)
                XCTAssertEqual(Tshark.int(row["tcp.len"]), Int(r.payloadLength), at, file: file, line: line)
            case IPProto.udp:
                XCTAssertEqual(Tshark.int(row["udp.srcport"]), Int(r.tuple.src.port), at, file: file, line: line)
                XCTAssertEqual(Tshark.int(row["udp.dstport"]), Int(r.tuple.dst.port), at, file: file, line: line)
            case IPProto.icmp, IPProto.icmpv6:
                let type = Tshark.int(v6 ? row["icmpv6.type"] : row["icmp.type"])
                XCTAssertEqual(type, Int(r.icmpType), at, file: file, line: line)
                XCTAssertEqual(Int(r.tuple.src.port >> 8), type, at, file: file, line: line)
                if let id = Tshark.int(v6 ? row["icmpv6.echo.identifier"] : row["icmp.ident"]) {
                    XCTAssertEqual(Int(r.tuple.dst.port), id, at, file: file, line: line)
                }
            default: break
            }
            if cooked {
                XCTAssertEqual(Tshark.int(row["sll.pkttype"]) == 4 ? PacketDirection.outbound : .inbound, r.direction, at, file: file, line: line)
            }
            XCTAssertTrue(r.notes.isDisjoint(with: [.truncatedIP, .truncatedTransport, .badIPHeader, .badNflogTLV, .badTransportHeader]),
                          "\(at): \(r.notes.descriptions)", file: file, line: line)
        }
    }
}
