import ArgumentParser
import Capture

struct Cleanup: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cleanup", abstract: "(not built yet)")

    func run() throws {
        try reportingErrors { throw MeshtraceError(.usage, "meshtrace cleanup is not built yet") }
    }
}
