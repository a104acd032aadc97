import XCTest
@testable import Capture

final class CommandTests: XCTestCase {
    /// `runAll` gives each command's own result in the order given (output, status, or the error `run` throws),
    /// and runs them side by side: four one-second sleeps take about a second, not four.
    func testRunAllRunsSideBySideAndKeepsTheOrder() throws {
        let start = Date()
        let results = Command.runAll([
            ["sh", "-c", "sleep 1; echo first"],
            ["sh", "-c", "sleep 1; echo second >&2; exit 3"],
            ["meshtrace-no-such-tool"],
            ["sh", "-c", "sleep 1; echo fourth"],
            ["sh", "-c", "sleep 1; echo fifth"],
        ])
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertEqual(results.count, 5)
        XCTAssertEqual(try results[0].get().stdout, "first\n")
        XCTAssertEqual(try results[1].get().status, 3)
        XCTAssertEqual(try results[1].get().stderr, "second\n")
        XCTAssertThrowsError(try results[2].get()) { error in
            XCTAssertEqual((error as? MeshtraceError)?.code, .missingTool)
        }
        XCTAssertEqual(try results[3].get().stdout, "fourth\n")
        XCTAssertEqual(try results[4].get().stdout, "fifth\n")
        XCTAssertLessThan(elapsed, 3.0, "four one-second commands one after another take four")
    }
}
