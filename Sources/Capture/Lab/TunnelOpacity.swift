// The stand-in's tunnel must be as opaque to meshtrace as HBONE's mTLS is in production, so that nothing in the
// analyzer can cheat by reading the target out of the payload. This is NOT encryption: a per-connection random
// nonce seeds a splitmix64 keystream that is XORed over the bytes. Anyone with this file can read it.

#if canImport(Glibc)
import Glibc
#endif

/// One direction of a tunnel's keystream. The two directions use different streams from the same nonce.
struct TunnelKeystream {
    private var state: UInt64
    private var word: UInt64 = 0
    private var left = 0

    enum Direction: UInt64 { case toPeer = 0x6d65_7368_7472_6163, fromPeer = 0x7a74_756e_6e65_6c21 }

    init(nonce: [UInt8], direction: Direction) {
        var seed: UInt64 = direction.rawValue
        for (i, b) in nonce.enumerated() { seed ^= UInt64(b) << UInt64((i % 8) * 8); seed = seed &* 0x9E37_79B9_7F4A_7C15 }
        state = seed
    }

    private mutating func next() -> UInt64 {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func apply(_ byte: inout UInt8) {
        if left == 0 { word = next(); left = 8 }
        byte ^= UInt8(truncatingIfNeeded: word)
        word >>= 8
        left -= 1
    }

    mutating func apply(_ bytes: UnsafeMutableRawBufferPointer) {
        for i in 0..<bytes.count { apply(&bytes[i]) }
    }

    mutating func applied(_ bytes: [UInt8]) -> [UInt8] {
        var out = bytes
        for i in out.indices { apply(&out[i]) }
        return out
    }
}

/// The tunnel's framing: the client sends `nonceLength` random bytes in the clear (as a TLS ClientHello carries a
/// random), then, through the keystream, one header line `CONNECT <target>\n`, then the app's bytes.
enum TunnelHeader {
    static let nonceLength = 16

    static func line(target: Endpoint) -> [UInt8] { Array("CONNECT \(target)\n".utf8) }

    /// A pooled tunnel's stream header: `CONNECT+ <target>\n`, then length-framed bytes (`TunnelConnection.relayFramed`).
    static func streamLine(target: Endpoint) -> [UInt8] { Array("CONNECT+ \(target)\n".utf8) }

    static func parseStream(_ line: [UInt8]) -> Endpoint? { target(of: line, after: "CONNECT+ ") }

    static func parse(_ line: [UInt8]) -> Endpoint? { target(of: line, after: "CONNECT ") }

    /// The endpoint of a `<verb> <target>\n` header line.
    private static func target(of line: [UInt8], after verb: String) -> Endpoint? {
        guard let text = String(bytes: line, encoding: .utf8), text.hasPrefix(verb), text.hasSuffix("\n") else { return nil }
        return Endpoint(parsing: String(text.dropFirst(verb.count).dropLast()))
    }
}

/// One tunnel connection with its two keystreams, which run on for as long as the connection does (across the
/// streams of a pooled tunnel). A pooled tunnel's stream is framed: a 4-byte big-endian length and that many bytes,
/// a length of 0 ending the stream in that direction; after both ends, the next stream header may follow.
final class TunnelConnection {
    let socket: LabSocket
    var up: TunnelKeystream
    var down: TunnelKeystream

    init(socket: LabSocket, nonce: [UInt8]) {
        self.socket = socket
        up = TunnelKeystream(nonce: nonce, direction: .toPeer)
        down = TunnelKeystream(nonce: nonce, direction: .fromPeer)
    }

    /// The client side: connects to `hbone` from a `mark`-ed socket and sends a fresh nonce in the clear.
    static func open(to hbone: Endpoint, mark: UInt32) -> TunnelConnection? {
        guard let socket = try? LabSocket.tcpConnect(to: hbone, mark: mark) else { return nil }
        socket.setTimeouts(seconds: 0)
        socket.setNoDelay()
        var nonce = [UInt8](repeating: 0, count: TunnelHeader.nonceLength)
        for i in nonce.indices { nonce[i] = UInt8.random(in: 0...255) }
        guard socket.writeAll(nonce) else { return nil }
        return TunnelConnection(socket: socket, nonce: nonce)
    }

    /// The serving side: reads the client's nonce; nil when the connection ends (or times out) before it.
    static func accept(_ socket: LabSocket) -> TunnelConnection? {
        socket.setNoDelay()
        var nonce = [UInt8](repeating: 0, count: TunnelHeader.nonceLength)
        let read = nonce.withUnsafeMutableBytes { socket.readExactly(into: $0.baseAddress!, count: $0.count) }
        return read ? TunnelConnection(socket: socket, nonce: nonce) : nil
    }

    /// Relays one stream between `plain` (the app-side socket) and `tunnel`: bytes read from `plain` go out as
    /// frames through `send`, frames read through `receive` go to `plain`. True when both directions ended with an
    /// end frame, so the tunnel can carry another stream; false on an error, the tunnel closing, or `idle` seconds
    /// without a byte.
    static func relayFramed(plain: LabSocket, tunnel: LabSocket, idle: Double,
                            send: inout TunnelKeystream, receive: inout TunnelKeystream) -> Bool {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 1024, alignment: 8)
        defer { buffer.deallocate() }
        var fds = [pollfd(fd: plain.fd, events: Int16(POLLIN), revents: 0), pollfd(fd: tunnel.fd, events: Int16(POLLIN), revents: 0)]
        var sending = true, receiving = true
        func readExactly(_ count: Int) -> Bool {
            guard tunnel.readExactly(into: buffer.baseAddress!, count: count) else { return false }
            receive.apply(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]))
            return true
        }
        while sending || receiving {
            fds[0].fd = sending ? plain.fd : -1
            fds[1].fd = receiving ? tunnel.fd : -1
            fds[0].revents = 0; fds[1].revents = 0
            let r = poll(&fds, 2, Int32(idle * 1000))
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return false }
            if sending && fds[0].revents != 0 {
                let n = plain.read(into: buffer.baseAddress! + 4, count: buffer.count - 4)
                if n < 0 { return false }
                let length = UInt32(n).bigEndian
                withUnsafeBytes(of: length) { buffer.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: 4) }
                send.apply(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(4 + n)]))
                guard tunnel.writeAll(buffer.baseAddress!, count: 4 + n) else { return false }
                if n == 0 { sending = false }
            }
            if receiving && fds[1].revents != 0 {
                guard readExactly(4) else { return false }
                let length = Int(buffer.load(as: UInt32.self).bigEndian)
                guard length <= buffer.count else { return false }
                if length == 0 {
                    receiving = false
                    plain.shutdownWrite()
                    continue
                }
                guard readExactly(length), plain.writeAll(buffer.baseAddress!, count: length) else { return false }
            }
        }
        return true
    }
}
