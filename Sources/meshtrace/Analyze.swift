import ArgumentParser
import Capture

struct Analyze: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "analyze", abstract: "(not built yet)")

    func run() throws {
        try reportingErrors { throw MeshtraceError(.usage, "meshtrace analyze is not built yet") }
    }
}
