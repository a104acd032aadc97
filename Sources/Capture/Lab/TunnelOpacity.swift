// The stand-in's tunnel must be as opaque to meshtrace as HBONE's mTLS is in production, so that nothing in the
// analyzer can cheat by reading the target out of the payload. This is NOT encryption: a per-connection random
// nonce seeds a splitmix64 keystream that is XORed over the bytes. Anyone with this file can read it.

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

    static func parse(_ line: [UInt8]) -> Endpoint? {
        guard let text = String(bytes: line, encoding: .utf8), text.hasPrefix("CONNECT "), text.hasSuffix("\n") else { return nil }
        return Endpoint(parsing: String(text.dropFirst(8).dropLast()))
    }
}
