// Interface names as small numbers, so a `CapturePoint` (and with it every `PacketRecord`) holds no
// reference-counted storage: records are filled, copied and compared once per packet.

import Foundation

/// An interface name ("lo", "eth0", a pcapng if_name, the stem of a file's name) interned into a process-wide
/// table: equal names have equal numbers. The table only grows, by one entry per distinct name, and the names a
/// process meets are few (its capture points); past `InterfaceNameTable.maxNames` a new name is "?".
public struct InterfaceName: Hashable, Sendable, CustomStringConvertible {
    public let id: UInt32

    public init(_ name: String) { id = InterfaceNameTable.shared.intern(name) }
    init(id: UInt32) { self.id = id }

    public var string: String { InterfaceNameTable.shared.name(id) }
    public var description: String { string }

    // Fixed numbers: the table starts with these names, so per-packet code compares without a lookup.
    public static var empty: InterfaceName { InterfaceName(id: 0) }
    public static var any: InterfaceName { InterfaceName(id: 1) }
    public static var lo: InterfaceName { InterfaceName(id: 2) }
    public static var questionMark: InterfaceName { InterfaceName(id: 3) }
}

final class InterfaceNameTable: @unchecked Sendable {
    static let shared = InterfaceNameTable()

    static let maxNames = 65_536
    private let lock = NSLock()
    private var names: [String] = ["", "any", "lo", "?"]
    private var ids: [String: UInt32] = ["": 0, "any": 1, "lo": 2, "?": 3]

    func intern(_ given: String) -> UInt32 {
        // A name from a capture file (pcapng if_name) is printed as it is kept: without control characters.
        let name = given.printable
        lock.lock()
        defer { lock.unlock() }
        if let id = ids[name] { return id }
        // A hostile capture can name a new interface per packet (pcapng sections); the table lives as long as the
        // process: past this, names are "?".
        guard names.count < InterfaceNameTable.maxNames else { return InterfaceName.questionMark.id }
        let id = UInt32(names.count)
        names.append(name)
        ids[name] = id
        return id
    }

    func name(_ id: UInt32) -> String {
        lock.lock()
        defer { lock.unlock() }
        return names[Int(id)]
    }
}
