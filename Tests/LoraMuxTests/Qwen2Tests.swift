import XCTest
@testable import LoraMux

/// A tiny random Qwen2 (q/k/v biases) as safetensors and as
/// llama.cpp's GGUF of arch qwen2, with and without a PEFT adapter, against
/// transformers + PEFT (Fixtures/tiny/qwen2, make_fixtures.py --only qwen2).
final class Qwen2Tests: XCTestCase {
    var ref: [String: Any]!
    var prompts: [[Int32]] = []
    let paths = [Fixtures.url("tiny/qwen2/hf").path, Fixtures.url("tiny/qwen2/tiny-qwen2-f32.gguf").path]

    override func setUpWithError() throws {
        ref = try Fixtures.json("tiny/qwen2/reference.json")
        prompts = try XCTUnwrap(ref["prompts"] as? [[Any]]).map(\.ints)
        XCTAssertEqual(prompts.map(\.count), [1, 12, 40])
    }

    func adapter(_ model: LlamaModel) throws -> LoraAdapter {
        try PEFTAdapter(directory: Fixtures.url("tiny/qwen2/adapter-all-r4").path).load(name: "q", base: model.weights)
    }

    func testConfigAndLayoutAreRead() throws {
        for path in paths {
            let w = try LlamaWeights.load(path: path)
            XCTAssertTrue(w.config.qkvBias, path)
            XCTAssertFalse(w.config.outputBias, path)
            XCTAssertFalse(w.config.tieEmbeddings, path)
            XCTAssertEqual(w.config.ropeTheta, 1_000_000, path)
            XCTAssertEqual(w.config.headDim, 16, path)
            // llama.cpp runs qwen2 with NEOX RoPE on unpermuted rows.
            XCTAssertEqual(w.layout, .huggingFace, path)
            XCTAssertEqual(w.layers[1].kBias?.count, 32, path)
            XCTAssertNil(w.layers[1].oBias, path)
        }
    }

    // 1e-4 max-abs, as for the tiny Llama; logits of magnitude up to ~7.
    func testLogitsMatchTransformersWithAndWithoutAdapter() throws {
        let base = try XCTUnwrap(ref["logits"] as? [[[Any]]]), tuned = try XCTUnwrap(ref["adapter_logits"] as? [[[Any]]])
        for path in paths {
            let model = try Fixtures.model(path)
            let a = try adapter(model)
            for (p, ids) in prompts.enumerated() {
                XCTAssertLessThan(maxAbsDiff(try prefillLogits(model, ids), base[p].flatMap(\.floats)), 1e-4, "\(path) prompt \(p)")
                XCTAssertLessThan(maxAbsDiff(try prefillLogits(model, ids, adapter: a), tuned[p].flatMap(\.floats)), 1e-4,
                                  "\(path) prompt \(p) with the adapter")
            }
        }
    }

    func testGreedyTokensMatchTransformers() throws {
        let base = try XCTUnwrap(ref["greedy"] as? [[Any]]).map(\.ints)
        let tuned = try XCTUnwrap(ref["adapter_greedy"] as? [[Any]]).map(\.ints)
        for path in paths {
            let model = try Fixtures.model(path)
            let a = try adapter(model)
            let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 1 << 20)
            for (p, ids) in prompts.enumerated() {
                let params = SamplingParams(maxTokens: base[p].count, ignoreEOS: true)
                XCTAssertEqual(try gen.generate(promptIds: ids, params: params).tokenIds, base[p], "\(path) prompt \(p)")
                XCTAssertEqual(try gen.generate(promptIds: ids, params: params, adapter: a).tokenIds, tuned[p],
                               "\(path) prompt \(p) with the adapter")
            }
        }
    }

    func testQwen2ConfigRefusals() throws {
        func dir(_ edit: (inout [String: Any]) -> Void, weights: String = "tiny/qwen2/hf/model.safetensors") throws -> String {
            let d = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-qwen2-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
            addTeardownBlock { try? FileManager.default.removeItem(at: d) }
            var cfg = try Fixtures.json("tiny/qwen2/hf/config.json")
            edit(&cfg)
            try JSONSerialization.data(withJSONObject: cfg).write(to: d.appendingPathComponent("config.json"))
            try FileManager.default.copyItem(at: Fixtures.url(weights), to: d.appendingPathComponent("model.safetensors"))
            return d.path
        }
        func refused(_ path: String, _ needle: String, line: UInt = #line) {
            XCTAssertThrowsError(try LlamaWeights.load(path: path), line: line) { e in
                let msg = (e as? LocalizedError)?.errorDescription ?? "\(e)"
                XCTAssertTrue(msg.contains(needle), "'\(msg)' should mention '\(needle)'", line: line)
            }
        }
        // Windowed layers from max_window_layers on: we would attend too far back.
        refused(try dir { c in c["use_sliding_window"] = true; c["max_window_layers"] = 1; c.removeValue(forKey: "layer_types") },
                "sliding_attention")
        refused(try dir { c in c["layer_types"] = ["full_attention", "sliding_attention"] }, "sliding_attention")
        // All-full layer_types with the switch on is what transformers runs as full attention.
        XCTAssertNoThrow(try LlamaWeights.load(path: try dir { c in c["use_sliding_window"] = true; c["max_window_layers"] = 2 }))
        // The tiny Llama's weights have no biases: a Qwen2 config over them names the first missing one.
        refused(try dir({ c in c["model_type"] = "qwen2" }, weights: "tiny/hf/model.safetensors"), "self_attn.q_proj.bias")
        // Llama's attention_bias asks for all four biases; Qwen2's weights have no o bias.
        refused(try dir { c in c["model_type"] = "llama"; c["attention_bias"] = true }, "self_attn.o_proj.bias")
        // As a Llama without biases, Qwen2's bias tensors are refused rather than dropped.
        refused(try dir { c in c["model_type"] = "llama" }, "bias tensor 'model.layers.0.self_attn.k_proj.bias'")
    }
}
