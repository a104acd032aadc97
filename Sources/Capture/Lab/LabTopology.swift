import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Which program loads the iptables-form rulesets into the lab's pods (nft-form rulesets always use `nft`).
public enum LabBackend: String, Sendable, CaseIterable {
    case iptablesNft = "iptables-nft"
    case iptablesLegacy = "iptables-legacy"
    case nftables = "nft"
}

public struct LabOptions: Sendable {
    public var ruleset: LabRuleset = .seed
    public var backend: LabBackend = .iptablesNft
    /// Give every pod an IPv6 address too (the IPv6 scenarios need it).
    public var dualStack = false
    /// The meshtrace executable that runs the stand-ins (`_ztunnel`, `_app`) inside the namespaces.
    public var executable: String
    /// Leave the stand-ins running after this process exits (`meshtrace lab --keep`).
    public var keep = false
    /// The ztunnel stand-ins keep HBONE connections open and reuse them for later connections to the same pod.
    public var poolTunnels = false
    /// The ztunnel stand-ins send every connection to a pod through one HBONE connection, several at once.
    public var multiplexTunnels = false
    /// With `multiplexTunnels`: at most this many streams on one tunnel at once; more open another tunnel to the
    /// same pod (ztunnel's POOL_MAX_STREAMS_PER_CONNECTION). Nil: one tunnel per pod.
    public var streamsPerTunnel: Int?

    public init(executable: String) { self.executable = executable }
}

/// One network namespace of the lab and what lives in it.
public final class LabPod: @unchecked Sendable {
    public enum Role: String, Sendable { case node, client, server, peer }
    public let role: Role
    public let netns: ScratchNetns
    public let ipv4: IPAddress
    public let ipv6: IPAddress?
    /// Pods in the mesh have the ambient rules and a ztunnel stand-in.
    public var inMesh: Bool { role == .client || role == .server }
    public var name: String { netns.name }
    public var ref: NetnsRef { netns.ref }
    public var addresses: [IPAddress] { [ipv4] + (ipv6.map { [$0] } ?? []) }

    init(role: Role, netns: ScratchNetns, ipv4: IPAddress, ipv6: IPAddress?) {
        self.role = role; self.netns = netns; self.ipv4 = ipv4; self.ipv6 = ipv6
    }
}

/// A process the lab started inside one of its namespaces; its output goes to a log file.
final class LabProcess: @unchecked Sendable {
    let label: String
    let process: Process
    let logPath: String

    init(label: String, process: Process, logPath: String) {
        self.label = label; self.process = process; self.logPath = logPath
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(1)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
    }
}

/// A small ambient data path built for real from network namespaces:
///
///     node (br0 10.244.0.1/16, kubelet probe source 169.254.7.127, DNS at 10.244.0.1:53)
///      ├── client pod 10.244.1.10  ambient rules + ztunnel stand-in (an app that makes requests)
///      ├── server pod 10.244.2.10  ambient rules + ztunnel stand-in + app on :80
///      └── peer       10.244.9.10  outside the mesh: app on :80, UDP echo on :9999
///
/// The addresses exist only inside these namespaces. Everything is removed by `teardown()`, which also runs on
/// SIGINT/SIGTERM/SIGHUP (see `tearDownOnSignals()`); if the process dies without it (a crash, SIGKILL), the
/// `OrphanReaper` removes the namespaces and the run directory; `LabTopology.removeAll()` sweeps what is left.
public final class LabTopology: @unchecked Sendable {
    public static let nodeIPv4 = IPAddress("10.244.0.1")!
    public static let nodeIPv6 = IPAddress("fd00:10:244::1")!
    public static let probeSource = IPAddress("169.254.7.127")!
    public static let appPort: UInt16 = 80
    /// A service VIP the client's ztunnel resolves to the server pod (as ztunnel resolves a service to an endpoint).
    public static let serviceVIP = IPAddress("10.96.0.20")!
    /// A service VIP the client's ztunnel resolves to the peer, outside the mesh (a service whose pods are not in
    /// ambient yet): ztunnel connects to it directly, in plaintext, with its mark (passthrough).
    public static let outsideServiceVIP = IPAddress("10.96.0.30")!
    /// A service VIP with two endpoints the client's ztunnel takes in turn, the server pod and the peer: a service
    /// half moved into ambient (tunnels and passthroughs, both marked, none naming the VIP).
    public static let mixedServiceVIP = IPAddress("10.96.0.40")!
    public static let udpEchoPort: UInt16 = 9999
    public static var dnsServer: Endpoint { Endpoint(nodeIPv4, 53) }

    public let options: LabOptions
    public private(set) var pods: [LabPod] = []
    public let runDirectory: String
    private var processes: [LabProcess] = []
    private let lock = NSLock()
    private var tornDown = false

    public var node: LabPod { pods[0] }
    public var client: LabPod { pods[1] }
    public var server: LabPod { pods[2] }
    public var peer: LabPod { pods[3] }
    public var meshPods: [LabPod] { pods.filter(\.inMesh) }

    /// Builds the whole lab; on any failure removes what was made and rethrows.
    public init(options: LabOptions) throws {
        try Command.requireRoot("meshtrace lab")
        for tool in ["ip", "nsenter"] + LabTopology.loaderTools(options) where Command.which(tool) == nil {
            throw MeshtraceError(.missingTool, "\(tool) is not installed (scripts/setup installs what the lab needs)")
        }
        guard FileManager.default.isExecutableFile(atPath: options.executable) else {
            throw MeshtraceError(.missingTool, "the meshtrace executable \(options.executable) is missing (swift build)")
        }
        self.options = options
        runDirectory = "/tmp/meshtrace-lab-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        LabTopology.register(self)
        do {
            try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true)
            OrphanReaper.watch(directory: runDirectory)
            try build()
        } catch {
            teardown()
            throw error
        }
    }

    deinit { teardown() }

    static func loaderTools(_ o: LabOptions) -> [String] {
        if o.ruleset.form == .nftables || o.backend == .nftables { return ["nft"] }
        return o.backend == .iptablesLegacy ? ["iptables-legacy-restore"] : ["iptables-nft-restore"]
    }

    private func build() throws {
        let v6 = options.dualStack
        let specs: [(LabPod.Role, String, String)] = [
            (.node, "10.244.0.1", "fd00:10:244::1"), (.client, "10.244.1.10", "fd00:10:244::110"),
            (.server, "10.244.2.10", "fd00:10:244::210"), (.peer, "10.244.9.10", "fd00:10:244::910"),
        ]
        for (role, a4, a6) in specs {
            let ns = try ScratchNetns(kind: "l")
            lock.lock()
            let dead = tornDown
            if !dead { pods.append(LabPod(role: role, netns: ns, ipv4: IPAddress(a4)!, ipv6: v6 ? IPAddress(a6)! : nil)) }
            lock.unlock()
            // A signal tore the lab down while it was being built: this namespace came too late for it.
            if dead { ns.remove(); throw LabTopology.tornDownError }
        }
        for pod in pods {
            // Without IPv6 the captures stay free of router solicitations and MLD reports.
            // With IPv6 on, no DAD probes and MLD reports sent at once rather than up to a second later, so they
            // do not show up in the first scenario's trace.
            try pod.netns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=\(v6 ? 0 : 1)",
                               "net.ipv6.conf.default.disable_ipv6=\(v6 ? 0 : 1)", "net.ipv6.conf.default.accept_ra=0",
                               "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.default.mldv2_unsolicited_report_interval=0",
                               "net.ipv6.conf.default.mldv1_unsolicited_report_interval=0"])
        }
        try node.netns.run(["ip", "link", "add", "br0", "type", "bridge"])
        try node.netns.run(["ip", "link", "set", "br0", "up"])
        try node.netns.run(["ip", "addr", "add", "10.244.0.1/16", "dev", "br0"])
        // The kubelet's probes reach pods SNATed to this address (AMBIENT.md); here the node owns it directly.
        try node.netns.run(["ip", "addr", "add", "\(LabTopology.probeSource)/32", "dev", "br0"])
        if v6 { try node.netns.run(["ip", "-6", "addr", "add", "fd00:10:244::1/64", "dev", "br0", "nodad"]) }
        for pod in pods.dropFirst() {
            let veth = "v\(pod.role.rawValue)"
            try node.netns.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.name])
            try node.netns.run(["ip", "link", "set", veth, "master", "br0", "up"])
            try pod.netns.run(["ip", "addr", "add", "\(pod.ipv4)/16", "dev", "eth0"])
            if let a6 = pod.ipv6 { try pod.netns.run(["ip", "-6", "addr", "add", "\(a6)/64", "dev", "eth0", "nodad"]) }
            try pod.netns.run(["ip", "link", "set", "eth0", "up"])
            try pod.netns.run(["ip", "route", "add", "default", "via", "10.244.0.1"])
            if v6 { try pod.netns.run(["ip", "-6", "route", "add", "default", "via", "fd00:10:244::1"]) }
        }
        for pod in meshPods {
            try loadRuleset(into: pod)
            try addPolicyRouting(pod)
        }
        try startStandIns()
    }

    /// What istio-cni adds besides the rules: packets marked 0x111 (the app's replies to ztunnel's transparent
    /// connections) are delivered locally via lo, back to ztunnel, instead of leaving through eth0.
    private func addPolicyRouting(_ pod: LabPod) throws {
        try pod.netns.run(["ip", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"])
        try pod.netns.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
        if options.dualStack {
            try pod.netns.run(["ip", "-6", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"])
            try pod.netns.run(["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100"])
        }
    }

    /// Loads (or reloads, replacing what is there) the lab's ruleset into a mesh pod.
    public func loadRuleset(into pod: LabPod) throws {
        let r = options.ruleset
        if r.form == .nftables {
            _ = pod.netns.attempt(["nft", "flush", "ruleset"])
            try pod.netns.run(["nft", "-f", "-"], input: r.text)
            return
        }
        let legacy = options.backend == .iptablesLegacy
        if !r.text.isEmpty {
            try pod.netns.run([legacy ? "iptables-legacy-restore" : "iptables-nft-restore"], input: r.text)
        }
        if options.dualStack, let v6 = r.ipv6Text {
            try pod.netns.run([legacy ? "ip6tables-legacy-restore" : "ip6tables-nft-restore"], input: v6)
        }
    }

    /// The iptables program family for rule edits in this lab (`iptables-nft`, `iptables-legacy`).
    public func iptables(v6: Bool = false) -> String {
        let base = v6 ? "ip6tables" : "iptables"
        return options.backend == .iptablesLegacy ? "\(base)-legacy" : "\(base)-nft"
    }

    private func meshArguments() -> [String] {
        meshPods.flatMap { $0.addresses.flatMap { ["--mesh", $0.description] } }
    }

    private func startStandIns() throws {
        let keepFlags = options.keep ? [] : ["--die-with-parent"]
        var waits: [(LabProcess, String)] = []
        for pod in meshPods {
            waits.append((try start(ztunnelArguments(for: pod) + keepFlags, in: pod, label: "ztunnel"), "ztunnel stand-in up"))
        }
        let v6 = options.dualStack ? ["--ipv6"] : []
        waits.append((try start(["_app", "serve", "--name", "server", "--port", "\(LabTopology.appPort)"] + v6 + keepFlags,
                                in: server, label: "app"), "listening"))
        waits.append((try start(["_app", "serve", "--name", "peer", "--port", "\(LabTopology.appPort)",
                                 "--udp-echo", "\(LabTopology.udpEchoPort)"] + v6 + keepFlags, in: peer, label: "app"), "listening"))
        waits.append((try start(["_app", "serve", "--name", "node", "--port", "8080", "--dns", "53"] + keepFlags,
                                in: node, label: "app"), "listening"))
        try waitUntilUp(waits)
    }

    private func ztunnelArguments(for pod: LabPod) -> [String] {
        var argv = ["_ztunnel"] + pod.addresses.flatMap { ["--pod-ip", $0.description] } + meshArguments()
        if options.ruleset.capturesDNS { argv += ["--dns-upstream", LabTopology.dnsServer.description] }
        if options.poolTunnels { argv += ["--pool-tunnels"] }
        if options.multiplexTunnels { argv += ["--multiplex-tunnels"] }
        if let n = options.streamsPerTunnel { argv += ["--tunnel-streams", "\(n)"] }
        argv += ["--service", "\(LabTopology.serviceVIP)=\(server.ipv4)", "--service", "\(LabTopology.outsideServiceVIP)=\(peer.ipv4)",
                 "--service", "\(LabTopology.mixedServiceVIP)=\(server.ipv4),\(peer.ipv4)"]
        return argv
    }

    /// Waits for each process's line in its log (10 s each at most), then checks none exited after it.
    private func waitUntilUp(_ waits: [(LabProcess, String)]) throws {
        for (p, line) in waits {
            let deadline = Date().addingTimeInterval(10)
            while !p.log.contains(line) {
                lock.lock(); let dead = tornDown; lock.unlock()
                if dead { throw LabTopology.tornDownError }
                guard p.process.isRunning, Date() < deadline else {
                    throw MeshtraceError(.kernelRefused, "the \(p.label) stand-in did not start: \(p.log.suffix(300))")
                }
                usleep(20_000)
            }
        }
        // A stand-in that failed after its first line (a port taken) is gone by now.
        usleep(100_000)
        for (p, _) in waits where !p.process.isRunning {
            throw MeshtraceError(.kernelRefused, "the \(p.label) stand-in exited: \(p.log.suffix(300))")
        }
    }

    /// Starts `meshtrace ARGS` inside a pod's netns, its output to `<run dir>/<pod>-<label>.log`.
    private func start(_ args: [String], in pod: LabPod, label: String) throws -> LabProcess {
        let logPath = "\(runDirectory)/\(pod.role.rawValue)-\(label).log"
        guard FileManager.default.createFile(atPath: logPath, contents: nil), let out = FileHandle(forWritingAtPath: logPath) else {
            throw MeshtraceError(.kernelRefused, "cannot write \(logPath)")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Command.which("nsenter") ?? "/usr/bin/nsenter")
        p.arguments = ["--net=\(pod.ref.path)", "--", options.executable] + args
        p.standardOutput = out
        p.standardError = out
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let lp = LabProcess(label: "\(pod.role.rawValue) \(label)", process: p, logPath: logPath)
        lock.lock()
        let dead = tornDown
        if !dead { processes.append(lp) }
        lock.unlock()
        if dead { lp.stop(); throw LabTopology.tornDownError }
        return lp
    }

    /// The output of a stand-in so far (for tests and the lab's kernel-side evidence).
    public func log(of pod: LabPod, _ label: String) -> String {
        (try? String(contentsOfFile: "\(runDirectory)/\(pod.role.rawValue)-\(label).log", encoding: .utf8)) ?? ""
    }

    /// Runs `meshtrace ARGS` to completion inside a pod (the app side of a scenario).
    @discardableResult
    public func runApp(_ args: [String], in pod: LabPod) throws -> Command.Result {
        try Command.run([options.executable] + args, in: pod.ref)
    }

    /// Stops a pod's ztunnel stand-in: ztunnel down, its rules still in place, nothing listening on its ports.
    public func stopZtunnel(in pod: LabPod) {
        lock.lock()
        let standIns = processes.filter { $0.label == "\(pod.role.rawValue) ztunnel" && $0.process.isRunning }
        lock.unlock()
        for p in standIns { p.stop() }
    }

    /// Starts a pod's ztunnel stand-in again (after `stopZtunnel`), and waits until it listens.
    public func startZtunnel(in pod: LabPod) throws {
        let p = try start(ztunnelArguments(for: pod) + (options.keep ? [] : ["--die-with-parent"]), in: pod, label: "ztunnel")
        try waitUntilUp([(p, "ztunnel stand-in up")])
    }

    /// The pids of every process the lab started that still runs.
    public var runningPids: [Int32] {
        lock.lock(); defer { lock.unlock() }
        return processes.filter { $0.process.isRunning }.map(\.process.processIdentifier)
    }

    /// Stops the stand-ins and removes every namespace (with its veths, rules and routes) and the run directory.
    /// Safe to call more than once, from any thread. With `keep`, only forgets the lab (it stays up).
    public func teardown() {
        lock.lock()
        if tornDown { lock.unlock(); return }
        tornDown = true
        let procs = processes
        processes.removeAll()
        let made = pods
        lock.unlock()
        LabTopology.unregister(self)
        if options.keep {
            // ScratchNetns removes its namespace when released; a kept lab must outlive this object.
            LabTopology.liveLock.lock(); LabTopology.kept.append(self); LabTopology.liveLock.unlock()
            for pod in made { pod.netns.keepAfterExit() }
            OrphanReaper.release(directory: runDirectory)
            return
        }
        for p in procs { p.stop() }
        for pod in made.reversed() { pod.netns.remove() }
        if (try? FileManager.default.removeItem(atPath: runDirectory)) != nil { OrphanReaper.release(directory: runDirectory) }
    }

    // MARK: - Every lab of this process, for signal-time teardown

    nonisolated(unsafe) private static var live: [ObjectIdentifier: LabTopology] = [:]
    private static let liveLock = NSLock()
    nonisolated(unsafe) private static var kept: [LabTopology] = []
    nonisolated(unsafe) private static var watching = false

    private static func register(_ t: LabTopology) { liveLock.lock(); live[ObjectIdentifier(t)] = t; liveLock.unlock() }
    private static func unregister(_ t: LabTopology) { liveLock.lock(); live[ObjectIdentifier(t)] = nil; liveLock.unlock() }

    /// On SIGINT, SIGTERM or SIGHUP: tear down every lab of this process, run `also`, and exit with 128+signal.
    /// Uses the same handler as `LiveTracer` (`StopSignal`), so a signal also ends a running trace normally
    /// (its rules come out) while a watcher thread removes the lab.
    public static func tearDownOnSignals(also: @escaping @Sendable () -> Void = {}) {
        liveLock.lock(); defer { liveLock.unlock() }
        guard !watching else { return }
        watching = true
        StopSignal.install()
        Thread.detachNewThread {
            while StopSignal.signalNumber == 0 { usleep(50_000) }
            let sig = StopSignal.signalNumber
            interruptLock.lock(); interrupted = true; interruptLock.unlock()
            FileHandle.standardError.write(Data("\nmeshtrace lab: signal \(sig), removing the lab\n".utf8))
            also()
            liveLock.lock(); let labs = Array(live.values); liveLock.unlock()
            for lab in labs { lab.teardown() }
            teardownDone.signal()
            // The main thread exits from `waitIfInterrupted` once its current step notices (it may be creating a
            // namespace right now, which it then removes itself); if it is stuck, exit anyway.
            Thread.sleep(forTimeInterval: 20)
            exit(128 + sig)
        }
    }

    private static let teardownDone = DispatchSemaphore(value: 0)
    static let tornDownError = MeshtraceError(.kernelRefused, "the lab was removed (signal) while it was being used")

    nonisolated(unsafe) private static var interrupted = false
    private static let interruptLock = NSLock()

    /// When a signal is tearing the lab down, errors on the main thread (a stand-in vanished, a netns went away)
    /// are its consequence: wait here for the teardown to finish, then exit with 128+signal. Called at each step.
    public static func waitIfInterrupted() {
        interruptLock.lock(); let i = interrupted; interruptLock.unlock()
        guard i || StopSignal.signalNumber != 0 else { return }
        _ = teardownDone.wait(timeout: .now() + 20)
        teardownDone.signal()
        exit(128 + StopSignal.signalNumber)
    }

    /// The lab a namespace belongs to: the creating process's pid in `mt-l<ID>-n`.
    public static func labID(of namespace: String) -> Int32? {
        guard namespace.hasPrefix("mt-l") else { return nil }
        return Int32(namespace.dropFirst(4).prefix { $0.isNumber })
    }

    /// `meshtrace lab down`: removes the lab namespaces (`mt-l<pid>-N`) of earlier runs — those whose creating
    /// process is gone, as after `--keep` or a SIGKILL — with the processes inside them, and their run directories.
    /// `includingRunning` also removes labs whose creator still runs (another `meshtrace lab` in progress).
    /// Returns the names removed. `only`: remove just that lab (by its id), so a test or a user does not sweep
    /// another kept lab away.
    @discardableResult
    public static func removeAll(includingRunning: Bool = false, only: Int32? = nil) throws -> [String] {
        try Command.requireRoot("meshtrace lab down")
        let list = try Command.run(["ip", "netns", "list"])
        var removed: [String] = []
        // Labs with a namespace left: a kept one (its creator has exited) still needs its run directory (logs).
        var standing = Set<Int32>()
        for line in list.stdout.split(whereSeparator: \.isNewline) {
            let name = String(line.split(separator: " ").first ?? "")
            guard name.hasPrefix("mt-l") else { continue }
            let creator = labID(of: name) ?? 0
            if let only, creator != only { continue }
            let creatorRuns = creator > 0 && creator != getpid() && (kill(creator, 0) == 0 || errno != ESRCH)
            if creatorRuns && !includingRunning { standing.insert(creator); continue }
            if ScratchNetns.delete(name) { removed.append(name) } else { standing.insert(creator) }
        }
        // Run directories are named meshtrace-lab-<pid>-<n>: remove those whose process is gone and whose lab has no
        // namespace left (or is the one removed), so another kept lab keeps its logs.
        if let dirs = try? FileManager.default.contentsOfDirectory(atPath: "/tmp") {
            for d in dirs where d.hasPrefix("meshtrace-lab-") {
                let pid = Int32(d.dropFirst("meshtrace-lab-".count).split(separator: "-").first ?? "") ?? 0
                if let only, pid != only { continue }
                if standing.contains(pid) { continue }
                if pid != getpid() && (pid <= 0 || (kill(pid, 0) != 0 && errno == ESRCH)) {
                    try? FileManager.default.removeItem(atPath: "/tmp/\(d)")
                }
            }
        }
        return removed
    }
}
