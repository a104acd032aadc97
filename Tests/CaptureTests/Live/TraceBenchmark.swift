import XCTest
@testable import Capture
#if canImport(Glibc)
import Glibc
#endif

/// `scripts/bench-trace`: many short connections through the lab's ztunnel stand-in, without and with
/// `meshtrace trace` on the client pod. Runs only when MESHTRACE_BENCH=1 (the script sets it); the numbers
/// go to stdout as `bench-trace:` lines.
///
/// Untraced and traced runs alternate (U T U T ... U), and each traced run is judged against the mean of the
/// untraced runs either side of it: on a shared machine the rate drifts with the neighbours' load, and a
/// single U T U sequence mostly measured that drift. The ratio reported is the median of the rounds. Each round
/// also runs the load while tcpdump collects the same twins and packets (D, judged the same way), so the run
/// reads U T U D U T U D ... U and says what the live timelines cost beyond collecting the raw records.
final class TraceBenchmark: KernelTestCase {
    struct TracedRun {
        var load: ConnectionLoad.Result
        var lost: Int
        var ourTotal: UInt64
        var kernelTotal: UInt64
        var events: Int
        var packets: Int
        var connections: Int
        /// ztunnel hops joined and escapes reported (nil from the text view, whose summary line the round prints).
        var hops: Int? = nil
        var escapes: Int? = nil
        var perPrefix: [(String, UInt64)]
        var said: String
        /// CPU seconds of the lab, the load and meshtrace during the load (see `labCPU`).
        var cpu: Double
        var meshtraceCPU: Double
    }

    /// A run of the load while tcpdump collects the same twins' NFLOG group and the pod's packets into files.
    struct DumpRun {
        var load: ConnectionLoad.Result
        var nflogCaptured: Int
        var kernelTotal: UInt64
        var packetsCaptured: Int
        var packetsDropped: Int
        var cpu: Double
        var tcpdumpCPU: Double
    }

    /// CPU seconds (user + system) used so far by the processes in the lab's namespaces (the ztunnel and app
    /// stand-ins) and by this test process (the load's threads), plus `extra` pids (the tracer). The kernel's
    /// work for their packets (NFLOG, conntrack, capture copies, softirq) is charged to them too.
    static func cpuSeconds(_ lab: LabTopology, extra: [Int32] = []) -> Double {
        var usage = rusage()
        _ = getrusage(RUSAGE_SELF.rawValue, &usage)
        var seconds = Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6
            + Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6
        var pids = extra
        for pod in lab.pods {
            let listed = (try? Command.run(["ip", "netns", "pids", pod.name]).stdout) ?? ""
            pids += listed.split(separator: "\n").compactMap { Int32($0.trimmingCharacters(in: .whitespaces)) }
        }
        for pid in Set(pids) where pid != getpid() { seconds += processCPU(pid) }
        return seconds
    }

    /// The last line of a file that contains `needle`, looked for in the file's last 8 MB, then in all of it.
    static func lastLine(of path: String, containing needle: String) -> Substring? {
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        for window: UInt64 in [8 << 20, size] {
            try? handle.seek(toOffset: size > window ? size - window : 0)
            let text = String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
            if let line = text.split(separator: "\n").last(where: { $0.contains(needle) }) { return line }
            if window >= size { break }
        }
        return nil
    }

    /// The counts of a text-view trace, from the summary it prints last (`TraceSummaryText`): the `trace:` line,
    /// one `ours / kernel  prefix  rule` row per twin, the total row and `events lost:`.
    static func textSummary(of log: String, load: ConnectionLoad.Result, cpu: Double,
                            meshtraceCPU: Double) throws -> TracedRun {
        guard let handle = FileHandle(forReadingAtPath: log) else { throw MeshtraceError(.badInput, "no trace output") }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        try? handle.seek(toOffset: size > 1 << 20 ? size - (1 << 20) : 0)
        let tail = String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
        let lines = tail.split(separator: "\n").map(String.init)
        let start = try XCTUnwrap(lines.lastIndex { $0.hasPrefix("trace: ") }, "no text summary from the trace")
        func number(before label: String, in line: String) -> Int { TraceCLITests.summaryCount(label, in: line) ?? 0 }
        let events = number(before: "NFLOG events", in: lines[start])
        // What the correlator took: every NFLOG record and every captured packet (JSON's "packets").
        var run = TracedRun(load: load, lost: -1, ourTotal: 0, kernelTotal: 0, events: events,
                            packets: events + number(before: "packets captured", in: lines[start]),
                            connections: number(before: "connections", in: lines[start]),
                            perPrefix: [], said: String(lines[start].dropFirst("trace: ".count)), cpu: cpu, meshtraceCPU: meshtraceCPU)
        for line in lines[(start + 1)...] {
            if line.hasPrefix("events lost: ") {
                run.lost = Int(line.dropFirst("events lost: ".count).split(separator: " ").first ?? "") ?? -1
                run.said += "; " + line
                continue
            }
            // "  ours / kernel[  ≠]  prefix  rule": only rows whose kernel counter was read.
            let words = line.split(separator: " ")
            guard words.count >= 4, words[1] == "/", let ours = UInt64(words[0]), let kernel = UInt64(words[2]) else { continue }
            let prefix = words[3] == "≠" ? (words.count > 4 ? String(words[4]) : "") : String(words[3])
            if prefix == "total" { continue }
            run.ourTotal += ours
            run.kernelTotal += kernel
            if kernel > 0 { run.perPrefix.append((prefix, kernel)) }
        }
        run.perPrefix.sort { $0.1 > $1.1 }
        return run
    }

    static func processCPU(_ pid: Int32) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // After "pid (comm)": state is field 3, utime 14, stime 15 (1-based), so 11 and 12 here (0-based from state).
        guard fields.count > 12, let u = Double(fields[11]), let s = Double(fields[12]) else { return 0 }
        return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    func testConnectionRateWithAndWithoutTracing() throws {
        let env = ProcessInfo.processInfo.environment
        try XCTSkipUnless(env["MESHTRACE_BENCH"] == "1", "benchmark: run scripts/bench-trace")
        let count = Int(env["MESHTRACE_BENCH_CONNECTIONS"] ?? "") ?? 2000
        let workers = Int(env["MESHTRACE_BENCH_WORKERS"] ?? "") ?? 4
        let rounds = max(1, min(Int(env["MESHTRACE_BENCH_ROUNDS"] ?? "") ?? 3, 10))
        let executable = env["MESHTRACE_BENCH_EXECUTABLE"] ?? LiveTracerTests.executable
        // MESHTRACE_BENCH_POOLING=multiplex: the ztunnel stand-ins carry every connection to a pod over one HBONE
        // connection, several at once (ztunnel's HTTP/2 pool); =pool: one kept connection per destination, one
        // stream at a time. Unset: a tunnel per connection.
        var options = LabOptions(executable: executable)
        switch env["MESHTRACE_BENCH_POOLING"] {
        case "multiplex"?: options.multiplexTunnels = true
        case "pool"?: options.poolTunnels = true
        case nil, ""?: break
        case let other?: return XCTFail("MESHTRACE_BENCH_POOLING=\(other): not multiplex or pool")
        }
        // MESHTRACE_BENCH_STREAMS=N, with =multiplex: at most N streams on one tunnel at once (ztunnel's
        // POOL_MAX_STREAMS_PER_CONNECTION), so several tunnels to the pod are open at once.
        if let text = env["MESHTRACE_BENCH_STREAMS"], !text.isEmpty {
            guard let n = Int(text), n >= 1, options.multiplexTunnels else {
                return XCTFail("MESHTRACE_BENCH_STREAMS=\(text): a count of 1 or more, with MESHTRACE_BENCH_POOLING=multiplex")
            }
            options.streamsPerTunnel = n
        }
        let lab = try LabTopology(options: options)
        defer { lab.teardown() }
        // MESHTRACE_BENCH_TARGET=vip: the load dials the lab's service VIP, which the client's ztunnel stand-in resolves
        // to the server pod (no tunnel names the app's destination: every hop is joined at emission, without identity);
        // =mixed: the service whose endpoints are the server pod and the peer outside the mesh, in turn (tunnels and
        // passthroughs alternate).
        let address: IPAddress
        switch env["MESHTRACE_BENCH_TARGET"] {
        case "vip"?: address = LabTopology.serviceVIP
        case "mixed"?: address = LabTopology.mixedServiceVIP
        case nil, ""?: address = lab.server.ipv4
        case let other?:
            // A misspelt target would otherwise measure the pod's address under the wrong name.
            return XCTFail("MESHTRACE_BENCH_TARGET=\(other): not vip or mixed")
        }
        let target = Endpoint(address, LabTopology.appPort)

        // Warm up (ARP, the stand-ins' first accepts), then U T U T ... U.
        _ = try ConnectionLoad.run(in: lab.client.ref, to: target, count: 100, workers: workers)
        func untracedRun() throws -> (ConnectionLoad.Result, Double) {
            let before = TraceBenchmark.cpuSeconds(lab)
            let r = try ConnectionLoad.run(in: lab.client.ref, to: target, count: count, workers: workers)
            return (r, TraceBenchmark.cpuSeconds(lab) - before)
        }
        var untracedRuns = [try untracedRun()]
        var traced: [TracedRun] = []
        // MESHTRACE_BENCH_COMPARE=PATH (scripts/bench-trace --compare): odd rounds trace with that build instead,
        // so two builds are judged in one run, on the same drift, against the same untraced runs.
        let compare = env["MESHTRACE_BENCH_COMPARE"].flatMap { $0.isEmpty ? nil : $0 }
        // The same twins collected by tcpdump instead (what `meshtrace plan` leads to): every round also runs
        // U D, so the sequence is U T U D U T U D ... U. MESHTRACE_BENCH_TCPDUMP=0 leaves those runs out.
        let tcpdump = env["MESHTRACE_BENCH_TCPDUMP"] == "0" ? nil : Command.which("tcpdump")
        var dumped: [DumpRun] = []
        // Where each traced and each tcpdump run sits among the untraced runs: after untraced run i, before i + 1.
        var tracedAfter: [Int] = [], dumpedAfter: [Int] = []
        for round in 0..<rounds {
            let tracer = compare != nil && round % 2 == 1 ? compare! : executable
            tracedAfter.append(untracedRuns.count - 1)
            traced.append(try tracedRun(lab: lab, target: target, count: count, workers: workers, executable: tracer, env: env,
                                        round: round + 1))
            untracedRuns.append(try untracedRun())
            if let tcpdump {
                dumpedAfter.append(untracedRuns.count - 1)
                dumped.append(try tcpdumpRun(lab: lab, target: target, count: count, workers: workers, tcpdump: tcpdump,
                                             keep: env["MESHTRACE_BENCH_KEEP"].flatMap { $0.isEmpty ? nil : $0 + "/dump-\(round + 1)" }))
                untracedRuns.append(try untracedRun())
            }
        }
        let untraced = untracedRuns.map(\.0)

        func f(_ x: Double) -> String { String(format: "%.0f", x) }
        // NaN for no rounds (a build that traced none): a crash here would end the process before the lab's
        // teardown, leaving its namespaces behind (`meshtrace lab down` removes them).
        func median(_ xs: [Double]) -> Double {
            let s = xs.sorted()
            guard !s.isEmpty else { return .nan }
            return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
        }
        var ratios: [Double] = []
        print("bench-trace: \(executable)\(address != lab.server.ipv4 ? ", to the service VIP \(target)" : "")")
        print("bench-trace: connections per run \(count), workers \(workers), rounds \(rounds), failures untraced \(untraced.reduce(0) { $0 + $1.failures }), traced \(traced.reduce(0) { $0 + $1.load.failures })")
        for (i, t) in traced.enumerated() {
            let before = untraced[tracedAfter[i]].rate, after = untraced[tracedAfter[i] + 1].rate
            let ratio = t.load.rate / ((before + after) / 2)
            ratios.append(ratio)
            print("bench-trace: round \(i + 1): untraced \(f(before)) / \(f(after)) conn/s, traced \(f(t.load.rate)) conn/s, ratio \(String(format: "%.2f", ratio)); \(t.said)\(t.hops.map { "; hops \($0)" } ?? "")\(t.escapes.map { ", escapes \($0)" } ?? "")")
        }
        if let compare {
            // Each build's rounds on their own: the even rounds traced with `executable`, the odd with `compare`.
            for (name, parity) in [(executable, 0), (compare, 1)] {
                let mine = ratios.indices.filter { $0 % 2 == parity }
                let cpu = mine.map { traced[$0].meshtraceCPU / Double(count) * 1e6 }
                print("bench-trace: compare \(name): ratio \(String(format: "%.2f", median(mine.map { ratios[$0] }))) "
                      + "(median of \(mine.count) rounds), meshtrace itself \(f(median(cpu))) µs per connection, "
                      + "traced CPU \(f(median(mine.map { traced[$0].cpu / Double(count) * 1e6 }))) µs")
            }
        }
        let ratio = median(ratios)
        // The spread of the rounds, so one run's median can be read against its noise: the middle half of them.
        func middleHalf(_ xs: [Double]) -> String {
            let sorted = xs.sorted()
            return sorted.count >= 4
                ? String(format: "; middle half of the rounds %.2f-%.2f", sorted[sorted.count / 4], sorted[(3 * sorted.count - 1) / 4]) : ""
        }
        print("bench-trace: ratio \(String(format: "%.2f", ratio)) (median of \(rounds) rounds\(middleHalf(ratios)); target >= 0.80)")
        var dumpRatios: [Double] = []
        for (i, d) in dumped.enumerated() {
            let before = untraced[dumpedAfter[i]].rate, after = untraced[dumpedAfter[i] + 1].rate
            let r = d.load.rate / ((before + after) / 2)
            dumpRatios.append(r)
            print("bench-trace: tcpdump round \(i + 1): untraced \(f(before)) / \(f(after)) conn/s, collected \(f(d.load.rate)) conn/s, "
                  + "ratio \(String(format: "%.2f", r)); tcpdump CPU \(String(format: "%.2f", d.tcpdumpCPU)) s, \(d.nflogCaptured) of the "
                  + "twins' \(d.kernelTotal) NFLOG events and \(d.packetsCaptured) packets written (\(d.packetsDropped) dropped by the kernel)")
        }
        if !dumped.isEmpty {
            // The standard tool doing the collection half of the job: the same twins (batched as `trace` has them),
            // `tcpdump -i nflog:G -w` and `tcpdump -i any -w` into tmpfs, nothing decoded or correlated. Its ratio is
            // what the kernel's share and writing the raw records cost; meshtrace's over it is the price of the
            // live timelines.
            let n = Double(count)
            let dumpRatio = median(dumpRatios)
            let lost = dumped.reduce(0) { $0 + max(Int($1.kernelTotal) - $1.nflogCaptured, 0) }
            print("bench-trace: tcpdump collecting the same twins and capture to files: ratio \(String(format: "%.2f", dumpRatio)) "
                  + "(median of \(dumped.count) rounds\(middleHalf(dumpRatios))), CPU per connection \(f(median(dumped.map { $0.cpu / n }) * 1e6)) µs "
                  + "(tcpdump itself \(f(median(dumped.map { $0.tcpdumpCPU / n }) * 1e6)) µs), NFLOG events lost \(lost); "
                  + "meshtrace's ratio / tcpdump's \(String(format: "%.2f", ratio / dumpRatio))")
        }
        // The same question asked of CPU time instead of the wall clock: the load is CPU-bound, so the rate
        // ratio on an otherwise idle machine is about the untraced CPU per connection over the traced. This one
        // does not move with the neighbours' load.
        let n = Double(count)
        let untracedCPU = median(untracedRuns.map { $0.1 / n })
        let tracedCPU = median(traced.map { $0.cpu / n })
        let meshtraceCPU = median(traced.map { $0.meshtraceCPU / n })
        print("bench-trace: CPU per connection: untraced \(f(untracedCPU * 1e6)) µs, traced \(f(tracedCPU * 1e6)) µs "
              + "(meshtrace itself \(f(meshtraceCPU * 1e6)) µs); CPU-time ratio \(String(format: "%.2f", untracedCPU / tracedCPU))")
        let events = traced.reduce(0) { $0 + $1.events }
        let seconds = traced.reduce(0.0) { $0 + $1.load.seconds }
        let lost = traced.reduce(0) { $0 + max($1.lost, 0) }
        let ours = traced.reduce(UInt64(0)) { $0 + $1.ourTotal }
        let kernelTotal = traced.reduce(UInt64(0)) { $0 + $1.kernelTotal }
        print("bench-trace: NFLOG events \(events) during \(String(format: "%.2f", seconds)) s of traced load = \(f(Double(events) / seconds)) events/s; \(traced.reduce(0) { $0 + $1.packets }) records correlated into \(traced.reduce(0) { $0 + $1.connections }) connections")
        print("bench-trace: events lost \(lost); twin hits meshtrace \(ours) / kernel \(kernelTotal) (target: 0 lost, equal)")
        if let first = traced.first {
            // Where the events come from: each twin's or observation point's share, per connection.
            let perConnection = first.perPrefix.map { "\($0.0) \(String(format: "%.1f", Double($0.1) / Double(max(count, 1))))" }
            print("bench-trace: NFLOG events per connection by prefix: " + perConnection.joined(separator: ", "))
        }
        for t in traced {
            XCTAssertGreaterThanOrEqual(t.ourTotal + UInt64(max(t.lost, 0)), t.kernelTotal, "losses do not account for the difference")
        }
    }

    /// One run of the load with `meshtrace trace --json` on the client pod, used as an operator would (the CLI,
    /// its JSON summary as the source of the counts).
    private func tracedRun(lab: LabTopology, target: Endpoint, count: Int, workers: Int, executable: String,
                           env: [String: String], round: Int) throws -> TracedRun {
        // The JSON (~28 KB per connection, ~0.5 GB per run of 20 000) goes to tmpfs when there is one: writing
        // it into the page cache is part of what is measured; the disk's writeback, and the dirty-page
        // throttling that slowed each traced run more than the one before, is not.
        let directory = FileManager.default.isWritableFile(atPath: "/dev/shm") ? "/dev/shm/" : NSTemporaryDirectory()
        let log = directory + "mt-bench-\(getpid()).jsonl"
        XCTAssertTrue(FileManager.default.createFile(atPath: log, contents: nil), "cannot create a scratch file")
        // MESHTRACE_BENCH_KEEP=DIR keeps each round's output there (DIR/round-N.jsonl, moved once the round is
        // measured), to find which connection a round's counts say is off (a hop short, an escape).
        defer {
            if let keep = env["MESHTRACE_BENCH_KEEP"], !keep.isEmpty {
                let kept = keep + "/round-\(round)" + (env["MESHTRACE_BENCH_VIEW"] == "text" ? ".txt" : ".jsonl")
                try? FileManager.default.removeItem(atPath: kept)
                do { try FileManager.default.moveItem(atPath: log, toPath: kept) } catch { XCTFail("MESHTRACE_BENCH_KEEP: \(error)") }
            }
            try? FileManager.default.removeItem(atPath: log)
        }
        let trace = Process()
        trace.executableURL = URL(fileURLWithPath: executable)
        let extra = (env["MESHTRACE_BENCH_TRACE_ARGS"] ?? "").split(separator: " ").map(String.init)
        // MESHTRACE_BENCH_VIEW=text: the default text view (what a terminal shows) instead of JSON Lines.
        let textView = env["MESHTRACE_BENCH_VIEW"] == "text"
        trace.arguments = ["trace", "--netns", lab.client.ref.path, "--group", "5601", "--duration", "600", "--quiet"]
            + (textView ? [] : ["--json"]) + extra
        // Both handles are closed here, not left to `Process`: it keeps them past the run, and a deleted file
        // with an open descriptor keeps its pages. Left open, each run's ~0.5 GB of JSON stayed in tmpfs (1.5 GB
        // after three rounds), and the tracer's system time grew with it round after round (its CPU 1.7, 2.3,
        // 3.2 s for the same 20 000 connections), a cost of the harness charged to the later rounds' traces.
        let out = try XCTUnwrap(FileHandle(forWritingAtPath: log))
        defer { try? out.close() }
        trace.standardOutput = out
        let errLog = log + ".err"
        XCTAssertTrue(FileManager.default.createFile(atPath: errLog, contents: nil), "cannot create a scratch file")
        defer { try? FileManager.default.removeItem(atPath: errLog) }
        let err = try XCTUnwrap(FileHandle(forWritingAtPath: errLog))
        defer { try? err.close() }
        trace.standardError = err
        try trace.run()
        defer { if trace.isRunning { kill(trace.processIdentifier, SIGKILL) } }
        let deadline = Date().addingTimeInterval(30)
        while !(try lab.client.netns.run(["iptables-save"]).stdout.contains("--comment meshtrace")) {
            guard trace.isRunning, Date() < deadline else { throw MeshtraceError(.kernelRefused, "trace did not start") }
            usleep(50_000)
        }
        usleep(200_000)
        let tracer = trace.processIdentifier
        let cpuBefore = TraceBenchmark.cpuSeconds(lab, extra: [tracer]), tracerBefore = TraceBenchmark.processCPU(tracer)
        let t = try ConnectionLoad.run(in: lab.client.ref, to: target, count: count, workers: workers)
        usleep(300_000)
        let cpu = TraceBenchmark.cpuSeconds(lab, extra: [tracer]) - cpuBefore
        let tracerCPU = TraceBenchmark.processCPU(tracer) - tracerBefore
        kill(trace.processIdentifier, SIGINT)
        let exitDeadline = Date().addingTimeInterval(60)
        while trace.isRunning && Date() < exitDeadline { usleep(20_000) }
        XCTAssertFalse(trace.isRunning)

        if textView {
            return try TraceBenchmark.textSummary(of: log, load: t, cpu: cpu, meshtraceCPU: tracerCPU)
        }
        let said = ((try? String(contentsOfFile: errLog, encoding: .utf8)) ?? "").split(separator: "\n").last.map(String.init) ?? ""
        // The summary is the last line: read the file's tail, not all of it (~0.5 GB of timelines per run, which
        // took longer to split into lines than the run itself).
        let summaryLine = try XCTUnwrap(TraceBenchmark.lastLine(of: log, containing: "\"events_lost\""), "no JSON summary from the trace")
        let summary = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(summaryLine.utf8)) as? [String: Any])
        let kernel = (summary["kernel_counters"] as? [String: Any] ?? [:]).mapValues { ($0 as? NSNumber)?.uint64Value ?? 0 }
        var ours: [String: UInt64] = [:]
        for h in summary["rule_hits"] as? [[String: Any]] ?? [] {
            if let p = h["prefix"] as? String, let c = (h["count"] as? NSNumber)?.uint64Value { ours[p] = c }
        }
        return TracedRun(load: t, lost: (summary["events_lost"] as? NSNumber)?.intValue ?? -1,
                         ourTotal: kernel.keys.reduce(UInt64(0)) { $0 + (ours[$1] ?? 0) },
                         kernelTotal: kernel.values.reduce(0, +),
                         events: (summary["nflog_records"] as? NSNumber)?.intValue ?? 0,
                         packets: (summary["packets"] as? NSNumber)?.intValue ?? 0,
                         connections: (summary["connections"] as? NSNumber)?.intValue ?? 0,
                         hops: (summary["hops"] as? NSNumber)?.intValue, escapes: (summary["escapes"] as? NSNumber)?.intValue,
                         perPrefix: kernel.sorted { $0.value > $1.value }.filter { $0.value > 0 }.map { ($0.key, $0.value) },
                         said: said.hasPrefix("meshtrace: ") ? String(said.dropFirst("meshtrace: ".count)) : said,
                         cpu: cpu, meshtraceCPU: tracerCPU)
    }
}

extension TraceBenchmark {
    /// One run of the load while the standard tools collect what `meshtrace trace` reads: the same twins and
    /// observation points (installed by meshtrace's instrumenter, batched as `trace` has them: no per-rule
    /// threshold, so tcpdump's NFLOG instance batches with the kernel's defaults), `tcpdump -i nflog:G -w` and
    /// `tcpdump -i any -w` started in the pod's netns, their files on tmpfs like the trace's JSON.
    /// `keep`: a path stem the two captures are moved to once the run is measured (STEM-nflog.pcap, STEM-any.pcap):
    /// a real load's records, for `meshtrace analyze` to be run on by two builds and their outputs compared.
    func tcpdumpRun(lab: LabTopology, target: Endpoint, count: Int, workers: Int, tcpdump: String,
                    keep: String? = nil) throws -> DumpRun {
        let group: UInt16 = 5602
        var settings = InstrumentationSettings(group: group)
        settings.perRuleThreshold = nil
        let instrumenter = Instrumenter(netns: lab.client.ref, settings: settings, parse: Instrumenter.parseHome)
        _ = try instrumenter.install()
        defer { XCTAssertNoThrow(try instrumenter.remove()) }
        let directory = FileManager.default.isWritableFile(atPath: "/dev/shm") ? "/dev/shm/" : NSTemporaryDirectory()
        let stem = directory + "mt-bench-\(getpid())"
        var dumps: [(Process, String)] = []
        defer {
            for (p, err) in dumps {
                if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
                try? FileManager.default.removeItem(atPath: err)
            }
            for suffix in ["-nflog.pcap", "-any.pcap"] {
                if let keep {
                    try? FileManager.default.removeItem(atPath: keep + suffix)
                    do { try FileManager.default.moveItem(atPath: stem + suffix, toPath: keep + suffix) } catch {
                        XCTFail("MESHTRACE_BENCH_KEEP: \(error)")
                    }
                }
                try? FileManager.default.removeItem(atPath: stem + suffix)
            }
        }
        // 64 MiB of ring for the capture, as the trace's; -Z root: the files stay writable where they are.
        for (interface, suffix) in [("nflog:\(group)", "-nflog.pcap"), ("any", "-any.pcap")] {
            let err = stem + suffix + ".err"
            XCTAssertTrue(FileManager.default.createFile(atPath: err, contents: nil), "cannot create a scratch file")
            let p = try Command.start([tcpdump, "-Z", "root", "-B", "65536", "-i", interface, "-w", stem + suffix],
                                      in: lab.client.ref, stderr: try XCTUnwrap(FileHandle(forWritingAtPath: err)))
            dumps.append((p, err))
        }
        func stderr(_ i: Int) -> String { (try? String(contentsOfFile: dumps[i].1, encoding: .utf8)) ?? "" }
        let deadline = Date().addingTimeInterval(30)
        while !(0..<dumps.count).allSatisfy({ stderr($0).contains("listening on") }) {
            guard dumps.allSatisfy({ $0.0.isRunning }), Date() < deadline else {
                throw MeshtraceError(.kernelRefused, "tcpdump did not start: \(stderr(0)) \(stderr(1))")
            }
            usleep(50_000)
        }
        usleep(200_000)
        let pids = dumps.map { $0.0.processIdentifier }
        let cpuBefore = TraceBenchmark.cpuSeconds(lab, extra: pids)
        let dumpBefore = pids.reduce(0.0) { $0 + TraceBenchmark.processCPU($1) }
        let t = try ConnectionLoad.run(in: lab.client.ref, to: target, count: count, workers: workers)
        usleep(300_000)
        let cpu = TraceBenchmark.cpuSeconds(lab, extra: pids) - cpuBefore
        let dumpCPU = pids.reduce(0.0) { $0 + TraceBenchmark.processCPU($1) } - dumpBefore
        // NFLOG's instance holds events up to a second (the kernel's default flush timeout): let them arrive
        // before the counters are read and tcpdump is stopped.
        usleep(1_200_000)
        let kernel = try instrumenter.kernelCounters().values.reduce(0, +)
        for (p, _) in dumps { kill(p.processIdentifier, SIGINT) }
        let exitDeadline = Date().addingTimeInterval(20)
        while dumps.contains(where: { $0.0.isRunning }) && Date() < exitDeadline { usleep(20_000) }
        XCTAssertFalse(dumps.contains { $0.0.isRunning }, "tcpdump did not exit on SIGINT")
        // "N packets captured" and "M packets dropped by kernel", tcpdump's last words.
        func number(_ label: String, in text: String) -> Int {
            for line in text.split(separator: "\n") where line.hasSuffix(label) {
                if let n = Int(line.split(separator: " ").first ?? "") { return n }
            }
            return -1
        }
        let nflog = stderr(0), any = stderr(1)
        return DumpRun(load: t, nflogCaptured: number("packets captured", in: nflog), kernelTotal: kernel,
                       packetsCaptured: number("packets captured", in: any),
                       packetsDropped: number("packets dropped by kernel", in: any),
                       cpu: cpu, tcpdumpCPU: dumpCPU)
    }
}

/// Short TCP connections from inside a netns: connect, send a request, read to EOF, close.
enum ConnectionLoad {
    struct Result { var seconds: Double; var completed: Int; var failures: Int; var rate: Double { Double(completed) / seconds } }

    static func run(in netns: NetnsRef, to target: Endpoint, count: Int, workers: Int) throws -> Result {
        // The workers' shared counts, each touched under `lock` (read here after the group is done).
        final class Counts: @unchecked Sendable {
            let lock = NSLock()
            var next = 0, completed = 0, failures = 0
            var enterError: Error?
        }
        let counts = Counts(), lock = counts.lock
        let group = DispatchGroup()
        let start = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<workers {
            group.enter()
            let t = Thread {
                defer { group.leave() }
                do { try NetnsThread.enter(netns) } catch { lock.lock(); counts.enterError = error; lock.unlock(); return }
                var buf = [UInt8](repeating: 0, count: 4096)
                while true {
                    lock.lock()
                    guard counts.next < count else { lock.unlock(); return }
                    counts.next += 1
                    lock.unlock()
                    let ok = once(target, &buf)
                    lock.lock()
                    if ok { counts.completed += 1 } else { counts.failures += 1 }
                    lock.unlock()
                }
            }
            t.start()
        }
        guard group.wait(timeout: .now() + 300) == .success else {
            throw MeshtraceError(.kernelRefused, "connection load did not finish within 300 s")
        }
        if let enterError = counts.enterError { throw enterError }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        return Result(seconds: seconds, completed: counts.completed, failures: counts.failures)
    }

    private static func once(_ target: Endpoint, _ buf: inout [UInt8]) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = target.port.bigEndian
        addr.sin_addr.s_addr = target.addr.v4Value.bigEndian
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { return false }
        let request = Array("GET / HTTP/1.0\r\nHost: bench\r\n\r\n".utf8)
        guard send(fd, request, request.count, Int32(MSG_NOSIGNAL)) == request.count else { return false }
        var got = 0
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 { got += n; continue }
            return n == 0 && got > 0
        }
    }
}
