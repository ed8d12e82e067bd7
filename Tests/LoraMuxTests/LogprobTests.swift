import XCTest
@testable import LoraMux

/// Logprobs and logit adjustments (penalties, bias) against transformers on
/// the tiny random Llama (Tests/Fixtures/make_sampling_fixtures.py).
final class LogprobTests: XCTestCase {
    /// Our logits differ from torch's by up to ~1e-4 (REFERENCE-NOTES); a
    /// log-softmax adds at most the same again.
    let tolerance: Float = 2e-4

    func tiny() throws -> LlamaModel { try Fixtures.model(Fixtures.url("tiny/hf").path) }

    struct Sequence {
        var promptLen: Int
        var ids: [Int32]
        var logSoftmax: [[Float]]
    }

    func sequences() throws -> [Sequence] {
        let ref = try Fixtures.json("tiny/sampling_reference.json")
        return try XCTUnwrap(ref["sequences"] as? [[String: Any]]).map { s in
            Sequence(promptLen: try XCTUnwrap(s["prompt_len"] as? Int), ids: try XCTUnwrap(s["ids"] as? [Any]).ints,
                     logSoftmax: try XCTUnwrap(s["log_softmax"] as? [[Any]]).map(\.floats))
        }
    }

    /// One entry against the reference row that scored it: the token's
    /// logprob, and alternatives that are a true top-k, most likely first.
    func check(_ lp: TokenLogprob, token: Int32, row: [Float], k: Int, _ what: String) {
        XCTAssertEqual(lp.token, token, what)
        XCTAssertEqual(lp.logprob, row[Int(token)], accuracy: tolerance, what)
        XCTAssertEqual(lp.top.count, k, what)
        let kth = row.sorted(by: >)[k - 1]
        for (i, t) in lp.top.enumerated() {
            XCTAssertEqual(t.logprob, row[Int(t.token)], accuracy: tolerance, "\(what) alternative \(i)")
            XCTAssertGreaterThanOrEqual(t.logprob, kth - tolerance, "\(what) alternative \(i) is not in the top \(k)")
            if i > 0 { XCTAssertGreaterThanOrEqual(lp.top[i - 1].logprob, t.logprob, "\(what) order") }
        }
        XCTAssertEqual(Set(lp.top.map(\.token)).count, k, "\(what) distinct alternatives")
    }

    /// All three prompts in one engine, prefilled in chunks of 5 rows next to
    /// each other's decode rows: generated tokens' and prompt tokens' logprobs
    /// equal transformers' log-softmax at the same positions.
    func testLogprobsOfPromptAndGeneratedTokensMatchTransformers() async throws {
        let model = try tiny()
        let seqs = try sequences()
        let engine = try Engine(model: model, tokenizer: nil, config: EngineConfig(maxRunning: 4, stepTokenBudget: 5, kvCacheBytes: 4 << 20))
        defer { engine.shutdown() }
        let k = 5
        var handles: [EngineHandle] = []
        for s in seqs {
            let params = SamplingParams(maxTokens: s.ids.count - s.promptLen, ignoreEOS: true, logprobs: k, promptLogprobs: k)
            handles.append(try engine.submit(CompletionRequest(promptIds: Array(s.ids[..<s.promptLen]), params: params)))
        }
        for (p, (s, h)) in zip(seqs, handles).enumerated() {
            var tokens: [Int32] = [], logprobs: [TokenLogprob] = []
            var prompt: [TokenLogprob]?
            var first = true
            for try await e in h.events {
                if let pl = e.promptLogprobs { XCTAssertTrue(first, "prompt logprobs come with the first event"); prompt = pl }
                first = false
                if let t = e.tokenId { tokens.append(t); logprobs.append(try XCTUnwrap(e.logprob, "prompt \(p): a token without its logprob")) }
            }
            XCTAssertEqual(tokens, Array(s.ids[s.promptLen...]), "prompt \(p) greedy tokens")
            for (i, lp) in logprobs.enumerated() {
                let pos = s.promptLen - 1 + i
                check(lp, token: s.ids[pos + 1], row: s.logSoftmax[pos], k: k, "prompt \(p) generated token \(i)")
            }
            let pl = try XCTUnwrap(prompt, "prompt \(p): no prompt logprobs")
            XCTAssertEqual(pl.count, s.promptLen - 1, "prompt \(p): one entry per prompt token after the first")
            for (j, lp) in pl.enumerated() {
                check(lp, token: s.ids[j + 1], row: s.logSoftmax[j], k: k, "prompt \(p) prompt token \(j + 1)")
            }
        }
        engine.shutdown()  // the loop publishes its metrics before it stops
        XCTAssertEqual(engine.metrics.kvBlocksUsed, 0)
    }

    /// Sequences preempted mid-prefill or mid-decode recompute their positions;
    /// each prompt token is still scored once, and every logprob equals the
    /// same request's when it runs with room to spare.
    func testLogprobsSurvivePreemption() async throws {
        let model = try tiny()
        let perBlock = KVCache.bytesPerBlock(config: model.config, blockSize: 4)
        let params = SamplingParams(maxTokens: 50, ignoreEOS: true, logprobs: 2, promptLogprobs: 2)
        let prompts: [[Int32]] = (0..<6).map { i in (0..<10).map { Int32(($0 * 7 + i * 13) % 256) } }
        func run(_ config: EngineConfig) async throws -> (results: [(prompt: [TokenLogprob], tokens: [TokenLogprob])], preemptions: Int) {
            let engine = try Engine(model: model, tokenizer: nil, config: config)
            defer { engine.shutdown() }
            let handles = try prompts.map { try engine.submit(CompletionRequest(promptIds: $0, params: params)) }
            var out: [(prompt: [TokenLogprob], tokens: [TokenLogprob])] = []
            for h in handles {
                var prompt: [TokenLogprob] = [], tokens: [TokenLogprob] = []
                for try await e in h.events {
                    if let pl = e.promptLogprobs { prompt += pl }
                    if let lp = e.logprob { tokens.append(lp) }
                }
                out.append((prompt, tokens))
            }
            engine.shutdown()  // the loop publishes its metrics before it stops
            XCTAssertEqual(engine.metrics.kvBlocksUsed, 0)
            return (out, engine.metrics.preemptions)
        }
        let tight = try await run(EngineConfig(maxRunning: 6, stepTokenBudget: 8, kvCacheBytes: 24 * perBlock, blockSize: 4))
        let roomy = try await run(EngineConfig(maxRunning: 1, stepTokenBudget: 64, kvCacheBytes: 4 << 20, blockSize: 4))
        XCTAssertGreaterThan(tight.preemptions, 0, "the cache was too small to hold everyone")
        XCTAssertEqual(roomy.preemptions, 0)
        // Rows computed in other chunks and batches agree to 1e-5 in logits (DESIGN's invariant), not bit for bit.
        func same(_ a: [TokenLogprob], _ b: [TokenLogprob], _ what: String) {
            guard a.count == b.count else { return XCTFail("\(what): \(a.count) entries against \(b.count)") }
            for (x, y) in zip(a, b) {
                XCTAssertEqual(x.token, y.token, what)
                XCTAssertEqual(x.logprob, y.logprob, accuracy: 1e-5, what)
                XCTAssertEqual(x.top.map(\.token), y.top.map(\.token), what)
                for (u, v) in zip(x.top, y.top) { XCTAssertEqual(u.logprob, v.logprob, accuracy: 1e-5, what) }
            }
        }
        for i in prompts.indices {
            XCTAssertEqual(tight.results[i].prompt.count, prompts[i].count - 1, "request \(i): each prompt token scored once")
            same(tight.results[i].prompt, roomy.results[i].prompt, "request \(i) prompt logprobs")
            XCTAssertEqual(tight.results[i].tokens.count, 50)
            same(tight.results[i].tokens, roomy.results[i].tokens, "request \(i) token logprobs")
        }
    }

    /// Logprobs are of the raw distribution: a temperature, a penalty or a
    /// bias changes what is sampled, not the logprob reported for it.
    func testLogprobsIgnoreTemperatureAndBias() throws {
        let s = try sequences()[1]
        let row = s.logSoftmax[s.promptLen - 1]
        let logits = try prefillLogits(try tiny(), Array(s.ids[..<s.promptLen]))
        let V = try tiny().config.vocabSize
        let last = Array(logits[(s.promptLen - 1) * V..<(s.promptLen * V)])
        // A bias of +100 forces the model's least likely token; its reported logprob is the model's own.
        let least = Int32(row.indices.min { row[$0] < row[$1] }!)
        var sampler = Sampler(params: SamplingParams(temperature: 0.7, seed: 1, logitBias: [least: 100]))
        let t = last.withUnsafeBufferPointer { sampler.sample($0) }
        XCTAssertEqual(t, least)
        let lp = last.withUnsafeBufferPointer { TokenLogprob.from($0, token: t, top: 2) }
        XCTAssertEqual(lp.logprob, row[Int(least)], accuracy: tolerance)
        XCTAssertEqual(lp.top[0].logprob, row.max()!, accuracy: tolerance)
    }

    /// Greedy tokens under repetition / frequency / presence penalties and
    /// logit_bias equal the reference's; all cases run in one batch, each
    /// with its own settings.
    func testPenaltiesAndBiasMatchReferenceInOneBatch() async throws {
        let model = try tiny()
        let ref = try Fixtures.json("tiny/sampling_reference.json")
        let cases = try XCTUnwrap(ref["penalties"] as? [[String: Any]])
        XCTAssertGreaterThanOrEqual(cases.filter { $0["differs_from_greedy"] as? Bool == true }.count, 10,
                                    "the cases must change the greedy tokens to test anything")
        XCTAssertGreaterThanOrEqual(cases.filter { $0["prompt_tokens_matter"] as? Bool == true }.count, 2,
                                    "some repetition cases must depend on the prompt's tokens")
        let engine = try Engine(model: model, tokenizer: nil, config: EngineConfig(maxRunning: 16, stepTokenBudget: 64, kvCacheBytes: 8 << 20))
        defer { engine.shutdown() }
        func params(_ c: [String: Any]) throws -> SamplingParams {
            let p = try XCTUnwrap(c["params"] as? [String: Any])
            func f(_ k: String, _ d: Float) -> Float { (p[k] as? NSNumber)?.floatValue ?? d }
            var bias: [Int32: Float] = [:]
            for (k, v) in (p["logit_bias"] as? [String: Any]) ?? [:] { bias[try XCTUnwrap(Int32(k))] = try XCTUnwrap(v as? NSNumber).floatValue }
            return SamplingParams(maxTokens: try XCTUnwrap(c["tokens"] as? [Any]).count, ignoreEOS: true,
                                  frequencyPenalty: f("frequency_penalty", 0), presencePenalty: f("presence_penalty", 0),
                                  repetitionPenalty: f("repetition_penalty", 1), logitBias: bias)
        }
        var handles: [EngineHandle] = []
        for c in cases {
            handles.append(try engine.submit(CompletionRequest(promptIds: try XCTUnwrap(c["prompt_ids"] as? [Any]).ints, params: try params(c))))
        }
        for (c, h) in zip(cases, handles) {
            let got = try await collect(h).tokens
            XCTAssertEqual(got, try XCTUnwrap(c["tokens"] as? [Any]).ints, "\(c["params"]!) prompt \(c["prompt_ids"]!)")
        }
        // The one-sequence path (loramux generate) applies them the same way.
        let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 4 << 20)
        for c in cases {
            let solo = try gen.generate(promptIds: try XCTUnwrap(c["prompt_ids"] as? [Any]).ints, params: try params(c)).tokenIds
            XCTAssertEqual(solo, try XCTUnwrap(c["tokens"] as? [Any]).ints, "alone: \(c["params"]!) prompt \(c["prompt_ids"]!)")
        }
    }

    func testOutOfRangeSettingsAreRefused() throws {
        let bad: [(SamplingParams, String)] = [
            (SamplingParams(frequencyPenalty: 2.5), "frequency_penalty"),
            (SamplingParams(presencePenalty: -3), "presence_penalty"),
            (SamplingParams(repetitionPenalty: 0), "repetition_penalty"),
            (SamplingParams(repetitionPenalty: .nan), "repetition_penalty"),
            (SamplingParams(logitBias: [1: 101]), "logit_bias"),
            (SamplingParams(logitBias: [-1: 1]), "logit_bias"),
            (SamplingParams(logprobs: 21), "logprobs"),
            (SamplingParams(promptLogprobs: -1), "logprobs"),
        ]
        for (p, word) in bad {
            XCTAssertThrowsError(try p.validate(vocabSize: 256), word) { e in
                XCTAssertTrue("\(e)".contains(word), "\(e) should name \(word)")
            }
        }
        XCTAssertThrowsError(try SamplingParams(logitBias: [256: 1]).validate(vocabSize: 256))
        XCTAssertNoThrow(try SamplingParams(frequencyPenalty: 2, presencePenalty: -2, repetitionPenalty: 1.5,
                                            logitBias: [255: -100], logprobs: 20, promptLogprobs: 0).validate(vocabSize: 256))
    }
}
