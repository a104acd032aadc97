// The knobs of the correlation engine. Defaults follow Istio ambient's in-pod redirection
// (AMBIENT.md): ztunnel's ports, its socket mark and the connmark it leaves on connections into the pod.

public struct CorrelatorOptions: Sendable {
    /// The pod's own addresses (`--pod-ip`). When empty they are inferred from the traffic.
    public var podAddresses: [IPAddress] = []
    /// A name for the pod's non-loopback interface when the capture does not carry one (`tcpdump -i any` in SLL v1).
    public var interfaceName: String? = nil

    /// Events kept per connection; later packets are counted in `droppedEvents`, so a long-lived connection
    /// (a pooled HBONE tunnel) cannot grow without bound.
    public var maxEventsPerConnection = 512
    /// Open connections at most: past this, the 1/16 of them seen least lately are finished at once (printed as
    /// ended early, and counted), so a flood of SYNs nobody answers (each a connection kept until the idle timeout,
    /// ~2 KB) cannot take the memory a capture or a trace runs in. A pod rarely has more than a few thousand open.
    public var maxOpenConnections = 65_536
    /// Connections with no packet for this long (capture time) are emitted and dropped.
    public var tcpIdleTimeoutNanos: Int64 = 120_000_000_000
    public var otherIdleTimeoutNanos: Int64 = 30_000_000_000
    /// A closed connection stays in the table this long, because NFLOG records arrive in batches and
    /// the last ones may be stamped after the capture's FIN/ACK.
    public var closeLingerNanos: Int64 = 2_000_000_000
    /// How often (capture time) the open connections are checked for the linger and the idle timeouts.
    public var sweepIntervalNanos: Int64 = 1_000_000_000
    /// Emitted connections' event arrays kept for new connections: at most 64, or (true) as many as there are
    /// open connections. A live trace emits in bursts, a sweep's worth at a time, and opens connections steadily:
    /// with 64 kept, most new connections allocated their array (3-7 KB, from glibc's bins rather than its
    /// per-thread cache) and the app's leg grew it once more.
    public var spareEventArraysFollowOpenConnections = false
    /// How far apart the two connections of a ztunnel hop may start. Timing is only ever supporting evidence.
    public var hopWindowNanos: Int64 = 2_000_000_000
    /// NFLOG records are stamped on receipt in batches, so a hop's inner connection can appear stamped
    /// slightly *before* its outer one.
    public var hopSlackNanos: Int64 = 1_000_000_000
    /// How long after a packet ztunnel relays its bytes (app to tunnel going out, tunnel to app coming in, and the
    /// mirror inbound), when several open tunnels could have carried a connection (pooling): in lab runs 15 µs to
    /// 1.5 ms, the longest while a new tunnel was still being set up.
    public var relayWindowNanos: Int64 = 2_000_000
    /// A tunnel's data packets kept for relay timing once it stops keeping events (`maxEventsPerConnection`): a ring
    /// of the latest (16 bytes each), so a long-lived pooled tunnel's later connections are still compared. A
    /// connection older than what the ring holds is told so (`blind` in its relay-timing evidence).
    public var relayDataKept = 4096

    /// ztunnel's own connections out of the pod (tunnels, passthrough) remembered after they were emitted, so that
    /// their last packets read late (a live reader far behind) are told from a forged mark: ~8 s of a pod opening
    /// 2000 tunnels a second, ~1.5 MB at most. (4096 marked connections of any kind held ~1 s of the catch-up test's
    /// load; whether a reader that far behind caused its one false escape in CI is a guess.)
    public var emittedTunnelsKept = 16_384

    /// ztunnel's SO_MARK (0x539/0xfff) and the connmark its connections into the pod get (0x111/0xfff).
    public var ztunnelMark: UInt32 = 0x539
    public var ztunnelConnmark: UInt32 = 0x111
    public var markMask: UInt32 = 0xfff

    public var outboundCapturePort: UInt16 = 15001
    public var inboundPlaintextPort: UInt16 = 15006
    public var hbonePort: UInt16 = 15008
    public var dnsCapturePort: UInt16 = 15053

    /// kubelet probes are SNATed on the host to these (Istio `cni/pkg/config`).
    public var probeAddresses: [IPAddress] = [
        IPAddress("169.254.7.127")!, IPAddress("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")!,
    ]

    /// Show only connections with a selected packet (`PacketRecord.selected`, set by `trace --filter`), and the
    /// connections joined to them by a ztunnel hop; the others are counted in `connectionsFilteredOut`.
    public var showsOnlySelected = false

    /// Findings kept in the summary; later ones are still sent to the sinks and counted.
    public var maxFindingsKept = 10_000

    public init() {}

    /// Live tracing: meshtrace's own NFLOG instance flushes within 10 ms and the tracer holds records 30 ms, so
    /// late records are ~50 ms late at most, not the up-to-a-second of a `tcpdump -i nflog` capture. A closed
    /// connection is printed ~0.5-0.75 s after its close, and the table holds a quarter of the connections the
    /// file default would (what a busy pod costs in memory and in page faults).
    public static var live: CorrelatorOptions {
        var o = CorrelatorOptions()
        o.closeLingerNanos = 500_000_000
        o.sweepIntervalNanos = 250_000_000
        o.spareEventArraysFollowOpenConnections = true
        return o
    }
}
