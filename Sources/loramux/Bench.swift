import ArgumentParser
import Foundation
import LoraMux
import CKernels

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure prompt processing and decode throughput across batch sizes.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var poolOptions: AdapterPoolOptions

    @Option(help: "Comma-separated batch sizes.")
    var batchSizes: String = "1"

    @Option(help: "Adapter mixes: none (base only), one (all rows share one adapter), distinct (every row its own).")
    var mix: String = "none"

    @Option(help: "Use N synthetic random adapters (see --rank, --targets).")
    var syntheticAdapters: Int?

    @Option(help: "Rank of synthetic adapters.")
    var rank: Int = 16

    @Option(help: "Projections of synthetic adapters: all or qv.")
    var targets: String = "all"

    @Option(help: "Use the adapters (PEFT dirs, .lora files) found in this directory.")
    var adapters: String?

    @Option(help: "Write an SVG plot of tokens/s against batch size.")
    var plot: String?

    @Option(help: "Prompt tokens per sequence.")
    var promptLen: Int = 32

    @Option(help: "Generated tokens per sequence.")
    var genLen: Int = 64

    @Option(help: "Untimed warm-up decode steps per batch size.")
    var warmup: Int = 4

    @Flag(help: "Run the mixes of a batch size side by side, one decode step of each in turn, so a slow phase of the machine lands on all of them alike (paired comparison).")
    var interleave = false

    @Option(help: "Write results as JSON to this file.")
    var json: String?

    func parsedBatches() throws -> [Int] {
        try batchSizes.split(separator: ",").map {
            guard let b = Int($0.trimmingCharacters(in: .whitespaces)), b >= 1, b <= 1024 else {
                throw ValidationError("--batch-sizes: '\($0)' is not a batch size in 1...1024")
            }
            return b
        }
    }

    func validate() throws {
        _ = try parsedBatches()
        guard promptLen >= 1, genLen >= 1 else { throw ValidationError("--prompt-len and --gen-len must be >= 1") }
        for m in mix.split(separator: ",") where !["none", "one", "distinct"].contains(String(m)) {
            throw ValidationError("--mix \(m): expected none, one or distinct")
        }
        guard SyntheticAdapter.Targets(rawValue: targets) != nil else { throw ValidationError("--targets must be all or qv") }
        if syntheticAdapters != nil && adapters != nil { throw ValidationError("give --synthetic-adapters or --adapters, not both") }
        if let n = syntheticAdapters, n < 1 || n > 4096 { throw ValidationError("--synthetic-adapters must be in 1...4096") }
    }

    /// One untimed prefill and decode so first-touch page faults on the
    /// mapped weights do not land in the first measurement.
    func warmUp(_ model: LlamaModel, cache: KVCache) throws {
        var t: [Int32] = []
        guard cache.reserve(&t, tokens: 17) else { return }
        defer { cache.release(&t) }
        let rows = (0..<16).map { BatchRow(token: Int32($0), position: Int32($0), sequence: 0, wantsLogits: $0 == 15) }
        _ = try model.forward(ForwardBatch(rows: rows, tables: [t]), cache: cache)
        _ = try model.forward(ForwardBatch(rows: [BatchRow(token: 1, position: 16, sequence: 0, wantsLogits: true)], tables: [t]), cache: cache)
    }

    /// The adapters rows may use: synthetic, from a directory, or none.
    func loadAdapters(_ weights: LlamaWeights, needed: Int) throws -> [LoraAdapter] {
        if let dir = adapters {
            let reg = try AdapterRegistry(roots: [dir])
            let names = reg.scan().registered
            guard !names.isEmpty else { throw ValidationError("no adapters found in \(dir)") }
            return try names.map { n in try AdapterLoader.load(path: reg.lookup(n)!.path, name: n, base: weights) }
        }
        let n = min(syntheticAdapters ?? needed, needed)
        return try (0..<n).map {
            try SyntheticAdapter.make(name: "synthetic-\($0)", base: weights, rank: rank,
                                      targets: SyntheticAdapter.Targets(rawValue: targets)!, seed: UInt64($0 + 1))
        }
    }

    struct Result {
        var batch: Int, mix: String, promptTps: Double, decodeTps: Double, p50: Double, p99: Double
        /// The distinct ranks of the run's adapters' modules, ascending (empty for `none`),
        /// and how many distinct adapters its rows use.
        var ranks: [Int], adapters: Int
        /// One number when every module has the same rank (0 without adapters), else ranks joined by "/".
        var rankCell: String { ranks.isEmpty ? "0" : ranks.map(String.init).joined(separator: "/") }
    }

    /// What a run's rows use: directory adapters may differ in rank, within
    /// one adapter too (rank_pattern).
    static func rankSummary(_ rows: [LoraAdapter?]) -> (ranks: [Int], adapters: Int) {
        var seen = Set<ObjectIdentifier>(), ranks = Set<Int>()
        for case let a? in rows where seen.insert(ObjectIdentifier(a)).inserted {
            for layer in a.modules { for case let m? in layer { ranks.insert(m.rank) } }
            if let e = a.embedding { ranks.insert(e.rank) }
        }
        return (ranks.sorted(), seen.count)
    }

    func run() throws {
        modelOptions.setThreads()
        let weights = try LlamaWeights.load(path: modelOptions.model)
        let model = LlamaModel(weights: weights)
        let c = model.config
        let batches = try parsedBatches()
        let mixes = mix.split(separator: ",").map(String.init)
        let maxB = batches.max()!
        poolOptions.install(defaultMB: mixes == ["none"] ? 0 : 1024, prefault: .now)
        let pool = mixes == ["none"] ? [] : try loadAdapters(weights, needed: maxB)
        let perSeq = promptLen + genLen + warmup
        let live = interleave ? mixes.count : 1  // mixes holding KV blocks at once
        let cache = try KVCache(config: c, numBlocks: live * maxB * ((perSeq + 15) / 16), blockSize: 16, prefault: .now)
        var rng = RandomSource(seed: 42)
        try warmUp(model, cache: cache)
        var results: [Result] = []
        print("| batch | mix | rank | prompt tok/s | decode tok/s | step ms p50 | step ms p99 |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for b in batches {
            let runs = try mixes.map { m in
                // Every row its own adapter (cycling if the pool is smaller), one shared, or none.
                try MixRun(mix: m, rowAdapters: (0..<b).map { i in
                    switch m {
                    case "one": return pool.first
                    case "distinct": return pool.isEmpty ? nil : pool[i % pool.count]
                    default: return nil
                    }
                }, tokens: perSeq, cache: cache, reserveNow: interleave)
            }
            defer { for r in runs { r.release() } }
            let totalSteps = warmup + genLen
            if interleave {
                for r in runs { try r.prefill(model, promptLen: promptLen, rng: &rng) }
                for step in 0..<totalSteps { for r in runs { try r.decode(model, position: promptLen + step, timed: step >= warmup) } }
            } else {
                for r in runs {
                    try r.reserve()
                    try r.prefill(model, promptLen: promptLen, rng: &rng)
                    for step in 0..<totalSteps { try r.decode(model, position: promptLen + step, timed: step >= warmup) }
                    r.release()
                }
            }
            for run in runs {
                let sorted = run.steps.sorted()
                let used = Self.rankSummary(run.rowAdapters)
                let r = Result(batch: b, mix: run.mix,
                               promptTps: Double(b * promptLen) / run.prefillTime,
                               decodeTps: Double(b * sorted.count) / sorted.reduce(0, +),
                               p50: sorted[sorted.count / 2] * 1000,
                               p99: sorted[min(sorted.count - 1, Int(Double(sorted.count) * 0.99))] * 1000,
                               ranks: used.ranks, adapters: used.adapters)
                results.append(r)
                print(String(format: "| %d | %@ | %@ | %.1f | %.1f | %.2f | %.2f |", b, run.mix, r.rankCell, r.promptTps, r.decodeTps, r.p50, r.p99))
            }
        }
        if let path = json {
            var obj: [String: Any] = ["model": modelOptions.model, "threads": Int(lm_pool_threads()),
                                      "cpu": String(cString: lm_cpu_level_name(lm_cpu_level())),
                                      "prompt_len": promptLen, "gen_len": genLen, "interleave": interleave,
                                      "results": results.map { r -> [String: Any] in
                                          // `rank` stays a number (DESIGN's contract): the largest; `ranks` lists them all.
                                          ["batch": r.batch, "mix": r.mix, "rank": r.ranks.last ?? 0,
                                           "ranks": r.ranks, "adapters": r.adapters,
                                           "tokens_per_s": r.decodeTps, "prompt_tokens_per_s": r.promptTps,
                                           "step_ms_p50": r.p50, "step_ms_p99": r.p99] }]
            // --targets describes synthetic adapters only; a directory's adapters say their own.
            if let dir = adapters { obj["adapters_dir"] = dir } else { obj["targets"] = targets }
            let data = try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: path))
        }
        if let path = plot {
            let series = Dictionary(grouping: results, by: \.mix).mapValues { $0.map { (Double($0.batch), $0.decodeTps) } }
            let svg = SVGPlot.lines(title: "Decode throughput, \(URL(fileURLWithPath: modelOptions.model).lastPathComponent)",
                                    xLabel: "batch size", yLabel: "tokens/s", series: mixes.compactMap { m in series[m].map { (m, $0) } })
            try svg.write(toFile: path, atomically: true, encoding: .utf8)
        }
    }
}

/// One mix at one batch size: its sequences' KV blocks, last tokens and timings.
final class MixRun {
    let mix: String
    let rowAdapters: [LoraAdapter?]
    let tokens: Int
    let cache: KVCache
    var tables: [[Int32]]
    var last: [Int32]
    var prefillTime = 0.0
    var steps: [Double] = []

    init(mix: String, rowAdapters: [LoraAdapter?], tokens: Int, cache: KVCache, reserveNow: Bool) throws {
        self.mix = mix
        self.rowAdapters = rowAdapters
        self.tokens = tokens
        self.cache = cache
        tables = [[Int32]](repeating: [], count: rowAdapters.count)
        last = [Int32](repeating: 0, count: rowAdapters.count)
        if reserveNow { try reserve() }
    }

    func reserve() throws {
        for i in tables.indices where tables[i].isEmpty {
            guard cache.reserve(&tables[i], tokens: tokens) else { release(); throw EngineError.cacheFull("bench") }
        }
    }

    func release() { for i in tables.indices where !tables[i].isEmpty { cache.release(&tables[i]) } }

    /// Each sequence's prompt on its own, as a server admits them.
    func prefill(_ model: LlamaModel, promptLen: Int, rng: inout RandomSource) throws {
        let vocab = model.config.vocabSize
        for s in tables.indices {
            var batch = ForwardBatch(rows: [], tables: [tables[s]], adapters: [rowAdapters[s]])
            for p in 0..<promptLen {
                batch.rows.append(BatchRow(token: Int32(rng.next() % UInt64(vocab)), position: Int32(p),
                                           sequence: 0, wantsLogits: p == promptLen - 1))
            }
            let t0 = DispatchTime.now().uptimeNanoseconds
            let logits = try model.forward(batch, cache: cache)
            prefillTime += Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            last[s] = Int32(logits.withUnsafeBufferPointer { lm_argmax($0.baseAddress, Int64(vocab)) })
        }
    }

    /// One decode step of every sequence (greedy).
    func decode(_ model: LlamaModel, position: Int, timed: Bool) throws {
        let vocab = model.config.vocabSize
        var batch = ForwardBatch(rows: [], tables: tables, adapters: rowAdapters)
        for s in tables.indices {
            batch.rows.append(BatchRow(token: last[s], position: Int32(position), sequence: s, wantsLogits: true))
        }
        let t0 = DispatchTime.now().uptimeNanoseconds
        let logits = try model.forward(batch, cache: cache)
        let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        if timed { steps.append(dt) }
        logits.withUnsafeBufferPointer { lp in
            for s in tables.indices { last[s] = Int32(lm_argmax(lp.baseAddress! + s * vocab, Int64(vocab))) }
        }
    }
}
