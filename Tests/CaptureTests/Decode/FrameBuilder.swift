import Foundation
@testable import Capture

/// Builds frames and capture files byte by byte, so a test knows exactly what it wrote.
enum Frame {
    static func be16(_ v: Int) -> [UInt8] { [UInt8((v >> 8) & 0xff), UInt8(v & 0xff)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xff), UInt8((v >> 8) & 0xff), UInt8(v & 0xff)] }
    static func be64(_ v: UInt64) -> [UInt8] { be32(UInt32(v >> 32)) + be32(UInt32(v & 0xffff_ffff)) }
    static func u16(_ v: Int, _ order: ByteOrder) -> [UInt8] { order == .big ? be16(v) : be16(v).reversed() }

    static func v4(_ text: String) -> [UInt8] { be32(IPAddress(text)!.v4Value) }
    static func v6(_ text: String) -> [UInt8] { let a = IPAddress(text)!; return be64(a.hi) + be64(a.lo) }

    static func ipv4(src: String, dst: String, proto: UInt8, id: Int = 0x1234, ttl: UInt8 = 64, options: [UInt8] = [],
                     fragmentOffset: Int = 0, moreFragments: Bool = false, payload: [UInt8]) -> [UInt8] {
        let headerLength = 20 + options.count
        var h: [UInt8] = [UInt8(0x40 | (headerLength / 4)), 0]
        h += be16(headerLength + payload.count) + be16(id)
        h += be16((moreFragments ? 0x2000 : 0) | fragmentOffset)
        h += [ttl, proto, 0, 0] + v4(src) + v4(dst) + options
        return h + payload
    }

    static func ipv6(src: String, dst: String, next: UInt8, hopLimit: UInt8 = 64, payload: [UInt8]) -> [UInt8] {
        [0x60, 0, 0, 0] + be16(payload.count) + [next, hopLimit] + v6(src) + v6(dst) + payload
    }

    static func tcp(sport: Int, dport: Int, seq: UInt32, ack: UInt32, flags: UInt8, options: [UInt8] = [], payload: Int = 0) -> [UInt8] {
        let headerLength = 20 + options.count
        return be16(sport) + be16(dport) + be32(seq) + be32(ack) + [UInt8(headerLength / 4) << 4, flags]
            + be16(65535) + [0, 0, 0, 0] + options + [UInt8](repeating: 0x61, count: payload)
    }

    static func udp(sport: Int, dport: Int, payload: Int) -> [UInt8] {
        be16(sport) + be16(dport) + be16(8 + payload) + [0, 0] + [UInt8](repeating: 0x62, count: payload)
    }

    static func icmpEcho(type: UInt8, id: Int, seq: Int) -> [UInt8] { [type, 0, 0, 0] + be16(id) + be16(seq) }

    static func ethernet(type: Int, vlan: Int? = nil, payload: [UInt8]) -> [UInt8] {
        var f: [UInt8] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]
        if let vlan { f += be16(0x8100) + be16(vlan) }
        return f + be16(type) + payload
    }

    static func sll(packetType: Int, arphrd: Int = 1, proto: Int, payload: [UInt8]) -> [UInt8] {
        be16(packetType) + be16(arphrd) + be16(6) + [2, 0, 0, 0, 0, 1, 0, 0] + be16(proto) + payload
    }

    static func sll2(proto: Int, ifindex: UInt32, arphrd: Int = 1, packetType: UInt8, payload: [UInt8]) -> [UInt8] {
        be16(proto) + [0, 0] + be32(ifindex) + be16(arphrd) + [packetType, 6] + [2, 0, 0, 0, 0, 1, 0, 0] + payload
    }

    /// One netlink-style attribute (NFLOG TLV or ctnetlink attribute), padded to 4 bytes.
    static func attr(_ type: Int, _ value: [UInt8], _ order: ByteOrder = .host, length: Int? = nil) -> [UInt8] {
        let body = u16(length ?? (4 + value.count), order) + u16(type, order) + value
        return body + [UInt8](repeating: 0, count: (4 - body.count % 4) % 4)
    }

    static func nflog(family: UInt8 = 2, group: Int, _ tlvs: [UInt8]) -> [UInt8] { [family, 0] + be16(group) + tlvs }

    static func cString(_ s: String) -> [UInt8] { Array(s.utf8) + [0] }
}

/// A classic pcap file built in memory.
struct PcapFileBuilder {
    private(set) var bytes: [UInt8] = []
    let bigEndian: Bool

    init(linkType: UInt32, snaplen: UInt32 = 65535, nanosecond: Bool = false, bigEndian: Bool = false) {
        self.bigEndian = bigEndian
        let magic: UInt32 = nanosecond ? 0xa1b2_3c4d : 0xa1b2_c3d4
        bytes = u32(magic) + u16(2) + u16(4) + u32(0) + u32(0) + u32(snaplen) + u32(linkType)
    }

    private func u32(_ v: UInt32) -> [UInt8] { bigEndian ? Frame.be32(v) : Frame.be32(v).reversed() }
    private func u16(_ v: UInt16) -> [UInt8] { bigEndian ? Frame.be16(Int(v)) : Frame.be16(Int(v)).reversed() }

    mutating func add(_ frame: [UInt8], wireLength: Int? = nil, seconds: UInt32 = 1_700_000_000, fraction: UInt32 = 0) {
        bytes += u32(seconds) + u32(fraction) + u32(UInt32(frame.count)) + u32(UInt32(wireLength ?? frame.count)) + frame
    }

    func write(_ dir: URL, _ name: String) throws -> String {
        let url = dir.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }
}

/// A temporary directory removed by the owning test's tearDown.
func makeTemporaryDirectory() throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("mt-decode-\(getpid())-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

extension PacketDecoder {
    /// Decodes one frame into a fresh record (tests only).
    mutating func decodeFrame(_ frame: [UInt8], linkType: Int32, wireLength: Int? = nil, point: CapturePoint = .interface("any")) -> PacketRecord {
        var r = PacketRecord()
        r.point = point
        frame.withUnsafeBytes { decode(linkType: linkType, bytes: $0, wireLength: UInt32(wireLength ?? frame.count), into: &r) }
        return r
    }
}

/// A pcapng file built in memory: section header, interface blocks with options, enhanced packet blocks.
struct PcapngFileBuilder {
    private(set) var bytes: [UInt8] = []
    let order: ByteOrder

    init(order: ByteOrder = .host) {
        self.order = order
        bytes = block(0x0A0D_0D0A, u32(0x1A2B_3C4D) + u16(1) + u16(0) + [UInt8](repeating: 0xff, count: 8))
    }

    func u32(_ v: UInt32) -> [UInt8] { order == .big ? Frame.be32(v) : Frame.be32(v).reversed() }
    func u16(_ v: Int) -> [UInt8] { Frame.u16(v, order) }

    func block(_ type: UInt32, _ body: [UInt8]) -> [UInt8] {
        let padded = body + [UInt8](repeating: 0, count: (4 - body.count % 4) % 4)
        let length = UInt32(12 + padded.count)
        return u32(type) + u32(length) + padded + u32(length)
    }

    func option(_ code: Int, _ value: [UInt8]) -> [UInt8] {
        u16(code) + u16(value.count) + value + [UInt8](repeating: 0, count: (4 - value.count % 4) % 4)
    }

    mutating func addInterface(linkType: Int, name: String?, tsresol: UInt8? = nil, snaplen: UInt32 = 262_144) {
        var opts: [UInt8] = []
        if let name { opts += option(2, Array(name.utf8)) }
        if let tsresol { opts += option(9, [tsresol]) }
        if !opts.isEmpty { opts += option(0, []) }
        bytes += block(1, u16(linkType) + u16(0) + u32(snaplen) + opts)
    }

    /// `units` in the interface's timestamp resolution.
    mutating func addPacket(interface: UInt32, units: UInt64, _ frame: [UInt8], wireLength: Int? = nil) {
        bytes += block(6, u32(interface) + u32(UInt32(units >> 32)) + u32(UInt32(units & 0xffff_ffff))
                       + u32(UInt32(frame.count)) + u32(UInt32(wireLength ?? frame.count)) + frame)
    }

    mutating func addRaw(_ raw: [UInt8]) { bytes += raw }

    func write(_ dir: URL, _ name: String) throws -> String {
        let url = dir.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }
}
