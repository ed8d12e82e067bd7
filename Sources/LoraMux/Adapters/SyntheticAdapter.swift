import Foundation
import CKernels

/// Random LoRA adapters in PEFT's on-disk format, for benchmarks and tests:
/// the same bytes a `save_pretrained` would write, with seeded values.
public enum SyntheticAdapter {
    public enum Targets: String, Sendable, CaseIterable {
        case all, qv
        public var projections: [Projection] { self == .all ? Projection.allCases : [.q, .v] }
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    public static func writePEFT(to dir: String, base c: LlamaConfig, rank: Int, alpha: Double? = nil,
                                 targets: Targets, seed: UInt64, dtype: AdapterDType = .f32) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let config: [String: Any] = ["peft_type": "LORA", "r": rank, "lora_alpha": alpha ?? Double(2 * rank),
                                     "target_modules": targets.projections.map(\.name), "bias": "none",
                                     "base_model_name_or_path": "synthetic", "lora_dropout": 0.0]
        try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys])
            .write(to: URL(fileURLWithPath: (dir as NSString).appendingPathComponent("adapter_config.json")))
        var rng = RandomSource(seed: seed)
        var header: [String: Any] = [:]
        var blob = Data()
        let dt = dtype == .f32 ? "F32" : "F16"
        func add(_ name: String, _ shape: [Int], std: Float) {
            let n = shape.reduce(1, *)
            var f = [Float](repeating: 0, count: n)
            for i in 0..<n { f[i] = Float(rng.nextFloat() * 2 - 1) * std * 1.732 }  // uniform with this std
            let start = blob.count
            if dtype == .f32 { f.withUnsafeBytes { blob.append(contentsOf: $0) } } else {
                var h = [UInt16](repeating: 0, count: n)
                lm_f32_to_f16_n(f, &h, Int64(n))
                h.withUnsafeBytes { blob.append(contentsOf: $0) }
            }
            header[name] = ["dtype": dt, "shape": shape, "data_offsets": [start, blob.count]]
        }
        for l in 0..<c.numLayers {
            for p in targets.projections {
                let s = p.shape(c)
                let key = "base_model.model.\(p.modulePath(layer: l))"
                add(key + ".lora_A.weight", [rank, s.in], std: 1 / Float(s.in).squareRoot())
                add(key + ".lora_B.weight", [s.out, rank], std: 0.02)
            }
        }
        var hdr = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while hdr.count % 8 != 0 { hdr.append(0x20) }
        var file = Data()
        var len = UInt64(hdr.count).littleEndian
        file.append(Data(bytes: &len, count: 8))
        file.append(hdr)
        file.append(blob)
        try file.write(to: URL(fileURLWithPath: (dir as NSString).appendingPathComponent("adapter_model.safetensors")))
    }
}

extension SyntheticAdapter {
    /// A random adapter built straight into memory (no file), in the storage
    /// dtype the kernels read. Values are seeded: the same seed gives the same adapter.
    public static func make(name: String, base: LlamaWeights, rank: Int, targets: Targets, seed: UInt64,
                            dtype: AdapterDType = .f16) throws -> LoraAdapter {
        let c = base.config
        let cfg = try LoraConfig(json: .object([("r", .number(Double(rank))), ("lora_alpha", .number(Double(2 * rank))),
                                                 ("target_modules", .array(targets.projections.map { .string($0.name) }))]),
                                 path: "synthetic:\(name)")
        var modules: [AdapterPlan.Module] = []
        for l in 0..<c.numLayers {
            for p in targets.projections { modules.append(.init(layer: l, proj: p, rank: rank, scale: 2, dora: false)) }
        }
        let plan = AdapterPlan(config: cfg, modules: modules, embedding: nil, dtype: dtype)
        return try AdapterBuilder.build(name: name, source: "synthetic:\(name)", plan: plan, base: base) { part, dt, count, dst in
            // Stable per-part stream (String.hashValue is randomised per process).
            let keyHash = part.key.utf8.reduce(UInt64(0xcbf2_9ce4_8422_2325)) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 }
            var rng = RandomSource(seed: seed ^ keyHash)
            let std: Float
            switch part {
            case let .loraA(_, p): std = 1 / Float(p.shape(c).in).squareRoot()
            default: std = 0.02
            }
            var f = [Float](repeating: 0, count: count)
            for i in 0..<count { f[i] = Float(rng.nextFloat() * 2 - 1) * std * 1.732 }
            switch dt {
            case .f32: f.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress!, byteCount: count * 4) }
            case .f16: lm_f32_to_f16_n(f, dst.assumingMemoryBound(to: UInt16.self), Int64(count))
            }
        }
    }
}
