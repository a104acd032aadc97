import XCTest
@testable import Capture

/// The live tracer moves the correlator's clock on by itself only while the pod is quiet
/// (`LiveTracer.quietClock`). Here the correlator is fed as the tracer feeds it, with a stalled reader: the
/// packets the reader placed before the stall, the wall clock of the pass that read the rest, and the rest held.
final class QuietClockTests: XCTestCase {
    static let client = PacketFactory.ep("10.244.1.10", 40000), server = PacketFactory.ep("10.244.2.10", 80)

    /// A whole connection but its last ACK, the ACK, and the correlator they go to (live options).
    private func closedConnection() -> (placed: [PacketRecord], held: PacketRecord, correlator: Correlator, sink: CollectingSink) {
        var f = PacketFactory()
        let c = Self.client, s = Self.server
        var placed: [PacketRecord] = []
        placed.append(f.packet(c, s, flags: [.syn], seq: 100, on: eth0, direction: .outbound))
        f.advance(micros: 200)
        placed.append(f.packet(s, c, flags: [.syn, .ack], seq: 900, ack: 101, on: eth0, direction: .inbound))
        f.advance(micros: 50)
        placed.append(f.packet(c, s, flags: [.ack], seq: 101, ack: 901, on: eth0, direction: .outbound))
        placed.append(f.packet(c, s, flags: [.ack, .psh], seq: 101, ack: 901, payload: 80, on: eth0, direction: .outbound))
        f.advance(micros: 400)
        placed.append(f.packet(s, c, flags: [.ack, .psh], seq: 901, ack: 181, payload: 300, on: eth0, direction: .inbound))
        placed.append(f.packet(s, c, flags: [.fin, .ack], seq: 1201, ack: 181, on: eth0, direction: .inbound))
        f.advance(micros: 30)
        placed.append(f.packet(c, s, flags: [.fin, .ack], seq: 181, ack: 1202, on: eth0, direction: .outbound))
        f.advance(micros: 40)
        let held = f.packet(s, c, flags: [.ack], seq: 1202, ack: 182, on: eth0, direction: .inbound)
        let sink = CollectingSink()
        let correlator = Correlator(tags: f.tags, ruleset: nil, options: .live, sink: sink)
        return (placed, held, correlator, sink)
    }

    func testAStalledReadersHeldPacketsKeepTheClockSoTheirConnectionIsNotSplit() throws {
        let (placed, held, correlator, sink) = closedConnection()
        for p in placed { correlator.ingest(p) }
        // The reader stalls 1.5 s; the pass after it drains everything and holds the last ACK (captured before
        // the stall) for 30 ms. The tracer's 250 ms tick comes while it is held.
        let drainedWall = held.time.totalNanoseconds + 1_500_000_000
        if let time = LiveTracer.quietClock(drainedWall: drainedWall, heldRecords: 1) { correlator.advance(to: time) }
        XCTAssertEqual(sink.connectionsSeen, 0, "a connection was finished while one of its packets was held")
        correlator.ingest(held)
        _ = correlator.finish()
        XCTAssertEqual(sink.timelines.count, 1, "the held ACK started a connection of its own")
        let timeline = try XCTUnwrap(sink.timelines.first)
        XCTAssertEqual(timeline.events.count, placed.count + 1)
        XCTAssertTrue(timeline.closed)
    }

    /// After a stall the backlog of one source is placed before the other's: a record stamped far later than the
    /// rest (an NFLOG event at OUTPUT, stamped on receipt after the stall) moves the clock past the linger while the
    /// connection's last ACK, from the capture, is still to be placed. Held (`StallGate`), the sweeps finish
    /// nothing until the backlog is placed, and the connection is printed whole.
    func testWithSweepsHeldAJumpOfTheClockFinishesNothingUntilTheBacklogIsPlaced() throws {
        let (placed, held, correlator, sink) = closedConnection()
        for p in placed { correlator.ingest(p) }
        correlator.holdSweeps()
        correlator.ingest(recordAfterTheStall(held))
        XCTAssertEqual(sink.connectionsSeen, 0, "finished while its last ACK was still to be placed")
        correlator.ingest(held)
        correlator.resumeSweeps()
        XCTAssertEqual(sink.connectionsSeen, 1, "the sweep on resuming finishes the closed connection")
        XCTAssertEqual(sink.timelines.first?.events.count, placed.count + 1)
        _ = correlator.finish()
        XCTAssertEqual(sink.timelines.filter { $0.original.src == Self.client }.count, 1, "split")
    }

    /// What the hold is for: without it the sweep runs at the jump and finishes the connection before its ACK.
    func testWithoutTheHoldAJumpOfTheClockFinishesTheConnectionAtOnce() throws {
        let (placed, held, correlator, sink) = closedConnection()
        for p in placed { correlator.ingest(p) }
        correlator.ingest(recordAfterTheStall(held))
        XCTAssertEqual(sink.connectionsSeen, 1)
        XCTAssertEqual(sink.timelines.first?.events.count, placed.count)
    }

    /// Another connection's SYN, 1.5 s after `held` was captured (as NFLOG's receipt stamp puts it after a stall).
    private func recordAfterTheStall(_ held: PacketRecord) -> PacketRecord {
        var f = PacketFactory()
        f.clock = held.time.totalNanoseconds + 1_500_000_000
        return f.packet(PacketFactory.ep("10.244.1.10", 40002), Self.server, flags: [.syn], seq: 5, on: eth0, direction: .outbound)
    }

    func testOnAQuietPodTheClockMovesAndAClosedConnectionIsPrintedWithoutWaitingForTheEnd() throws {
        let (placed, held, correlator, sink) = closedConnection()
        for p in placed + [held] { correlator.ingest(p) }
        // Nothing held, the last pass drained: 1.5 s after the last packet the clock goes to 1.27 s after it,
        // past the live linger (0.5 s), and the closed connection is printed then.
        let drainedWall = held.time.totalNanoseconds + 1_500_000_000
        let time = try XCTUnwrap(LiveTracer.quietClock(drainedWall: drainedWall, heldRecords: 0))
        XCTAssertEqual(time.totalNanoseconds, drainedWall - LiveTracer.holdNanos - LiveTracer.advanceLagNanos)
        correlator.advance(to: time)
        XCTAssertEqual(sink.connectionsSeen, 1)
        XCTAssertEqual(sink.timelines.first?.events.count, placed.count + 1)
        // No pass has drained yet: no clock to go by.
        XCTAssertNil(LiveTracer.quietClock(drainedWall: 0, heldRecords: 0))
    }
}

/// When the live reader holds the correlator's sweeps after a stall, and when it gives them back.
final class StallGateTests: XCTestCase {
    static let ms: UInt64 = 1_000_000

    /// One pass as the reader makes it: a checkpoint when it wakes, its reading, a checkpoint after; whether a hold
    /// started at either.
    private func pass(_ g: inout StallGate, woke: UInt64, read: UInt64, cpuAtWoke: UInt64, cpuAfter: UInt64,
                      drained: Bool) -> Bool {
        let before = g.checkpoint(wall: woke, cpu: cpuAtWoke)
        let after = g.checkpoint(wall: read, cpu: cpuAfter)
        g.afterReading(woke: woke, wall: read, drained: drained)
        return before || after
    }

    func testAStallHoldsUntilAPassAfterItHasReadEverythingAndTheHoldRingHasPlacedIt() {
        let ms = Self.ms
        var g = StallGate(stallNanos: 250 * ms, limitNanos: 1000 * ms)
        // Passes every 2 ms, each reading for 1 ms: no stall.
        XCTAssertFalse(pass(&g, woke: 0, read: 1 * ms, cpuAtWoke: 0, cpuAfter: 1 * ms, drained: true))
        XCTAssertFalse(pass(&g, woke: 2 * ms, read: 3 * ms, cpuAtWoke: 1 * ms, cpuAfter: 2 * ms, drained: true))
        // A pass of 300 ms of work (a debug build far behind) is not a stall: the thread ran.
        XCTAssertFalse(pass(&g, woke: 4 * ms, read: 304 * ms, cpuAtWoke: 2 * ms, cpuAfter: 302 * ms, drained: false))
        XCTAssertFalse(g.holding)
        // 1.5 s without running between two passes (SIGSTOP, Ctrl-Z): a hold before the next pass reads anything.
        XCTAssertTrue(g.checkpoint(wall: 1806 * ms, cpu: 302 * ms))
        XCTAssertTrue(g.holding)
        XCTAssertEqual(g.stalls, 1)
        XCTAssertFalse(g.checkpoint(wall: 1807 * ms, cpu: 303 * ms))
        g.afterReading(woke: 1806 * ms, wall: 1807 * ms, drained: true)
        // That pass does not count as having read everything: the next one must.
        XCTAssertFalse(g.afterRelease(now: 1808 * ms, oldestHeld: nil))
        // The next pass reads every source empty; what it read is still held (30 ms), so the sweeps stay held.
        XCTAssertFalse(pass(&g, woke: 1810 * ms, read: 1811 * ms, cpuAtWoke: 304 * ms, cpuAfter: 305 * ms, drained: true))
        XCTAssertFalse(g.afterRelease(now: 1812 * ms, oldestHeld: Int64(1810 * ms)))
        // Once the oldest record held arrived after that pass, everything read up to it is placed: sweep.
        XCTAssertTrue(g.afterRelease(now: 1842 * ms, oldestHeld: Int64(1840 * ms)))
        XCTAssertFalse(g.holding)
        XCTAssertFalse(g.afterRelease(now: 1844 * ms, oldestHeld: nil))
    }

    /// Stopped while it read (between the two checkpoints of one pass): held from the checkpoint after.
    func testAStallWhileReadingHoldsToo() {
        let ms = Self.ms
        var g = StallGate(stallNanos: 250 * ms, limitNanos: 1000 * ms)
        XCTAssertFalse(pass(&g, woke: 0, read: 1 * ms, cpuAtWoke: 0, cpuAfter: 1 * ms, drained: true))
        XCTAssertFalse(g.checkpoint(wall: 3 * ms, cpu: 1 * ms))
        XCTAssertTrue(g.checkpoint(wall: 1504 * ms, cpu: 2 * ms))
        XCTAssertTrue(g.holding)
    }

    func testAReaderThatStaysBehindGetsItsSweepsBackAtTheLimit() {
        let ms = Self.ms
        var g = StallGate(stallNanos: 250 * ms, limitNanos: 1000 * ms)
        XCTAssertFalse(pass(&g, woke: 0, read: 1 * ms, cpuAtWoke: 0, cpuAfter: 1 * ms, drained: true))
        XCTAssertTrue(pass(&g, woke: 900 * ms, read: 901 * ms, cpuAtWoke: 1 * ms, cpuAfter: 2 * ms, drained: false))
        var wall = 901 * ms, cpu = 2 * ms
        for _ in 0..<200 {
            XCTAssertFalse(pass(&g, woke: wall + 1 * ms, read: wall + 9 * ms, cpuAtWoke: cpu, cpuAfter: cpu + 8 * ms, drained: false))
            wall += 9 * ms; cpu += 8 * ms
            if g.afterRelease(now: wall, oldestHeld: Int64(wall - 8 * ms)) { break }
        }
        XCTAssertFalse(g.holding)
        XCTAssertGreaterThanOrEqual(wall, 1900 * ms)
        XCTAssertLessThan(wall, 1915 * ms)
    }
}
