import Foundation
import CKernels

/// One row of a forward batch: a token of some sequence at some position.
public struct BatchRow: Sendable {
    public var token: Int32
    public var position: Int32
    /// Index into `ForwardBatch.tables` of this row's sequence block table.
    public var sequence: Int
    /// Whether logits are needed for this row (last prompt row, decode rows).
    public var wantsLogits: Bool

    public init(token: Int32, position: Int32, sequence: Int, wantsLogits: Bool) {
        self.token = token
        self.position = position
        self.sequence = sequence
        self.wantsLogits = wantsLogits
    }
}

/// Rows of many sequences run through the model in one step.
public struct ForwardBatch: Sendable {
    public var rows: [BatchRow] = []
    /// Block tables of the sequences in this batch (covering every row's position).
    public var tables: [[Int32]] = []
    /// Adapter of each sequence (parallel to `tables`; empty means none at all).
    /// Holding them here keeps every adapter alive for the whole step.
    public var adapters: [LoraAdapter?] = []
    public init() {}
    public init(rows: [BatchRow], tables: [[Int32]], adapters: [LoraAdapter?] = []) {
        self.rows = rows
        self.tables = tables
        self.adapters = adapters
    }
}

/// Which projection a matmul computes; the LoRA hook keys on it.
public enum Projection: Int, Sendable, CaseIterable {
    case q, k, v, o, gate, up, down
}

/// Llama forward pass over a batch of rows. Buffers are owned here and reused
/// across steps; kernels only receive pointers. One thread at a time.
public final class LlamaModel: @unchecked Sendable {
    public let weights: LlamaWeights
    public var config: LlamaConfig { weights.config }
    let invFreq: [Float]

    private let xBuf = FloatBuffer(), hBuf = FloatBuffer(), qBuf = FloatBuffer(), kBuf = FloatBuffer(),
                vBuf = FloatBuffer(), attnBuf = FloatBuffer(), projBuf = FloatBuffer(),
                gateBuf = FloatBuffer(), upBuf = FloatBuffer(), mmScratch = FloatBuffer(),
                attnScratch = FloatBuffer(), finalBuf = FloatBuffer(), loraScratch = FloatBuffer(),
                headIn = FloatBuffer(), headOut = FloatBuffer()

    public init(weights: LlamaWeights) {
        self.weights = weights
        let c = weights.config
        invFreq = c.ropeInverseFrequencies(factors: weights.ropeFactors)
        lm_pool_init(0)
    }

    public convenience init(path: String) throws {
        self.init(weights: try LlamaWeights.load(path: path))
    }

    /// Runs the batch, writing K/V into `cache`, and returns logits
    /// (rows that want them, in row order) as a flat (n, vocab) array.
    public func forward(_ batch: ForwardBatch, cache: KVCache) throws -> [Float] {
        // The scratch buffers are shared: callers on different threads take turns.
        forwardLock.lock()
        defer { forwardLock.unlock() }
        let c = config
        let n = batch.rows.count
        guard n > 0 else { return [] }
        let H = c.hiddenSize, Q = c.qDim, KV = c.kvDim, I = c.intermediateSize
        guard cache.kvDim == KV, cache.numLayers == c.numLayers else {
            throw EngineError.invalidArgument("KV cache shape does not match the model")
        }
        // Validate rows before touching memory.
        let tableStride = max(1, batch.tables.map(\.count).max() ?? 1)
        var positions = [Int32](repeating: 0, count: n)
        var nCtx = [Int32](repeating: 0, count: n)
        var tables = [Int32](repeating: 0, count: n * tableStride)
        for (i, r) in batch.rows.enumerated() {
            guard r.token >= 0, Int(r.token) < c.vocabSize else { throw EngineError.tokenOutOfRange(r.token, vocab: c.vocabSize) }
            guard r.sequence >= 0, r.sequence < batch.tables.count else {
                throw EngineError.invalidArgument("row \(i) names sequence \(r.sequence) without a block table")
            }
            let t = batch.tables[r.sequence]
            guard r.position >= 0, Int(r.position) < t.count * cache.blockSize else {
                throw EngineError.invalidArgument("row \(i) position \(r.position) is not covered by its block table")
            }
            for b in t where b < 0 || Int(b) >= cache.numBlocks {
                throw EngineError.invalidArgument("block id \(b) outside the KV cache")
            }
            positions[i] = r.position
            nCtx[i] = r.position + 1
            for (j, b) in t.enumerated() { tables[i * tableStride + j] = b }
        }
        let maxCtx = Int(nCtx.max() ?? 1)
        // Mistral's sliding window: a row attends to its last `w` positions.
        if let w = c.slidingWindow { nCtx += positions.map { max(0, $0 + 1 - Int32(w)) } }
        guard batch.adapters.isEmpty || batch.adapters.count == batch.tables.count else {
            throw EngineError.invalidArgument("\(batch.adapters.count) adapters for \(batch.tables.count) sequences")
        }
        let rowAdapters: [LoraAdapter?] = batch.adapters.isEmpty ? [] : batch.rows.map { batch.adapters[$0.sequence] }
        for case let a? in batch.adapters where a.modules.count != c.numLayers {
            throw EngineError.invalidArgument("adapter '\(a.name)' was built for another model")
        }
        let lora = LoraSegments(rowAdapters: rowAdapters, layers: c.numLayers)
        let loraScr = lora.isEmpty ? mmScratch.ptr
            : loraScratch.reserve(Int(lm_matmul_multi_scratch_floats(Int32(lora.maxRank), Int64(max(Q, KV, H, I)),
                                                                     Int64(max(Q + 2 * KV, 2 * I, H)), Int64(n))))
        self.lora = lora
        self.loraScratchPtr = loraScr
        defer { self.lora = nil }

        let x = xBuf.reserve(n * H), h = hBuf.reserve(n * H)
        let q = qBuf.reserve(n * Q), k = kBuf.reserve(n * KV), v = vBuf.reserve(n * KV)
        let attn = attnBuf.reserve(n * Q), proj = projBuf.reserve(n * H)
        let gate = gateBuf.reserve(n * I), up = upBuf.reserve(n * I)
        let maxIn = max(H, Q, I)
        let mm = mmScratch.reserve(Int(lm_matmul_scratch_floats(Int64(maxIn), Int64(n))))
        let ascr = attnScratch.reserve(Int(lm_attention_scratch_floats(Int64(maxCtx))))

        // Embedding lookup (dequantizes one row per token).
        let e = weights.embed
        let rowBytes = e.byteCount / e.rows
        for (i, r) in batch.rows.enumerated() {
            let adapter = rowAdapters.isEmpty ? nil : rowAdapters[i]
            if let o = adapter?.embedOverride {
                lm_dequant_row(o.dtype.kernel, o.data + Int(r.token) * H * o.dtype.size, x + i * H, Int64(H))
            } else {
                lm_dequant_row(Int32(e.dtype.rawValue), e.data + Int(r.token) * rowBytes, x + i * H, Int64(H))
            }
            if let el = adapter?.embedding {
                lm_lora_embed(x + i * H, el.aT + Int(r.token) * el.rank, el.bT, Int32(el.rank), Int64(H), el.scale)
            }
        }

        let eps = Float(c.rmsEps)
        let scale = 1.0 / sqrtf(Float(c.headDim))
        let interleaved: Int32 = weights.layout == .gguf ? 1 : 0
        let layerFloats = cache.blockSize * KV
        try positions.withUnsafeBufferPointer { pos in
            try nCtx.withUnsafeBufferPointer { ctx in
                try tables.withUnsafeBufferPointer { tbl in
                    try invFreq.withUnsafeBufferPointer { freq in
                        // nCtx holds each row's context end, then (with a window) its start.
                        let start = c.slidingWindow == nil ? nil : ctx.baseAddress! + n
                        for (l, w) in weights.layers.enumerated() {
                            linear([(w.q, .q, q), (w.k, .k, k), (w.v, .v, v)], layer: l, normOf: x, weight: w.attnNorm, eps: eps,
                                   into: h, rows: n, scratch: mm)
                            addBias(w.qBias, q, rows: n)
                            addBias(w.kBias, k, rows: n)
                            addBias(w.vBias, v, rows: n)
                            lm_rope(q, Int64(n), Int64(Q), Int32(c.numHeads), Int32(c.headDim), pos.baseAddress, freq.baseAddress, interleaved)
                            lm_rope(k, Int64(n), Int64(KV), Int32(c.numKVHeads), Int32(c.headDim), pos.baseAddress, freq.baseAddress, interleaved)
                            let layerOff = Int64(l * layerFloats)
                            lm_kv_store(cache.kPool, cache.vPool, Int64(cache.blockFloats), layerOff, Int32(cache.blockSize),
                                        tbl.baseAddress, Int64(tableStride), pos.baseAddress, k, v, Int64(KV), Int64(n), Int32(KV))
                            lm_attention(q, Int64(Q), cache.kPool, cache.vPool, Int64(cache.blockFloats), layerOff,
                                         Int32(cache.blockSize), tbl.baseAddress, Int64(tableStride), ctx.baseAddress,
                                         start, Int64(n),
                                         Int32(c.numHeads), Int32(c.numKVHeads), Int32(c.headDim), scale, attn, Int64(Q), ascr)
                            try linear(w.o, .o, layer: l, x: attn, rows: n, y: proj, scratch: mm)
                            addBias(w.oBias, proj, rows: n)
                            lm_add(x, proj, Int64(n * H))
                            linear([(w.gate, .gate, gate), (w.up, .up, up)], layer: l, normOf: x, weight: w.ffnNorm, eps: eps,
                                   into: h, rows: n, scratch: mm)
                            linear(w.down, .down, layer: l, siluOf: gate, up: up, rows: n, y: proj, scratch: mm)
                            lm_add(x, proj, Int64(n * H))
                        }
                    }
                }
            }
        }

        // Final norm and lm_head only for rows that need logits.
        let wanted = batch.rows.indices.filter { batch.rows[$0].wantsLogits }
        let m = wanted.count
        guard m > 0 else { return [] }
        let fin = finalBuf.reserve(m * H)
        for (j, i) in wanted.enumerated() {
            weights.norm.withUnsafeBufferPointer { lm_rmsnorm(x + i * H, $0.baseAddress, fin + j * H, 1, Int64(H), eps) }
        }
        let V = c.vocabSize
        var logits = [Float](repeating: 0, count: m * V)
        // Rows whose adapter replaces lm_head (modules_to_save) use that matrix instead.
        var groups: [(weight: (UnsafeRawPointer, Int32), rows: [Int])] = []
        let out = weights.output.view
        for (j, i) in wanted.enumerated() {
            let o = rowAdapters.isEmpty ? nil : rowAdapters[i]?.lmHeadOverride
            let w: (UnsafeRawPointer, Int32) = o.map { ($0.data, $0.dtype.kernel) } ?? (out.data, Int32(out.dtype.rawValue))
            if let g = groups.firstIndex(where: { $0.weight.0 == w.0 }) { groups[g].rows.append(j) } else { groups.append((w, [j])) }
        }
        let mmOut = mmScratch.reserve(Int(lm_matmul_scratch_floats(Int64(H), Int64(m))))
        logits.withUnsafeMutableBufferPointer { lp in
            if groups.count == 1 {
                lm_matmul(groups[0].weight.0, groups[0].weight.1, Int64(V), Int64(H), fin, Int64(H), Int64(m),
                          lp.baseAddress, Int64(V), mmOut)
                return
            }
            for g in groups {
                let xin = headIn.reserve(g.rows.count * H), yout = headOut.reserve(g.rows.count * V)
                for (k, j) in g.rows.enumerated() { (xin + k * H).update(from: fin + j * H, count: H) }
                lm_matmul(g.weight.0, g.weight.1, Int64(V), Int64(H), xin, Int64(H), Int64(g.rows.count), yout, Int64(V), mmOut)
                for (k, j) in g.rows.enumerated() { (lp.baseAddress! + j * V).update(from: yout + k * V, count: V) }
            }
        }
        return logits
    }

    /// y (rows, out) = x (rows, in) @ W^T. Every projection of the model goes
    /// through here or through its several-projection form below, so per-row
    /// adapter deltas have exactly one place to live: the segments of `lora`.
    @inline(__always)
    func linear(_ w: Linear, _ proj: Projection, layer: Int, x: UnsafePointer<Float>, rows: Int,
                y: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<Float>) throws {
        let v = w.view
        guard let lora, !lora.isEmpty else {
            lm_matmul(v.data, Int32(v.dtype.rawValue), Int64(w.outFeatures), Int64(w.inFeatures), x,
                      Int64(w.inFeatures), Int64(rows), y, Int64(w.outFeatures), scratch)
            return
        }
        lora.all.withUnsafeBufferPointer { all in
            let (segs, n) = lora.kernelSegments(all, layer: layer, proj)
            lm_matmul_lora(v.data, Int32(v.dtype.rawValue), Int64(w.outFeatures), Int64(w.inFeatures), x,
                           Int64(w.inFeatures), Int64(rows), y, Int64(w.outFeatures), scratch, segs, n, loraScratchPtr)
        }
    }

    /// `linear` of x = silu(gate) * up, written into `gate` first: with
    /// adapter rows, one kernel section in which one thread computes the
    /// activation row by row while the others already run those rows' LoRA
    /// chunks (the activation is serial; the other core would idle).
    func linear(_ w: Linear, _ proj: Projection, layer: Int, siluOf gate: UnsafeMutablePointer<Float>,
                up: UnsafePointer<Float>, rows: Int, y: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<Float>) {
        let v = w.view
        guard let lora, !lora.isEmpty else {
            lm_silu_mul(gate, up, Int64(rows), Int64(w.inFeatures), Int64(w.inFeatures))
            lm_matmul(v.data, Int32(v.dtype.rawValue), Int64(w.outFeatures), Int64(w.inFeatures), gate,
                      Int64(w.inFeatures), Int64(rows), y, Int64(w.outFeatures), scratch)
            return
        }
        lora.all.withUnsafeBufferPointer { all in
            let (segs, n) = lora.kernelSegments(all, layer: layer, proj)
            lm_silu_mul_matmul_lora(gate, up, Int64(w.inFeatures), v.data, Int32(v.dtype.rawValue), Int64(w.outFeatures),
                                    Int64(w.inFeatures), Int64(rows), y, Int64(w.outFeatures), scratch, segs, n, loraScratchPtr)
        }
    }

    /// Several projections of the same input (q, k, v; gate, up) in one
    /// parallel section of the kernels: one start, one join and one tail for
    /// all of them. Each output equals what `linear` gives for it alone. The
    /// input is RMSNorm(x) with `weight`, written into `h` first; with adapter
    /// rows one thread normalises row by row while the others already run
    /// those rows' LoRA chunks.
    func linear(_ ps: [(Linear, Projection, UnsafeMutablePointer<Float>)], layer: Int, normOf x: UnsafePointer<Float>,
                weight: [Float], eps: Float, into h: UnsafeMutablePointer<Float>, rows: Int, scratch: UnsafeMutablePointer<Float>) {
        let lora = self.lora.flatMap { $0.isEmpty ? nil : $0 }
        (lora?.all ?? []).withUnsafeBufferPointer { sp in
            let projs = ps.map { w, proj, y -> lm_proj in
                let v = w.view
                let (segs, n) = lora?.kernelSegments(sp, layer: layer, proj) ?? (nil, 0)
                return lm_proj(W: v.data, dtype: Int32(v.dtype.rawValue), n_out: Int64(w.outFeatures), Y: y,
                               ldy: Int64(w.outFeatures), segs: segs, n_segs: n)
            }
            weight.withUnsafeBufferPointer { wp in
                lm_rmsnorm_matmul_multi(x, wp.baseAddress, eps, h, projs, Int32(projs.count), Int64(ps[0].0.inFeatures), Int64(rows),
                                        scratch, lora == nil ? scratch : loraScratchPtr)
            }
        }
    }

    /// y (rows, bias.count) += bias in every row. The bias comes after the
    /// LoRA delta where PEFT adds it before: a rounding-level difference.
    func addBias(_ bias: [Float]?, _ y: UnsafeMutablePointer<Float>, rows: Int) {
        guard let bias else { return }
        bias.withUnsafeBufferPointer { lm_add_bias(y, Int64($0.count), $0.baseAddress, Int64(rows), Int64($0.count)) }
    }

    private let forwardLock = NSLock()

    /// Set for the duration of one forward call.
    private var lora: LoraSegments?
    private var loraScratchPtr: UnsafeMutablePointer<Float> = UnsafeMutablePointer(bitPattern: 64)!
}

/// The LoRA work of one step: for every (layer, projection), the segments of
/// consecutive rows that share an adapter having that module. Rows without an
/// adapter, or whose adapter skips the module, are in no segment. All segments
/// sit in one array ordered by (layer, projection), so building the table
/// costs two allocations rather than one per (layer, projection), and a
/// several-projection section passes pointers into it without copying.
struct LoraSegments {
    var all: [lm_lora_seg] = []
    /// Segments of (layer, projection) i are all[start[i] ..< start[i + 1]].
    var start: [Int]
    var maxRank = 0
    var isEmpty: Bool { maxRank == 0 }

    init(rowAdapters: [LoraAdapter?], layers: Int) {
        let nProj = Projection.allCases.count
        // Maximal runs of rows with the same adapter object.
        var runs: [(row0: Int, n: Int, adapter: LoraAdapter)] = []
        var i = 0
        while i < rowAdapters.count {
            guard let a = rowAdapters[i] else { i += 1; continue }
            var j = i + 1
            while j < rowAdapters.count, rowAdapters[j] === a { j += 1 }
            runs.append((i, j - i, a))
            i = j
        }
        // Count, then place: a counting sort of (run, module) on (layer, projection).
        start = [Int](repeating: 0, count: layers * nProj + 1)
        for run in runs {
            for l in 0..<min(layers, run.adapter.modules.count) {
                for p in 0..<nProj where run.adapter.modules[l][p] != nil { start[l * nProj + p + 1] += 1 }
            }
        }
        for k in 0..<(layers * nProj) { start[k + 1] += start[k] }
        guard start[layers * nProj] > 0 else { return }
        var next = start
        all = [lm_lora_seg](unsafeUninitializedCapacity: start[layers * nProj]) { buf, count in
            for run in runs {
                for l in 0..<min(layers, run.adapter.modules.count) {
                    for p in 0..<nProj {
                        guard let m = run.adapter.modules[l][p] else { continue }
                        maxRank = max(maxRank, m.rank)
                        buf.initializeElement(at: next[l * nProj + p], to: m.kernelSegment(row0: run.row0, rows: run.n))
                        next[l * nProj + p] += 1
                    }
                }
            }
            count = start[layers * nProj]
        }
    }

    /// One (layer, projection)'s segments as the kernels take them: a pointer
    /// into `all` (nil when there are none; `buf` is `all`'s buffer) and a count.
    func kernelSegments(_ buf: UnsafeBufferPointer<lm_lora_seg>, layer: Int, _ proj: Projection)
        -> (UnsafePointer<lm_lora_seg>?, Int32) {
        let k = layer * Projection.allCases.count + proj.rawValue
        let r = start[k]..<start[k + 1]
        return (r.isEmpty ? nil : buf.baseAddress! + r.lowerBound, Int32(r.count))
    }
}
