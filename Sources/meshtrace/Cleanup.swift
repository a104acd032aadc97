import ArgumentParser
import Capture
import Foundation

struct Cleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cleanup",
        abstract: "Remove every rule meshtrace added to a pod's netns (after a trace was killed).",
        discussion: """
        Rules are found by their tag (comment "meshtrace", NFLOG prefix "mt:"), in every backend (iptables-nft, \
        iptables-legacy, ip6tables, nftables), so this works after istio-cni re-applied its own rules. No other \
        rule is touched; the nf_log backend a killed `--mode trace` on iptables-legacy left bound is put back. \
        Exit 0 when none remain. \
        Twins whose NFLOG group a process is reading (/proc/net/netfilter/nfnetlink_log in the netns) belong to a \
        trace running now, not to a killed one: cleanup refuses with exit 9 and touches nothing, unless --force.
        """
    )

    @OptionGroup var pod: PodOptions

    @Flag(name: .long, help: "Remove the rules even when a running trace is reading their NFLOG group (that trace goes on blind).")
    var force = false

    func run() throws {
        try reportingErrors {
            let ref = try pod.resolve()
            let instrumenter = Instrumenter(netns: ref, settings: InstrumentationSettings(), parse: Instrumenter.parseHome)
            // Not while a trace is adding its twins (it holds the lock until they are in and checked).
            let lock = try Instrumenter.lockNetns(ref)
            defer { if lock >= 0 { close(lock) } }
            if !force {
                try instrumenter.refuseIfBeingTraced(instrumenter.readHomes(), ownGroup: nil,
                    advice: "wait for it to end, or stop it (Ctrl-C, SIGTERM: it removes its own rules); `meshtrace cleanup \(ref.commandLine) --force` removes them anyway")
            }
            let removed = try instrumenter.remove()
            let table = instrumenter.removedTraceTable ? "--mode trace's nft table (inet \(Instrumenter.traceTableName))" : nil
            switch (removed, table) {
            case (0, nil): print("no meshtrace rules in \(ref)")
            case (0, let t?): print("removed \(t) from \(ref)")
            case (let n, nil): print("removed \(n) meshtrace rules from \(ref)")
            case (let n, let t?): print("removed \(n) meshtrace rules and \(t) from \(ref)")
            }
            return .ok
        }
    }
}
