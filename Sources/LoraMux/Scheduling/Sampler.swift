import Foundation
import CKernels

/// Per-request sampling settings.
public struct SamplingParams: Sendable, Equatable {
    /// 0 means greedy.
    public var temperature: Float = 0
    /// 0 means no top-k cut.
    public var topK: Int = 0
    /// 1 means no nucleus cut.
    public var topP: Float = 1
    public var seed: UInt64? = nil
    public var maxTokens: Int = 16
    public var stop: [String] = []
    /// Keep generating past end-of-sequence tokens (benchmarks, fixtures).
    public var ignoreEOS: Bool = false

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, seed: UInt64? = nil,
                maxTokens: Int = 16, stop: [String] = [], ignoreEOS: Bool = false) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
        self.maxTokens = maxTokens
        self.stop = stop
        self.ignoreEOS = ignoreEOS
    }

    public static let maxTokensLimit = 1 << 24

    public func validate() throws {
        guard temperature.isFinite, temperature >= 0 else { throw EngineError.invalidArgument("temperature must be >= 0") }
        guard topK >= 0 else { throw EngineError.invalidArgument("top_k must be >= 0") }
        guard topP.isFinite, topP > 0, topP <= 1 else { throw EngineError.invalidArgument("top_p must be in (0, 1]") }
        guard maxTokens >= 1 else { throw EngineError.invalidArgument("max_tokens must be >= 1") }
        // No context is this long; the bound keeps prompt + max_tokens from overflowing.
        guard maxTokens <= Self.maxTokensLimit else { throw EngineError.invalidArgument("max_tokens must be <= \(Self.maxTokensLimit)") }
        guard stop.count <= 16, stop.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 256 }) else {
            throw EngineError.invalidArgument("stop: at most 16 non-empty strings of at most 256 bytes")
        }
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible per seed.
public struct RandomSource: RandomNumberGenerator, Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var z = seed
        func next() -> UInt64 {
            z &+= 0x9E37_79B9_7F4A_7C15
            var x = z
            x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
            x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
            return x ^ (x >> 31)
        }
        s = (next(), next(), next(), next())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = (s.3 << 45) | (s.3 >> 19)
        return result
    }

    /// Uniform in [0, 1).
    public mutating func nextFloat() -> Double { Double(next() >> 11) * 0x1.0p-53 }
}

/// Picks the next token from one row of logits.
public struct Sampler: Sendable {
    public let params: SamplingParams
    private var rng: RandomSource

    public init(params: SamplingParams) {
        self.params = params
        rng = RandomSource(seed: params.seed ?? UInt64.random(in: 0...UInt64.max))
    }

    public mutating func sample(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
        let n = logits.count
        if params.temperature == 0 || params.topK == 1 {
            return Int32(lm_argmax(logits.baseAddress, Int64(n)))
        }
        // Candidates in descending logit order, cut by top-k first.
        var idx: [Int32]
        if params.topK > 0 && params.topK < n {
            idx = Sampler.topK(logits, params.topK)
        } else {
            idx = (0..<Int32(n)).filter { !logits[Int($0)].isNaN && logits[Int($0)] > -.infinity }
            idx.sort { logits[Int($0)] > logits[Int($1)] }
        }
        guard let first = idx.first else { return Int32(lm_argmax(logits.baseAddress, Int64(n))) }
        let maxL = Double(logits[Int(first)])
        let t = Double(params.temperature)
        var probs = idx.map { exp((Double(logits[Int($0)]) - maxL) / t) }
        let total = probs.reduce(0, +)
        for i in probs.indices { probs[i] /= total }
        var keep = probs.count
        if params.topP < 1 {
            var acc = 0.0
            for (i, p) in probs.enumerated() {
                acc += p
                if acc >= Double(params.topP) { keep = i + 1; break }
            }
        }
        let mass = probs[0..<keep].reduce(0, +)
        var u = rng.nextFloat() * mass
        for i in 0..<keep {
            u -= probs[i]
            if u < 0 { return idx[i] }
        }
        return idx[keep - 1]
    }

    /// The k largest logits' ids, largest first (ties by lower id).
    static func topK(_ logits: UnsafeBufferPointer<Float>, _ k: Int) -> [Int32] {
        var heap: [(Float, Int32)] = []  // min-heap by value
        heap.reserveCapacity(k)
        func less(_ a: (Float, Int32), _ b: (Float, Int32)) -> Bool { a.0 < b.0 || (a.0 == b.0 && a.1 > b.1) }
        func siftDown(_ i0: Int) {
            var i = i0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < heap.count && less(heap[l], heap[m]) { m = l }
                if r < heap.count && less(heap[r], heap[m]) { m = r }
                if m == i { return }
                heap.swapAt(i, m)
                i = m
            }
        }
        for i in 0..<logits.count {
            let e = (logits[i], Int32(i))
            if heap.count < k {
                heap.append(e)
                var c = heap.count - 1
                while c > 0 {
                    let p = (c - 1) / 2
                    if less(heap[c], heap[p]) { heap.swapAt(c, p); c = p } else { break }
                }
            } else if less(heap[0], e) {
                heap[0] = e
                siftDown(0)
            }
        }
        return heap.sorted { less($1, $0) }.map(\.1)
    }
}
