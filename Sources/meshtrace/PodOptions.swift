import ArgumentParser
import Capture

/// `--netns NAME|PATH` / `--pid N` / `--pod NAMESPACE/NAME`: the pod whose network namespace a live command works in.
struct PodOptions: ParsableArguments {
    @Option(name: .long, help: "The pod's network namespace: a name under /var/run/netns, or a path.")
    var netns: String?

    @Option(name: .long, help: "A process in the pod: its network namespace is used.")
    var pid: Int32?

    @Option(name: .long, help: ArgumentHelp("A Kubernetes pod on this node, NAMESPACE/NAME (NAME alone: the default namespace): its network namespace is found with crictl.", valueName: "namespace/name"))
    var pod: String?

    var isGiven: Bool { netns != nil || pid != nil || pod != nil }

    /// The namespace; `.noSuchNetns` when it does not exist, `.usage` when none or several of the options were given.
    func resolve() throws -> NetnsRef { try PodOptions.resolve(netns: netns, pid: pid, pod: pod) }

    static func resolve(netns: String?, pid: Int32?, pod: String?) throws -> NetnsRef {
        guard let pod else { return try NetnsRef.resolve(netns: netns, pid: pid) }
        if let other = netns.map({ "--netns \($0)" }) ?? pid.map({ "--pid \($0)" }) {
            throw MeshtraceError(.usage, "give either --pod \(pod) or \(other), not both")
        }
        return try PodLookup.netns(of: pod)
    }
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
