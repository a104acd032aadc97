// `--filter`: which connections `trace` and `analyze` show.

/// A tcpdump-syntax expression run on every packet read: each captured frame (whatever its link type), and the
/// IP packet inside each NFLOG event. The decoders run it (`PacketDecoder.selector`) as they decode each record,
/// where the frame, its link type and the NFLOG payload (in whatever byte order the file has) are at hand. A
/// connection is shown when any of its packets matched, in any of its NAT views, with everything seen of it (the lo leg after a REDIRECT, which `port 80` would not match) and the
/// ztunnel legs joined to it (the HBONE connection to :15008). What the filter does not select is still read and
/// counted (the rule hits beside the kernel's counters stay whole) but not printed. One thread uses it, the one
/// decoding (the live netns thread, analyze's read-ahead thread): it keeps the last link type's program at hand.
public final class ConnectionFilter: @unchecked Sendable {
    public let expression: String
    /// For NFLOG payloads: raw IP, version from the first nibble.
    private let ip: PcapFilterProgram?
    /// Per link type, compiled on first use; nil where the expression does not compile for it (`ether` on RAW).
    private var programs: [Int32: PcapFilterProgram?] = [:]
    private var lastLinkType: Int32 = -1
    private var last: PcapFilterProgram?

    /// Compiles the expression for raw IP and for cooked frames (LINUX_SLL, what `tcpdump -i any` and the live
    /// trace capture). One that compiles for neither is a usage error; one only about link-layer headers
    /// (`ether host ...`) selects by captured frames alone.
    public init(_ expression: String) throws {
        self.expression = expression
        var failure: Error?
        do { ip = try PcapFilterProgram(expression, linkType: LinkType.rawDLT) } catch { ip = nil; failure = error }
        programs[LinkType.rawDLT] = .some(ip)
        do {
            programs[LinkType.linuxSLL] = try PcapFilterProgram(expression, linkType: LinkType.linuxSLL)
        } catch {
            programs[LinkType.linuxSLL] = .some(nil)
            if ip == nil { throw failure ?? error }
        }
    }

    /// Whether a captured frame of `linkType` matches.
    @inline(__always)
    public func matches(frame: UnsafeRawBufferPointer, wireLength: UInt32, linkType: Int32) -> Bool {
        if linkType != lastLinkType {
            lastLinkType = linkType
            last = program(for: linkType)
        }
        return last?.matches(frame, wireLength: wireLength) ?? false
    }

    /// Whether an IP packet (the payload of an NFLOG record) matches.
    @inline(__always)
    public func matches(ipPacket: UnsafeRawBufferPointer) -> Bool {
        ip?.matches(ipPacket, wireLength: UInt32(ipPacket.count)) ?? false
    }

    private func program(for linkType: Int32) -> PcapFilterProgram? {
        if let known = programs[linkType] { return known }
        // pcapng names raw IP by its LINKTYPE (101); libpcap compiles for the DLT (12).
        let dlt = linkType == LinkType.raw ? LinkType.rawDLT : linkType
        let compiled = try? PcapFilterProgram(expression, linkType: dlt)
        programs[linkType] = .some(compiled)
        return compiled
    }
}
