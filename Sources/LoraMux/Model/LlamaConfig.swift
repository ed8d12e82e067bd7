import Foundation

/// Hyper-parameters of a Llama-family model, read from GGUF metadata or from
/// Hugging Face's config.json, and checked when read.
public struct LlamaConfig: Sendable, Equatable, Codable {
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numLayers: Int
    public var numHeads: Int
    public var numKVHeads: Int
    public var headDim: Int
    public var vocabSize: Int
    public var ropeTheta: Double
    public var rmsEps: Double
    public var tieEmbeddings: Bool
    public var maxPositions: Int
    public var ropeScaling: RopeScaling
    /// Mistral's: each position attends to at most this many (itself included).
    public var slidingWindow: Int?
    /// Biases on q, k and v (Qwen2; Llama with attention_bias) and on o
    /// (Llama with attention_bias only).
    public var qkvBias: Bool
    public var outputBias: Bool

    public var qDim: Int { numHeads * headDim }
    public var kvDim: Int { numKVHeads * headDim }

    public init(hiddenSize: Int, intermediateSize: Int, numLayers: Int, numHeads: Int, numKVHeads: Int,
                headDim: Int, vocabSize: Int, ropeTheta: Double, rmsEps: Double, tieEmbeddings: Bool,
                maxPositions: Int, ropeScaling: RopeScaling = .none, slidingWindow: Int? = nil,
                qkvBias: Bool = false, outputBias: Bool = false) {
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.numLayers = numLayers
        self.numHeads = numHeads
        self.numKVHeads = numKVHeads
        self.headDim = headDim
        self.vocabSize = vocabSize
        self.ropeTheta = ropeTheta
        self.rmsEps = rmsEps
        self.tieEmbeddings = tieEmbeddings
        self.maxPositions = maxPositions
        self.ropeScaling = ropeScaling
        self.slidingWindow = slidingWindow
        self.qkvBias = qkvBias
        self.outputBias = outputBias
    }

    func validate(path: String) throws {
        func bad(_ why: String) -> WeightError { .malformed(path: path, reason: "invalid model config: \(why)") }
        guard hiddenSize > 0, intermediateSize > 0, numLayers > 0, numHeads > 0, numKVHeads > 0,
              headDim > 0, vocabSize > 0, maxPositions > 0 else { throw bad("sizes must be positive") }
        // Bounds keep every product of sizes (q dim, KV block sizes, buffers) far from overflow.
        guard hiddenSize <= 1 << 16, intermediateSize <= 1 << 18, numLayers <= 1024, vocabSize <= 1 << 22,
              numHeads <= 4096, maxPositions <= 1 << 24
        else { throw bad("sizes are implausibly large") }
        guard numHeads % numKVHeads == 0 else { throw bad("\(numHeads) heads not a multiple of \(numKVHeads) kv heads") }
        guard headDim % 2 == 0, headDim <= 1024 else { throw bad("head dim \(headDim) must be even and <= 1024") }
        guard ropeTheta > 0, rmsEps > 0, rmsEps < 1 else { throw bad("rope theta / rms eps out of range") }
        if let w = slidingWindow, w <= 0 { throw bad("sliding window \(w) must be positive") }
        switch ropeScaling {
        case .none: break
        case let .linear(f):
            guard f.isFinite, f > 0 else { throw bad("rope scaling factor \(f) must be positive") }
        case let .llama3(f, low, high, original):
            guard f.isFinite, f > 0, low.isFinite, low > 0, high.isFinite, high > low, original > 0 else {
                throw bad("llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0")
            }
        }
    }

    /// From GGUF metadata (`general.architecture` llama or qwen2).
    public static func from(gguf g: GGUFFile) throws -> LlamaConfig {
        let arch = try g.string("general.architecture")
        guard arch == "llama" || arch == "qwen2" else {
            throw WeightError.unsupported(path: g.path, reason: "architecture '\(arch)' (llama and qwen2 are supported)")
        }
        let p = arch + "."
        let hidden = try g.int(p + "embedding_length")
        let heads = try g.int(p + "attention.head_count")
        let kvHeads = g.metadata[p + "attention.head_count_kv"]?.intValue ?? heads
        let headDim = g.metadata[p + "attention.key_length"]?.intValue
            ?? g.metadata[p + "rope.dimension_count"]?.intValue ?? hidden / max(heads, 1)
        // llama.cpp writes Llama 3.1's scaling as a rope_freqs tensor (read with the
        // weights), linear scaling as these keys, and refuses nothing: we refuse
        // what we would otherwise compute wrongly.
        var scaling = RopeScaling.none
        switch g.metadata[p + "rope.scaling.type"]?.stringValue ?? "none" {
        case "none": break
        case "linear":
            let f = try g.double(p + "rope.scaling.factor")
            if f != 1 { scaling = .linear(factor: f) }
        case let other: throw WeightError.unsupported(path: g.path, reason: "rope scaling '\(other)'")
        }
        if let rot = g.metadata[p + "rope.dimension_count"]?.intValue, rot != headDim {
            throw WeightError.unsupported(path: g.path, reason: "RoPE over \(rot) of \(headDim) head dimensions (partial rotary)")
        }
        if let experts = g.metadata[p + "expert_count"]?.intValue, experts > 0 {
            throw WeightError.unsupported(path: g.path, reason: "mixture of experts (\(experts) experts)")
        }
        let embd = try g.tensor("token_embd.weight")
        let vocab = g.metadata[p + "vocab_size"]?.intValue ?? embd.rows
        let cfg = LlamaConfig(
            hiddenSize: hidden,
            intermediateSize: try g.int(p + "feed_forward_length"),
            numLayers: try g.int(p + "block_count"),
            numHeads: heads, numKVHeads: kvHeads, headDim: headDim, vocabSize: vocab,
            ropeTheta: g.metadata[p + "rope.freq_base"]?.doubleValue ?? 10000,
            rmsEps: try g.double(p + "attention.layer_norm_rms_epsilon"),
            tieEmbeddings: g.tensors["output.weight"] == nil,
            maxPositions: g.metadata[p + "context_length"]?.intValue ?? 2048, ropeScaling: scaling,
            // llama.cpp reads these biases wherever they are present, as we do;
            // the weights then need them in every layer.
            qkvBias: g.tensors["blk.0.attn_q.bias"] != nil, outputBias: g.tensors["blk.0.attn_output.bias"] != nil)
        try cfg.validate(path: g.path)
        return cfg
    }

    /// From a Hugging Face config.json (model_type llama, mistral or qwen2).
    public static func from(configJSON url: URL) throws -> LlamaConfig {
        let path = url.path
        guard let data = FileManager.default.contents(atPath: path) else {
            throw WeightError.io(path: path, reason: "cannot read config.json")
        }
        guard let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw WeightError.malformed(path: path, reason: "not a JSON object")
        }
        func int(_ k: String) throws -> Int {
            guard let v = (obj[k] as? NSNumber)?.intValue else { throw WeightError.missingMetadata(path: path, key: k) }
            return v
        }
        func optInt(_ k: String) -> Int? { (obj[k] as? NSNumber)?.intValue }
        let type = obj["model_type"] as? String ?? "llama"
        guard ["llama", "mistral", "qwen2"].contains(type) else {
            throw WeightError.unsupported(path: path, reason: "model_type '\(type)' (llama, mistral and qwen2 are supported)")
        }
        // transformers' Mistral masks keys more than sliding_window - 1 back;
        // null means no window, and a missing key MistralConfig's default, 4096.
        var window: Int? = nil
        if type == "mistral" {
            switch obj["sliding_window"] {
            case nil: window = 4096
            case is NSNull: window = nil
            case let w as NSNumber: window = w.intValue
            default: throw WeightError.malformed(path: path, reason: "sliding_window must be an integer or null")
            }
        }
        var theta = (obj["rope_theta"] as? NSNumber)?.doubleValue
        var ropeType: String? = nil
        var rope: [String: Any] = [:]
        // transformers 5 moved rope settings into rope_parameters.
        for key in ["rope_parameters", "rope_scaling"] {
            if let rp = obj[key] as? [String: Any] {
                if theta == nil { theta = (rp["rope_theta"] as? NSNumber)?.doubleValue }
                if let t = (rp["rope_type"] ?? rp["type"]) as? String { ropeType = t }
                rope.merge(rp) { old, _ in old }
            }
        }
        func ropeNumber(_ k: String) throws -> Double {
            guard let v = (rope[k] as? NSNumber)?.doubleValue else {
                throw WeightError.missingMetadata(path: path, key: "rope_scaling.\(k)")
            }
            return v
        }
        let scaling: RopeScaling
        switch ropeType ?? "default" {
        case "default": scaling = .none
        case "linear": scaling = .linear(factor: try ropeNumber("factor"))
        case "llama3":
            scaling = .llama3(factor: try ropeNumber("factor"), lowFreqFactor: try ropeNumber("low_freq_factor"),
                              highFreqFactor: try ropeNumber("high_freq_factor"),
                              originalMaxPositions: Int(try ropeNumber("original_max_position_embeddings")))
        case let t: throw WeightError.unsupported(path: path, reason: "rope_type '\(t)'")
        }
        if let f = ((obj["partial_rotary_factor"] ?? rope["partial_rotary_factor"]) as? NSNumber)?.doubleValue, f != 1 {
            throw WeightError.unsupported(path: path, reason: "partial_rotary_factor \(f)")
        }
        let hidden = try int("hidden_size")
        let heads = try int("num_attention_heads")
        let layers = try int("num_hidden_layers")
        // Qwen2 always has q/k/v biases and none on o; Llama has all four or none.
        let llamaBias = type == "llama" && (obj["attention_bias"] as? Bool ?? false)
        if type == "qwen2" {
            // transformers' Qwen2 windows only the layers from max_window_layers
            // on, and only with use_sliding_window; layer_types spells it out.
            var kinds = obj["layer_types"] as? [String] ?? []
            if kinds.isEmpty, obj["use_sliding_window"] as? Bool ?? false {
                let from = optInt("max_window_layers") ?? 28
                kinds = (0..<layers).map { $0 >= from ? "sliding_attention" : "full_attention" }
            }
            if let other = kinds.first(where: { $0 != "full_attention" }) {
                throw WeightError.unsupported(path: path, reason: "layer type '\(other)' (Qwen2 sliding-window layers)")
            }
        }
        let cfg = LlamaConfig(
            hiddenSize: hidden, intermediateSize: try int("intermediate_size"),
            numLayers: layers, numHeads: heads,
            numKVHeads: optInt("num_key_value_heads") ?? heads,
            headDim: optInt("head_dim") ?? hidden / max(heads, 1),
            vocabSize: try int("vocab_size"), ropeTheta: theta ?? 10000,
            rmsEps: (obj["rms_norm_eps"] as? NSNumber)?.doubleValue ?? 1e-6,
            tieEmbeddings: (obj["tie_word_embeddings"] as? Bool) ?? false,
            maxPositions: optInt("max_position_embeddings") ?? 2048, ropeScaling: scaling, slidingWindow: window,
            qkvBias: type == "qwen2" || llamaBias, outputBias: llamaBias)
        if let bias = obj["mlp_bias"] as? Bool, bias {
            throw WeightError.unsupported(path: path, reason: "mlp_bias = true")
        }
        if let act = obj["hidden_act"] as? String, act != "silu" {
            throw WeightError.unsupported(path: path, reason: "hidden_act '\(act)'")
        }
        try cfg.validate(path: path)
        return cfg
    }
}

/// How RoPE's frequencies are rescaled for a longer context, in transformers'
/// terms (`rope_type`). Only the kinds whose frequencies stay fixed per model.
public enum RopeScaling: Sendable, Equatable, Codable {
    case none
    /// Position interpolation: every frequency divided by `factor`.
    case linear(factor: Double)
    /// Llama 3.1's: wavelengths shorter than original/high kept, longer than
    /// original/low divided by `factor`, a smooth blend in between.
    case llama3(factor: Double, lowFreqFactor: Double, highFreqFactor: Double, originalMaxPositions: Int)
}

extension LlamaConfig {
    /// RoPE's inverse frequencies, one per pair of head dimensions, in f32 with
    /// transformers' order of operations so the angles match it bit for bit.
    /// `factors` is a GGUF rope_freqs tensor (llama.cpp's form of Llama 3.1's
    /// scaling): each frequency is divided by its factor, as llama.cpp does.
    public func ropeInverseFrequencies(factors: [Float]? = nil) -> [Float] {
        let half = headDim / 2
        var inv = (0..<half).map { i in 1.0 / powf(Float(ropeTheta), Float(2 * i) / Float(headDim)) }
        switch ropeScaling {
        case .none: break
        case let .linear(f):
            inv = inv.map { $0 / Float(f) }
        case let .llama3(f, low, high, original):
            // torch: `2π / t` is `t.reciprocal() * 2π`; python scalars become f32.
            let factor = Float(f), old = Float(original)
            let lowWavelen = Float(Double(original) / low), highWavelen = Float(Double(original) / high)
            let lowF = Float(low), span = Float(high - low)
            inv = inv.map { freq in
                let wavelen = (1 / freq) * Float(2 * Double.pi)
                if wavelen < highWavelen { return freq }
                if wavelen > lowWavelen { return freq / factor }
                let smooth = ((1 / wavelen) * old - lowF) / span
                return (1 - smooth) * freq / factor + smooth * freq
            }
        }
        if let factors { for i in inv.indices { inv[i] /= factors[i] } }
        return inv
    }
}
