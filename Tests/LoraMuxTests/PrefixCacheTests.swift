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

    /// SmolLM2's golden chat prompts and transformers' (and PEFT's) greedy
    /// tokens for them: near-ties on the tiny random model flip with the
    /// batch's composition, which the engine's timing decides.
    func golden() throws -> (model: LlamaModel, prompts: [[Int32]], base: [[Int32]], sql: [[Int32]]) {
        let model = try Fixtures.model(try Fixtures.smolLM2Path())
        let chats = try XCTUnwrap(try Fixtures.json("smollm2/golden.json")["chat"] as? [[String: Any]])
        let adapterChats = try XCTUnwrap((try Fixtures.json("smollm2/adapters/golden.json")["adapters"] as? [String: [String: Any]])?["sql-ish-qv"]?["chat"] as? [[String: Any]])
        return (model, try chats.map { try XCTUnwrap($0["prompt_ids"] as? [Any]).ints },
                try chats.map { try XCTUnwrap($0["token_ids"] as? [Any]).ints },
                try adapterChats.map { try XCTUnwrap($0["token_ids"] as? [Any]).ints })
    }

    /// Blocks are keyed by what an adapter was built from: another load of
    /// the same unchanged files (evicted and loaded again, or a second cache)
    /// finds them; a copy elsewhere, or the same path after a write, does not.
    func testAReloadedAdapterSharesBlocksOnlyWhileItsFilesAreUnchanged() async throws {
        let g = try golden()
        let fm = FileManager.default
        let copy = fm.temporaryDirectory.appendingPathComponent("loramux-salt-\(UUID().uuidString)")
        try fm.copyItem(at: Fixtures.url("smollm2/adapters/sql-ish-qv"), to: copy)
        defer { try? fm.removeItem(at: copy) }
        func loader(_ dir: URL) -> AdapterCache {
            AdapterCache(budgetBytes: 1 << 30) { name in try AdapterLoader.load(path: dir.path, name: name, base: g.model.weights) }
        }
        let fixture = Fixtures.url("smollm2/adapters/sql-ish-qv")
        let (first, second, copied) = (loader(fixture), loader(fixture), loader(copy))
        let engine = try Engine(model: g.model, tokenizer: nil, config: EngineConfig(blockSize: 4))
        defer { engine.shutdown() }
        let prompt = g.prompts[1]
        let params = SamplingParams(maxTokens: 8, ignoreEOS: true)
        func run(_ c: AdapterCache) async throws -> Collected {
            try await collect(try engine.submit(CompletionRequest(promptIds: prompt, params: params, adapter: try await c.acquire("sql-ish-qv"))))
        }
        // Every whole block but the one holding the last prompt token (a
        // multiple of 4 long prompt would keep its last block out too).
        let whole = (prompt.count - 1) / 4 * 4
        let a = try await run(first)
        XCTAssertEqual(a.usage?.cachedTokens, 0)
        let b = try await run(second)
        XCTAssertEqual(b.usage?.cachedTokens, whole, "another instance of the same files shares the blocks")
        let (l1, l2) = (try await first.acquire("sql-ish-qv"), try await second.acquire("sql-ish-qv"))
        XCTAssertNotEqual(l1.adapter.instanceId, l2.adapter.instanceId)
        XCTAssertEqual(l1.adapter.prefixSalt, l2.adapter.prefixSalt)
        l1.release(); l2.release()
        let c = try await run(copied)
        XCTAssertEqual(c.usage?.cachedTokens, 0, "the same bytes in other files: not known to be the same")
        // Evicted, then the file rewritten with the same bytes: its times change, so it is another version.
        copied.invalidate("sql-ish-qv")
        let weights = copy.appendingPathComponent("adapter_model.safetensors")
        try Data(contentsOf: weights).write(to: weights)
        let d = try await run(copied)
        XCTAssertEqual(d.usage?.cachedTokens, 0, "a written file is recomputed")
        copied.invalidate("sql-ish-qv")
        let e = try await run(copied)
        XCTAssertEqual(e.usage?.cachedTokens, whole, "and loaded again unchanged, found")
        XCTAssertEqual(copied.statistics.loads, 3)
        for r in [a, b, c, d, e] { XCTAssertEqual(r.tokens, Array(g.sql[1].prefix(8))) }
    }

    /// A pool that cached blocks fill to the brim still admits every request;
    /// a prompt-logprobs request computes its whole prompt; disabled, nothing is cached.
    func testCachedBlocksNeverStopAdmissionAndLogprobRequestsRecompute() async throws {
        let g = try golden()
        let perBlock = KVCache.bytesPerBlock(config: g.model.config, blockSize: 4)
        // 30 blocks of 4: two sequences of up to 55 positions at once, and
        // far fewer than the five prompts' blocks.
        let engine = try Engine(model: g.model, tokenizer: nil,
                                config: EngineConfig(maxRunning: 2, stepTokenBudget: 32, kvCacheBytes: 30 * perBlock, blockSize: 4))
        defer { engine.shutdown() }
        let n = 12
        let params = SamplingParams(maxTokens: n, ignoreEOS: true)
        let order = Array(g.prompts.indices) + g.prompts.indices.reversed()
        for wave in [Array(order.prefix(5)), Array(order.suffix(5))] {
            let hs = try wave.map { try engine.submit(CompletionRequest(promptIds: g.prompts[$0], params: params)) }
            for (p, h) in zip(wave, hs) {
                let got = try await collect(h)
                XCTAssertEqual(got.tokens, Array(g.base[p].prefix(n)), "prompt \(p)")
            }
        }
        try await waitUntil { engine.metrics.kvBlocksUsed == 0 }
        XCTAssertGreaterThan(engine.metrics.kvBlocksCached, 0)
        XCTAssertLessThanOrEqual(engine.metrics.kvBlocksCached, 30)
        XCTAssertGreaterThan(engine.metrics.cachedPromptTokens, 0, "the last prompt of the first wave is the first of the second")

        var lp = params
        lp.promptLogprobs = 0
        var events: [TokenEvent] = []
        for try await e in try engine.submit(CompletionRequest(promptIds: g.prompts[0], params: lp)).events { events.append(e) }
        XCTAssertEqual(events.first?.promptLogprobs?.count, g.prompts[0].count - 1)
        XCTAssertEqual(events.last?.usage?.cachedTokens, 0)
        XCTAssertEqual(events.compactMap(\.tokenId), Array(g.base[0].prefix(n)))

        let off = try Engine(model: g.model, tokenizer: nil, config: EngineConfig(blockSize: 4, prefixCaching: false))
        defer { off.shutdown() }
        for _ in 0..<2 {
            let r = try await collect(try off.submit(CompletionRequest(promptIds: g.prompts[0], params: params)))
            XCTAssertEqual(r.usage?.cachedTokens, 0)
            XCTAssertEqual(r.tokens, Array(g.base[0].prefix(n)))
        }
        XCTAssertEqual(off.metrics.kvBlocksCached, 0)
    }

    /// Requests that arrive together with one prompt (n choices) compute it
    /// once: the others wait for its blocks instead of computing them too,
    /// and still give transformers' tokens.
    func testRequestsWithOnePromptComputeItOnce() async throws {
        let g = try golden()
        let engine = try Engine(model: g.model, tokenizer: nil, config: EngineConfig(maxRunning: 8, stepTokenBudget: 16, blockSize: 4))
        defer { engine.shutdown() }
        let n = 8
        let params = SamplingParams(maxTokens: n, ignoreEOS: true)
        let prompt = g.prompts[4]
        let same = try (0..<4).map { _ in try engine.submit(CompletionRequest(promptIds: prompt, params: params)) }
        let other = try engine.submit(CompletionRequest(promptIds: g.prompts[2], params: params))
        var cached: [Int] = []
        for h in same {
            let r = try await collect(h)
            XCTAssertEqual(r.tokens, Array(g.base[4].prefix(n)))
            cached.append(try XCTUnwrap(r.usage?.cachedTokens))
        }
        let whole = (prompt.count - 1) / 4 * 4
        XCTAssertEqual(cached.sorted(), [0, whole, whole, whole], "one computes the prompt, three take its blocks")
        let o = try await collect(other)
        XCTAssertEqual(o.tokens, Array(g.base[2].prefix(n)), "a request with another prompt runs as usual")
        let shared = zip(prompt, g.prompts[2]).prefix { $0 == $1 }.count / 4 * 4
        XCTAssertEqual(o.usage?.cachedTokens, shared)
        XCTAssertEqual(engine.metrics.promptTokens, prompt.count + 3 * (prompt.count - whole) + g.prompts[2].count - shared,
                       "prompt rows computed")
    }
}
