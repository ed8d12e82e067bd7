import Foundation
import CKernels

/// A projection weight `W (out, in)` read in place from its file.
public struct Linear: @unchecked Sendable {
    public let view: TensorView
    public var outFeatures: Int { view.rows }
    public var inFeatures: Int { view.cols }
}

public struct LayerWeights: @unchecked Sendable {
    public let attnNorm: [Float]   // (hidden,)
    public let q: Linear           // (heads*head_dim, hidden)
    public let k: Linear           // (kv_heads*head_dim, hidden)
    public let v: Linear           // (kv_heads*head_dim, hidden)
    public let o: Linear           // (hidden, heads*head_dim)
    public let ffnNorm: [Float]    // (hidden,)
    public let gate: Linear        // (intermediate, hidden)
    public let up: Linear          // (intermediate, hidden)
    public let down: Linear        // (hidden, intermediate)
    /// Added to the projections' outputs when the model has them (config.qkvBias / outputBias).
    public var qBias: [Float]? = nil, kBias: [Float]? = nil, vBias: [Float]? = nil, oBias: [Float]? = nil
}

/// The q/k row order of the base weights, which decides how RoPE pairs
/// dimensions (and how an adapter's B rows must be ordered).
public enum WeightLayout: String, Sendable {
    /// llama.cpp's GGUF of arch llama: q/k rows permuted so RoPE rotates adjacent pairs.
    case gguf
    /// Hugging Face's (also GGUF of arch qwen2): RoPE rotates halves (rotate_half).
    case huggingFace
}

/// All tensors of a Llama model. Large matrices stay in the file mapping;
/// only the norm vectors (a few KB per layer) are converted to f32 arrays.
public final class LlamaWeights: @unchecked Sendable {
    public let config: LlamaConfig
    public let layout: WeightLayout
    public let path: String
    public let embed: TensorView      // (vocab, hidden)
    public let layers: [LayerWeights]
    public let norm: [Float]          // (hidden,)
    public let output: Linear         // (vocab, hidden); the embedding when tied
    /// A GGUF's rope_freqs tensor (head_dim/2 divisors of RoPE's frequencies).
    public let ropeFactors: [Float]?
    /// Keeps mapped files alive.
    let owners: [AnyObject]
    /// The GGUF file, when loaded from one (tokenizer metadata lives there).
    public let gguf: GGUFFile?

    /// Loads a `.gguf` file or a Hugging Face directory (config.json + safetensors).
    public static func load(path: String) throws -> LlamaWeights {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw WeightError.io(path: path, reason: "no such file or directory")
        }
        if isDir.boolValue { return try LlamaWeights(huggingFaceDirectory: path) }
        return try LlamaWeights(gguf: GGUFFile(path: path))
    }

    public init(gguf g: GGUFFile) throws {
        let cfg = try LlamaConfig.from(gguf: g)
        config = cfg
        // convert_hf_to_gguf permutes q/k rows for llama only; qwen2 keeps
        // Hugging Face's rows and llama.cpp rotates them as NEOX (halves).
        layout = g.metadata["general.architecture"]?.stringValue == "llama" ? .gguf : .huggingFace
        path = g.path
        gguf = g
        owners = [g]
        func t(_ name: String) throws -> TensorView { try g.tensor(name) }
        embed = try Self.check(t("token_embd.weight"), [cfg.vocabSize, cfg.hiddenSize], path)
        if let f = g.tensors["rope_freqs.weight"] {
            let factors = try Self.vector(f, cfg.headDim / 2, path)
            guard factors.allSatisfy({ $0 > 0 }) else {
                throw WeightError.malformed(path: path, reason: "tensor 'rope_freqs.weight' holds a factor <= 0")
            }
            ropeFactors = factors
        } else {
            ropeFactors = nil
        }
        var ls: [LayerWeights] = []
        for i in 0..<cfg.numLayers {
            let p = "blk.\(i)."
            ls.append(try Self.layer(cfg, path: path,
                attnNorm: t(p + "attn_norm.weight"), q: t(p + "attn_q.weight"), k: t(p + "attn_k.weight"),
                v: t(p + "attn_v.weight"), o: t(p + "attn_output.weight"), ffnNorm: t(p + "ffn_norm.weight"),
                gate: t(p + "ffn_gate.weight"), up: t(p + "ffn_up.weight"), down: t(p + "ffn_down.weight"),
                biases: { try t(p + "attn_\($0).bias") }, oBiasName: "output"))
        }
        layers = ls
        norm = try Self.vector(t("output_norm.weight"), cfg.hiddenSize, path)
        let out = g.tensors["output.weight"] ?? embed
        output = Linear(view: try Self.check(out, [cfg.vocabSize, cfg.hiddenSize], path))
        try Self.refuseUnknown(g.tensors.keys, path: path, layers: cfg.numLayers, prefix: "blk.",
                               global: ["token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"],
                               perLayer: Set<String>(["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                          "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                                          "ffn_down.weight"])
                                   .union(Self.biasNames(cfg, oBiasName: "output") { "attn_\($0).bias" }))
    }

    public init(huggingFaceDirectory dir: String) throws {
        let url = URL(fileURLWithPath: dir)
        let cfg = try LlamaConfig.from(configJSON: url.appendingPathComponent("config.json"))
        let st = try SafetensorsCollection(directory: dir)
        config = cfg
        layout = .huggingFace
        path = dir
        gguf = nil
        owners = st.files
        func t(_ name: String) throws -> TensorView { try st.tensor(name) }
        ropeFactors = nil
        embed = try Self.check(t("model.embed_tokens.weight"), [cfg.vocabSize, cfg.hiddenSize], dir)
        var ls: [LayerWeights] = []
        for i in 0..<cfg.numLayers {
            let p = "model.layers.\(i)."
            ls.append(try Self.layer(cfg, path: dir,
                attnNorm: t(p + "input_layernorm.weight"), q: t(p + "self_attn.q_proj.weight"),
                k: t(p + "self_attn.k_proj.weight"), v: t(p + "self_attn.v_proj.weight"),
                o: t(p + "self_attn.o_proj.weight"), ffnNorm: t(p + "post_attention_layernorm.weight"),
                gate: t(p + "mlp.gate_proj.weight"), up: t(p + "mlp.up_proj.weight"), down: t(p + "mlp.down_proj.weight"),
                biases: { try t(p + "self_attn.\($0)_proj.bias") }, oBiasName: "o"))
        }
        layers = ls
        norm = try Self.vector(t("model.norm.weight"), cfg.hiddenSize, dir)
        let out = cfg.tieEmbeddings ? (st.tensors["lm_head.weight"] ?? embed) : try t("lm_head.weight")
        output = Linear(view: try Self.check(out, [cfg.vocabSize, cfg.hiddenSize], dir))
        // Old checkpoints saved each layer's rotary inv_freq; it is recomputed from the config.
        try Self.refuseUnknown(st.tensors.keys, path: dir, layers: cfg.numLayers, prefix: "model.layers.",
                               global: ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
                               perLayer: Set<String>(["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                          "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                          "mlp.down_proj.weight", "self_attn.rotary_emb.inv_freq"])
                                   .union(Self.biasNames(cfg, oBiasName: "o") { "self_attn.\($0)_proj.bias" }))
    }

    private static func layer(_ c: LlamaConfig, path: String, attnNorm: TensorView, q: TensorView, k: TensorView,
                              v: TensorView, o: TensorView, ffnNorm: TensorView, gate: TensorView,
                              up: TensorView, down: TensorView, biases: (String) throws -> TensorView,
                              oBiasName: String) throws -> LayerWeights {
        var l = LayerWeights(
            attnNorm: try vector(attnNorm, c.hiddenSize, path),
            q: Linear(view: try check(q, [c.qDim, c.hiddenSize], path)),
            k: Linear(view: try check(k, [c.kvDim, c.hiddenSize], path)),
            v: Linear(view: try check(v, [c.kvDim, c.hiddenSize], path)),
            o: Linear(view: try check(o, [c.hiddenSize, c.qDim], path)),
            ffnNorm: try vector(ffnNorm, c.hiddenSize, path),
            gate: Linear(view: try check(gate, [c.intermediateSize, c.hiddenSize], path)),
            up: Linear(view: try check(up, [c.intermediateSize, c.hiddenSize], path)),
            down: Linear(view: try check(down, [c.hiddenSize, c.intermediateSize], path)))
        if c.qkvBias {
            l.qBias = try vector(biases("q"), c.qDim, path)
            l.kBias = try vector(biases("k"), c.kvDim, path)
            l.vBias = try vector(biases("v"), c.kvDim, path)
        }
        if c.outputBias { l.oBias = try vector(biases(oBiasName), c.hiddenSize, path) }
        return l
    }

    /// The per-layer bias tensor names the config expects, `name(projection)` each.
    static func biasNames(_ c: LlamaConfig, oBiasName: String, _ name: (String) -> String) -> Set<String> {
        Set((c.qkvBias ? ["q", "k", "v"] : []).map(name) + (c.outputBias ? [name(oBiasName)] : []))
    }

    /// A tensor the forward pass would not read (a bias, a fused or expert
    /// matrix, a layer past the count) means a model we would run wrongly, so
    /// it is refused by name rather than ignored. Checked after the tensors
    /// we need, so a renamed one is reported as missing.
    static func refuseUnknown(_ names: Dictionary<String, TensorView>.Keys, path: String, layers: Int, prefix: String,
                              global: Set<String>, perLayer: Set<String>) throws {
        for name in names.sorted() where !global.contains(name) {
            if name.hasPrefix(prefix) {
                let rest = name.dropFirst(prefix.count)
                if let dot = rest.firstIndex(of: "."), let i = Int(rest[..<dot]), i >= 0, i < layers,
                   String(rest[..<dot]) == String(i), perLayer.contains(String(rest[rest.index(after: dot)...])) {
                    continue
                }
            }
            let what = name.hasSuffix(".bias") ? "bias tensor" : "tensor"
            throw WeightError.unsupported(path: path, reason: "\(what) '\(name)' (not part of a Llama model this server runs)")
        }
    }

    static func check(_ t: TensorView, _ shape: [Int], _ path: String) throws -> TensorView {
        guard t.shape == shape else {
            throw WeightError.badShape(path: path, tensor: t.name, expected: shape, found: t.shape)
        }
        return t
    }

    static func vector(_ t: TensorView, _ n: Int, _ path: String) throws -> [Float] {
        guard t.shape == [n] else { throw WeightError.badShape(path: path, tensor: t.name, expected: [n], found: t.shape) }
        var out = [Float](repeating: 0, count: n)
        out.withUnsafeMutableBufferPointer { lm_dequant_row_ref(Int32(t.dtype.rawValue), t.data, $0.baseAddress, Int64(n)) }
        guard out.allSatisfy({ $0.isFinite }) else {
            throw WeightError.malformed(path: path, reason: "tensor '\(t.name)' holds non-finite values")
        }
        return out
    }

    /// Bytes of weight data this model reads per token (every matrix once).
    public var weightBytes: Int {
        var n = output.view.byteCount
        for l in layers {
            n += [l.q, l.k, l.v, l.o, l.gate, l.up, l.down].reduce(0) { $0 + $1.view.byteCount }
        }
        return n
    }
}
