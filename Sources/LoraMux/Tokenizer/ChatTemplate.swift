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
///   This is Llama 3(.0)'s template.
/// - `llama31`: Llama 3.1, 3.2 and 3.3's templates without tools. After the BOS
///   a system turn always comes first: `Cutting Knowledge Date: CUTOFF\n`,
///   `Today Date: DATE\n\n`, then the first message's trimmed content when
///   that message is a system message (else nothing), then `<|eot_id|>`. The
///   remaining messages and the generation prompt are as in `llama3`. DATE is
///   the template's literal (3.1, 3.3: "26 Jul 2024") or, when the template
///   calls `strftime_now` (3.2), today's local date in its format, as
///   transformers renders it.
/// - `llama2`: Llama 2 chat's template (meta-llama/Llama-2-*-chat-hf), matched
///   exactly. Each user turn is `BOS[INST] CONTENT [/INST]`, each assistant
///   turn ` CONTENT EOS`, contents stripped; a first system message goes into
///   the first user turn as `<<SYS>>\nSYSTEM\n<</SYS>>\n\n`. The roles after
///   it must alternate user/assistant (`refusal(for:)`); no generation prompt
///   is added (the template has none).
///
/// - `jinja`: any other template, run by LoraMux's Jinja interpreter
///   (`JinjaChatTemplate`) as transformers' `apply_chat_template` renders it.
///
/// The rendered text contains special-token spellings: encode it with
/// `parseSpecial: true` and `addSpecial: false` (the BOS is already there).
public enum ChatTemplate: Sendable, Equatable {
    case chatml(defaultSystem: String?)
    case llama3
    case llama31(knowledgeCutoff: String, date: TodayDate)
    case llama2(bos: String, eos: String)
    case jinja(JinjaChatTemplate)

    /// Where `llama31`'s "Today Date" comes from.
    public enum TodayDate: Sendable, Equatable {
        /// The template's own literal, e.g. "26 Jul 2024".
        case fixed(String)
        /// `strftime_now(FORMAT)`: the local date at rendering, C locale.
        case strftime(String)
    }

    /// Recognises a model's Jinja chat template: ChatML by `<|im_start|>`,
    /// Llama 3 by `<|start_header_id|>`, Llama 3.1+ by its dated system
    /// preamble as well; nil for anything else, and for a dated preamble whose
    /// cutoff or date cannot be read (rendering it without them would give the
    /// model a prompt it was not trained on).
    public static func detect(template: String?, bos: String? = nil, eos: String? = nil) -> ChatTemplate? {
        guard let t = template else { return nil }
        if t.trimmingCharacters(in: .whitespacesAndNewlines) == llama2Source {
            guard let bos, let eos else { return nil }
            return .llama2(bos: bos, eos: eos)
        }
        if t.contains("<|start_header_id|>") {
            guard t.contains(cutoffMarker) || t.contains(todayMarker) else { return .llama3 }
            guard let cutoff = literal(after: cutoffMarker, in: t), let date = todayDate(in: t) else { return nil }
            return .llama31(knowledgeCutoff: cutoff, date: date)
        }
        if t.contains("<|im_start|>") { return .chatml(defaultSystem: defaultSystem(inChatML: t)) }
        return nil
    }

    /// A model's template as LoraMux renders it: natively when `detect`
    /// recognises it, else by the Jinja interpreter. Nil, with the reason,
    /// when the template is missing or the interpreter cannot parse it.
    /// `specialTokens` are the variables transformers passes beside the
    /// messages (`bos_token`, `eos_token`, ...).
    public static func load(template: String?, specialTokens: [String: String]) -> (ChatTemplate?, problem: String?) {
        guard let template else { return (nil, nil) }
        if let native = detect(template: template, bos: specialTokens["bos_token"], eos: specialTokens["eos_token"]) {
            return (native, nil)
        }
        do {
            return (.jinja(try JinjaChatTemplate(source: template, specialTokens: specialTokens)), nil)
        } catch {
            return (nil, "\(error)")
        }
    }

    /// Llama 2 chat's template as its models ship it in tokenizer_config.json.
    static let llama2Source = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        + "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        + "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        + "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        + "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        + "{% if loop.index0 == 0 and system_message != false %}"
        + "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        + "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        + "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        + "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"

    /// Why the model's template would refuse `messages` (its
    /// `raise_exception`), or nil when it renders them.
    public func refusal(for messages: [ChatMessage]) -> String? {
        guard case .llama2 = self else { return nil }
        let rest = messages.first?.role == "system" ? messages.dropFirst() : messages[...]
        for (i, m) in rest.enumerated() where (m.role == "user") != (i % 2 == 0) {
            return "Conversation roles must alternate user/assistant/user/assistant/... (after an optional first system message)"
        }
        return nil
    }

    static let cutoffMarker = "Cutting Knowledge Date: "
    static let todayMarker = "Today Date: "

    /// The text that follows `marker` inside the same Jinja string literal, up
    /// to its `\n` escape or closing quote: "December 2023" in
    /// `{{- "Cutting Knowledge Date: December 2023\n" }}`.
    static func literal(after marker: String, in t: String) -> String? {
        guard let r = t.range(of: marker) else { return nil }
        let rest = t[r.upperBound...]
        // A literal's own end: its `\n` escape, a real newline, or its quote; `{`, `}` or `+` mean an expression.
        guard let end = rest.firstIndex(where: { "\\\"'\n{}+".contains($0) }), !"{}+".contains(rest[end]) else { return nil }
        let text = rest[..<end]
        return text.isEmpty ? nil : String(text)
    }

    /// 3.2's `set date_string = strftime_now("%d %b %Y")` (transformers always
    /// defines `strftime_now`), else 3.1's `set date_string = "26 Jul 2024"`.
    static func todayDate(in t: String) -> TodayDate? {
        if let r = t.range(of: "strftime_now(") {
            return quoted(t[r.upperBound...]).map(TodayDate.strftime)
        }
        guard let r = t.range(of: #"set date_string = "#) else { return nil }
        return quoted(t[r.upperBound...]).map(TodayDate.fixed)
    }

    /// The contents of the Jinja string literal `s` starts with, when it has
    /// no escapes (none of the templates' dates do).
    static func quoted(_ s: Substring) -> String? {
        guard let q = s.first, q == "\"" || q == "'" else { return nil }
        let body = s.dropFirst()
        guard let close = body.firstIndex(of: q) else { return nil }
        let text = body[..<close]
        return text.isEmpty || text.contains("\\") || text.contains("\n") ? nil : String(text)
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

    /// The prompt text for `messages`, exactly as the model's template renders
    /// it; `now` is the date a `strftime_now` template shows. Only a `jinja`
    /// template throws: its own `raise_exception`, or a `JinjaError` for
    /// messages it cannot handle.
    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool, now: Date = Date()) throws -> String {
        var out = ""
        switch self {
        case let .jinja(t):
            return try t.render(messages, addGenerationPrompt: addGenerationPrompt, now: now)
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
        case let .llama31(cutoff, date):
            var rest = messages[...]
            var system = ""
            if let first = rest.first, first.role == "system" {
                system = Self.jinjaTrim(first.content)
                rest = rest.dropFirst()
            }
            let today: String
            switch date {
            case let .fixed(s): today = s
            case let .strftime(format): today = Self.strftime(format, now)
            }
            out += "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            out += Self.cutoffMarker + cutoff + "\n" + Self.todayMarker + today + "\n\n" + system + "<|eot_id|>"
            for m in rest {
                out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + Self.jinjaTrim(m.content) + "<|eot_id|>"
            }
            if addGenerationPrompt { out += "<|start_header_id|>assistant<|end_header_id|>\n\n" }
        case let .llama2(bos, eos):
            var rest = messages[...]
            var system: String?
            if let first = rest.first, first.role == "system" {
                system = first.content
                rest = rest.dropFirst()
            }
            for (i, m) in rest.enumerated() {
                var content = m.content
                if i == 0, let system { content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content }
                // A system message elsewhere passes the template's role check and prints nothing.
                switch m.role {
                case "user": out += bos + "[INST] " + Self.jinjaTrim(content) + " [/INST]"
                case "assistant": out += " " + Self.jinjaTrim(content) + " " + eos
                default: break
                }
            }
        }
        return out
    }

    /// C `strftime` of the local time, as Python's `datetime.now().strftime`
    /// gives it (neither process sets LC_TIME, so month names are English).
    static func strftime(_ format: String, _ date: Date) -> String {
        var t = time_t(date.timeIntervalSince1970.rounded(.down))
        var parts = tm()
        localtime_r(&t, &parts)
        var buf = [CChar](repeating: 0, count: 256)
        let n = Foundation.strftime(&buf, buf.count, format, &parts)
        return String(decoding: buf[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Jinja's `trim` filter: Python `str.strip()`, whose whitespace set is
    /// White_Space plus U+001C…U+001F.
    static func jinjaTrim(_ s: String) -> String { JinjaRenderer.pythonStrip(s, chars: nil) }
}
