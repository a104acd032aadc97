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
