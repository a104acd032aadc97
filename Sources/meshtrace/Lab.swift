import ArgumentParser
import Capture

struct Lab: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "lab", abstract: "(not built yet)")

    func run() throws {
        try reportingErrors { throw MeshtraceError(.usage, "meshtrace lab is not built yet") }
    }
}
