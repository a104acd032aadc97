/// Parsing of the addresses, endpoints and marks the lab's commands take.
public enum LabAddressing {
    /// `10.244.0.0/16`, `fd00::/64`, or a bare address (a /32 or /128).
    public static func cidr(_ text: String) -> CIDR? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let addr = IPAddress(parts[0]) else { return nil }
        let full = addr.family == .v6 ? 128 : 32
        guard parts.count == 2 else { return CIDR(address: addr, prefixLength: full) }
        guard let len = Int(parts[1]), len >= 0, len <= full else { return nil }
        return CIDR(address: addr, prefixLength: len)
    }

    public static func endpoint(_ text: String) throws -> Endpoint {
        guard let ep = Endpoint(parsing: text) else { throw MeshtraceError(.usage, "\(text) is not IP:PORT or [IPv6]:PORT") }
        return ep
    }

    /// `0x539` or `1337`.
    public static func mark(_ text: String) throws -> UInt32 {
        let v = text.hasPrefix("0x") ? UInt32(text.dropFirst(2), radix: 16) : UInt32(text)
        guard let v else { throw MeshtraceError(.usage, "\(text) is not a mark (0x539 or 1337)") }
        return v
    }
}
