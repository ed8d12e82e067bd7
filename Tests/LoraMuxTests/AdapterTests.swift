import XCTest
import CKernels
@testable import LoraMux

/// PEFT adapters of every supported kind against PEFT's own logits, on a
/// safetensors base and on the GGUF-f32 base (permuted q/k rows).
final class PEFTAdapterTests: XCTestCase {
    static let bases = ["tiny/hf", "tiny/tiny-f32.gguf"]
    var ref: [String: Any]!
    var prompts: [[Int32]] = []

    override func setUpWithError() throws {
        ref = try Fixtures.json("tiny/adapters/reference.json")
        prompts = try XCTUnwrap(ref["prompts"] as? [[Any]]).map(\.ints)
    }

    func adapterRef(_ name: String) throws -> [String: Any] {
        try XCTUnwrap((ref["adapters"] as? [String: Any])?[name] as? [String: Any])
    }

    func load(_ name: String, base: LlamaWeights, storage: AdapterDType? = nil) throws -> LoraAdapter {
        try PEFTAdapter(directory: Fixtures.url("tiny/adapters/\(name)").path).load(name: name, base: base, storage: storage)
    }

    func logits(_ model: LlamaModel, _ ids: [Int32], _ adapter: LoraAdapter?) throws -> [Float] {
        try prefillLogits(model, ids, adapter: adapter)
    }

    func testEveryAdapterKindMatchesPEFTOnBothBases() throws {
        let names = try XCTUnwrap((ref["adapters"] as? [String: Any])?.keys).sorted()
        XCTAssertEqual(Set(names), ["qv", "all7", "rslora", "patterns", "regex", "dora", "embed", "mts"])
        for basePath in Self.bases {
            let model = try Fixtures.model(Fixtures.url(basePath).path)
            for name in names {
                let a = try load(name, base: model.weights)
                let r = try adapterRef(name)
                let want = try XCTUnwrap(r["logits"] as? [[[Any]]])
                for (p, ids) in prompts.enumerated() {
                    for gemv: Int32 in [0, 4, 16] {
                        lm_matmul_set_gemv_max_rows(gemv)
                        let got = try logits(model, ids, a)
                        XCTAssertLessThan(maxAbsDiff(got, want[p].flatMap(\.floats)), 1e-4, "\(name) on \(basePath) prompt \(p)")
                    }
                }
                lm_matmul_set_gemv_max_rows(-1)
                let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 1 << 20)
                let greedy = try XCTUnwrap(r["greedy"] as? [[Any]]).map(\.ints)
                for (p, ids) in prompts.enumerated() {
                    let out = try gen.generate(promptIds: ids, params: SamplingParams(maxTokens: greedy[p].count, ignoreEOS: true), adapter: a)
                    XCTAssertEqual(out.tokenIds, greedy[p], "\(name) on \(basePath) greedy prompt \(p)")
                }
            }
        }
    }

    func testAdaptersChangeTheOutputs() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let base = try logits(model, prompts[1], nil)
        for name in ["qv", "dora", "embed", "mts", "patterns"] {
            let got = try logits(model, prompts[1], try load(name, base: model.weights))
            XCTAssertGreaterThan(maxAbsDiff(got, base), 0.05, name)
        }
    }

    /// One batch: rows of different adapters and of the base, in one forward pass.
    func testMixedBatchMatchesPEFTAdapterNames() throws {
        let mixed = try XCTUnwrap(ref["mixed"] as? [String: Any])
        let mp = try XCTUnwrap(mixed["prompts"] as? [[Any]]).map(\.ints)
        let rowsSpec = try XCTUnwrap(mixed["rows"] as? [[String: Any]])
        let want = try XCTUnwrap(mixed["logits"] as? [[Any]]).map(\.floats)
        for basePath in Self.bases {
            let model = try Fixtures.model(Fixtures.url(basePath).path)
            var adapters: [String: LoraAdapter] = [:]
            for spec in rowsSpec { if let n = spec["adapter"] as? String, n != "__base__", adapters[n] == nil { adapters[n] = try load(n, base: model.weights) } }
            let cache = try KVCache(config: model.config, numBlocks: 64, blockSize: 4)
            var batch = ForwardBatch()
            for (s, spec) in rowsSpec.enumerated() {
                let ids = mp[try XCTUnwrap(spec["prompt"] as? Int)]
                var t: [Int32] = []
                XCTAssertTrue(cache.reserve(&t, tokens: ids.count))
                batch.tables.append(t)
                batch.adapters.append(adapters[spec["adapter"] as? String ?? ""])
                for (i, id) in ids.enumerated() { batch.rows.append(BatchRow(token: id, position: Int32(i), sequence: s, wantsLogits: i == ids.count - 1)) }
            }
            let got = try model.forward(batch, cache: cache)
            let V = model.config.vocabSize
            for s in rowsSpec.indices {
                XCTAssertLessThan(maxAbsDiff(Array(got[(s * V)..<((s + 1) * V)]), want[s]), 1e-4, "row \(s) on \(basePath)")
            }
        }
    }

    func testF16StorageStaysWithinItsTolerance() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/tiny-f32.gguf").path)
        for name in ["all7", "dora", "mts"] {
            let a = try load(name, base: model.weights, storage: .f16)
            XCTAssertEqual(a.modules.compactMap { $0.compactMap { $0 }.first }.first?.dtype, .f16)
            let want = try XCTUnwrap(try adapterRef(name)["logits"] as? [[[Any]]])
            let got = try logits(model, prompts[2], a)
            // Rounding A and B to f16 (rel. 2^-11) moves these logits by a few 1e-3.
            XCTAssertLessThan(maxAbsDiff(got, want[2].flatMap(\.floats)), 2e-2, name)
        }
    }

    func testResolvedRanksScalesAndLayers() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let p = try load("patterns", base: model.weights)
        XCTAssertNil(p.modules[0][Projection.q.rawValue], "layers_to_transform [1] leaves layer 0 alone")
        XCTAssertEqual(p.modules[1][Projection.k.rawValue]?.rank, 2)
        XCTAssertEqual(p.modules[1][Projection.down.rawValue]?.rank, 6)
        XCTAssertEqual(p.modules[1][Projection.o.rawValue]?.scale, 32.0 / 4)
        XCTAssertEqual(p.modules[1][Projection.q.rawValue]?.scale, 8.0 / 4)
        let rs = try load("rslora", base: model.weights)
        XCTAssertEqual(Double(rs.modules[0][Projection.up.rawValue]!.scale), 8.0 / 4.0, accuracy: 1e-6, "alpha / sqrt(16)")
        let rx = try load("regex", base: model.weights)
        XCTAssertEqual(rx.moduleCount, 3)
    }
}

/// Adapters that must be refused, each with a message a user can act on.
final class AdapterRejectionTests: XCTestCase {
    func expectError(_ dir: String, _ needles: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        XCTAssertThrowsError(try PEFTAdapter(directory: dir).load(name: "x", base: model.weights), file: file, line: line) { e in
            let msg = (e as? LocalizedError)?.errorDescription ?? "\(e)"
            for n in needles { XCTAssertTrue(msg.contains(n), "'\(msg)' should mention '\(n)'", file: file, line: line) }
        }
    }

    func testBadFixtures() throws {
        try expectError(Fixtures.url("tiny/adapters-bad/wrong_base").path, ["does not fit this base model", "other/tiny-48"])
        try expectError(Fixtures.url("tiny/adapters-bad/bias_all").path, ["bias"])
        try expectError(Fixtures.url("tiny/adapters-bad/ia3").path, ["peft_type", "IA3"])
        try expectError(Fixtures.url("tiny/adapters-bad/pickle_only").path, ["adapter_model.bin", "pickle"])
        try expectError("/nonexistent/adapter", ["adapter_config.json"])
    }

    /// Copies a good adapter and edits its config or weights.
    func variant(_ name: String, config edit: (inout [String: Any]) -> Void = { _ in },
                 weights: ((inout [UInt8]) -> Void)? = nil) throws -> String {
        let src = Fixtures.url("tiny/adapters/\(name)")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-ad-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        var cfg = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: src.appendingPathComponent("adapter_config.json"))) as? [String: Any])
        edit(&cfg)
        try JSONSerialization.data(withJSONObject: cfg).write(to: dir.appendingPathComponent("adapter_config.json"))
        var w = [UInt8](try Data(contentsOf: src.appendingPathComponent("adapter_model.safetensors")))
        weights?(&w)
        try Data(w).write(to: dir.appendingPathComponent("adapter_model.safetensors"))
        return dir.path
    }

    func testUnsupportedSettingsAreNamed() throws {
        try expectError(try variant("qv") { $0["layer_replication"] = [[0, 1]] }, ["layer_replication"])
        try expectError(try variant("qv") { $0["lora_bias"] = true }, ["lora_bias"])
        try expectError(try variant("qv") { $0["some_future_option"] = "on" }, ["some_future_option"])
        try expectError(try variant("qv") { $0["r"] = 0 }, ["'r'"])
        try expectError(try variant("qv") { $0["target_modules"] = ["q_proj", "v_proj", "k_proj"] }, ["k_proj", "no weights"])
        try expectError(try variant("qv") { $0["target_modules"] = ["v_proj"] }, ["q_proj", "does not target"])
        try expectError(try variant("qv") { $0["use_dora"] = true }, ["lora_magnitude_vector"])
        try expectError(try variant("qv") { $0["target_modules"] = "(unclosed" }, ["target_modules"])
        try expectError(try variant("qv") { $0["r"] = 4 }, ["rank 8 in its tensors", "gives 4"])
        try expectError(try variant("qv") { $0["rank_pattern"] = ["v_proj": 2] }, ["v_proj' has rank 8", "gives 2"])
        try expectError(try variant("embed") { $0["rank_pattern"] = ["embed_tokens": 2] }, ["embed_tokens' has rank 4", "gives 2"])
        // Harmless keys pass.
        let ok = try variant("qv") { $0["lora_dropout"] = 0.3; $0["fan_in_fan_out"] = true; $0["use_qalora"] = false }
        XCTAssertNoThrow(try PEFTAdapter(directory: ok).load(name: "ok", base: try Fixtures.model(Fixtures.url("tiny/hf").path).weights))
    }

    func testCorruptWeights() throws {
        try expectError(try variant("qv", weights: { $0.removeLast(100) }), ["outside the file"])
        try expectError(try variant("qv", weights: { $0[9] = 0 }), ["JSON"])
        // NaN in a tensor's data
        try expectError(try variant("qv", weights: { w in
            for i in stride(from: w.count - 4, to: w.count, by: 1) { w[i] = 0xff }
        }), ["non-finite"])
    }
}

/// Two PEFT adapters on the real SmolLM2 Q4_1 base against PEFT's greedy tokens.
final class SmolLM2AdapterTests: XCTestCase {
    func testGreedyTokensMatchPEFT() throws {
        let model = try Fixtures.model(try Fixtures.smolLM2Path())
        let golden = try Fixtures.json("smollm2/adapters/golden.json")
        let adapters = try XCTUnwrap(golden["adapters"] as? [String: [String: Any]])
        XCTAssertEqual(Set(adapters.keys), ["sql-ish-qv", "all-r4"])
        let gen = try Generator(model: model, tokenizer: nil)
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-s2-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        for (name, spec) in adapters.sorted(by: { $0.key < $1.key }) {
            let dir = Fixtures.url("smollm2/adapters/\(name)").path
            var sources: [(String, LoraAdapter)] = [("PEFT", try AdapterLoader.load(path: dir, name: name, base: model.weights))]
            if name == "all-r4" {
                // Stored in f16 by PEFT, so packing to f16 is lossless: same tokens required.
                let lora = tmp.appendingPathComponent("\(name).lora").path
                _ = try PackedAdapter.pack(peftDirectory: dir, to: lora)
                sources.append((".lora", try AdapterLoader.load(path: lora, name: name, base: model.weights)))
            }
            for (kind, adapter) in sources {
                for c in try XCTUnwrap(spec["chat"] as? [[String: Any]]) {
                    let prompt = try XCTUnwrap(c["prompt_ids"] as? [Any]).ints
                    let want = try XCTUnwrap(c["token_ids"] as? [Any]).ints
                    let margins = try XCTUnwrap(c["margins"] as? [Any]).floats
                    let got = try gen.generate(promptIds: prompt, params: SamplingParams(maxTokens: want.count, ignoreEOS: true),
                                               adapter: adapter).tokenIds
                    if let i = zip(got, want).enumerated().first(where: { $1.0 != $1.1 })?.offset {
                        XCTFail("\(name) (\(kind)): first difference at token \(i) (reference margin \(margins[i]))")
                    }
                }
            }
        }
    }
}
