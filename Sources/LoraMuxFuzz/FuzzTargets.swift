import Foundation
import LoraMux

/// The parsers that read untrusted bytes, each as a function of one input.
/// libFuzzer drives them through `loramux-fuzz` (ops/fuzz); the test suite
/// replays the committed corpus and every crash reproducer through the same
/// functions. A target may throw any error: only a trap, a sanitizer report
/// or a hang is a failure.
public enum FuzzTarget: String, CaseIterable, Sendable {
    case gguf, safetensors, lora, adapterConfig = "adapter-config", request, chatTemplate = "chat-template"

    /// Loads what the target reads besides its input, so one-time setup is not
    /// charged to (or reported as a leak of) the first input.
    public func prepare() {
        switch self {
        case .lora: _ = Self.tinyBase
        case .request: _ = Self.tokenizer
        default: break
        }
    }

    public func run(_ data: Data) {
        switch self {
        case .gguf: Self.gguf(data)
        case .safetensors: Self.safetensors(data)
        case .lora: Self.lora(data)
        case .adapterConfig: Self.adapterConfig(data)
        case .request: Self.request(data)
        case .chatTemplate: Self.chatTemplate(data)
        }
    }

    /// Tests/Fixtures, found from this file's place in the checkout (or $LORAMUX_FIXTURES).
    public static var fixtures: URL {
        if let p = ProcessInfo.processInfo.environment["LORAMUX_FIXTURES"] { return URL(fileURLWithPath: p) }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Tests/Fixtures")
    }

    /// The base the packed-adapter target loads against (the tiny fixture model).
    static let tinyBase: LlamaWeights = {
        do { return try LlamaWeights.load(path: fixtures.appendingPathComponent("tiny/tiny-f32.gguf").path) } catch {
            fatalError("fuzz: cannot load the tiny fixture model: \(error)")
        }
    }()

    /// The tokenizer the request target encodes with (has a chat template).
    static let tokenizer: BPETokenizer = {
        do { return try BPETokenizer(gguf: GGUFFile(path: fixtures.appendingPathComponent("tokenizer/llama3-tiny/tokenizer.gguf").path)) } catch {
            fatalError("fuzz: cannot load the fixture tokenizer: \(error)")
        }
    }()

    static func gguf(_ data: Data) {
        guard let f = try? MappedFile(copying: data, name: "fuzz.gguf"), let g = try? GGUFFile(file: f) else { return }
        for name in g.tensorNames { if let v = try? g.tensor(name) { touch(v) } }
        _ = try? LlamaConfig.from(gguf: g)
        _ = try? LlamaWeights(gguf: g)
        if let t = try? BPETokenizer(gguf: g) {
            let ids = t.encode("Hello, world! 123 héllo\n", addSpecial: true)
            _ = t.decode(ids)
        }
    }

    /// Reads the first and last byte a view claims: a view past its mapping faults here.
    static func touch(_ v: TensorView) {
        _ = (v.elementCount, v.rows, v.cols)
        guard v.byteCount > 0 else { return }
        sink &+= v.data.load(as: UInt8.self) &+ v.data.load(fromByteOffset: v.byteCount - 1, as: UInt8.self)
    }
    nonisolated(unsafe) static var sink: UInt8 = 0

    static func safetensors(_ data: Data) {
        guard let f = try? MappedFile(copying: data, name: "fuzz.safetensors"), let s = try? SafetensorsFile(file: f) else { return }
        for name in s.tensors.keys { if let v = try? s.tensor(name) { touch(v) } }
    }

    static func lora(_ data: Data) {
        guard let f = try? MappedFile(copying: data, name: "fuzz.lora") else { return }
        _ = try? PackedAdapter.inspect(file: f)
        _ = try? PackedAdapter.load(file: f, name: "fuzz", base: tinyBase)
    }

    static func adapterConfig(_ data: Data) {
        guard let j = try? OrderedJSON.parse(data), let c = try? LoraConfig(json: j, path: "fuzz/adapter_config.json") else { return }
        let modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        for layer in 0..<3 {
            for m in modules {
                let name = "model.layers.\(layer).\(m)"
                _ = c.targets(module: name, isLinear: true, isOutput: false)
                let (r, a) = c.rankAndAlpha(module: name)
                if r > 0 { _ = c.scale(rank: r, alpha: a) }
            }
        }
        _ = c.targets(module: "lm_head", isLinear: true, isOutput: true)
        _ = c.targets(module: "model.embed_tokens", isLinear: false, isOutput: false)
    }

    static func request(_ data: Data) {
        _ = try? OpenAIRequest.completion(data, tokenizer: tokenizer, contextTokens: 2048)
        _ = try? OpenAIRequest.chat(data, tokenizer: tokenizer, contextTokens: 2048)
        _ = try? JSONDecoder().decode(LoadAdapterBody.self, from: data)
    }

    /// A model file's chat template (the input as UTF-8): detected, parsed,
    /// and rendered over a few conversations, as a tokenizer load and the
    /// chat route would. Templates come from model files, so a trap here
    /// would take the server down on a request.
    static func chatTemplate(_ data: Data) {
        let specials = ["bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"]
        guard case let (template?, _) = ChatTemplate.load(template: String(decoding: data, as: UTF8.self), specialTokens: specials) else { return }
        for messages in chatConversations {
            for generation in [false, true] { _ = try? template.render(messages, addGenerationPrompt: generation, now: chatNow) }
        }
    }

    static let chatNow = Date(timeIntervalSince1970: 1_764_806_400)  // fixed, so strftime_now is reproducible
    static let chatConversations: [[ChatMessage]] = [
        [],
        [.user("Hi")],
        [.system("Be brief."), .user("What is 2+2?"), .assistant("4"), .user("And 3+3?")],
        [.assistant("first"), .user(""), ChatMessage(role: "tool", content: "{\"x\": [1, 2]}")],
    ]
}

