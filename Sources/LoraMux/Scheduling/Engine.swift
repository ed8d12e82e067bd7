import Foundation
import CKernels

public struct EngineConfig: Sendable {
    /// Sequences decoding together (the running set).
    public var maxRunning = 64
    /// Rows per forward step: every running decode row, then prompt chunks.
    public var stepTokenBudget = 256
    /// KV-cache pool size.
    public var kvCacheBytes = 512 << 20
    public var blockSize = 16
    /// Requests waiting for admission before `submit` refuses more.
    public var maxQueued = 1024
    /// When the KV pool's pages are faulted in (see KVCache).
    public var kvPrefault: Prefault = .lazily
    /// Reuse full KV blocks of earlier sequences with the same adapter and prefix.
    public var prefixCaching = true

    public init(maxRunning: Int = 64, stepTokenBudget: Int = 256, kvCacheBytes: Int = 512 << 20, blockSize: Int = 16,
                maxQueued: Int = 1024, kvPrefault: Prefault = .lazily, prefixCaching: Bool = true) {
        self.maxRunning = maxRunning
        self.stepTokenBudget = stepTokenBudget
        self.kvCacheBytes = kvCacheBytes
        self.blockSize = blockSize
        self.maxQueued = maxQueued
        self.kvPrefault = kvPrefault
        self.prefixCaching = prefixCaching
    }
}

public struct Usage: Sendable, Equatable {
    public var promptTokens: Int
    public var completionTokens: Int
    /// Prompt tokens whose K/V came from the prefix cache.
    public var cachedTokens: Int
    public var totalTokens: Int { promptTokens + completionTokens }
    public init(promptTokens: Int, completionTokens: Int, cachedTokens: Int = 0) {
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.cachedTokens = cachedTokens
    }
}

/// One event of a request's stream: a new token with its text delta (the
/// text may be empty while UTF-8 bytes or a possible stop string are held
/// back), and on the last event the finish reason and usage.
public struct TokenEvent: Sendable {
    public var tokenId: Int32?
    public var text: String
    public var finishReason: FinishReason?
    public var usage: Usage?
    /// `tokenId`'s logprob when the request asked for them.
    public var logprob: TokenLogprob? = nil
    /// On the first event of a request that asked for prompt logprobs: one
    /// entry for each prompt token from the second on (the first has no context).
    public var promptLogprobs: [TokenLogprob]? = nil
}

public struct CompletionRequest: Sendable {
    public var promptIds: [Int32]
    public var params: SamplingParams
    /// A pin on the request's adapter (nil: the base model). The engine
    /// releases it when the sequence ends, however it ends.
    public var adapter: AdapterLease?

    public init(promptIds: [Int32], params: SamplingParams, adapter: AdapterLease? = nil) {
        self.promptIds = promptIds
        self.params = params
        self.adapter = adapter
    }
}

public struct EngineHandle: Sendable {
    public let id: UInt64
    public let events: AsyncThrowingStream<TokenEvent, Error>
}

public struct EngineMetrics: Sendable {
    public var queued = 0, running = 0
    public var kvBlocksUsed = 0, kvBlocksTotal = 0
    public var steps = 0, promptTokens = 0, generatedTokens = 0, preemptions = 0
    public var lastBatchRows = 0
    public var finishedRequests = 0, cancelledRequests = 0
    /// Registered KV blocks (held or idle) and prompt tokens served from them.
    public var kvBlocksCached = 0, cachedPromptTokens = 0
}

/// The step loop: one thread owns the model and the KV cache and runs
/// iteration-level continuous batching. Requests join between steps; prompts
/// are prefilled in chunks inside the step's token budget; rows are grouped by
/// adapter so each adapter is one segment of the fused LoRA kernel.
public final class Engine: @unchecked Sendable {
    public let model: LlamaModel
    public let tokenizer: BPETokenizer?
    public let config: EngineConfig
    let cache: KVCache

    private let cond = NSCondition()
    private var inbox: [Seq] = []
    private var cancels: Set<UInt64> = []
    private var stopping = false
    private var stopped = false
    private var nextId: UInt64 = 1
    private var metricsValue = EngineMetrics()
    private var thread: Thread?

    // Owned by the engine thread.
    private var waiting: [Seq] = []
    private var running: [Seq] = []

    final class Seq {
        let id: UInt64
        let promptLen: Int
        var tokens: [Int32]
        var computed = 0           // positions with K/V in the cache
        var table: [Int32] = []
        var chain: [UInt64] = []   // content ids of the table's leading full blocks (KVCache.register)
        var admitted = false
        var cachedTokens = 0       // prompt positions taken from the prefix cache at first admission
        var sampler: Sampler
        let params: SamplingParams
        var decoder: TokenDecoder?
        var heldText = ""          // decoded text not yet sent (a stop string may be starting)
        var promptLogprobs: [TokenLogprob] = []  // for prompt tokens 1..., filled as prefill chunks run
        var promptLogprobsSent = false
        let lease: AdapterLease?
        let continuation: AsyncThrowingStream<TokenEvent, Error>.Continuation
        var generated: Int { tokens.count - promptLen }
        func wantsPromptLogprob(at pos: Int) -> Bool {
            params.promptLogprobs != nil && !promptLogprobsSent && pos < promptLen - 1 && pos >= promptLogprobs.count
        }
        /// Sends an event; the first one carries the prompt's logprobs.
        func send(_ e: TokenEvent) {
            var e = e
            if params.promptLogprobs != nil && !promptLogprobsSent {
                e.promptLogprobs = promptLogprobs
                promptLogprobsSent = true
                promptLogprobs = []
            }
            continuation.yield(e)
        }
        var adapterKey: ObjectIdentifier? { lease.map { ObjectIdentifier($0.adapter) } }
        /// What computed this sequence's K/V, for the prefix cache's keys.
        var salt: UInt64 { lease?.adapter.prefixSalt ?? 0 }
        var usage: Usage { Usage(promptTokens: promptLen, completionTokens: generated, cachedTokens: cachedTokens) }

        init(id: UInt64, req: CompletionRequest, tokenizer: BPETokenizer?, continuation: AsyncThrowingStream<TokenEvent, Error>.Continuation) {
            self.id = id
            promptLen = req.promptIds.count
            tokens = req.promptIds
            params = req.params
            sampler = Sampler(params: req.params, prompt: req.promptIds)
            decoder = tokenizer.map { TokenDecoder(tokenizer: $0) }
            lease = req.adapter
            self.continuation = continuation
        }
    }

    public init(model: LlamaModel, tokenizer: BPETokenizer?, config: EngineConfig = EngineConfig()) throws {
        guard config.maxRunning >= 1, config.stepTokenBudget >= 1, config.maxQueued >= 1 else {
            throw EngineError.invalidArgument("engine limits must be positive")
        }
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        cache = try KVCache(config: model.config, budgetBytes: config.kvCacheBytes, blockSize: config.blockSize, prefault: config.kvPrefault)
        metricsValue.kvBlocksTotal = cache.numBlocks
        let t = Thread { [weak self] in self?.loop() }
        t.name = "loramux-engine"
        t.stackSize = 8 << 20
        thread = t
        t.start()
    }

    deinit { shutdown() }

    /// Largest prompt + max_tokens one request may ask for.
    public var maxSequenceTokens: Int { min(model.config.maxPositions, cache.numBlocks * cache.blockSize) }

    /// Queues a request; its events arrive on the returned stream. Throws at
    /// once for requests that can never run (bad ids, too long, queue full).
    public func submit(_ req: CompletionRequest) throws -> EngineHandle {
        let c = model.config
        try req.params.validate(vocabSize: c.vocabSize)
        guard !req.promptIds.isEmpty else { throw EngineError.invalidArgument("the prompt is empty") }
        for t in req.promptIds where t < 0 || Int(t) >= c.vocabSize { throw EngineError.tokenOutOfRange(t, vocab: c.vocabSize) }
        let total = req.promptIds.count + req.params.maxTokens
        guard total <= maxSequenceTokens else { throw EngineError.promptTooLong(tokens: total, limit: maxSequenceTokens) }
        cond.lock()
        defer { cond.unlock() }
        guard !stopping else { throw EngineError.shuttingDown }
        guard inbox.count + metricsValue.queued < config.maxQueued else { throw EngineError.overloaded(queued: metricsValue.queued + inbox.count) }
        let id = nextId
        nextId += 1
        var cont: AsyncThrowingStream<TokenEvent, Error>.Continuation!
        let stream = AsyncThrowingStream<TokenEvent, Error>(bufferingPolicy: .unbounded) { cont = $0 }
        cont.onTermination = { [weak self] term in
            if case .cancelled = term { self?.cancel(id) }
        }
        inbox.append(Seq(id: id, req: req, tokenizer: tokenizer, continuation: cont))
        cond.signal()
        return EngineHandle(id: id, events: stream)
    }

    /// Stops a request at the next step: its blocks and adapter pin are released.
    public func cancel(_ id: UInt64) {
        cond.lock()
        cancels.insert(id)
        cond.signal()
        cond.unlock()
    }

    /// Cancels everything, ends every stream with `shuttingDown`, and waits for the thread.
    public func shutdown() {
        cond.lock()
        if stopping { while !stopped { cond.wait() }; cond.unlock(); return }
        stopping = true
        cond.broadcast()
        while !stopped { cond.wait() }
        cond.unlock()
    }

    public var metrics: EngineMetrics {
        cond.lock(); defer { cond.unlock() }
        return metricsValue
    }

    // MARK: - the step loop

    private func loop() {
        while true {
            cond.lock()
            while inbox.isEmpty && cancels.isEmpty && waiting.isEmpty && running.isEmpty && !stopping { cond.wait() }
            let newSeqs = inbox
            inbox.removeAll()
            let cancelled = cancels
            cancels.removeAll()
            let stop = stopping
            cond.unlock()

            waiting.append(contentsOf: newSeqs)
            if stop {
                for s in waiting + running { finish(s, error: EngineError.shuttingDown) }
                waiting.removeAll()
                running.removeAll()
                publish()
                cond.lock(); stopped = true; cond.broadcast(); cond.unlock()
                return
            }
            if !cancelled.isEmpty {
                for s in (waiting + running) where cancelled.contains(s.id) {
                    finish(s, error: nil, cancelled: true)
                }
                waiting.removeAll { cancelled.contains($0.id) }
                running.removeAll { cancelled.contains($0.id) }
            }
            admit()
            if !running.isEmpty {
                step()
            } else if !waiting.isEmpty {
                // Nothing admissible (should not happen: submit checks capacity);
                // wait for a change instead of spinning.
                cond.lock(); _ = cond.wait(until: Date().addingTimeInterval(0.05)); cond.unlock()
            }
            publish()
        }
    }

    private func publish() {
        cond.lock()
        metricsValue.queued = waiting.count
        metricsValue.running = running.count
        metricsValue.kvBlocksUsed = cache.usedBlocks
        metricsValue.kvBlocksCached = cache.cachedBlocks
        cond.unlock()
    }

    /// FIFO admission while the running set has room and the pool has blocks
    /// for the prompt plus one block of headroom per running sequence. A
    /// sequence starts on the cached blocks of its prefix, if any; one whose
    /// prefix another sequence is computing right now waits for it (see
    /// `waitsForPrefix`) and lets the ones behind it go first.
    private func admit() {
        var i = 0
        while i < waiting.count, running.count < config.maxRunning {
            let s = waiting[i]
            if i < Self.prefixWaitScan, waitsForPrefix(s) { i += 1; continue }
            let hit = prefixLookup(s)
            let need = cache.blocksNeeded(tokens: s.tokens.count + 1) - hit.blocks.count
            // Idle cached blocks count as free, so taking them uses up room too.
            guard cache.freeBlocks - hit.idle >= need + running.count else { break }
            cache.acquire(hit, into: &s.table)
            guard cache.reserve(&s.table, tokens: s.tokens.count + 1) else { cache.release(&s.table); break }
            s.chain = hit.ids
            s.computed = hit.blocks.count * cache.blockSize
            if !s.admitted {
                s.admitted = true
                s.cachedTokens = min(s.computed, s.promptLen)
                cond.lock(); metricsValue.cachedPromptTokens += s.cachedTokens; cond.unlock()
            }
            waiting.remove(at: i)
            running.append(s)
        }
    }

    /// Waiting sequences checked against the running prefills at each admission.
    static let prefixWaitScan = 64

    /// Whether a running sequence with the same adapter is still computing
    /// whole blocks of this sequence's prefix: then they will be in the cache
    /// within a few steps, and computing them twice (n choices of one prompt,
    /// a burst of requests with one system prompt) would cost the step budget
    /// and KV blocks for nothing. No deadlock: a preempted or finished owner is
    /// no longer running, and a running prefill moves on every step.
    private func waitsForPrefix(_ s: Seq) -> Bool {
        guard usesPrefixCache(s) else { return false }
        let bs = cache.blockSize
        let limit = Self.prefixLimit(s)
        guard limit >= bs else { return false }
        for o in running where o.salt == s.salt {
            let n = min(limit, Self.prefixLimit(o))
            guard o.computed < n else { continue }
            var common = 0
            while common < n && s.tokens[common] == o.tokens[common] { common += 1 }
            if common / bs * bs > o.computed / bs * bs { return true }
        }
        return false
    }

    /// Prompt logprobs need every prompt row's logits, so a sequence that
    /// still owes them skips nothing (and waits for no one).
    private func usesPrefixCache(_ s: Seq) -> Bool {
        config.prefixCaching && (s.params.promptLogprobs == nil || s.promptLogprobsSent)
    }

    /// Positions a sequence may take from the cache: all but the last, which
    /// is always computed (its logits choose the next token).
    private static func prefixLimit(_ s: Seq) -> Int { s.tokens.count - 1 }

    private func prefixLookup(_ s: Seq) -> PrefixHit {
        guard usesPrefixCache(s) else { return PrefixHit() }
        return cache.lookup(s.tokens, limit: Self.prefixLimit(s), salt: s.salt)
    }

    /// Frees the newest running sequence's blocks and queues it again at the
    /// front; it recomputes its prompt and tokens so far when readmitted.
    private func preemptNewest(except keep: Seq) -> Bool {
        guard let victim = running.last(where: { $0 !== keep }) else { return false }
        running.removeAll { $0 === victim }
        cache.release(&victim.table)
        victim.chain = []
        victim.computed = 0
        waiting.insert(victim, at: 0)
        cond.lock(); metricsValue.preemptions += 1; cond.unlock()
        return true
    }

    private func step() {
        // Rows grouped by adapter: one contiguous segment per adapter.
        running.sort { ($0.adapterKey.map { UInt(bitPattern: $0.hashValue) } ?? 0, $0.id) < ($1.adapterKey.map { UInt(bitPattern: $0.hashValue) } ?? 0, $1.id) }
        var budget = config.stepTokenBudget
        var plan: [(seq: Seq, from: Int, to: Int)] = []
        // Decode rows first (one each), then prompt chunks, within the budget.
        let decoding = running.filter { $0.tokens.count - $0.computed == 1 }
        let prefilling = running.filter { $0.tokens.count - $0.computed > 1 }
        for s in decoding + prefilling {
            guard budget > 0 else { break }
            guard running.contains(where: { $0 === s }) else { continue }  // preempted earlier in this loop
            let n = min(s.tokens.count - s.computed, budget)
            // Make sure the table covers the positions written this step.
            while !cache.reserve(&s.table, tokens: s.computed + n + 1) {
                if !preemptNewest(except: s) { break }
            }
            guard s.table.count * cache.blockSize >= s.computed + n else { continue }
            plan.append((s, s.computed, s.computed + n))
            budget -= n
        }
        // Preemption may have removed planned sequences.
        plan.removeAll { p in !running.contains { $0 === p.seq } }
        guard !plan.isEmpty else { return }
        plan.sort { a, b in
            let ka = a.seq.adapterKey.map { UInt(bitPattern: $0.hashValue) } ?? 0
            let kb = b.seq.adapterKey.map { UInt(bitPattern: $0.hashValue) } ?? 0
            return (ka, a.seq.id) < (kb, b.seq.id)
        }
        var batch = ForwardBatch()
        for (i, p) in plan.enumerated() {
            batch.tables.append(p.seq.table)
            batch.adapters.append(p.seq.lease?.adapter)
            for pos in p.from..<p.to {
                batch.rows.append(BatchRow(token: p.seq.tokens[pos], position: Int32(pos), sequence: i,
                                           wantsLogits: pos == p.seq.tokens.count - 1 || p.seq.wantsPromptLogprob(at: pos)))
            }
        }
        let logits: [Float]
        do {
            logits = try model.forward(batch, cache: cache)
        } catch {
            // A failed step fails its requests, not the engine.
            for p in plan { finish(p.seq, error: error); running.removeAll { $0 === p.seq } }
            return
        }
        let V = model.config.vocabSize
        /// The logits of the `i`-th row of the step that asked for them.
        func logitsRow<R>(_ i: Int, _ body: (UnsafeBufferPointer<Float>) -> R) -> R {
            logits.withUnsafeBufferPointer { body(UnsafeBufferPointer(rebasing: $0[(i * V)..<((i + 1) * V)])) }
        }
        var li = 0
        var promptRows = 0, newTokens = 0
        for p in plan {
            let s = p.seq
            let wasPrompt = p.to <= s.promptLen ? p.to - p.from : max(0, s.promptLen - p.from)
            promptRows += wasPrompt
            // Rows of prompt positions whose logprobs were asked for, in order
            // (a preempted sequence recomputes positions it already scored).
            for pos in p.from..<p.to where s.wantsPromptLogprob(at: pos) {
                let top = s.params.promptLogprobs ?? 0
                s.promptLogprobs.append(logitsRow(li) { TokenLogprob.from($0, token: s.tokens[pos + 1], top: top) })
                li += 1
            }
            s.computed = p.to
            if config.prefixCaching { cache.register(s.table, tokens: s.tokens, computed: s.computed, salt: s.salt, chain: &s.chain) }
            guard p.to == s.tokens.count else { continue }  // mid-prompt chunk: nothing to sample
            var logprob: TokenLogprob?
            var finite = true
            let next = logitsRow(li) { r -> Int32 in
                let t = s.sampler.sample(r)
                // Overflowed logits are NaN across the whole row (the final
                // RMSNorm spreads one NaN or infinity to every element), and
                // argmax over NaNs picks token 0: checking the sampled one
                // catches that without a pass over the vocabulary.
                finite = r[Int(t)].isFinite
                if finite, let top = s.params.logprobs { logprob = TokenLogprob.from(r, token: t, top: top) }
                return t
            }
            li += 1
            guard finite else {
                finish(s, error: EngineError.nonFiniteLogits(adapter: s.lease?.adapter.name, position: s.tokens.count))
                running.removeAll { $0 === s }
                continue
            }
            newTokens += 1
            if emit(s, next, logprob: logprob) { running.removeAll { $0 === s } }
        }
        cond.lock()
        metricsValue.steps += 1
        metricsValue.lastBatchRows = batch.rows.count
        metricsValue.promptTokens += promptRows
        metricsValue.generatedTokens += newTokens
        cond.unlock()
    }

    /// Appends a sampled token and sends its event; true when the sequence finished.
    private func emit(_ s: Seq, _ token: Int32, logprob: TokenLogprob?) -> Bool {
        let eot = !s.params.ignoreEOS && (tokenizer?.eotIds.contains(token) ?? false)
        if eot {
            finish(s, reason: .stop, lastToken: nil)
            return true
        }
        s.tokens.append(token)
        var delta = s.decoder.map { d -> String in var d = d; let t = d.feed(token); s.decoder = d; return t } ?? ""
        if !s.params.stop.isEmpty {
            s.heldText += delta
            if let cut = Generator.firstStop(in: s.heldText, stops: s.params.stop) {
                s.send(TokenEvent(tokenId: token, text: String(s.heldText[..<cut]), finishReason: .stop,
                                  usage: s.usage, logprob: logprob))
                finish(s, reason: nil, lastToken: nil)
                return true
            }
            // Hold back a tail that could still become a stop string.
            let keep = (s.params.stop.map(\.count).max() ?? 1) - 1
            let sendCount = max(0, s.heldText.count - keep)
            delta = String(s.heldText.prefix(sendCount))
            s.heldText = String(s.heldText.dropFirst(sendCount))
        }
        if s.generated >= s.params.maxTokens {
            let tail = delta + s.heldText + (s.decoder.map { d -> String in var d = d; return d.finish() } ?? "")
            s.send(TokenEvent(tokenId: token, text: tail, finishReason: .length,
                              usage: s.usage, logprob: logprob))
            finish(s, reason: nil, lastToken: nil)
            return true
        }
        s.send(TokenEvent(tokenId: token, text: delta, finishReason: nil, usage: nil, logprob: logprob))
        return false
    }

    /// Ends a sequence: final event (if a reason is given), stream closed, blocks and pin released.
    private func finish(_ s: Seq, reason: FinishReason?, lastToken: Int32?) {
        if let reason {
            let tail = s.heldText + (s.decoder.map { d -> String in var d = d; return d.finish() } ?? "")
            s.send(TokenEvent(tokenId: lastToken, text: tail, finishReason: reason,
                              usage: s.usage))
        }
        s.continuation.finish()
        release(s)
        cond.lock(); metricsValue.finishedRequests += 1; cond.unlock()
    }

    private func finish(_ s: Seq, error: Error?, cancelled: Bool = false) {
        if let error { s.continuation.finish(throwing: error) } else { s.continuation.finish() }
        release(s)
        if cancelled { cond.lock(); metricsValue.cancelledRequests += 1; cond.unlock() }
    }

    private func release(_ s: Seq) {
        if !s.table.isEmpty { cache.release(&s.table) }
        s.lease?.release()
    }
}
