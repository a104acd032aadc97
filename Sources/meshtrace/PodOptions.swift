import ArgumentParser
import Capture

/// `--netns NAME|PATH` / `--pid N`: the pod whose network namespace a live command works in.
struct PodOptions: ParsableArguments {
    @Option(name: .long, help: "The pod's network namespace: a name under /var/run/netns, or a path.")
    var netns: String?

    @Option(name: .long, help: "A process in the pod: its network namespace is used.")
    var pid: Int32?

    var isGiven: Bool { netns != nil || pid != nil }

    /// The namespace; `.noSuchNetns` when it does not exist, `.usage` when neither option was given.
    func resolve() throws -> NetnsRef { try NetnsRef.resolve(netns: netns, pid: pid) }
}

/// The checks of the options every command that adds twins takes (`trace`, `plan`, `lab`).
enum TwinOptionChecks {
    /// NFLOG group 0 is where legacy TRACE logs (nf_log), so the twins never log there.
    static func group(_ group: UInt16, option: String = "--group") throws {
        guard group != 0 else { throw ValidationError("\(option) 0 is where legacy TRACE logs; pick another group") }
    }

    /// Each NFLOG copy must hold the IP and TCP headers it is decoded from.
    static func snaplen(_ snaplen: Int) throws {
        guard (64...65535).contains(snaplen) else {
            throw ValidationError("--snaplen takes 64...65535: each NFLOG copy must hold the IP and TCP headers it is decoded from")
        }
    }
}
