import ArgumentParser
import Capture
import Foundation
#if canImport(Glibc)
import Glibc
#endif

// Hidden subcommands the lab starts inside its namespaces (via nsenter): the ztunnel stand-in and the app stand-ins.
// They are commands, not library calls, because a socket belongs to the netns it was made in: each runs as its own
// process inside one pod's netns and is killed on teardown.

/// Common to the long-running stand-ins: how long they may live and whether they die with the lab.
struct StandInLifetime: ParsableArguments {
    @Option(name: .long, help: "Exit after this many seconds whatever happens (a bound for a forgotten lab).")
    var lifetime: Double = 6 * 3600

    @Flag(name: .long, help: "Exit when the process that started this one dies (even by SIGKILL).")
    var dieWithParent = false

    /// Blocks until SIGTERM/SIGINT, the parent's death (with --die-with-parent) or the end of the lifetime.
    func wait() -> Never {
        signal(SIGTERM) { _ in _exit(0) }
        signal(SIGINT) { _ in _exit(0) }
        signal(SIGPIPE, SIG_IGN)
        // prctl(PR_SET_PDEATHSIG) is variadic and not callable from Swift; a re-parented process is the same signal.
        let parent = getppid()
        let deadline = Date().addingTimeInterval(lifetime)
        while Date() < deadline {
            if dieWithParent && getppid() != parent { _exit(0) }
            Thread.sleep(forTimeInterval: 0.5)
        }
        _exit(0)
    }
}

private let printLine: @Sendable (String) -> Void = { line in
    print(line)
    fflush(stdout)
}

struct ZtunnelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_ztunnel", abstract: "Run the ztunnel stand-in in the current network namespace (the lab uses this).",
        shouldDisplay: false)

    @Option(name: .customLong("pod-ip"), help: "The pod's own address (repeat for dual-stack).")
    var podIPs: [String]

    @Option(name: .long, help: "An address or CIDR of mesh pods: outbound to these is tunnelled to :15008 (repeatable).")
    var mesh: [String] = []

    @Option(name: .long, help: "Serve DNS on 127.0.0.1:15053 and forward queries to this upstream (IP:PORT).")
    var dnsUpstream: String?

    @Flag(name: .long, help: "Keep HBONE connections open and send later app connections to the same destination through them (as ztunnel pools them).")
    var poolTunnels = false

    @Flag(name: .long, help: "Send every app connection to a destination through one HBONE connection, several at once (as ztunnel's pool multiplexes HTTP/2 streams).")
    var multiplexTunnels = false

    @Option(name: .long, help: "With --multiplex-tunnels: at most N streams at once on one tunnel; a connection to a destination whose tunnels are full opens another (as ztunnel's POOL_MAX_STREAMS_PER_CONNECTION).")
    var tunnelStreams: Int?

    @Option(name: .long, help: "VIP=ENDPOINT[,ENDPOINT...]: connections the app makes to the service VIP go to these addresses in turn (repeatable).")
    var service: [String] = []

    @OptionGroup var lifetime: StandInLifetime

    func run() throws {
        try reportingErrors {
            var addrs: [IPAddress] = []
            for text in podIPs {
                guard let a = IPAddress(text) else { throw MeshtraceError(.usage, "--pod-ip \(text) is not an IP address") }
                addrs.append(a)
            }
            var cidrs: [CIDR] = []
            for text in mesh {
                guard let c = LabAddressing.cidr(text) else { throw MeshtraceError(.usage, "--mesh \(text) is not an address or CIDR") }
                cidrs.append(c)
            }
            var config = ZtunnelConfig(podAddresses: addrs, mesh: cidrs)
            config.poolTunnels = poolTunnels
            config.multiplexTunnels = multiplexTunnels
            if let n = tunnelStreams {
                guard n >= 1, multiplexTunnels else { throw MeshtraceError(.usage, "--tunnel-streams takes a count of 1 or more, with --multiplex-tunnels") }
                config.streamsPerTunnel = n
            }
            for text in service {
                let parts = text.split(separator: "=", maxSplits: 1).map(String.init)
                let endpoints = parts.count == 2 ? parts[1].split(separator: ",").map { IPAddress(String($0)) } : []
                guard parts.count == 2, let vip = IPAddress(parts[0]), !endpoints.isEmpty, !endpoints.contains(nil) else {
                    throw MeshtraceError(.usage, "--service \(text) is not VIP=ENDPOINT[,ENDPOINT...]")
                }
                config.services[vip, default: []] += endpoints.compactMap { $0 }
            }
            if let up = dnsUpstream {
                guard let ep = Endpoint(parsing: up) else { throw MeshtraceError(.usage, "--dns-upstream \(up) is not IP:PORT") }
                config.dnsPort = 15053
                config.dnsUpstream = ep
            }
            let standIn = ZtunnelStandIn(config: config, log: printLine)
            try standIn.start()
            lifetime.wait()
        }
    }
}

struct AppCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_app", abstract: "App stand-ins for the lab: a server, an HTTP-ish client, a UDP client.",
        shouldDisplay: false, subcommands: [Serve.self, Get.self, UDP.self])

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "serve", abstract: "Answer HTTP-ish requests (and UDP) until killed.")

        @Option(name: .long, help: "TCP port to answer on.") var port: UInt16 = 80
        @Option(name: .long, help: "Name put in the answers.") var name: String = "app"
        @Flag(name: .long, help: "Listen on IPv6 too.") var ipv6 = false
        @Option(name: .long, help: "Also echo UDP datagrams on this port.") var udpEcho: UInt16?
        @Option(name: .long, help: "Also answer DNS queries (empty answers) on this UDP port.") var dns: UInt16?
        @OptionGroup var lifetime: StandInLifetime

        func run() throws {
            try reportingErrors {
                let families: [IPAddress.Family] = ipv6 ? [.v4, .v6] : [.v4]
                let server = AppServerStandIn(port: port, name: name, log: printLine)
                try server.start(families: families)
                var responders: [UDPResponderStandIn] = []
                for family in families {
                    if let p = udpEcho { let r = UDPResponderStandIn(log: printLine); try r.start(port: p, family: family, mode: .echo); responders.append(r) }
                    if let p = dns { let r = UDPResponderStandIn(log: printLine); try r.start(port: p, family: family, mode: .dns); responders.append(r) }
                }
                lifetime.wait()
            }
        }
    }

    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "get", abstract: "Send one request to IP:PORT and print the reply.")

        @Argument(help: "IP:PORT or [IPv6]:PORT") var target: String
        @Option(name: .long, help: "Bind to this source address (IP, or IP:PORT / [IPv6]:PORT) first.") var source: String?
        @Option(name: .long, help: "Set SO_MARK on the app's own socket (e.g. 0x539: pretend to be ztunnel).") var mark: String?
        @Option(name: .long, help: "Seconds to wait for connect and reply.") var timeout: Double = 5
        @Option(name: .long, help: "Seconds to hold the connection open before sending the request (at most 60).") var hold: Double = 0

        func run() throws {
            try reportingErrors {
                guard hold >= 0, hold <= 60 else { throw MeshtraceError(.usage, "--hold takes 0 to 60 seconds") }
                let ep = try LabAddressing.endpoint(target)
                let src = try source.map { s -> Endpoint in
                    if let a = IPAddress(s) { return Endpoint(a, 0) }
                    guard let ep = Endpoint(parsing: s) else { throw MeshtraceError(.usage, "--source \(s) is not IP, IP:PORT or [IPv6]:PORT") }
                    return ep
                }
                let reply = try AppClient.get(ep, source: src, mark: try mark.map(LabAddressing.mark), timeout: timeout, hold: hold)
                print(reply, terminator: reply.hasSuffix("\n") ? "" : "\n")
                return .ok
            }
        }
    }

    struct UDP: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "udp", abstract: "Send one datagram to IP:PORT and print the reply's size.")

        @Argument(help: "IP:PORT or [IPv6]:PORT") var target: String
        @Option(name: .long, help: "Send a DNS query for this name instead of a text datagram.") var dns: String?
        @Option(name: .long, help: "Set SO_MARK on the socket.") var mark: String?
        @Option(name: .long, help: "Seconds to wait for the reply.") var timeout: Double = 2

        func run() throws {
            try reportingErrors {
                let ep = try LabAddressing.endpoint(target)
                let id = UInt16.random(in: 1...0xfffe)
                let payload = dns.map { AppClient.dnsQuery(name: $0, id: id) } ?? Array("meshtrace lab datagram\n".utf8)
                guard let reply = try AppClient.exchange(ep, payload: payload, mark: try mark.map(LabAddressing.mark), timeout: timeout) else {
                    throw MeshtraceError(.kernelRefused, "no UDP reply from \(ep) within \(timeout) s")
                }
                if dns != nil {
                    guard reply.count >= 12, reply[0] == UInt8(id >> 8), reply[1] == UInt8(id & 0xff), reply[2] & 0x80 != 0 else {
                        throw MeshtraceError(.kernelRefused, "the reply from \(ep) is not a DNS answer to query \(id)")
                    }
                    print("dns answer id \(id) from \(ep): \(reply.count) bytes")
                } else {
                    print("udp reply from \(ep): \(reply.count) bytes")
                }
                return .ok
            }
        }
    }
}
