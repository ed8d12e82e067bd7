import Foundation
import CKernels

/// Reads a PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`).
public struct PEFTAdapter: Sendable {
    public let directory: String
    public let config: LoraConfig
    let file: SafetensorsFile
    /// The config and weights as read (see AdapterContentKey), without the storage dtype.
    let content: AdapterContentKey

    /// Tensors of one base module, by PEFT's names.
    struct ModuleTensors {
        var a: TensorView?, b: TensorView?, magnitude: TensorView?
        var embA: TensorView?, embB: TensorView?, full: TensorView?
    }

    public init(directory: String) throws {
        self.directory = directory
        let fm = FileManager.default
        let cfgPath = (directory as NSString).appendingPathComponent("adapter_config.json")
        let stPath = (directory as NSString).appendingPathComponent("adapter_model.safetensors")
        guard let data = fm.contents(atPath: cfgPath) else {
            throw AdapterError.io(path: directory, reason: "no adapter_config.json (not a PEFT adapter directory)")
        }
        let json: OrderedJSON
        do { json = try OrderedJSON.parse(data) } catch {
            throw AdapterError.malformed(path: cfgPath, reason: "\(error)")
        }
        config = try LoraConfig(json: json, path: cfgPath)
        guard fm.fileExists(atPath: stPath) else {
            if fm.fileExists(atPath: (directory as NSString).appendingPathComponent("adapter_model.bin")) {
                throw AdapterError.unsupported(path: directory, key: "adapter_model.bin",
                    reason: "pickle checkpoints are not loaded (they can run code); re-save with safe_serialization=True")
            }
            throw AdapterError.io(path: directory, reason: "no adapter_model.safetensors")
        }
        // Read, not mapped: the file may be truncated under us (see MappedFile(readingWhole:)).
        do { file = try SafetensorsFile(file: MappedFile(readingWhole: stPath, checksum: true)) } catch let e as WeightError {
            throw AdapterError.malformed(path: stPath, reason: e.localizedDescription)
        }
        let cfgCRC = data.withUnsafeBytes { lm_crc32c(0, $0.baseAddress, $0.count) }
        content = AdapterContentKey(kind: "peft", files: [FileIdentity(path: cfgPath), file.file.identity],
                                    crcs: [cfgCRC, file.file.crc32c ?? 0])
    }

    /// Groups tensors by module path (without the "base_model.model." prefix).
    func moduleTensors() throws -> [String: ModuleTensors] {
        var out: [String: ModuleTensors] = [:]
        let suffixes: [(String, WritableKeyPath<ModuleTensors, TensorView?>)] = [
            (".lora_A.weight", \.a), (".lora_B.weight", \.b),
            (".lora_magnitude_vector.weight", \.magnitude), (".lora_magnitude_vector", \.magnitude),
            (".lora_embedding_A.weight", \.embA), (".lora_embedding_A", \.embA),
            (".lora_embedding_B.weight", \.embB), (".lora_embedding_B", \.embB),
            (".modules_to_save.weight", \.full), (".weight", \.full),
        ]
        for (key, t) in file.tensors {
            var k = key
            if k.hasPrefix("base_model.model.") { k.removeFirst("base_model.model.".count) }
            guard let (suffix, path) = suffixes.first(where: { k.hasSuffix($0.0) }) else {
                throw AdapterError.malformed(path: file.path, reason: "tensor '\(key)' is not a LoRA tensor LoraMux knows")
            }
            let module = String(k.dropLast(suffix.count))
            if path == \ModuleTensors.full, !config.modulesToSave.contains(where: { module == $0 || module.hasSuffix("." + $0) }) {
                throw AdapterError.malformed(path: file.path, reason: "tensor '\(key)' belongs to no LoRA module and is not in modules_to_save")
            }
            guard out[module, default: ModuleTensors()][keyPath: path] == nil else {
                throw AdapterError.malformed(path: file.path, reason: "two tensors for '\(module)\(suffix)'")
            }
            out[module, default: ModuleTensors()][keyPath: path] = t
        }
        return out
    }

    /// Resolves ranks and scales and checks every shape against `base`.
    public func plan(for base: BaseShape, storage: AdapterDType? = nil) throws -> (AdapterPlan, [AdapterPart: TensorView]) {
        let path = directory
        let hint = config.baseModel
        func wrong(_ why: String) -> AdapterError { .wrongBase(path: path, reason: why, hint: hint) }
        if let m = try? inferredShape().mismatches(base), !m.isEmpty { throw wrong(m.joined(separator: "; ")) }
        func check(_ t: TensorView, _ shape: [Int], _ what: String) throws {
            guard t.shape == shape else { throw wrong("\(what) has shape \(t.shape), the base needs \(shape)") }
        }
        // PEFT builds each module with the config's rank and then fails to load
        // a state dict of another: a config that contradicts its tensors is broken.
        func configuredRank(_ module: String, _ rank: Int) throws -> (rank: Int, alpha: Double) {
            let ra = config.rankAndAlpha(module: module)
            guard ra.rank == rank else {
                throw AdapterError.malformed(path: path, reason: "'\(module)' has rank \(rank) in its tensors, but the config's "
                                             + "r / rank_pattern gives \(ra.rank)")
            }
            return ra
        }
        var sources: [AdapterPart: TensorView] = [:]
        var modules: [AdapterPlan.Module] = []
        var embedding: (Int, Float)? = nil
        var embedOverride = false, lmHeadOverride = false
        var anyF32 = false
        var covered = Set<String>()
        for (module, t) in try moduleTensors().sorted(by: { $0.key < $1.key }) {
            covered.insert(module)
            if let full = t.full {
                guard t.a == nil, t.b == nil, t.embA == nil else {
                    throw AdapterError.malformed(path: path, reason: "'\(module)' has both LoRA and modules_to_save tensors")
                }
                try check(full, [base.vocabSize, base.hiddenSize], "'\(module)' (modules_to_save)")
                switch module {
                case "model.embed_tokens": embedOverride = true; sources[.embedTokens] = full
                case "lm_head": lmHeadOverride = true; sources[.lmHead] = full
                default: throw AdapterError.unsupported(path: path, key: "modules_to_save", reason: "'\(module)' (only embed_tokens and lm_head)")
                }
                anyF32 = anyF32 || full.dtype != .f16
                continue
            }
            if module == "model.embed_tokens" {
                guard let a = t.embA, let b = t.embB, t.a == nil, t.magnitude == nil else {
                    throw AdapterError.malformed(path: path, reason: "embedding LoRA of '\(module)' needs lora_embedding_A and lora_embedding_B")
                }
                guard config.targets(module: module, isLinear: false, isOutput: false) else {
                    throw AdapterError.malformed(path: path, reason: "tensors for '\(module)', which target_modules does not name")
                }
                let rank = a.shape.first ?? 0
                try check(a, [rank, base.vocabSize], "lora_embedding_A of '\(module)'")
                try check(b, [base.hiddenSize, rank], "lora_embedding_B of '\(module)'")
                let (_, alpha) = try configuredRank(module, rank)
                embedding = (rank, config.scale(rank: rank, alpha: alpha))
                sources[.embedAT] = a
                sources[.embedBT] = b
                continue
            }
            guard let (layer, proj) = Self.parseModule(module) else {
                if module == "lm_head" {
                    throw AdapterError.unsupported(path: path, key: "target_modules", reason: "LoRA on lm_head")
                }
                throw wrong("module '\(module)' does not exist in a Llama model")
            }
            guard config.targets(module: module, isLinear: true, isOutput: false) else {
                throw AdapterError.malformed(path: path, reason: "tensors for '\(module)', which the config does not target")
            }
            guard let a = t.a, let b = t.b, t.embA == nil else {
                throw AdapterError.malformed(path: path, reason: "'\(module)' needs both lora_A and lora_B")
            }
            guard layer < base.numLayers else { throw wrong("module '\(module)' but the base has \(base.numLayers) layers") }
            let s = proj.shape(base)
            let rank = a.shape.first ?? 0  // a module's rank is its A's row count
            try check(a, [rank, s.in], "lora_A of '\(module)'")
            try check(b, [s.out, rank], "lora_B of '\(module)'")
            let dora = t.magnitude != nil
            guard dora == config.useDoRA else {
                throw AdapterError.malformed(path: path, reason: dora ? "'\(module)' has a DoRA magnitude but use_dora is false"
                                                                       : "use_dora is true but '\(module)' has no lora_magnitude_vector")
            }
            if let m = t.magnitude { try check(m, [s.out], "lora_magnitude_vector of '\(module)'") }
            let (_, alpha) = try configuredRank(module, rank)
            modules.append(.init(layer: layer, proj: proj, rank: rank, scale: config.scale(rank: rank, alpha: alpha), dora: dora))
            sources[.loraA(layer: layer, proj: proj)] = a
            sources[.loraBT(layer: layer, proj: proj)] = b
            if let m = t.magnitude { sources[.magnitude(layer: layer, proj: proj)] = m }
            anyF32 = anyF32 || a.dtype != .f16 || b.dtype != .f16
        }
        // Everything the config targets must have weights: a silent gap would serve the base instead.
        for l in 0..<base.numLayers {
            for p in Projection.allCases {
                let m = p.modulePath(layer: l)
                if config.targets(module: m, isLinear: true, isOutput: false) && !covered.contains(m) {
                    throw AdapterError.malformed(path: path, reason: "target_modules selects '\(m)' but the file has no weights for it")
                }
            }
        }
        guard !modules.isEmpty || embedding != nil || embedOverride || lmHeadOverride else {
            throw AdapterError.malformed(path: path, reason: "the adapter holds no weights")
        }
        let plan = AdapterPlan(config: config, modules: modules.sorted { ($0.layer, $0.proj.rawValue) < ($1.layer, $1.proj.rawValue) },
                               embedding: embedding, embedOverride: embedOverride, lmHeadOverride: lmHeadOverride,
                               dtype: storage ?? (anyF32 ? .f32 : .f16))
        return (plan, sources)
    }

    /// The base dimensions this adapter's tensors imply (0 where they say nothing).
    public func inferredShape() throws -> BaseShape {
        var s = BaseShape(numLayers: 0, hiddenSize: 0, qDim: 0, kvDim: 0, intermediateSize: 0, vocabSize: 0)
        func set(_ kp: WritableKeyPath<BaseShape, Int>, _ v: Int, _ what: String) throws {
            if s[keyPath: kp] != 0 && s[keyPath: kp] != v {
                throw AdapterError.malformed(path: directory, reason: "inconsistent shapes: \(what) implies \(v), another tensor \(s[keyPath: kp])")
            }
            s[keyPath: kp] = v
        }
        for (module, t) in try moduleTensors() {
            if let full = t.full, full.shape.count == 2 {
                try set(\.vocabSize, full.shape[0], module); try set(\.hiddenSize, full.shape[1], module); continue
            }
            if let a = t.embA, let b = t.embB, a.shape.count == 2, b.shape.count == 2 {
                try set(\.vocabSize, a.shape[1], module); try set(\.hiddenSize, b.shape[0], module); continue
            }
            guard let (layer, proj) = Self.parseModule(module), let a = t.a, let b = t.b, a.shape.count == 2, b.shape.count == 2 else { continue }
            s.numLayers = max(s.numLayers, layer + 1)
            let (outKP, inKP): (WritableKeyPath<BaseShape, Int>, WritableKeyPath<BaseShape, Int>)
            switch proj {
            case .q: (outKP, inKP) = (\.qDim, \.hiddenSize)
            case .k, .v: (outKP, inKP) = (\.kvDim, \.hiddenSize)
            case .o: (outKP, inKP) = (\.hiddenSize, \.qDim)
            case .gate, .up: (outKP, inKP) = (\.intermediateSize, \.hiddenSize)
            case .down: (outKP, inKP) = (\.hiddenSize, \.intermediateSize)
            }
            try set(inKP, a.shape[1], module)
            try set(outKP, b.shape[0], module)
        }
        return s
    }

    /// "model.layers.12.self_attn.q_proj" → (12, .q)
    static func parseModule(_ m: String) -> (Int, Projection)? {
        let f = m.split(separator: ".")
        guard f.count == 5, f[0] == "model", f[1] == "layers", let l = Int(f[2]), let p = Projection(name: String(f[4])),
              f[3] == (p == .gate || p == .up || p == .down ? "mlp" : "self_attn") else { return nil }
        return (l, p)
    }

    /// Loads the adapter for `base`: validated, permuted for GGUF, DoRA precomputed.
    public func load(name: String, base: LlamaWeights, storage: AdapterDType? = nil) throws -> LoraAdapter {
        let (plan, sources) = try plan(for: base.config.shape, storage: storage)
        var key = content
        key.kind = "peft:" + (storage?.rawValue ?? "default")
        return try AdapterBuilder.build(name: name, source: directory, plan: plan, base: base, content: key) { part, dtype, count, dst in
            guard let t = sources[part] else { throw AdapterError.malformed(path: directory, reason: "missing \(part.key)") }
            try Self.convert(t, part: part, to: dtype, count: count, dst: dst, path: directory)
        }
    }

    /// Copies a PEFT tensor into kernel layout: B and embedding B transposed,
    /// embedding A transposed, values converted to the storage dtype.
    static func convert(_ t: TensorView, part: AdapterPart, to dtype: AdapterDType, count: Int,
                        dst: UnsafeMutableRawPointer, path: String) throws {
        guard t.elementCount == count else { throw AdapterError.malformed(path: path, reason: "\(t.name): wrong size") }
        // PEFT stores B (out, rank), lora_embedding_A (rank, vocab), lora_embedding_B (hidden, rank).
        let transpose: Bool
        switch part {
        case .loraBT, .embedAT, .embedBT: transpose = true
        default: transpose = false
        }
        guard !transpose || t.shape.count == 2 else { throw AdapterError.malformed(path: path, reason: "\(t.name): expected a matrix") }
        let (rows, cols) = transpose ? (t.shape[0], t.shape[1]) : (1, count)
        // f32 without a transpose dequantizes straight into dst.
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: transpose || dtype != .f32 ? max(count, 1) : 1)
        defer { scratch.deallocate() }
        let bad = lm_adapter_tensor(Int32(t.dtype.rawValue), t.data, Int64(rows), Int64(cols), transpose ? 1 : 0, dtype.kernel, dst, scratch)
        guard bad < 0 else { throw AdapterError.malformed(path: path, reason: "tensor '\(t.name)' holds non-finite values") }
    }
}
