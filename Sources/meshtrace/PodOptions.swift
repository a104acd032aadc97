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
