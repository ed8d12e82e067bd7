import ArgumentParser
import Foundation
import LoraMux

/// Replays a request trace through the real engine: many adapters on disk,
/// Zipf popularity, Poisson arrivals, a cache smaller than the adapter set.
struct BenchReplay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-replay",
        abstract: "Replay Poisson arrivals over many .lora adapters (Zipf popularity) through the engine.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var poolOptions: AdapterPoolOptions
    @Option(help: "Adapters on disk.") var adapterCount: Int = 1000
    @Option(help: "Adapter cache size (count).") var cacheAdapters: Int = 64
    @Option(help: "Requests to replay.") var requests: Int = 600
    @Option(help: "Mean arrival rate (requests/s).") var rate: Double = 40
    @Option(help: "Zipf exponent of adapter popularity.") var zipf: Double = 1.0
    @Option(help: "Prompt tokens per request.") var promptLen: Int = 32
    @Option(help: "Leading prompt tokens every request shares (a system prompt).") var sharedPrefix: Int = 0
    @Flag(inversion: .prefixedNo, help: "Reuse KV blocks of earlier requests with the same adapter and prefix.")
    var prefixCaching = true
    @Option(help: "Generated tokens per request.") var genLen: Int = 32
    @Option(help: "Synthetic adapter rank.") var rank: Int = 8
    @Option(help: "Synthetic adapter projections: all or qv.") var targets: String = "qv"
    @Option(help: "Running sequences.") var maxBatch: Int = 32
    @Option(help: "Also run with every adapter resident, for comparison.") var compareResident: Bool = true
    @Option(help: "Write results as JSON to this file.") var json: String?

    func validate() throws {
        guard adapterCount >= 1, cacheAdapters >= 1, requests >= 1, rate > 0, zipf >= 0 else {
            throw ValidationError("counts and rate must be positive")
        }
        guard (0...promptLen).contains(sharedPrefix) else { throw ValidationError("--shared-prefix must be in 0...--prompt-len") }
        guard SyntheticAdapter.Targets(rawValue: targets) != nil else { throw ValidationError("--targets must be all or qv") }
    }

    struct Outcome {
        var label: String
        var wall: Double, tokens: Int
        var ttft: [Double], latency: [Double]
        var stats: AdapterCache.Stats
        var cachedPromptTokens: Int
        var rssStartMB: Double, rssTenthMB: Double, rssEndMB: Double
    }

    static func rssMB() -> Double {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
        for line in s.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Double(line.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0) / 1024
        }
        return 0
    }

    func run() async throws {
        modelOptions.setThreads()
        poolOptions.install(defaultMB: 1024, prefault: .now)
        let weights = try LlamaWeights.load(path: modelOptions.model)
        let model = LlamaModel(weights: weights)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-replay-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        // Eight distinct seeded adapters, copied to N names: every file is read
        // and loaded on its own, which is all the cache and loader can tell.
        let variants = min(8, adapterCount)
        for v in 0..<variants {
            let peft = (dir as NSString).appendingPathComponent("peft-\(v)")
            try SyntheticAdapter.writePEFT(to: peft, base: weights.config, rank: rank,
                                           targets: SyntheticAdapter.Targets(rawValue: targets)!, seed: UInt64(v + 1))
            _ = try PackedAdapter.pack(peftDirectory: peft, to: (dir as NSString).appendingPathComponent("variant-\(v).lora"))
            try FileManager.default.removeItem(atPath: peft)
        }
        let store = (dir as NSString).appendingPathComponent("store")
        try FileManager.default.createDirectory(atPath: store, withIntermediateDirectories: true)
        for i in 0..<adapterCount {
            try FileManager.default.copyItem(atPath: (dir as NSString).appendingPathComponent("variant-\(i % variants).lora"),
                                             toPath: (store as NSString).appendingPathComponent(String(format: "a%04d.lora", i)))
        }
        let registry = try AdapterRegistry(roots: [store])
        let names = registry.scan().registered.sorted()
        print("\(names.count) adapters on disk (rank \(rank), \(targets)), \(requests) requests at \(rate)/s, zipf \(zipf), shared prefix \(sharedPrefix), prefix caching \(prefixCaching ? "on" : "off")")

        // The trace: Poisson arrivals, Zipf-distributed adapter choice, random
        // prompts after the shared prefix.
        var rng = RandomSource(seed: 2024)
        let prefix = (0..<sharedPrefix).map { _ in Int32(rng.next() % UInt64(model.config.vocabSize)) }
        let weightsZ = (1...names.count).map { 1 / pow(Double($0), zipf) }
        let totalZ = weightsZ.reduce(0, +)
        var cdf: [Double] = []
        var acc = 0.0
        for w in weightsZ { acc += w / totalZ; cdf.append(acc) }
        var t = 0.0
        var trace: [(at: Double, adapter: String, prompt: [Int32])] = []
        for _ in 0..<requests {
            t += -log(1 - rng.nextFloat()) / rate
            let u = rng.nextFloat()
            let idx = min(cdf.firstIndex { $0 >= u } ?? names.count - 1, names.count - 1)
            let prompt = prefix + (sharedPrefix..<promptLen).map { _ in Int32(rng.next() % UInt64(model.config.vocabSize)) }
            trace.append((t, names[idx], prompt))
        }

        var outcomes: [Outcome] = []
        for (label, cacheCount) in [("cache \(cacheAdapters)", cacheAdapters)] + (compareResident ? [("all resident", names.count)] : []) {
            let cache = AdapterCache(budgetBytes: Int.max / 2, maxCount: cacheCount) { name in
                guard let e = registry.lookup(name) else { throw AdapterError.unknownAdapter(name) }
                return try AdapterLoader.load(path: e.path, name: name, base: weights)
            }
            if cacheCount >= names.count { for n in names { try await cache.acquire(n).release() } }
            let before = cache.statistics
            let engine = try Engine(model: model, tokenizer: nil,
                                    config: EngineConfig(maxRunning: maxBatch, stepTokenBudget: 256, maxQueued: requests + 1,
                                                         kvPrefault: .now, prefixCaching: prefixCaching))
            let rssStart = Self.rssMB()
            let start = Date()
            let progress = RSSCheckpoint(at: max(1, requests / 10))
            let all = try await withThrowingTaskGroup(of: (Double, Double, Int).self) { group in
                for r in trace {
                    group.addTask {
                        let wait = r.at - Date().timeIntervalSince(start)
                        if wait > 0 { try await Task.sleep(nanoseconds: UInt64(wait * 1e9)) }
                        let issued = Date()
                        defer { progress.completed() }
                        do {
                            let lease = try await cache.acquire(r.adapter)
                            let h = try engine.submit(CompletionRequest(promptIds: r.prompt,
                                                                        params: SamplingParams(maxTokens: genLen, ignoreEOS: true), adapter: lease))
                            var first: Date?
                            var n = 0
                            for try await e in h.events where e.tokenId != nil {
                                if first == nil { first = Date() }
                                n += 1
                            }
                            return ((first ?? Date()).timeIntervalSince(issued), Date().timeIntervalSince(issued), n)
                        } catch {
                            return (-1, -1, -1)  // refused (overloaded / cache full): counted, not fatal
                        }
                    }
                }
                var out: [(Double, Double, Int)] = []
                for try await r in group { out.append(r) }
                return out
            }
            let wall = Date().timeIntervalSince(start)
            let cachedPromptTokens = engine.metrics.cachedPromptTokens
            engine.shutdown()
            let failed = all.filter { $0.2 < 0 }.count
            if failed > 0 { print("\(label): \(failed) of \(all.count) requests were refused") }
            let results = all.filter { $0.2 >= 0 }
            var stats = cache.statistics
            stats.hits -= before.hits; stats.misses -= before.misses; stats.loads -= before.loads; stats.evictions -= before.evictions
            stats.loadSeconds -= before.loadSeconds
            outcomes.append(Outcome(label: label, wall: wall, tokens: results.reduce(0) { $0 + $1.2 },
                                    ttft: results.map(\.0), latency: results.map(\.1), stats: stats, cachedPromptTokens: cachedPromptTokens,
                                    rssStartMB: rssStart, rssTenthMB: progress.rss, rssEndMB: Self.rssMB()))
        }
        func pct(_ xs: [Double], _ p: Double) -> Double { let s = xs.sorted(); return s[min(s.count - 1, Int(Double(s.count - 1) * p + 0.5))] }
        print("| run | tokens/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) | latency p99 (s) | cache hit rate | loads | mean load (ms) | RSS start→10%→end (MB) | prompt tokens from the prefix cache |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        var rows: [[String: Any]] = []
        for o in outcomes {
            let hitRate = Double(o.stats.hits) / Double(max(1, o.stats.hits + o.stats.misses))
            let tps = Double(o.tokens) / o.wall
            // Not `cond ? x : 0` in the argument list: each branch becomes a
            // CVarArg on its own, the literal an Int, and %.2f then read the
            // next argument (the all-resident row printed RSS as its mean load).
            let meanLoadMs = o.stats.loads > 0 ? o.stats.loadSeconds / Double(o.stats.loads) * 1000 : 0.0
            print(String(format: "| %@ | %.1f | %.3f | %.3f | %.3f | %.3f | %.3f | %ld | %.2f | %.0f→%.0f→%.0f | %ld |", o.label, tps,
                         pct(o.ttft, 0.5), pct(o.ttft, 0.99), pct(o.latency, 0.5), pct(o.latency, 0.99), hitRate, o.stats.loads,
                         meanLoadMs, o.rssStartMB, o.rssTenthMB, o.rssEndMB, o.cachedPromptTokens))
            rows.append(["run": o.label, "tokens_per_s": tps, "ttft_p50_s": pct(o.ttft, 0.5), "ttft_p99_s": pct(o.ttft, 0.99),
                         "latency_p50_s": pct(o.latency, 0.5), "latency_p99_s": pct(o.latency, 0.99), "cache_hit_rate": hitRate,
                         "loads": o.stats.loads, "evictions": o.stats.evictions, "rss_start_mb": o.rssStartMB,
                         "rss_after_tenth_mb": o.rssTenthMB, "rss_end_mb": o.rssEndMB,
                         "cached_prompt_tokens": o.cachedPromptTokens])
        }
        if outcomes.count == 2 {
            print(String(format: "throughput with a %d-adapter cache: %.2fx of all-resident", cacheAdapters,
                         (Double(outcomes[0].tokens) / outcomes[0].wall) / (Double(outcomes[1].tokens) / outcomes[1].wall)))
        }
        if let path = json {
            let obj: [String: Any] = ["model": modelOptions.model, "adapters": names.count, "cache_adapters": cacheAdapters,
                                      "requests": requests, "rate": rate, "zipf": zipf, "prompt_len": promptLen, "gen_len": genLen,
                                      "shared_prefix": sharedPrefix, "prefix_caching": prefixCaching,
                                      "rank": rank, "targets": targets, "results": rows]
            try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: path))
        }
    }
}

/// RSS when the N-th request completes (after warm-up: caches, KV pages and
/// allocator pools are full by then, so growth after it would be a leak).
final class RSSCheckpoint: @unchecked Sendable {
    private let lock = NSLock()
    private let at: Int
    private var done = 0
    private(set) var rss = 0.0
    init(at: Int) { self.at = at }
    func completed() {
        lock.lock(); defer { lock.unlock() }
        done += 1
        if done == at { rss = BenchReplay.rssMB() }
    }
}
