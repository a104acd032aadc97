/// One line of a ztunnel stand-in's log that says which tunnel or passthrough carried an outbound app connection, as
/// `ZtunnelStandIn.logCarried` writes it: "outbound APP -> DST[ (service, endpoint E)]: hbone [new |pooled ]LOCAL ->
/// PEER:15008[ (multiplexed)]", or "...: passthrough LOCAL -> E". The tests' one reader of that format.
struct CarriedLine {
    /// The app connection's source port.
    var app: UInt16
    /// "new" or "pooled" for a kept or multiplexed tunnel; nil for a tunnel per connection or a passthrough.
    var reuse: Substring?
    /// The local port of the tunnel or passthrough that carried it.
    var via: UInt16
    var multiplexed: Bool

    init?(_ line: Substring) {
        let words = line.split(separator: " ")
        guard words.count >= 7, words[0] == "outbound", let h = words.firstIndex(where: { $0 == "hbone" || $0 == "passthrough" }),
              h + 2 < words.count, let app = words[1].split(separator: ":").last.flatMap({ UInt16($0) }) else { return nil }
        let reuse = words[h + 1] == "new" || words[h + 1] == "pooled" ? words[h + 1] : nil
        guard let via = words[reuse == nil ? h + 1 : h + 2].split(separator: ":").last.flatMap({ UInt16($0) }) else { return nil }
        self.app = app
        self.reuse = reuse
        self.via = via
        multiplexed = line.hasSuffix("(multiplexed)")
    }
}
