import ArgumentParser
import Capture

struct Plan: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "plan", abstract: "(not built yet)")

    func run() throws {
        try reportingErrors { throw MeshtraceError(.usage, "meshtrace plan is not built yet") }
    }
}
