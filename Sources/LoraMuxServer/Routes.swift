import Foundation
import HTTPTypes
import Hummingbird
import Logging
import LoraMux
import NIOCore

func buildRouter(_ state: ServerState) -> Router<BasicRequestContext> {
    let router = Router(context: BasicRequestContext.self)
    router.add(middleware: UnknownRouteAsAPIError())
    let h = Handlers(state: state)
    router.get("/health") { _, _ in h.health() }
    router.get("/metrics") { _, _ in
        Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                 body: .init(byteBuffer: ByteBuffer(string: state.metrics.render(state))))
    }
    router.get("/v1/models") { req, ctx in await h.guarded("models", req, ctx, auth: .api) { _ in try h.models() } }
    router.get("/v1/models/{id}") { req, ctx in
        await h.guarded("models", req, ctx, auth: .api) { _ in try h.model(ctx.parameters.get("id") ?? "") }
    }
    router.post("/v1/completions") { req, ctx in await h.guarded("completions", req, ctx, auth: .api) { body in try await h.completions(body, ctx) } }
    router.post("/v1/chat/completions") { req, ctx in await h.guarded("chat", req, ctx, auth: .api) { body in try await h.chat(body, ctx) } }
    router.post("/v1/load_lora_adapter") { req, ctx in await h.guarded("load_adapter", req, ctx, auth: .admin) { body in try await h.load(body) } }
    router.post("/v1/unload_lora_adapter") { req, ctx in await h.guarded("unload_adapter", req, ctx, auth: .admin) { body in try h.unload(body) } }
    router.get("/v1/adapters") { req, ctx in await h.guarded("adapters", req, ctx, auth: .admin) { _ in try h.listAdapters() } }
    return router
}

/// A path (or method) no route serves gets OpenAI's error shape, like every
/// other error, instead of Hummingbird's bare 404.
struct UnknownRouteAsAPIError<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let e as HTTPError where e.status == .notFound {
            return APIError.notFound("no route for \(request.method) \(request.uri.path)").response
        }
    }
}

/// How a streamed response ended, set by the stream (an error after the
/// headers went out travels as an SSE event under status 200) and read when
/// its metrics are recorded.
final class StreamOutcome: @unchecked Sendable {
    /// The request's, for the handler that builds the stream to capture.
    @TaskLocal static var current: StreamOutcome?
    /// nginx's "client closed request": the client hung up mid-stream.
    static let clientClosed = 499
    private let lock = NSLock()
    private var code = 200
    var status: Int {
        get { lock.withLock { code } }
        set { lock.withLock { code = newValue } }
    }
}

struct Handlers: Sendable {
    let state: ServerState
    enum Auth { case api, admin }

    func json(_ obj: Any, status: HTTPResponse.Status = .ok) throws -> Response {
        let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys, .withoutEscapingSlashes])
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    func health() -> Response {
        let ok = !state.draining
        let body = "{\"status\":\"\(ok ? "ok" : "draining")\"}"
        return Response(status: ok ? .ok : .serviceUnavailable, headers: [.contentType: "application/json"],
                        body: .init(byteBuffer: ByteBuffer(string: body)))
    }

    /// Auth, draining, body collection (size-limited) and error mapping for every API route.
    func guarded(_ route: String, _ req: Request, _ ctx: BasicRequestContext, auth: Auth,
                 _ body: (Data) async throws -> Response) async -> Response {
        let start = Date()
        let outcome = StreamOutcome()
        var response: Response
        do {
            switch auth {
            case .admin:
                if let t = state.config.adminToken, !bearerMatches(req.headers[.authorization], t) {
                    throw APIError.unauthorized("admin routes need 'Authorization: Bearer <admin token>'")
                }
            case .api:
                if let k = state.config.apiKey, !bearerMatches(req.headers[.authorization], k) {
                    throw APIError.unauthorized("missing or wrong API key")
                }
            }
            if state.draining { throw EngineError.shuttingDown }
            var req = req
            let buf = try await req.collectBody(upTo: state.config.maxBodyBytes)
            response = try await StreamOutcome.$current.withValue(outcome) { try await body(Data(buf.readableBytesView)) }
        } catch {
            let e = APIError.from(error)
            if e.status == .internalServerError { ctx.logger.error("internal error", metadata: ["route": "\(route)", "error": "\(error)"]) }
            response = e.response
        }
        let adapter = response.headers[.loramuxAdapter] ?? "-"
        let metrics = state.metrics
        @Sendable func record(_ status: Int) {
            metrics.requests(route: route, adapter: adapter, status: status).increment()
            metrics.latency(route: route, adapter: adapter).record(Date().timeIntervalSince(start))
        }
        guard response.headers[.contentType] == "text/event-stream" else {
            record(Int(response.status.code))
            return response
        }
        // A stream's work happens after this returns, while its body is written:
        // it is counted when the body ends, with the status it ended with.
        let inner = response.body
        response.body = ResponseBody { writer in
            do {
                try await inner.write(writer)
            } catch {
                record(StreamOutcome.clientClosed)
                throw error
            }
            record(outcome.status)
        }
        return response
    }

    func decode<T: Decodable>(_ type: T.Type, _ data: Data) throws -> T {
        try OpenAIRequest.decode(T.self, data)
    }

    // MARK: models and adapters

    func modelEntries() -> [[String: Any]] {
        let created = Int(Date().timeIntervalSince1970)
        var data: [[String: Any]] = [["id": state.modelId, "object": "model", "created": created, "owned_by": "loramux",
                                      "root": state.modelId, "parent": NSNull()]]
        for e in state.registry.all {
            data.append(["id": e.name, "object": "model", "created": created, "owned_by": "loramux", "root": e.name, "parent": state.modelId])
        }
        return data
    }

    func models() throws -> Response { try json(["object": "list", "data": modelEntries()]) }

    /// `GET /v1/models/{id}` (the openai clients' `models.retrieve`).
    func model(_ id: String) throws -> Response {
        guard let m = modelEntries().first(where: { $0["id"] as? String == id }) else {
            throw APIError.notFound("The model '\(id)' does not exist")
        }
        return try json(m)
    }

    func load(_ body: Data) async throws -> Response {
        let b = try decode(LoadAdapterBody.self, body)
        try AdapterRegistry.validate(name: b.loraName)
        if let existing = state.registry.lookup(b.loraName) {
            let same = try b.loraPath.map { try state.registry.confine($0) == existing.path } ?? true
            guard same else { throw APIError.badRequest("adapter '\(b.loraName)' is already loaded from another path; unload it first") }
            return try json(["status": "ok", "lora_name": b.loraName, "message": "already loaded"])
        }
        let entry = try state.registry.register(name: b.loraName, path: b.loraPath)
        // Load it now: a broken adapter is refused here, before anyone names it.
        do {
            try await state.adapters.acquire(b.loraName).release()
        } catch {
            state.registry.unregister(b.loraName)
            state.adapters.invalidate(b.loraName)
            throw error
        }
        state.logger.info("adapter loaded", metadata: ["adapter": "\(b.loraName)", "path": "\(entry.path)"])
        return try json(["status": "ok", "lora_name": b.loraName, "path": entry.path])
    }

    func unload(_ body: Data) throws -> Response {
        let b = try decode(UnloadAdapterBody.self, body)
        guard state.registry.unregister(b.loraName) else { throw AdapterError.unknownAdapter(b.loraName) }
        // In-flight requests hold pins and finish; the memory goes with the last pin.
        state.adapters.invalidate(b.loraName)
        state.logger.info("adapter unloaded", metadata: ["adapter": "\(b.loraName)"])
        return try json(["status": "ok", "lora_name": b.loraName])
    }

    func listAdapters() throws -> Response {
        let resident = Dictionary(state.adapters.resident.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let fmt = ISO8601DateFormatter()
        let list: [[String: Any]] = state.registry.all.map { e in
            var d: [String: Any] = ["name": e.name, "path": e.path, "format": e.isPacked ? "lora" : "peft", "resident": resident[e.name] != nil]
            if let r = resident[e.name] {
                d["bytes"] = r.bytes; d["hits"] = r.hits; d["pins"] = r.pins; d["last_use"] = fmt.string(from: r.lastUse)
            }
            return d
        }
        let s = state.adapters.statistics
        return try json(["adapters": list, "cache": ["hits": s.hits, "misses": s.misses, "evictions": s.evictions, "loads": s.loads,
                                                     "failed_loads": s.failedLoads, "load_seconds": s.loadSeconds,
                                                     "resident_bytes": s.residentBytes, "resident_count": s.residentCount,
                                                     "budget_bytes": state.adapters.budgetBytes]])
    }

    // MARK: completions

    func completions(_ body: Data, _ ctx: BasicRequestContext) async throws -> Response {
        try await run(OpenAIRequest.completion(body, tokenizer: state.tokenizer, contextTokens: state.engine.maxSequenceTokens), ctx)
    }

    func chat(_ body: Data, _ ctx: BasicRequestContext) async throws -> Response {
        try await run(OpenAIRequest.chat(body, tokenizer: state.tokenizer, contextTokens: state.engine.maxSequenceTokens), ctx)
    }

    /// Submits one engine request per choice (choice i with seed + i when a
    /// seed is given, so seeded choices differ and repeat); each holds its own
    /// adapter pin, which the engine returns when that sequence ends.
    func submitChoices(_ p: PreparedCompletion, adapterName: String?) async throws -> [EngineHandle] {
        var handles: [EngineHandle] = []
        do {
            for i in 0..<p.n {
                let lease = try await adapterName.asyncMap { try await state.adapters.acquire($0) }
                // A name unloaded between resolve() and acquire() must not run.
                if let n = adapterName, state.registry.lookup(n) == nil { lease?.release(); throw AdapterError.unknownAdapter(n) }
                var params = p.params
                params.seed = params.seed.map { $0 &+ UInt64(i) }
                handles.append(try state.engine.submit(CompletionRequest(promptIds: p.promptIds, params: params, adapter: lease)))
            }
        } catch {
            for h in handles { state.engine.cancel(h.id) }
            throw error
        }
        return handles
    }

    func run(_ p: PreparedCompletion, _ ctx: BasicRequestContext) async throws -> Response {
        let (model, promptIds, chat) = (p.model, p.promptIds, p.chat)
        let adapterName = try state.resolve(model: model)
        let handles = try await submitChoices(p, adapterName: adapterName)
        let id = (chat ? "chatcmpl-" : "cmpl-") + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(24).lowercased()
        let created = Int(Date().timeIntervalSince1970)
        let modelName = model.isEmpty ? state.modelId : model
        let withIds = p.returnTokenIds
        let wantLogprobs = p.params.logprobs != nil
        let echoText = p.echoText
        let tokenizer = state.tokenizer
        let start = Date()
        var headers: HTTPFields = [.loramuxAdapter: adapterName ?? "base"]
        let logger = ctx.logger
        let metrics = state.metrics
        let engine = state.engine
        @Sendable func logDone(_ usage: Usage) {
            logger.info("completion", metadata: ["id": "\(id)", "adapter": "\(adapterName ?? "base")", "choices": "\(handles.count)",
                                                 "prompt_tokens": "\(promptIds.count)", "completion_tokens": "\(usage.completionTokens)",
                                                 "cached_tokens": "\(usage.cachedTokens)",
                                                 "latency_ms": "\(Int(Date().timeIntervalSince(start) * 1000))"])
            metrics.promptTokens.increment(by: Int64(promptIds.count))
            metrics.completionTokens.increment(by: Int64(usage.completionTokens))
        }
        /// The request's usage over its choices: the prompt once (as OpenAI
        /// counts it), every choice's completion tokens.
        @Sendable func total(_ us: [Usage?]) -> Usage {
            Usage(promptTokens: promptIds.count, completionTokens: us.reduce(0) { $0 + ($1?.completionTokens ?? 0) },
                  cachedTokens: us.map { $0?.cachedTokens ?? 0 }.max() ?? 0)
        }

        if p.stream {
            headers[.contentType] = "text/event-stream"
            headers[.cacheControl] = "no-cache"
            let includeUsage = p.includeUsage
            // The choices' events in the order they come, tagged with the choice.
            let (merged, sink) = AsyncThrowingStream<(Int, TokenEvent), Error>.makeStream()
            let outcome = StreamOutcome.current
            let body = ResponseBody { writer in
                var finished = false
                defer { if !finished { for h in handles { engine.cancel(h.id) } } }  // client went away mid-stream
                let pumps = Task {
                    await withThrowingTaskGroup(of: Void.self) { group in
                        for (i, h) in handles.enumerated() {
                            group.addTask { for try await ev in h.events { sink.yield((i, ev)) } }
                        }
                        do { try await group.waitForAll(); sink.finish() } catch { sink.finish(throwing: error) }
                    }
                }
                defer { pumps.cancel() }
                var first = [Bool](repeating: true, count: handles.count)
                var usages = [Usage?](repeating: nil, count: handles.count)
                // One per choice: completions' text_offset counts along its own text.
                var formatters = handles.map { _ in LogprobFormatter(tokenizer: tokenizer) }
                // With include_usage, as OpenAI streams it: `usage: null` on every
                // chunk, then one more chunk with no choices and the request's usage.
                func send(_ choice: [String: Any]?, usage: Usage? = nil) async throws {
                    var chunk: [String: Any] = ["id": id, "object": chat ? "chat.completion.chunk" : "text_completion",
                                                "created": created, "model": modelName, "choices": choice.map { [$0] } ?? []]
                    if includeUsage {
                        chunk["usage"] = usage.map { $0.json } ?? NSNull()
                    }
                    try await event(try JSONSerialization.data(withJSONObject: chunk, options: [.sortedKeys, .withoutEscapingSlashes]))
                }
                func event(_ data: Data) async throws {
                    var buf = ByteBuffer(string: "data: ")
                    buf.writeBytes(data)
                    buf.writeString("\n\n")
                    try await writer.write(buf)
                }
                do {
                    for try await (i, ev) in merged {
                        if first[i], let echo = echoText {
                            // The prompt goes out first, as its own chunk (vLLM does the same).
                            var choice: [String: Any] = ["index": i, "finish_reason": NSNull(), "text": echo, "logprobs": NSNull()]
                            if wantLogprobs {
                                choice["logprobs"] = formatters[i].completion(Self.promptEntries(promptIds, ev.promptLogprobs))
                            }
                            try await send(choice)
                        }
                        var choice: [String: Any] = ["index": i, "finish_reason": ev.finishReason?.rawValue ?? NSNull()]
                        if chat {
                            var delta: [String: Any] = ["content": ev.text]
                            if first[i] { delta["role"] = "assistant" }
                            choice["delta"] = delta
                            choice["logprobs"] = ev.logprob.map { ["content": [formatters[i].chat($0)]] } ?? NSNull()
                        } else {
                            choice["text"] = ev.text
                            choice["logprobs"] = NSNull()
                            if wantLogprobs, let t = ev.tokenId { choice["logprobs"] = formatters[i].completion([(t, ev.logprob)]) }
                        }
                        if withIds { choice["token_ids"] = ev.tokenId.map { [Int($0)] } ?? [] }
                        if first[i] && withIds { choice["prompt_token_ids"] = promptIds.map(Int.init) }
                        first[i] = false
                        try await send(choice)
                        if ev.finishReason != nil { usages[i] = ev.usage ?? Usage(promptTokens: promptIds.count, completionTokens: 0) }
                    }
                    let usage = total(usages)
                    logDone(usage)
                    if includeUsage { try await send(nil, usage: usage) }
                } catch let e where !(e is CancellationError) {
                    // Errors after the headers went out travel as an SSE error event.
                    for h in handles { engine.cancel(h.id) }
                    let a = APIError.from(e)
                    outcome?.status = Int(a.status.code)
                    let obj: [String: Any] = ["error": ["message": a.message, "type": a.type, "code": Int(a.status.code)]]
                    try await event((try? JSONSerialization.data(withJSONObject: obj)) ?? Data())
                }
                finished = true
                try await writer.write(ByteBuffer(string: "data: [DONE]\n\n"))
                try await writer.finish(nil)
            }
            return Response(status: .ok, headers: headers, body: body)
        }

        var choices: [[String: Any]] = []
        var usages: [Usage?] = []
        // Each stream buffers its events, so reading the choices one after
        // another loses nothing while the engine runs them together.
        for (i, handle) in handles.enumerated() {
            var tokens: [Int32] = []
            var logprobs: [TokenLogprob?] = []
            var promptLogprobs: [TokenLogprob]?
            var text = ""
            var finish: FinishReason = .length
            var usage: Usage?
            var formatter = LogprobFormatter(tokenizer: tokenizer)  // text_offset counts along this choice's text
            do {
                for try await ev in handle.events {
                    if let t = ev.tokenId { tokens.append(t); logprobs.append(ev.logprob) }
                    if let pl = ev.promptLogprobs { promptLogprobs = pl }
                    text += ev.text
                    if let f = ev.finishReason { finish = f; usage = ev.usage }
                }
            } catch {
                for h in handles { engine.cancel(h.id) }
                throw error
            }
            usages.append(usage)
            var choice: [String: Any] = ["index": i, "finish_reason": finish.rawValue, "logprobs": NSNull()]
            if chat {
                choice["message"] = ["role": "assistant", "content": text]
                if wantLogprobs { choice["logprobs"] = ["content": logprobs.compactMap { $0.map(formatter.chat) }] }
            } else {
                choice["text"] = (echoText ?? "") + text
                if wantLogprobs {
                    let echoed = echoText != nil ? Self.promptEntries(promptIds, promptLogprobs) : []
                    choice["logprobs"] = formatter.completion(echoed + zip(tokens, logprobs).map { ($0, $1) })
                }
            }
            if withIds { choice["token_ids"] = tokens.map(Int.init); choice["prompt_token_ids"] = promptIds.map(Int.init) }
            choices.append(choice)
        }
        let usage = total(usages)
        logDone(usage)
        let obj: [String: Any] = ["id": id, "object": chat ? "chat.completion" : "text_completion", "created": created, "model": modelName,
                                  "choices": choices, "usage": usage.json]
        var r = try json(obj)
        r.headers[.loramuxAdapter] = adapterName ?? "base"
        return r
    }
}

extension Usage {
    /// As OpenAI reports it; `cached_tokens` counts prompt tokens served from the prefix cache.
    var json: [String: Any] {
        ["prompt_tokens": promptTokens, "completion_tokens": completionTokens, "total_tokens": totalTokens,
         "prompt_tokens_details": ["cached_tokens": cachedTokens]]
    }
}

extension Handlers {
    /// The prompt's tokens for an echo: the first has no logprob (nothing
    /// comes before it), each later one the engine's entry for it.
    static func promptEntries(_ ids: [Int32], _ lps: [TokenLogprob]?) -> [(token: Int32, logprob: TokenLogprob?)] {
        ids.enumerated().map { i, t in (t, i > 0 ? lps?[safe: i - 1] : nil) }
    }
}

extension Array {
    subscript(safe i: Int) -> Element? { indices.contains(i) ? self[i] : nil }
}

/// `Authorization: Bearer <secret>`, compared in time independent of where
/// the first wrong byte is (no timing oracle for the token).
func bearerMatches(_ header: String?, _ secret: String) -> Bool {
    let given = Array((header ?? "").utf8), want = Array("Bearer \(secret)".utf8)
    var diff = UInt8(given.count == want.count ? 0 : 1)
    for i in 0..<want.count { diff |= want[i] ^ (i < given.count ? given[i] : 0) }
    return diff == 0
}

extension HTTPField.Name {
    static let loramuxAdapter = HTTPField.Name("X-LoraMux-Adapter")!
}

extension Optional {
    func asyncMap<T>(_ f: (Wrapped) async throws -> T) async rethrows -> T? {
        switch self {
        case let .some(w): return try await f(w)
        case .none: return nil
        }
    }
}
