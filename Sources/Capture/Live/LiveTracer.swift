import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What `meshtrace trace` was asked to do.
public struct TraceOptions: Sendable {
    public enum Mode: String, Sendable, CaseIterable {
        /// NFLOG twins of every ambient rule (the default): which rule hit which packet.
        case nflog
        /// Additionally the kernel's own rule-by-rule walk (TRACE), joined into the same timelines.
        case trace
    }
    public var netns: NetnsRef
    /// Stop after this many seconds (nil: until SIGINT/SIGTERM/SIGHUP).
    public var duration: Double? = nil
    public var group: UInt16 = 5153
    /// tcpdump-syntax filter selecting the connections to show (`ConnectionFilter`): one is shown when any of its
    /// packets, captured or carried by an NFLOG event, matches. Everything is still read and counted.
    public var filter: String? = nil
    /// Write the libpcap capture (the `any` device, LINUX_SLL) here.
    public var writePath: String? = nil
    public var mode: Mode = .nflog
    /// Bytes copied per NFLOG event (headers only by default).
    public var snaplen: Int = 128
    /// Remove leftover meshtrace rules first instead of refusing to start.
    public var replace: Bool = false
    /// Also capture packets with libpcap (off only for benchmarks of the NFLOG path alone).
    public var capturePackets: Bool = true
    /// The reading thread runs only on CPU time the node does not otherwise want, raised when it falls behind
    /// (`ReaderPriority`); false keeps it at the normal policy.
    public var yieldToPod: Bool = true
    public var correlator = CorrelatorOptions.live
    /// nil: the NFLOG instance batches up to `queueThreshold` events per message (fewer wakeups under load).
    public var perRuleThreshold: Int? = nil
    public var queueThreshold: UInt32 = 256
    /// Tests only: the reader sleeps this long after every pass, so that it falls behind the pod on any machine (a
    /// reader on a node much busier than the test's), not only where the tests' debug build is slow enough.
    var readerPauseNanos: UInt64 = 0

    public init(netns: NetnsRef) { self.netns = netns }

    public var pcapSnaplen: Int32 { writePath != nil ? 262_144 : Int32(max(snaplen, 256)) }
}

/// Events meshtrace did not see, by cause. Never ignored: the summary prints them and `--strict` fails on them.
public struct TraceLosses: Sendable {
    /// NFULA_SEQ gaps: NFLOG messages the kernel numbered and dropped (exact).
    public var nflogSequenceGap: UInt64 = 0
    /// recv() failures with ENOBUFS on the NFLOG socket.
    public var nflogOverruns = 0
    /// Packets libpcap's ring dropped (ps_drop).
    public var pcapDropped: UInt32 = 0
    /// ENOBUFS on the socket TRACE steps arrive on (`--mode trace`: the nftrace events, or NFLOG group 0 for legacy).
    public var eventSocketOverruns = 0
    /// Legacy TRACE steps (nf_log to NFLOG group 0) the kernel numbered and dropped.
    public var traceStepSequenceGap: UInt64 = 0
    /// Twin hits the kernel counted beyond those meshtrace received. Catches what sequence numbers cannot:
    /// messages dropped at the very end, after the last one that arrived.
    public var counterShortfall: UInt64 = 0

    /// NFLOG events lost: the exact gap, or at least one per overrun when the gap could not show it
    /// (an overrun right at the end leaves no later sequence number to reveal it).
    public var nflogEventsLost: Int { max(Int(nflogSequenceGap), nflogOverruns, Int(counterShortfall)) }
    /// TRACE steps lost: the legacy gap, or at least one per overrun.
    public var traceStepsLost: Int { max(Int(traceStepSequenceGap), eventSocketOverruns) }
    public var any: Bool { nflogEventsLost > 0 || pcapDropped > 0 || traceStepsLost > 0 }
}

/// The end of a trace: the correlator's summary plus what only live tracing knows.
public struct TraceOutcome: Sendable {
    public var summary: AnalysisSummary
    /// meshtrace's count of NFLOG events per prefix (twins and observation points).
    public var hitCounts: [String: Int]
    /// The kernel's packet counters of the same rules, read before they were removed.
    public var kernelCounters: [String: UInt64]
    public var losses: TraceLosses
    /// The instrumentation that was applied.
    public var plan: InstrumentationPlan
    /// Set when NFULA_CT was unavailable: where original destinations came from instead.
    public var conntrackNote: String?
    /// Rule hits that got their connection's conntrack entry from a ctnetlink query (UDP REDIRECT/DNAT twins).
    public var conntrackJoins: UInt64 = 0
    /// Set when the name or pid the trace was given went away while it ran (the netns stayed open through
    /// meshtrace's own handle, and the rules came out through it).
    public var netnsNote: String? = nil
    /// How many NFLOG events, packets and TRACE steps were read.
    public var nflogEvents: UInt64
    public var packetsCaptured: UInt64
    public var traceSteps: UInt64
    /// From the start (sockets opened, rules read and installed) to the end (rules removed, last records read).
    public var seconds: Double
    /// From the moment the twins were in to the stop: the time events were collected, which `--duration` is.
    public var tracedSeconds: Double = 0
    /// CPU time meshtrace itself used (user + system, all threads), what tracing cost the node beyond the kernel's
    /// share of sending the events.
    public var cpuSeconds: Double = 0
    /// Whether the reading thread yielded to the pod (SCHED_IDLE while it kept up; see `ReaderPriority`), and
    /// how many times it was raised because it had fallen behind.
    public var readerYielded = false
    public var readerRaises: Int { summary.readerRaises }
    /// The reader's CPU time while raised: what it took from the pod at real-time priority.
    public var readerRaisedCPUSeconds: Double { Double(summary.readerRaisedCPUNanos) / 1e9 }
    /// Passes that ended with more waiting in a source than a pass reads: how often the reader was behind.
    var passesBehind = 0
    /// Those two in words, for the summaries.
    public var readerPrioritySaid: String {
        guard readerYielded else { return "reader at normal priority" }
        guard readerRaises > 0 else { return "reader yielded to the pod throughout" }
        return "reader raised \(readerRaises) times when it fell behind, \(String(format: "%.2f", readerRaisedCPUSeconds)) s of CPU at real-time priority"
    }
    /// The signal that ended the trace (0: the duration ran out).
    public var stoppedBySignal: Int32
}

/// Live tracing of one pod: instruments its netns, reads NFLOG events (asking conntrack where they lack it) and a libpcap
/// capture on one netns thread (see `NetnsThread`), feeds them to the one `Correlator` that `analyze` uses,
/// and takes the rules out again on every path (normal end, SIGINT/SIGTERM/SIGHUP, errors).
public final class LiveTracer: @unchecked Sendable {
    public let options: TraceOptions
    public let tags = RuleTagTable()
    private var reporter = Reporter()
    private let instrumenter: Instrumenter

    /// How long records are held before they go to the correlator: the sources deliver in batches (NFLOG's
    /// flush timeout is 10 ms), and the correlator takes records in capture order. By then the conntrack entry
    /// of a connection's first packet, confirmed after the NFLOG twins fired, is there to be asked for.
    static let holdNanos: Int64 = 30_000_000
    /// How often the correlator's clock is moved on while the pod is quiet, and how far behind the wall clock.
    static let advanceIntervalNanos: UInt64 = 250_000_000
    static let advanceLagNanos: Int64 = 200_000_000
    static let minimumPassNanos: UInt64 = 2_000_000
    /// How far apart in kernel time the capture and NFLOG may be read before the one behind is read more, and in
    /// how many more chunks a pass at most (`pump`).
    static let sourceSkewNanos: Int64 = 50_000_000
    static let catchUpChunks = 64

    // Owned by the netns thread while it runs.
    private var correlator: Correlator?
    private var nflog: NflogSource?
    private var legacyTrace: NflogSource?
    private var pcap: PcapLiveSource?
    private var events: NetfilterEventSocket?
    /// Set when NFLOG cannot attach NFULA_CT: UDP REDIRECT/DNAT hits ask conntrack for their entry instead.
    private var conntrackQuery: ConntrackQuery?
    /// UDP REDIRECT/DNAT hits that got their entry: every entry the query found was given to the hit that asked.
    private var conntrackJoins: UInt64 { conntrackQuery?.found ?? 0 }
    private var trace: TraceJoiner?
    /// `--filter`: the sources' decoders mark each record as selecting its connection or not
    /// (`PacketRecord.selected`); TRACE steps never select.
    private var filter: ConnectionFilter?
    /// A `let`: as a `var` every use per record retained and released it (the property could be reassigned).
    private let pending = PendingRecords(capacity: 1 << 14)
    /// NFLOG events per prefix id, counted for every record: plain memory, not an Array property (whose every
    /// `+= 1` from inside the hold ring's closure checked uniqueness and retained the buffer).
    private var hits = UnsafeMutablePointer<Int>.allocate(capacity: 0)
    private var hitsCapacity = 0
    /// Per NFLOG prefix id: 0 not yet known, 1 the twin's rule rewrites the destination (its records get the
    /// conntrack entry that names the original destination), 2 it does not.
    private var rewritesDestination = UnsafeMutablePointer<UInt8>.allocate(capacity: 0)
    private var arrival: Int64 = 0
    private var openFailure: Error?
    private var needsLegacyTrace = false
    /// The reading thread yields to the pod while it keeps up (see `ReaderPriority`).
    private let priority = ReaderPriority()
    /// Wall clock (ns) when the last pass that read every source empty began.
    private var drainedWall: Int64 = 0
    /// Passes that ended with a source holding more than a pass reads (`TraceOutcome.passesBehind`).
    private var passesBehind = 0
    /// Stalls of the reading thread (`StallGate`), for the summary.
    private var readerStalls = 0

    /// Called on the main thread once the twins are in and events flow (tests and benchmarks start traffic here).
    public var onReady: (() -> Void)?
    /// The live status line (events per second, drops, connections open), updated from the netns thread.
    public var status: LiveStatusLine?

    // Main thread ↔ netns thread.
    private let opened = DispatchSemaphore(value: 0)
    private let proceed = DispatchSemaphore(value: 0)
    private var abort = false
    private var finishPipe: [Int32] = [-1, -1]
    private let stopPipe = makePipe()
    /// The pod's netns, held open for the whole trace.
    private let pin: NetnsPin
    /// The path every rule change, rule read and the netns thread use: the pin's.
    private var netns: NetnsRef { pin.ref }

    /// Throws when the netns cannot be opened (gone since it was named, or no privilege).
    public init(options: TraceOptions) throws {
        self.options = options
        // Everything the trace does in the netns goes through a handle of its own on it, not through the name
        // or pid it was given (`NetnsPin`): the twins must come out even if the pod's process exits meanwhile.
        pin = try NetnsPin(options.netns)
        var settings = InstrumentationSettings(group: options.group, snaplen: options.snaplen)
        settings.observe = true
        settings.perRuleThreshold = options.perRuleThreshold
        instrumenter = Instrumenter(netns: pin.ref, settings: settings, parse: Instrumenter.parseHome)
    }

    deinit {
        close(stopPipe[0]); close(stopPipe[1])
        hits.deallocate()
        rewritesDestination.deallocate()
    }

    /// Room for prefix id `i` in the per-prefix tables (ids are dense, from the tag table).
    private func growPrefixTables(to i: Int) {
        let capacity = max(64, (i + 1) * 2)
        let newHits = UnsafeMutablePointer<Int>.allocate(capacity: capacity)
        newHits.initialize(repeating: 0, count: capacity)
        newHits.update(from: hits, count: hitsCapacity)
        hits.deallocate()
        hits = newHits
        let newKinds = UnsafeMutablePointer<UInt8>.allocate(capacity: capacity)
        newKinds.initialize(repeating: 0, count: capacity)
        newKinds.update(from: rewritesDestination, count: hitsCapacity)
        rewritesDestination.deallocate()
        rewritesDestination = newKinds
        hitsCapacity = capacity
    }

    /// The rules as read before the twins went in (nil before `run` installed them).
    public var ruleset: Ruleset? { instrumenter.plan == nil ? nil : instrumenter.ruleset }

    /// Runs the whole trace. Rules meshtrace added are removed before this returns or throws.
    /// `reporter` receives the timelines as connections finish (on the netns thread) and is not finished here:
    /// the caller adds what it prints after the outcome.
    public func run(reporter: Reporter) throws -> TraceOutcome {
        // A bad --filter is a usage error before anything is opened or touched.
        if let expression = options.filter, !expression.isEmpty { filter = try ConnectionFilter(expression) }
        try Command.requireRoot("meshtrace trace")
        self.reporter = reporter
        pending.keepFrames(reporter.wantsPackets)
        StopSignal.install()
        OutputStall.installInterruptHandler()
        LiveTracer.keepHeapWarm()
        let fds = makePipe()
        guard fds[0] >= 0 else { throw MeshtraceError(.kernelRefused, "pipe: \(String(cString: strerror(errno)))") }
        finishPipe = fds
        defer { close(fds[0]); close(fds[1]) }

        if options.mode == .trace {
            needsLegacyTrace = try instrumenter.readHomes().contains { $0.home.backend == .iptablesLegacy && $0.text.contains("ISTIO") }
        }
        let started = DispatchTime.now()
        let thread = NetnsThread(netns: netns, enterFailed: { [self] error in
            openFailure = error
            opened.signal()
        }) { [self] in try netnsMain() }
        thread.start()

        // Sockets first: a busy group or a missing netns fails here, before any rule is touched.
        opened.wait()
        if let openFailure {
            try? thread.join()
            throw openFailure
        }

        let plan: InstrumentationPlan
        do {
            // A stop asked for while the sockets opened: leave the pod untouched.
            if StopSignal.requested { throw MeshtraceError(.ok, "stopped before the rules were added") }
            plan = try instrumenter.install(replace: options.replace)
            if options.mode == .trace { try installTraceRules() }
        } catch {
            abort = true
            proceed.signal()
            try? thread.join()
            try? removeTraceRules()
            try? instrumenter.removeIfInstalled()
            throw error
        }
        // --duration is the time traced: setting up (the rules read and installed, which may wait for the
        // xtables lock) does not count against it.
        let tracing = DispatchTime.now()
        var correlatorOptions = options.correlator
        correlatorOptions.showsOnlySelected = filter != nil
        correlator = Correlator(tags: tags, ruleset: instrumenter.ruleset, options: correlatorOptions, sink: reporter)
        proceed.signal()
        onReady?()

        var kernel: [String: UInt64] = [:]
        var failures: [Error] = []
        waitForStop(started: tracing)
        let tracedSeconds = Double(DispatchTime.now().uptimeNanoseconds - tracing.uptimeNanoseconds) / 1e9
        do { kernel = try instrumenter.kernelCounters() } catch { failures.append(error) }
        do { try removeTraceRules() } catch { failures.append(error) }
        do { try instrumenter.remove() } catch { failures.append(error) }
        var b: UInt8 = 1
        _ = write(finishPipe[1], &b, 1)
        // The reading thread finishes what it read and ends. If it is stuck writing to an output nobody reads, the
        // output is given up (`OutputStall`) and the write interrupted, so the stop always returns.
        while !thread.finished(within: 50_000_000) {
            if OutputStall.isStalled { OutputStall.abandon() }
            if OutputStall.isAbandoned { thread.interrupt() }
        }
        do { try thread.join() } catch { failures.append(error) }
        // The -w file: a write that failed (disk full) is an error, not a silently short file.
        do { try pcap?.finishWriting() } catch { failures.append(error) }
        if let first = failures.first { throw first }

        guard let correlator else { throw MeshtraceError(.kernelRefused, "the trace did not start") }
        var summary = correlator.finish()
        // TRACE steps reach the correlator as NFLOG-like records (a prefix `TRACE: ...`): said apart, not as
        // NFLOG records of the twins' group.
        if let steps = trace?.steps, steps > 0 {
            summary.traceSteps = Int(steps)
            summary.nflogRecords = max(0, summary.nflogRecords - Int(steps))
        }
        var losses = TraceLosses()
        losses.nflogSequenceGap = nflog?.sequenceGap ?? 0
        losses.nflogOverruns = nflog?.overruns ?? 0
        losses.pcapDropped = pcap?.dropped ?? 0
        losses.eventSocketOverruns = (events?.overruns ?? 0) + (legacyTrace?.overruns ?? 0)
        losses.traceStepSequenceGap = legacyTrace?.sequenceGap ?? 0
        var counts: [String: Int] = [:]
        for id in 0..<hitsCapacity where hits[id] > 0 { counts[tags.text(for: UInt32(id)), default: 0] += hits[id] }
        let kernelTotal = kernel.values.reduce(0, +)
        let received = kernel.keys.reduce(UInt64(0)) { $0 + UInt64(counts[$1] ?? 0) }
        losses.counterShortfall = kernelTotal > received ? kernelTotal - received : 0
        summary.kernelCounters = kernel
        summary.eventsLost = losses.nflogEventsLost
        summary.readerStalls = readerStalls
        summary.readerRaises = priority.raises
        summary.readerRaisedCPUNanos = priority.raisedCPUNanos
        summary.live = true
        if trace != nil { summary.traceStepsLost = losses.traceStepsLost }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
        var outcome = TraceOutcome(summary: summary, hitCounts: counts, kernelCounters: kernel, losses: losses, plan: plan,
                                   conntrackNote: nflog?.socket.conntrackProblem.map { problem in
                                       let missed = conntrackQuery.map { $0.notFound + $0.failed } ?? 0
                                       return "\(problem); original destinations come from the REDIRECT/DNAT twins' own packets (logged before NAT), and conntrack is asked for UDP ones (\(counted(conntrackJoins, "hit")) joined"
                                           + (missed > 0 ? ", \(missed) without an entry)" : ")")
                                   },
                                   conntrackJoins: conntrackJoins,
                                   nflogEvents: nflog?.recordsRead ?? 0, packetsCaptured: pcap?.framesRead ?? 0,
                                   traceSteps: trace?.steps ?? 0, seconds: seconds, cpuSeconds: LiveTracer.processCPUSeconds(),
                                   readerYielded: priority.yielded,
                                   stoppedBySignal: StopSignal.signalNumber)
        outcome.tracedSeconds = tracedSeconds
        outcome.passesBehind = passesBehind
        if !pin.isNamed(by: options.netns.path) {
            // Gone, or the name now means another namespace: a pid reused, a netns made again under its name.
            let again = FileManager.default.fileExists(atPath: options.netns.path)
            let what = options.netns.pid != nil
                ? "\(options.netns) exited" + (again ? " (its number is another process's now)" : "")
                : "netns \(options.netns) was removed" + (again ? " (and another made under its name, untouched)" : "")
            outcome.netnsNote = "\(what) during the trace; meshtrace held the network namespace open and removed its rules through that handle"
        }
        pcap?.close()
        nflog?.close()
        legacyTrace?.close()
        return outcome
    }

    /// glibc gives a thread arena's free top back to the kernel (128 KiB trim threshold) and grows it again
    /// moments later: at tens of thousands of events per second that churn was ~8 % of the trace's CPU in page
    /// faults and mprotect. A trace's heap is bounded (open connections, the hold ring), so it is kept.
    static func keepHeapWarm() {
        // mallopt is glibc's (malloc.h, which the Glibc module does not bring in): M_TRIM_THRESHOLD -1, M_TOP_PAD -2.
        typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
        let mallopt = unsafeBitCast(symbol, to: Mallopt.self)
        _ = mallopt(-1, 256 << 20)
        _ = mallopt(-2, 16 << 20)
    }

    static func processCPUSeconds() -> Double {
        var usage = rusage()
        guard getrusage(RUSAGE_SELF.rawValue, &usage) == 0 else { return 0 }
        func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    /// Ends the trace from inside the program (tests, benchmarks, a failure on the netns thread); like a signal,
    /// it lets the main thread remove the rules.
    public func stop() {
        var b: UInt8 = 1
        _ = write(stopPipe[1], &b, 1)
    }

    /// Blocks until a stop signal, `stop()`, or the duration.
    private func waitForStop(started: DispatchTime) {
        // A duration past ~30 years is no deadline (`UInt64(d * 1e9)` traps for 1e300 or inf, with the twins in).
        let deadline = options.duration.flatMap { d -> UInt64? in
            let ns = d * 1e9
            return ns.isFinite && ns < 1e18 ? started.uptimeNanoseconds + UInt64(max(0, ns)) : nil
        }
        while !StopSignal.requested {
            var timeout: Int32 = 1000
            if let deadline {
                let now = DispatchTime.now().uptimeNanoseconds
                if now >= deadline { return }
                timeout = Int32(min(1000, (deadline - now) / 1_000_000 + 1))
            }
            var p = [pollfd(fd: StopSignal.fd, events: Int16(POLLIN), revents: 0),
                     pollfd(fd: stopPipe[0], events: Int16(POLLIN), revents: 0)]
            _ = poll(&p, 2, timeout)
            if p[1].revents != 0 { return }
        }
    }

    // MARK: - the netns thread

    private func netnsMain() throws {
        do {
            var opts = NflogSocket.Options(group: options.group)
            opts.copyRange = UInt32(options.snaplen)
            opts.queueThreshold = options.queueThreshold
            nflog = try NflogSource(index: 1, tags: tags, options: opts)
            // Without a capture only: see `stampsFromSequence`.
            nflog?.stampsFromSequence = !options.capturePackets
            nflog?.selector = filter
            // Conntrack is asked only where NFLOG cannot attach it itself (see `ConntrackQuery`).
            if nflog?.socket.conntrackAttached != true { conntrackQuery = try ConntrackQuery() }
            var groups: [NetfilterEventSocket.Group] = []
            if options.mode == .trace {
                groups.append(.nftrace)
                trace = TraceJoiner(tags: tags)
                // Legacy TRACE goes through nf_log; binding nfnetlink_log as this netns's logger sends it to group 0.
                // Only when legacy holds ambient rules: the binding changes the netns's nf_log setting (it is put
                // back when the trace ends).
                if needsLegacyTrace {
                    var legacy = NflogSocket.Options(group: 0)
                    legacy.copyRange = UInt32(options.snaplen)
                    legacy.conntrack = false
                    legacy.bindAsLogger = true
                    legacyTrace = try? NflogSource(index: 3, tags: tags, options: legacy)
                    legacyTrace?.stampsFromSequence = !options.capturePackets
                    legacyTrace?.selector = filter
                }
            }
            if !groups.isEmpty { events = try NetfilterEventSocket(groups: groups) }
            if options.capturePackets {
                // `--filter` selects connections, so the capture keeps every packet (a matching connection's lo leg
                // after a REDIRECT would not match `port 80`); the filter runs on each record as it is read.
                pcap = try PcapLiveSource(index: 2, tags: tags, snaplen: options.pcapSnaplen, writePath: options.writePath)
                pcap?.selector = filter
            }
        } catch {
            openFailure = error
            opened.signal()
            return
        }
        opened.signal()
        proceed.wait()
        priority.start(yielding: options.yieldToPod)
        // Runs on this thread, inside the netns, whatever happens below.
        defer { legacyTrace?.socket.restoreLoggers() }
        defer { priority.stop() }
        if abort { return }
        do {
            try loop()
        } catch {
            stop()
            throw error
        }
    }

    private func loop() throws {
        var record = PacketRecord()
        var fds: [pollfd] = [pollfd(fd: finishPipe[0], events: Int16(POLLIN), revents: 0)]
        if let nflog { fds.append(pollfd(fd: nflog.fd, events: Int16(POLLIN), revents: 0)) }
        if let events { fds.append(pollfd(fd: events.fd, events: Int16(POLLIN), revents: 0)) }
        if let fd = pcap?.fd { fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0)) }
        if let legacyTrace { fds.append(pollfd(fd: legacyTrace.fd, events: Int16(POLLIN), revents: 0)) }
        let eventBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 8)
        defer { eventBuffer.deallocate() }
        var finishing = false
        var finishDeadline: UInt64 = 0
        var nextAdvance: UInt64 = 0
        let linger = UInt64(max(options.correlator.closeLingerNanos, 2))
        var gate = StallGate(stallNanos: linger / 2, limitNanos: 2 * linger)
        while true {
            _ = poll(&fds, nfds_t(fds.count), 5)
            let woke = DispatchTime.now().uptimeNanoseconds
            let wokeWall = NflogSource.realtime().totalNanoseconds
            if !finishing, fds[0].revents != 0 {
                // The rules are out; what the kernel queued before that (flush timeout 10 ms) still arrives.
                finishing = true
                finishDeadline = DispatchTime.now().uptimeNanoseconds + 60_000_000
                // The last events are drained at the normal policy, whatever the node is doing.
                priority.stop()
            }
            if gate.checkpoint(wall: woke, cpu: StallGate.threadCPU()) { correlator?.holdSweeps() }
            let (got, drained) = pump(&record, eventBuffer, ready: fds)
            // Everything the kernel had when this pass began has been read.
            if drained { drainedWall = wokeWall } else { passesBehind += 1 }
            let read = DispatchTime.now().uptimeNanoseconds
            if gate.checkpoint(wall: read, cpu: StallGate.threadCPU()) { correlator?.holdSweeps() }
            gate.afterReading(woke: woke, wall: read, drained: drained)
            release(force: false)
            if gate.afterRelease(now: DispatchTime.now().uptimeNanoseconds, oldestHeld: pending.oldestArrival) {
                correlator?.resumeSweeps()
            }
            let tick = DispatchTime.now().uptimeNanoseconds
            if tick >= nextAdvance {
                nextAdvance = tick + LiveTracer.advanceIntervalNanos
                advanceClock()
            }
            outputPass()
            if let status, status.line.due() {
                let events = Int((nflog?.recordsRead ?? 0) + (pcap?.framesRead ?? 0))
                let dropped = Int(nflog?.sequenceGap ?? 0) + (nflog?.overruns ?? 0)
                status.update(events: events, dropped: dropped, openConnections: correlator?.openConnectionCount ?? 0)
            }
            let passed = DispatchTime.now().uptimeNanoseconds
            priority.passFinished(drained: drained, at: passed)
            if finishing && got == 0 && passed >= finishDeadline { break }
            // At most one pass per `minimumPassNanos`: every NFLOG batch and
            // capture block would otherwise wake the thread on its own, for a few records each. The kernel
            // buffers hold far more than a pass's worth; the records are held 30 ms anyway.
            // Plus the tests' pause (`readerPauseNanos`), in the same sleep.
            let spent = DispatchTime.now().uptimeNanoseconds - woke
            let pause = finishing ? 0 : (got > 0 && spent < LiveTracer.minimumPassNanos ? LiveTracer.minimumPassNanos - spent : 0)
                + options.readerPauseNanos
            if pause > 0 {
                var ts = timespec(tv_sec: Int(pause / 1_000_000_000), tv_nsec: Int(pause % 1_000_000_000))
                nanosleep(&ts, nil)
            }
        }
        readerStalls = gate.stalls
        release(force: true)
        reporter.flushOutput()
        status?.finish()
    }

    private var stoppedForClosedOutput = false

    /// Timelines finished in this pass go out now (a write only when something was printed: the printers'
    /// buffers are empty otherwise); a reader that went away (`| head`) ends the trace like a signal.
    private func outputPass() {
        reporter.flushOutput()
        if !stoppedForClosedOutput && reporter.outputClosed {
            stoppedForClosedOutput = true
            stop()
        }
    }

    /// Reads what is waiting on every socket: how many items were read, and whether every source was read empty
    /// (none stopped at its limit with more waiting).
    private func pump(_ record: inout PacketRecord, _ eventBuffer: UnsafeMutableRawBufferPointer,
                      ready fds: [pollfd]) -> (items: Int, drained: Bool) {
        var got = 0
        var drained = true
        // One arrival time per pass: the hold is 30 ms, a pass takes far less.
        arrival = Int64(DispatchTime.now().uptimeNanoseconds)
        // A socket poll did not flag has nothing to read: no recv() that would only say EAGAIN.
        func isReady(_ fd: Int32) -> Bool { fds.contains { $0.fd == fd && $0.revents != 0 } }
        if let events, isReady(events.fd) {
            var emptied = false
            for _ in 0..<1024 {   // one event per datagram: a pass every 2 ms must keep up with a burst of steps
                let n = events.receive(into: eventBuffer)
                if n <= 0 { if n == 0 { emptied = true; break } else { continue } }
                got += 1
                NetfilterEventSocket.forEachMessage(in: UnsafeRawBufferPointer(rebasing: eventBuffer[0..<n])) { subsystem, message, family, attrs in
                    if subsystem == NetfilterNetlink.subsysNftables, message == NetfilterNetlink.nftMsgTrace,
                       let trace, let step = trace.record(attrs, family: family, into: &record) {
                        _ = step
                        // TRACE steps follow packets the NFLOG events and the capture already judged.
                        record.selected = filter == nil
                        hold(&record, frame: nil, linkType: LinkType.raw)
                    }
                }
            }
            if !emptied { drained = false }
        }
        var nflogBehind = false
        func drainNflog(_ nflog: NflogSource) {
            let (records, emptied) = nflog.drain(limit: 64, slot: freeSlot) { _, tlvs in
                commit(frame: tlvs, linkType: LinkType.nflog)
                return true
            }
            got += records
            nflogBehind = !emptied
        }
        if let nflog, isReady(nflog.fd) { drainNflog(nflog) }
        if let legacyTrace, isReady(legacyTrace.fd) {
            // One step per datagram (nf_log's qthreshold is 1): 64 a pass kept up with ~32 000 steps a second, and
            // a busy pod's TRACE makes more; behind, steps came ~0.7 s late, after their connection was emitted,
            // and made connections of their own (a tunnel among them read as a forged mark).
            let (records, emptied) = legacyTrace.drain(limit: 1024, slot: freeSlot) { rec, _ in
                guard trace?.rewriteLegacy(&rec.pointee, instrumenter: instrumenter) == true else { return false }
                commit(frame: nil, linkType: LinkType.raw)
                return true
            }
            got += records
            if !emptied { drained = false }
        }
        var pcapBehind = false
        func drainPcap(_ pcap: PcapLiveSource) {
            let link = pcap.linkType
            let frames = pcap.drain(limit: 4096, slot: freeSlot) { _, frame in
                commit(frame: frame, linkType: link)
            }
            got += frames
            pcapBehind = frames == 4096
        }
        if let pcap { drainPcap(pcap) }
        // Falling behind, read more of whichever of the two is further behind in kernel time, so that a connection's
        // packets and its NFLOG events reach the correlator within a pass or two of each other. Read by count alone
        // (4096 frames against 64 NFLOG datagrams of up to 256 events a pass; a connection here makes 24 packets and
        // 46 events) the capture fell seconds behind, and its packets of connections already emitted made
        // connections of their own: the tests' debug build tracing 3000 connections at ~2000 a second made
        // 7106-8865 connections for 6000 (`LiveTracerTests.testAReaderThatFallsBehindReadsTheCaptureInStepWithNflog`).
        func further(_ a: Int64, behind b: Int64) -> Bool {
            a != .min && b != .min && a < b - LiveTracer.sourceSkewNanos
        }
        if let nflog, let pcap {
            for _ in 0..<LiveTracer.catchUpChunks where nflogBehind || pcapBehind {
                if pcapBehind && further(pcap.lastFrameNanos, behind: nflog.lastKernelNanos) {
                    drainPcap(pcap)
                } else if nflogBehind && further(nflog.lastKernelNanos, behind: pcap.lastFrameNanos) {
                    drainNflog(nflog)
                } else {
                    break
                }
            }
        }
        if nflogBehind || pcapBehind { drained = false }
        return (got, drained)
    }

    /// Holds a copy of a record built elsewhere (TRACE steps).
    private func hold(_ record: inout PacketRecord, frame: UnsafeRawBufferPointer?, linkType: Int32) {
        freeSlot().pointee = record
        commit(frame: frame, linkType: linkType)
    }

    /// A slot of the hold ring for a source to decode into (the oldest record goes on early if it is full).
    private func freeSlot() -> UnsafeMutablePointer<PacketRecord> {
        if pending.isFull, let correlator {
            releaseOldest(to: correlator, reporter: reporter, wantsPackets: reporter.wantsPackets)
        }
        return pending.nextSlot()
    }

    private func commit(frame: UnsafeRawBufferPointer?, linkType: Int32) {
        pending.commit(frame: frame, linkType: linkType, group: options.group, at: arrival)
    }

    /// Captures stamp packets with the realtime clock, so the wall clock when a pass began that read every source
    /// empty, less what may still have been on its way (the hold time and NFLOG's batching), is a capture time every
    /// packet still to come is later than or within the correlator's linger of. Not the wall clock now: a reader
    /// that fell behind (a busy node) would otherwise finish connections whose last packets it has yet to read.
    private func advanceClock() {
        guard let correlator, let time = LiveTracer.quietClock(drainedWall: drainedWall, heldRecords: pending.count) else { return }
        correlator.advance(to: time)
    }

    /// The capture time the correlator's clock may be moved to while no packet moves it, or nil.
    /// - Nil while the hold ring has records: the pod is not quiet (their packets move the clock once released),
    ///   and a reader that was stalled holds packets captured long before `drainedWall`. Moving the clock past
    ///   them would finish their connections first (a closed one's linger runs out) and split them: the held
    ///   packets would then start new, headless connections.
    /// - Otherwise every packet captured before `drainedWall`, less the sources' delivery delay, has been
    ///   read and released, so the clock may go to `drainedWall` less the hold and the lag.
    static func quietClock(drainedWall: Int64, heldRecords: Int) -> Timestamp? {
        guard drainedWall > 0, heldRecords == 0 else { return nil }
        let wall = drainedWall - LiveTracer.holdNanos - LiveTracer.advanceLagNanos
        return Timestamp(seconds: wall / 1_000_000_000, nanoseconds: Int32(wall % 1_000_000_000))
    }

    private func release(force: Bool) {
        let cutoff = Int64(DispatchTime.now().uptimeNanoseconds) - LiveTracer.holdNanos
        guard let correlator else { return }
        // Loaded once per pass, not once per record.
        let reporter = self.reporter, wantsPackets = reporter.wantsPackets
        while let at = pending.oldestArrival, force || at <= cutoff {
            releaseOldest(to: correlator, reporter: reporter, wantsPackets: wantsPackets)
        }
    }

    @inline(__always)
    private func releaseOldest(to correlator: Correlator, reporter: Reporter, wantsPackets: Bool) {
        if wantsPackets {
            pending.popOldest { record, frame, linkType in
                let connection = place(record, on: correlator)
                if let frame { reporter.packet(record.pointee, frame: frame, linkType: linkType, connection: connection) }
            }
        } else {
            // No closure, no frame: the record is read in its slot.
            _ = place(pending.takeOldest(), on: correlator)
        }
    }

    /// Counts a record's rule hit, gives a destination-rewriting twin's hit its conntrack entry, and hands the
    /// record to the correlator.
    @inline(__always)
    private func place(_ record: UnsafeMutablePointer<PacketRecord>, on correlator: Correlator) -> ConnectionID? {
        // The stored NFLOG fields, not `nflog` (which would copy all of them into an optional).
        if record.pointee.hasNflog, record.pointee.nflogFields.prefixID != 0 {
            let i = Int(record.pointee.nflogFields.prefixID)
            if i >= hitsCapacity { growPrefixTables(to: i) }
            hits[i] += 1
            // TCP is not asked: the twin's packet is the pre-NAT view, and the post-NAT one is linked to it by the
            // initiator's endpoint and the sequence space, or through a remapped source port by the SYN's ISN
            // (docs/TIMELINES.md), as `analyze` does. A UDP view with a remapped port is linked only by the entry.
            if rewritesDestination(i), !record.pointee.nflogFields.hasConntrack,
               record.pointee.tuple.proto != IPProto.tcp, let conntrackQuery,
               let ct = conntrackQuery.entry(original: record.pointee.tuple) {
                record.pointee.nflogFields.conntrack = ct
            }
        }
        return correlator.ingest(inPlace: &record.pointee)
    }

    /// Whether the rule a twin stands for rewrites the destination (REDIRECT, DNAT): only its hits, the first
    /// packet of each NATed connection, need the conntrack entry.
    private func rewritesDestination(_ id: Int) -> Bool {
        if rewritesDestination[id] == 0 {
            var rewrites = false
            if let tag = tags.tag(for: UInt32(id)), let rule = instrumenter.ruleset.rule(for: tag) {
                switch rule.target {
                case .redirect, .dnat: rewrites = true
                default: break
                }
            }
            rewritesDestination[id] = rewrites ? 1 : 2
        }
        return rewritesDestination[id] == 1
    }

    // MARK: - TRACE rules (--mode trace)

    private func installTraceRules() throws {
        let handles = try TraceRules.handlePositions(netns: netns)
        trace?.positions = handles.positions
        trace?.ownHandles = handles.own
        // `--replace` over a killed legacy `--mode trace`: the backends its leftovers recorded are the true ones.
        legacyTrace?.socket.adoptPriorLoggers(instrumenter.recoveredLoggers)
        try TraceRules.install(netns: netns, homes: instrumenter.plan?.ambientHomes ?? [],
                               priorLoggers: legacyTrace?.socket.priorLoggers ?? [:])
        if needsLegacyTrace { trace?.legacyPositions = try TraceJoiner.legacyPositions(netns: netns) }
    }

    private func removeTraceRules() throws {
        guard options.mode == .trace else { return }
        try TraceRules.remove(netns: netns)
    }
}

/// Records waiting out the hold time, oldest first, in a fixed ring the sources decode into directly: a
/// record is written once, in its slot, and read from there by the correlator (no copy on the way in or out,
/// no allocation per packet once warm).
final class PendingRecords {
    // Plain memory, not Array properties (each write to one checked its buffer's uniqueness), and a power-of-two
    // capacity so the ring's index wraps with a mask instead of a division: several times per record.
    private let records: UnsafeMutablePointer<PacketRecord>
    private let arrivals: UnsafeMutablePointer<Int64>
    private let linkTypes: UnsafeMutablePointer<Int32>
    private let hasFrame: UnsafeMutablePointer<Bool>
    private var frames: [[UInt8]]
    private var head = 0
    private(set) var count = 0
    let capacity: Int
    private let mask: Int
    private(set) var keepsFrames = false

    /// `capacity` is rounded up to a power of two.
    init(capacity: Int) {
        var size = 1
        while size < capacity { size <<= 1 }
        self.capacity = size
        mask = size - 1
        records = .allocate(capacity: size)
        records.initialize(repeating: PacketRecord(), count: size)
        arrivals = .allocate(capacity: size)
        arrivals.initialize(repeating: 0, count: size)
        linkTypes = .allocate(capacity: size)
        linkTypes.initialize(repeating: 0, count: size)
        hasFrame = .allocate(capacity: size)
        hasFrame.initialize(repeating: false, count: size)
        frames = []
    }

    /// Whether records keep a copy of their frame (for sinks that want packets); set before the first record.
    func keepFrames(_ keep: Bool) {
        keepsFrames = keep
        frames = keep ? Array(repeating: [], count: capacity) : []
    }

    deinit {
        records.deinitialize(count: capacity)
        records.deallocate()
        arrivals.deallocate()
        linkTypes.deallocate()
        hasFrame.deallocate()
    }

    var isFull: Bool { count == capacity }
    var oldestArrival: Int64? { count == 0 ? nil : arrivals[head] }

    /// The slot the next record goes into; it joins the ring only when `commit` is called (so a record a
    /// source decides not to keep just leaves the slot to the next one). The ring must not be full.
    func nextSlot() -> UnsafeMutablePointer<PacketRecord> {
        records + ((head + count) & mask)
    }

    /// Adds the record decoded into `nextSlot()`.
    func commit(frame: UnsafeRawBufferPointer?, linkType: Int32, group: UInt16, at: Int64) {
        let i = (head + count) & mask
        arrivals[i] = at
        linkTypes[i] = linkType
        hasFrame[i] = keepsFrames && frame != nil
        if keepsFrames, let frame {
            frames[i].removeAll(keepingCapacity: true)
            if linkType == LinkType.nflog {
                // LINKTYPE_NFLOG frames start with nflog_hdr: family, version 0, be16 group.
                let family: UInt8 = records[i].tuple.src.addr.family == .v6 ? 10 : 2
                frames[i].append(contentsOf: [family, 0, UInt8(group >> 8), UInt8(group & 0xff)])
            }
            frames[i].append(contentsOf: frame)
        }
        count += 1
    }

    /// Takes the oldest record off the ring, for a caller that needs no frame; it stays valid in its slot until
    /// the ring is written again. The ring must not be empty.
    func takeOldest() -> UnsafeMutablePointer<PacketRecord> {
        let i = head
        head = (head + 1) & mask
        count -= 1
        return records + i
    }

    func popOldest(_ body: (UnsafeMutablePointer<PacketRecord>, UnsafeRawBufferPointer?, Int32) -> Void) {
        guard count > 0 else { return }
        let i = head
        let record = takeOldest()
        if hasFrame[i] {
            frames[i].withUnsafeBytes { body(record, $0, linkTypes[i]) }
        } else {
            body(record, nil, linkTypes[i])
        }
    }
}

