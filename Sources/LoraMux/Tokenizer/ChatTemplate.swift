import Foundation

/// One turn of a conversation.
public struct ChatMessage: Sendable, Codable, Equatable, Hashable {
    public var role: String
    public var content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }

    public static func system(_ content: String) -> ChatMessage { ChatMessage(role: "system", content: content) }
    public static func user(_ content: String) -> ChatMessage { ChatMessage(role: "user", content: content) }
    public static func assistant(_ content: String) -> ChatMessage { ChatMessage(role: "assistant", content: content) }
}

/// The chat formats LoraMux renders natively, reproducing the Jinja
/// templates models ship character for character (no Jinja engine).
///
/// - `chatml`: `<|im_start|>ROLE\nCONTENT<|im_end|>\n` per message; when the
///   first message is not a system message and the template carries a
///   default system text (SmolLM2, Qwen2), that system turn comes first.
///   Generation prompt `<|im_start|>assistant\n`. Content is not trimmed.
/// - `llama3`: `<|begin_of_text|>` before the first message, then
///   `<|start_header_id|>ROLE<|end_header_id|>\n\n` + trimmed content +
///   `<|eot_id|>`; generation prompt `<|start_header_id|>assistant<|end_header_id|>\n\n`.
///   This is Llama 3(.0)'s template; 3.1+ templates add a dated system
///   preamble that is not rendered.
///
/// The rendered text contains special-token spellings: encode it with
/// `parseSpecial: true` and `addSpecial: false` (the BOS is already there).
public enum ChatTemplate: Sendable, Equatable {
    case chatml(defaultSystem: String?)
    case llama3

    /// Recognises a model's Jinja chat template: ChatML by `<|im_start|>`,
    /// Llama 3 by `<|start_header_id|>`; nil for anything else.
    public static func detect(template: String?) -> ChatTemplate? {
        guard let t = template else { return nil }
        if t.contains("<|start_header_id|>") { return .llama3 }
        if t.contains("<|im_start|>") { return .chatml(defaultSystem: defaultSystem(inChatML: t)) }
        return nil
    }

    /// The literal system text a ChatML template emits when the conversation
    /// has no system message, e.g. SmolLM2's
    /// `{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}`.
    static func defaultSystem(inChatML t: String) -> String? {
        for opener in ["<|im_start|>system\n", "<|im_start|>system\\n"] {
            var searchFrom = t.startIndex
            while let open = t.range(of: opener, range: searchFrom..<t.endIndex) {
                searchFrom = open.upperBound
                guard let close = t.range(of: "<|im_end|>", range: open.upperBound..<t.endIndex) else { break }
                let text = t[open.upperBound..<close.lowerBound]
                // Only a literal inside one Jinja string, not an expression.
                if text.isEmpty || text.contains(where: { "'\"{}+".contains($0) }) { continue }
                return text.replacingOccurrences(of: "\\n", with: "\n")
            }
        }
        return nil
    }

    /// The prompt text for `messages`, exactly as the model's template renders it.
    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool) -> String {
        var out = ""
        switch self {
        case let .chatml(defaultSystem):
            for (i, m) in messages.enumerated() {
                if i == 0, m.role != "system", let sys = defaultSystem {
                    out += "<|im_start|>system\n" + sys + "<|im_end|>\n"
                }
                out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n"
            }
            if addGenerationPrompt { out += "<|im_start|>assistant\n" }
        case .llama3:
            for (i, m) in messages.enumerated() {
                if i == 0 { out += "<|begin_of_text|>" }
                out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + Self.jinjaTrim(m.content) + "<|eot_id|>"
            }
            if addGenerationPrompt { out += "<|start_header_id|>assistant<|end_header_id|>\n\n" }
        }
        return out
    }

    /// Jinja's `trim` filter: Python `str.strip()`, whose whitespace set is
    /// White_Space plus U+001C…U+001F.
    static func jinjaTrim(_ s: String) -> String {
        func isSpace(_ u: Unicode.Scalar) -> Bool {
            u.properties.isWhitespace || (0x1C...0x1F).contains(u.value)
        }
        let u = s.unicodeScalars
        guard let first = u.firstIndex(where: { !isSpace($0) }) else { return "" }
        let last = u.lastIndex(where: { !isSpace($0) })!
        return String(u[first...last])
    }
}
