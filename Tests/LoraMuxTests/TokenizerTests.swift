import Foundation
import XCTest
import LoraMux

/// Tokenizer tests against Hugging Face `tokenizers` references:
/// - Fixtures/smollm2/tokenizer.json + tokenizer_corpus.json (made by make_fixtures.py),
/// - Fixtures/chat_templates.json (jinja2-rendered ChatML and Llama 3 prompts),
/// - Fixtures/tokenizer/llama3-tiny/ (made by tokenizer/make_llama3_tiny.py),
/// - Fixtures/tokenizer/llama2-tiny/ (SentencePiece BPE, made by tokenizer/make_llama2_tiny.py),
/// - the real SmolLM2 GGUF (`LORAMUX_MODEL` or models/SmolLM2-135M-Instruct.Q4_1.gguf).
final class TokenizerTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures")
    static let repoRoot = fixtures.deletingLastPathComponent().deletingLastPathComponent()

    struct CorpusEntry: Decodable {
        let text: String
        let ids: [Int32]
        let tokens: [String]?
        let decoded: String
    }
    struct Conversation: Decodable {
        let messages: [ChatMessage]
        let add_generation_prompt: Bool
        let expected: String
        let expected_ids: [Int32]?
    }
    struct SmolCorpus: Decodable {
        struct Chat: Decodable { let template: String; let conversations: [Conversation] }
        let special_tokens: [String: Int32]
        let corpus: [CorpusEntry]
        let chat_template: Chat
    }
    struct TemplateSet: Decodable {
        struct Family: Decodable { let template: String; let conversations: [Conversation] }
        struct Dated: Decodable { let template: String; let now_utc: String; let conversations: [Conversation] }
        let llama3: Family
        let chatml: Family
        let llama31: Dated
        let llama32: Dated
        let llama2: Refusable
        struct Refusable: Decodable {
            struct Conversation: Decodable { let messages: [ChatMessage]; let expected: String?; let error: String? }
            let template: String
            let conversations: [Conversation]
        }
    }
    struct TinyCorpus: Decodable {
        struct Entry: Decodable {
            let text: String
            let ids: [Int32]
            let ids_add_special: [Int32]
            let decoded: String
            let decoded_skip_special: String
        }
        let bos_id: Int32
        let eot_id: Int32
        let corpus: [Entry]
    }

    func load<T: Decodable>(_ type: T.Type, _ relative: String) throws -> T {
        let url = Self.fixtures.appendingPathComponent(relative)
        return try JSONDecoder().decode(T.self, from: Data(contentsOf: url))
    }

    /// The SmolLM2 GGUF; fails (never skips) when it has not been fetched.
    func ggufTokenizer(file: StaticString = #filePath, line: UInt = #line) throws -> BPETokenizer {
        let path = ProcessInfo.processInfo.environment["LORAMUX_MODEL"]
            ?? Self.repoRoot.appendingPathComponent("models/SmolLM2-135M-Instruct.Q4_1.gguf").path
        guard FileManager.default.fileExists(atPath: path) else {
            XCTFail("model file \(path) is missing: run ops/fetch-model (or set LORAMUX_MODEL)", file: file, line: line)
            throw MissingModel(path: path)
        }
        return try BPETokenizer(gguf: GGUFFile(path: path))
    }

    struct MissingModel: Error, CustomStringConvertible {
        let path: String
        var description: String { "model file \(path) is missing: run ops/fetch-model" }
    }

    func jsonTokenizer() throws -> BPETokenizer {
        try BPETokenizer(tokenizerJSON: Self.fixtures.appendingPathComponent("smollm2/tokenizer.json"))
    }

    func checkCorpus(_ tok: BPETokenizer, _ label: String) throws {
        let corpus = try load(SmolCorpus.self, "smollm2/tokenizer_corpus.json")
        XCTAssertGreaterThan(corpus.corpus.count, 20)
        var pass = 0
        for e in corpus.corpus {
            let ids = tok.encode(e.text)
            if ids == e.ids { pass += 1 }
            XCTAssertEqual(ids, e.ids, "\(label): ids of \(e.text.debugDescription)")
            if let tokens = e.tokens {
                XCTAssertEqual(e.ids.map { tok.tokenString($0) ?? "?" }, tokens, "\(label): tokens of \(e.text.debugDescription)")
            }
            XCTAssertEqual(tok.decode(e.ids), e.decoded, "\(label): decode of \(e.text.debugDescription)")
        }
        XCTAssertEqual(pass, corpus.corpus.count, "\(label): corpus strings with identical ids")
        for (text, id) in corpus.special_tokens {
            XCTAssertEqual(tok.id(of: text), id, "\(label): id of \(text)")
        }
    }

    // MARK: - Corpus ids

    func testGGUFTokenizerMatchesHFCorpus() throws {
        let tok = try ggufTokenizer()
        XCTAssertEqual(tok.preTokenizer, .smollm)
        XCTAssertEqual(tok.vocabSize, 49152)
        XCTAssertEqual(tok.bosId, 1)
        XCTAssertEqual(tok.eosId, 2)
        XCTAssertTrue(tok.eotIds.contains(2), "<|im_end|> ends a turn")
        XCTAssertEqual(tok.prefixIds, [], "SmolLM2 adds no BOS")
        try checkCorpus(tok, "gguf")
    }

    func testTokenizerJSONMatchesHFCorpus() throws {
        let tok = try jsonTokenizer()
        XCTAssertEqual(tok.preTokenizer, .smollm)
        XCTAssertEqual(tok.vocabSize, 49152)
        try checkCorpus(tok, "tokenizer.json")
    }

    func testGGUFAndTokenizerJSONAgree() throws {
        let a = try ggufTokenizer()
        let b = try jsonTokenizer()
        let corpus = try load(SmolCorpus.self, "smollm2/tokenizer_corpus.json")
        let all = corpus.corpus.map(\.text).joined(separator: "\n")
        XCTAssertEqual(a.encode(all), b.encode(all))
    }

    // MARK: - Round trip

    func testDecodeEncodeRoundTrip() throws {
        let corpus = try load(SmolCorpus.self, "smollm2/tokenizer_corpus.json")
        for tok in [try jsonTokenizer(), try ggufTokenizer()] {
            for e in corpus.corpus {
                XCTAssertEqual(tok.decode(tok.encode(e.text)), e.text, "round trip of \(e.text.debugDescription)")
                XCTAssertEqual(tok.decode(tok.encode(e.text, parseSpecial: false)), e.text,
                               "round trip without special parsing of \(e.text.debugDescription)")
            }
        }
    }

    // MARK: - Streaming decode

    func testStreamingDecoderKeepsMultibyteCharactersWhole() throws {
        let tok = try jsonTokenizer()
        let texts = ["Emoji: 😀 🎉 👍🏽", "Family: 👨‍👩‍👧‍👦 and 🏳️‍🌈", "日本語のテキストです。", "한국어 텍스트 🇫🇷🇯🇵",
                     "mixed Hello мир 世界 😀!", "e\u{301}a\u{308} café"]
        var heldBack = 0
        for text in texts {
            let ids = tok.encode(text)
            var decoder = tok.makeDecoder()
            var out = ""
            for id in ids {
                let chunk = decoder.feed(id)
                XCTAssertFalse(chunk.unicodeScalars.contains("\u{FFFD}"), "half a character emitted for \(text)")
                if chunk.isEmpty && !tok.bytes(of: id).isEmpty { heldBack += 1 }
                out += chunk
            }
            XCTAssertFalse(decoder.hasPendingBytes)
            out += decoder.finish()
            XCTAssertEqual(out, tok.decode(ids))
            XCTAssertEqual(out, text)
        }
        XCTAssertGreaterThan(heldBack, 0, "test texts must split some characters across tokens")

        // A 4-byte emoji fed byte token by byte token comes out only at the end.
        let emoji = "😀"
        let byteIds = emoji.utf8.map { b -> Int32 in
            tok.id(of: String(Character(Unicode.Scalar(Self.gpt2ByteScalar(b))!)))!
        }
        var decoder = tok.makeDecoder()
        XCTAssertEqual(byteIds.dropLast().map { decoder.feed($0) }, ["", "", ""])
        XCTAssertEqual(decoder.feed(byteIds.last!), emoji)

        // An unfinished character is flushed as U+FFFD, as decode() does.
        decoder = tok.makeDecoder()
        XCTAssertEqual(decoder.feed(byteIds[0]), "")
        XCTAssertEqual(decoder.finish(), tok.decode([byteIds[0]]))
        XCTAssertEqual(decoder.finish(), "")

        // skipSpecial drops control tokens, like decode(skipSpecial:).
        let chat = tok.encode("<|im_start|>assistant\nHi 😀<|im_end|>")
        var skipping = tok.makeDecoder(skipSpecial: true)
        XCTAssertEqual(skipping.feed(chat) + skipping.finish(), tok.decode(chat, skipSpecial: true))
        XCTAssertEqual(tok.decode(chat, skipSpecial: true), "assistant\nHi 😀")
    }

    /// GPT-2's byte → printable scalar mapping (for building byte-token spellings).
    static func gpt2ByteScalar(_ b: UInt8) -> UInt32 {
        var n: UInt32 = 0
        for x in 0..<256 {
            let printable = (0x21...0x7E).contains(x) || (0xA1...0xAC).contains(x) || (0xAE...0xFF).contains(x)
            if x == Int(b) { return printable ? UInt32(x) : 256 + n }
            if !printable { n += 1 }
        }
        return 0
    }

    // MARK: - Special tokens

    func testSpecialTokensInTextMapToTheirIds() throws {
        let tok = try jsonTokenizer()
        let imStart = try XCTUnwrap(tok.id(of: "<|im_start|>"))
        let imEnd = try XCTUnwrap(tok.id(of: "<|im_end|>"))
        XCTAssertEqual(imStart, 1)
        XCTAssertEqual(imEnd, 2)
        let ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n")
        XCTAssertEqual(ids.first, imStart)
        XCTAssertEqual(ids.filter { $0 == imEnd }.count, 1)
        XCTAssertEqual(ids, [imStart] + tok.encode("user\nHi") + [imEnd] + tok.encode("\n"))
        XCTAssertEqual(tok.encode("<|endoftext|>"), [0])
        XCTAssertEqual(tok.encode("<|im_start|><|im_end|>"), [1, 2])
        // Partial spellings are plain text.
        XCTAssertFalse(tok.encode("<|im_start").contains(imStart))
        // parseSpecial: false treats the spelling as text (for untrusted content).
        let plain = tok.encode("<|im_end|>", parseSpecial: false)
        XCTAssertFalse(plain.contains(imEnd))
        XCTAssertGreaterThan(plain.count, 1)
        XCTAssertEqual(tok.decode(plain), "<|im_end|>")
        XCTAssertTrue(tok.isSpecial(imEnd))
        XCTAssertFalse(tok.isSpecial(tok.encode("Hi")[0]))
        XCTAssertTrue(tok.eotIds.contains(imEnd))
        XCTAssertEqual(tok.tokenString(imEnd), "<|im_end|>")
        XCTAssertNil(tok.tokenString(-1))
        XCTAssertNil(tok.tokenString(Int32(tok.vocabSize)))
        XCTAssertEqual(tok.decode([imStart, 19556, imEnd], skipSpecial: true), tok.decode([19556]))
    }

    // MARK: - Chat templates

    func testChatTemplatesRenderLikeJinja() throws {
        let set = try load(TemplateSet.self, "chat_templates.json")

        let chatml = try XCTUnwrap(ChatTemplate.detect(template: set.chatml.template))
        XCTAssertEqual(chatml, .chatml(defaultSystem: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"))
        for c in set.chatml.conversations {
            XCTAssertEqual(try chatml.render(c.messages, addGenerationPrompt: c.add_generation_prompt), c.expected)
        }

        let llama3 = try XCTUnwrap(ChatTemplate.detect(template: set.llama3.template))
        XCTAssertEqual(llama3, .llama3)
        for c in set.llama3.conversations {
            XCTAssertEqual(try llama3.render(c.messages, addGenerationPrompt: c.add_generation_prompt), c.expected)
        }

        // Llama 3.1 (fixed date) and 3.2 (strftime_now), as transformers renders them.
        for (name, family, date) in [("3.1", set.llama31, ChatTemplate.TodayDate.fixed("26 Jul 2024")),
                                     ("3.2", set.llama32, .strftime("%d %b %Y"))] {
            let t = try XCTUnwrap(ChatTemplate.detect(template: family.template), name)
            XCTAssertEqual(t, .llama31(knowledgeCutoff: "December 2023", date: date), name)
            let now = try XCTUnwrap(ISO8601DateFormatter().date(from: family.now_utc))
            for c in family.conversations {
                XCTAssertEqual(try t.render(c.messages, addGenerationPrompt: c.add_generation_prompt, now: now), c.expected, name)
            }
        }
        // 3.2's date is the rendering day's, in strftime's format.
        let l32 = try XCTUnwrap(ChatTemplate.detect(template: set.llama32.template))
        let jan1 = try XCTUnwrap(ISO8601DateFormatter().date(from: "2031-01-01T12:00:00Z"))
        XCTAssertTrue(try l32.render([.user("x")], addGenerationPrompt: false, now: jan1).contains("Today Date: 01 Jan 2031\n\n"))
        // Cut short anywhere, a template never yields a partial cutoff or date (and never traps).
        for family in [set.llama31, set.llama32] {
            let chars = Array(family.template)
            // Past the "Today Date" line nothing detection reads is left to cut.
            let today = try XCTUnwrap(family.template.range(of: "Today Date: "))
            let last = min(chars.count, family.template.distance(from: family.template.startIndex, to: today.upperBound) + 64)
            for end in 0...last {
                switch ChatTemplate.detect(template: String(chars[..<end])) {
                case let .llama31(cutoff, date)?:
                    XCTAssertEqual(cutoff, "December 2023", "cut at \(end)")
                    XCTAssertTrue([.fixed("26 Jul 2024"), .strftime("%d %b %Y")].contains(date), "cut at \(end): \(date)")
                case .llama3?, nil, .chatml?, .llama2?, .jinja?: break
                }
            }
        }
        // A dated preamble whose date or cutoff is not a literal we can read is refused, not rendered without it.
        XCTAssertNil(ChatTemplate.detect(template: set.llama31.template.replacingOccurrences(of: #"set date_string = "26 Jul 2024""#,
                                                                                             with: "set date_string = today()")))
        XCTAssertNil(ChatTemplate.detect(template: set.llama31.template.replacingOccurrences(of: "Cutting Knowledge Date: December 2023",
                                                                                             with: #"Cutting Knowledge Date: " + cutoff + ""#)))

        // Llama 2 chat, as transformers renders it, raise_exception included.
        let llama2 = try XCTUnwrap(ChatTemplate.detect(template: set.llama2.template + "\n", bos: "<s>", eos: "</s>"))
        XCTAssertEqual(llama2, .llama2(bos: "<s>", eos: "</s>"))
        XCTAssertNil(ChatTemplate.detect(template: set.llama2.template), "a vocabulary without bos/eos cannot render it")
        for variant in [set.llama2.template.replacingOccurrences(of: "' [/INST]'", with: "' [/INST] '"),
                        set.llama2.template.replacingOccurrences(of: "content.strip()", with: "content")] {
            XCTAssertNotEqual(variant, set.llama2.template)
            XCTAssertNil(ChatTemplate.detect(template: variant, bos: "<s>", eos: "</s>"), "only the exact template")
        }
        XCTAssertEqual(set.llama2.conversations.filter { $0.error != nil }.count, 4)
        for c in set.llama2.conversations {
            if let expected = c.expected {
                XCTAssertNil(llama2.refusal(for: c.messages), "\(c.messages)")
                XCTAssertEqual(try llama2.render(c.messages, addGenerationPrompt: true), expected)
            } else {
                XCTAssertNotNil(llama2.refusal(for: c.messages), "\(c.messages) should be refused like \(c.error ?? "")")
            }
        }
        XCTAssertNil(ChatTemplate.llama3.refusal(for: [.user("a"), .user("b")]))

        XCTAssertNil(ChatTemplate.detect(template: nil))
        XCTAssertNil(ChatTemplate.detect(template: "{{ messages[0]['content'] }}"))
        XCTAssertEqual(ChatTemplate.detect(template: "{{ '<|im_start|>' + message['role'] }}"), .chatml(defaultSystem: nil))
        // Jinja's trim is Python's str.strip().
        XCTAssertEqual(try ChatTemplate.llama3.render([.user("\u{1F}\u{A0} x \u{3000}\n")], addGenerationPrompt: false),
                       "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>")
    }

    func testSmolLM2ChatPromptIds() throws {
        let corpus = try load(SmolCorpus.self, "smollm2/tokenizer_corpus.json")
        for tok in [try jsonTokenizer(), try ggufTokenizer()] {
            let template = ChatTemplate.detect(template: corpus.chat_template.template)
            XCTAssertNotNil(template)
            for c in corpus.chat_template.conversations {
                let text = try template!.render(c.messages, addGenerationPrompt: c.add_generation_prompt)
                XCTAssertEqual(text, c.expected)
                if let ids = c.expected_ids { XCTAssertEqual(tok.encode(text), ids) }
            }
        }
        let gguf = try ggufTokenizer()
        XCTAssertEqual(gguf.chatTemplate, ChatTemplate.detect(template: corpus.chat_template.template))
    }

    /// A Llama 3.2 tokenizer (the tiny Llama 3 vocabulary with 3.2's template)
    /// loads without a warning and a chat request's prompt is the template's
    /// rendering for today; a template we do not render refuses chat by saying so.
    func testLlama32ChatRequestRendersTodaysPreamble() throws {
        let set = try load(TemplateSet.self, "chat_templates.json")
        let src = Self.fixtures.appendingPathComponent("tokenizer/llama3-tiny")
        func tokenizer(template: String) throws -> BPETokenizer {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-l32-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
            try FileManager.default.copyItem(at: src.appendingPathComponent("tokenizer.json"), to: dir.appendingPathComponent("tokenizer.json"))
            var config = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: src.appendingPathComponent("tokenizer_config.json"))) as? [String: Any])
            config["chat_template"] = template
            try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("tokenizer_config.json"))
            return try BPETokenizer(tokenizerJSON: dir.appendingPathComponent("tokenizer.json"))
        }
        let body = Data(#"{"model":"m","max_tokens":4,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#.utf8)

        let tok = try tokenizer(template: set.llama32.template)
        XCTAssertEqual(tok.chatTemplate, .llama31(knowledgeCutoff: "December 2023", date: .strftime("%d %b %Y")))
        XCTAssertEqual(tok.warnings, [])
        // Python's "%d %b %Y" in the C locale, by Foundation's formatter (both sides of the request, for a midnight).
        let day = DateFormatter()
        day.locale = Locale(identifier: "en_US_POSIX")
        day.timeZone = .current
        day.dateFormat = "dd MMM yyyy"
        let before = day.string(from: Date())
        let ids = try OpenAIRequest.chat(body, tokenizer: tok, contextTokens: 2048).promptIds
        let after = day.string(from: Date())
        let expected = Set([before, after].map { day in
            tok.encode("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                       + "Today Date: \(day)\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                       + "<|start_header_id|>assistant<|end_header_id|>\n\n")
        })
        XCTAssertTrue(expected.contains(ids), "\(ids)")
        XCTAssertEqual(ids.filter { $0 == tok.bosId }.count, 1)

        // A dated preamble without a literal cutoff has no native rendering; the
        // interpreter renders it as jinja2 does (an undefined name prints nothing).
        let odd = try tokenizer(template: "{{ '<|start_header_id|>' }}Cutting Knowledge Date: {{ cutoff }}")
        guard case .jinja? = odd.chatTemplate else { return XCTFail("\(String(describing: odd.chatTemplate))") }
        XCTAssertEqual(odd.warnings, [])
        XCTAssertEqual(try OpenAIRequest.chat(body, tokenizer: odd, contextTokens: 2048).promptIds,
                       odd.encode("<|start_header_id|>Cutting Knowledge Date: "))

        // A template the interpreter cannot parse: a load warning naming why, and chat requests refused.
        let unparsed = try tokenizer(template: "{{ messages[0].content | wordwrap(5) }}")
        XCTAssertNil(unparsed.chatTemplate)
        XCTAssertEqual(unparsed.warnings.count, 1)
        XCTAssertTrue(unparsed.warnings[0].contains("no filter named 'wordwrap'"), unparsed.warnings[0])
        XCTAssertThrowsError(try OpenAIRequest.chat(body, tokenizer: unparsed, contextTokens: 2048)) {
            XCTAssertTrue($0.localizedDescription.contains("chat template cannot be rendered by LoraMux"), $0.localizedDescription)
        }

        // The template's own raise_exception is the request's error; a runtime failure says it was the template.
        let strict = try tokenizer(template: "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}x")
        XCTAssertThrowsError(try OpenAIRequest.chat(body, tokenizer: strict, contextTokens: 2048)) {
            XCTAssertEqual($0 as? EngineError, .invalidArgument("System role not supported"))
        }
        let broken = try tokenizer(template: "{{ messages[0].content + 1 }}")
        XCTAssertThrowsError(try OpenAIRequest.chat(body, tokenizer: broken, contextTokens: 2048)) {
            XCTAssertTrue($0.localizedDescription.contains("chat template failed on these messages"), $0.localizedDescription)
        }
    }

    /// OpenAI's content-part arrays render exactly as the same text given as
    /// a string; parts that are not text are refused by name and place.
    func testChatContentPartsRenderAsText() throws {
        let tok = try ggufTokenizer()  // SmolLM2's, with its chat template
        func chat(_ messages: String) throws -> [Int32] {
            try OpenAIRequest.chat(Data(#"{"model":"m","max_tokens":4,"messages":\#(messages)}"#.utf8), tokenizer: tok,
                                   contextTokens: 2048).promptIds
        }
        let plain = try chat(#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi\nthere"}]"#)
        XCTAssertEqual(try chat(#"[{"role":"system","content":[{"type":"text","text":"Be brief."}]},"#
                                + #"{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"there"}]}]"#), plain)
        XCTAssertNotEqual(try chat(#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Hithere"}]"#), plain)
        func refused(_ messages: String, _ needle: String, line: UInt = #line) {
            XCTAssertThrowsError(try chat(messages), line: line) { e in
                XCTAssertTrue(e.localizedDescription.contains(needle) || "\(e)".contains(needle), "\(e)", line: line)
            }
        }
        refused(#"[{"role":"user","content":"a"},{"role":"user","content":[{"type":"text","text":"b"},"#
                + #"{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]"#,
                "messages[1].content[1]: content part type 'image_url' is not supported")
        refused(#"[{"role":"user","content":[{"type":"text"}]}]"#, "a text part needs 'text'")
        refused(#"[{"role":"user","content":7}]"#, "content must be a string or an array of content parts")
    }

    /// Fields that would change the output and that we do not serve get a
    /// 400 naming them; their do-nothing values (what SDKs send by default) pass.
    func testUnsupportedOutputFieldsAreRefusedByName() throws {
        let tok = try ggufTokenizer()
        func chat(_ extra: String) throws -> PreparedCompletion {
            try OpenAIRequest.chat(Data(#"{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"x"}]\#(extra)}"#.utf8),
                                   tokenizer: tok, contextTokens: 2048)
        }
        func completion(_ extra: String) throws -> PreparedCompletion {
            try OpenAIRequest.completion(Data(#"{"model":"m","max_tokens":4,"prompt":"x"\#(extra)}"#.utf8), tokenizer: tok, contextTokens: 2048)
        }
        func refused(_ r: @autoclosure () throws -> PreparedCompletion, _ needle: String, line: UInt = #line) {
            XCTAssertThrowsError(try r(), needle, line: line) { XCTAssertTrue($0.localizedDescription.contains(needle), "\($0.localizedDescription) should name \(needle)", line: line) }
        }
        refused(try chat(#","tools":[{"type":"function","function":{"name":"f","parameters":{"a":[[[[1]]]]}}}]"#), "'tools'")
        refused(try chat(#","functions":[{"name":"f"}]"#), "'functions'")
        refused(try chat(#","response_format":{"type":"json_object"}"#), "'response_format'")
        refused(try chat(#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{}}}"#), "'response_format'")
        refused(try chat(#","modalities":["text","audio"]"#), "modality")
        refused(try chat(#","audio":{"voice":"alloy","format":"wav"}"#), "'audio'")
        refused(try completion(#","best_of":3"#), "'best_of'")
        refused(try completion(#","suffix":"end""#), "'suffix'")
        for extra in [#","tools":[]"#, #","tools":null"#, #","response_format":{"type":"text"}"#, #","modalities":["text"]"#,
                      #","audio":null"#, #","functions":[]"#] {
            XCTAssertNoThrow(try chat(extra), extra)
        }
        XCTAssertNoThrow(try completion(#","best_of":1,"suffix":"""#))
        XCTAssertNoThrow(try completion(#","suffix":null,"user":"u-1","logit_bias":{}"#))
    }

    // MARK: - Llama 3 style (tiny)

    func testLlama3StyleTokenizerJSON() throws {
        let dir = Self.fixtures.appendingPathComponent("tokenizer/llama3-tiny")
        try checkLlama3Tiny(BPETokenizer(tokenizerJSON: dir.appendingPathComponent("tokenizer.json")), "tokenizer.json")
    }

    func testLlama3StyleGGUF() throws {
        let path = Self.fixtures.appendingPathComponent("tokenizer/llama3-tiny/tokenizer.gguf").path
        try checkLlama3Tiny(BPETokenizer(gguf: GGUFFile(path: path)), "gguf")
    }

    /// The tiny Llama-3-style reference: regex, ignore_merges (" zyzzyva" has
    /// no merge path), BOS from the post-processor / llama.cpp's llama-bpe
    /// default, a non-special added token, and the Llama 3 chat template.
    func checkLlama3Tiny(_ tok: BPETokenizer, _ label: String) throws {
        let ref = try load(TinyCorpus.self, "tokenizer/llama3-tiny/corpus.json")
        XCTAssertEqual(tok.preTokenizer, .llama3, label)
        XCTAssertEqual(tok.warnings, [], label)
        XCTAssertEqual(tok.bosId, ref.bos_id, label)
        XCTAssertEqual(tok.eosId, ref.eot_id, "\(label): eos from tokenizer_config.json / eos_token_id")
        XCTAssertEqual(tok.prefixIds, [ref.bos_id], "\(label): encode(addSpecial:) adds <|begin_of_text|>")
        XCTAssertTrue(tok.eotIds.contains(ref.eot_id), label)
        XCTAssertTrue(tok.eotIds.contains(try XCTUnwrap(tok.id(of: "<|end_of_text|>"))), label)
        XCTAssertEqual(tok.chatTemplate, .llama3, label)
        for e in ref.corpus {
            XCTAssertEqual(tok.encode(e.text), e.ids, "\(label): ids of \(e.text.debugDescription)")
            XCTAssertEqual(tok.encode(e.text, addSpecial: true), e.ids_add_special,
                           "\(label): ids+special of \(e.text.debugDescription)")
            XCTAssertEqual(tok.decode(e.ids), e.decoded, label)
            XCTAssertEqual(tok.decode(e.ids, skipSpecial: true), e.decoded_skip_special, label)
            XCTAssertEqual(tok.decode(tok.encode(e.text)), e.text, label)
        }
        // The rendered Llama 3 prompt already starts with BOS: encode it without addSpecial.
        let prompt = try ChatTemplate.llama3.render([.user("Hi")], addGenerationPrompt: true)
        XCTAssertEqual(tok.encode(prompt).first, ref.bos_id)
        XCTAssertEqual(tok.encode(prompt).filter { $0 == ref.bos_id }.count, 1)
    }

    // MARK: - Llama 2 style (SentencePiece BPE, tiny)

    struct SPCorpus: Decodable {
        struct Entry: Decodable {
            let text: String
            let ids: [Int32]
            let ids_add_special: [Int32]
            let tokens: [String]
            let decoded: String
            let decoded_skip_special: String
            let ids_metaspace: [Int32]
            let decoded_metaspace: String
        }
        let bos_id: Int32
        let eos_id: Int32
        let unk_id: Int32
        let corpus: [Entry]
    }

    static let llama2Dir = fixtures.appendingPathComponent("tokenizer/llama2-tiny")

    func testLlama2StyleGGUF() throws {
        let tok = try BPETokenizer(gguf: GGUFFile(path: Self.llama2Dir.appendingPathComponent("tokenizer.gguf").path))
        try checkLlama2Tiny(tok, "gguf")
    }

    func testLlama2StyleTokenizerJSON() throws {
        let tok = try BPETokenizer(tokenizerJSON: Self.llama2Dir.appendingPathComponent("tokenizer.json"))
        try checkLlama2Tiny(tok, "tokenizer.json")
        let gguf = try BPETokenizer(gguf: GGUFFile(path: Self.llama2Dir.appendingPathComponent("tokenizer.gguf").path))
        let all = try load(SPCorpus.self, "tokenizer/llama2-tiny/corpus.json").corpus.map(\.text).joined(separator: " \n")
        XCTAssertEqual(tok.encode(all, addSpecial: true), gguf.encode(all, addSpecial: true),
                       "merges by rank (tokenizer.json) and by score (GGUF) agree")
    }

    /// Metaspace(prepend_scheme "first"), as Mistral's and newer Llama 2
    /// tokenizer.json files have it: "▁" before the text's first segment only,
    /// and not before one that already starts with a space.
    func testLlama2StyleMetaspaceTokenizerJSON() throws {
        let tok = try BPETokenizer(tokenizerJSON: Self.llama2Dir.appendingPathComponent("tokenizer-metaspace.json"))
        let ref = try load(SPCorpus.self, "tokenizer/llama2-tiny/corpus.json")
        XCTAssertEqual(tok.warnings, [])
        var differs = 0
        for e in ref.corpus {
            XCTAssertEqual(tok.encode(e.text), e.ids_metaspace, "ids of \(e.text.debugDescription)")
            XCTAssertEqual(tok.decode(e.ids_metaspace), e.decoded_metaspace, "decode of \(e.text.debugDescription)")
            if e.ids != e.ids_metaspace { differs += 1 }
        }
        XCTAssertGreaterThan(differs, 10, "the corpus tells the two prefix rules apart")
    }

    /// SentencePiece BPE with byte fallback: ids equal to HF tokenizers' (and,
    /// for plain text, to sentencepiece's own, checked when the fixture was
    /// made), "▁" before each segment, <0xXX> tokens for characters the
    /// vocabulary lacks, BOS added, HF's decode (one leading space stripped).
    func checkLlama2Tiny(_ tok: BPETokenizer, _ label: String) throws {
        let ref = try load(SPCorpus.self, "tokenizer/llama2-tiny/corpus.json")
        XCTAssertEqual(tok.warnings, [], label)
        XCTAssertEqual(tok.vocabSize, 700, label)
        XCTAssertEqual(tok.bosId, ref.bos_id, label)
        XCTAssertEqual(tok.eosId, ref.eos_id, label)
        XCTAssertEqual(tok.prefixIds, [ref.bos_id], label)
        XCTAssertEqual(tok.suffixIds, [], label)
        XCTAssertTrue(tok.eotIds.contains(ref.eos_id), label)
        XCTAssertTrue(tok.isSpecial(ref.unk_id) && tok.isSpecial(ref.bos_id), label)
        XCTAssertGreaterThan(ref.corpus.filter { $0.tokens.contains { $0.hasPrefix("<0x") } }.count, 5,
                             "the corpus exercises byte fallback")
        for e in ref.corpus {
            let ids = tok.encode(e.text)
            XCTAssertEqual(ids, e.ids, "\(label): ids of \(e.text.debugDescription)")
            XCTAssertEqual(ids.map { tok.tokenString($0) ?? "?" }, e.tokens, "\(label): tokens of \(e.text.debugDescription)")
            XCTAssertEqual(tok.encode(e.text, addSpecial: true), e.ids_add_special,
                           "\(label): ids+special of \(e.text.debugDescription)")
            XCTAssertEqual(tok.decode(e.ids), e.decoded, "\(label): decode of \(e.text.debugDescription)")
            XCTAssertEqual(tok.decode(e.ids, skipSpecial: true), e.decoded_skip_special,
                           "\(label): decode(skipSpecial) of \(e.text.debugDescription)")
            if !e.text.contains("\u{2581}") {  // a "▁" in the text comes back as a space, as from HF
                XCTAssertEqual(tok.decode(tok.encode(e.text, parseSpecial: false)), e.text,
                               "\(label): round trip of \(e.text.debugDescription)")
            }
            // A continuation keeps the space its first token starts with; streamed, the same text.
            var dec = tok.makeDecoder()
            let streamed = dec.feed(e.ids) + dec.finish()
            XCTAssertEqual(streamed, tok.decode(e.ids, continuation: true), label)
            if let first = e.ids.first, tok.tokenString(first)?.hasPrefix("\u{2581}") == true {
                XCTAssertEqual(streamed, " " + e.decoded, "\(label): continuation of \(e.text.debugDescription)")
            }
        }
    }

    /// A chat request on a Llama-2-style model: the prompt ids are those of
    /// transformers' rendering, encoded by HF tokenizers (GGUF and
    /// tokenizer.json); roles that do not alternate get the template's refusal.
    func testLlama2ChatRequest() throws {
        struct Chats: Decodable {
            struct Chat: Decodable { let messages: [ChatMessage]; let prompt: String; let prompt_ids: [Int32] }
            let chats: [Chat]
        }
        let ref = try load(Chats.self, "tokenizer/llama2-tiny/corpus.json")
        XCTAssertEqual(ref.chats.count, 2)
        for tok in [try BPETokenizer(gguf: GGUFFile(path: Self.llama2Dir.appendingPathComponent("tokenizer.gguf").path)),
                    try BPETokenizer(tokenizerJSON: Self.llama2Dir.appendingPathComponent("tokenizer.json"))] {
            XCTAssertEqual(tok.chatTemplate, .llama2(bos: "<s>", eos: "</s>"))
            XCTAssertEqual(tok.warnings, [])
            for c in ref.chats {
                let body = try JSONSerialization.data(withJSONObject: [
                    "model": "m", "max_tokens": 4,
                    "messages": c.messages.map { ["role": $0.role, "content": $0.content] },
                ] as [String: Any])
                XCTAssertEqual(try OpenAIRequest.chat(body, tokenizer: tok, contextTokens: 2048).promptIds, c.prompt_ids)
            }
            let bad = Data(#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}"#.utf8)
            XCTAssertThrowsError(try OpenAIRequest.chat(bad, tokenizer: tok, contextTokens: 2048)) {
                XCTAssertTrue($0.localizedDescription.contains("must alternate user/assistant"), $0.localizedDescription)
            }
        }
    }

    func testPreTokenizerSplits() {
        XCTAssertEqual(PreTokenizer.gpt2.split("Hello  world's 123\n\n x"),
                       ["Hello", " ", " world", "'s", " 123", "\n\n", " x"])
        XCTAssertEqual(PreTokenizer.smollm.split("a 12 b"), ["a", " ", "1", "2", " b"])
        XCTAssertEqual(PreTokenizer.llama3.split("I'LL pay 12345!\n\n  ok"),
                       ["I", "'LL", " pay", " ", "123", "45", "!\n\n", " ", " ok"])
    }

    // MARK: - Errors

    func testMalformedTokenizerJSONThrows() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-tok-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let pre = #""pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}"#
        let cases: [(String, String)] = [
            ("not json", "{ this is not json"),
            ("array", "[1, 2, 3]"),
            ("no model", "{\(pre)}"),
            ("unigram", #"{"model": {"type": "Unigram", "vocab": [["a", 0.0]]}, \#(pre)}"#),
            ("vocab not a dict", #"{"model": {"type": "BPE", "vocab": [1], "merges": []}, \#(pre)}"#),
            ("negative id", #"{"model": {"type": "BPE", "vocab": {"a": -1}, "merges": []}, \#(pre)}"#),
            ("huge id", #"{"model": {"type": "BPE", "vocab": {"a": 1000000000000}, "merges": []}, \#(pre)}"#),
            ("string id", #"{"model": {"type": "BPE", "vocab": {"a": "0"}, "merges": []}, \#(pre)}"#),
            ("empty vocab", #"{"model": {"type": "BPE", "vocab": {}, "merges": []}, \#(pre)}"#),
            ("no merges", #"{"model": {"type": "BPE", "vocab": {"a": 0}}, \#(pre)}"#),
            ("bad merge", #"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b c"]}, \#(pre)}"#),
            ("bad merge pair", #"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [[1, 2]]}, \#(pre)}"#),
            ("no pre-tokenizer", #"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": null}"#),
            ("bad added", #"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": [{"id": 5}], \#(pre)}"#),
            ("clashing ids", #"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}, "merges": []}, \#(pre)}"#),
        ]
        for (name, body) in cases {
            let url = dir.appendingPathComponent("\(name.replacingOccurrences(of: " ", with: "_")).json")
            try Data(body.utf8).write(to: url)
            XCTAssertThrowsError(try BPETokenizer(tokenizerJSON: url), name) { error in
                XCTAssertTrue(error is TokenizerError, "\(name): \(error)")
                XCTAssertTrue((error as? TokenizerError)?.errorDescription?.contains(url.path) == true, "\(name): \(error)")
            }
        }
        XCTAssertThrowsError(try BPETokenizer(tokenizerJSON: dir.appendingPathComponent("missing.json")))

        // A minimal valid file loads.
        let ok = dir.appendingPathComponent("ok.json")
        try Data(#"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}, \#(pre)}"#.utf8).write(to: ok)
        let tok = try BPETokenizer(tokenizerJSON: ok)
        XCTAssertEqual(tok.encode("abba"), [2, 1, 0])
        XCTAssertEqual(tok.decode([2, 1, 0]), "abba")
    }

    func testGGUFWithNonBPETokenizerThrowsNamingTheKey() throws {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-tok-\(UUID().uuidString).gguf")
        defer { try? FileManager.default.removeItem(at: url) }
        var d = Data()
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { d.append(contentsOf: $0) } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { d.append(contentsOf: $0) } }
        func str(_ s: String) { u64(UInt64(s.utf8.count)); d.append(contentsOf: Array(s.utf8)) }
        u32(0x4655_4747); u32(3); u64(0); u64(1)
        str("tokenizer.ggml.model"); u32(8); str("bert")
        d.append(contentsOf: [UInt8](repeating: 0, count: 64))
        try d.write(to: url)
        let gguf = try GGUFFile(path: url.path)
        XCTAssertThrowsError(try BPETokenizer(gguf: gguf)) { error in
            XCTAssertEqual(error as? TokenizerError, .unsupported(source: url.path, key: "tokenizer.ggml.model",
                value: "bert", hint: "only byte-level BPE ('gpt2') and SentencePiece BPE ('llama') tokenizers are supported"))
            XCTAssertTrue("\(error.localizedDescription)".contains("tokenizer.ggml.model"))
        }
    }

    /// A SentencePiece GGUF without usable scores is refused, naming the key.
    func testSentencePieceGGUFWithoutScoresThrows() throws {
        func gguf(_ scores: [Float]?, extra: (String, Bool)? = nil) throws -> GGUFFile {
            let url = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-spm-\(UUID().uuidString).gguf")
            addTeardownBlock { try? FileManager.default.removeItem(at: url) }
            var d = Data()
            func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { d.append(contentsOf: $0) } }
            func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { d.append(contentsOf: $0) } }
            func str(_ s: String) { u64(UInt64(s.utf8.count)); d.append(contentsOf: Array(s.utf8)) }
            let tokens = ["<unk>", "<s>", "</s>", "\u{2581}", "a", "\u{2581}a"]
            u32(0x4655_4747); u32(3); u64(0); u64(UInt64(2 + (scores == nil ? 0 : 1) + (extra == nil ? 0 : 1)))
            str("tokenizer.ggml.model"); u32(8); str("llama")
            str("tokenizer.ggml.tokens"); u32(9); u32(8); u64(UInt64(tokens.count)); tokens.forEach(str)
            if let scores {
                str("tokenizer.ggml.scores"); u32(9); u32(6); u64(UInt64(scores.count))
                for x in scores { withUnsafeBytes(of: x.bitPattern.littleEndian) { d.append(contentsOf: $0) } }
            }
            if let (key, value) = extra { str(key); u32(7); d.append(value ? 1 : 0) }
            d.append(contentsOf: [UInt8](repeating: 0, count: 64))
            try d.write(to: url)
            return try GGUFFile(path: url.path)
        }
        XCTAssertThrowsError(try BPETokenizer(gguf: gguf(nil))) {
            XCTAssertTrue($0.localizedDescription.contains("tokenizer is missing 'tokenizer.ggml.scores'"), $0.localizedDescription)
        }
        XCTAssertThrowsError(try BPETokenizer(gguf: gguf([0, 0]))) {
            XCTAssertTrue($0.localizedDescription.contains("has 2 entries for 6 tokens"), $0.localizedDescription)
        }
        XCTAssertThrowsError(try BPETokenizer(gguf: gguf([0, 0, 0, -1, -2, .nan]))) {
            XCTAssertTrue($0.localizedDescription.contains("not finite"), $0.localizedDescription)
        }
        XCTAssertThrowsError(try BPETokenizer(gguf: gguf([0, 0, 0, -1, -2, -3], extra: ("tokenizer.ggml.remove_extra_whitespaces", true)))) {
            XCTAssertTrue($0.localizedDescription.contains("remove_extra_whitespaces"), $0.localizedDescription)
        }
        // The same file with scores loads and merges "▁" + "a"; no <0xXX> tokens means unknown characters become <unk>.
        let tok = try BPETokenizer(gguf: gguf([0, 0, 0, -1, -2, -3]))
        XCTAssertEqual(tok.encode("a a", addSpecial: true), [1, 5, 5])
        XCTAssertEqual(tok.encode("aé"), [5, 0])
        XCTAssertTrue(tok.warnings.contains { $0.contains("byte-fallback tokens") }, "\(tok.warnings)")
    }

    // MARK: - Concurrency

    func testConcurrentEncodeIsConsistent() throws {
        let tok = try jsonTokenizer()
        let corpus = try load(SmolCorpus.self, "smollm2/tokenizer_corpus.json")
        let expected = corpus.corpus.map(\.ids)
        let texts = corpus.corpus.map(\.text)
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for (t, ids) in zip(texts, expected) where tok.encode(t) != ids {
                XCTFail("concurrent encode differs for \(t.debugDescription)")
            }
        }
    }
}
