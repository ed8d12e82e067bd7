import XCTest
import CKernels

/// Fast kernels against their portable references, at every CPU level this
/// machine supports.
final class KernelTests: XCTestCase {
    struct LCG {
        var s: UInt64
        mutating func next() -> UInt64 { s = s &* 6364136223846793005 &+ 1442695040888963407; return s >> 11 }
        mutating func uniform() -> Float { Float(next() % 1_000_000) / 1_000_000 }
        mutating func sym() -> Float { uniform() * 2 - 1 }
        mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }
        /// n values sym() * scale, as f16.
        mutating func f16(_ n: Int, scale: Float) -> [UInt16] {
            var o = [UInt16](repeating: 0, count: n)
            lm_f32_to_f16_n((0..<n).map { _ in sym() * scale }, &o, Int64(n))
            return o
        }
    }

    /// Largest |a - b| / max(1, |b|) over the pairs.
    static func maxRelErr<A: Sequence, B: Sequence>(_ a: A, _ b: B) -> Float where A.Element == Float, B.Element == Float {
        zip(a, b).map { abs($0 - $1) / max(1, abs($1)) }.max()!
    }

    static let levels: [Int32] = (0...lm_cpu_detect()).map { $0 }

    override func tearDown() { lm_cpu_set_level(lm_cpu_detect()); lm_matmul_set_gemv_max_rows(-1) }

    /// Random but well-formed blocks of `dtype` for a (rows, cols) matrix.
    static func randomMatrix(_ dtype: Int32, rows: Int, cols: Int, seed: UInt64) -> [UInt8] {
        var g = LCG(s: seed)
        let bs = Int(lm_block_size(dtype)), bb = lm_block_bytes(dtype)
        let nBlocks = rows * cols / bs
        var out = [UInt8](repeating: 0, count: nBlocks * bb)
        func put16(_ v: UInt16, _ at: Int) { out[at] = UInt8(v & 0xff); out[at + 1] = UInt8(v >> 8) }
        for b in 0..<nBlocks {
            let o = b * bb
            switch dtype {
            case Int32(LM_F32):
                let v = g.sym().bitPattern
                for k in 0..<4 { out[o + k] = UInt8((v >> (8 * UInt32(k))) & 0xff) }
            case Int32(LM_F16): put16(lm_f32_to_f16(g.sym()), o)
            case Int32(LM_BF16): put16(UInt16(g.sym().bitPattern >> 16), o)
            case Int32(LM_Q4_0), Int32(LM_Q5_0), Int32(LM_Q8_0):
                put16(lm_f32_to_f16(0.001 + 0.05 * g.uniform()), o)
                for k in 2..<bb { out[o + k] = g.byte() }
            case Int32(LM_IQ4_NL), Int32(LM_IQ4_XS):  // grid values up to 127 (times a 6-bit scale for XS)
                put16(lm_f32_to_f16(0.0001 + 0.002 * g.uniform()), o)
                for k in 2..<bb { out[o + k] = g.byte() }
            case Int32(LM_Q4_1), Int32(LM_Q5_1):
                put16(lm_f32_to_f16(0.001 + 0.05 * g.uniform()), o)
                put16(lm_f32_to_f16(-0.4 * g.uniform()), o + 2)
                for k in 4..<bb { out[o + k] = g.byte() }
            case Int32(LM_Q4_K), Int32(LM_Q5_K):
                put16(lm_f32_to_f16(0.001 + 0.01 * g.uniform()), o)
                put16(lm_f32_to_f16(0.001 + 0.01 * g.uniform()), o + 2)
                for k in 4..<bb { out[o + k] = g.byte() }
            case Int32(LM_Q2_K):
                for k in 0..<80 { out[o + k] = g.byte() }
                put16(lm_f32_to_f16(0.001 + 0.01 * g.uniform()), o + 80)
                put16(lm_f32_to_f16(0.001 + 0.01 * g.uniform()), o + 82)
            case Int32(LM_Q3_K):
                for k in 0..<108 { out[o + k] = g.byte() }
                put16(lm_f32_to_f16(0.0005 + 0.002 * g.uniform()), o + 108)
            case Int32(LM_Q6_K):
                for k in 0..<208 { out[o + k] = g.byte() }
                put16(lm_f32_to_f16(0.0005 + 0.002 * g.uniform()), o + 208)
            default: XCTFail("no generator for \(dtype)")
            }
        }
        return out
    }

    func testF16ConversionRoundTrips() {
        for h in stride(from: 0, through: 0xffff, by: 1) {
            let f = lm_f16_to_f32(UInt16(h))
            if f.isNaN { continue }
            XCTAssertEqual(lm_f32_to_f16(f), UInt16(h), "f16 \(h)")
        }
        XCTAssertEqual(lm_f32_to_f16(1.0 + 1.0 / 4096), lm_f32_to_f16(1.0), "ties round to even")
        XCTAssertEqual(lm_f32_to_f16(65520), 0x7c00, "overflow goes to infinity")
    }

    func testSIMDDequantIsBitIdenticalToReference() {
        for dtype in [LM_F16, LM_BF16, LM_Q4_0, LM_Q4_1, LM_Q5_0, LM_Q5_1, LM_Q8_0, LM_Q2_K, LM_Q3_K, LM_Q4_K, LM_Q5_K, LM_Q6_K, LM_IQ4_NL, LM_IQ4_XS].map(Int32.init) {
            let n = 1024
            let src = Self.randomMatrix(dtype, rows: 1, cols: n, seed: 7)
            var ref = [Float](repeating: 0, count: n)
            lm_dequant_row_ref(dtype, src, &ref, Int64(n))
            XCTAssert(ref.allSatisfy { $0.isFinite })
            for level in Self.levels {
                lm_cpu_set_level(level)
                var out = [Float](repeating: .nan, count: n)
                lm_dequant_row(dtype, src, &out, Int64(n))
                XCTAssertEqual(out, ref, "dtype \(dtype) at \(String(cString: lm_cpu_level_name(level)))")
            }
        }
    }

    func testMatmulMatchesReferenceOnEveryPath() {
        let shapes = [(n_out: 48, n_in: 64), (n_out: 100, n_in: 256), (n_out: 130, n_in: 512)]
        for dtype in [LM_F32, LM_F16, LM_BF16, LM_Q4_0, LM_Q4_1, LM_Q5_0, LM_Q5_1, LM_Q8_0, LM_Q2_K, LM_Q3_K, LM_Q4_K, LM_Q5_K, LM_Q6_K, LM_IQ4_NL, LM_IQ4_XS].map(Int32.init) {
            for (n_out, n_in) in shapes where n_in % Int(lm_block_size(dtype)) == 0 {
                let w = Self.randomMatrix(dtype, rows: n_out, cols: n_in, seed: UInt64(n_out * 31 + Int(dtype)))
                for rows in [1, 3, 4, 5, 8, 9, 13, 20, 32, 33, 40] {  // 13 and up: our AVX-512 GEMM (20, 40: its 8-row block)
                    var g = LCG(s: UInt64(rows))
                    let x = (0..<(rows * n_in)).map { _ in g.sym() }
                    var ref = [Float](repeating: 0, count: rows * n_out)
                    lm_matmul_ref(w, dtype, Int64(n_out), Int64(n_in), x, Int64(n_in), Int64(rows), &ref, Int64(n_out))
                    let scale = ref.map { abs($0) }.max()! + 1e-3
                    for level in Self.levels {
                        lm_cpu_set_level(level)
                        for gemvMax in [0, 4, 16] {  // 16: GEMV in several groups of 4 rows
                            lm_matmul_set_gemv_max_rows(Int32(gemvMax))
                            var y = [Float](repeating: .nan, count: rows * n_out)
                            var scratch = [Float](repeating: 0, count: lm_matmul_scratch_floats(Int64(n_in), Int64(rows)))
                            lm_matmul(w, dtype, Int64(n_out), Int64(n_in), x, Int64(n_in), Int64(rows), &y, Int64(n_out), &scratch)
                            let err = zip(y, ref).map { abs($0 - $1) }.max()!
                            // f32 accumulation over n_in terms vs a double-precision reference.
                            XCTAssertLessThan(err / scale, 2e-6 * Float(n_in).squareRoot(),
                                "dtype \(dtype) \(n_out)x\(n_in) rows \(rows) level \(level) gemv<=\(gemvMax)")
                        }
                    }
                }
            }
        }
    }

    /// Our GEMM (AVX-512 or AVX2) computes each output as one FMA chain over
    /// k, so a row's result does not depend on which other rows share the
    /// call, nor on how the columns are cut into tiles. 300 rows x 512 is past
    /// the size where the threads transpose X together instead of the caller alone.
    /// lm_matmul of rows [r0, r0 + rows) of x (n_in wide) alone.
    static func matmulRows(_ w: [UInt8], _ dtype: Int32, _ nOut: Int, _ nIn: Int, _ x: [Float], _ r0: Int, _ rows: Int) -> [Float] {
        var y = [Float](repeating: .nan, count: rows * nOut)
        var scratch = [Float](repeating: 0, count: lm_matmul_scratch_floats(Int64(nIn), Int64(rows)))
        Array(x[(r0 * nIn)..<((r0 + rows) * nIn)]).withUnsafeBufferPointer { xp in
            lm_matmul(w, dtype, Int64(nOut), Int64(nIn), xp.baseAddress, Int64(nIn), Int64(rows), &y, Int64(nOut), &scratch)
        }
        return y
    }

    static let gemmLevels = levels.filter { $0 >= Int32(LM_CPU_AVX2) }

    func testGemmRowResultsDoNotDependOnTheBatch() throws {
        try XCTSkipIf(Self.gemmLevels.isEmpty, "our GEMM needs AVX2")
        lm_matmul_set_gemv_max_rows(4)
        let (nOut, nIn) = (130, 512)
        let w = Self.randomMatrix(Int32(LM_Q4_1), rows: nOut, cols: nIn, seed: 5)
        var g = LCG(s: 9)
        let x = (0..<(300 * nIn)).map { _ in g.sym() }
        for level in Self.gemmLevels {
            lm_cpu_set_level(level)
            func run(_ r0: Int, _ rows: Int) -> [Float] { Self.matmulRows(w, Int32(LM_Q4_1), nOut, nIn, x, r0, rows) }
            let all = run(0, 300)
            for (r0, rows) in [(3, 12), (0, 13), (16, 16), (40, 20), (20, 28), (24, 40), (100, 64)] {
                let part = run(r0, rows)
                XCTAssertTrue(part == Array(all[(r0 * nOut)..<((r0 + rows) * nOut)]), "level \(level) rows \(r0)..<\(r0 + rows) alone")
            }
        }
    }

    /// The bits of that chain, from zero, in k order, over the dequantized
    /// row: so the AVX2 kernel gives what the AVX-512 one gives, and a host
    /// without AVX-512 checks it too.
    func testGemmIsOneFMAChainPerOutputOnEveryLevel() throws {
        try XCTSkipIf(Self.gemmLevels.isEmpty, "our GEMM needs AVX2")
        // Q4_1 rows 5-8 go to the GEMV at AVX2; the GEMM still takes them for
        // dtypes without one (F16, k-quants), so it is checked there too.
        lm_matmul_set_gemv_max_rows(4)
        let (nOut, nIn) = (70, 256)
        let w = Self.randomMatrix(Int32(LM_Q4_1), rows: nOut, cols: nIn, seed: 21)
        var wf = [Float](repeating: 0, count: nOut * nIn)
        let rowBytes = w.count / nOut
        for o in 0..<nOut {
            w.withUnsafeBytes { wb in
                wf.withUnsafeMutableBufferPointer { lm_dequant_row(Int32(LM_Q4_1), wb.baseAddress! + o * rowBytes, $0.baseAddress! + o * nIn, Int64(nIn)) }
            }
        }
        for rows in [5, 8, 13, 24, 32, 40] {  // 5 and 8: AVX2 only (AVX-512 leaves them to OpenBLAS)
            var g = LCG(s: UInt64(rows) + 3)
            let x = (0..<(rows * nIn)).map { _ in g.sym() }
            var want = [Float](repeating: 0, count: rows * nOut)
            for r in 0..<rows {
                for o in 0..<nOut {
                    var acc: Float = 0
                    for k in 0..<nIn { acc = acc.addingProduct(x[r * nIn + k], wf[o * nIn + k]) }
                    want[r * nOut + o] = acc
                }
            }
            for level in Self.gemmLevels where rows > 8 || level == Int32(LM_CPU_AVX2) {
                lm_cpu_set_level(level)
                XCTAssertTrue(Self.matmulRows(w, Int32(LM_Q4_1), nOut, nIn, x, 0, rows) == want, "level \(level) rows \(rows)")
            }
        }
    }

    /// The GEMV kernels, which take up to lm_matmul_gemv_max_rows rows (12 on
    /// full-width AVX-512) in groups of 4, give each row the bits it gets
    /// alone, so a request's tokens do not depend on how many others share a
    /// small batch — at every level, for each GEMV dtype.
    func testGemvRowResultsDoNotDependOnTheBatch() {
        lm_matmul_set_gemv_max_rows(12)
        let (nOut, nIn) = (100, 256)
        for dtype in [LM_Q4_0, LM_Q4_1, LM_Q8_0].map(Int32.init) {
            let w = Self.randomMatrix(dtype, rows: nOut, cols: nIn, seed: 11)
            var g = LCG(s: 13)
            let x = (0..<(12 * nIn)).map { _ in g.sym() }
            for level in Self.levels {
                lm_cpu_set_level(level)
                func run(_ r0: Int, _ rows: Int) -> [Float] { Self.matmulRows(w, dtype, nOut, nIn, x, r0, rows) }
                let all = run(0, 12)
                for (r0, rows) in [(0, 1), (5, 1), (11, 1), (2, 3), (3, 6), (4, 8)] {
                    XCTAssertTrue(run(r0, rows) == Array(all[(r0 * nOut)..<((r0 + rows) * nOut)]), "dtype \(dtype) level \(level) rows \(r0)..<\(r0 + rows)")
                }
            }
        }
    }

    /// Attention over paged blocks equals a naive softmax in double on every
    /// path: head sizes the grouped AVX-512 kernel takes (64, 128) and one it
    /// does not (16), groups of 1, 2, 3 and 10 query heads per kv head (10 is
    /// more than one pass of the grouped kernel), blocks of 4 and 16 and 24
    /// positions, contexts of 1 to 70 (partial 16-position runs); each also
    /// with a sliding window starting mid-block, on a block edge, and at 0.
    func testAttentionMatchesNaiveSoftmaxOverPagedBlocks() {
        let shapes: [(heads: Int32, kvHeads: Int32, hd: Int32, bs: Int32)] = [
            (4, 2, 16, 4), (9, 3, 64, 16), (4, 4, 64, 4), (10, 1, 64, 24), (4, 2, 128, 16), (6, 3, 128, 4)]
        for level in KernelTests.levels {
            lm_cpu_set_level(level)
            for (i, shape) in shapes.enumerated() {
                checkAttention(shape, seed: UInt64(3 + i), start: nil, tag: "level \(level) shape \(shape)")
                let last = min(70, 8 * shape.bs)
                for start: [Int32] in [[5, 0, last / 2 + 1], [12, 0, 2 * shape.bs], [0, 0, last - 1]] {
                    checkAttention(shape, seed: UInt64(3 + i), start: start, tag: "level \(level) shape \(shape) start \(start)")
                }
            }
        }
    }

    private func checkAttention(_ shape: (heads: Int32, kvHeads: Int32, hd: Int32, bs: Int32), seed: UInt64, start: [Int32]?,
                                tag: String) {
        let (heads, kvHeads, hd, bs) = shape
        let layers = 2, layer = 1, perSeq = 8
        let kvDim = Int(kvHeads * hd)
        let blockFloats = layers * Int(bs) * kvDim
        // Three sequences with scattered blocks; rows at different positions.
        let nCtx: [Int32] = [13, 1, min(70, Int32(perSeq) * bs)], rowsSeq = [0, 1, 2]
        let nBlocks = 3 * perSeq
        var g = LCG(s: seed)
        var kPool = (0..<(nBlocks * blockFloats)).map { _ in g.sym() }
        var vPool = (0..<(nBlocks * blockFloats)).map { _ in g.sym() }
        let perm = (0..<nBlocks).map { Int32(($0 * 7 + 5) % nBlocks) }  // 7 and 24 are coprime
        let n = rowsSeq.count
        var flat = [Int32](); for s in rowsSeq { flat += perm[(s * perSeq)..<(s * perSeq + perSeq)] }
        let q = (0..<(n * Int(heads * hd))).map { _ in g.sym() * 2 }
        var out = [Float](repeating: .nan, count: n * Int(heads * hd))
        var scratch = [Float](repeating: 0, count: lm_attention_scratch_floats(Int64(nCtx.max()!)))
        let layerOff = Int64(layer * Int(bs) * kvDim)
        lm_attention(q, Int64(heads * hd), &kPool, &vPool, Int64(blockFloats), layerOff, bs, flat, Int64(perSeq), nCtx, start, Int64(n),
                     heads, kvHeads, hd, 1 / Float(hd).squareRoot(), &out, Int64(heads * hd), &scratch)
        var worst = 0.0
        for r in 0..<n {
            for h in 0..<Int(heads) {
                let kvh = h / Int(heads / kvHeads)
                func at(_ pool: [Float], _ j: Int, _ d: Int) -> Float {
                    let blk = Int(flat[r * perSeq + j / Int(bs)])
                    return pool[blk * blockFloats + Int(layerOff) + (j % Int(bs)) * kvDim + kvh * Int(hd) + d]
                }
                var s = [Double]()
                let lo = Int(start?[r] ?? 0)
                for j in lo..<Int(nCtx[r]) {
                    var dot = 0.0
                    for d in 0..<Int(hd) { dot += Double(q[r * Int(heads * hd) + h * Int(hd) + d]) * Double(at(kPool, j, d)) }
                    s.append(dot / Double(hd).squareRoot())
                }
                let mx = s.max()!
                let e = s.map { exp($0 - mx) }, sum = e.reduce(0, +)
                for d in 0..<Int(hd) {
                    var v = 0.0
                    for j in 0..<e.count { v += e[j] / sum * Double(at(vPool, lo + j, d)) }
                    worst = max(worst, abs(Double(out[r * Int(heads * hd) + h * Int(hd) + d]) - v))
                }
            }
        }
        XCTAssertLessThan(worst, 5e-7, tag)
    }

    func testRopeLayoutsAgreeUnderThePermutation() {
        // Interleaved rotation on GGUF-permuted rows equals rotate_half on HF rows.
        let hd = 8, heads = 2
        var g = LCG(s: 11)
        let hf = (0..<(heads * hd)).map { _ in g.sym() }
        // GGUF row order within a head: for i in 0..<hd/2: (i, i + hd/2)
        var gg = [Float](repeating: 0, count: hf.count)
        for h in 0..<heads { for i in 0..<hd / 2 { gg[h * hd + 2 * i] = hf[h * hd + i]; gg[h * hd + 2 * i + 1] = hf[h * hd + i + hd / 2] } }
        let inv: [Float] = (0..<hd / 2).map { 1 / powf(10000, Float(2 * $0) / Float(hd)) }
        var a = hf, b = gg
        let pos: [Int32] = [37]
        lm_rope(&a, 1, Int64(hf.count), Int32(heads), Int32(hd), pos, inv, 0)
        lm_rope(&b, 1, Int64(hf.count), Int32(heads), Int32(hd), pos, inv, 1)
        for h in 0..<heads { for i in 0..<hd / 2 {
            XCTAssertEqual(a[h * hd + i], b[h * hd + 2 * i])
            XCTAssertEqual(a[h * hd + i + hd / 2], b[h * hd + 2 * i + 1])
        } }
        XCTAssertNotEqual(a, hf, "rotation changed something")
    }

    func testParallelRunsEveryThreadOnce() {
        let hits = UnsafeMutablePointer<Int32>.allocate(capacity: 64)
        hits.initialize(repeating: 0, count: 64)
        defer { hits.deallocate() }
        let fn: lm_task_fn = { ctx, ith, _ in
            ctx!.assumingMemoryBound(to: Int32.self)[Int(ith)] += 1  // each thread owns its slot
        }
        for _ in 0..<1000 { lm_parallel(fn, hits) }
        let n = Int(lm_pool_threads())
        XCTAssertEqual(Array(UnsafeBufferPointer(start: hits, count: n)), [Int32](repeating: 1000, count: n))
    }
}

/// The fused multi-adapter LoRA kernel against its one-row-at-a-time reference.
final class LoraKernelTests: XCTestCase {
    override func tearDown() { lm_cpu_set_level(lm_cpu_detect()) }

    func testFusedSegmentsMatchReference() {
        var g = KernelTests.LCG(s: 99)
        for (nIn, nOut) in [(64, 64), (576, 192), (100, 37), (1536, 576)] {
            for dtype in [Int32(LM_F32), Int32(LM_F16)] {
                let nRows = 23
                let x = (0..<(nRows * nIn)).map { _ in g.sym() }
                let y0 = (0..<(nRows * nOut)).map { _ in g.sym() }
                // Segments: heterogeneous ranks, a DoRA one, single rows, and rows 9..<11 and 22 with no adapter.
                let spec: [(row0: Int, n: Int, rank: Int, dora: Bool)] = [(0, 5, 8, false), (5, 1, 16, false), (6, 3, 3, true),
                                                                          (11, 9, 64, false), (20, 2, 1, false)]
                var storage: [[UInt8]] = []
                var doras: [[Float]] = []
                func matrix(_ n: Int) -> [UInt8] {
                    let f = (0..<n).map { _ in g.sym() * 0.1 }
                    if dtype == Int32(LM_F32) { return f.withUnsafeBytes { Array($0) } }
                    var h = [UInt16](repeating: 0, count: n)
                    lm_f32_to_f16_n(f, &h, Int64(n))
                    return h.withUnsafeBytes { Array($0) }
                }
                for s in spec {
                    storage.append(matrix(s.rank * nIn))
                    storage.append(matrix(s.rank * nOut))
                    doras.append((0..<nOut).map { _ in 0.5 + g.uniform() })
                }
                var yFast = y0, yRef = y0
                storage.withUnsafeBufferPointers { ptrs in
                    doras.withUnsafeBufferPointers { dptrs in
                        let segs = spec.enumerated().map { i, s in
                            lm_lora_seg(row0: Int64(s.row0), n_rows: Int64(s.n), A: ptrs[2 * i], BT: ptrs[2 * i + 1],
                                        dora: s.dora ? dptrs[i].assumingMemoryBound(to: Float.self) : nil, rank: Int32(s.rank), dtype: dtype, scale: 0.7 + Float(i))
                        }
                        lm_lora_apply_ref(x, Int64(nIn), Int64(nIn), &yRef, Int64(nOut), Int64(nOut), segs, Int32(segs.count))
                        for level in KernelTests.levels {
                            lm_cpu_set_level(level)
                            var y = y0
                            var scratch = [Float](repeating: 0, count: lm_lora_scratch_floats(64, Int64(nOut)))
                            lm_lora_apply(x, Int64(nIn), Int64(nIn), &y, Int64(nOut), Int64(nOut), segs, Int32(segs.count), &scratch)
                            yFast = y
                            let err = zip(yFast, yRef).map { abs($0 - $1) }.max()!
                            XCTAssertLessThan(err, 2e-5 * Float(nIn).squareRoot(), "\(nIn)x\(nOut) dtype \(dtype) level \(level)")
                        }
                    }
                }
                // Rows outside every segment are untouched.
                for r in [9, 10, 22] { XCTAssertEqual(Array(yFast[(r * nOut)..<((r + 1) * nOut)]), Array(y0[(r * nOut)..<((r + 1) * nOut)])) }
                XCTAssertNotEqual(yFast, y0)
            }
        }
    }

    /// A row's LoRA delta is bit-for-bit the same whether its adapter's chunk
    /// holds 1, 2, 3 or 4 rows: the kernels cover fewer A rows or output
    /// columns per pass as the row count grows, but every output keeps its
    /// order of additions. (Otherwise a request's tokens would depend on how
    /// many others in the batch share its adapter.)
    func testLoraRowResultsDoNotDependOnRowsSharingTheChunk() {
        var g = KernelTests.LCG(s: 7)
        for (nIn, nOut) in [(576, 192), (100, 37), (64, 96)] {
            for rank in [1, 3, 6, 16] {
                for dtype in [Int32(LM_F32), Int32(LM_F16)] {
                    let es = dtype == Int32(LM_F16) ? 2 : 4
                    let a = (0..<(rank * nIn * es)).map { _ in UInt8(truncatingIfNeeded: g.next() & 0x3f) }  // every byte <= 0x3f: finite, |v| < 2
                    let bt = (0..<(rank * nOut * es)).map { _ in UInt8(truncatingIfNeeded: g.next() & 0x3f) }
                    let x = (0..<(4 * nIn)).map { _ in g.sym() }
                    let y0 = (0..<(4 * nOut)).map { _ in g.sym() }
                    for level in KernelTests.levels {
                        lm_cpu_set_level(level)
                        var scratch = [Float](repeating: 0, count: lm_lora_scratch_floats(Int32(rank), Int64(nOut)))
                        a.withUnsafeBytes { ap in
                            bt.withUnsafeBytes { bp in
                                func run(_ groups: [(row0: Int, n: Int)]) -> [Float] {
                                    var y = y0
                                    for grp in groups {
                                        var s = lm_lora_seg(row0: Int64(grp.row0), n_rows: Int64(grp.n), A: ap.baseAddress, BT: bp.baseAddress,
                                                            dora: nil, rank: Int32(rank), dtype: dtype, scale: 0.75)
                                        lm_lora_apply_single(x, Int64(nIn), Int64(nIn), &y, Int64(nOut), Int64(nOut), &s, &scratch)
                                    }
                                    return y
                                }
                                let alone = run([(0, 1), (1, 1), (2, 1), (3, 1)])
                                XCTAssertNotEqual(alone, y0)
                                for groups in [[(0, 4)], [(0, 2), (2, 2)], [(0, 3), (3, 1)], [(0, 1), (1, 3)]] {
                                    XCTAssertTrue(run(groups) == alone, "\(nIn)x\(nOut) rank \(rank) dtype \(dtype) level \(level) \(groups)")
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// lm_lora_block_a / lm_lora_block_bt against the layouts kernels.h
    /// describes, written out here element by element, for shapes with
    /// partial groups and blocks in both element sizes.
    func testLoraBlockLayouts() {
        for (rank, n) in [(1, 7), (5, 70), (8, 64), (7, 33), (16, 576)] {
            let src = (0..<(rank * n)).map { UInt32($0 + 1) }  // distinct values: every misplacement shows
            // B^T: column blocks of 32; block j holds (rank, w) row-major.
            var wantBT = [UInt32]()
            for j0 in stride(from: 0, to: n, by: 32) {
                for k in 0..<rank { for o in j0..<min(j0 + 32, n) { wantBT.append(src[k * n + o]) } }
            }
            // A: rows in groups of 4 (the last holds what is left), each group as
            // 16-column blocks with the group's rows side by side.
            var wantA = [UInt32]()
            for g0 in stride(from: 0, to: rank, by: 4) {
                for b0 in stride(from: 0, to: n, by: 16) {
                    for k in g0..<min(g0 + 4, rank) { for i in b0..<min(b0 + 16, n) { wantA.append(src[k * n + i]) } }
                }
            }
            var gotBT = [UInt32](repeating: 0, count: src.count), gotA = gotBT
            lm_lora_block_bt(src, &gotBT, Int32(rank), Int64(n), Int32(LM_F32))
            lm_lora_block_a(src, &gotA, Int32(rank), Int64(n), Int32(LM_F32))
            XCTAssertEqual(gotBT, wantBT, "BT rank \(rank) n \(n)")
            XCTAssertEqual(gotA, wantA, "A rank \(rank) n \(n)")
            let half = src.map { UInt16(truncatingIfNeeded: $0) }
            var gotBT16 = [UInt16](repeating: 0, count: src.count), gotA16 = gotBT16
            lm_lora_block_bt(half, &gotBT16, Int32(rank), Int64(n), Int32(LM_F16))
            lm_lora_block_a(half, &gotA16, Int32(rank), Int64(n), Int32(LM_F16))
            XCTAssertEqual(gotBT16, wantBT.map { UInt16(truncatingIfNeeded: $0) }, "f16 BT rank \(rank) n \(n)")
            XCTAssertEqual(gotA16, wantA.map { UInt16(truncatingIfNeeded: $0) }, "f16 A rank \(rank) n \(n)")
        }
    }

    /// The overlapped base + LoRA section gives what the two calls give in
    /// sequence: rows without an adapter bit for bit (same tiles), adapted rows
    /// up to the rounding of one fused multiply-add (scale * U is added last).
    func testMatmulLoraOverlapEqualsSequential() {
        var g = KernelTests.LCG(s: 7)
        let (nIn, nOut) = (64, 100)
        for nRows in [23, 28] {  // AVX-512: our GEMM with the LoRA prefetch (23 pads to 24); AVX2 and scalar: OpenBLAS tiles
        let x = (0..<(nRows * nIn)).map { _ in g.sym() }
        let wF = (0..<(nOut * nIn)).map { _ in g.sym() * 0.2 }
        var wH = [UInt16](repeating: 0, count: wF.count)
        lm_f32_to_f16_n(wF, &wH, Int64(wF.count))
        let spec: [(row0: Int, n: Int, rank: Int, dora: Bool)] = [(0, 5, 8, false), (5, 1, 16, false), (6, 3, 3, true), (11, 9, 5, false), (20, 2, 1, false)]
        let mats = spec.map { s in ((0..<(s.rank * nIn)).map { _ in g.sym() * 0.1 }, (0..<(s.rank * nOut)).map { _ in g.sym() * 0.1 }) }
        let dora = (0..<nOut).map { _ in 0.5 + g.uniform() }
        for level in KernelTests.levels {
            lm_cpu_set_level(level)
            for (wPtr, dtype) in [(UnsafeRawPointer(wF.withUnsafeBytes { $0.baseAddress! }), Int32(LM_F32)),
                                  (UnsafeRawPointer(wH.withUnsafeBytes { $0.baseAddress! }), Int32(LM_F16))] {
                withExtendedLifetime((wF, wH, mats, dora)) {
                    let segs = spec.enumerated().map { i, s in
                        lm_lora_seg(row0: Int64(s.row0), n_rows: Int64(s.n), A: mats[i].0.withUnsafeBytes { $0.baseAddress! },
                                    BT: mats[i].1.withUnsafeBytes { $0.baseAddress! },
                                    dora: s.dora ? dora.withUnsafeBufferPointer { $0.baseAddress! } : nil, rank: Int32(s.rank), dtype: Int32(LM_F32), scale: 0.5 + Float(i))
                    }
                    var mm = [Float](repeating: 0, count: lm_matmul_scratch_floats(Int64(nIn), Int64(nRows)))
                    var ls = [Float](repeating: 0, count: lm_matmul_lora_scratch_floats(16, Int64(nOut), Int64(nRows)))
                    var seq = [Float](repeating: 0, count: nRows * nOut), fused = seq
                    lm_matmul(wPtr, dtype, Int64(nOut), Int64(nIn), x, Int64(nIn), Int64(nRows), &seq, Int64(nOut), &mm)
                    lm_lora_apply(x, Int64(nIn), Int64(nIn), &seq, Int64(nOut), Int64(nOut), segs, Int32(segs.count), &ls)
                    lm_matmul_lora(wPtr, dtype, Int64(nOut), Int64(nIn), x, Int64(nIn), Int64(nRows), &fused, Int64(nOut), &mm,
                                   segs, Int32(segs.count), &ls)
                    let err = zip(fused, seq).map { abs($0 - $1) }.max()!
                    XCTAssertLessThan(err, 1e-6, "level \(level) dtype \(dtype)")
                    var plain = [Float](repeating: 0, count: nRows * nOut)
                    lm_matmul(wPtr, dtype, Int64(nOut), Int64(nIn), x, Int64(nIn), Int64(nRows), &plain, Int64(nOut), &mm)
                    XCTAssertNotEqual(fused, plain, "the adapters changed the output")
                    for r in [9, 10, 22] {
                        XCTAssertTrue(fused[(r * nOut)..<((r + 1) * nOut)] == plain[(r * nOut)..<((r + 1) * nOut)], "row \(r) untouched")
                    }
                }
            }
        }
        }
    }

    /// Three projections of one X in one section (as q, k, v run) give what
    /// each gives alone: lm_matmul + lm_lora_apply in sequence, rows without an
    /// adapter bit for bit; also with no segments at all and through the
    /// few-row (GEMV) fallback.
    func testMatmulMultiEqualsPerProjection() {
        var g = KernelTests.LCG(s: 11)
        let nIn = 64
        let outs = [96, 40, 40]
        for nRows in [23, 28, 3] {  // as above; 3 rows: the GEMV fallback
            let x = (0..<(nRows * nIn)).map { _ in g.sym() }
            let ws: [[UInt16]] = outs.map { o in
                let f = (0..<(o * nIn)).map { _ in g.sym() * 0.2 }
                var h = [UInt16](repeating: 0, count: f.count)
                lm_f32_to_f16_n(f, &h, Int64(f.count))
                return h
            }
            // Projection 0: two segments (one DoRA); 1: none; 2: one segment.
            let spec: [[(row0: Int, n: Int, rank: Int, dora: Bool)]] =
                nRows > 4 ? [[(0, 5, 8, false), (6, 3, 3, true)], [], [(11, 9, 5, false)]]
                          : [[(0, 1, 8, false), (1, 1, 3, true)], [], [(2, 1, 5, false)]]
            let mats = spec.enumerated().map { p, segs in segs.map { s in
                ((0..<(s.rank * nIn)).map { _ in g.sym() * 0.1 }, (0..<(s.rank * outs[p])).map { _ in g.sym() * 0.1 }) } }
            let doras = outs.map { o in (0..<o).map { _ in 0.5 + g.uniform() } }
            for level in KernelTests.levels {
                lm_cpu_set_level(level)
                withExtendedLifetime((ws, mats, doras)) {
                    let segs: [[lm_lora_seg]] = spec.enumerated().map { p, ss in ss.enumerated().map { i, s in
                        lm_lora_seg(row0: Int64(s.row0), n_rows: Int64(s.n), A: mats[p][i].0.withUnsafeBytes { $0.baseAddress! },
                                    BT: mats[p][i].1.withUnsafeBytes { $0.baseAddress! },
                                    dora: s.dora ? doras[p].withUnsafeBufferPointer { $0.baseAddress! } : nil,
                                    rank: Int32(s.rank), dtype: Int32(LM_F32), scale: 0.5 + Float(i))
                    } }
                    var mm = [Float](repeating: 0, count: lm_matmul_scratch_floats(Int64(nIn), Int64(nRows)))
                    var ls = [Float](repeating: 0, count: lm_matmul_multi_scratch_floats(8, 96, Int64(outs.reduce(0, +)), Int64(nRows)))
                    for withLora in [true, false] {
                        var seq = outs.map { [Float](repeating: 0, count: nRows * $0) }, plain = seq, fused = seq
                        for p in 0..<3 {
                            let w = UnsafeRawPointer(ws[p].withUnsafeBytes { $0.baseAddress! })
                            lm_matmul(w, Int32(LM_F16), Int64(outs[p]), Int64(nIn), x, Int64(nIn), Int64(nRows), &plain[p], Int64(outs[p]), &mm)
                            seq[p] = plain[p]
                            if withLora && !segs[p].isEmpty {
                                lm_lora_apply(x, Int64(nIn), Int64(nIn), &seq[p], Int64(outs[p]), Int64(outs[p]), segs[p], Int32(segs[p].count), &ls)
                            }
                        }
                        let segStore = segs.flatMap { $0 }
                        var all = [Float](repeating: 0, count: nRows * outs.reduce(0, +))  // the three Ys back to back
                        segStore.withUnsafeBufferPointer { sp in
                            all.withUnsafeMutableBufferPointer { yp in
                                var off = 0, yOff = 0
                                let projs = (0..<3).map { p -> lm_proj in
                                    let n = withLora ? segs[p].count : 0
                                    defer { off += segs[p].count; yOff += nRows * outs[p] }
                                    return lm_proj(W: ws[p].withUnsafeBytes { $0.baseAddress! }, dtype: Int32(LM_F16),
                                                   n_out: Int64(outs[p]), Y: yp.baseAddress! + yOff, ldy: Int64(outs[p]),
                                                   segs: n > 0 ? sp.baseAddress! + off : nil, n_segs: Int32(n))
                                }
                                lm_matmul_multi(projs, 3, Int64(nIn), x, Int64(nIn), Int64(nRows), &mm, &ls)
                            }
                        }
                        var yOff = 0
                        for p in 0..<3 { fused[p] = Array(all[yOff..<(yOff + nRows * outs[p])]); yOff += nRows * outs[p] }
                        for p in 0..<3 {
                            let err = zip(fused[p], seq[p]).map { abs($0 - $1) }.max()!
                            XCTAssertLessThan(err, 1e-6, "rows \(nRows) level \(level) projection \(p) lora \(withLora)")
                            if !withLora || segs[p].isEmpty { XCTAssertTrue(fused[p] == plain[p], "projection \(p) untouched") }
                            else { XCTAssertNotEqual(fused[p], plain[p], "projection \(p): the adapters changed the output") }
                        }
                        if nRows > 4 {
                            for r in [9, 10, 22] {
                                XCTAssertTrue(fused[0][(r * outs[0])..<((r + 1) * outs[0])] == plain[0][(r * outs[0])..<((r + 1) * outs[0])], "row \(r) untouched")
                            }
                        }
                    }
                }
            }
        }
    }

    /// Each (chunk, base tile) piece of D is folded into Y exactly once, also
    /// when a projection has more than 32 tiles or more than 32 chunks (the
    /// bookkeeping then spans several words): 40 one-row adapters (a DoRA one
    /// among them) and 8 plain rows over 2112 output columns, against
    /// lm_matmul + lm_lora_apply.
    func testMatmulLoraFoldsEveryPieceOnce() {
        var g = KernelTests.LCG(s: 13)
        let (nIn, nOut, nRows) = (32, 2112, 48)
        let x = (0..<(nRows * nIn)).map { _ in g.sym() }
        let w = (0..<(nOut * nIn)).map { _ in g.sym() * 0.2 }
        let mats = (0..<nRows).map { r in ((0..<(2 * nIn)).map { _ in g.sym() * 0.1 }, (0..<(2 * nOut)).map { _ in g.sym() * 0.1 + Float(r % 3) }) }
        let dora = (0..<nOut).map { _ in 0.5 + g.uniform() }
        for level in KernelTests.levels {
            lm_cpu_set_level(level)
            withExtendedLifetime((mats, dora)) {
                // Rows 40-47 have no adapter, so their results must equal the plain matmul's bit for bit.
                let segs = (0..<40).map { r in
                    lm_lora_seg(row0: Int64(r), n_rows: 1, A: mats[r].0.withUnsafeBytes { $0.baseAddress! },
                                BT: mats[r].1.withUnsafeBytes { $0.baseAddress! },
                                dora: r == 17 ? dora.withUnsafeBufferPointer { $0.baseAddress! } : nil,
                                rank: 2, dtype: Int32(LM_F32), scale: 0.25 + Float(r % 4))
                }
                var mm = [Float](repeating: 0, count: lm_matmul_scratch_floats(Int64(nIn), Int64(nRows)))
                var ls = [Float](repeating: 0, count: lm_matmul_lora_scratch_floats(2, Int64(nOut), Int64(nRows)))
                var plain = [Float](repeating: 0, count: nRows * nOut), seq = plain, fused = plain
                lm_matmul(w, Int32(LM_F32), Int64(nOut), Int64(nIn), x, Int64(nIn), Int64(nRows), &plain, Int64(nOut), &mm)
                seq = plain
                lm_lora_apply(x, Int64(nIn), Int64(nIn), &seq, Int64(nOut), Int64(nOut), segs, Int32(segs.count), &ls)
                lm_matmul_lora(w, Int32(LM_F32), Int64(nOut), Int64(nIn), x, Int64(nIn), Int64(nRows), &fused, Int64(nOut), &mm,
                               segs, Int32(segs.count), &ls)
                for r in 0..<nRows {
                    let row = (r * nOut)..<((r + 1) * nOut)
                    if r >= 40 { XCTAssertTrue(fused[row] == plain[row], "level \(level) row \(r) untouched"); continue }
                    let err = KernelTests.maxRelErr(fused[row], seq[row])
                    XCTAssertLessThan(err, 1e-6, "level \(level) row \(r)")
                }
            }
        }
    }

    /// lm_lora_chunk with a column mask: the marked columns of Y get what the
    /// fold would give them (Y + D, or dora * (Y + D), with D the same chunk
    /// run with no mask) bit for bit, the others go to D unchanged, and
    /// no other row is written — for 1-4 rows, with and without DoRA, ranks
    /// that fill and do not fill a group of A, a partial last B^T block, and
    /// masks that split 8-column vectors; within 1e-5 of lm_lora_apply_ref.
    func testLoraChunkSplitsColumnsAsTheFoldWould() {
        var g = KernelTests.LCG(s: 41)
        let sentinel: Float = 12345
        for (nIn, nOut) in [(576, 192), (100, 80), (64, 96)] {
            for rank in [1, 5, 16] {
                for dtype in [Int32(LM_F32), Int32(LM_F16)] {
                    let es = dtype == Int32(LM_F16) ? 2 : 4
                    let a = (0..<(rank * nIn * es)).map { _ in UInt8(truncatingIfNeeded: g.next() & 0x3f) }  // finite, |v| < 2
                    let bt = (0..<(rank * nOut * es)).map { _ in UInt8(truncatingIfNeeded: g.next() & 0x3f) }
                    let nRows = 6
                    let x = (0..<(nRows * nIn)).map { _ in g.sym() }
                    let y0 = (0..<(nRows * nOut)).map { _ in g.sym() }
                    let dora = (0..<nOut).map { _ in 0.5 + g.uniform() }
                    // Masks: random columns, tile-like runs of 29 columns (every other one done), all, none.
                    let words = (nOut + 63) / 64
                    let random = (0..<words).map { _ in g.next() ^ (g.next() << 21) }
                    var runs = [UInt64](repeating: 0, count: words), all = runs
                    for o in 0..<nOut {
                        if (o / 29) % 2 == 1 { runs[o / 64] |= 1 << UInt64(o % 64) }
                        all[o / 64] |= 1 << UInt64(o % 64)
                    }
                    for level in KernelTests.levels {
                        lm_cpu_set_level(level)
                        var scratch = [Float](repeating: 0, count: lm_lora_scratch_floats(Int32(rank), Int64(nOut)))
                        a.withUnsafeBytes { ap in
                            bt.withUnsafeBytes { bp in
                                dora.withUnsafeBufferPointer { dp in
                                    for useDora in [false, true] {
                                        for (r0, nr) in [(0, 1), (1, 2), (2, 3), (1, 4)] {
                                            var seg = lm_lora_seg(row0: 0, n_rows: Int64(nRows), A: ap.baseAddress, BT: bp.baseAddress,
                                                                  dora: useDora ? dp.baseAddress : nil, rank: Int32(rank), dtype: dtype, scale: 0.75)
                                            var dAll = [Float](repeating: sentinel, count: nRows * nOut)
                                            var yNone = y0
                                            lm_lora_chunk(x, Int64(nIn), Int64(nIn), &yNone, Int64(nOut), &dAll, Int64(nOut), &seg, Int64(r0), Int32(nr),
                                                          nil, &scratch, level)
                                            XCTAssertTrue(yNone == y0, "no mask: Y untouched")
                                            var ref = y0
                                            lm_lora_apply_ref(x, Int64(nIn), Int64(nIn), &ref, Int64(nOut), Int64(nOut), &seg, 1)
                                            for (mi, mask) in [random, runs, all].enumerated() {
                                                var y = y0, d = [Float](repeating: sentinel, count: nRows * nOut)
                                                lm_lora_chunk(x, Int64(nIn), Int64(nIn), &y, Int64(nOut), &d, Int64(nOut), &seg, Int64(r0), Int32(nr),
                                                              mask, &scratch, level)
                                                let tag = "\(nIn)x\(nOut) rank \(rank) dtype \(dtype) level \(level) dora \(useDora) rows \(r0)+\(nr) mask \(mi)"
                                                var ok = true, err: Float = 0
                                                for r in 0..<nRows {
                                                    for o in 0..<nOut {
                                                        let i = r * nOut + o, inChunk = r >= r0 && r < r0 + nr
                                                        let marked = (mask[o / 64] >> UInt64(o % 64)) & 1 == 1
                                                        let sum = y0[i] + dAll[i]
                                                        let wantY = inChunk && marked ? (useDora ? dora[o] * sum : sum) : y0[i]
                                                        // D's marked columns are scratch: a chunk may store them or not
                                                        let wantD = inChunk ? (marked ? d[i] : dAll[i]) : sentinel
                                                        if y[i] != wantY || d[i] != wantD { ok = false }
                                                        if inChunk && marked { err = max(err, abs(y[i] - ref[i]) / max(1, abs(ref[i]))) }
                                                    }
                                                }
                                                XCTAssertTrue(ok, tag)
                                                if mi == 2 { XCTAssertLessThan(err, 1e-5, "\(tag): vs reference") }
                                                XCTAssertNotEqual(y, y0, tag)
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// At AVX-512 the LoRA chunk runs in zmm or, on Zen 4, in ymm with
    /// AVX-512VL; a token must not depend on which machine served it, so both
    /// give the same bits: lm_lora_apply (straight into Y, several segments,
    /// DoRA) and lm_lora_chunk under column masks (D and Y), for 1-4 rows,
    /// ranks that fill and do not fill a group of A, an odd last rank, inputs
    /// with a tail past 16 and partial last B^T blocks; the zmm result is also
    /// within 1e-5 of lm_lora_apply_ref.
    func testLoraZmmAndYmmGiveTheSameBits() throws {
        try XCTSkipIf(lm_cpu_detect() < Int32(LM_CPU_AVX512), "no AVX-512 on this machine")
        lm_cpu_set_level(Int32(LM_CPU_AVX512))
        defer { lm_cpu_set_wide512(-1) }
        var g = KernelTests.LCG(s: 97)
        let sentinel: Float = 12345
        for (nIn, nOut) in [(576, 192), (100, 80), (40, 200), (64, 96)] {
            for rank in [1, 2, 3, 5, 16, 17] {
                for dtype in [Int32(LM_F32), Int32(LM_F16)] {
                    let es = dtype == Int32(LM_F16) ? 2 : 4
                    let nRows = 7
                    let a = (0..<(rank * nIn * es)).map { _ in UInt8(truncatingIfNeeded: g.next() & 0x3f) }  // finite, |v| < 2
                    let bt = (0..<(rank * nOut * es)).map { _ in UInt8(truncatingIfNeeded: g.next() & 0x3f) }
                    let x = (0..<(nRows * nIn)).map { _ in g.sym() }
                    let y0 = (0..<(nRows * nOut)).map { _ in g.sym() }
                    let dora = (0..<nOut).map { _ in 0.5 + g.uniform() }
                    let words = (nOut + 63) / 64
                    let random = (0..<words).map { _ in g.next() ^ (g.next() << 21) }
                    var runs = [UInt64](repeating: 0, count: words)
                    for o in 0..<nOut where (o / 29) % 2 == 1 { runs[o / 64] |= 1 << UInt64(o % 64) }
                    var scratch = [Float](repeating: 0, count: lm_lora_scratch_floats(Int32(rank), Int64(nOut)))
                    a.withUnsafeBytes { ap in
                        bt.withUnsafeBytes { bp in
                            dora.withUnsafeBufferPointer { dp in
                                for useDora in [false, true] {
                                    func seg(_ row0: Int, _ n: Int) -> lm_lora_seg {
                                        lm_lora_seg(row0: Int64(row0), n_rows: Int64(n), A: ap.baseAddress, BT: bp.baseAddress,
                                                    dora: useDora ? dp.baseAddress : nil, rank: Int32(rank), dtype: dtype, scale: 0.75)
                                    }
                                    // segments of 1, 4 (one full chunk) and 2 rows
                                    let segs = [seg(0, 1), seg(1, 4), seg(5, 2)]
                                    var outs: [[Float]] = []
                                    for wide: Int32 in [0, 1] {
                                        lm_cpu_set_wide512(wide)
                                        var y = y0
                                        lm_lora_apply(x, Int64(nIn), Int64(nIn), &y, Int64(nOut), Int64(nOut), segs, Int32(segs.count), &scratch)
                                        outs.append(y)
                                        var one = seg(0, nRows)
                                        for (r0, nr) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
                                            for mask in [nil, random, runs] {
                                                var y = y0, d = [Float](repeating: sentinel, count: nRows * nOut)
                                                lm_lora_chunk(x, Int64(nIn), Int64(nIn), &y, Int64(nOut), &d, Int64(nOut), &one, Int64(r0), Int32(nr),
                                                              mask, &scratch, Int32(LM_CPU_AVX512))
                                                outs.append(y + d)
                                            }
                                        }
                                    }
                                    let half = outs.count / 2
                                    let tag = "\(nIn)x\(nOut) rank \(rank) dtype \(dtype) dora \(useDora)"
                                    let untouchedD = [Float](repeating: sentinel, count: nRows * nOut)
                                    for i in 0..<half {
                                        XCTAssertTrue(outs[i] == outs[half + i], "\(tag): case \(i) ymm != zmm")
                                        XCTAssertNotEqual(outs[half + i], i == 0 ? y0 : y0 + untouchedD, "\(tag): case \(i) wrote nothing")
                                    }
                                    var ref = y0
                                    lm_lora_apply_ref(x, Int64(nIn), Int64(nIn), &ref, Int64(nOut), Int64(nOut), segs, Int32(segs.count))
                                    XCTAssertLessThan(KernelTests.maxRelErr(outs[half], ref), 1e-5, "\(tag): vs reference")
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// lm_silu_mul_matmul_lora equals lm_silu_mul then lm_matmul_lora bit for
    /// bit — the SiLU rows, the base tiles and every chunk, whether it ran in
    /// the prologue next to the SiLU or rode on a base tile (the early-chunk
    /// cap forces none, some or any) — with single-row adapters, a 6-row one,
    /// a DoRA one and rows without an adapter; and it is within 1e-5 of the
    /// plain references (SiLU in double, lm_matmul_ref, lm_lora_apply_ref).
    func testSiluMatmulLoraEqualsSiluThenMatmulLora() {
        defer { lm_matmul_set_early_chunks(-1) }
        var g = KernelTests.LCG(s: 21)
        let (nIn, nOut) = (512, 200)
        let w = KernelTests.randomMatrix(Int32(LM_Q4_1), rows: nOut, cols: nIn, seed: 5)
        // 32 and 20 rows: the prologue at AVX-512; 3: the GEMV path; 300: X^T too big for one thread to pack.
        for nRows in [32, 20, 3, 300] {
            let gate0 = (0..<(nRows * nIn)).map { _ in g.sym() * 4 }
            let up = (0..<(nRows * nIn)).map { _ in g.sym() }
            // (row0, rows, rank, dora); the last two rows have no adapter.
            var spec: [(Int, Int, Int, Bool)] = nRows > 6 ? [(0, 6, 8, false)] : []
            var r = nRows > 6 ? 6 : 0
            while r < nRows - 2 { let n = nRows > 40 ? 7 : 1; spec.append((r, min(n, nRows - 2 - r), 1 + r % 16, r == 7)); r += n }
            let mats: [([UInt16], [UInt16])] = spec.map { s in (g.f16(s.2 * nIn, scale: 0.1), g.f16(s.2 * nOut, scale: 0.1)) }
            let dora = (0..<nOut).map { _ in 0.5 + g.uniform() }
            withExtendedLifetime((mats, dora)) {
                let segs = spec.enumerated().map { i, s in
                    lm_lora_seg(row0: Int64(s.0), n_rows: Int64(s.1), A: mats[i].0.withUnsafeBytes { $0.baseAddress! },
                                BT: mats[i].1.withUnsafeBytes { $0.baseAddress! },
                                dora: s.3 ? dora.withUnsafeBufferPointer { $0.baseAddress! } : nil,
                                rank: Int32(s.2), dtype: Int32(LM_F16), scale: 0.5 + Float(i % 3))
                }
                let refX = zip(gate0, up).map { gv, u in Float(Double(gv) / (1 + exp(-Double(gv))) * Double(u)) }
                var ref = [Float](repeating: 0, count: nRows * nOut)
                lm_matmul_ref(w, Int32(LM_Q4_1), Int64(nOut), Int64(nIn), refX, Int64(nIn), Int64(nRows), &ref, Int64(nOut))
                lm_lora_apply_ref(refX, Int64(nIn), Int64(nIn), &ref, Int64(nOut), Int64(nOut), segs, Int32(segs.count))
                var mm = [Float](repeating: 0, count: lm_matmul_scratch_floats(Int64(nIn), Int64(nRows)))
                var ls = [Float](repeating: 0, count: lm_matmul_lora_scratch_floats(16, Int64(nOut), Int64(nRows)))
                for level in KernelTests.levels {
                    lm_cpu_set_level(level)
                    for cap in [-1, 0, 3] {
                        lm_matmul_set_early_chunks(Int32(cap))
                        var seqX = gate0, plain = [Float](repeating: 0, count: nRows * nOut), seq = plain, fused = plain
                        lm_silu_mul(&seqX, up, Int64(nRows), Int64(nIn), Int64(nIn))
                        lm_matmul(w, Int32(LM_Q4_1), Int64(nOut), Int64(nIn), seqX, Int64(nIn), Int64(nRows), &plain, Int64(nOut), &mm)
                        lm_matmul_lora(w, Int32(LM_Q4_1), Int64(nOut), Int64(nIn), seqX, Int64(nIn), Int64(nRows), &seq, Int64(nOut),
                                       &mm, segs, Int32(segs.count), &ls)
                        var fusedX = gate0
                        lm_silu_mul_matmul_lora(&fusedX, up, Int64(nIn), w, Int32(LM_Q4_1), Int64(nOut), Int64(nIn), Int64(nRows),
                                                &fused, Int64(nOut), &mm, segs, Int32(segs.count), &ls)
                        let tag = "rows \(nRows) level \(level) cap \(cap)"
                        XCTAssertTrue(fusedX == seqX, "\(tag): SiLU rows")
                        XCTAssertLessThan(KernelTests.maxRelErr(fusedX, refX), 1e-6, "\(tag): SiLU vs double")
                        XCTAssertTrue(fused == seq, "\(tag): fused vs SiLU then lm_matmul_lora")
                        XCTAssertLessThan(KernelTests.maxRelErr(fused, ref), 1e-5, "\(tag): vs reference")
                        for row in [nRows - 2, nRows - 1] {
                            XCTAssertTrue(fused[(row * nOut)..<((row + 1) * nOut)] == plain[(row * nOut)..<((row + 1) * nOut)], "\(tag): row \(row) untouched")
                        }
                        XCTAssertNotEqual(fused[0..<nOut], plain[0..<nOut], "\(tag): row 0's adapter changed it")
                    }
                }
            }
        }
    }

    /// lm_silu_mul on every path is within 4 ulps of the same expression in
    /// float with a correctly rounded exp (what libm's expf gives), over
    /// [-130, 130] and random values, rows wider than a vector with a tail,
    /// and gives the scalar expression's result where exp is 0 or inf or the
    /// input is not finite; columns past n are not touched.
    /// log-sum-exp of a logits row against a double-precision two-pass sum,
    /// on rows whose lengths leave every tail size, with -inf entries (a
    /// token given no mass), a huge spread, and NaN / +inf / empty rows.
    func testLogSumExpMatchesDoubleOnEveryPath() {
        var g = KernelTests.LCG(s: 5)
        var rows: [[Float]] = [49152, 256, 17, 15, 8, 7, 1].map { n in (0..<n).map { _ in g.sym() * 12 } }
        rows.append((0..<1000).map { i in i % 3 == 0 ? -.infinity : g.sym() * 3 })
        rows.append((0..<100).map { i in i == 42 ? 80 : -80 + g.sym() })   // one term holds almost all the mass
        rows.append((0..<33).map { _ in 1e-3 * g.sym() })                   // nearly uniform
        func want(_ x: [Float]) -> Double {
            let m = Double(x.max()!)
            return m + log(x.reduce(0.0) { $0 + exp(Double($1) - m) })
        }
        for level in KernelTests.levels {
            lm_cpu_set_level(level)
            for (i, x) in rows.enumerated() {
                let got = lm_logsumexp(x, Int64(x.count)), w = want(x)
                XCTAssertEqual(got, w, accuracy: 1e-6 * max(1, abs(w)), "level \(level) row \(i) (n = \(x.count))")
                // A token's logprob from it: what a request's logprobs report.
                XCTAssertLessThanOrEqual(Double(x.max()!) - got, 1e-9, "level \(level) row \(i): a logprob above 0")
            }
            XCTAssertTrue(lm_logsumexp([1, .nan, 2], 3).isNaN, "level \(level): NaN")
            XCTAssertEqual(lm_logsumexp([1, .infinity], 2), .infinity, "level \(level): +inf")
            XCTAssertEqual(lm_logsumexp([-.infinity, -.infinity], 2), -.infinity, "level \(level): no mass")
            XCTAssertEqual(lm_logsumexp(nil, 0), -.infinity, "level \(level): empty")
        }
    }

    func testSiluMulMatchesFloatExpressionOnEveryPath() {
        let (rows, n, ld) = (3, 1000, 1003)
        var g = KernelTests.LCG(s: 41)
        var gate = [Float](repeating: 7, count: rows * ld), up = gate
        for r in 0..<rows {
            for i in 0..<n {
                let sweep: Float = -130 + 260 * Float(i) / Float(n)
                gate[r * ld + i] = r == 0 ? sweep : g.sym() * (r == 1 ? 12 : 100)
                up[r * ld + i] = 0.25 + g.uniform()
            }
        }
        let special: [Float] = [0, -0.0, .infinity, -.infinity, .nan, 88.7, -88.7, 89, -89, 104, -104, 1e-40, -1e-40,
                                .greatestFiniteMagnitude, -.greatestFiniteMagnitude, .leastNonzeroMagnitude]
        for (i, v) in special.enumerated() { gate[2 * ld + i] = v }
        func expected(_ v: Float, _ u: Float) -> Float { (v / (1 + Float(exp(-Double(v))))) * u }
        for level in KernelTests.levels {
            lm_cpu_set_level(level)
            var out = gate
            lm_silu_mul(&out, up, Int64(rows), Int64(n), Int64(ld))
            var worst: Float = 0
            for r in 0..<rows {
                for i in 0..<ld {
                    let k = r * ld + i, got = out[k]
                    if i >= n { XCTAssertEqual(got.bitPattern, gate[k].bitPattern, "level \(level): column \(i) touched"); continue }
                    let want = expected(gate[k], up[k])
                    if want.isNaN { XCTAssertTrue(got.isNaN, "level \(level): silu(\(gate[k])) = \(got)"); continue }
                    if want == 0 || !want.isFinite || !gate[k].isFinite || abs(gate[k]) > 89 {
                        XCTAssertEqual(got.bitPattern, want.bitPattern, "level \(level): silu(\(gate[k])) = \(got), want \(want)")
                        continue
                    }
                    worst = max(worst, abs(got - want) / want.ulp)
                }
            }
            XCTAssertLessThanOrEqual(worst, 4, "level \(level): worst error in ulps")
        }
    }

    /// lm_rmsnorm_matmul_multi equals lm_rmsnorm then lm_matmul_multi bit for
    /// bit over two projections (as gate/up), with chunks run early next to
    /// the normalisation or carried by tiles, and is within 1e-5 of the
    /// references (RMSNorm in double, lm_matmul_ref, lm_lora_apply_ref).
    func testRMSNormMatmulMultiEqualsNormThenMatmul() {
        defer { lm_matmul_set_early_chunks(-1) }
        var g = KernelTests.LCG(s: 31)
        let nIn = 256, outs = [200, 72], eps: Float = 1e-5
        let ws = outs.enumerated().map { p, o in KernelTests.randomMatrix(Int32(LM_Q4_1), rows: o, cols: nIn, seed: 7 + UInt64(p)) }
        let weight = (0..<nIn).map { _ in 0.5 + g.uniform() }
        // 32 and 20 rows: the prologue at AVX-512; 3: the GEMV path; 600: X^T too big for one thread to pack.
        for nRows in [32, 20, 3, 600] {
            let x = (0..<(nRows * nIn)).map { _ in g.sym() * 3 }
            // One-row adapters (rank 1-16, a DoRA one) on both projections, a 6-row one on the first only; the last two rows plain.
            let spec: [[(Int, Int, Int, Bool)]] = (0..<2).map { p in
                (p == 0 && nRows > 8 ? [(0, 6, 5, false)] : []) +
                ((p == 0 && nRows > 8 ? 6 : 0)..<(nRows - 2)).map { r in (r, 1, 1 + (r + p) % 16, r == 7) }
            }
            let mats: [[([UInt16], [UInt16])]] = spec.enumerated().map { p, ss in
                ss.map { s in (g.f16(s.2 * nIn, scale: 0.1), g.f16(s.2 * outs[p], scale: 0.1)) }
            }
            let doras = outs.map { o in (0..<o).map { _ in 0.5 + g.uniform() } }
            withExtendedLifetime((ws, mats, doras)) {
                let segs: [[lm_lora_seg]] = spec.enumerated().map { p, ss in ss.enumerated().map { i, s in
                    lm_lora_seg(row0: Int64(s.0), n_rows: Int64(s.1), A: mats[p][i].0.withUnsafeBytes { $0.baseAddress! },
                                BT: mats[p][i].1.withUnsafeBytes { $0.baseAddress! },
                                dora: s.3 ? doras[p].withUnsafeBufferPointer { $0.baseAddress! } : nil,
                                rank: Int32(s.2), dtype: Int32(LM_F16), scale: 0.5 + Float(i % 3))
                } }
                let refX: [Float] = (0..<nRows).flatMap { r -> [Float] in
                    let row = x[(r * nIn)..<((r + 1) * nIn)]
                    let inv = 1 / (row.reduce(0.0) { $0 + Double($1) * Double($1) } / Double(nIn) + Double(eps)).squareRoot()
                    return zip(row, weight).map { Float(Double($1) * Double($0) * inv) }
                }
                let refs: [[Float]] = (0..<2).map { p in
                    var y = [Float](repeating: 0, count: nRows * outs[p])
                    lm_matmul_ref(ws[p], Int32(LM_Q4_1), Int64(outs[p]), Int64(nIn), refX, Int64(nIn), Int64(nRows), &y, Int64(outs[p]))
                    lm_lora_apply_ref(refX, Int64(nIn), Int64(nIn), &y, Int64(outs[p]), Int64(outs[p]), segs[p], Int32(segs[p].count))
                    return y
                }
                var mm = [Float](repeating: 0, count: lm_matmul_scratch_floats(Int64(nIn), Int64(nRows)))
                var ls = [Float](repeating: 0, count: lm_matmul_multi_scratch_floats(16, 200, 272, Int64(nRows)))
                func run(_ fused: Bool, _ X: inout [Float]) -> [[Float]] {
                    var y0s = [Float](repeating: 0, count: nRows * outs[0]), y1s = [Float](repeating: 0, count: nRows * outs[1])
                    y0s.withUnsafeMutableBufferPointer { y0 in y1s.withUnsafeMutableBufferPointer { y1 in
                        segs[0].withUnsafeBufferPointer { s0 in segs[1].withUnsafeBufferPointer { s1 in
                            let projs = [lm_proj(W: ws[0].withUnsafeBytes { $0.baseAddress! }, dtype: Int32(LM_Q4_1), n_out: Int64(outs[0]),
                                                 Y: y0.baseAddress!, ldy: Int64(outs[0]), segs: s0.baseAddress!, n_segs: Int32(s0.count)),
                                         lm_proj(W: ws[1].withUnsafeBytes { $0.baseAddress! }, dtype: Int32(LM_Q4_1), n_out: Int64(outs[1]),
                                                 Y: y1.baseAddress!, ldy: Int64(outs[1]), segs: s1.baseAddress!, n_segs: Int32(s1.count))]
                            if fused {
                                lm_rmsnorm_matmul_multi(x, weight, eps, &X, projs, 2, Int64(nIn), Int64(nRows), &mm, &ls)
                            } else {
                                lm_rmsnorm(x, weight, &X, Int64(nRows), Int64(nIn), eps)
                                lm_matmul_multi(projs, 2, Int64(nIn), X, Int64(nIn), Int64(nRows), &mm, &ls)
                            }
                        } }
                    } }
                    return [y0s, y1s]
                }
                for level in KernelTests.levels {
                    lm_cpu_set_level(level)
                    for cap in [-1, 0, 3] {
                        lm_matmul_set_early_chunks(Int32(cap))
                        var seqX = [Float](repeating: 0, count: nRows * nIn), fusedX = seqX
                        let seq = run(false, &seqX), fused = run(true, &fusedX)
                        let tag = "rows \(nRows) level \(level) cap \(cap)"
                        XCTAssertTrue(fusedX == seqX, "\(tag): normalised rows")
                        XCTAssertLessThan(KernelTests.maxRelErr(fusedX, refX), 1e-6, "\(tag): RMSNorm vs double")
                        for p in 0..<2 {
                            XCTAssertTrue(fused[p] == seq[p], "\(tag) projection \(p): fused vs RMSNorm then lm_matmul_multi")
                            XCTAssertLessThan(KernelTests.maxRelErr(fused[p], refs[p]), 1e-5, "\(tag) projection \(p): vs reference")
                        }
                    }
                }
            }
        }
    }

    func testCRC32CKnownValue() {
        let s = Array("123456789".utf8)
        XCTAssertEqual(lm_crc32c(0, s, s.count), 0xE306_9283)  // the standard CRC-32C check value
        XCTAssertEqual(lm_crc32c_ref(0, s, s.count), 0xE306_9283)
    }

    /// Adapter tensors into kernel layout against plain loops: f32, f16 and
    /// bf16 sources, with and without the transpose, odd shapes across the
    /// 16 x 16 tiles, f32 and f16 destinations; a NaN or infinity anywhere is
    /// reported at its source index.
    func testAdapterTensorConversionMatchesPlainLoops() {
        var rng = KernelTests.LCG(s: 5)
        for (rows, cols) in [(1, 1), (16, 4), (17, 33), (1536, 16), (5, 300)] {
            let n = rows * cols
            let values = (0..<n).map { _ in rng.sym() * 3 }
            var f16 = [UInt16](repeating: 0, count: n)
            lm_f32_to_f16_n(values, &f16, Int64(n))
            let bf16 = values.map { UInt16($0.bitPattern >> 16) }
            for (dtype, exact) in [(Int32(LM_F32), values), (Int32(LM_F16), f16.map { lm_f16_to_f32($0) }),
                                   (Int32(LM_BF16), bf16.map { Float(bitPattern: UInt32($0) << 16) })] {
                for transpose in [false, true] {
                    let want = transpose ? (0..<n).map { i in exact[(i % rows) * cols + i / rows] } : exact
                    var scratch = [Float](repeating: 0, count: n)
                    var out32 = [Float](repeating: .nan, count: n)
                    var out16 = [UInt16](repeating: 0, count: n)
                    func run(_ dst: UnsafeMutableRawPointer, _ dstType: Int32) -> Int64 {
                        let go = { (src: UnsafeRawPointer) in
                            lm_adapter_tensor(dtype, src, Int64(rows), Int64(cols), transpose ? 1 : 0, dstType, dst, &scratch)
                        }
                        switch dtype {
                        case Int32(LM_F32): return values.withUnsafeBytes { go($0.baseAddress!) }
                        case Int32(LM_F16): return f16.withUnsafeBytes { go($0.baseAddress!) }
                        default: return bf16.withUnsafeBytes { go($0.baseAddress!) }
                        }
                    }
                    XCTAssertEqual(out32.withUnsafeMutableBytes { run($0.baseAddress!, Int32(LM_F32)) }, -1)
                    XCTAssertEqual(out32, want, "\(rows)x\(cols) dtype \(dtype) transpose \(transpose)")
                    XCTAssertEqual(out16.withUnsafeMutableBytes { run($0.baseAddress!, Int32(LM_F16)) }, -1)
                    var want16 = [UInt16](repeating: 0, count: n)
                    lm_f32_to_f16_n(want, &want16, Int64(n))
                    XCTAssertEqual(out16, want16, "\(rows)x\(cols) dtype \(dtype) transpose \(transpose), f16")
                }
            }
            // A non-finite value is found where the source has it.
            for bad in [Float.nan, .infinity, -.infinity] {
                let at = n / 2
                var v = values
                v[at] = bad
                var scratch = [Float](repeating: 0, count: n), out = [Float](repeating: 0, count: n)
                let got = v.withUnsafeBytes { src in out.withUnsafeMutableBytes { dst in
                    lm_adapter_tensor(Int32(LM_F32), src.baseAddress!, Int64(rows), Int64(cols), 1, Int32(LM_F32), dst.baseAddress!, &scratch) } }
                XCTAssertEqual(got, Int64(at), "\(bad) at \(at) of \(n)")
                XCTAssertEqual(lm_first_nonfinite(v, Int64(n)), Int64(at))
            }
        }
        XCTAssertEqual(lm_first_nonfinite([1, 2, 3], 3), -1)
        XCTAssertEqual(lm_first_nonfinite((0..<200).map { $0 == 130 ? .nan : Float($0) }, 200), 130)
        XCTAssertEqual(lm_first_nonfinite((0..<200).map { $0 == 130 || $0 == 190 ? .infinity : Float($0) }, 200), 130)
    }

    /// GGUF's RoPE column order against the formula, written out: for 4- and
    /// 2-byte elements, SmolLM2's and the tiny model's head sizes, and an odd one.
    func testRopePermutationMatchesTheFormula() {
        for (rows, heads, hd) in [(16, 9, 64), (3, 2, 16), (2, 3, 5), (1, 1, 2)] {
            let cols = heads * hd
            let src32 = (0..<(rows * cols)).map { UInt32($0) }
            var want = src32
            for r in 0..<rows {
                for g in 0..<cols {
                    let (h, k) = (g / hd, g % hd)
                    want[r * cols + g] = src32[r * cols + h * hd + (k % 2) * (hd / 2) + k / 2]
                }
            }
            var got32 = src32
            got32.withUnsafeMutableBytes { lm_rope_permute_cols($0.baseAddress!, Int64(rows), Int64(cols), Int64(hd), 4) }
            XCTAssertEqual(got32, want, "\(rows)x\(heads)x\(hd)")
            var got16 = src32.map { UInt16($0) }
            got16.withUnsafeMutableBytes { lm_rope_permute_cols($0.baseAddress!, Int64(rows), Int64(cols), Int64(hd), 2) }
            XCTAssertEqual(got16, want.map { UInt16($0) }, "\(rows)x\(heads)x\(hd), 2-byte")
        }
    }

    /// bf16 in the upper half of a buffer widens in place to the values a
    /// separate loop gives, for lengths around the 16-value blocks.
    func testBF16WidensInPlace() {
        var rng = KernelTests.LCG(s: 8)
        for n in [1, 15, 16, 17, 31, 32, 33, 1000] {
            let h = (0..<n).map { _ in UInt16(truncatingIfNeeded: rng.next()) }
            var buf = [UInt32](repeating: 0, count: n)
            buf.withUnsafeMutableBytes { b in
                h.withUnsafeBytes { (b.baseAddress! + 2 * n).copyMemory(from: $0.baseAddress!, byteCount: 2 * n) }
                lm_bf16_widen_in_place(b.baseAddress!, Int64(n))
            }
            XCTAssertEqual(buf, h.map { UInt32($0) << 16 }, "n \(n)")
        }
    }

    /// f32 to bf16 in place: each result is the nearer of the two bf16 values
    /// around the input (ties to the even one), computed in Double; NaN stays
    /// NaN, infinities and values past the largest bf16 become infinities.
    func testF32ToBF16RoundsToNearestEven() {
        var rng = KernelTests.LCG(s: 11)
        var xs: [Float] = [0, -0, 1, -1, .infinity, -.infinity, .nan, .greatestFiniteMagnitude, .leastNonzeroMagnitude,
                           Float(bitPattern: 0x3F80_8000), Float(bitPattern: 0x3F81_8000), Float(bitPattern: 0x3F80_8001),
                           Float(bitPattern: 0x7F7F_8000), Float(bitPattern: 0x7F7F_7FFF), Float(bitPattern: 0xFF7F_8000)]
        xs += (0..<5000).map { _ in Float(bitPattern: UInt32(truncatingIfNeeded: rng.next())) }
        var buf = xs.map(\.bitPattern)
        buf.withUnsafeMutableBytes { lm_f32_to_bf16_in_place($0.baseAddress!, Int64(xs.count)) }
        let h = buf.withUnsafeBytes { Array($0.bindMemory(to: UInt16.self).prefix(xs.count)) }
        for (x, got) in zip(xs, h) {
            let y = Float(bitPattern: UInt32(got) << 16)
            if x.isNaN { XCTAssertTrue(y.isNaN, "\(x.bitPattern)"); continue }
            if x.isInfinite { XCTAssertEqual(y, x); continue }
            let down = Float(bitPattern: x.bitPattern & 0xFFFF_0000)  // toward zero
            let up = Float(bitPattern: (x.bitPattern & 0xFFFF_0000) &+ 0x1_0000)  // away from zero, maybe infinity
            let upValue = up.isInfinite ? (x.sign == .minus ? -0x1p128 : 0x1p128) : Double(up)  // where rounding overflows
            let (dd, du) = (abs(Double(x) - Double(down)), abs(Double(x) - upValue))
            let want = dd < du ? down : du < dd ? up : ((down.bitPattern >> 16) & 1 == 0 ? down : up)
            XCTAssertEqual(y.bitPattern, want.bitPattern, "\(x) (\(String(x.bitPattern, radix: 16)))")
        }
    }

    /// The three-stream hardware CRC against the bitwise definition: lengths
    /// around every stretch boundary (3 x 256 and 3 x 8192 bytes), odd starts,
    /// a running CRC carried in, and one buffer fed in pieces.
    func testCRC32CThreeStreamsMatchTheBitwiseDefinition() {
        var rng = KernelTests.LCG(s: 77)
        let buf = (0..<(3 * 8192 * 2 + 3 * 256 + 64)).map { _ in rng.byte() }
        let lengths = [0, 1, 7, 8, 9, 255, 767, 768, 769, 3 * 256 * 2 + 5, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1,
                       3 * 8192 + 3 * 256 + 13, 3 * 8192 * 2, buf.count - 3]
        buf.withUnsafeBytes { raw in
            for n in lengths {
                for start in [0, 1, 3] where start + n <= buf.count {
                    let p = raw.baseAddress! + start
                    let want = lm_crc32c_ref(0x1234_5678, p, n)
                    XCTAssertEqual(lm_crc32c(0x1234_5678, p, n), want, "length \(n) from \(start)")
                }
            }
            let whole = lm_crc32c_ref(0, raw.baseAddress!, buf.count)
            var c: UInt32 = 0, at = 0
            for piece in [5, 3 * 8192 + 100, 1000, 3 * 256] { c = lm_crc32c(c, raw.baseAddress! + at, piece); at += piece }
            c = lm_crc32c(c, raw.baseAddress! + at, buf.count - at)
            XCTAssertEqual(c, whole)
        }
    }
}

extension Array {
    /// Pointers to each inner array's storage, valid inside `body`.
    func withUnsafeBufferPointers<R, E>(_ body: ([UnsafeRawPointer]) -> R) -> R where Element == [E] {
        func go(_ i: Int, _ acc: [UnsafeRawPointer]) -> R {
            if i == count { return body(acc) }
            return self[i].withUnsafeBytes { go(i + 1, acc + [$0.baseAddress!]) }
        }
        return go(0, [])
    }
}
