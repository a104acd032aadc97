import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Traces each scenario live with `LiveTracer` — the engine of `meshtrace trace --netns POD`: NFLOG twins in the
/// traced pod, libpcap on its interfaces, conntrack, one `Correlator` — and judges the scenario from its records.
public final class LiveTraceTracing: LabTracing {
    public let group: UInt16
    /// Print the per-packet lines of each timeline (false: connection headers, hops and findings only).
    public let showEvents: Bool
    private var tracer: LiveTracer?
    private var reporter: Reporter?
    private var verdicts = LabVerdictSink()
    private var outcome: Result<TraceOutcome, Error>?
    private let lock = NSLock()
    private var done = DispatchSemaphore(value: 0)
    private var current: (scenario: Scenario, lab: LabTopology, textPath: String, fd: Int32)?

    /// `--html` / `--pcapng` of `meshtrace lab`: one file per scenario (`report.html` → `report-outbound.html`).
    public let output: OutputConfig

    public init(group: UInt16 = 5153, showEvents: Bool = true, output: OutputConfig = OutputConfig()) {
        self.group = group
        self.showEvents = showEvents
        self.output = output
    }

    public func start(pod: LabPod, scenario: Scenario, lab: LabTopology) throws {
        var options = TraceOptions(netns: pod.ref)
        options.group = group
        options.correlator.podAddresses = pod.addresses
        let tracer = try LiveTracer(options: options)
        let textPath = "\(lab.runDirectory)/.\(scenario.rawValue)-live.txt"
        let fd = open(textPath, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw MeshtraceError(.kernelRefused, "cannot write \(textPath)") }
        verdicts = LabVerdictSink()
        let reporter = try Reporter.make(config: output.perScenario(scenario), tags: tracer.tags,
                                         title: "meshtrace lab: \(scenario.rawValue), traced in the \(pod.role.rawValue) pod",
                                         sinks: [TextReport(fileDescriptor: fd, style: Style(enabled: false), showEvents: showEvents), verdicts])
        self.tracer = tracer
        self.reporter = reporter
        current = (scenario, lab, textPath, fd)
        outcome = nil
        done = DispatchSemaphore(value: 0)

        let ready = DispatchSemaphore(value: 0)
        tracer.onReady = { ready.signal() }
        let finished = done
        // `run` blocks until `stop()`; the twins go in and come out on this thread, the sockets live on the
        // tracer's own netns thread.
        Thread.detachNewThread { [self] in
            let r = Result { try tracer.run(reporter: reporter) }
            lock.lock(); outcome = r; lock.unlock()
            ready.signal()
            finished.signal()
        }
        if ready.wait(timeout: .now() + 30) == .timedOut {
            tracer.stop()
            throw MeshtraceError(.kernelRefused, "the live trace of \(pod.name) did not start within 30 s")
        }
        lock.lock(); let early = outcome; lock.unlock()
        if case .failure(let e)? = early { cleanupText(); throw e }
    }

    public func stop() throws -> LabTraceFinding {
        guard let tracer, let reporter, let current else { return LabTraceFinding(verdict: nil, report: "") }
        self.tracer = nil; self.reporter = nil
        tracer.stop()
        if done.wait(timeout: .now() + 60) == .timedOut {
            throw MeshtraceError(.kernelRefused, "the live trace did not stop within 60 s")
        }
        lock.lock(); let result = outcome; lock.unlock()
        guard let result else { throw MeshtraceError(.kernelRefused, "the live trace ended without an outcome") }
        let traced: TraceOutcome
        do { traced = try result.get() } catch { cleanupText(); throw error }
        reporter.updateRuleset(tracer.ruleset)
        try reporter.finish(traced.summary)
        var text = (try? String(contentsOfFile: current.textPath, encoding: .utf8)) ?? ""
        text += TraceSummaryText.render(traced, ruleset: tracer.ruleset) + "\n"
        cleanupText()
        return LabTraceFinding(verdict: verdicts.verdict(for: current.scenario, lab: current.lab), report: text)
    }

    private func cleanupText() {
        guard let c = current else { return }
        close(c.fd)
        unlink(c.textPath)
        current = nil
    }
}

extension OutputConfig {
    /// The file outputs of one scenario: `--html report.html` becomes `report-<scenario>.html` (same for pcapng).
    public func perScenario(_ scenario: Scenario) -> OutputConfig {
        func suffixed(_ path: String?) -> String? {
            guard let path else { return nil }
            let url = URL(fileURLWithPath: path)
            let ext = url.pathExtension
            let stem = url.deletingPathExtension().path
            return ext.isEmpty ? "\(stem)-\(scenario.rawValue)" : "\(stem)-\(scenario.rawValue).\(ext)"
        }
        var c = self
        c.pcapngPath = suffixed(pcapngPath)
        c.htmlPath = suffixed(htmlPath)
        return c
    }
}
