import Foundation
import XCTest
@testable import Capture

/// The hot path allocates nothing per packet. Counted with glibc's malloc tracer: the test re-runs this
/// test binary with libc_malloc_debug preloaded, the child turns tracing on (mtrace) around the loop only,
/// and the parent counts the traced allocations. A control phase that allocates per iteration shows the
/// counter sees allocations, so the zero results can fail.
final class AllocationTests: XCTestCase {
    private static let phaseVariable = "MESHTRACE_ALLOC_PHASE"
    private static let mallocDebug = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
    private static let iterations = 100_000
    /// Packets in the files the reading phases go through (building bigger files in a debug build is slow).
    private static let filePackets = 20_000

    /// The malloc tracer to preload and a scratch folder for the children's traces (removed after `body`); skips
    /// when this glibc has no libc_malloc_debug, and in the child runs.
    private func withMallocTracer(_ body: (String, URL) throws -> Void) throws {
        try XCTSkipIf(ProcessInfo.processInfo.environment[AllocationTests.phaseVariable] != nil)
        let preload = [AllocationTests.mallocDebug, "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0",
                       "/lib/aarch64-linux-gnu/libc_malloc_debug.so.0"].first { FileManager.default.fileExists(atPath: $0) }
        try XCTSkipUnless(preload != nil, "glibc's libc_malloc_debug.so is not installed")
        let dir = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        try body(preload!, dir)
    }

    func testDecodingAndReadingDoNotAllocatePerPacket() throws { try withMallocTracer { preload, dir in
        let control = try allocations(phase: "control", preload: preload, dir: dir)
        XCTAssertGreaterThanOrEqual(control, 1000, "the control loop allocates once per iteration: the counter must see it")
        for phase in ["decode", "file", "merged", "pcapng"] {
            let n = try allocations(phase: phase, preload: preload, dir: dir)
            // A few allocations from other threads may land in the window; one per packet would be 100k.
            XCTAssertLessThan(n, 100, "\(phase): \(n) allocations while handling \(phase == "decode" ? AllocationTests.iterations : AllocationTests.filePackets) packets")
        }
    } }

    /// A live trace emits connections in bursts (a sweep's worth at a time) and opens them steadily: with live
    /// options, the emitted connections' event arrays are reused by the next ones, so the arrays (over 3 KB each,
    /// from glibc's bins) are not allocated again per connection. The control is the same stream with at most 64
    /// arrays kept, the file default: most connections allocate theirs, and grow it once.
    func testLiveCorrelatorReusesEventArraysAcrossSweeps() throws { try withMallocTracer { preload, dir in
        let capped = try allocations(phase: "events-capped", preload: preload, dir: dir, minimumBytes: 3000)
        let live = try allocations(phase: "events-live", preload: preload, dir: dir, minimumBytes: 3000)
        XCTAssertGreaterThan(capped, 500, "the control: 1000 connections with at most 64 arrays kept")
        XCTAssertLessThan(live, 50, "live: \(live) event arrays allocated for 1000 connections (control: \(capped))")
    } }

    /// A SYN nobody answers (a scan, a flood, a capture of one direction) makes a connection that stays until the
    /// idle timeout: it gets room for a few events, not the 3.3 KB of 32 (~4.9 KB a connection in all, 4.7 GB for a
    /// million SYNs in a second of capture). The control is the same connections answered and carried on: their
    /// arrays grow past 3000 bytes.
    func testNeverAnsweredConnectionsHoldSmallEventArrays() throws { try withMallocTracer { preload, dir in
        let answered = try allocations(phase: "syn-answered", preload: preload, dir: dir, minimumBytes: 3000)
        let bare = try allocations(phase: "syn-only", preload: preload, dir: dir, minimumBytes: 3000)
        XCTAssertGreaterThan(answered, 500, "the control: 1000 connections of 20 packets each")
        XCTAssertLessThan(bare, 50, "\(bare) event arrays of 3000 bytes or more for 1000 SYNs nobody answered (control: \(answered))")
    } }

    private func allocations(phase: String, preload: String, dir: URL, minimumBytes: Int = 0) throws -> Int {
        let trace = dir.appendingPathComponent("mtrace.\(phase)")
        let binary = CommandLine.arguments[0]
        let r = try Command.run(["env", "LD_PRELOAD=\(preload)", "MALLOC_TRACE=\(trace.path)",
                                 "\(AllocationTests.phaseVariable)=\(phase)", "MESHTRACE_ALLOC_DIR=\(dir.path)",
                                 binary, "CaptureTests.AllocationTests/testChildLoopUnderMallocTrace"])
        XCTAssertTrue(r.ok, "child \(phase) failed: \(r.stdout.suffix(2000)) \(r.stderr.suffix(2000))")
        XCTAssertTrue(r.stdout.contains("traced \(phase)") || r.stderr.contains("traced \(phase)"), "child \(phase) did not run its loop")
        let text = try String(contentsOf: trace, encoding: .utf8)
        // mtrace lines: "@ caller + 0xADDR 0xSIZE" for malloc, "< / >" pairs for realloc, "- 0xADDR" for free.
        return text.split(separator: "\n").filter { line in
            guard line.contains(" + ") || line.contains(" > ") else { return false }
            guard minimumBytes > 0 else { return true }
            // The size is the line's last field, in hex.
            guard let size = line.split(separator: " ").last.flatMap({ Int($0.dropFirst(2), radix: 16) }) else { return false }
            return size >= minimumBytes
        }.count
    }

    /// Runs only as the child of the test above.
    func testChildLoopUnderMallocTrace() throws {
        guard let phase = ProcessInfo.processInfo.environment[AllocationTests.phaseVariable],
              let dir = ProcessInfo.processInfo.environment["MESHTRACE_ALLOC_DIR"] else {
            throw XCTSkip("runs as the child of testDecodingAndReadingDoNotAllocatePerPacket")
        }
        typealias Toggle = @convention(c) () -> Void
        typealias VersionedLookup = @convention(c) (UnsafeMutableRawPointer?, UnsafePointer<CChar>, UnsafePointer<CChar>) -> UnsafeMutableRawPointer?
        // Since glibc 2.34 libc's own mtrace is a stub (the default symbol version); the working one is the
        // preloaded libc_malloc_debug's non-default mtrace@GLIBC_2.2.5, which only dlvsym on its handle finds.
        guard let preload = ProcessInfo.processInfo.environment["LD_PRELOAD"],
              let handle = dlopen(preload, RTLD_NOW | RTLD_NOLOAD),
              let dlvsymAddress = dlsym(nil, "dlvsym") else {
            XCTFail("libc_malloc_debug is not loaded")
            return
        }
        let dlvsym = unsafeBitCast(dlvsymAddress, to: VersionedLookup.self)
        guard let on = dlvsym(handle, "mtrace", "GLIBC_2.2.5"), let off = dlvsym(handle, "muntrace", "GLIBC_2.2.5") else {
            XCTFail("no mtrace in libc_malloc_debug")
            return
        }
        let mtrace = unsafeBitCast(on, to: Toggle.self), muntrace = unsafeBitCast(off, to: Toggle.self)
        let frames = AllocationTests.sampleFrames()
        let tags = RuleTagTable()
        var decoder = PacketDecoder(tags: tags)
        var record = PacketRecord()
        var checksum: UInt64 = 0
        switch phase {
        case "control":
            var kept = 0
            mtrace()
            for i in 0..<5000 {
                let boxed = [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 64 + i % 7)
                kept &+= boxed.count
            }
            muntrace()
            checksum = UInt64(kept)
        case "decode":
            for (lt, f) in frames { f.withUnsafeBytes { decoder.decode(linkType: lt, bytes: $0, wireLength: UInt32(f.count), into: &record) } }
            let buffers = frames.map { (lt, f) -> (Int32, UnsafeRawBufferPointer) in
                let p = UnsafeMutableRawBufferPointer.allocate(byteCount: f.count, alignment: 8)
                p.copyBytes(from: f)
                return (lt, UnsafeRawBufferPointer(p))
            }
            mtrace()
            for i in 0..<AllocationTests.iterations {
                let (lt, b) = buffers[i % buffers.count]
                decoder.decode(linkType: lt, bytes: b, wireLength: UInt32(b.count), into: &record)
                checksum &+= UInt64(record.tuple.dst.port) &+ UInt64(record.nflog?.prefixID ?? 0)
            }
            muntrace()
        case "pcapng":
            var b = PcapngFileBuilder()
            b.addInterface(linkType: 113, name: "eth0")
            b.addInterface(linkType: 239, name: "nf:OUTPUT", tsresol: 9)
            for i in 0..<(AllocationTests.filePackets / 2) {
                b.addPacket(interface: 0, units: UInt64(i * 2), frames[1].1)
                b.addPacket(interface: 1, units: UInt64(i * 2 + 1) * 1000, frames.last!.1)
            }
            let source = try PcapFileSource(path: try b.write(URL(fileURLWithPath: dir), "mixed.pcapng"), tags: tags)
            _ = source.next(into: &record)
            _ = source.next(into: &record)
            mtrace()
            while let bytes = source.next(into: &record) {
                checksum &+= UInt64(bytes.count) &+ UInt64(record.tuple.src.port)
            }
            muntrace()
        case "file", "merged":
            var sll = PcapFileBuilder(linkType: 113)
            var nflog = PcapFileBuilder(linkType: 239)
            for i in 0..<(AllocationTests.filePackets / 2) {
                sll.add(frames[1].1, fraction: UInt32(i * 2))
                nflog.add(frames.last!.1, fraction: UInt32(i * 2 + 1))
            }
            let paths = [try sll.write(URL(fileURLWithPath: dir), "sll.pcap"), try nflog.write(URL(fileURLWithPath: dir), "nflog.pcap")]
            let source: PacketSource = phase == "file" ? try PcapFileSource(path: paths[1], tags: tags)
                                                       : try MergedSource(paths: paths, tags: tags)
            _ = source.next(into: &record)
            mtrace()
            while let bytes = source.next(into: &record) {
                checksum &+= UInt64(bytes.count) &+ UInt64(record.tuple.src.port)
            }
            muntrace()
        case "events-live", "events-capped":
            // 2000 connections on lo, one a millisecond, 44 packets each (more than an event array's first room), so
            // a sweep every 250 ms emits ~250 at once; the second 1000 are traced, once the spares have grown to
            // the ~500-750 connections the 0.5 s linger keeps open.
            var f = PacketFactory()
            let server = PacketFactory.ep("10.244.2.10", 80)
            var packets: [PacketRecord] = []
            packets.reserveCapacity(2_000 * 44)
            for i in 0..<2_000 {
                let client = PacketFactory.ep("10.244.1.10", UInt16(20_000 + i))
                packets.append(f.packet(client, server, flags: [.syn], on: lo))
                packets.append(f.packet(server, client, flags: [.syn, .ack], on: lo))
                for k in 0..<20 {
                    packets.append(f.packet(client, server, flags: [.ack, .psh], seq: UInt32(k), payload: 10, on: lo))
                    packets.append(f.packet(server, client, flags: [.ack], ack: UInt32(k), on: lo))
                }
                packets.append(f.packet(client, server, flags: [.fin, .ack], on: lo))
                packets.append(f.packet(server, client, flags: [.fin, .ack], on: lo))
                f.advance(micros: 1_000)
            }
            var options = CorrelatorOptions.live
            options.spareEventArraysFollowOpenConnections = phase == "events-live"
            let sink = DiscardingSink()
            let correlator = Correlator(tags: f.tags, ruleset: nil, options: options, sink: sink)
            for i in 0..<(packets.count / 2) { correlator.ingest(inPlace: &packets[i]) }
            mtrace()
            for i in (packets.count / 2)..<packets.count { correlator.ingest(inPlace: &packets[i]) }
            muntrace()
            checksum = UInt64(sink.events)
        case "syn-only", "syn-answered":
            // 2000 connections to the pod, a SYN each (and, answered, 19 packets more); the second 1000 are traced.
            var f = PacketFactory()
            let server = PacketFactory.ep("10.244.2.10", 80)
            var packets: [PacketRecord] = []
            for i in 0..<2_000 {
                let client = PacketFactory.ep("10.244.1.\(10 + i / 60_000)", UInt16(1_024 + i % 60_000))
                packets.append(f.packet(client, server, flags: [.syn], seq: UInt32(i), on: eth0, direction: .outbound))
                if phase == "syn-answered" {
                    packets.append(f.packet(server, client, flags: [.syn, .ack], ack: UInt32(i) &+ 1, on: eth0, direction: .inbound))
                    for k in 0..<9 {
                        packets.append(f.packet(client, server, flags: [.ack, .psh], seq: UInt32(k), payload: 10, on: eth0, direction: .outbound))
                        packets.append(f.packet(server, client, flags: [.ack], ack: UInt32(k), on: eth0, direction: .inbound))
                    }
                }
                f.advance(micros: 100)
            }
            let sink = DiscardingSink()
            let correlator = Correlator(tags: f.tags, ruleset: nil, options: CorrelatorOptions(), sink: sink)
            let half = phase == "syn-only" ? 1_000 : 1_000 * 20
            for i in 0..<half { correlator.ingest(inPlace: &packets[i]) }
            mtrace()
            for i in half..<packets.count { correlator.ingest(inPlace: &packets[i]) }
            muntrace()
            checksum = UInt64(correlator.openConnectionCount)
        default:
            XCTFail("unknown phase \(phase)")
        }
        print("traced \(phase) \(checksum)")
    }

    /// One frame per decoder path, NFLOG with a prefix, conntrack and a payload.
    static func sampleFrames() -> [(Int32, [UInt8])] {
        let tcp4 = Frame.ipv4(src: "10.0.0.1", dst: "10.0.0.2", proto: 6, payload: Frame.tcp(sport: 40000, dport: 80, seq: 1, ack: 2, flags: 0x18, payload: 100))
        let udp6 = Frame.ipv6(src: "fd00::1", dst: "fd00::2", next: 0, payload: [17, 0, 1, 4, 0, 0, 0, 0] + Frame.udp(sport: 53, dport: 5353, payload: 40))
        let ip = Frame.attr(1, Frame.attr(1, Frame.v4("10.0.0.1")) + Frame.attr(2, Frame.v4("10.96.0.1")))
        let ports = Frame.attr(2, Frame.attr(1, [6]) + Frame.attr(2, Frame.be16(40000)) + Frame.attr(3, Frame.be16(80)))
        let ct = Frame.attr(18, Frame.attr(1, ip + ports) + Frame.attr(2, ip + ports) + Frame.attr(8, Frame.be32(0x111)))
        let nflog = Frame.nflog(group: 5, Frame.attr(1, Frame.be16(0x0800) + [3, 0]) + Frame.attr(2, Frame.be32(0x539))
            + Frame.attr(10, Frame.cString("mt:4:nat:ISTIO_OUTPUT:4:0f0f")) + ct + Frame.attr(9, tcp4))
        return [
            (LinkType.ethernet, Frame.ethernet(type: 0x0800, vlan: 9, payload: tcp4)),
            (LinkType.linuxSLL, Frame.sll(packetType: 4, arphrd: 772, proto: 0x0800, payload: tcp4)),
            (LinkType.linuxSLL2, Frame.sll2(proto: 0x86dd, ifindex: 2, packetType: 0, payload: udp6)),
            (LinkType.raw, udp6), (LinkType.loop, [0, 0, 0, 2] + tcp4),
            (LinkType.nflog, nflog),
        ]
    }
}

/// Counts what it is given and keeps nothing, so every emitted event array goes back to the correlator.
private final class DiscardingSink: ReportSink {
    var events = 0
    var readsCompactEvents: Bool { true }
    func connection(_ timeline: ConnectionTimeline) {}
    func connection(_ timeline: ConnectionTimeline, events list: TimelineEventList) { events += list.events.count }
    func finish(_ summary: AnalysisSummary) throws {}
}
