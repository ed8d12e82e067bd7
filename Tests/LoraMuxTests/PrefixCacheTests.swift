import XCTest
@testable import LoraMux

/// Prefix caching: the block bookkeeping on its own, then the engine against
/// transformers' tokens with requests that share prompts and system prompts.
final class PrefixCacheTests: XCTestCase {
    func tinyCache(blocks: Int) throws -> KVCache {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        return try KVCache(config: model.config, numBlocks: blocks, blockSize: 4)
    }

    /// A sequence of `tokens` with `computed` positions written and registered.
    func computed(_ cache: KVCache, _ tokens: [Int32], _ computed: Int, salt: UInt64 = 0) -> (table: [Int32], chain: [UInt64]) {
        var table: [Int32] = []
        XCTAssertTrue(cache.reserve(&table, tokens: tokens.count + 1))
        var chain: [UInt64] = []
        cache.register(table, tokens: tokens, computed: computed, salt: salt, chain: &chain)
        return (table, chain)
    }

    func testLookupMatchesWholeBlocksOfTheSameTokensAndSaltOnly() throws {
        let cache = try tinyCache(blocks: 8)
        let tokens: [Int32] = Array(0..<10)
        let a = computed(cache, tokens, 10)
        XCTAssertEqual(a.chain.count, 2, "positions 0..<8 fill two blocks of 4; 8 and 9 do not fill a third")
        XCTAssertEqual(cache.cachedBlocks, 2)
        XCTAssertEqual(cache.lookup(tokens, limit: 9, salt: 0).blocks, Array(a.table.prefix(2)))
        XCTAssertEqual(cache.lookup(tokens, limit: 9, salt: 0).ids, a.chain)
        XCTAssertEqual(cache.lookup(tokens, limit: 7, salt: 0).blocks.count, 1, "a block past the limit is not used")
        XCTAssertEqual(cache.lookup(tokens + [99, 98], limit: 11, salt: 0).blocks.count, 2, "a longer sequence with the same start")
        XCTAssertEqual(cache.lookup(tokens, limit: 9, salt: 7).blocks.count, 0, "another adapter's K/V is never shared")
        var late = tokens; late[5] = 200
        XCTAssertEqual(cache.lookup(late, limit: 9, salt: 0).blocks, [a.table[0]], "a change in block 1 keeps block 0")
        var early = tokens; early[0] = 200
        XCTAssertEqual(cache.lookup(early, limit: 9, salt: 0).blocks.count, 0, "a change in block 0 changes every later block's key")
        // Block 1's tokens after a different block 0 must not match block 1.
        XCTAssertEqual(cache.lookup([50, 51, 52, 53] + Array(tokens[4..<8]), limit: 8, salt: 0).blocks.count, 0)
        var t = a.table
        cache.release(&t)
        XCTAssertEqual(cache.usedBlocks, 0)
        XCTAssertEqual(cache.freeBlocks, 8, "idle cached blocks count as free")
        XCTAssertEqual(cache.cachedBlocks, 2, "and stay cached")
    }

    func testIdleBlocksAreEvictedLastBlockFirstAndHeldBlocksNever() throws {
        let cache = try tinyCache(blocks: 8)
        let tokens: [Int32] = Array(0..<12)
        var a = computed(cache, tokens, 12)          // 4 blocks for 13 positions, 3 full and registered
        XCTAssertEqual(a.chain.count, 3)
        cache.release(&a.table)
        // Four never-used blocks and the one unregistered block go first.
        var t: [Int32] = []
        XCTAssertTrue(cache.reserve(&t, tokens: 5 * 4))
        XCTAssertEqual(cache.lookup(tokens, limit: 12, salt: 0).blocks.count, 3, "nothing cached was evicted while free blocks remained")
        XCTAssertTrue(cache.reserve(&t, tokens: 6 * 4))
        XCTAssertEqual(cache.lookup(tokens, limit: 12, salt: 0).blocks.count, 2, "the chain's last block went first")
        XCTAssertEqual(cache.cachedBlocks, 2)
        // A sequence takes the two cached blocks; held, they are not free and survive pressure.
        let hit = cache.lookup(tokens, limit: 12, salt: 0)
        XCTAssertEqual(hit.idle, 2)
        var b: [Int32] = []
        cache.acquire(hit, into: &b)
        XCTAssertEqual(cache.freeBlocks, 0)
        XCTAssertFalse(cache.reserve(&t, tokens: 7 * 4), "held blocks are never taken")
        XCTAssertEqual(t.count, 6, "a failed reserve changes nothing")
        XCTAssertEqual(cache.lookup(tokens, limit: 12, salt: 0).blocks, b)
        // A second holder; the first one's release leaves them held.
        let hit2 = cache.lookup(tokens, limit: 12, salt: 0)
        XCTAssertEqual(hit2.idle, 0)
        var c: [Int32] = []
        cache.acquire(hit2, into: &c)
        cache.release(&b)
        XCTAssertEqual(cache.freeBlocks, 0)
        cache.release(&c)
        XCTAssertEqual(cache.freeBlocks, 2)
        cache.release(&t)
        XCTAssertEqual(cache.freeBlocks, 8)
        XCTAssertEqual(cache.usedBlocks, 0)
    }

    func testTheSamePrefixComputedTwiceIsCachedOnce() throws {
        let cache = try tinyCache(blocks: 8)
        let tokens: [Int32] = Array(0..<9)
        var a = computed(cache, tokens, 9)
        var b = computed(cache, tokens, 9)
        XCTAssertEqual(b.chain, a.chain, "the second sequence's chain goes on from the cached blocks")
        XCTAssertEqual(cache.cachedBlocks, 2)
        // The duplicate's blocks were private: releasing them frees them outright.
        cache.release(&b.table)
        XCTAssertEqual(cache.freeBlocks, 8 - 3)
        cache.release(&a.table)
        XCTAssertEqual(cache.freeBlocks, 8)
        XCTAssertEqual(cache.cachedBlocks, 2)
    }

    // MARK: - the engine

    /// The five golden chat prompts share SmolLM2's system prompt. Each is run
    /// first with the base model and each real adapter; then all fifteen at
    /// once hit the cache (a whole repeated prompt, or the shared system
    /// prompt) and must still give transformers' and PEFT's greedy tokens.
    func testCachedPrefixesGiveTheReferenceTokensPerAdapter() async throws {
        let model = try Fixtures.model(try Fixtures.smolLM2Path())
        let golden = try Fixtures.json("smollm2/golden.json")
        let adapterGolden = try XCTUnwrap(try Fixtures.json("smollm2/adapters/golden.json")["adapters"] as? [String: [String: Any]])
        let chats = try XCTUnwrap(golden["chat"] as? [[String: Any]])
        let prompts = try chats.map { try XCTUnwrap($0["prompt_ids"] as? [Any]).ints }
        let names = ["sql-ish-qv", "all-r4"]
        var want: [[[Int32]]] = [try chats.map { try XCTUnwrap($0["token_ids"] as? [Any]).ints }]
        for n in names {
            let cs = try XCTUnwrap(adapterGolden[n]?["chat"] as? [[String: Any]])
            want.append(try cs.map { try XCTUnwrap($0["token_ids"] as? [Any]).ints })
        }
        let adapters = AdapterCache(budgetBytes: 1 << 30) { name in
            try AdapterLoader.load(path: Fixtures.url("smollm2/adapters/\(name)").path, name: name, base: model.weights)
        }
        let n = try XCTUnwrap(want.map { $0[0].count }.min())
        let params = SamplingParams(maxTokens: n, ignoreEOS: true)
        let engine = try Engine(model: model, tokenizer: nil, config: EngineConfig(maxRunning: 16, stepTokenBudget: 64, blockSize: 4))
        defer { engine.shutdown() }
        func submit(_ a: Int, _ p: Int) async throws -> EngineHandle {
            let lease = a == 0 ? nil : try await adapters.acquire(names[a - 1])
            return try engine.submit(CompletionRequest(promptIds: prompts[p], params: params, adapter: lease))
        }
        for a in 0..<3 {
            let first = try await collect(try submit(a, 0))
            XCTAssertEqual(first.tokens, Array(want[a][0].prefix(n)), "adapter \(a), prompt 0, computed")
            XCTAssertEqual(first.usage?.cachedTokens, 0, "adapter \(a): nothing cached under this adapter yet")
        }
        var handles: [(Int, Int, EngineHandle)] = []
        for a in 0..<3 { for p in prompts.indices { handles.append((a, p, try await submit(a, p))) } }
        // Tokens each prompt shares with prompt 0 (the system prompt, or all of
        // it for prompt 0; prompt 2 has its own system prompt). No two prompts
        // share more than that, whichever order they run in.
        let shared = prompts.map { p in zip(prompts[0], p).prefix { $0 == $1 }.count }
        XCTAssertEqual(shared[1], 24, "the default system prompt")
        for (a, p, h) in handles {
            let got = try await collect(h)
            XCTAssertEqual(got.tokens, Array(want[a][p].prefix(n)), "adapter \(a), prompt \(p), from the cache")
            // Whole blocks of the shared part; prompt 0 all but the block with its last token.
            XCTAssertEqual(got.usage?.cachedTokens, min(shared[p], prompts[p].count - 1) / 4 * 4, "adapter \(a), prompt \(p)")
        }
        try await waitUntil { engine.metrics.kvBlocksUsed == 0 && adapters.totalPins == 0 }
        let m = engine.metrics
        XCTAssertGreaterThan(m.kvBlocksCached, 0)
        XCTAssertEqual(m.cachedPromptTokens, 3 * zip(shared, prompts).map { min($0, $1.count - 1) / 4 * 4 }.reduce(0, +))
    }

    func testAReloadedAdapterDoesNotSeeTheOldInstancesBlocks() async throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        func loader() -> AdapterCache {
            AdapterCache(budgetBytes: 1 << 30) { name in
                try PEFTAdapter(directory: Fixtures.url("tiny/adapters/qv").path).load(name: name, base: model.weights)
            }
        }
        let (first, second) = (loader(), loader())
        let engine = try Engine(model: model, tokenizer: nil, config: EngineConfig(blockSize: 4))
        defer { engine.shutdown() }
        // Three whole blocks: the last one holds the last token, which is always computed.
        let prompt: [Int32] = (0..<12).map { Int32($0 * 5 % 256) }
        let params = SamplingParams(maxTokens: 6, ignoreEOS: true)
        func run(_ c: AdapterCache) async throws -> Collected {
            try await collect(try engine.submit(CompletionRequest(promptIds: prompt, params: params, adapter: try await c.acquire("qv"))))
        }
        let a = try await run(first)
        let b = try await run(second)
        let c = try await run(first)
        XCTAssertEqual(a.usage?.cachedTokens, 0)
        XCTAssertEqual(b.usage?.cachedTokens, 0, "same name and file, another instance: recomputed")
        XCTAssertEqual(c.usage?.cachedTokens, 8)
        XCTAssertEqual(a.tokens, b.tokens)
        XCTAssertEqual(a.tokens, c.tokens)
        let lease = try await first.acquire("qv")
        XCTAssertEqual(a.tokens, try Generator(model: model, tokenizer: nil, cacheBytes: 4 << 20)
            .generate(promptIds: prompt, params: params, adapter: lease.adapter).tokenIds)
        lease.release()
    }

    /// A pool that cached blocks fill to the brim still admits every request;
    /// a prompt-logprobs request computes its whole prompt; disabled, nothing is cached.
    func testCachedBlocksNeverStopAdmissionAndLogprobRequestsRecompute() async throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let perBlock = KVCache.bytesPerBlock(config: model.config, blockSize: 4)
        let engine = try Engine(model: model, tokenizer: nil,
                                config: EngineConfig(maxRunning: 4, stepTokenBudget: 32, kvCacheBytes: 20 * perBlock, blockSize: 4))
        defer { engine.shutdown() }
        let params = SamplingParams(maxTokens: 12, ignoreEOS: true)
        let prompts: [[Int32]] = (0..<12).map { i in (0..<14).map { Int32(($0 * 11 + i * 29) % 256) } }
        var got: [[Int32]] = []
        for wave in [prompts, prompts.reversed()] {
            let hs = try wave.map { try engine.submit(CompletionRequest(promptIds: $0, params: params)) }
            for h in hs { got.append(try await collect(h).tokens) }
        }
        let generator = try Generator(model: model, tokenizer: nil, cacheBytes: 4 << 20)
        for (g, p) in zip(got, prompts + prompts.reversed()) { XCTAssertEqual(g, try generator.generate(promptIds: p, params: params).tokenIds) }
        try await waitUntil { engine.metrics.kvBlocksUsed == 0 }
        XCTAssertGreaterThan(engine.metrics.kvBlocksCached, 0)
        XCTAssertLessThanOrEqual(engine.metrics.kvBlocksCached, 20)
        XCTAssertGreaterThan(engine.metrics.cachedPromptTokens, 0, "the last prompts of the first wave are the first of the second")

        var lp = params
        lp.promptLogprobs = 0
        let last = try XCTUnwrap(prompts.first)
        var events: [TokenEvent] = []
        for try await e in try engine.submit(CompletionRequest(promptIds: last, params: lp)).events { events.append(e) }
        XCTAssertEqual(events.first?.promptLogprobs?.count, last.count - 1)
        XCTAssertEqual(events.last?.usage?.cachedTokens, 0)

        let off = try Engine(model: model, tokenizer: nil, config: EngineConfig(blockSize: 4, prefixCaching: false))
        defer { off.shutdown() }
        for _ in 0..<2 {
            let r = try await collect(try off.submit(CompletionRequest(promptIds: last, params: params)))
            XCTAssertEqual(r.usage?.cachedTokens, 0)
            XCTAssertEqual(r.tokens, got[0])
        }
        XCTAssertEqual(off.metrics.kvBlocksCached, 0)
    }
}
