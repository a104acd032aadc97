import XCTest
@testable import Capture

final class RuleTagTests: XCTestCase {
    func testPrefixRoundTripsAndFitsNflogLimit() {
        let tag = RuleTag(family: .v4, table: "nat", chain: "ISTIO_OUTPUT", position: .rule(4),
                          textHash: RuleTag.textHash("-A ISTIO_OUTPUT -j REDIRECT --to-ports 15001"))
        XCTAssertEqual(RuleTag(prefix: tag.prefix), tag)
        XCTAssertLessThanOrEqual(tag.prefix.utf8.count, 63)
    }

    func testLongNamesAreShortenedButStillMatch() {
        let chain = String(repeating: "c", count: 40)
        let table = String(repeating: "t", count: 40)
        let tag = RuleTag(family: .nft, table: table, chain: chain, position: .observeIn)
        XCTAssertLessThanOrEqual(tag.prefix.utf8.count, 63)
        let back = RuleTag(prefix: tag.prefix)!
        XCTAssertTrue(back.matches(chain: chain))
        XCTAssertTrue(back.matches(table: table))
        XCTAssertFalse(back.matches(chain: "other"))
    }

    func testForeignPrefixesAreNotTags() {
        XCTAssertNil(RuleTag(prefix: ""))
        XCTAssertNil(RuleTag(prefix: "TRACE: nat:OUTPUT:rule:1"))
        XCTAssertNil(RuleTag(prefix: "mt:4:nat:X:0:-"))
    }

    func testInterningIsStable() {
        let table = RuleTagTable()
        let a = table.intern("mt:4:nat:ISTIO_OUTPUT:4:00ff")
        let b = table.intern("mt:4:nat:ISTIO_OUTPUT:4:00ff")
        XCTAssertEqual(a, b)
        XCTAssertEqual(table.intern(""), 0)
        XCTAssertEqual(table.tag(for: a)?.position, .rule(4))
    }

    /// Many prefixes of every length (the hash reads 8-byte words and a tail), near-duplicates that differ in
    /// one byte or only in length, trailing NULs: each gets one id, kept across repeats, and its own text.
    func testInterningManyPrefixesAgainstADictionary() {
        let table = RuleTagTable()
        var model: [String: UInt32] = [:]
        var generator = SystemRandomNumberGenerator()
        var prefixes: [String] = []
        for length in 1...63 {
            let base = String((0..<length).map { _ in "abcdefghijklmnopqrstuvwxyz0123456789:".randomElement(using: &generator)! })
            prefixes.append(base)
            prefixes.append(String(base.dropLast()) + (base.last == "x" ? "y" : "x"))   // one byte apart
            prefixes.append(base + "z")                                                   // one byte longer
        }
        for round in 0..<3 {
            for p in prefixes.shuffled(using: &generator) where !p.isEmpty {
                let id = round == 2 ? Array(p.utf8 + [0, 0]).withUnsafeBytes { table.intern($0) } : table.intern(p)
                if let known = model[p] { XCTAssertEqual(id, known, p) } else { model[p] = id }
                XCTAssertEqual(table.text(for: id), p)
            }
        }
        XCTAssertEqual(Set(model.values).count, model.count, "two prefixes share an id")
        XCTAssertEqual(table.count, model.count)
    }

    /// A new prefix on every record (a hostile or garbage capture) no longer grows the table with the file: past
    /// `maxPrefixes` distinct ones the rest share one id, no tag, a text that says so; the ones kept still resolve.
    func testPrefixesPastTheCapShareOneId() {
        let table = RuleTagTable()
        let first = table.intern("mt:4:nat:ISTIO_OUTPUT:4:00ff")
        for i in 1..<RuleTagTable.maxPrefixes { _ = table.intern("hostile-\(i)") }
        XCTAssertEqual(table.count, RuleTagTable.maxPrefixes)
        let over = (0..<100).map { table.intern("more-\($0)") }
        XCTAssertEqual(Set(over).count, 1, "the prefixes past the cap share one id")
        XCTAssertNil(table.tag(for: over[0]))
        XCTAssertTrue(table.text(for: over[0]).contains("counted together"), table.text(for: over[0]))
        XCTAssertEqual(table.count, RuleTagTable.maxPrefixes + 1, "one entry for all of them")
        XCTAssertEqual(table.intern("mt:4:nat:ISTIO_OUTPUT:4:00ff"), first)
        XCTAssertEqual(table.intern("hostile-7"), table.intern("hostile-7"))
        XCTAssertNotEqual(table.intern("hostile-7"), over[0])
        XCTAssertEqual(table.tag(for: first)?.position, .rule(4))
    }

    func testAddressesParseAndPrint() {
        XCTAssertEqual(IPAddress("169.254.7.127")?.description, "169.254.7.127")
        XCTAssertEqual(IPAddress("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")?.description, "fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
        XCTAssertEqual(IPAddress("::1")?.isLoopback, true)
        XCTAssertEqual(IPAddress("2001:db8::1")?.description, "2001:db8::1")
        XCTAssertNil(IPAddress("300.1.1.1"))
        XCTAssertNil(IPAddress("1:2:3"))
    }
}
