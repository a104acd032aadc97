import ArgumentParser
import Capture
import Foundation

@main
struct Meshtrace: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "meshtrace",
        abstract: "See what Istio ambient's netfilter rules do to a pod's traffic, packet by packet and connection by connection.",
        discussion: """
        Live:     meshtrace trace --netns POD       (NFLOG twins + libpcap in the pod's netns, timelines as they finish)
        Offline:  meshtrace analyze FILE...          (pcap/pcapng, including tcpdump -i nflog:G captures)
        Verify:   meshtrace verify --rules FILE      (is there a packet that leaves without passing ztunnel?)
        Try it:   sudo meshtrace lab                 (a real ambient pod built from network namespaces, traced live)
        Exit codes: 0 ok, 1 escape found, 2 bad input, 3 damaged input, 4 no such netns, 5 no privilege,
        6 NFLOG group busy, 7 missing tool, 8 kernel refused, 9 leftovers, 10 events lost (--strict), 64 usage.
        """,
        version: "0.1.0",
        subcommands: [Analyze.self, Trace.self, Rules.self, Verify.self, Plan.self, Cleanup.self, Lab.self,
                      ZtunnelCommand.self, AppCommand.self]
    )
}

/// Runs a command body, turning a `MeshtraceError` into one line on stderr and its exit code.
/// Every command's `run()` goes through here, so no error escapes as a crash or a stack of text.
func reportingErrors(_ body: () throws -> ExitStatus) throws {
    let status: ExitStatus
    do {
        status = try body()
    } catch let e as MeshtraceError {
        FileHandle.standardError.write(Data("meshtrace: \(e.message)\n".utf8))
        throw ArgumentParser.ExitCode(e.code.rawValue)
    }
    if status != .ok { throw ArgumentParser.ExitCode(status.rawValue) }
}
