import ArgumentParser
import Foundation
import LoraMux
import CKernels

struct BenchKernel: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-kernel",
        abstract: "Micro-benchmark of the fused multi-adapter LoRA kernel against a naive per-row loop.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var poolOptions: AdapterPoolOptions

    @Option(help: "Rows in the step.") var rows: Int = 32
    @Option(help: "LoRA rank.") var rank: Int = 16
    @Option(help: "Timed repetitions.") var iterations: Int = 20

    func run() throws {
        modelOptions.setThreads()
        poolOptions.install(defaultMB: 1024, prefault: .now)
        let weights = try LlamaWeights.load(path: modelOptions.model)
        let c = weights.config
        // Every row its own adapter: all 7 projections of every layer, f16, as loaded.
        let adapters = try (0..<rows).map {
            try SyntheticAdapter.make(name: "k\($0)", base: weights, rank: rank, targets: .all, seed: UInt64($0 + 1))
        }
        let adapterBytes = adapters.reduce(0) { $0 + $1.residentBytes }
        let maxDim = max(c.hiddenSize, c.intermediateSize, c.qDim)
        var rng = RandomSource(seed: 3)
        let x = (0..<(rows * maxDim)).map { _ in Float(rng.nextFloat() - 0.5) }
        var y = [Float](repeating: 0, count: rows * maxDim)
        var scratch = [Float](repeating: 0, count: Int(lm_lora_scratch_floats(Int32(rank), Int64(maxDim))))

        /// One pass over every (layer, projection); `segmentsFor` decides the grouping.
        func pass(_ segmentsFor: (Int, Projection) -> [lm_lora_seg], perRow: Bool) {
            for l in 0..<c.numLayers {
                for p in Projection.allCases {
                    let (out, inn) = p.shape(c)
                    let segs = segmentsFor(l, p)
                    if perRow {
                        for s in segs { var one = s; lm_lora_apply_single(x, Int64(inn), Int64(inn), &y, Int64(out), Int64(out), &one, &scratch) }
                    } else {
                        lm_lora_apply(x, Int64(inn), Int64(inn), &y, Int64(out), Int64(out), segs, Int32(segs.count), &scratch)
                    }
                }
            }
        }
        func seg(_ a: LoraAdapter, _ l: Int, _ p: Projection, row0: Int, n: Int) -> lm_lora_seg {
            let m = a.modules[l][p.rawValue]!
            return m.kernelSegment(row0: row0, rows: n)
        }
        func time(_ body: () -> Void) -> Double {
            body()
            var best = Double.infinity
            for _ in 0..<iterations {
                let t0 = DispatchTime.now().uptimeNanoseconds
                body()
                best = min(best, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6)
            }
            return best
        }
        let distinct = time { pass({ l, p in (0..<rows).map { seg(adapters[$0], l, p, row0: $0, n: 1) } }, perRow: false) }
        let naive = time { pass({ l, p in (0..<rows).map { seg(adapters[$0], l, p, row0: $0, n: 1) } }, perRow: true) }
        let one = time { pass({ l, p in [seg(adapters[0], l, p, row0: 0, n: rows)] }, perRow: false) }
        let oneNaive = time { pass({ l, p in (0..<rows).map { seg(adapters[0], l, p, row0: $0, n: 1) } }, perRow: true) }
        print("LoRA delta for one decode step of \(rows) rows, rank \(rank), all 7 projections x \(c.numLayers) layers (best of \(iterations))")
        print("| mix | fused kernel (ms) | naive per-row loop (ms) | adapter bytes read | fused GB/s |")
        print("|---|---:|---:|---:|---:|")
        print(String(format: "| distinct | %.2f | %.2f | %d | %.1f |", distinct, naive, adapterBytes, Double(adapterBytes) / distinct / 1e6))
        let oneBytes = adapters[0].residentBytes
        print(String(format: "| one | %.2f | %.2f | %d | %.1f |", one, oneNaive, oneBytes, Double(oneBytes) / one / 1e6))
    }
}
