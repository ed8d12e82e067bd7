import ArgumentParser
import Foundation
import LoraMux

struct BenchLoad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-load",
        abstract: "Measure adapter cold loads (.lora and PEFT) and adapter-cache hits.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var poolOptions: AdapterPoolOptions

    @Option(help: "LoRA rank of the synthetic adapter.")
    var rank: Int = 16

    @Option(help: "Target projections: all or qv.")
    var targets: String = "all"

    @Option(help: "Timed cold loads.")
    var iterations: Int = 50

    @Option(help: "Write results as JSON to this file.")
    var json: String?

    func validate() throws {
        guard SyntheticAdapter.Targets(rawValue: targets) != nil else { throw ValidationError("--targets must be all or qv") }
        guard rank >= 1, rank <= 1024, iterations >= 1 else { throw ValidationError("--rank in 1...1024, --iterations >= 1") }
    }

    static func percentile(_ xs: [Double], _ p: Double) -> Double {
        let s = xs.sorted()
        return s[min(s.count - 1, Int(Double(s.count - 1) * p + 0.5))]
    }

    func run() throws {
        modelOptions.setThreads()
        poolOptions.install(defaultMB: 1024, prefault: .now)
        let weights = try LlamaWeights.load(path: modelOptions.model)
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-bench-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let peftDir = (tmp as NSString).appendingPathComponent("peft")
        let loraPath = (tmp as NSString).appendingPathComponent("adapter.lora")
        try SyntheticAdapter.writePEFT(to: peftDir, base: weights.config, rank: rank,
                                       targets: SyntheticAdapter.Targets(rawValue: targets)!, seed: 1)
        let info = try PackedAdapter.pack(peftDirectory: peftDir, to: loraPath)
        let peftBytes = (try FileManager.default.attributesOfItem(atPath: (peftDir as NSString).appendingPathComponent("adapter_model.safetensors"))[.size] as? Int) ?? 0

        func time(_ n: Int, _ body: () throws -> Void) rethrows -> [Double] {
            try (0..<n).map { _ in
                let t0 = DispatchTime.now().uptimeNanoseconds
                try body()
                return Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6
            }
        }
        _ = try AdapterLoader.load(path: loraPath, name: "warm", base: weights)  // page cache, first-touch
        let lora = try time(iterations) { _ = try AdapterLoader.load(path: loraPath, name: "a", base: weights) }
        let headerOnly = try time(iterations) { _ = try PackedAdapter.inspect(path: loraPath) }
        let peft = try time(max(5, iterations / 5)) { _ = try AdapterLoader.load(path: peftDir, name: "a", base: weights) }

        let cache = AdapterCache(budgetBytes: 1 << 30) { name in try AdapterLoader.load(path: loraPath, name: name, base: weights) }
        try cache.acquire("hot").release()
        let hits = try time(10_000) { try cache.acquire("hot").release() }.map { $0 * 1000 }  // µs

        print("adapter: rank \(rank), targets \(targets), \(info.modules.count) modules, dtype \(info.dtype.rawValue)")
        print(String(format: "size: PEFT safetensors %d bytes, .lora %d bytes (%.2fx smaller)", peftBytes, info.fileBytes,
                     Double(peftBytes) / Double(info.fileBytes)))
        print("| measurement | p50 | p99 |")
        print("|---|---:|---:|")
        print(String(format: "| cold load .lora (ms) | %.3f | %.3f |", Self.percentile(lora, 0.5), Self.percentile(lora, 0.99)))
        print(String(format: "| .lora header parse only (ms) | %.3f | %.3f |", Self.percentile(headerOnly, 0.5), Self.percentile(headerOnly, 0.99)))
        print(String(format: "| cold load PEFT dir (ms) | %.3f | %.3f |", Self.percentile(peft, 0.5), Self.percentile(peft, 0.99)))
        print(String(format: "| cache hit acquire+release (µs) | %.2f | %.2f |", Self.percentile(hits, 0.5), Self.percentile(hits, 0.99)))
        if let path = json {
            let obj: [String: Any] = [
                "model": modelOptions.model, "rank": rank, "targets": targets, "modules": info.modules.count,
                "peft_bytes": peftBytes, "lora_bytes": info.fileBytes,
                "cold_load_lora_ms_p50": Self.percentile(lora, 0.5), "cold_load_lora_ms_p99": Self.percentile(lora, 0.99),
                "cold_load_peft_ms_p50": Self.percentile(peft, 0.5),
                "cache_hit_us_p50": Self.percentile(hits, 0.5), "cache_hit_us_p99": Self.percentile(hits, 0.99)]
            try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: path))
        }
    }
}
