import XCTest
@testable import Capture

/// A port reused while a live reader is behind on one of its two sources: the old connection's packets from that source
/// come after the new connection's first ones. They are the old connection's by their sequence numbers, however late.
final class PortReuseTests: XCTestCase {
    static let server = PacketFactory.ep("10.0.2.2", 80)
    static let peer = PacketFactory.ep("10.0.2.2", 15008)
    static let c15001 = PacketFactory.ep("127.0.0.1", 15001)
    static let observeOut = RuleTag(family: .v4, table: "mangle", chain: "POSTROUTING", position: .observeOut).prefix

    /// One app connection through ztunnel and its tunnel: (pcap records, NFLOG records), each in time order. The app
    /// dials a destination on the peer, so the join rests on identity (the tunnel's peer). `tunnelAfter`: µs more
    /// before the tunnel's SYN (ztunnel slow to connect).
    static func exchange(_ f: inout PacketFactory, app: Endpoint, tunnel: Endpoint, appISN: UInt32, tunISN: UInt32,
                         closesTunnel: Bool = true, tunnelAfter micros: Int64 = 0) -> (pcap: [PacketRecord], nflog: [PacketRecord]) {
        var pc: [PacketRecord] = [], nf: [PacketRecord] = []
        nf.append(f.nflog(app, server, flags: [.syn], seq: appISN, hook: .output, prefix: twin("nat", "ISTIO_OUTPUT", 4), outIf: 2))
        pc.append(f.packet(app, c15001, flags: [.syn], seq: appISN, on: lo, direction: .inbound))
        f.advance(micros: 20)
        pc.append(f.packet(server, app, flags: [.syn, .ack], seq: appISN &+ 5000, ack: appISN &+ 1, on: lo, direction: .inbound))
        pc.append(f.packet(app, c15001, flags: [.ack], seq: appISN &+ 1, ack: appISN &+ 5001, on: lo, direction: .inbound))
        f.advance(micros: 200)
        func out(_ flags: TCPFlags, _ seq: UInt32, _ ack: UInt32, _ payload: UInt32 = 0) {
            nf.append(f.nflog(tunnel, peer, flags: flags, seq: seq, ack: ack, hook: .postrouting, prefix: observeOut, mark: 0x539, outIf: 2))
            pc.append(f.packet(tunnel, peer, flags: flags, seq: seq, ack: ack, payload: payload, on: eth0, direction: .outbound))
        }
        func back(_ flags: TCPFlags, _ seq: UInt32, _ ack: UInt32, _ payload: UInt32 = 0) {
            pc.append(f.packet(peer, tunnel, flags: flags, seq: seq, ack: ack, payload: payload, on: eth0, direction: .inbound))
        }
        let r: UInt32 = tunISN &+ 77777
        f.advance(micros: micros)
        out([.syn], tunISN, 0)
        f.advance(micros: 100)
        back([.syn, .ack], r, tunISN &+ 1)
        out([.ack], tunISN &+ 1, r &+ 1)
        f.advance(micros: 50)
        pc.append(f.packet(app, c15001, flags: [.ack, .psh], seq: appISN &+ 1, ack: appISN &+ 5001, payload: 100, on: lo, direction: .inbound))
        f.advance(micros: 50)
        out([.ack, .psh], tunISN &+ 1, r &+ 1, 150)
        f.advance(micros: 300)
        back([.ack, .psh], r &+ 1, tunISN &+ 151, 200)
        f.advance(micros: 50)
        pc.append(f.packet(server, app, flags: [.ack, .psh], seq: appISN &+ 5001, ack: appISN &+ 101, payload: 150, on: lo, direction: .inbound))
        f.advance(micros: 50)
        pc.append(f.packet(app, c15001, flags: [.fin, .ack], seq: appISN &+ 101, ack: appISN &+ 5151, on: lo, direction: .inbound))
        pc.append(f.packet(server, app, flags: [.fin, .ack], seq: appISN &+ 5151, ack: appISN &+ 102, on: lo, direction: .inbound))
        pc.append(f.packet(app, c15001, flags: [.ack], seq: appISN &+ 102, ack: appISN &+ 5152, on: lo, direction: .inbound))
        guard closesTunnel else { return (pc, nf) }
        f.advance(micros: 50)
        out([.fin, .ack], tunISN &+ 151, r &+ 201)
        f.advance(micros: 100)
        back([.fin, .ack], r &+ 201, tunISN &+ 152)
        out([.ack], tunISN &+ 152, r &+ 202)
        return (pc, nf)
    }

    /// The records of both sources in the order a reader `lag` behind on `lagging` reads them: each of its records
    /// after the other source's records up to `lag` later. Their times are their own (the kernel's stamp, or libpcap's).
    static func read(_ on: [PacketRecord], _ lagging: [PacketRecord], lag micros: Int64) -> [PacketRecord] {
        var out: [PacketRecord] = [], j = 0
        for p in on {
            while j < lagging.count, lagging[j].time.totalNanoseconds + micros * 1_000 <= p.time.totalNanoseconds {
                out.append(lagging[j]); j += 1
            }
            out.append(p)
        }
        return out + lagging[j...]
    }

    static var liveOptions: CorrelatorOptions {
        var o = CorrelatorOptions()
        o.closeLingerNanos = 500_000_000
        return o
    }

    /// ztunnel reuses a tunnel's source port 53 ms after closing it (under load), and the reader is 60 ms behind on
    /// NFLOG: the first tunnel's marked copies, its SYN first, come after the second tunnel's SYN. They made a
    /// connection of their own (a forged mark), and the late SYN ended the second tunnel into another (a second).
    func testATunnelsMarkedCopiesReadAfterZtunnelReusedItsPortStayOnIt() throws {
        var f = PacketFactory()
        let tunnel = PacketFactory.ep("10.0.1.5", 50000)
        let first = Self.exchange(&f, app: PacketFactory.ep("10.0.1.5", 40000), tunnel: tunnel, appISN: 1000, tunISN: 7000)
        f.advance(micros: 53_000)
        let second = Self.exchange(&f, app: PacketFactory.ep("10.0.1.5", 40001), tunnel: tunnel, appISN: 3_000_000, tunISN: 0x8000_0000)
        f.advance(micros: 2_000_000)
        let later = Self.exchange(&f, app: PacketFactory.ep("10.0.1.5", 40002), tunnel: PacketFactory.ep("10.0.1.5", 50004),
                                  appISN: 9_000_000, tunISN: 0x9000_0000)
        let records = Self.read(first.pcap + second.pcap + later.pcap, first.nflog + second.nflog + later.nflog, lag: 60_000)
        let (sink, summary) = correlate(records, tags: f.tags, options: Self.liveOptions)
        XCTAssertEqual(sink.findings.map(\.summary), [])
        XCTAssertEqual(summary.connections, 6)
        let tunnels = sink.timelines.filter { $0.original.src == tunnel }.sorted { $0.firstSeen < $1.firstSeen }
        XCTAssertEqual(tunnels.count, 2)
        for (t, own) in zip(tunnels, [first, second]) {
            XCTAssertEqual(t.packets, 13, "the capture's 8 and the 5 marked copies")
            XCTAssertTrue(t.closed)
            XCTAssertEqual(t.marks, [0x539])
            XCTAssertEqual(t.hops.count, 1)
            XCTAssertEqual(Set(t.events.map(\.frame)), Set((own.pcap + own.nflog).filter { $0.tuple.src == tunnel || $0.tuple.dst == tunnel }.map(\.ref)),
                           "its own packets, and only those")
        }
        XCTAssertEqual(summary.hops, 3)
    }

    /// An app reuses its port 3 ms after its connection closed, and the reader is 5 ms behind on the interface
    /// capture: the first connection's packets on lo come after the second's SYN (the REDIRECT twin's copy). They
    /// made a connection of their own, seen on lo only, with no hop.
    func testAnAppConnectionsLoopbackPacketsReadAfterItsPortWasReusedStayOnIt() throws {
        var f = PacketFactory()
        let app = PacketFactory.ep("10.0.1.5", 40000)
        let first = Self.exchange(&f, app: app, tunnel: PacketFactory.ep("10.0.1.5", 50000), appISN: 1000, tunISN: 7000)
        f.advance(micros: 3_000)
        let second = Self.exchange(&f, app: app, tunnel: PacketFactory.ep("10.0.1.5", 50002), appISN: 3_000_000, tunISN: 0x8000_0000)
        let records = Self.read(first.nflog + second.nflog, first.pcap + second.pcap, lag: 5_000)
        let (sink, summary) = correlate(records, tags: f.tags, options: Self.liveOptions)
        XCTAssertEqual(sink.findings.map(\.summary), [])
        XCTAssertEqual(summary.connections, 4)
        let apps = sink.timelines.filter { $0.original.src == app }.sorted { $0.firstSeen < $1.firstSeen }
        XCTAssertEqual(apps.count, 2)
        for a in apps {
            XCTAssertEqual(a.kind, .appOutbound)
            XCTAssertEqual(a.original, FiveTuple(proto: IPProto.tcp, src: app, dst: Self.server))
            XCTAssertEqual(a.aliases, [FiveTuple(proto: IPProto.tcp, src: app, dst: Self.c15001)])
            XCTAssertEqual(a.redirect, .redirected(toPort: 15001, originalDestination: Self.server))
            XCTAssertEqual(a.packets, 9)
            XCTAssertTrue(a.closed)
            XCTAssertEqual(a.hops.count, 1)
        }
    }

    /// A record of a connection emitted already (the reader more than the close linger behind), on the tuple a live
    /// connection holds now: it is that one's by its sequence numbers, so it is on neither, and counted late. Its
    /// FIN used to close the live connection (and a SYN to end it).
    func testALateRecordOfAConnectionEmittedAlreadyIsOnNeither() throws {
        var f = PacketFactory()
        let tunnel = PacketFactory.ep("10.0.1.5", 50000)
        let first = Self.exchange(&f, app: PacketFactory.ep("10.0.1.5", 40000), tunnel: tunnel, appISN: 1000, tunISN: 7000)
        f.advance(micros: 53_000)
        // The second tunnel stays open (ztunnel keeps it for more connections).
        let second = Self.exchange(&f, app: PacketFactory.ep("10.0.1.5", 40001), tunnel: tunnel, appISN: 3_000_000,
                                   tunISN: 0x8000_0000, closesTunnel: false)
        // The first tunnel's FIN copy is read 3 s later (stamped on receipt), after that tunnel was emitted.
        let finCopy = try XCTUnwrap(first.nflog.firstIndex { $0.tcpFlags.contains(.fin) })
        var lateFIN = first.nflog[finCopy]
        f.advance(micros: 3_000_000)
        lateFIN.time = f.packet(tunnel, Self.peer, on: eth0).time
        var firstNflog = first.nflog
        firstNflog.remove(at: finCopy)
        let records = (first.pcap + firstNflog + second.pcap + second.nflog).sorted { $0.time < $1.time } + [lateFIN]
        let (sink, summary) = correlate(records, tags: f.tags, options: Self.liveOptions)
        XCTAssertEqual(sink.findings.map(\.summary), [])
        let tunnels = sink.timelines.filter { $0.original.src == tunnel }.sorted { $0.firstSeen < $1.firstSeen }
        XCTAssertEqual(tunnels.count, 2, "no connection of its own")
        XCTAssertEqual(tunnels.map(\.closed), [true, false], "the late FIN does not close the second tunnel")
        XCTAssertFalse(tunnels.contains { $0.events.contains { $0.frame == lateFIN.ref } })
        XCTAssertEqual(summary.lateRecords, 1)
    }
}
