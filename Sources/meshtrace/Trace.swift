import ArgumentParser
import Capture

struct Trace: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "trace", abstract: "(not built yet)")

    func run() throws {
        try reportingErrors { throw MeshtraceError(.usage, "meshtrace trace is not built yet") }
    }
}
