import Foundation

/// `prompt` as OpenAI accepts it: text, or token ids.
public enum PromptInput: Decodable, Sendable {
    case text(String)
    case tokens([Int32])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) { self = .text(s); return }
        if let t = try? c.decode([Int32].self) { self = .tokens(t); return }
        if let a = try? c.decode([String].self) {
            guard a.count == 1 else { throw DecodingError.dataCorruptedError(in: c, debugDescription: "only one prompt per request is supported") }
            self = .text(a[0]); return
        }
        if let a = try? c.decode([[Int32]].self) {
            guard a.count == 1 else { throw DecodingError.dataCorruptedError(in: c, debugDescription: "only one prompt per request is supported") }
            self = .tokens(a[0]); return
        }
        throw DecodingError.dataCorruptedError(in: c, debugDescription: "prompt must be a string or an array of token ids")
    }
}

/// `stop` as a string or a list of strings.
public struct StopInput: Decodable, Sendable {
    public var values: [String]
    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) { values = [s]; return }
        values = try c.decode([String].self)
    }
}

public struct StreamOptions: Decodable, Sendable {
    public var includeUsage: Bool?
    enum CodingKeys: String, CodingKey { case includeUsage = "include_usage" }
}

/// Fields shared by both completion routes.
public struct SamplingFields: Decodable, Sendable {
    public var maxTokens: Int?
    public var maxCompletionTokens: Int?
    public var temperature: Float?
    public var topP: Float?
    public var topK: Int?
    public var seed: UInt64?
    public var stop: StopInput?
    public var stream: Bool?
    public var streamOptions: StreamOptions?
    public var n: Int?
    public var returnTokenIds: Bool?
    public var ignoreEos: Bool?
    public var logprobs: LogprobsField?
    public var topLogprobs: Int?
    public var echo: Bool?
    public var frequencyPenalty: Float?
    public var presencePenalty: Float?
    public var repetitionPenalty: Float?
    public var logitBias: [String: Float]?
    // Fields that would change the output and that this server does not serve:
    // refused unless absent or at their do-nothing value, never silently dropped.
    public var tools: JSONShape?
    public var functions: JSONShape?
    public var responseFormat: JSONShape?
    public var bestOf: Int?
    public var suffix: String?
    public var modalities: [String]?
    public var audio: JSONShape?

    enum CodingKeys: String, CodingKey {
        case maxTokens = "max_tokens", maxCompletionTokens = "max_completion_tokens", temperature, topP = "top_p", topK = "top_k"
        case seed, stop, stream, streamOptions = "stream_options", n, returnTokenIds = "return_token_ids", ignoreEos = "ignore_eos"
        case logprobs, topLogprobs = "top_logprobs", echo
        case frequencyPenalty = "frequency_penalty", presencePenalty = "presence_penalty", repetitionPenalty = "repetition_penalty"
        case logitBias = "logit_bias"
        case tools, functions, responseFormat = "response_format", bestOf = "best_of", suffix, modalities, audio
    }

    /// A 400 naming the first field set to something this server cannot do.
    func refuseUnsupported() throws {
        func no(_ what: String) -> EngineError { .invalidArgument("\(what) is not supported by this server") }
        if let t = tools, !t.isNullOrEmpty { throw no("'tools' (tool calling)") }
        if let f = functions, !f.isNullOrEmpty { throw no("'functions' (function calling)") }
        if let r = responseFormat, !r.isNullOrEmpty {
            guard r.type == "text" else {
                throw no("'response_format' other than {\"type\": \"text\"} (structured output)")
            }
        }
        if let b = bestOf, b != 1 { throw no("'best_of' other than 1") }
        if let s = suffix, !s.isEmpty { throw no("'suffix' (insertion)") }
        if let m = modalities, m.contains(where: { $0 != "text" }) { throw no("a modality other than 'text'") }
        if let a = audio, !a.isNullOrEmpty { throw no("'audio' output") }
    }
}

/// Whether a field holds anything, and an object's `"type"`, read without
/// decoding what is inside (no recursion over a client's nesting).
public struct JSONShape: Decodable, Sendable {
    public var isNullOrEmpty: Bool
    public var type: String?

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: Decoder) throws {
        if let c = try? decoder.container(keyedBy: Key.self) {
            isNullOrEmpty = c.allKeys.isEmpty
            type = try? c.decodeIfPresent(String.self, forKey: Key(stringValue: "type"))
        } else if let a = try? decoder.unkeyedContainer() {
            isNullOrEmpty = a.count == 0
        } else {
            let c = try decoder.singleValueContainer()
            if c.decodeNil() { isNullOrEmpty = true }
            else if let b = try? c.decode(Bool.self) { isNullOrEmpty = !b }
            else if let str = try? c.decode(String.self) { isNullOrEmpty = str.isEmpty }
            else { isNullOrEmpty = false }
        }
    }
}

/// `logprobs`: an integer on completions (how many alternatives), a boolean on chat.
public enum LogprobsField: Decodable, Sendable {
    case bool(Bool)
    case count(Int)

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let b = try? c.decode(Bool.self) { self = .bool(b); return }
        if let i = try? c.decode(Int.self) { self = .count(i); return }
        throw DecodingError.dataCorruptedError(in: c, debugDescription: "logprobs must be an integer (completions) or a boolean (chat)")
    }
}

public struct CompletionBody: Decodable, Sendable {
    public var model: String
    public var prompt: PromptInput
    public var sampling: SamplingFields

    enum CodingKeys: String, CodingKey { case model, prompt }
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        model = try c.decode(String.self, forKey: .model)
        prompt = try c.decode(PromptInput.self, forKey: .prompt)
        sampling = try SamplingFields(from: decoder)
    }
}

/// A message's `content`: a string, or OpenAI's array of content parts
/// (`[{"type": "text", "text": "..."}]`, which clients such as LangChain send).
public enum MessageContent: Decodable, Sendable {
    case text(String)
    case parts([Part])

    public struct Part: Decodable, Sendable {
        public var type: String
        public var text: String?
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) { self = .text(s); return }
        if let p = try? c.decode([Part].self) { self = .parts(p); return }
        throw DecodingError.dataCorruptedError(in: c, debugDescription: "content must be a string or an array of content parts")
    }

    /// The text the chat template sees. Text parts are joined with newlines,
    /// as vLLM does for text-only models; any other part (an image, audio) is
    /// refused by name rather than silently dropped.
    func text(message index: Int) throws -> String {
        switch self {
        case let .text(s): return s
        case let .parts(parts):
            return try parts.enumerated().map { i, p in
                guard p.type == "text" else {
                    throw EngineError.invalidArgument("messages[\(index)].content[\(i)]: content part type '\(p.type)' is not supported (this server reads text only)")
                }
                guard let t = p.text else { throw EngineError.invalidArgument("messages[\(index)].content[\(i)]: a text part needs 'text'") }
                return t
            }.joined(separator: "\n")
        }
    }
}

public struct ChatMessageBody: Decodable, Sendable {
    public var role: String
    public var content: MessageContent
}

public struct ChatBody: Decodable, Sendable {
    public var model: String
    public var messages: [ChatMessageBody]
    public var sampling: SamplingFields

    enum CodingKeys: String, CodingKey { case model, messages }
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        model = try c.decode(String.self, forKey: .model)
        messages = try c.decode([ChatMessageBody].self, forKey: .messages)
        sampling = try SamplingFields(from: decoder)
    }
}

public struct LoadAdapterBody: Decodable, Sendable {
    public var loraName: String
    public var loraPath: String?
    enum CodingKeys: String, CodingKey { case loraName = "lora_name", loraPath = "lora_path" }
}

public struct UnloadAdapterBody: Decodable, Sendable {
    public var loraName: String
    enum CodingKeys: String, CodingKey { case loraName = "lora_name" }
}

/// A completion request decoded, validated and tokenized: everything the
/// server needs before it resolves the adapter and submits to the engine.
/// Kept free of HTTP so the fuzzer drives exactly what the routes run.
public struct PreparedCompletion: Sendable {
    public var model: String
    public var promptIds: [Int32]
    public var params: SamplingParams
    public var chat: Bool
    public var stream: Bool
    public var includeUsage: Bool
    public var returnTokenIds: Bool
    /// Completions' `echo`: the prompt's text, to put before the completion.
    public var echoText: String? = nil
    /// Choices to generate for the prompt (OpenAI's `n`).
    public var n = 1
    public static let maxChoices = 16
}

public enum OpenAIRequest {
    public static func completion(_ data: Data, tokenizer: BPETokenizer, contextTokens: Int) throws -> PreparedCompletion {
        let b = try decode(CompletionBody.self, data)
        let ids: [Int32]
        switch b.prompt {
        case let .text(t): ids = tokenizer.encode(t, addSpecial: true)
        case let .tokens(t): ids = t
        }
        var p = try prepare(model: b.model, promptIds: ids, sampling: b.sampling, chat: false, defaultMax: 16,
                            vocabSize: tokenizer.vocabSize, contextTokens: contextTokens)
        if b.sampling.echo ?? false {
            switch b.prompt {
            case let .text(t): p.echoText = t
            case let .tokens(t): p.echoText = tokenizer.decode(t)  // ids outside the vocabulary decode to nothing; the engine refuses them
            }
        }
        return p
    }

    public static func chat(_ data: Data, tokenizer: BPETokenizer, contextTokens: Int) throws -> PreparedCompletion {
        let b = try decode(ChatBody.self, data)
        guard !b.messages.isEmpty else { throw EngineError.invalidArgument("'messages' must not be empty") }
        for m in b.messages where !["system", "user", "assistant"].contains(m.role) {
            throw EngineError.invalidArgument("message role '\(m.role)' is not supported (system, user, assistant)")
        }
        guard let template = tokenizer.chatTemplate else {
            throw EngineError.invalidArgument(tokenizer.chatTemplateSource == nil
                ? "this model has no chat template; use /v1/completions with the prompt as text"
                : "this model's chat template cannot be rendered by LoraMux (see the server's load warning); use /v1/completions with the prompt as text")
        }
        let messages = try b.messages.enumerated().map { i, m in ChatMessage(role: m.role, content: try m.content.text(message: i)) }
        if let why = template.refusal(for: messages) { throw EngineError.invalidArgument(why) }
        let text: String
        do {
            text = try template.render(messages, addGenerationPrompt: true)
        } catch let e as JinjaError {
            // The template's own raise_exception says what it refuses; anything else is the template failing on these messages.
            throw EngineError.invalidArgument(e.kind == .raised ? e.message : "the model's chat template failed on these messages: \(e.message)")
        }
        return try prepare(model: b.model, promptIds: tokenizer.encode(text), sampling: b.sampling, chat: true, defaultMax: 512, vocabSize: tokenizer.vocabSize,
                           contextTokens: contextTokens)
    }

    public static func decode<T: Decodable>(_ type: T.Type, _ data: Data) throws -> T {
        guard !data.isEmpty else { throw EngineError.invalidArgument("request body is empty (expected JSON)") }
        return try JSONDecoder().decode(T.self, from: data)
    }

    static func prepare(model: String, promptIds: [Int32], sampling s: SamplingFields, chat: Bool, defaultMax: Int, vocabSize: Int,
                        contextTokens limit: Int) throws -> PreparedCompletion {
        let n = s.n ?? 1
        guard (1...PreparedCompletion.maxChoices).contains(n) else {
            throw EngineError.invalidArgument("'n' must be in 1...\(PreparedCompletion.maxChoices)")
        }
        try s.refuseUnsupported()
        let echo = s.echo ?? false
        if chat && echo { throw EngineError.invalidArgument("'echo' is not supported on chat completions") }
        // Completions: `logprobs: N` (N alternatives). Chat: `logprobs: true` and `top_logprobs: N`.
        var logprobs: Int?
        switch (s.logprobs, chat) {
        case (nil, _), (.bool(false)?, _): logprobs = nil
        case let (.count(n)?, false): logprobs = n
        case (.bool(true)?, true): logprobs = s.topLogprobs ?? 0
        case (.bool(true)?, false): throw EngineError.invalidArgument("'logprobs' must be an integer (0-\(SamplingParams.maxLogprobs)) on completions")
        case (.count?, true): throw EngineError.invalidArgument("'logprobs' must be a boolean on chat completions; 'top_logprobs' sets the alternatives")
        }
        if chat, s.topLogprobs != nil, logprobs == nil { throw EngineError.invalidArgument("'top_logprobs' needs 'logprobs': true") }
        if !chat, s.topLogprobs != nil { throw EngineError.invalidArgument("'top_logprobs' is for chat completions; completions take 'logprobs': N") }
        var bias: [Int32: Float] = [:]
        for (k, v) in s.logitBias ?? [:] {
            guard let t = Int32(k), t >= 0, t < vocabSize else { throw EngineError.invalidArgument("logit_bias: '\(k)' is not a token id of this model") }
            bias[t] = v
        }
        // Unset: the route's default, shortened to what the context has left.
        let maxTokens = s.maxCompletionTokens ?? s.maxTokens ?? min(defaultMax, max(1, limit - promptIds.count))
        guard maxTokens >= 1 else { throw EngineError.invalidArgument("'max_tokens' must be at least 1") }
        let params = SamplingParams(temperature: s.temperature ?? 1, topK: s.topK ?? 0, topP: s.topP ?? 1, seed: s.seed,
                                    maxTokens: maxTokens, stop: s.stop?.values ?? [], ignoreEOS: s.ignoreEos ?? false,
                                    frequencyPenalty: s.frequencyPenalty ?? 0, presencePenalty: s.presencePenalty ?? 0,
                                    repetitionPenalty: s.repetitionPenalty ?? 1, logitBias: bias,
                                    logprobs: logprobs, promptLogprobs: echo ? logprobs : nil)
        try params.validate(vocabSize: vocabSize)
        guard promptIds.count + maxTokens <= limit else { throw EngineError.promptTooLong(tokens: promptIds.count + maxTokens, limit: limit) }
        var prepared = PreparedCompletion(model: model, promptIds: promptIds, params: params, chat: chat, stream: s.stream ?? false,
                                          includeUsage: s.streamOptions?.includeUsage ?? false, returnTokenIds: s.returnTokenIds ?? false)
        prepared.n = n
        return prepared
    }
}
