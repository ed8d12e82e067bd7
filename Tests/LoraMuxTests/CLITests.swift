import XCTest
import Foundation

/// `loramux generate` as a user runs it.
final class CLITests: XCTestCase {
    var binary: URL {
        // The test bundle sits next to the products it was built with.
        let b = Bundle(for: CLITests.self).bundleURL
        let candidates = [b.appendingPathComponent("loramux"), b.deletingLastPathComponent().appendingPathComponent("loramux")]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? candidates[0]
    }

    func run(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
        let p = Process()
        p.executableURL = binary
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }

    func testGenerateJSONWithChatPromptMatchesGolden() throws {
        let model = try Fixtures.smolLM2Path()
        let golden = try Fixtures.json("smollm2/golden.json")
        let first = try XCTUnwrap((golden["chat"] as? [[String: Any]])?.first)
        let content = try XCTUnwrap(((first["messages"] as? [[String: Any]])?.first)?["content"] as? String)
        let r = try run(["generate", "--model", model, "--chat", "--prompt", content, "--max-tokens", "40",
                         "--ignore-eos", "--json"])
        XCTAssertEqual(r.status, 0, r.err)
        let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
        XCTAssertEqual((obj["prompt_ids"] as? [Any])?.ints, (first["prompt_ids"] as? [Any])?.ints)
        XCTAssertEqual((obj["token_ids"] as? [Any])?.ints, (first["token_ids"] as? [Any])?.ints)
        XCTAssertEqual(obj["text"] as? String, first["text"] as? String)
    }

    func testGenerateWithAdapterMatchesPEFT() throws {
        let model = try Fixtures.smolLM2Path()
        let golden = try Fixtures.json("smollm2/adapters/golden.json")
        let spec = try XCTUnwrap((golden["adapters"] as? [String: [String: Any]])?["sql-ish-qv"])
        let c = try XCTUnwrap((spec["chat"] as? [[String: Any]])?[1])
        let content = try XCTUnwrap(((c["messages"] as? [[String: Any]])?.first)?["content"] as? String)
        let r = try run(["generate", "--model", model, "--adapter", Fixtures.url("smollm2/adapters/sql-ish-qv").path,
                         "--chat", "--prompt", content, "--max-tokens", "40", "--ignore-eos", "--json"])
        XCTAssertEqual(r.status, 0, r.err)
        let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
        XCTAssertEqual((obj["token_ids"] as? [Any])?.ints, (c["token_ids"] as? [Any])?.ints)
        // By name from an adapter store.
        let r2 = try run(["generate", "--model", model, "--adapters", Fixtures.url("smollm2/adapters").path,
                          "--adapter", "sql-ish-qv", "--chat", "--prompt", content, "--max-tokens", "40", "--ignore-eos", "--json"])
        XCTAssertEqual(r2.status, 0, r2.err)
        let obj2 = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r2.out.utf8)) as? [String: Any])
        XCTAssertEqual((obj2["token_ids"] as? [Any])?.ints, (c["token_ids"] as? [Any])?.ints)
        let bad = try run(["generate", "--model", model, "--adapters", Fixtures.url("smollm2/adapters").path,
                           "--adapter", "../adapters/sql-ish-qv", "--prompt-ids", "1", "--max-tokens", "1"])
        XCTAssertNotEqual(bad.status, 0)
    }

    func testGenerateWithPromptIdsOnTinyModel() throws {
        let ref = try Fixtures.json("tiny/reference.json")
        let prompt = try XCTUnwrap((ref["prompts"] as? [[Any]])?[1]).ints
        let want = try XCTUnwrap(((ref["greedy"] as? [String: Any])?["hf"] as? [[Any]])?[1]).ints
        let r = try run(["generate", "--model", Fixtures.url("tiny/hf").path, "--prompt-ids",
                         prompt.map(String.init).joined(separator: ","), "--max-tokens", "\(want.count)", "--json"])
        XCTAssertEqual(r.status, 0, r.err)
        let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
        XCTAssertEqual((obj["token_ids"] as? [Any])?.ints, want)
    }

    /// `loramux bench`, sequential and with --interleave: a row per batch size
    /// and mix, in the order asked, with the adapters' rank and real timings.
    func testBenchReportsEveryMixSequentialAndInterleaved() throws {
        let tiny = Fixtures.url("tiny/tiny-f32.gguf").path
        // The default adapter pool (1 GB) and a small one.
        for extra in [[], ["--interleave", "--adapter-pool-mb", "16"]] {
            let json = FileManager.default.temporaryDirectory.appendingPathComponent("bench-\(UUID().uuidString).json")
            defer { try? FileManager.default.removeItem(at: json) }
            let r = try run(["bench", "--model", tiny, "--batch-sizes", "1,3", "--mix", "none,one,distinct",
                             "--synthetic-adapters", "3", "--rank", "4", "--prompt-len", "4", "--gen-len", "3",
                             "--warmup", "1", "--json", json.path] + extra)
            XCTAssertEqual(r.status, 0, r.err)
            let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])
            XCTAssertEqual(obj["interleave"] as? Bool, extra.contains("--interleave"))
            let rows = try XCTUnwrap(obj["results"] as? [[String: Any]])
            XCTAssertEqual(rows.map { $0["batch"] as? Int }, [1, 1, 1, 3, 3, 3], "\(extra)")
            XCTAssertEqual(rows.map { $0["mix"] as? String }, ["none", "one", "distinct", "none", "one", "distinct"], "\(extra)")
            XCTAssertEqual(rows.map { $0["rank"] as? Int }, [0, 4, 4, 0, 4, 4], "\(extra)")
            XCTAssertEqual(rows.map { $0["adapters"] as? Int }, [0, 1, 1, 0, 1, 3], "\(extra)")
            XCTAssertEqual(obj["targets"] as? String, "all")
            for row in rows {
                let tps = try XCTUnwrap(row["tokens_per_s"] as? Double)
                XCTAssertTrue(tps > 0 && tps.isFinite, "\(extra) \(row)")
            }
            XCTAssertEqual(r.out.split(separator: "\n").filter { $0.hasPrefix("| 3 |") }.count, 3, r.out)
        }
    }

    /// `loramux bench --adapters DIR`: each row reports the ranks of the
    /// adapters it ran, not the directory's first adapter's. The fixture
    /// adapters, in name order: all7 (4), dora (4), embed (4), mts (4),
    /// patterns (4, with k_proj 2 and one down_proj 6), qv (8), regex (4), rslora (16).
    func testBenchWithAdapterDirectoryReportsTheRanksItRan() throws {
        let json = FileManager.default.temporaryDirectory.appendingPathComponent("bench-\(UUID().uuidString).json")
        defer { try? FileManager.default.removeItem(at: json) }
        let dir = Fixtures.url("tiny/adapters").path
        let r = try run(["bench", "--model", Fixtures.url("tiny/tiny-f32.gguf").path, "--batch-sizes", "1,8", "--mix", "one,distinct",
                         "--adapters", dir, "--prompt-len", "4", "--gen-len", "2", "--warmup", "1", "--adapter-pool-mb", "16",
                         "--json", json.path])
        XCTAssertEqual(r.status, 0, r.err)
        let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])
        XCTAssertEqual(obj["adapters_dir"] as? String, dir)
        XCTAssertNil(obj["targets"], "--targets describes synthetic adapters only")
        let rows = try XCTUnwrap(obj["results"] as? [[String: Any]])
        XCTAssertEqual(rows.map { $0["adapters"] as? Int }, [1, 1, 1, 8])
        XCTAssertEqual(rows.map { ($0["ranks"] as? [Int]) ?? [-1] }, [[4], [4], [4], [2, 4, 6, 8, 16]])
        XCTAssertEqual(rows.map { $0["rank"] as? Int }, [4, 4, 4, 16], "the largest, a number as DESIGN's JSON has it")
        XCTAssertTrue(r.out.contains("| 8 | distinct | 2/4/6/8/16 |"), r.out)
        XCTAssertTrue(r.out.contains("| 8 | one | 4 |"), r.out)
    }

    /// `loramux bench-replay` on the tiny model: the markdown rows say what
    /// the JSON says (the all-resident row, with no loads, once printed its
    /// RSS in the mean-load column), and `generate` with one new token prints
    /// a decode rate of 0.
    func testBenchReplayTableMatchesItsJSON() throws {
        let tiny = Fixtures.url("tiny/tiny-f32.gguf").path
        let json = FileManager.default.temporaryDirectory.appendingPathComponent("replay-\(UUID().uuidString).json")
        defer { try? FileManager.default.removeItem(at: json) }
        let r = try run(["bench-replay", "--model", tiny, "--adapter-count", "6", "--cache-adapters", "2", "--requests", "8",
                         "--rate", "200", "--prompt-len", "4", "--gen-len", "3", "--rank", "4", "--adapter-pool-mb", "16",
                         "--json", json.path])
        XCTAssertEqual(r.status, 0, r.err)
        let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])
        let rows = try XCTUnwrap(obj["results"] as? [[String: Any]])
        XCTAssertEqual(rows.count, 2)
        let lines = r.out.split(separator: "\n").filter { $0.hasPrefix("| cache 2 |") || $0.hasPrefix("| all resident |") }
        XCTAssertEqual(lines.count, 2, r.out)
        for (line, row) in zip(lines, rows) {
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            XCTAssertEqual(cells.count, 11, String(line))
            let loads = try XCTUnwrap(row["loads"] as? Int)
            XCTAssertEqual(Int(cells[7]), loads, String(line))
            if loads == 0 { XCTAssertEqual(cells[8], "0.00", String(line)) }
            let rss = cells[9].components(separatedBy: "→").compactMap(Double.init)
            let want = try ["rss_start_mb", "rss_after_tenth_mb", "rss_end_mb"].map { try XCTUnwrap(row[$0] as? Double).rounded() }
            XCTAssertEqual(rss, want, String(line))
            XCTAssertTrue(rss.allSatisfy { $0 > 0 }, String(line))
            XCTAssertEqual(Int(cells[10]), try XCTUnwrap(row["cached_prompt_tokens"] as? Int), String(line))
        }
        // One adapter, every prompt opening with the same 17 tokens: after the
        // first request, each finds the shared whole block (16) in the prefix cache.
        let shared = try run(["bench-replay", "--model", tiny, "--adapter-count", "1", "--requests", "6", "--rate", "100",
                              "--prompt-len", "20", "--shared-prefix", "17", "--gen-len", "2", "--rank", "4", "--adapter-pool-mb", "16",
                              "--compare-resident", "false", "--json", json.path])
        XCTAssertEqual(shared.status, 0, shared.err)
        let sharedRows = try XCTUnwrap((JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])?["results"] as? [[String: Any]])
        let cached = try XCTUnwrap(sharedRows.first?["cached_prompt_tokens"] as? Int)
        XCTAssertGreaterThan(cached, 0, shared.out)
        XCTAssertEqual(cached % 16, 0)
        XCTAssertLessThanOrEqual(cached, 5 * 16)
        let ref = try Fixtures.json("tiny/reference.json")
        let prompt = try XCTUnwrap((ref["prompts"] as? [[Any]])?[1]).ints
        let g = try run(["generate", "--model", Fixtures.url("tiny/hf").path, "--prompt-ids",
                         prompt.map(String.init).joined(separator: ","), "--max-tokens", "1"])
        XCTAssertEqual(g.status, 0, g.err)
        XCTAssertTrue(g.err.contains(", 1 new tokens at 0.0 tok/s]"), g.err)
    }

    func testBadArgumentsFailCleanly() throws {
        let tiny = Fixtures.url("tiny/tiny-f32.gguf").path
        for args in [["generate", "--model", tiny, "--prompt-ids", "1,x"],
                     ["generate", "--model", tiny, "--prompt-ids", "1,99999"],
                     ["generate", "--model", tiny],
                     ["generate", "--model", "/nonexistent.gguf", "--prompt-ids", "1"],
                     ["generate", "--model", tiny, "--prompt-ids", "1", "--max-tokens", "0"],
                     ["bench", "--model", tiny, "--adapter-pool-mb", "-1"],
                     // No queue at all would turn every request away with 429.
                     ["serve", "--model", tiny, "--max-queued", "0"]] {
            let r = try run(args)
            XCTAssertNotEqual(r.status, 0, "\(args)")
            XCTAssertTrue(r.err.lowercased().contains("error"), "\(args): \(r.err)")
            XCTAssertFalse(r.err.contains("Fatal error"), "\(args) crashed: \(r.err)")
        }
    }
}
