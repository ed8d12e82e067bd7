import Foundation

public enum FinishReason: String, Sendable, Codable {
    case stop, length
}

public struct GenerationResult: Sendable {
    public var promptIds: [Int32]
    public var tokenIds: [Int32]
    public var text: String
    public var finishReason: FinishReason
}

/// Runs one sequence to completion: chunked prefill, then decode, sampling,
/// and stopping on EOS, stop strings or max tokens. The batching engine
/// generalises this loop to many sequences per step.
public final class Generator: @unchecked Sendable {
    public let model: LlamaModel
    public let tokenizer: BPETokenizer?
    public let cache: KVCache
    public var prefillChunk = 256

    public init(model: LlamaModel, tokenizer: BPETokenizer?, cacheBytes: Int = 256 << 20) throws {
        self.model = model
        self.tokenizer = tokenizer
        cache = try KVCache(config: model.config, budgetBytes: cacheBytes)
    }

    /// `onToken` gets each new id and returns false to stop early.
    public func generate(promptIds: [Int32], params: SamplingParams, adapter: LoraAdapter? = nil,
                         onToken: (Int32) -> Bool = { _ in true }) throws -> GenerationResult {
        try params.validate(vocabSize: model.config.vocabSize)
        let c = model.config
        guard !promptIds.isEmpty else { throw EngineError.invalidArgument("the prompt is empty") }
        for t in promptIds where t < 0 || Int(t) >= c.vocabSize { throw EngineError.tokenOutOfRange(t, vocab: c.vocabSize) }
        let total = promptIds.count + params.maxTokens
        guard total <= c.maxPositions else { throw EngineError.promptTooLong(tokens: total, limit: c.maxPositions) }
        var table: [Int32] = []
        guard cache.reserve(&table, tokens: total) else {
            throw EngineError.cacheFull("\(total) tokens need \(cache.blocksNeeded(tokens: total)) blocks, \(cache.freeBlocks) free")
        }
        defer { cache.release(&table) }

        var sampler = Sampler(params: params, prompt: promptIds)
        var logits: [Float] = []
        var start = 0
        while start < promptIds.count {
            let end = min(start + max(1, prefillChunk), promptIds.count)
            var batch = ForwardBatch(rows: [], tables: [table], adapters: [adapter])
            for i in start..<end {
                batch.rows.append(BatchRow(token: promptIds[i], position: Int32(i), sequence: 0, wantsLogits: i == promptIds.count - 1))
            }
            logits = try model.forward(batch, cache: cache)
            start = end
        }
        let eos = tokenizer?.eotIds ?? []
        var out: [Int32] = []
        var text = ""
        var reason = FinishReason.length
        while true {
            let next = logits.withUnsafeBufferPointer { sampler.sample($0) }
            // As in the engine: overflowed logits stop the generation (see Engine.step).
            guard logits[Int(next)].isFinite else {
                throw EngineError.nonFiniteLogits(adapter: adapter?.name, position: promptIds.count + out.count)
            }
            if !params.ignoreEOS && eos.contains(next) { reason = .stop; break }
            out.append(next)
            if let tok = tokenizer, !params.stop.isEmpty {
                text = tok.decode(out, continuation: true)
                if let cut = Generator.firstStop(in: text, stops: params.stop) {
                    text = String(text[..<cut])
                    reason = .stop
                    break
                }
            }
            if !onToken(next) { reason = .stop; break }
            if out.count >= params.maxTokens { break }
            let pos = Int32(promptIds.count + out.count - 1)
            let batch = ForwardBatch(rows: [BatchRow(token: next, position: pos, sequence: 0, wantsLogits: true)], tables: [table], adapters: [adapter])
            logits = try model.forward(batch, cache: cache)
        }
        if params.stop.isEmpty || reason != .stop { text = tokenizer?.decode(out, continuation: true) ?? "" }
        return GenerationResult(promptIds: promptIds, tokenIds: out, text: text, finishReason: reason)
    }

    static func firstStop(in text: String, stops: [String]) -> String.Index? {
        var best: String.Index? = nil
        for s in stops {
            if let r = text.range(of: s), best == nil || r.lowerBound < best! { best = r.lowerBound }
        }
        return best
    }
}
