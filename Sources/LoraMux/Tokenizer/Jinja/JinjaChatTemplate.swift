import Foundation

/// A model's chat template run by LoraMux's own Jinja interpreter, for the
/// templates `ChatTemplate` has no native rendering of (Mistral, Zephyr,
/// Phi-3, Gemma, ...). The context is what transformers' `apply_chat_template`
/// passes: `messages` (role and content), `add_generation_prompt`, `tools`
/// and `documents` as none, and the tokenizer's special tokens.
public struct JinjaChatTemplate: Sendable, Equatable {
    public let source: String
    public let specialTokens: [String: String]
    let nodes: [JinjaNode]

    /// Parses `source`; throws a `JinjaError` (syntax, or a tag, filter or
    /// test this interpreter does not have) when it cannot render it.
    public init(source: String, specialTokens: [String: String]) throws {
        self.source = source
        self.specialTokens = specialTokens
        nodes = try JinjaParser.parse(source)
    }

    public static func == (a: JinjaChatTemplate, b: JinjaChatTemplate) -> Bool {
        a.source == b.source && a.specialTokens == b.specialTokens
    }

    /// The prompt text; throws the template's own `raise_exception` message
    /// (kind `.raised`) or a runtime error.
    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool, now: Date = Date()) throws -> String {
        var context: [String: JinjaValue] = [
            "messages": .array(messages.map { .dict(JinjaDict([("role", .string($0.role)), ("content", .string($0.content))])) }),
            "add_generation_prompt": .bool(addGenerationPrompt),
            "tools": .none,
            "documents": .none,
        ]
        for (k, v) in specialTokens { context[k] = .string(v) }
        return try render(context: context, now: now)
    }

    /// The value of one Jinja expression (a literal context, in tests).
    static func evaluate(_ expression: String) throws -> JinjaValue {
        let nodes = try JinjaParser.parse("{{ " + expression + " }}")
        guard nodes.count == 1, case let .output(e) = nodes[0] else { throw JinjaError(.syntax, "not one expression") }
        return try JinjaRenderer(context: [:], now: Date()).eval(e)
    }

    /// Renders with an arbitrary context (tests drive the interpreter with it).
    func render(context: [String: JinjaValue], now: Date = Date()) throws -> String {
        try JinjaRenderer(context: context, now: now).render(nodes)
    }
}
