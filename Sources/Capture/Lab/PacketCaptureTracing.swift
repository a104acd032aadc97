import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Records each scenario with `tcpdump -i any` inside the traced pod (one pcap per scenario). It gives no verdict:
/// the files are for `meshtrace analyze` and for `samples/`; the live engine (`LiveTracer`) is what judges.
public final class PacketCaptureTracing: LabTracing {
    public let directory: String
    /// The interface tcpdump listens on inside the traced pod (`any`: every one, lo included).
    public let interface: String
    private var process: Process?
    private var file: String?
    private var errPath: String?

    public init(directory: String, interface: String = "any") { self.directory = directory; self.interface = interface }

    public func start(pod: LabPod, scenario: Scenario, lab: LabTopology) throws {
        guard let tcpdump = Command.which("tcpdump") else {
            throw MeshtraceError(.missingTool, "tcpdump is not installed (scripts/setup installs it)")
        }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = "\(directory)/\(scenario.rawValue)-\(pod.role.rawValue)-\(interface).pcap"
        let err = "\(directory)/.\(scenario.rawValue).tcpdump.err"
        FileManager.default.createFile(atPath: err, contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Command.which("nsenter") ?? "/usr/bin/nsenter")
        // --immediate-mode: with TPACKET_V3 packets wait in a ring block until it retires (1 s); a SIGINT before that
        // drops them ("received by filter", never captured). -U: write each packet as it comes. -Z root: no privilege drop
        // (the file is in a root-owned directory).
        p.arguments = ["--net=\(pod.ref.path)", "--", tcpdump, "-i", interface, "--immediate-mode", "-n", "-U", "-Z", "root", "-s", "256", "-w", path]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle(forWritingAtPath: err)
        try p.run()
        // tcpdump says "listening on" once the capture is open; traffic before that would be missed.
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            if let t = try? String(contentsOfFile: err, encoding: .utf8), t.contains("listening on") { break }
            if !p.isRunning { throw MeshtraceError(.kernelRefused, "tcpdump in \(pod.name) exited: \((try? String(contentsOfFile: err, encoding: .utf8)) ?? "")") }
            usleep(20_000)
        }
        process = p; file = path; errPath = err
    }

    public func stop() throws -> LabTraceFinding {
        guard let p = process, let path = file else { return LabTraceFinding(verdict: nil, report: "") }
        kill(p.processIdentifier, SIGINT)
        let deadline = Date().addingTimeInterval(3)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        if let e = errPath { try? FileManager.default.removeItem(atPath: e) }
        process = nil; file = nil
        let text = (try? Command.run(["tcpdump", "-n", "-r", path]))?.stdout ?? ""
        return LabTraceFinding(verdict: nil, report: text, files: [path])
    }
}
