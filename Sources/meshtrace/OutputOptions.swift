import ArgumentParser
import Capture

/// Output flags shared by analyze, trace, verify and lab.
struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "JSON Lines on stdout: one record per connection, then one summary record (docs/JSON.md).")
    var json = false

    @Option(name: .long, help: "Also write a pcapng file whose packets carry comments: rule hits, marks, connection, ztunnel hop.")
    var pcapng: String?

    @Option(name: .long, help: "Also write a self-contained HTML report (summary, rule flow, one sequence diagram per connection).")
    var html: String?

    @Option(name: .long, help: "Colour: auto (when stdout is a terminal and NO_COLOR is unset), always, never.")
    var color: String = "auto"

    @Flag(name: .long, help: "No progress or status line on stderr.")
    var quiet = false

    func validate() throws {
        guard OutputConfig.ColorMode(rawValue: color) != nil else {
            throw ValidationError("--color takes auto, always or never")
        }
    }

    var config: OutputConfig {
        var c = OutputConfig()
        c.json = json
        c.pcapngPath = pcapng
        c.htmlPath = html
        c.color = OutputConfig.ColorMode(rawValue: color) ?? .auto
        c.progress = !quiet
        return c
    }
}
