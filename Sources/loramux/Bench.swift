import ArgumentParser
import Foundation
import LoraMux
import CKernels

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure prompt processing and decode throughput across batch sizes.")

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Comma-separated batch sizes.")
    var batchSizes: String = "1"

    @Option(help: "Adapter mixes to run (only 'none' until adapters land).")
    var mix: String = "none"

    @Option(help: "Prompt tokens per sequence.")
    var promptLen: Int = 32

    @Option(help: "Generated tokens per sequence.")
    var genLen: Int = 64

    @Option(help: "Untimed warm-up decode steps per batch size.")
    var warmup: Int = 4

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
        for m in mix.split(separator: ",") where m != "none" {
            throw ValidationError("--mix \(m): adapters are not supported by this build yet; use none")
        }
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

    func run() throws {
        modelOptions.setThreads()
        let weights = try LlamaWeights.load(path: modelOptions.model)
        let model = LlamaModel(weights: weights)
        let c = model.config
        let batches = try parsedBatches()
        let maxB = batches.max()!
        let perSeq = promptLen + genLen + warmup
        let cache = try KVCache(config: c, numBlocks: maxB * ((perSeq + 15) / 16), blockSize: 16)
        var rng = RandomSource(seed: 42)
        try warmUp(model, cache: cache)
        var results: [[String: Any]] = []
        print("| batch | mix | prompt tok/s | decode tok/s | step ms p50 | step ms p99 |")
        print("|---:|---|---:|---:|---:|---:|")
        for b in batches {
            var tables = [[Int32]](repeating: [], count: b)
            for i in 0..<b { guard cache.reserve(&tables[i], tokens: perSeq) else { throw EngineError.cacheFull("bench") } }
            defer { for i in 0..<b { cache.release(&tables[i]) } }
            // Prompt processing: each sequence's prompt as one chunk, timed together.
            var prefillTime = 0.0
            var last = [Int32](repeating: 0, count: b)
            for s in 0..<b {
                var batch = ForwardBatch(rows: [], tables: [tables[s]])
                for p in 0..<promptLen {
                    batch.rows.append(BatchRow(token: Int32(rng.next() % UInt64(c.vocabSize)), position: Int32(p),
                                               sequence: 0, wantsLogits: p == promptLen - 1))
                }
                let t0 = DispatchTime.now().uptimeNanoseconds
                let logits = try model.forward(batch, cache: cache)
                prefillTime += Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
                last[s] = Int32(logits.withUnsafeBufferPointer { lm_argmax($0.baseAddress, Int64(c.vocabSize)) })
            }
            // Decode: all sequences step together, greedy.
            var steps: [Double] = []
            for step in 0..<(warmup + genLen) {
                var batch = ForwardBatch(rows: [], tables: tables)
                for s in 0..<b {
                    batch.rows.append(BatchRow(token: last[s], position: Int32(promptLen + step), sequence: s, wantsLogits: true))
                }
                let t0 = DispatchTime.now().uptimeNanoseconds
                let logits = try model.forward(batch, cache: cache)
                let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
                if step >= warmup { steps.append(dt) }
                logits.withUnsafeBufferPointer { lp in
                    for s in 0..<b { last[s] = Int32(lm_argmax(lp.baseAddress! + s * c.vocabSize, Int64(c.vocabSize))) }
                }
            }
            let total = steps.reduce(0, +)
            let sorted = steps.sorted()
            let p50 = sorted[sorted.count / 2] * 1000
            let p99 = sorted[min(sorted.count - 1, Int(Double(sorted.count) * 0.99))] * 1000
            let decodeTps = Double(b * steps.count) / total
            let prefillTps = Double(b * promptLen) / prefillTime
            print(String(format: "| %d | none | %.1f | %.1f | %.2f | %.2f |", b, prefillTps, decodeTps, p50, p99))
            results.append(["batch": b, "mix": "none", "rank": 0, "tokens_per_s": decodeTps,
                            "prompt_tokens_per_s": prefillTps, "step_ms_p50": p50, "step_ms_p99": p99])
        }
        if let path = json {
            let obj: [String: Any] = ["model": modelOptions.model, "threads": Int(lm_pool_threads()),
                                      "cpu": String(cString: lm_cpu_level_name(lm_cpu_level())),
                                      "prompt_len": promptLen, "gen_len": genLen, "results": results]
            let data = try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: path))
        }
    }
}
