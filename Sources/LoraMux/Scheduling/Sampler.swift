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
    /// OpenAI's penalties on tokens generated so far: `logit -= frequency * count + presence * (count > 0)`.
    public var frequencyPenalty: Float = 0
    public var presencePenalty: Float = 0
    /// vLLM's and transformers' penalty on tokens of the prompt or the output:
    /// a positive logit is divided by it, a negative one multiplied. 1 is off.
    public var repetitionPenalty: Float = 1
    /// OpenAI's `logit_bias`: added to a token's logit before sampling.
    public var logitBias: [Int32: Float] = [:]
    /// Logprobs of each sampled token plus this many top alternatives (nil: none).
    public var logprobs: Int? = nil
    /// Logprobs of the prompt's tokens (from the second on) plus this many top
    /// alternatives each (nil: none); completions' `echo` with `logprobs`.
    public var promptLogprobs: Int? = nil

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, seed: UInt64? = nil,
                maxTokens: Int = 16, stop: [String] = [], ignoreEOS: Bool = false,
                frequencyPenalty: Float = 0, presencePenalty: Float = 0, repetitionPenalty: Float = 1,
                logitBias: [Int32: Float] = [:], logprobs: Int? = nil, promptLogprobs: Int? = nil) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
        self.maxTokens = maxTokens
        self.stop = stop
        self.ignoreEOS = ignoreEOS
        self.frequencyPenalty = frequencyPenalty
        self.presencePenalty = presencePenalty
        self.repetitionPenalty = repetitionPenalty
        self.logitBias = logitBias
        self.logprobs = logprobs
        self.promptLogprobs = promptLogprobs
    }

    public static let maxTokensLimit = 1 << 24
    /// Top alternatives per token, as OpenAI's and vLLM's default cap.
    public static let maxLogprobs = 20

    /// Whether the logits are changed before sampling.
    public var adjustsLogits: Bool {
        frequencyPenalty != 0 || presencePenalty != 0 || repetitionPenalty != 1 || !logitBias.isEmpty
    }

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
        guard frequencyPenalty.isFinite, abs(frequencyPenalty) <= 2 else { throw EngineError.invalidArgument("frequency_penalty must be in [-2, 2]") }
        guard presencePenalty.isFinite, abs(presencePenalty) <= 2 else { throw EngineError.invalidArgument("presence_penalty must be in [-2, 2]") }
        guard repetitionPenalty.isFinite, repetitionPenalty > 0 else { throw EngineError.invalidArgument("repetition_penalty must be > 0") }
        guard logitBias.count <= 1024 else { throw EngineError.invalidArgument("logit_bias: at most 1024 tokens") }
        for (t, b) in logitBias {
            guard t >= 0 else { throw EngineError.invalidArgument("logit_bias: token id \(t) is negative") }
            guard b.isFinite, abs(b) <= 100 else { throw EngineError.invalidArgument("logit_bias: values must be in [-100, 100]") }
        }
        for (name, n) in [("logprobs", logprobs), ("prompt logprobs", promptLogprobs)] {
            if let n, !(0...Self.maxLogprobs).contains(n) {
                throw EngineError.invalidArgument("\(name) must be in 0...\(Self.maxLogprobs)")
            }
        }
    }

    /// Checks what depends on the model: token ids in `logit_bias` must be in the vocabulary.
    public func validate(vocabSize: Int) throws {
        try validate()
        for t in logitBias.keys where Int(t) >= vocabSize { throw EngineError.tokenOutOfRange(t, vocab: vocabSize) }
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

/// One token's log-probability under the model (raw logits, before
/// temperature, penalties or bias, as vLLM reports them) and the most likely
/// alternatives at that position, most likely first.
public struct TokenLogprob: Sendable, Equatable {
    public var token: Int32
    public var logprob: Float
    public var top: [TopLogprob]

    public struct TopLogprob: Sendable, Equatable {
        public var token: Int32
        public var logprob: Float
    }

    /// `token`'s logprob in `logits` and the `top` largest (ties: lower id first).
    public static func from(_ logits: UnsafeBufferPointer<Float>, token: Int32, top: Int) -> TokenLogprob {
        let lse = lm_logsumexp(logits.baseAddress, Int64(logits.count))
        func lp(_ t: Int32) -> Float { Float(Double(logits[Int(t)]) - lse) }
        let alternatives = top > 0 ? Sampler.topK(logits, min(top, logits.count)).map { TopLogprob(token: $0, logprob: lp($0)) } : []
        return TokenLogprob(token: token, logprob: lp(token), top: alternatives)
    }
}

/// Picks the next token from one row of logits.
public struct Sampler: Sendable {
    public let params: SamplingParams
    private var rng: RandomSource
    /// What the penalties count: how often each token was sampled, and the prompt's tokens.
    private var outputCounts: [Int32: Int] = [:]
    private let promptTokens: Set<Int32>
    private var scratch: [Float] = []

    public init(params: SamplingParams, prompt: [Int32] = []) {
        self.params = params
        rng = RandomSource(seed: params.seed ?? UInt64.random(in: 0...UInt64.max))
        promptTokens = params.repetitionPenalty != 1 ? Set(prompt) : []
    }

    /// The next token; penalties and bias act on a copy of the row.
    public mutating func sample(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
        guard params.adjustsLogits else { return choose(logits) }
        var row = scratch
        scratch = []
        row.removeAll(keepingCapacity: true)
        row.append(contentsOf: logits)
        row.withUnsafeMutableBufferPointer { adjust($0) }
        let t = row.withUnsafeBufferPointer { choose($0) }
        scratch = row  // kept for the next step's copy
        outputCounts[t, default: 0] += 1
        return t
    }

    /// vLLM's order: repetition (prompt and output tokens), then frequency
    /// and presence (output tokens), then the bias.
    func adjust(_ l: UnsafeMutableBufferPointer<Float>) {
        let rep = params.repetitionPenalty
        if rep != 1 {
            func penalize(_ t: Int32) { let v = l[Int(t)]; l[Int(t)] = v > 0 ? v / rep : v * rep }
            for t in promptTokens { penalize(t) }
            for t in outputCounts.keys where !promptTokens.contains(t) { penalize(t) }
        }
        if params.frequencyPenalty != 0 || params.presencePenalty != 0 {
            for (t, c) in outputCounts {
                l[Int(t)] -= params.frequencyPenalty * Float(c)
                l[Int(t)] -= params.presencePenalty
            }
        }
        for (t, b) in params.logitBias where Int(t) < l.count { l[Int(t)] += b }
    }

    private mutating func choose(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
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
