import XCTest
import CKernels
@testable import LoraMux

/// The tiny model's weights under Llama 3.1's and linear RoPE scaling and
/// under Mistral's sliding window, against transformers (Fixtures/tiny/variants,
/// made by make_fixtures.py --only variants).
final class ModelVariantTests: XCTestCase {
    var reference: [String: Any]!
    var prompts: [[Int32]] = []
    var variants: [String: [String: Any]] = [:]

    override func setUpWithError() throws {
        reference = try Fixtures.json("tiny/variants/reference.json")
        prompts = try XCTUnwrap(reference["prompts"] as? [[Any]]).map(\.ints)
        variants = try XCTUnwrap(reference["variants"] as? [String: [String: Any]])
        XCTAssertEqual(Set(variants.keys), ["llama3-rope", "linear-rope", "mistral-sw"])
        XCTAssertEqual(prompts.map(\.count), [1, 12, 40])
    }

    /// (variant, path, layout) for every file form of every variant.
    var files: [(name: String, path: String)] {
        variants.keys.sorted().flatMap { name -> [(String, String)] in
            var out = [(name, Fixtures.url("tiny/variants/\(name)").path)]
            if let g = variants[name]?["gguf"] as? String { out.append((name, Fixtures.url("tiny/variants/\(g)").path)) }
            return out
        }
    }

    func testConfigsAreRead() throws {
        let l3 = try LlamaWeights.load(path: Fixtures.url("tiny/variants/llama3-rope").path).config
        XCTAssertEqual(l3.ropeScaling, .llama3(factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 32))
        XCTAssertNil(l3.slidingWindow)
        let lin = try LlamaWeights.load(path: Fixtures.url("tiny/variants/linear-rope").path).config
        XCTAssertEqual(lin.ropeScaling, .linear(factor: 2))
        let linG = try LlamaWeights.load(path: Fixtures.url("tiny/variants/linear-rope-f32.gguf").path).config
        XCTAssertEqual(linG.ropeScaling, .linear(factor: 2))
        let l3G = try LlamaWeights.load(path: Fixtures.url("tiny/variants/llama3-rope-f32.gguf").path)
        XCTAssertEqual(l3G.config.ropeScaling, .none, "llama.cpp carries Llama 3.1's scaling in rope_freqs")
        XCTAssertEqual(l3G.ropeFactors?.count, 8)
        let m = try LlamaWeights.load(path: Fixtures.url("tiny/variants/mistral-sw").path).config
        XCTAssertEqual(m.slidingWindow, 8)
        XCTAssertEqual(m.ropeScaling, .none)
    }

    /// The rotary frequencies equal transformers' inv_freq buffer to the bit
    /// from config.json; from a GGUF (llama.cpp's divisors) within 2 ulp.
    func testInverseFrequenciesMatchTransformers() throws {
        for (name, path) in files {
            let want = try XCTUnwrap(variants[name]?["inv_freq"] as? [Any]).floats
            let got = LlamaModel(weights: try LlamaWeights.load(path: path)).invFreq
            XCTAssertEqual(got.count, want.count)
            if path.hasSuffix(".gguf") {
                for (g, w) in zip(got, want) { XCTAssertLessThanOrEqual(abs(g - w), 2 * w.ulp, "\(path)") }
            } else {
                XCTAssertEqual(got, want, name)
            }
        }
    }

    // Same tolerance as the plain tiny model: 1e-4 max-abs on logits of magnitude ~5.
    func testLogitsMatchTransformers() throws {
        for (name, path) in files {
            let model = try Fixtures.model(path)
            let all = try XCTUnwrap(variants[name]?["logits"] as? [[[Any]]])
            for (p, ids) in prompts.enumerated() {
                let want = all[p].flatMap(\.floats)
                let got = try prefillLogits(model, ids)
                XCTAssertLessThan(maxAbsDiff(got, want), 1e-4, "\(path) prompt \(p)")
            }
        }
    }

    /// Decoding one token at a time through the paged cache (the window's
    /// start moves by one each step and crosses block edges) gives
    /// transformers' greedy tokens.
    func testGreedyTokensMatchTransformers() throws {
        for (name, path) in files {
            let model = try Fixtures.model(path)
            let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 1 << 20)
            let want = try XCTUnwrap(variants[name]?["greedy"] as? [[Any]]).map(\.ints)
            for (p, ids) in prompts.enumerated() {
                let r = try gen.generate(promptIds: ids, params: SamplingParams(maxTokens: want[p].count, ignoreEOS: true))
                XCTAssertEqual(r.tokenIds, want[p], "\(path) prompt \(p)")
            }
        }
    }

    /// A window row in a batch with rows at other positions sees only its own window.
    func testSlidingWindowRowsInOneBatchEqualSeparateRuns() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/variants/mistral-sw").path)
        let batched = try batchedLastLogits(model, prompts, cache: try KVCache(config: model.config, numBlocks: 32, blockSize: 4))
        let V = model.config.vocabSize
        for (s, ids) in prompts.enumerated() {
            let alone = try prefillLogits(model, ids)
            XCTAssertLessThan(maxAbsDiff(Array(batched[(s * V)..<((s + 1) * V)]), Array(alone.suffix(V))), 1e-5, "sequence \(s)")
        }
    }

    // MARK: refusals

    func tempModelDir(config edit: (inout [String: Any]) -> Void) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-variant-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        var cfg = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: Fixtures.url("tiny/hf/config.json"))) as? [String: Any])
        edit(&cfg)
        try JSONSerialization.data(withJSONObject: cfg).write(to: dir.appendingPathComponent("config.json"))
        try FileManager.default.copyItem(at: Fixtures.url("tiny/hf/model.safetensors"), to: dir.appendingPathComponent("model.safetensors"))
        return dir.path
    }

    func assertRefused(_ path: String, _ needle: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try LlamaWeights.load(path: path), file: file, line: line) { e in
            let msg = (e as? LocalizedError)?.errorDescription ?? "\(e)"
            XCTAssertTrue(msg.contains(needle), "'\(msg)' should mention '\(needle)'", file: file, line: line)
        }
    }

    /// The pre-transformers-5 spelling (rope_scaling, "type") reads the same;
    /// kinds we do not compute, and configs that would mislead us, are refused by name.
    func testRopeAndWindowConfigForms() throws {
        let old = try tempModelDir { c in
            c.removeValue(forKey: "rope_parameters")
            c["rope_theta"] = 10000.0
            c["rope_scaling"] = ["type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32]
        }
        XCTAssertEqual(try LlamaWeights.load(path: old).config.ropeScaling,
                       .llama3(factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 32))
        let noWindow = try tempModelDir { c in c["model_type"] = "mistral"; c["sliding_window"] = NSNull() }
        XCTAssertNil(try LlamaWeights.load(path: noWindow).config.slidingWindow)
        let defaultWindow = try tempModelDir { c in c["model_type"] = "mistral"; c.removeValue(forKey: "sliding_window") }
        XCTAssertEqual(try LlamaWeights.load(path: defaultWindow).config.slidingWindow, 4096, "MistralConfig's default")

        assertRefused(try tempModelDir { c in c["rope_scaling"] = ["rope_type": "yarn", "factor": 4.0] }, "rope_type 'yarn'")
        assertRefused(try tempModelDir { c in c["rope_scaling"] = ["rope_type": "llama3", "factor": 8.0] }, "rope_scaling.low_freq_factor")
        assertRefused(try tempModelDir { c in
            c["rope_scaling"] = ["rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                 "original_max_position_embeddings": 32]
        }, "low_freq_factor < high_freq_factor")
        assertRefused(try tempModelDir { c in c["rope_scaling"] = ["rope_type": "linear", "factor": -2.0] }, "factor")
        assertRefused(try tempModelDir { c in c["partial_rotary_factor"] = 0.5 }, "partial_rotary_factor")
        assertRefused(try tempModelDir { c in c["model_type"] = "mistral"; c["sliding_window"] = 0 }, "sliding window 0")
        assertRefused(try tempModelDir { c in c["model_type"] = "mistral"; c["sliding_window"] = "8" }, "sliding_window")
        assertRefused(try tempModelDir { c in c["model_type"] = "gemma" }, "model_type 'gemma'")
    }

    /// A tensor the forward pass would not read is refused, not ignored.
    func testUnknownTensorsAreRefused() throws {
        func edited(_ rel: String, _ from: String, _ to: String, tied: Bool = false) throws -> String {
            var bytes = [UInt8](try Data(contentsOf: Fixtures.url(rel)))
            let f = Array(from.utf8), t = Array(to.utf8)
            XCTAssertEqual(f.count, t.count)
            let at = try XCTUnwrap((0...(bytes.count - f.count)).first { bytes[$0..<($0 + f.count)].elementsEqual(f) })
            bytes.replaceSubrange(at..<(at + f.count), with: t)
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-variant-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
            if rel.hasSuffix(".gguf") {
                let url = dir.appendingPathComponent("m.gguf")
                try Data(bytes).write(to: url)
                return url.path
            }
            var cfg = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: Fixtures.url("tiny/hf/config.json"))) as? [String: Any])
            cfg["tie_word_embeddings"] = tied
            try JSONSerialization.data(withJSONObject: cfg).write(to: dir.appendingPathComponent("config.json"))
            try Data(bytes).write(to: dir.appendingPathComponent("model.safetensors"))
            return dir.path
        }
        // Without the check this one would run with the embedding as lm_head.
        // (A name in the tensor table follows its u64 length.)
        assertRefused(try edited("tiny/tiny-f32.gguf", "\u{d}\0\0\0\0\0\0\0output.weight", "\u{d}\0\0\0\0\0\0\0output_x.bias"),
                      "bias tensor 'output_x.bias'")
        // block_count (a u32 after its key and type) 2 -> 1: layer 1's tensors are past the count.
        assertRefused(try edited("tiny/tiny-f32.gguf", "llama.block_count\u{4}\0\0\0\u{2}", "llama.block_count\u{4}\0\0\0\u{1}"),
                      "tensor 'blk.1.attn_k.weight'")
        // In the JSON header a key may shrink if spaces keep the header's length;
        // tied, the model would otherwise run with the embedding as lm_head.
        assertRefused(try edited("tiny/hf/model.safetensors", "\"lm_head.weight\"", "\"lm_head.bias\"  ", tied: true),
                      "bias tensor 'lm_head.bias'")
        assertRefused(try edited("tiny/variants/llama3-rope-f32.gguf", "rope_freqs.weight", "rope_freqs.weighs"), "tensor 'rope_freqs.weighs'")
        let factors = try XCTUnwrap(LlamaWeights.load(path: Fixtures.url("tiny/variants/llama3-rope-f32.gguf").path).ropeFactors)
        XCTAssertEqual(factors[0], 1)
        XCTAssertEqual(factors[7], 8)
    }
}
