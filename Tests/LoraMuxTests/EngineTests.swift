import XCTest
@testable import LoraMux

struct Collected {
    var tokens: [Int32] = []
    var text = ""
    var finish: FinishReason?
    var usage: Usage?
}

func collect(_ h: EngineHandle) async throws -> Collected {
    var c = Collected()
    for try await e in h.events {
        if let t = e.tokenId { c.tokens.append(t) }
        c.text += e.text
        if let f = e.finishReason { c.finish = f; c.usage = e.usage }
    }
    return c
}

final class EngineTests: XCTestCase {
    func tiny() throws -> LlamaModel { try Fixtures.model(Fixtures.url("tiny/hf").path) }

    func alone(_ model: LlamaModel, _ prompt: [Int32], _ params: SamplingParams, _ adapter: LoraAdapter? = nil) throws -> [Int32] {
        try Generator(model: model, tokenizer: nil, cacheBytes: 4 << 20).generate(promptIds: prompt, params: params, adapter: adapter).tokenIds
    }

    /// The headline invariant: 16 requests, 16 different adapters, one batch;
    /// each request's greedy tokens equal its tokens when run alone.
    func testSixteenAdaptersInOneBatchMatchRunningAlone() async throws {
        let model = try Fixtures.model(try Fixtures.smolLM2Path())
        let base = model.weights
        let cache = AdapterCache(budgetBytes: 1 << 30) { name in
            let i = Int(name.dropFirst(1))!
            // Two real PEFT adapters and fourteen synthetic ones, mixed ranks and targets.
            switch i {
            case 0: return try AdapterLoader.load(path: Fixtures.url("smollm2/adapters/sql-ish-qv").path, name: name, base: base)
            case 1: return try AdapterLoader.load(path: Fixtures.url("smollm2/adapters/all-r4").path, name: name, base: base)
            default: return try SyntheticAdapter.make(name: name, base: base, rank: [4, 8, 16][i % 3], targets: i % 2 == 0 ? .all : .qv,
                                                      seed: UInt64(i), dtype: .f16)
            }
        }
        let golden = try Fixtures.json("smollm2/golden.json")
        let prompts = try XCTUnwrap(golden["chat"] as? [[String: Any]]).map { try XCTUnwrap($0["prompt_ids"] as? [Any]).ints }
        let params = SamplingParams(maxTokens: 24, ignoreEOS: true)
        let engine = try Engine(model: model, tokenizer: nil, config: EngineConfig(maxRunning: 16, stepTokenBudget: 64))
        defer { engine.shutdown() }
        var handles: [EngineHandle] = []
        for i in 0..<16 {
            let lease = try await cache.acquire("a\(i)")
            handles.append(try engine.submit(CompletionRequest(promptIds: prompts[i % prompts.count], params: params, adapter: lease)))
        }
        var batched: [[Int32]] = []
        for h in handles { batched.append(try await collect(h).tokens) }
        XCTAssertGreaterThanOrEqual(engine.metrics.lastBatchRows, 1)
        for i in 0..<16 {
            let lease = try await cache.acquire("a\(i)")
            let solo = try alone(model, prompts[i % prompts.count], params, lease.adapter)
            lease.release()
            XCTAssertEqual(batched[i], solo, "request \(i)")
        }
        // Different adapters really did different things.
        XCTAssertGreaterThan(Set(batched).count, 8)
        XCTAssertEqual(cache.totalPins, 0, "every pin returned")
        XCTAssertEqual(engine.metrics.kvBlocksUsed, 0, "every KV block returned")
    }

    func testChunkedPrefillWhileOthersDecodeMatchesGolden() async throws {
        let model = try Fixtures.model(try Fixtures.smolLM2Path())
        let tok = try BPETokenizer(gguf: XCTUnwrap(model.weights.gguf))
        let golden = try Fixtures.json("smollm2/golden.json")
        let cases = try XCTUnwrap(golden["chat"] as? [[String: Any]])
        // A budget of 8 rows splits every prompt (37+ tokens) over several steps.
        let engine = try Engine(model: model, tokenizer: tok, config: EngineConfig(maxRunning: 8, stepTokenBudget: 8))
        defer { engine.shutdown() }
        var handles: [EngineHandle] = []
        for c in cases {
            handles.append(try engine.submit(CompletionRequest(promptIds: try XCTUnwrap(c["prompt_ids"] as? [Any]).ints,
                                                                params: SamplingParams(maxTokens: 40, ignoreEOS: true))))
        }
        for (h, c) in zip(handles, cases) {
            let got = try await collect(h)
            XCTAssertEqual(got.tokens, try XCTUnwrap(c["token_ids"] as? [Any]).ints)
            XCTAssertEqual(got.finish, .length)
            XCTAssertEqual(got.usage?.completionTokens, 40)
            XCTAssertEqual(got.text, tok.decode(got.tokens))
        }
        XCTAssertGreaterThan(engine.metrics.steps, 40)
    }

    func testEndOfTurnAndStopStringsInTheEngine() async throws {
        let model = try Fixtures.model(try Fixtures.smolLM2Path())
        let tok = try BPETokenizer(gguf: XCTUnwrap(model.weights.gguf))
        let golden = try Fixtures.json("smollm2/golden.json")
        let first = try XCTUnwrap((golden["chat"] as? [[String: Any]])?.first)
        let prompt = try XCTUnwrap(first["prompt_ids"] as? [Any]).ints
        let engine = try Engine(model: model, tokenizer: tok)
        defer { engine.shutdown() }
        let eos = try await collect(try engine.submit(CompletionRequest(promptIds: prompt, params: SamplingParams(maxTokens: 40))))
        XCTAssertEqual(eos.text, "The capital of France is Paris.")
        XCTAssertEqual(eos.finish, .stop)
        let stop = try await collect(try engine.submit(CompletionRequest(promptIds: prompt, params: SamplingParams(maxTokens: 40, stop: ["France"]))))
        XCTAssertEqual(stop.text, "The capital of ")
        XCTAssertEqual(stop.finish, .stop)
    }

    func testSeededSamplingIsPerRequest() async throws {
        let model = try tiny()
        let engine = try Engine(model: model, tokenizer: nil)
        defer { engine.shutdown() }
        let p = SamplingParams(temperature: 1.0, topP: 0.9, seed: 77, maxTokens: 12)
        let a = try engine.submit(CompletionRequest(promptIds: [5, 6, 7], params: p))
        let b = try engine.submit(CompletionRequest(promptIds: [5, 6, 7], params: p))
        let c = try engine.submit(CompletionRequest(promptIds: [5, 6, 7], params: SamplingParams(temperature: 1.0, seed: 78, maxTokens: 12)))
        let (ta, tb, tc) = (try await collect(a).tokens, try await collect(b).tokens, try await collect(c).tokens)
        XCTAssertEqual(ta, tb)
        XCTAssertNotEqual(ta, tc)
        XCTAssertEqual(ta, try alone(model, [5, 6, 7], p))
    }

    /// An adapter whose scale overflows float32 activations (lora_alpha 1e30,
    /// as a broken config can carry; finite, so it loads) turns its rows'
    /// logits to NaN. Its request fails with an error naming the adapter, in
    /// the engine and in the one-request Generator, instead of sampling
    /// garbage (argmax over NaNs is token 0); the request sharing its batch
    /// gets the tokens it gets alone, and nothing stays pinned or allocated.
    func testNonFiniteLogitsFailOnlyTheirRequest() async throws {
        let model = try tiny()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-huge-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try SyntheticAdapter.writePEFT(to: dir.path, base: model.config, rank: 4, alpha: 1e30, targets: .all, seed: 3)
        let adapters = AdapterCache(budgetBytes: 1 << 30) { name in
            name == "huge" ? try AdapterLoader.load(path: dir.path, name: name, base: model.weights)
                           : try SyntheticAdapter.make(name: name, base: model.weights, rank: 4, targets: .all, seed: 4)
        }
        let engine = try Engine(model: model, tokenizer: nil)
        defer { engine.shutdown() }
        let params = SamplingParams(maxTokens: 10, ignoreEOS: true)
        let prompt: [Int32] = [9, 8, 7, 6]
        let bad = try engine.submit(CompletionRequest(promptIds: prompt, params: params, adapter: try await adapters.acquire("huge")))
        let good = try engine.submit(CompletionRequest(promptIds: prompt, params: params, adapter: try await adapters.acquire("fine")))
        do {
            let got = try await collect(bad)
            XCTFail("the overflowing adapter's request finished with \(got.tokens)")
        } catch let e as EngineError {
            XCTAssertEqual(e, .nonFiniteLogits(adapter: "huge", position: prompt.count))
            XCTAssertTrue(e.localizedDescription.contains("adapter 'huge'"), e.localizedDescription)
        }
        let goodTokens = try await collect(good).tokens
        XCTAssertEqual(goodTokens.count, 10)
        let fine = try await adapters.acquire("fine"), huge = try await adapters.acquire("huge")
        XCTAssertEqual(goodTokens, try alone(model, prompt, params, fine.adapter))
        XCTAssertThrowsError(try alone(model, prompt, params, huge.adapter)) {
            XCTAssertEqual($0 as? EngineError, .nonFiniteLogits(adapter: "huge", position: prompt.count))
        }
        fine.release(); huge.release()
        // The engine goes on serving.
        let after = try await collect(try engine.submit(CompletionRequest(promptIds: prompt, params: params))).tokens
        XCTAssertEqual(after, try alone(model, prompt, params))
        try await waitUntil { engine.metrics.kvBlocksUsed == 0 && adapters.totalPins == 0 }
    }

    func testCancellationFreesBlocksAndPins() async throws {
        let model = try tiny()
        let adapters = AdapterCache(budgetBytes: 1 << 30) { name in
            try PEFTAdapter(directory: Fixtures.url("tiny/adapters/qv").path).load(name: name, base: model.weights)
        }
        let engine = try Engine(model: model, tokenizer: nil)
        defer { engine.shutdown() }
        let lease = try await adapters.acquire("qv")
        let h = try engine.submit(CompletionRequest(promptIds: [1, 2, 3], params: SamplingParams(maxTokens: 200, ignoreEOS: true),
                                                    adapter: lease))
        var n = 0
        for try await _ in h.events {
            n += 1
            if n == 5 { engine.cancel(h.id) }
        }
        XCTAssertLessThan(n, 200)
        try await waitUntil { engine.metrics.kvBlocksUsed == 0 && adapters.totalPins == 0 }
        XCTAssertEqual(engine.metrics.cancelledRequests, 1)
        // Dropping the stream (a client that went away) cancels too.
        let task = Task {
            let lease2 = try await adapters.acquire("qv")
            let h2 = try engine.submit(CompletionRequest(promptIds: [1, 2], params: SamplingParams(maxTokens: 250, ignoreEOS: true),
                                                         adapter: lease2))
            for try await _ in h2.events { break }
        }
        _ = try await task.value
        try await waitUntil { engine.metrics.kvBlocksUsed == 0 && adapters.totalPins == 0 }
    }

    func testPreemptionUnderASmallCacheKeepsResultsExact() async throws {
        let model = try tiny()
        // 24 blocks of 4 positions: far less than 6 requests x 60 positions at once.
        let perBlock = KVCache.bytesPerBlock(config: model.config, blockSize: 4)
        let engine = try Engine(model: model, tokenizer: nil,
                                config: EngineConfig(maxRunning: 6, stepTokenBudget: 32, kvCacheBytes: 24 * perBlock, blockSize: 4))
        defer { engine.shutdown() }
        let params = SamplingParams(maxTokens: 50, ignoreEOS: true)
        let prompts: [[Int32]] = (0..<6).map { i in (0..<10).map { Int32(($0 * 7 + i * 13) % 256) } }
        let handles = try prompts.map { try engine.submit(CompletionRequest(promptIds: $0, params: params)) }
        var got: [[Int32]] = []
        for h in handles { got.append(try await collect(h).tokens) }
        for (g, p) in zip(got, prompts) { XCTAssertEqual(g, try alone(model, p, params)) }
        XCTAssertGreaterThan(engine.metrics.preemptions, 0, "the cache was too small to hold everyone")
        XCTAssertEqual(engine.metrics.kvBlocksUsed, 0)
    }

    func testRequestsThatCanNeverRunAreRefusedAtOnce() throws {
        let model = try tiny()
        let perBlock = KVCache.bytesPerBlock(config: model.config, blockSize: 4)
        let engine = try Engine(model: model, tokenizer: nil,
                                config: EngineConfig(kvCacheBytes: 10 * perBlock, blockSize: 4, maxQueued: 2))
        defer { engine.shutdown() }
        XCTAssertThrowsError(try engine.submit(CompletionRequest(promptIds: Array(repeating: 1, count: 30), params: SamplingParams(maxTokens: 20)))) {
            XCTAssertEqual($0 as? EngineError, .promptTooLong(tokens: 50, limit: 40))
        }
        XCTAssertThrowsError(try engine.submit(CompletionRequest(promptIds: [], params: SamplingParams())))
        XCTAssertThrowsError(try engine.submit(CompletionRequest(promptIds: [300], params: SamplingParams())))
        XCTAssertThrowsError(try engine.submit(CompletionRequest(promptIds: [1], params: SamplingParams(topP: 2))))
    }

    func testShutdownEndsPendingStreams() async throws {
        let model = try tiny()
        let engine = try Engine(model: model, tokenizer: nil, config: EngineConfig(maxRunning: 1))
        let hs = try (0..<3).map { _ in try engine.submit(CompletionRequest(promptIds: [1], params: SamplingParams(maxTokens: 250, ignoreEOS: true))) }
        engine.shutdown()
        for h in hs {
            do { _ = try await collect(h) } catch { XCTAssertEqual(error as? EngineError, .shuttingDown) }
        }
        XCTAssertThrowsError(try engine.submit(CompletionRequest(promptIds: [1], params: SamplingParams())))
    }
}

func waitUntil(timeout: Double = 10, _ cond: () -> Bool) async throws {
    let deadline = Date().addingTimeInterval(timeout)
    while !cond() {
        guard Date() < deadline else { XCTFail("condition not reached in \(timeout)s"); return }
        try await Task.sleep(nanoseconds: 5_000_000)
    }
}
