import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The workload in a lab pod: an HTTP-ish server that answers one request per connection and says who asked,
/// so a test can tell which address the app saw (the original client's, through ztunnel's transparent socket).
public final class AppServerStandIn: @unchecked Sendable {
    public let port: UInt16
    public let name: String
    private var listeners: [LabSocket] = []
    private let log: @Sendable (String) -> Void

    public init(port: UInt16, name: String, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.port = port; self.name = name; self.log = log
    }

    public func start(families: [IPAddress.Family]) throws {
        for family in families {
            let l = try LabSocket.tcpListener(port: port, family: family, mark: nil)
            listeners.append(l)
            Thread.detachNewThread { [self] in
                while let (conn, peer) = l.accept() {
                    Thread.detachNewThread { [self] in answer(conn, peer); conn.close() }
                }
            }
        }
        log("app \(name) listening on :\(port)")
    }

    public func stop() {
        for l in listeners { _ = Glibc.shutdown(l.fd, Int32(SHUT_RDWR)); l.close() }
        listeners.removeAll()
    }

    private func answer(_ conn: LabSocket, _ peer: Endpoint) {
        conn.setTimeouts(seconds: 5)
        var request: [UInt8] = []
        // Up to the blank line that ends an HTTP request head, bounded.
        while request.count < 4096, !request.ends(with: [13, 10, 13, 10]) {
            guard let line = conn.readLine(limit: 1024) else { break }
            request += line
        }
        let first = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let local = conn.localEndpoint.map(\.description) ?? "?"
        log("app \(name) served \(peer) -> \(local): \(first)")
        let body = "\(name) answered \(peer) on \(local)\n"
        _ = conn.writeAll(Array("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)".utf8))
    }
}

/// A UDP responder: echoes datagrams, or (as a DNS upstream) turns each query into an empty answer.
public final class UDPResponderStandIn: @unchecked Sendable {
    public enum Mode: String, Sendable { case echo, dns }
    private var socket: LabSocket?
    private let log: @Sendable (String) -> Void

    public init(log: @escaping @Sendable (String) -> Void = { _ in }) { self.log = log }

    public func start(port: UInt16, family: IPAddress.Family, mode: Mode) throws {
        let any = family == .v6 ? IPAddress(v6: 0, 0) : IPAddress(v4: 0)
        let s = try LabSocket.udp(bound: Endpoint(any, port), family: family, mark: nil)
        socket = s
        Thread.detachNewThread { [log] in
            while let (datagram, from) = s.receiveFrom() {
                var reply = datagram
                // DNS header: set QR (response) and RA, keep the id and the question, no answers.
                if mode == .dns, reply.count >= 12 { reply[2] |= 0x80; reply[3] = 0x80 }
                _ = s.sendTo(reply, from)
                log("udp \(mode.rawValue) :\(port) answered \(from): \(datagram.count) bytes")
            }
        }
    }

    public func stop() {
        if let s = socket { _ = Glibc.shutdown(s.fd, Int32(SHUT_RDWR)); s.close() }
    }
}

/// The app's side of a request: one connection, one request, the whole reply, all bounded by a timeout.
public enum AppClient {
    /// Sends `GET path` to `target` and returns the reply. `mark` sets SO_MARK on the app's own socket
    /// (the escape where a process with CAP_NET_ADMIN claims to be ztunnel); `source` binds it first.
    /// `hold`: seconds to keep the connection open before sending the request (a long-lived connection).
    public static func get(_ target: Endpoint, path: String = "/", source: Endpoint? = nil, mark: UInt32? = nil,
                           timeout: Double = 5, hold: Double = 0) throws -> String {
        let s = try LabSocket.tcpConnect(to: target, from: source, mark: mark, transparent: false, timeout: timeout)
        defer { s.close() }
        if hold > 0 { usleep(UInt32(min(hold, 60) * 1_000_000)) }
        guard s.writeAll(Array("GET \(path) HTTP/1.0\r\nHost: \(target)\r\nUser-Agent: meshtrace-lab\r\n\r\n".utf8)) else {
            throw MeshtraceError(.kernelRefused, "sending the request to \(target) failed")
        }
        let reply = String(decoding: s.readToEnd(limit: 64 * 1024), as: UTF8.self)
        guard !reply.isEmpty else { throw MeshtraceError(.kernelRefused, "no reply from \(target) within \(Int(timeout)) s") }
        return reply
    }

    /// Sends one datagram and waits for one reply; nil when none came within the timeout.
    public static func exchange(_ target: Endpoint, payload: [UInt8], source: Endpoint? = nil, mark: UInt32? = nil,
                                timeout: Double = 2) throws -> [UInt8]? {
        let s = try LabSocket.udp(bound: source, family: target.addr.family, mark: mark)
        defer { s.close() }
        s.setTimeouts(seconds: timeout)
        guard s.sendTo(payload, target) else { throw MeshtraceError(.kernelRefused, LabSocket.errorText("sendto \(target)")) }
        return s.receiveFrom()?.0
    }

    /// A minimal DNS query (A record for `name`, recursion desired) with the given id.
    public static func dnsQuery(name: String, id: UInt16) -> [UInt8] {
        var q: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xff), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        for label in name.split(separator: ".") { q.append(UInt8(label.utf8.count)); q += Array(label.utf8) }
        q += [0, 0, 1, 0, 1]
        return q
    }
}

extension Array where Element == UInt8 {
    func ends(with suffix: [UInt8]) -> Bool { count >= suffix.count && Array(self[(count - suffix.count)...]) == suffix }
}
