import Foundation
import CKernels

/// The pieces of an adapter, independent of the file it came from.
public enum AdapterPart: Hashable, Sendable {
    case loraA(layer: Int, proj: Projection)       // (rank, in)
    case loraBT(layer: Int, proj: Projection)      // (rank, out), Hugging Face row order
    case magnitude(layer: Int, proj: Projection)   // (out,) f32, Hugging Face row order
    case embedAT                                   // (vocab, rank) f32
    case embedBT                                   // (rank, hidden) f32
    case embedTokens                               // (vocab, hidden) replacement
    case lmHead                                    // (vocab, hidden) replacement

    /// Stable name used in packed files.
    public var key: String {
        switch self {
        case let .loraA(l, p): return "layers.\(l).\(p.name).A"
        case let .loraBT(l, p): return "layers.\(l).\(p.name).BT"
        case let .magnitude(l, p): return "layers.\(l).\(p.name).magnitude"
        case .embedAT: return "embed_tokens.lora.AT"
        case .embedBT: return "embed_tokens.lora.BT"
        case .embedTokens: return "embed_tokens.weight"
        case .lmHead: return "lm_head.weight"
        }
    }

    public init?(key: String) {
        switch key {
        case "embed_tokens.lora.AT": self = .embedAT; return
        case "embed_tokens.lora.BT": self = .embedBT; return
        case "embed_tokens.weight": self = .embedTokens; return
        case "lm_head.weight": self = .lmHead; return
        default: break
        }
        let f = key.split(separator: ".")
        guard f.count == 4, f[0] == "layers", let l = Int(f[1]), l >= 0, let p = Projection(name: String(f[2])) else { return nil }
        switch f[3] {
        case "A": self = .loraA(layer: l, proj: p)
        case "BT": self = .loraBT(layer: l, proj: p)
        case "magnitude": self = .magnitude(layer: l, proj: p)
        default: return nil
        }
    }
}

extension Projection {
    public var name: String {
        switch self {
        case .q: return "q_proj"
        case .k: return "k_proj"
        case .v: return "v_proj"
        case .o: return "o_proj"
        case .gate: return "gate_proj"
        case .up: return "up_proj"
        case .down: return "down_proj"
        }
    }
    public init?(name: String) {
        guard let p = Projection.allCases.first(where: { $0.name == name }) else { return nil }
        self = p
    }
    /// Hugging Face module path inside the base model.
    public func modulePath(layer: Int) -> String {
        let block = (self == .gate || self == .up || self == .down) ? "mlp" : "self_attn"
        return "model.layers.\(layer).\(block).\(name)"
    }
    public func shape(_ c: BaseShape) -> (out: Int, in: Int) {
        switch self {
        case .q: return (c.qDim, c.hiddenSize)
        case .k, .v: return (c.kvDim, c.hiddenSize)
        case .o: return (c.hiddenSize, c.qDim)
        case .gate, .up: return (c.intermediateSize, c.hiddenSize)
        case .down: return (c.hiddenSize, c.intermediateSize)
        }
    }
    public func shape(_ c: LlamaConfig) -> (out: Int, in: Int) { shape(c.shape) }
}

/// The dimensions an adapter depends on. From a base model every field is
/// known; inferred from an adapter's own tensors, unknown fields are 0.
public struct BaseShape: Sendable, Equatable, Codable {
    public var numLayers: Int
    public var hiddenSize: Int
    public var qDim: Int
    public var kvDim: Int
    public var intermediateSize: Int
    public var vocabSize: Int

    enum CodingKeys: String, CodingKey {
        case numLayers = "num_layers", hiddenSize = "hidden_size", qDim = "q_dim", kvDim = "kv_dim"
        case intermediateSize = "intermediate_size", vocabSize = "vocab_size"
    }

    /// Fields that disagree with `base` (unknown fields never disagree; the
    /// layer count here is a lower bound).
    public func mismatches(_ base: BaseShape) -> [String] {
        var out: [String] = []
        if numLayers > base.numLayers { out.append("needs \(numLayers) layers, the base has \(base.numLayers)") }
        for (name, a, b) in [("hidden size", hiddenSize, base.hiddenSize), ("q dim", qDim, base.qDim), ("kv dim", kvDim, base.kvDim),
                             ("intermediate size", intermediateSize, base.intermediateSize), ("vocab size", vocabSize, base.vocabSize)]
        where a != 0 && a != b {
            out.append("\(name) \(a), the base has \(b)")
        }
        return out
    }
}

extension LlamaConfig {
    public var shape: BaseShape {
        BaseShape(numLayers: numLayers, hiddenSize: hiddenSize, qDim: qDim, kvDim: kvDim,
                  intermediateSize: intermediateSize, vocabSize: vocabSize)
    }
}

/// What an adapter holds, with ranks and scales resolved, checked against a base.
public struct AdapterPlan: Sendable {
    public struct Module: Sendable, Equatable {
        public var layer: Int
        public var proj: Projection
        public var rank: Int
        public var scale: Float
        public var dora: Bool
    }
    public var config: LoraConfig
    public var modules: [Module]
    public var embedding: (rank: Int, scale: Float)?
    public var embedOverride = false
    public var lmHeadOverride = false
    public var dtype: AdapterDType

    /// Every part with its element type and shape, in a fixed order.
    public func parts(_ c: BaseShape) -> [(part: AdapterPart, dtype: AdapterDType, shape: [Int])] {
        var out: [(AdapterPart, AdapterDType, [Int])] = []
        for m in modules {
            let s = m.proj.shape(c)
            out.append((.loraA(layer: m.layer, proj: m.proj), dtype, [m.rank, s.in]))
            out.append((.loraBT(layer: m.layer, proj: m.proj), dtype, [m.rank, s.out]))
            if m.dora { out.append((.magnitude(layer: m.layer, proj: m.proj), .f32, [s.out])) }
        }
        if let e = embedding {
            out.append((.embedAT, .f32, [c.vocabSize, e.rank]))
            out.append((.embedBT, .f32, [e.rank, c.hiddenSize]))
        }
        if embedOverride { out.append((.embedTokens, dtype, [c.vocabSize, c.hiddenSize])) }
        if lmHeadOverride { out.append((.lmHead, dtype, [c.vocabSize, c.hiddenSize])) }
        return out
    }

    func validate(against c: BaseShape, path: String) throws {
        var seen = Set<String>()
        for m in modules {
            guard m.layer < c.numLayers else {
                throw AdapterError.wrongBase(path: path, reason: "module \(m.proj.modulePath(layer: m.layer)) but the base has \(c.numLayers) layers", hint: config.baseModel)
            }
            guard m.rank > 0, m.rank <= 4096, m.scale.isFinite else {
                throw AdapterError.malformed(path: path, reason: "\(m.proj.modulePath(layer: m.layer)) has rank \(m.rank) / scale \(m.scale)")
            }
            guard seen.insert(m.proj.modulePath(layer: m.layer)).inserted else {
                throw AdapterError.malformed(path: path, reason: "\(m.proj.modulePath(layer: m.layer)) appears twice")
            }
        }
    }
}

final class FillFailures: @unchecked Sendable {
    private let lock = NSLock()
    private var errors: [Error] = []
    func add(_ e: Error) { lock.lock(); errors.append(e); lock.unlock() }
    var first: Error? { lock.lock(); defer { lock.unlock() }; return errors.first }
}

/// Turns an `AdapterPlan` plus a way to fill each part into a `LoraAdapter`
/// laid out for the kernels and for this base model.
enum AdapterBuilder {
    /// `fill(part, dtype, elementCount, destination)` writes exactly that many
    /// elements; it is called from several threads at once, for distinct parts.
    static func build(name: String, source: String, plan: AdapterPlan, base: LlamaWeights, content: AdapterContentKey? = nil,
                      fill: @Sendable (AdapterPart, AdapterDType, Int, UnsafeMutableRawPointer) throws -> Void) throws -> LoraAdapter {
        let c = base.config
        try plan.validate(against: c.shape, path: source)
        var layout = ArenaBuilder()
        var offsets: [AdapterPart: Int] = [:]
        let parts = plan.parts(c.shape)
        for (part, dtype, shape) in parts {
            offsets[part] = layout.reserve(shape.reduce(1, *) * dtype.size)
        }
        // DoRA factors are derived, not stored in files.
        var doraOffsets: [Int: Int] = [:]
        for (i, m) in plan.modules.enumerated() where m.dora {
            doraOffsets[i] = layout.reserve(m.proj.shape(c).out * 4)
        }
        let bytes = max(layout.size, 64)
        let block = Arena.allocate(bytes)
        let arena = block.pointer
        var ok = false
        defer { if !ok { block.free() } }

        // Fill parts on every core: decompression, checksums and first-touch
        // page faults of a 10 MB arena are most of a cold load.
        let failures = FillFailures()
        let workers = min(max(1, ProcessInfo.processInfo.activeProcessorCount), 8, max(1, parts.count))
        let totalBytes = parts.reduce(0) { $0 + $1.shape.reduce(1, *) * $1.dtype.size }
        var shares = [[Int]](repeating: [], count: workers)
        var acc = 0
        for (i, p) in parts.enumerated() {
            shares[min(workers - 1, acc * workers / max(totalBytes, 1))].append(i)
            acc += p.shape.reduce(1, *) * p.dtype.size
        }
        // The workers also put each A and Bᵀ into the kernels' blocked layouts
        // (and, on GGUF bases, Bᵀ's q/k columns into the permuted row order)
        // as soon as it lands. DoRA modules are left to the serial pass below:
        // their norms read the plain layouts.
        var kernelLayout: [AdapterPart: (rank: Int, cols: Int, heads: Int)] = [:]
        var tmpBytes = 0
        for m in plan.modules where !m.dora {
            let s = m.proj.shape(c)
            kernelLayout[.loraA(layer: m.layer, proj: m.proj)] = (m.rank, s.in, 0)
            kernelLayout[.loraBT(layer: m.layer, proj: m.proj)] = (m.rank, s.out, base.layout == .gguf ? Self.ropeHeads(m.proj, c) : 0)
            tmpBytes = max(tmpBytes, m.rank * max(s.in, s.out) * plan.dtype.size)
        }
        let arenaAddr = UInt(bitPattern: arena)   // an address, to cross into the workers
        let offs = offsets, work = shares, toLayout = kernelLayout, tmpSize = tmpBytes, headDim = c.headDim
        withoutActuallyEscaping(fill) { fill in
            DispatchQueue.concurrentPerform(iterations: workers) { w in
                let dst = UnsafeMutableRawPointer(bitPattern: arenaAddr)!
                let tmp = UnsafeMutableRawPointer.allocate(byteCount: max(tmpSize, 64), alignment: 64)
                defer { tmp.deallocate() }
                for i in work[w] {
                    let (part, dtype, shape) = parts[i]
                    do {
                        try fill(part, dtype, shape.reduce(1, *), dst + offs[part]!)
                        if let l = toLayout[part] {
                            Self.toKernelLayout(part, dst + offs[part]!, rank: l.rank, cols: l.cols, heads: l.heads,
                                                headDim: headDim, dtype: dtype, scratch: tmp)
                        }
                    } catch { failures.add(error) }
                }
            }
        }
        if let e = failures.first { throw e }

        var modules = [[LoraModule?]](repeating: [LoraModule?](repeating: nil, count: Projection.allCases.count), count: c.numLayers)
        for (i, m) in plan.modules.enumerated() {
            let s = m.proj.shape(c)
            let aPtr = arena + offsets[.loraA(layer: m.layer, proj: m.proj)]!
            let btPtr = arena + offsets[.loraBT(layer: m.layer, proj: m.proj)]!
            var dora: UnsafePointer<Float>? = nil
            if m.dora {
                // B's rows (columns of Bᵀ) and the magnitudes into the GGUF base's
                // row order, the norms from the plain layouts, then the kernels' blocking.
                let heads = base.layout == .gguf ? Self.ropeHeads(m.proj, c) : 0
                let magnitude = arena + offsets[.magnitude(layer: m.layer, proj: m.proj)]!
                if heads > 0 { permuteColumns(magnitude, rows: 1, cols: s.out, headDim: c.headDim, dtype: .f32) }
                let tmp = UnsafeMutableRawPointer.allocate(byteCount: m.rank * max(s.in, s.out) * plan.dtype.size, alignment: 64)
                defer { tmp.deallocate() }
                if heads > 0 { permuteColumns(btPtr, rows: m.rank, cols: s.out, headDim: c.headDim, dtype: plan.dtype) }
                let g = (arena + doraOffsets[i]!).assumingMemoryBound(to: Float.self)
                try doraFactors(into: g, module: m, a: aPtr, bT: btPtr, dtype: plan.dtype,
                                magnitude: magnitude.assumingMemoryBound(to: Float.self), base: base, path: source)
                dora = UnsafePointer(g)
                toKernelLayout(.loraA(layer: m.layer, proj: m.proj), aPtr, rank: m.rank, cols: s.in, heads: 0,
                               headDim: c.headDim, dtype: plan.dtype, scratch: tmp)
                toKernelLayout(.loraBT(layer: m.layer, proj: m.proj), btPtr, rank: m.rank, cols: s.out, heads: 0,
                               headDim: c.headDim, dtype: plan.dtype, scratch: tmp)
            }
            modules[m.layer][m.proj.rawValue] = LoraModule(rank: m.rank, inFeatures: s.in, outFeatures: s.out, scale: m.scale,
                                                           dtype: plan.dtype, a: UnsafeRawPointer(aPtr), bT: UnsafeRawPointer(btPtr), dora: dora)
        }
        var embedding: EmbeddingLora? = nil
        if let e = plan.embedding {
            embedding = EmbeddingLora(rank: e.rank, vocab: c.vocabSize, hidden: c.hiddenSize, scale: e.scale,
                                      aT: UnsafePointer((arena + offsets[.embedAT]!).assumingMemoryBound(to: Float.self)),
                                      bT: UnsafePointer((arena + offsets[.embedBT]!).assumingMemoryBound(to: Float.self)))
        }
        func replaced(_ p: AdapterPart) -> ReplacedMatrix? {
            offsets[p].map { ReplacedMatrix(rows: c.vocabSize, cols: c.hiddenSize, dtype: plan.dtype, data: UnsafeRawPointer(arena + $0)) }
        }
        let adapter = LoraAdapter(name: name, source: source, config: plan.config, modules: modules, embedding: embedding,
                                  embedOverride: replaced(.embedTokens), lmHeadOverride: replaced(.lmHead),
                                  arena: block, content: content)
        ok = true
        return adapter
    }

    /// GGUF bases store q/k rows permuted for interleaved RoPE; B's rows follow.
    static func ropeHeads(_ proj: Projection, _ c: LlamaConfig) -> Int {
        proj == .q ? c.numHeads : (proj == .k ? c.numKVHeads : 0)
    }

    /// A or Bᵀ (rank, cols) as filled → the layout the kernels read (see
    /// kernels.h); `heads` > 0 first permutes Bᵀ's columns for a GGUF base.
    /// scratch: rank * cols elements.
    static func toKernelLayout(_ part: AdapterPart, _ p: UnsafeMutableRawPointer, rank: Int, cols: Int, heads: Int,
                               headDim: Int, dtype: AdapterDType, scratch: UnsafeMutableRawPointer) {
        if heads > 0 { permuteColumns(p, rows: rank, cols: cols, headDim: headDim, dtype: dtype) }
        scratch.copyMemory(from: p, byteCount: rank * cols * dtype.size)
        if case .loraA = part { lm_lora_block_a(scratch, p, Int32(rank), Int64(cols), dtype.kernel) }
        else { lm_lora_block_bt(scratch, p, Int32(rank), Int64(cols), dtype.kernel) }
    }

    /// GGUF row g = h*hd + 2i + t holds Hugging Face row h*hd + t*hd/2 + i.
    static func permuteColumns(_ p: UnsafeMutableRawPointer, rows: Int, cols: Int, headDim: Int, dtype: AdapterDType) {
        lm_rope_permute_cols(p, Int64(rows), Int64(cols), Int64(headDim), Int32(dtype.size))
    }

    /// g = magnitude / ||W + scale · B A|| per output row, with W in the base's
    /// own (possibly permuted) row order and B already permuted to match.
    static func doraFactors(into g: UnsafeMutablePointer<Float>, module m: AdapterPlan.Module, a: UnsafeRawPointer,
                            bT: UnsafeRawPointer, dtype: AdapterDType, magnitude: UnsafePointer<Float>,
                            base: LlamaWeights, path: String) throws {
        let c = base.config
        let s = m.proj.shape(c)
        let layer = base.layers[m.layer]
        let w: Linear = [layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down][m.proj.rawValue]
        var aF = [Float](repeating: 0, count: m.rank * s.in)
        var bF = [Float](repeating: 0, count: s.out * m.rank)   // B (out, rank), from Bᵀ (rank, out)
        var convert = [Float](repeating: 0, count: max(aF.count, bF.count))
        // f32 copies of A and B (Bᵀ transposed back); both were checked finite when filled.
        _ = lm_adapter_tensor(dtype.kernel, a, 1, Int64(aF.count), 0, Int32(LM_F32), &aF, &convert)
        _ = lm_adapter_tensor(dtype.kernel, bT, Int64(m.rank), Int64(s.out), 1, Int32(LM_F32), &bF, &convert)
        var norms = [Float](repeating: 0, count: s.out)
        var scratch = [Float](repeating: 0, count: s.in)
        lm_dora_norms(w.view.data, Int32(w.view.dtype.rawValue), Int64(s.out), Int64(s.in), aF, bF, Int32(m.rank), m.scale, &norms, &scratch)
        for o in 0..<s.out {
            guard norms[o] > 0, norms[o].isFinite, magnitude[o].isFinite else {
                throw AdapterError.malformed(path: path, reason: "DoRA weight norm of \(m.proj.modulePath(layer: m.layer)) row \(o) is \(norms[o])")
            }
            g[o] = magnitude[o] / norms[o]
        }
    }
}
