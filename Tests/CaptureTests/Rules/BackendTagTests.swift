import XCTest
@testable import Capture

/// A netns whose iptables-legacy and iptables-nft backends both hold the ambient rules: twins in the legacy
/// backend carry `l4` / `l6` prefixes, which map back to the legacy backend's rules and are printed as such.
final class BackendTagTests: XCTestCase {
    /// The seed's nat rules twice: in iptables-nft and in iptables-legacy.
    func bothBackends() -> Ruleset {
        let nft = seedNatRuleset()
        let legacy = nft.tables.map { Instrumenter.relabel($0, backend: .iptablesLegacy, family: $0.family) }
        return Ruleset(tables: nft.tables + legacy, origin: "test")
    }

    func redirectTag(_ family: RuleTag.Family) -> RuleTag {
        RuleTag(prefix: twin("nat", "ISTIO_OUTPUT", 4, ruleset: seedNatRuleset()).replacingOccurrences(of: "mt:4:", with: "mt:\(family.rawValue):"))!
    }

    func testEachBackendsTagFindsThatBackendsRule() throws {
        let rules = bothBackends()
        XCTAssertTrue(redirectTag(.legacyV4).isLegacy)
        XCTAssertFalse(redirectTag(.v4).isLegacy)
        XCTAssertEqual(RuleTag(prefix: redirectTag(.legacyV4).prefix), redirectTag(.legacyV4))
        XCTAssertEqual(rules.rule(for: redirectTag(.legacyV4))?.backend, .iptablesLegacy)
        XCTAssertEqual(rules.rule(for: redirectTag(.v4))?.backend, .iptablesNft)
        // The other way round in the tables' order: still each backend's own.
        let reversed = Ruleset(tables: rules.tables.reversed(), origin: "test")
        XCTAssertEqual(reversed.rule(for: redirectTag(.legacyV4))?.backend, .iptablesLegacy)
        XCTAssertEqual(reversed.rule(for: redirectTag(.v4))?.backend, .iptablesNft)
        // A backend the ruleset does not have (a file from one backend, an older prefix): the rule is still found.
        XCTAssertEqual(seedNatRuleset().rule(for: redirectTag(.legacyV4))?.backend, .iptablesNft)
        let legacyOnly = Ruleset(tables: rules.tables.filter { $0.backend == .iptablesLegacy }, origin: "test")
        XCTAssertEqual(legacyOnly.rule(for: redirectTag(.v4))?.backend, .iptablesLegacy)
        XCTAssertNil(rules.rule(for: redirectTag(.legacyV6)), "no ip6tables rules")
    }

    func testALegacyHitIsPrintedAsLegacyInTextAndJSON() throws {
        let rules = bothBackends()
        var f = PacketFactory()
        let app = PacketFactory.ep("10.0.1.5", 40000), service = PacketFactory.ep("10.0.2.2", 80)
        let records = [
            f.nflog(app, service, flags: [.syn], seq: 1, hook: .output, prefix: redirectTag(.legacyV4).prefix, outIf: 2),
            f.nflog(app, service, flags: [.syn], seq: 1, hook: .output, prefix: redirectTag(.v4).prefix, outIf: 2),
        ]
        func render(_ makeSink: (Int32) -> ReportSink) throws -> String {
            try renderReport(records, tags: f.tags, ruleset: rules, makeSink)
        }
        let text = try render { TextReport(fileDescriptor: $0) }
        XCTAssertEqual(text.components(separatedBy: "legacy nat ISTIO_OUTPUT #4 [outbound-capture]").count - 1, 1, text)
        XCTAssertEqual(text.components(separatedBy: "  nat ISTIO_OUTPUT #4 [outbound-capture]").count - 1, 1, text)

        let json = try render { JSONReport(fileDescriptor: $0) }
        let objects = try json.split(separator: "\n").map { try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]) }
        let events = try XCTUnwrap(objects.first { $0["type"] as? String == "connection" }?["events"] as? [[String: Any]])
        let hits = events.compactMap { $0["hit"] as? [String: Any] }
        XCTAssertEqual(hits.count, 2)
        XCTAssertEqual(hits.filter { ($0["prefix"] as? String)?.hasPrefix("mt:l4:") == true }.map { $0["backend"] as? String }, ["iptables-legacy"])
        XCTAssertEqual(hits.filter { ($0["prefix"] as? String)?.hasPrefix("mt:4:") == true }.map { $0["backend"] as? String }, [nil])
        let summary = try XCTUnwrap(objects.first { $0["type"] as? String == "summary" })
        let ruleHits = try XCTUnwrap(summary["rule_hits"] as? [[String: Any]])
        XCTAssertEqual(ruleHits.map { $0["backend"] as? String }.sorted { ($0 ?? "") < ($1 ?? "") }, [nil, "iptables-legacy"])

        // The HTML page's rule-hits table names the legacy backend's row too.
        let page = FileManager.default.temporaryDirectory.appendingPathComponent("mt-backend-\(UUID().uuidString).html").path
        defer { try? FileManager.default.removeItem(atPath: page) }
        _ = try render { _ in try! HTMLReport(path: page, ruleset: rules) }
        let html = try String(contentsOfFile: page, encoding: .utf8)
        XCTAssertTrue(html.contains(">legacy nat -A ISTIO_OUTPUT "), "no legacy row in the rule hits table")
        XCTAssertTrue(html.contains(">nat -A ISTIO_OUTPUT "), "no iptables-nft row in the rule hits table")
        // And the connection's sequence diagram names the legacy hit's rule so.
        XCTAssertTrue(html.contains("legacy nat ISTIO_OUTPUT #4"), "no legacy hit in the sequence diagram")
    }
}
