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

    public var qDim: Int { numHeads * headDim }
    public var kvDim: Int { numKVHeads * headDim }

    public init(hiddenSize: Int, intermediateSize: Int, numLayers: Int, numHeads: Int, numKVHeads: Int,
                headDim: Int, vocabSize: Int, ropeTheta: Double, rmsEps: Double, tieEmbeddings: Bool,
                maxPositions: Int) {
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
    }

    /// From GGUF metadata (`general.architecture` must be llama).
    public static func from(gguf g: GGUFFile) throws -> LlamaConfig {
        let arch = try g.string("general.architecture")
        guard arch == "llama" else {
            throw WeightError.unsupported(path: g.path, reason: "architecture '\(arch)' (only llama is supported)")
        }
        let p = "llama."
        let hidden = try g.int(p + "embedding_length")
        let heads = try g.int(p + "attention.head_count")
        let kvHeads = g.metadata[p + "attention.head_count_kv"]?.intValue ?? heads
        let headDim = g.metadata[p + "attention.key_length"]?.intValue
            ?? g.metadata[p + "rope.dimension_count"]?.intValue ?? hidden / max(heads, 1)
        if let scaling = g.metadata[p + "rope.scaling.type"]?.stringValue, scaling != "none" {
            throw WeightError.unsupported(path: g.path, reason: "rope scaling '\(scaling)'")
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
            maxPositions: g.metadata[p + "context_length"]?.intValue ?? 2048)
        try cfg.validate(path: g.path)
        return cfg
    }

    /// From a Hugging Face config.json (model_type llama).
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
        guard type == "llama" else {
            throw WeightError.unsupported(path: path, reason: "model_type '\(type)' (only llama is supported)")
        }
        var theta = (obj["rope_theta"] as? NSNumber)?.doubleValue
        var ropeType: String? = nil
        // transformers 5 moved rope settings into rope_parameters.
        for key in ["rope_parameters", "rope_scaling"] {
            if let rp = obj[key] as? [String: Any] {
                if theta == nil { theta = (rp["rope_theta"] as? NSNumber)?.doubleValue }
                if let t = (rp["rope_type"] ?? rp["type"]) as? String { ropeType = t }
            }
        }
        if let t = ropeType, t != "default" {
            throw WeightError.unsupported(path: path, reason: "rope_type '\(t)'")
        }
        let hidden = try int("hidden_size")
        let heads = try int("num_attention_heads")
        let cfg = LlamaConfig(
            hiddenSize: hidden, intermediateSize: try int("intermediate_size"),
            numLayers: try int("num_hidden_layers"), numHeads: heads,
            numKVHeads: optInt("num_key_value_heads") ?? heads,
            headDim: optInt("head_dim") ?? hidden / max(heads, 1),
            vocabSize: try int("vocab_size"), ropeTheta: theta ?? 10000,
            rmsEps: (obj["rms_norm_eps"] as? NSNumber)?.doubleValue ?? 1e-6,
            tieEmbeddings: (obj["tie_word_embeddings"] as? Bool) ?? false,
            maxPositions: optInt("max_position_embeddings") ?? 2048)
        if let bias = obj["attention_bias"] as? Bool, bias {
            throw WeightError.unsupported(path: path, reason: "attention_bias = true")
        }
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
