import Foundation

/// `prompt` as OpenAI accepts it: text, or token ids.
enum PromptInput: Decodable, Sendable {
    case text(String)
    case tokens([Int32])

    init(from decoder: Decoder) throws {
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
struct StopInput: Decodable, Sendable {
    var values: [String]
    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) { values = [s]; return }
        values = try c.decode([String].self)
    }
}

struct StreamOptions: Decodable, Sendable {
    var includeUsage: Bool?
    enum CodingKeys: String, CodingKey { case includeUsage = "include_usage" }
}

/// Fields shared by both completion routes.
struct SamplingFields: Decodable, Sendable {
    var maxTokens: Int?
    var maxCompletionTokens: Int?
    var temperature: Float?
    var topP: Float?
    var topK: Int?
    var seed: UInt64?
    var stop: StopInput?
    var stream: Bool?
    var streamOptions: StreamOptions?
    var n: Int?
    var returnTokenIds: Bool?
    var ignoreEos: Bool?
    var logprobs: AnyNullOrFalse?
    var echo: Bool?

    enum CodingKeys: String, CodingKey {
        case maxTokens = "max_tokens", maxCompletionTokens = "max_completion_tokens", temperature, topP = "top_p", topK = "top_k"
        case seed, stop, stream, streamOptions = "stream_options", n, returnTokenIds = "return_token_ids", ignoreEos = "ignore_eos"
        case logprobs, echo
    }
}

/// Accepts null/false/0 and refuses anything else (a feature we do not serve).
struct AnyNullOrFalse: Decodable, Sendable {
    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { return }
        if let b = try? c.decode(Bool.self), !b { return }
        if let i = try? c.decode(Int.self), i == 0 { return }
        throw DecodingError.dataCorruptedError(in: c, debugDescription: "logprobs are not supported")
    }
}

struct CompletionBody: Decodable, Sendable {
    var model: String
    var prompt: PromptInput
    var sampling: SamplingFields

    enum CodingKeys: String, CodingKey { case model, prompt }
    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        model = try c.decode(String.self, forKey: .model)
        prompt = try c.decode(PromptInput.self, forKey: .prompt)
        sampling = try SamplingFields(from: decoder)
    }
}

struct ChatMessageBody: Decodable, Sendable {
    var role: String
    var content: String
}

struct ChatBody: Decodable, Sendable {
    var model: String
    var messages: [ChatMessageBody]
    var sampling: SamplingFields

    enum CodingKeys: String, CodingKey { case model, messages }
    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        model = try c.decode(String.self, forKey: .model)
        messages = try c.decode([ChatMessageBody].self, forKey: .messages)
        sampling = try SamplingFields(from: decoder)
    }
}

struct LoadAdapterBody: Decodable, Sendable {
    var loraName: String
    var loraPath: String?
    enum CodingKeys: String, CodingKey { case loraName = "lora_name", loraPath = "lora_path" }
}

struct UnloadAdapterBody: Decodable, Sendable {
    var loraName: String
    enum CodingKeys: String, CodingKey { case loraName = "lora_name" }
}
