import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A tunnel that carries several app connections at once, as ztunnel's HBONE pool does (HTTP/2 CONNECT streams
/// multiplexed over one mTLS connection per destination): one such tunnel per destination pod, however many
/// connections to it are open. After the nonce and the header line `MUX\n`, both directions are frames, through
/// the keystreams: a 4-byte stream id, a 1-byte kind, a 4-byte length (big-endian) and that many bytes. `open`
/// carries the stream's target (`IP:PORT`), `data` the connection's bytes, `end` says that direction is done.
/// A stream is over once both ends were sent; the tunnel stays open for the next ones.
final class MultiplexedTunnel: @unchecked Sendable {
    enum Kind: UInt8 { case open = 1, data = 2, end = 3 }
    static let headerLine = Array("MUX\n".utf8)
    static let headerBytes = 9
    static let maxPayload = 16 * 1024

    /// One stream's app-side socket; `done` is signalled when the far end ended its direction (or the tunnel went).
    final class Stream: @unchecked Sendable {
        let socket: LabSocket
        let done = DispatchSemaphore(value: 0)
        init(socket: LabSocket) { self.socket = socket }
    }

    let connection: TunnelConnection
    /// The opening side writes with the `up` keystream and reads with `down`; the serving side the other way round.
    private let opener: Bool
    private let writeLock = NSLock()
    /// Guards `streams`, `nextID` and `closed`; held while a frame's bytes go to a stream's socket, so a stream is
    /// never written after its socket was handed back.
    private let lock = NSLock()
    private var streams: [UInt32: Stream] = [:]
    private var nextID: UInt32 = 1
    private var closed = false
    private let writeBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: MultiplexedTunnel.headerBytes + MultiplexedTunnel.maxPayload,
                                                                     alignment: 8)

    private init(connection: TunnelConnection, opener: Bool) {
        self.connection = connection
        self.opener = opener
    }

    deinit { writeBuffer.deallocate() }

    /// Whether the tunnel has gone (its far end closed it, or a frame could not be read or written).
    var isClosed: Bool { lock.lock(); defer { lock.unlock() }; return closed }

    /// The opening side (ztunnel's outbound pool): connects, sends the header line, and reads the far end's frames
    /// on a thread of its own until the tunnel goes.
    static func open(to hbone: Endpoint, mark: UInt32) -> MultiplexedTunnel? {
        guard let t = TunnelConnection.open(to: hbone, mark: mark) else { return nil }
        guard t.socket.writeAll(t.up.applied(headerLine)) else { t.socket.close(); return nil }
        let tunnel = MultiplexedTunnel(connection: t, opener: true)
        Thread.detachNewThread { tunnel.readFrames(onOpen: nil) }
        return tunnel
    }

    /// The serving side, on the thread that accepted the tunnel (its header line read): reads frames until the tunnel
    /// goes; each `open` frame is handed to `onOpen` (on this thread), which returns the stream's socket or nil.
    static func serve(_ t: TunnelConnection, onOpen: @escaping (Endpoint) -> LabSocket?) {
        MultiplexedTunnel(connection: t, opener: false).readFrames(onOpen: onOpen)
    }

    /// The opening side: carries `app`'s connection to `target` as a new stream. Returns when both directions
    /// have ended, the tunnel went, or `idle` seconds passed without a byte from the app.
    func carry(_ app: LabSocket, to target: Endpoint, idle: Double) -> Bool {
        let stream = Stream(socket: app)
        lock.lock()
        guard !closed else { lock.unlock(); return false }
        let id = nextID
        nextID &+= 2
        streams[id] = stream
        lock.unlock()
        let ok = send(id, .open, Array(target.description.utf8)) && pump(stream, id: id, idle: idle)
        finish(id, stream, idle: idle)
        return ok
    }

    /// Shuts the tunnel's socket: the reading thread sees the end and lets every stream go.
    func shutdown() { _ = Glibc.shutdown(connection.socket.fd, Int32(SHUT_RDWR)) }

    /// Relays what `stream`'s socket reads into the tunnel as `data` frames, then an `end` frame.
    private func pump(_ stream: Stream, id: UInt32, idle: Double) -> Bool {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: MultiplexedTunnel.maxPayload, alignment: 8)
        defer { buffer.deallocate() }
        var fd = pollfd(fd: stream.socket.fd, events: Int16(POLLIN), revents: 0)
        while true {
            fd.revents = 0
            let r = poll(&fd, 1, Int32(idle * 1000))
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { _ = send(id, .end, []); return false }
            let n = stream.socket.read(into: buffer.baseAddress!, count: buffer.count)
            if n <= 0 { return send(id, .end, []) && n == 0 }
            guard send(id, .data, UnsafeRawBufferPointer(rebasing: buffer[0..<n])) else { return false }
        }
    }

    /// Waits for the far end to end the stream (or the tunnel to go), then forgets it.
    private func finish(_ id: UInt32, _ stream: Stream, idle: Double) {
        _ = stream.done.wait(timeout: .now() + idle)
        lock.lock()
        streams[id] = nil
        lock.unlock()
    }

    private func send(_ id: UInt32, _ kind: Kind, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { send(id, kind, $0) }
    }

    /// Writes one frame; frames from several streams' threads go out whole, one after another.
    private func send(_ id: UInt32, _ kind: Kind, _ bytes: UnsafeRawBufferPointer) -> Bool {
        precondition(bytes.count <= MultiplexedTunnel.maxPayload)
        writeLock.lock()
        defer { writeLock.unlock() }
        let frame = writeBuffer.baseAddress!
        withUnsafeBytes(of: id.bigEndian) { frame.copyMemory(from: $0.baseAddress!, byteCount: 4) }
        frame.storeBytes(of: kind.rawValue, toByteOffset: 4, as: UInt8.self)
        withUnsafeBytes(of: UInt32(bytes.count).bigEndian) { (frame + 5).copyMemory(from: $0.baseAddress!, byteCount: 4) }
        if let base = bytes.baseAddress, !bytes.isEmpty { (frame + 9).copyMemory(from: base, byteCount: bytes.count) }
        let whole = UnsafeMutableRawBufferPointer(rebasing: writeBuffer[0..<(9 + bytes.count)])
        if opener { connection.up.apply(whole) } else { connection.down.apply(whole) }
        return connection.socket.writeAll(frame, count: whole.count)
    }

    /// Reads frames until the tunnel goes, then lets every stream still open go.
    private func readFrames(onOpen: ((Endpoint) -> LabSocket?)?) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: MultiplexedTunnel.maxPayload, alignment: 8)
        defer { buffer.deallocate() }
        var header = [UInt8](repeating: 0, count: MultiplexedTunnel.headerBytes)
        func readExactly(_ into: UnsafeMutableRawBufferPointer) -> Bool {
            guard into.isEmpty || connection.socket.readExactly(into: into.baseAddress!, count: into.count) else { return false }
            if opener { connection.down.apply(into) } else { connection.up.apply(into) }
            return true
        }
        while header.withUnsafeMutableBytes({ readExactly($0) }) {
            let id = header[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let length = Int(header[5..<9].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            guard let kind = Kind(rawValue: header[4]), length <= MultiplexedTunnel.maxPayload,
                  readExactly(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])) else { break }
            switch kind {
            case .open:
                guard let onOpen, let target = Endpoint(parsing: String(decoding: buffer[0..<length], as: UTF8.self)) else {
                    _ = send(id, .end, [])
                    continue
                }
                guard let socket = onOpen(target) else { _ = send(id, .end, []); continue }
                let stream = Stream(socket: socket)
                lock.lock()
                streams[id] = stream
                lock.unlock()
                // The serving side's stream: the app's bytes go back through the tunnel on a thread of their own;
                // the app's socket is closed once both directions have ended.
                Thread.detachNewThread { [self] in
                    _ = pump(stream, id: id, idle: 30)
                    finish(id, stream, idle: 30)
                    socket.close()
                }
            case .data:
                lock.lock()
                if let s = streams[id] { _ = s.socket.writeAll(buffer.baseAddress!, count: length) }
                lock.unlock()
            case .end:
                lock.lock()
                if let s = streams[id] { s.socket.shutdownWrite(); s.done.signal() }
                lock.unlock()
            }
        }
        lock.lock()
        closed = true
        let open = Array(streams.values)
        lock.unlock()
        for s in open { s.socket.shutdownWrite(); s.done.signal() }
    }
}
