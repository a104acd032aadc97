import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What the ztunnel stand-in needs to know about the pod it serves.
public struct ZtunnelConfig: Sendable {
    /// The pod's own addresses (one per family it has). Listeners are opened for each family present.
    public var podAddresses: [IPAddress]
    /// Addresses of pods in the mesh: outbound connections to them are tunnelled to `peer:15008`;
    /// anything else is passed through directly (still from a 0x539-marked socket), as ztunnel does.
    public var mesh: [CIDR]
    /// The packet mark on every socket ztunnel makes in the pod (Istio: 0x539, mask 0xfff).
    public var mark: UInt32 = 0x539
    public var outboundPort: UInt16 = 15001
    public var inboundPlaintextPort: UInt16 = 15006
    public var hbonePort: UInt16 = 15008
    /// The DNS proxy port (15053) and where it forwards queries; nil: no DNS proxy.
    public var dnsPort: UInt16? = nil
    public var dnsUpstream: Endpoint? = nil
    /// Connections served at once; more are refused (closed), so a runaway client cannot exhaust the process.
    public var maxConnections = 256
    /// A relay with no bytes moving for this long is closed.
    public var idleSeconds: Double = 30
    /// Keep each HBONE connection open after its app connection ends and send the next app connection to the same
    /// destination through it, as ztunnel pools HBONE connections (one stream at a time here, framed; ztunnel
    /// multiplexes HTTP/2 streams). The serving side follows whatever the client does.
    public var poolTunnels = false
    /// Send every connection to a destination through one HBONE connection, several at once, as ztunnel's pool
    /// multiplexes HTTP/2 streams (`MultiplexedTunnel`): the tunnel opened for the first stays open for the rest.
    public var multiplexTunnels = false
    /// With `multiplexTunnels`: at most this many streams at once on one tunnel; a connection to a destination whose
    /// tunnels are all full opens another, as ztunnel's pool does (POOL_MAX_STREAMS_PER_CONNECTION, 100 by default).
    /// Nil: no limit (one tunnel per destination).
    public var streamsPerTunnel: Int? = nil
    /// Service VIPs and the endpoint addresses ztunnel sends their connections to: ztunnel resolves a VIP the app
    /// dialled to one of the service's endpoints itself, so the HBONE destination is that pod's, not the VIP (or,
    /// for an endpoint outside the mesh, the passthrough's). Several endpoints take the connections in turn.
    public var services: [IPAddress: [IPAddress]] = [:]

    public init(podAddresses: [IPAddress], mesh: [CIDR]) {
        self.podAddresses = podAddresses
        self.mesh = mesh
    }

    func inMesh(_ a: IPAddress) -> Bool { mesh.contains { $0.contains(a) } }
}

/// A small stand-in for ztunnel in in-pod mode, written from AMBIENT.md. It runs inside a pod's network namespace:
/// - 15001 (outbound capture): reads the original destination (SO_ORIGINAL_DST), and for a mesh destination opens a
///   new 0x539-marked connection to `destination:15008` carrying an opaque tunnel; otherwise connects directly.
/// - 15008 (inbound HBONE): reads the tunnel header, connects to the app at the target from the HBONE peer's address
///   (IP_TRANSPARENT), 0x539-marked, so the pod's connmark 0x111 path runs for the app's replies.
/// - 15006 (inbound plaintext): the same without a tunnel; the target is the original destination.
/// - 15053 (optional): forwards DNS over UDP to an upstream from a 0x539-marked socket.
/// What differs from ztunnel: no mTLS (an XOR keystream makes the tunnel opaque, nothing more), no HTTP/2 CONNECT
/// framing (pooled tunnels carry one length-framed stream at a time), no identities or policy, no DNS answers of its
/// own (docs/LAB.md).
public final class ZtunnelStandIn: @unchecked Sendable {
    public let config: ZtunnelConfig
    private let log: @Sendable (String) -> Void
    private var listeners: [LabSocket] = []
    private var dnsSocket: LabSocket?
    private let lock = NSLock()
    private var active = 0
    private var stopped = false
    /// Idle pooled tunnels by HBONE endpoint (`poolTunnels`), at most one per destination.
    private var idleTunnels: [Endpoint: TunnelConnection] = [:]
    /// The multiplexed tunnels to each HBONE endpoint (`multiplexTunnels`), in the order they were opened, with the
    /// streams each carries now; one per endpoint unless `streamsPerTunnel` filled it.
    private var sharedTunnels: [Endpoint: [(tunnel: MultiplexedTunnel, streams: Int)]] = [:]
    /// How many connections each service VIP has sent to its endpoints (`endpoint(of:)`).
    private var serviceTurns: [IPAddress: Int] = [:]

    public init(config: ZtunnelConfig, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.config = config
        self.log = log
    }

    /// Opens every listener (throws if one cannot be opened: a port taken, no CAP_NET_ADMIN for SO_MARK), then serves
    /// each on its own thread.
    public func start() throws {
        let families = Array(Set(config.podAddresses.map(\.family))).sorted { $0.rawValue < $1.rawValue }
        do {
            for family in families {
                for (port, serve) in [(config.outboundPort, serveOutbound), (config.inboundPlaintextPort, serveInboundPlaintext),
                                      (config.hbonePort, serveHBONE)] as [(UInt16, (LabSocket, Endpoint) -> Void)] {
                    // Transparent so TPROXY-era rulesets (Istio 1.21-1.23) can deliver inbound connections too.
                    let l = try LabSocket.tcpListener(port: port, family: family, mark: config.mark,
                                                      transparent: port != config.outboundPort)
                    listeners.append(l)
                    startAcceptLoop(l, serve)
                }
            }
            if let port = config.dnsPort, let upstream = config.dnsUpstream {
                // Bound to loopback: a REDIRECTed query's reply must come from 127.0.0.1 for conntrack to un-NAT it.
                let s = try LabSocket.udp(bound: Endpoint(IPAddress(v4: 0x7f00_0001), port), family: .v4, mark: config.mark)
                dnsSocket = s
                Thread.detachNewThread { [self] in serveDNS(s, upstream: upstream) }
            }
        } catch {
            stop()
            throw error
        }
        log("ztunnel stand-in up: pod \(config.podAddresses.map(\.description).joined(separator: ",")) mesh \(config.mesh.map(\.description).joined(separator: ",")) mark 0x\(String(config.mark, radix: 16))")
    }

    public func stop() {
        lock.lock()
        stopped = true
        let ls = listeners
        listeners.removeAll()
        lock.unlock()
        // shutdown() wakes the threads blocked in accept(); close alone would not.
        for l in ls { _ = Glibc.shutdown(l.fd, Int32(SHUT_RDWR)); l.close() }
        lock.lock()
        let idle = idleTunnels.values
        idleTunnels.removeAll()
        lock.unlock()
        for t in idle { t.socket.close() }
        lock.lock()
        let shared = sharedTunnels.values.flatMap { $0 }
        sharedTunnels.removeAll()
        lock.unlock()
        for t in shared { t.tunnel.shutdown() }
        if let d = dnsSocket { _ = Glibc.shutdown(d.fd, Int32(SHUT_RDWR)); d.close() }
    }

    private func startAcceptLoop(_ listener: LabSocket, _ serve: @escaping (LabSocket, Endpoint) -> Void) {
        Thread.detachNewThread { [self] in
            while let (conn, peer) = listener.accept() {
                guard admit() else { log("refused \(peer): \(config.maxConnections) connections open"); conn.close(); continue }
                Thread.detachNewThread { [self] in
                    serve(conn, peer)
                    conn.close()
                    release()
                }
            }
        }
    }

    private func admit() -> Bool {
        lock.lock(); defer { lock.unlock() }
        guard !stopped, active < config.maxConnections else { return false }
        active += 1
        return true
    }

    private func release() { lock.lock(); active -= 1; lock.unlock() }

    private func serveOutbound(_ app: LabSocket, _ peer: Endpoint) {
        let dialled: Endpoint
        do { dialled = try app.originalDestination() } catch { log("outbound \(peer): \(error)"); return }
        // A service VIP goes to the endpoint ztunnel picked for it.
        let target = endpoint(of: dialled) ?? dialled
        let said = target == dialled ? "\(target)" : "\(dialled) (service, endpoint \(target))"
        if config.inMesh(target.addr) && config.multiplexTunnels {
            serveMultiplexed(app, peer, target: target, said: said)
        } else if config.inMesh(target.addr) && config.poolTunnels {
            servePooled(app, peer, target: target, said: said)
        } else if config.inMesh(target.addr) {
            let hbone = Endpoint(target.addr, config.hbonePort)
            guard let t = TunnelConnection.open(to: hbone, mark: config.mark) else {
                log("outbound \(peer) -> \(said): HBONE connect to \(hbone) failed"); return
            }
            guard t.socket.writeAll(t.up.applied(TunnelHeader.line(target: target))) else { return }
            logCarried(peer, said, "hbone", t.socket, to: hbone)
            app.relay(with: t.socket, idle: config.idleSeconds,
                      transformUp: { t.up.apply($0) }, transformDown: { t.down.apply($0) })
        } else {
            guard let direct = try? LabSocket.tcpConnect(to: target, mark: config.mark) else {
                log("outbound \(peer) -> \(said): passthrough connect failed"); return
            }
            direct.setTimeouts(seconds: 0)
            logCarried(peer, said, "passthrough", direct, to: target)
            app.relay(with: direct, idle: config.idleSeconds)
        }
    }

    /// The endpoint a connection to a service VIP goes to: the service's endpoints in turn (nil: not a VIP).
    private func endpoint(of dialled: Endpoint) -> Endpoint? {
        guard let endpoints = config.services[dialled.addr], !endpoints.isEmpty else { return nil }
        lock.lock()
        let turn = serviceTurns[dialled.addr, default: 0]
        serviceTurns[dialled.addr] = turn &+ 1
        lock.unlock()
        return Endpoint(endpoints[turn % endpoints.count], dialled.port)
    }

    private func serveHBONE(_ tunnel: LabSocket, _ peer: Endpoint) {
        tunnel.setTimeouts(seconds: 5)
        guard let t = TunnelConnection.accept(tunnel) else { log("hbone \(peer): no tunnel header"); return }
        guard var line = tunnel.readLine(transform: { t.up.apply(&$0) }) else { log("hbone \(peer): bad tunnel header"); return }
        if line == MultiplexedTunnel.headerLine {
            tunnel.setTimeouts(seconds: 0)
            MultiplexedTunnel.serve(t) { [self] target in openAppLeg(target: target, client: peer, kind: "hbone", note: " (multiplexed)") }
            return
        }
        // A pooled tunnel: framed streams, one after another, each to its own target.
        while let target = TunnelHeader.parseStream(line) {
            tunnel.setTimeouts(seconds: 0)
            var carried = false
            connectToApp(target: target, client: peer, kind: "hbone stream") { app in
                carried = TunnelConnection.relayFramed(plain: app, tunnel: tunnel, idle: config.idleSeconds, send: &t.down, receive: &t.up)
            }
            guard carried, let next = tunnel.readLine(transform: { t.up.apply(&$0) }) else { return }
            line = next
        }
        guard let target = TunnelHeader.parse(line) else {
            log("hbone \(peer): bad tunnel header"); return
        }
        tunnel.setTimeouts(seconds: 0)
        connectToApp(target: target, client: peer, kind: "hbone") { app in
            tunnel.relay(with: app, idle: config.idleSeconds,
                         transformUp: { t.up.apply($0) }, transformDown: { t.down.apply($0) })
        }
    }

    /// An outbound app connection through a pooled tunnel: an idle one to the destination, or a new one; back to
    /// the pool when its stream ended cleanly.
    private func servePooled(_ app: LabSocket, _ peer: Endpoint, target: Endpoint, said: String) {
        let hbone = Endpoint(target.addr, config.hbonePort)
        lock.lock()
        let idle = idleTunnels.removeValue(forKey: hbone)
        lock.unlock()
        guard let t = idle ?? TunnelConnection.open(to: hbone, mark: config.mark) else {
            log("outbound \(peer) -> \(said): HBONE connect to \(hbone) failed"); return
        }
        let reused = idle != nil
        guard t.socket.writeAll(t.up.applied(TunnelHeader.streamLine(target: target))) else { t.socket.close(); return }
        logCarried(peer, said, reused ? "hbone pooled" : "hbone new", t.socket, to: hbone)
        if TunnelConnection.relayFramed(plain: app, tunnel: t.socket, idle: config.idleSeconds, send: &t.up, receive: &t.down) {
            lock.lock()
            let spare = stopped ? t : idleTunnels.updateValue(t, forKey: hbone)
            lock.unlock()
            spare?.socket.close()
        } else {
            t.socket.close()
        }
    }

    /// An outbound app connection as a stream of a multiplexed tunnel to its destination: the first open one with room
    /// for another stream (`streamsPerTunnel`), or a new one (opened under the lock, so concurrent connections to a
    /// destination share the tunnels there are, as in ztunnel's pool). Tunnels that went are forgotten.
    private func serveMultiplexed(_ app: LabSocket, _ peer: Endpoint, target: Endpoint, said: String) {
        let hbone = Endpoint(target.addr, config.hbonePort)
        let limit = config.streamsPerTunnel ?? .max
        lock.lock()
        var pool = sharedTunnels[hbone, default: []].filter { !$0.tunnel.isClosed }
        var slot = pool.firstIndex { $0.streams < limit }
        let reused = slot != nil
        if slot == nil, !stopped, let opened = MultiplexedTunnel.open(to: hbone, mark: config.mark) {
            pool.append((opened, 0))
            slot = pool.count - 1
        }
        let tunnel = slot.map { pool[$0].tunnel }
        if let slot { pool[slot].streams += 1 }
        sharedTunnels[hbone] = pool
        lock.unlock()
        guard let tunnel else { log("outbound \(peer) -> \(said): HBONE connect to \(hbone) failed"); return }
        logCarried(peer, said, reused ? "hbone pooled" : "hbone new", tunnel.connection.socket, to: hbone, note: " (multiplexed)")
        _ = tunnel.carry(app, to: target, idle: config.idleSeconds)
        lock.lock()
        if let i = sharedTunnels[hbone]?.firstIndex(where: { $0.tunnel === tunnel }) { sharedTunnels[hbone]![i].streams -= 1 }
        lock.unlock()
    }

    /// Which tunnel or passthrough carries an outbound app connection, in the one format the lab's tests read
    /// ("outbound APP -> DST: hbone [new |pooled ]LOCAL -> PEER:15008[ (multiplexed)]", "...: passthrough LOCAL -> E").
    private func logCarried(_ peer: Endpoint, _ said: String, _ how: String, _ socket: LabSocket, to remote: Endpoint, note: String = "") {
        log("outbound \(peer) -> \(said): \(how) \(socket.localEndpoint.map(\.description) ?? "?") -> \(remote)\(note)")
    }

    private func serveInboundPlaintext(_ conn: LabSocket, _ peer: Endpoint) {
        let target: Endpoint
        do { target = try conn.originalDestination() } catch { log("inbound \(peer): \(error)"); return }
        connectToApp(target: target, client: peer, kind: "inbound") { app in
            conn.relay(with: app, idle: config.idleSeconds)
        }
    }

    /// Connects to the app as the original client (IP_TRANSPARENT, bound to the client's address), 0x539-marked:
    /// the packets loop through lo, mangle PREROUTING sets connmark 0x111, and the app's replies come back here.
    private func connectToApp(target: Endpoint, client: Endpoint, kind: String, relay: (LabSocket) -> Void) {
        if let app = openAppLeg(target: target, client: client, kind: kind) { relay(app) }
    }

    /// `connectToApp`'s connection, logged (`note` ends the line), for the caller to relay: nil (logged) when it
    /// could not be made.
    private func openAppLeg(target: Endpoint, client: Endpoint, kind: String, note: String = "") -> LabSocket? {
        let source = client.addr.family == target.addr.family ? Endpoint(client.addr, 0) : nil
        do {
            let app = try LabSocket.tcpConnect(to: target, from: source, mark: config.mark, transparent: source != nil)
            app.setTimeouts(seconds: 0)
            log("\(kind) \(client) -> \(target): app leg \(app.localEndpoint.map(\.description) ?? "?") -> \(target)\(note)")
            return app
        } catch {
            log("\(kind) \(client) -> \(target): \(error)")
            return nil
        }
    }

    private func serveDNS(_ s: LabSocket, upstream: Endpoint) {
        while let (query, from) = s.receiveFrom() {
            guard !query.isEmpty else { continue }
            guard let up = try? LabSocket.udp(bound: nil, family: upstream.addr.family, mark: config.mark) else { continue }
            up.setTimeouts(seconds: 2)
            if up.sendTo(query, upstream), let (answer, _) = up.receiveFrom() {
                _ = s.sendTo(answer, from)
                log("dns \(from) -> \(upstream): \(answer.count) bytes answered")
            } else {
                log("dns \(from) -> \(upstream): no answer")
            }
            up.close()
        }
    }
}
