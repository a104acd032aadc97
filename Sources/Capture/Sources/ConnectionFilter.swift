// `trace --filter`: which connections a live trace shows.

/// A tcpdump-syntax expression run on every packet the trace reads: each captured frame, and the IP packet
/// inside each NFLOG event. A connection is shown when any of its packets matched, in any of its NAT views,
/// with everything the trace saw of it (the lo leg after a REDIRECT, which `port 80` would not match) and the
/// ztunnel legs joined to it (the HBONE connection to :15008). What the filter does not select is still read
/// and counted (the rule hits beside the kernel's counters stay whole) but not printed.
public final class ConnectionFilter: @unchecked Sendable {
    public let expression: String
    /// For NFLOG payloads: raw IP, version from the first nibble.
    private let ip: PcapFilterProgram?
    /// For the capture's frames (cooked `any` headers), compiled for its link type.
    private var frames: PcapFilterProgram?

    /// Compiles the expression for raw IP and for the capture's cooked frames (LINUX_SLL). One that compiles for
    /// neither is a usage error; one only about link-layer headers (`ether host ...`) selects by captured frames
    /// alone.
    public init(_ expression: String) throws {
        self.expression = expression
        var failure: Error?
        do { ip = try PcapFilterProgram(expression, linkType: LinkType.rawDLT) } catch { ip = nil; failure = error }
        do {
            frames = try PcapFilterProgram(expression, linkType: LinkType.linuxSLL)
        } catch {
            frames = nil
            if ip == nil { throw failure ?? error }
        }
    }

    /// Compiles for the capture's link type when it is another than LINUX_SLL (LINUX_SLL2).
    public func prepare(captureLinkType: Int32) throws {
        guard frames?.linkType != captureLinkType else { return }
        frames = try? PcapFilterProgram(expression, linkType: captureLinkType)
        if frames == nil && ip == nil {
            _ = try PcapFilterProgram(expression, linkType: captureLinkType)
        }
    }

    /// Whether a captured frame matches.
    @inline(__always)
    public func matches(frame: UnsafeRawBufferPointer, wireLength: UInt32) -> Bool {
        frames?.matches(frame, wireLength: wireLength) ?? false
    }

    /// Whether the IP packet an NFLOG event carries matches (its attributes in host byte order, as read live).
    @inline(__always)
    public func matches(nflogAttributes tlvs: UnsafeRawBufferPointer) -> Bool {
        guard let ip, let payload = PacketDecoder.nflogPayload(in: tlvs, byteOrder: .host) else { return false }
        return ip.matches(payload, wireLength: UInt32(payload.count))
    }
}
