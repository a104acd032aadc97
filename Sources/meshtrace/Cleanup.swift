import ArgumentParser
import Capture

struct Cleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cleanup",
        abstract: "Remove every rule meshtrace added to a pod's netns (after a trace was killed).",
        discussion: """
        Rules are found by their tag (comment "meshtrace", NFLOG prefix "mt:"), in every backend (iptables-nft, \
        iptables-legacy, ip6tables, nftables), so this works after istio-cni re-applied its own rules. No other \
        rule is touched. Exit 0 when none remain.
        """
    )

    @OptionGroup var pod: PodOptions

    func run() throws {
        try reportingErrors {
            let ref = try pod.resolve()
            let instrumenter = Instrumenter(netns: ref, settings: InstrumentationSettings(), parse: Instrumenter.parseHome)
            let removed = try instrumenter.remove()
            print(removed == 0 ? "no meshtrace rules in \(ref)" : "removed \(removed) meshtrace rules from \(ref)")
            return .ok
        }
    }
}
