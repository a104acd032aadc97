import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Records each scenario the way an operator would collect on a node (`meshtrace plan` + tcpdump): a
/// `tcpdump -i IFACE` capture inside the traced pod and, with an NFLOG group, the NFLOG twins installed by the
/// `Instrumenter` and a `tcpdump -i nflog:G` capture of their hits, plus the pod's rules as saved before.
/// At `stop` the files go through the same engine as `meshtrace analyze` (`LabCaptureAnalysis`), which gives the
/// verdict; the files stay for `samples/`.
public final class PacketCaptureTracing: LabTracing {
    public let directory: String
    /// The interface tcpdump listens on inside the traced pod (`any`: every one, lo included).
    public let interface: String
    /// NFLOG group for the twins; nil: packets only, no rules added.
    public let nflogGroup: UInt16?
    private var captures: [(Process, String, String)] = []
    private var instrumenter: Instrumenter?
    private var files: [String] = []
    private var current: (pod: LabPod, scenario: Scenario, lab: LabTopology)?

    /// `--html` / `--pcapng`: one file per scenario (see `OutputConfig.perScenario`).
    public let output: OutputConfig

    public init(directory: String, interface: String = "any", nflogGroup: UInt16? = nil, output: OutputConfig = OutputConfig()) {
        self.directory = directory; self.interface = interface; self.nflogGroup = nflogGroup; self.output = output
    }

    public func start(pod: LabPod, scenario: Scenario, lab: LabTopology) throws {
        guard let tcpdump = Command.which("tcpdump") else {
            throw MeshtraceError(.missingTool, "tcpdump is not installed (scripts/setup installs it)")
        }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let base = "\(directory)/\(scenario.rawValue)-\(pod.role.rawValue)"
        files = []
        current = (pod, scenario, lab)
        do {
            if let group = nflogGroup {
                let rulesPath = base + "-rules.txt"
                try savedRules(pod, lab: lab).write(toFile: rulesPath, atomically: true, encoding: .utf8)
                files.append(rulesPath)
                let i = Instrumenter(netns: pod.ref, settings: InstrumentationSettings(group: group), parse: Instrumenter.parseHome)
                instrumenter = i
                _ = try i.install()
                // No -s: an NFLOG record is its TLVs (prefix, interfaces, a hardware header and a timestamp
                // arriving) plus the twins' 128-byte copy of the packet, over 256 bytes for a full packet
                // arriving; tcpdump writes it whole, but libpcap cuts each record to the file's snaplen when
                // reading it back, and the cut records were lost to `analyze` ("partly decoded").
                try startCapture(tcpdump, iface: "nflog:\(group)", snaplen: nil, path: base + "-nflog.pcap", pod: pod)
            }
            try startCapture(tcpdump, iface: interface, snaplen: 256, path: base + "-\(interface).pcap", pod: pod)
        } catch {
            _ = try? stop()
            throw error
        }
    }

    /// What `iptables-save` / `nft list ruleset` print in the pod: the `--rules` file for `meshtrace analyze`.
    private func savedRules(_ pod: LabPod, lab: LabTopology) throws -> String {
        if lab.options.ruleset.form == .nftables { return try pod.netns.run(["nft", "list", "ruleset"]).stdout }
        var text = try pod.netns.run([lab.iptables() + "-save"]).stdout
        if lab.options.dualStack { text += pod.netns.attempt([lab.iptables(v6: true) + "-save"]).stdout }
        return text
    }

    private func startCapture(_ tcpdump: String, iface: String, snaplen: Int?, path: String, pod: LabPod) throws {
        let err = path + ".err"
        guard FileManager.default.createFile(atPath: err, contents: nil) else {
            throw MeshtraceError(.kernelRefused, "cannot write \(err)")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Command.which("nsenter") ?? "/usr/bin/nsenter")
        // --immediate-mode: with TPACKET_V3 packets wait in a ring block until it retires (1 s); a SIGINT before that
        // drops them ("received by filter", never captured). -U: write each packet as it comes. -Z root: no privilege
        // drop (the file is in a root-owned directory).
        p.arguments = ["--net=\(pod.ref.path)", "--", tcpdump, "-i", iface, "--immediate-mode", "-n", "-U", "-Z", "root"]
            + (snaplen.map { ["-s", String($0)] } ?? []) + ["-w", path]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle(forWritingAtPath: err)
        try p.run()
        captures.append((p, path, err))
        // tcpdump says "listening on" once the capture is open; traffic before that would be missed.
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            if let t = try? String(contentsOfFile: err, encoding: .utf8), t.contains("listening on") { return }
            if !p.isRunning {
                throw MeshtraceError(.kernelRefused, "tcpdump -i \(iface) in \(pod.name) exited: \((try? String(contentsOfFile: err, encoding: .utf8)) ?? "")")
            }
            usleep(20_000)
        }
    }

    public func stop() throws -> LabTraceFinding {
        for (p, path, err) in captures {
            if p.isRunning { kill(p.processIdentifier, SIGINT) }
            let deadline = Date().addingTimeInterval(3)
            while p.isRunning && Date() < deadline { usleep(20_000) }
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
            p.waitUntilExit()
            try? FileManager.default.removeItem(atPath: err)
            files.append(path)
        }
        captures = []
        if let i = instrumenter {
            instrumenter = nil
            try i.remove()
        }
        guard let (pod, scenario, lab) = current else { return LabTraceFinding(verdict: nil, report: "", files: files) }
        current = nil
        return try LabCaptureAnalysis.analyze(files: files, rulesFile: files.first { $0.hasSuffix("-rules.txt") },
                                              podAddresses: pod.addresses, scenario: scenario, lab: lab, output: output)
    }
}
