import XCTest
import CKernels
@testable import LoraMux

/// The forward pass against transformers' logits on a tiny random Llama.
final class TinyModelTests: XCTestCase {
    static let formats: [(key: String, path: String)] = [
        ("hf", "tiny/hf"), ("gguf-f32", "tiny/tiny-f32.gguf"), ("gguf-f16", "tiny/tiny-f16.gguf"),
        ("gguf-q8_0", "tiny/tiny-q8_0.gguf"), ("gguf-q4_0", "tiny/tiny-q4_0.gguf"), ("gguf-q4_1", "tiny/tiny-q4_1.gguf"),
    ]

    var reference: [String: Any]!
    var prompts: [[Int32]] = []

    override func setUpWithError() throws {
        reference = try Fixtures.json("tiny/reference.json")
        prompts = try XCTUnwrap(reference["prompts"] as? [[Any]]).map(\.ints)
        XCTAssertEqual(prompts.count, 3)
    }

    func refLogits(_ key: String, _ p: Int) throws -> [Float] {
        let all = try XCTUnwrap((reference["logits"] as? [String: Any])?[key] as? [[[Any]]])
        return all[p].flatMap(\.floats)
    }

    /// Logits of every position of one prompt, computed in one prefill.
    func prefillLogits(_ model: LlamaModel, _ ids: [Int32], cache: KVCache) throws -> [Float] {
        var table: [Int32] = []
        XCTAssertTrue(cache.reserve(&table, tokens: ids.count))
        defer { cache.release(&table) }
        let rows = ids.enumerated().map { BatchRow(token: $1, position: Int32($0), sequence: 0, wantsLogits: true) }
        return try model.forward(ForwardBatch(rows: rows, tables: [table]), cache: cache)
    }

    // Quantized files are compared with their own dequantized reference, so one
    // tolerance holds for all: 1e-4 max-abs on logits of magnitude ~5.
    func testLogitsMatchTransformersForEveryFormat() throws {
        for (key, rel) in Self.formats {
            let model = try Fixtures.model(Fixtures.url(rel).path)
            XCTAssertEqual(model.weights.layout, key == "hf" ? .huggingFace : .gguf)
            let cache = try KVCache(config: model.config, numBlocks: 8, blockSize: 4)
            for (p, ids) in prompts.enumerated() {
                for gemvRows: Int32 in [0, 4, 16] {  // both matmul paths, GEMV in one group of rows and in several
                    lm_matmul_set_gemv_max_rows(gemvRows)
                    let got = try prefillLogits(model, ids, cache: cache)
                    let want = try refLogits(key, p)
                    XCTAssertLessThan(maxAbsDiff(got, want), 1e-4, "\(key) prompt \(p) gemv<=\(gemvRows)")
                }
            }
            lm_matmul_set_gemv_max_rows(-1)
        }
    }

    func testIncrementalDecodeEqualsPrefill() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/tiny-q4_1.gguf").path)
        let cache = try KVCache(config: model.config, numBlocks: 8, blockSize: 4)
        let ids = prompts[2]
        let full = try prefillLogits(model, ids, cache: cache)
        var table: [Int32] = []
        XCTAssertTrue(cache.reserve(&table, tokens: ids.count))
        defer { cache.release(&table) }
        let V = model.config.vocabSize
        for (i, t) in ids.enumerated() {
            let l = try model.forward(ForwardBatch(rows: [BatchRow(token: t, position: Int32(i), sequence: 0, wantsLogits: true)],
                                                   tables: [table]), cache: cache)
            XCTAssertLessThan(maxAbsDiff(l, Array(full[(i * V)..<((i + 1) * V)])), 1e-5, "position \(i)")
        }
    }

    func testMixedBatchEqualsSeparateRuns() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let cache = try KVCache(config: model.config, numBlocks: 16, blockSize: 4)
        let batched = try batchedLastLogits(model, prompts, cache: cache)
        let V = model.config.vocabSize
        for (s, ids) in prompts.enumerated() {
            let alone = try prefillLogits(model, ids, cache: cache)
            XCTAssertLessThan(maxAbsDiff(Array(batched[(s * V)..<((s + 1) * V)]), Array(alone.suffix(V))), 1e-5, "sequence \(s)")
        }
    }

    func testGreedyTokensMatchTransformers() throws {
        let greedy = try XCTUnwrap(reference["greedy"] as? [String: Any])
        for (key, rel) in Self.formats {
            let model = try Fixtures.model(Fixtures.url(rel).path)
            let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 1 << 20)
            let want = try XCTUnwrap(greedy[key] as? [[Any]]).map(\.ints)
            for (p, ids) in prompts.enumerated() {
                let r = try gen.generate(promptIds: ids, params: SamplingParams(maxTokens: want[p].count, ignoreEOS: true))
                XCTAssertEqual(r.tokenIds, want[p], "\(key) prompt \(p)")
                XCTAssertEqual(r.finishReason, .length)
            }
        }
    }

    func testConfigIsReadFromBothSources() throws {
        let a = try LlamaWeights.load(path: Fixtures.url("tiny/hf").path).config
        let b = try LlamaWeights.load(path: Fixtures.url("tiny/tiny-f32.gguf").path).config
        XCTAssertEqual(a.numLayers, 2); XCTAssertEqual(a.numKVHeads, 2); XCTAssertEqual(a.headDim, 16)
        XCTAssertEqual(a.hiddenSize, b.hiddenSize); XCTAssertEqual(a.numHeads, b.numHeads)
        XCTAssertEqual(a.numKVHeads, b.numKVHeads); XCTAssertEqual(a.vocabSize, b.vocabSize)
        XCTAssertEqual(a.ropeTheta, b.ropeTheta); XCTAssertEqual(Float(a.rmsEps), Float(b.rmsEps))
        XCTAssertEqual(a.tieEmbeddings, b.tieEmbeddings)
    }

    func testBadRowsAreRejected() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let cache = try KVCache(config: model.config, numBlocks: 2, blockSize: 4)
        var t: [Int32] = []
        XCTAssertTrue(cache.reserve(&t, tokens: 4))
        XCTAssertThrowsError(try model.forward(ForwardBatch(rows: [BatchRow(token: 999, position: 0, sequence: 0, wantsLogits: true)], tables: [t]), cache: cache))
        XCTAssertThrowsError(try model.forward(ForwardBatch(rows: [BatchRow(token: 1, position: 4, sequence: 0, wantsLogits: true)], tables: [t]), cache: cache))
        XCTAssertThrowsError(try model.forward(ForwardBatch(rows: [BatchRow(token: 1, position: 0, sequence: 1, wantsLogits: true)], tables: [t]), cache: cache))
        let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 1 << 20)
        XCTAssertThrowsError(try gen.generate(promptIds: [1, 2], params: SamplingParams(maxTokens: 300))) { e in
            XCTAssertEqual(e as? EngineError, .promptTooLong(tokens: 302, limit: 256))
        }
        XCTAssertThrowsError(try gen.generate(promptIds: [], params: SamplingParams()))
    }
}

/// Greedy decoding of the real SmolLM2 Q4_1 model against transformers.
final class SmolLM2GoldenTests: XCTestCase {
    func testGreedyTokensMatchTransformers() throws {
        let path = try Fixtures.smolLM2Path()
        let golden = try Fixtures.json("smollm2/golden.json")
        let model = try Fixtures.model(path)
        let gen = try Generator(model: model, tokenizer: nil)
        let cases = try XCTUnwrap(golden["chat"] as? [[String: Any]]) + XCTUnwrap(golden["raw"] as? [[String: Any]])
        XCTAssertEqual(cases.count, 7)
        defer { lm_cpu_set_level(lm_cpu_detect()) }
        // Every kernel path this CPU has (AVX-512, AVX2, scalar) must give the same tokens.
        for level in (0...lm_cpu_detect()).reversed() {
        lm_cpu_set_level(level)
        for c in cases {
            let prompt = try XCTUnwrap(c["prompt_ids"] as? [Any]).ints
            let want = try XCTUnwrap(c["token_ids"] as? [Any]).ints
            let margins = try XCTUnwrap(c["margins"] as? [Any]).floats
            XCTAssertGreaterThanOrEqual(want.count, 32)
            let got = try gen.generate(promptIds: prompt, params: SamplingParams(maxTokens: want.count, ignoreEOS: true)).tokenIds
            // The exact path must agree everywhere; report where the reference was close to a tie.
            if let i = zip(got, want).enumerated().first(where: { $1.0 != $1.1 })?.offset {
                XCTFail("\(String(cString: lm_cpu_level_name(level))): \(c["prompt_text"] ?? "?"): first difference at token \(i) (reference margin \(margins[i]))")
            }
            XCTAssertEqual(got.count, want.count)
        }
        }
    }

    func testLoadingMapsWeightsWithoutCopying() throws {
        let path = try Fixtures.smolLM2Path()
        let before = try ProcStatus.read()
        let weights = try LlamaWeights.load(path: path)
        let model = LlamaModel(weights: weights)
        let cache = try KVCache(config: model.config, numBlocks: 4, blockSize: 16)
        var t: [Int32] = []
        XCTAssertTrue(cache.reserve(&t, tokens: 8))
        let rows = (0..<8).map { BatchRow(token: Int32(100 + $0), position: Int32($0), sequence: 0, wantsLogits: $0 == 7) }
        _ = try model.forward(ForwardBatch(rows: rows, tables: [t]), cache: cache)
        let after = try ProcStatus.read()
        let anonGrowth = after.rssAnon - before.rssAnon
        // Every weight page was read by the forward pass: they count as file-backed
        // RSS. Heap growth is only buffers, KV blocks touched and norm vectors.
        XCTAssertLessThan(anonGrowth, 24 << 20, "anonymous RSS grew by \(anonGrowth >> 20) MiB; weights must not be copied")
        XCTAssertGreaterThan(weights.weightBytes, 80 << 20)
        withExtendedLifetime((weights, model, cache)) {}
    }
}

struct ProcStatus {
    var rssAnon = 0, rssFile = 0
    static func read() throws -> ProcStatus {
        let s = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        var out = ProcStatus()
        for line in s.split(separator: "\n") {
            let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard parts.count >= 2, let kb = Int(parts[1]) else { continue }
            if parts[0] == "RssAnon:" { out.rssAnon = kb * 1024 }
            if parts[0] == "RssFile:" { out.rssFile = kb * 1024 }
        }
        return out
    }
}

/// A GGUF mixing IQ4_XS (rows of 256 values) and IQ4_NL (the rest), as
/// llama.cpp's IQ4_XS and small-model k-quant files do, against transformers
/// reading the same file (Fixtures/tiny/iq4, make_fixtures.py --only iq4).
final class IQ4ModelTests: XCTestCase {
    func testMixedIQ4FileMatchesTransformers() throws {
        let ref = try Fixtures.json("tiny/iq4/reference.json")
        let prompts = try XCTUnwrap(ref["prompts"] as? [[Any]]).map(\.ints)
        let logits = try XCTUnwrap(ref["logits"] as? [[[Any]]])
        let greedy = try XCTUnwrap(ref["greedy"] as? [[Any]]).map(\.ints)
        let types = try XCTUnwrap(ref["tensor_types"] as? [String: String])
        let model = try Fixtures.model(Fixtures.url("tiny/iq4/tiny-iq4.gguf").path)
        XCTAssertEqual(model.config.intermediateSize, 256)
        let file = try GGUFFile(path: Fixtures.url("tiny/iq4/tiny-iq4.gguf").path)
        for (name, want) in types { XCTAssertEqual(file.tensors[name]?.dtype.name, want, name) }
        XCTAssertEqual(Set(types.values), ["IQ4_NL", "IQ4_XS"])
        // 1e-4 max-abs as for the other formats: the reference is the file's own dequantization.
        // IQ4 has no GEMV kernel (one was slower than the tiles): both settings run tiles, kept so one added later is covered.
        for (p, ids) in prompts.enumerated() {
            for gemvRows: Int32 in [0, 16] {
                lm_matmul_set_gemv_max_rows(gemvRows)
                XCTAssertLessThan(maxAbsDiff(try prefillLogits(model, ids), logits[p].flatMap(\.floats)), 1e-4, "prompt \(p)")
            }
        }
        lm_matmul_set_gemv_max_rows(-1)
        let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 1 << 20)
        for (p, ids) in prompts.enumerated() {
            let params = SamplingParams(maxTokens: greedy[p].count, ignoreEOS: true)
            XCTAssertEqual(try gen.generate(promptIds: ids, params: params).tokenIds, greedy[p], "prompt \(p)")
        }
    }
}
