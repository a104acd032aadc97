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
        // Not a blocking write: stderr may be the stuck pipe stdout was (`2>&1`, OutputStall).
        OutputStall.writeStderrLine("meshtrace: \(e.message)")
        throw ArgumentParser.ExitCode(e.code.rawValue)
    } catch let e where !(e is ArgumentParser.ExitCode || e is ValidationError || e is CleanExit) {
        // Anything else (a Foundation file error) is one line and exit 2: uncaught it was ArgumentParser's dump of
        // the NSError and exit 1, the code that means "an escape was found".
        FileHandle.standardError.write(Data("meshtrace: \(describe(e))\n".utf8))
        throw ArgumentParser.ExitCode(ExitStatus.badInput.rawValue)
    }
    if let problem = standardOutputProblem() {
        FileHandle.standardError.write(Data("meshtrace: cannot write the output: \(problem)\n".utf8))
        throw ArgumentParser.ExitCode(status == .ok ? ExitStatus.badInput.rawValue : status.rawValue)
    }
    if status != .ok { throw ArgumentParser.ExitCode(status.rawValue) }
}

/// Why what `print` wrote did not all reach stdout (a full disk: `plan > plan.sh` left an empty file and exit 0),
/// or nil. A reader that went away (`| head`, EPIPE) is not a failure: the commands stop quietly then.
func standardOutputProblem() -> String? {
    if fflush(stdout) != 0 {
        let e = errno
        return e == EPIPE ? nil : String(cString: strerror(e))
    }
    guard ferror(stdout) != 0 else { return nil }
    // An earlier write failed and its errno is gone: into a pipe that is most likely EPIPE.
    var st = stat()
    if fstat(STDOUT_FILENO, &st) == 0, (st.st_mode & S_IFMT) == S_IFIFO || (st.st_mode & S_IFMT) == S_IFSOCK { return nil }
    return "a write failed"
}

/// One line for an error that is not meshtrace's own: what could not be done to which file, and the system's
/// reason when Foundation kept it.
func describe(_ error: Error) -> String {
    let ns = error as NSError
    let path = (ns.userInfo[NSFilePathErrorKey] as? String) ?? (ns.userInfo[NSURLErrorKey] as? URL)?.path
    let posix = (ns.userInfo[NSUnderlyingErrorKey] as? NSError).flatMap { $0.domain == NSPOSIXErrorDomain ? Int32($0.code) : nil }
        ?? (ns.domain == NSPOSIXErrorDomain ? Int32(ns.code) : nil)
    var text: String
    if let path, ns.domain == NSCocoaErrorDomain {
        let verb = (512..<1024).contains(ns.code) ? "cannot write" : (256..<512).contains(ns.code) ? "cannot read" : "cannot use"
        let known: [Int: String] = [257: "permission denied", 513: "permission denied", 260: "no such file", 4: "no such file",
                                    516: "it exists already", 640: "no space left on the device", 642: "read-only file system"]
        let reason = posix.map { String(cString: strerror($0)) } ?? known[ns.code]
        text = "\(verb) \(path)" + (reason.map { ": \($0)" } ?? "")
    } else {
        text = posix.map { String(cString: strerror($0)) } ?? ns.localizedDescription
        if let path { text = "\(path): \(text)" }
    }
    return text.split(whereSeparator: \.isNewline).joined(separator: " ")
}
