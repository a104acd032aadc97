import Foundation

/// Adds meshtrace's NFLOG twins to a live pod netns and takes them out again.
///
/// Safety rules, in the order they are enforced:
///  - one transaction per table (`iptables-restore --noflush --wait`, `nft -f`); nothing is flushed or rewritten;
///  - after applying, the original rules are read back and must be unchanged in content and order, and every
///    twin must sit right before its rule; otherwise everything added is removed and `.kernelRefused` thrown;
///  - removal finds meshtrace's rules by their tag in the live rules, so it works after istio-cni re-applied
///    its own rules (positions moved, chains recreated), and after a SIGKILL (`meshtrace cleanup`).
public final class Instrumenter: @unchecked Sendable {
    public let netns: NetnsRef
    public let settings: InstrumentationSettings
    /// Turns one home's saved text into tables (the ruleset model's parsers).
    public let parse: (RuleHome, String) throws -> [Table]

    public private(set) var plan: InstrumentationPlan?
    /// Normalized rules per home before meshtrace touched them.
    public private(set) var before: [RuleHome: String] = [:]
    /// The rules as read before instrumenting (for the correlator: hits map to these rules).
    public private(set) var tables: [(home: RuleHome, table: Table)] = []
    private var installed = false
    /// nf_log backends recorded by a killed `--mode trace` run's leftovers that `remove` could not put back because
    /// group 0 was being read (by this process's own trace); the tracer restores them when it ends.
    public private(set) var recoveredLoggers: [UInt16: String] = [:]

    public init(netns: NetnsRef, settings: InstrumentationSettings, parse: @escaping (RuleHome, String) throws -> [Table]) {
        self.netns = netns; self.settings = settings; self.parse = parse
    }

    // MARK: reading

    /// The homes present in the netns with their saved text. iptables tools are required; a home whose tool
    /// is absent (nft, ip6tables) is skipped.
    public func readHomes(withCounters: Bool = false) throws -> [SavedRules] {
        try requireTools()
        var out: [SavedRules] = []
        let present = RuleHome.all.map { home in (home, withCounters ? home.saveWithCountersCommand : home.saveCommand) }
            .filter { Command.which($0.1[0]) != nil }
        // Side by side: a trace reads them four times or more between its start and its end.
        let results = Command.runAll(present.map(\.1), in: netns)
        for ((home, argv), result) in zip(present, results) {
            let r = try result.get()
            guard r.ok else {
                if r.stderr.contains("Permission denied") || r.stderr.contains("Operation not permitted") {
                    throw MeshtraceError(.noPrivilege, "\(argv[0]) in netns \(netns): \(r.stderr)")
                }
                // A legacy table module that is not loaded, or an nft without kernel support: nothing there.
                continue
            }
            out.append(SavedRules(home: home, text: r.stdout))
        }
        // The nftables home must leave iptables-nft's own tables alone. nft says which they are on stderr
        // ("# Warning: table ip nat is managed by iptables-nft"); the iptables-nft homes say it too.
        if let i = out.firstIndex(where: { $0.home.isNftables }) {
            var managed: [String] = []
            for saved in out where saved.home.backend == .iptablesNft {
                let family = saved.home.family == .ipv6 ? "ip6" : "ip"
                for line in saved.text.split(separator: "\n") where line.hasPrefix("*") {
                    managed.append("# Warning: table \(family) \(line.dropFirst()) is managed by iptables-nft")
                }
            }
            if !managed.isEmpty { out[i].text += "\n" + managed.joined(separator: "\n") + "\n" }
        }
        return out
    }

    func requireTools() throws {
        try Command.requireRoot("reading and changing a pod's rules")
        for tool in ["nsenter", "iptables-nft-save", "iptables-nft-restore", "iptables-legacy-save", "iptables-legacy-restore"]
        where Command.which(tool) == nil {
            throw MeshtraceError(.missingTool, "\(tool) is not installed (Debian: apt-get install iptables util-linux)")
        }
    }

    /// meshtrace rules already in the netns (from a run that was killed), per home.
    public func leftovers() throws -> [(home: RuleHome, rule: SavedRules.OwnRule)] {
        try readHomes().flatMap { saved in saved.ownRules.map { (saved.home, $0) } }
    }

    /// Twins whose NFLOG group a process is reading are another trace's, running now: neither stale nor anyone's
    /// to take away (`cleanup` and `--replace` would leave that trace blind). Throws `.leftovers` saying so;
    /// `advice` replaces the message's closing advice (the command's own way out).
    public func refuseIfBeingTraced(_ homes: [SavedRules], ownGroup: UInt16?, advice: String? = nil) throws {
        let own = homes.flatMap(\.ownRules)
        var groups = Set(own.compactMap(\.group))
        if let ownGroup { groups.remove(ownGroup) }
        guard !groups.isEmpty, let live = try? Instrumenter.boundNflogGroups(in: netns),
              let busy = groups.intersection(live).sorted().first else { return }
        throw MeshtraceError(.leftovers, "netns \(netns) is being traced right now: \(own.count) meshtrace rules log to NFLOG group \(busy), which a process is reading (another meshtrace trace, or `tcpdump -i nflog:\(busy)` collecting the twins of `meshtrace plan`); \(advice ?? "wait for it to end (only `meshtrace cleanup --force` takes its rules away)")")
    }

    /// The NFLOG groups a process has bound in the netns: the kernel lists each nfnetlink_log instance in the
    /// reader's netns's /proc/net/netfilter/nfnetlink_log (group, portid, queue length, ...).
    static func boundNflogGroups(in netns: NetnsRef) throws -> Set<UInt16> {
        let r = try Command.run(["cat", "/proc/net/netfilter/nfnetlink_log"], in: netns)
        guard r.ok else { return [] }
        return Set(r.stdout.split(separator: "\n").compactMap { $0.split(separator: " ").first.flatMap { UInt16($0) } })
    }

    // MARK: installing

    /// Reads the rules, plans the twins and applies them. `replace`: remove leftovers first instead of failing.
    @discardableResult
    public func install(replace: Bool = false) throws -> InstrumentationPlan {
        // One meshtrace at a time adds twins to a netns: two traces started together both read "no twins", both
        // applied, each found the other's twins misplaced and both rolled back (exit 8, a wrong reason), or one
        // rolled back the other's. In turn, the second finds the first's twins being read and says so (exit 9).
        let lock = try Instrumenter.lockNetns(netns)
        defer { if lock >= 0 { close(lock) } }
        var homes = try readHomes()
        let left = homes.reduce(0) { $0 + $1.ownRules.count }
        if left > 0 {
            // Our own group is bound by us already (a trace opens its socket first, and a group someone else
            // holds stops it there).
            try refuseIfBeingTraced(homes, ownGroup: settings.group)
            guard replace else {
                throw MeshtraceError(.leftovers, "\(left) meshtrace rules are already in netns \(netns) (a run that was killed?): run `meshtrace cleanup \(netns.commandLine)` or pass --replace")
            }
            _ = try remove()
            homes = try readHomes()
        }
        var tables: [(home: RuleHome, table: Table)] = []
        for saved in homes {
            for t in try parse(saved.home, saved.text) { tables.append((saved.home, t)) }
            before[saved.home] = saved.normalized
        }
        self.tables = tables
        var plan = try InstrumentationPlan.make(tables: tables, settings: settings)
        if let nft = homes.first(where: { $0.home.isNftables }) {
            let handles = nft.nftRuleHandles
            for ci in plan.changes.indices where plan.changes[ci].home.isNftables {
                let c = plan.changes[ci]
                for ti in c.twins.indices where !c.twins[ti].isObservation {
                    let key = "\(c.nftFamily) \(c.table) \(c.twins[ti].chain)"
                    guard let list = handles[key], c.twins[ti].position <= list.count else {
                        throw MeshtraceError(.kernelRefused, "no nft handle for rule \(c.twins[ti].position) of \(key)")
                    }
                    plan.changes[ci].twins[ti].beforeHandle = list[c.twins[ti].position - 1]
                }
            }
        }
        guard !plan.ambientHomes.isEmpty else {
            throw MeshtraceError(.badInput, "no ambient rules (ISTIO_* chains or istio-* nft tables) in netns \(netns): nothing to trace")
        }
        self.plan = plan
        installed = true
        do {
            for change in plan.changes {
                let r = try Command.run(change.home.applyCommand, in: netns, input: plan.applyScript(change))
                guard r.ok else {
                    throw MeshtraceError(.kernelRefused, "\(change.home.restoreTool) refused the twins for table \(change.table): \(r.stderr)")
                }
            }
            try checkUnchanged()
        } catch {
            let removeError: Error?
            do { _ = try remove(); removeError = nil } catch let e { removeError = e }
            if let removeError { throw MeshtraceError(.kernelRefused, "\(error); and removing what was added failed: \(removeError)") }
            if let e = error as? MeshtraceError { throw e }
            throw MeshtraceError(.kernelRefused, "\(error)")
        }
        return plan
    }

    /// Serializes meshtrace processes changing one netns's rules: an flock on the namespace file itself (nsfs: the
    /// same inode through its name, /proc/PID/ns/net and a trace's pin, and nothing left behind on disk). Returns
    /// the locked fd, or -1 where no lock can be taken (then it goes on without, as before). Waits a bounded time.
    public static func lockNetns(_ netns: NetnsRef, waitSeconds: Double = 15) throws -> Int32 {
        let fd = open(netns.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return -1 }
        let deadline = Date().addingTimeInterval(waitSeconds)
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            guard e == EWOULDBLOCK || e == EINTR else { close(fd); return -1 }
            if Date() >= deadline {
                close(fd)
                throw MeshtraceError(.leftovers, "another meshtrace has been changing the rules of netns \(netns) for \(Int(waitSeconds)) s; try again when it is done")
            }
            // Ctrl-C while waiting: nothing was touched yet.
            if StopSignal.requested {
                close(fd)
                throw MeshtraceError(.ok, "stopped before the rules were added")
            }
            usleep(20_000)
        }
        return fd
    }

    /// The original rules must read back identical, and each twin must sit right before its rule.
    func checkUnchanged() throws {
        let homes = try readHomes()
        for saved in homes {
            if let old = before[saved.home], old != saved.normalized {
                throw MeshtraceError(.kernelRefused, "the original rules of \(saved.home) in netns \(netns) changed while the twins were added (istio-cni re-applying them?); rolled back")
            }
            if let problem = saved.misplacedTwin() {
                throw MeshtraceError(.kernelRefused, "\(problem) (\(saved.home), netns \(netns)); rolled back")
            }
        }
        let expected = plan?.twins.count ?? 0
        let found = homes.reduce(0) { $0 + $1.ownRules.count }
        if found != expected {
            throw MeshtraceError(.kernelRefused, "expected \(expected) meshtrace rules in netns \(netns) after applying, found \(found); rolled back")
        }
    }

    // MARK: counting

    /// The kernel's packet counters of the twins, by NFLOG prefix (the ground truth for hit counts).
    public func kernelCounters() throws -> [String: UInt64] {
        var out: [String: UInt64] = [:]
        for saved in try readHomes(withCounters: true) {
            for r in saved.ownRules { if let p = r.prefix, let n = r.packets { out[p, default: 0] += n } }
        }
        return out
    }

    // MARK: removing

    /// Whether the last `remove()` took out `--mode trace`'s nft table (a killed `--mode trace` run's leftover).
    public private(set) var removedTraceTable = false
    /// The name of `--mode trace`'s nft table (family inet), for messages.
    public static var traceTableName: String { TraceRules.nftTable }

    /// Removes every meshtrace rule in the netns, found by tag in the live rules. Returns how many were removed.
    /// Throws when some could not be removed (and says how many remain).
    @discardableResult
    public func remove() throws -> Int {
        installed = false
        var removed = 0
        // `--mode trace`'s own nft table goes as a whole (its rules carry the comment too).
        removedTraceTable = try TraceRules.remove(netns: netns)
        let homes = try readHomes()
        let loggers = TraceRules.recordedLoggers(in: homes)
        for saved in homes {
            let own = saved.ownRules
            guard !own.isEmpty else { continue }
            let scripts = Instrumenter.removalScripts(own, home: saved.home)
            // One transaction per table; if the table changed under us (a rule already gone), fall back to one
            // rule at a time so the rest still go.
            for script in scripts {
                let r = try Command.run(saved.home.applyCommand, in: netns, input: script.whole)
                if r.ok { removed += script.rules.count; continue }
                for single in script.singles {
                    if (try? Command.run(saved.home.applyCommand, in: netns, input: single))?.ok == true { removed += 1 }
                }
            }
        }
        let remaining = try leftovers().count
        if remaining > 0 {
            throw MeshtraceError(.kernelRefused, "\(remaining) meshtrace rules could not be removed from netns \(netns); run `meshtrace cleanup \(netns.commandLine)`")
        }
        // A killed legacy `--mode trace` left nfnetlink_log bound as the netns's nf_log backend.
        if !(try TraceRules.restoreLoggers(netns: netns, recorded: loggers)) {
            // Our own legacy TRACE socket reads group 0 (`--mode trace --replace` over a killed run's leftovers):
            // the tracer takes these over as the backends to put back when it ends.
            recoveredLoggers.merge(loggers) { old, _ in old }
        }
        return removed
    }

    /// Removes the twins if `install` put them in and they are still there. For deferred cleanup on every path.
    public func removeIfInstalled() throws {
        if installed { try remove() }
    }

    struct RemovalScript { var rules: [SavedRules.OwnRule]; var whole: String; var singles: [String] }

    /// The transactions that delete these rules: `-D CHAIN spec` per iptables table, `delete rule ... handle H` for nft.
    static func removalScripts(_ own: [SavedRules.OwnRule], home: RuleHome) -> [RemovalScript] {
        var byTable: [String: [SavedRules.OwnRule]] = [:]
        var order: [String] = []
        for r in own {
            let key = home.isNftables ? "\(r.nftFamily) \(r.table)" : r.table
            if byTable[key] == nil { order.append(key) }
            byTable[key, default: []].append(r)
        }
        return order.map { key in
            let rules = byTable[key]!
            if home.isNftables {
                let lines = rules.compactMap { r in r.handle.map { "delete rule \(r.nftFamily) \(r.table) \(r.chain) handle \($0)" } }
                return RemovalScript(rules: rules, whole: lines.joined(separator: "\n") + "\n", singles: lines.map { $0 + "\n" })
            }
            let lines = rules.map { "-D \($0.chain) \($0.spec)" }
            func wrap(_ l: [String]) -> String { (["*\(key)"] + l + ["COMMIT"]).joined(separator: "\n") + "\n" }
            return RemovalScript(rules: rules, whole: wrap(lines), singles: lines.map { wrap([$0]) })
        }
    }
}

extension Instrumenter {
    /// Reads one home's saved text into tables with the ruleset model's parsers, labelled with the home's
    /// backend and family (the text alone does not say `ip6tables` or `legacy` reliably). In the nft text, the
    /// tables iptables-nft manages are left out: they belong to the iptables-nft homes.
    public static func parseHome(_ home: RuleHome, _ text: String) throws -> [Table] {
        let saved = SavedRules(home: home, text: text)
        if home.isNftables {
            guard !text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else { return [] }
            let managed = saved.xtablesManagedTables
            // Handles are taken from the text by `SavedRules.nftRuleHandles`; the model is read without them
            // (the nft parser on main turns a chain header's `# handle N` into an empty rule).
            let plain = text.replacingOccurrences(of: #" # handle \d+"#, with: "", options: .regularExpression)
            let rs = try RulesetLoader.load(text: plain, origin: "\(home)", format: .nftText)
            return rs.tables.filter { !managed.contains("\(InstrumentationPlan.nftFamilyKeyword($0.family)) \($0.name)") }
                .map { relabel($0, backend: .nftables, family: nil) }
        }
        guard text.contains("*") else { return [] }
        let rs = try RulesetLoader.load(text: text, origin: "\(home)", format: .iptables)
        return rs.tables.map { relabel($0, backend: home.backend, family: home.family) }
    }

    static func relabel(_ table: Table, backend: RulesetBackend, family: RuleFamily?) -> Table {
        var t = table
        t.backend = backend
        if let family { t.family = family }
        for ci in t.chains.indices {
            for ri in t.chains[ci].rules.indices {
                t.chains[ci].rules[ri].backend = backend
                if let family { t.chains[ci].rules[ri].family = family }
            }
        }
        return t
    }

    /// The homes a ruleset read from a file belongs to: each table's own backend and family.
    public static func homes(of ruleset: Ruleset) -> [(home: RuleHome, table: Table)] {
        ruleset.tables.map { t in
            if t.backend == .nftables { return (RuleHome(backend: .nftables, family: .inet), t) }
            return (RuleHome(backend: t.backend, family: t.family == .ipv6 ? .ipv6 : .ipv4), t)
        }
    }

    /// The ruleset model of what was read before instrumenting, for the correlator (hits → rules and roles).
    public var ruleset: Ruleset {
        Ruleset(tables: tables.map(\.table), origin: "netns \(netns)")
    }
}
