import Foundation

extension BPETokenizer {
    /// Reads a Hugging Face `tokenizer.json` (model type BPE with a ByteLevel
    /// pre-tokenizer, as SmolLM2, Llama 3 and Qwen2 ship, or with
    /// `byte_fallback` and a "▁" normalizer or Metaspace pre-tokenizer, as
    /// Llama 2 and Mistral ship) and, when present beside it,
    /// `tokenizer_config.json` for the chat template and bos/eos.
    public convenience init(tokenizerJSON url: URL) throws {
        let source = url.path
        let root = try Self.readJSONObject(url, source: source)
        var warnings: [String] = []

        guard let model = root["model"] as? [String: Any] else {
            throw TokenizerError.missingKey(source: source, key: "model")
        }
        let modelType = model["type"] as? String ?? "BPE"
        guard modelType == "BPE" else {
            throw TokenizerError.unsupported(source: source, key: "model.type", value: modelType,
                hint: "only byte-level BPE tokenizers are supported")
        }
        let isSentencePiece = model["byte_fallback"] as? Bool == true
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let v = model[key] as? String, !v.isEmpty {
                throw TokenizerError.unsupported(source: source, key: "model.\(key)", value: v,
                    hint: "only plain byte-level BPE is supported")
            }
        }
        guard let vocabJSON = model["vocab"] as? [String: Any] else {
            throw TokenizerError.missingKey(source: source, key: "model.vocab")
        }
        let maxID = 1 << 24
        func tokenID(_ v: Any?, _ what: String) throws -> Int {
            guard let i = v as? Int, i >= 0, i < maxID else {
                throw TokenizerError.malformed(source: source, reason: "\(what) is not a token id below \(maxID)")
            }
            return i
        }
        var pairs: [(String, Int)] = []
        pairs.reserveCapacity(vocabJSON.count)
        for (token, v) in vocabJSON { pairs.append((token, try tokenID(v, "model.vocab[\"\(token)\"]"))) }

        struct Added { let id: Int; let content: String; let special: Bool }
        var added: [Added] = []
        if let list = root["added_tokens"] {
            guard let list = list as? [[String: Any]] else {
                throw TokenizerError.malformed(source: source, reason: "'added_tokens' is not a list of objects")
            }
            for (n, t) in list.enumerated() {
                guard let content = t["content"] as? String, !content.isEmpty else {
                    throw TokenizerError.malformed(source: source, reason: "added_tokens[\(n)] has no 'content'")
                }
                let id = try tokenID(t["id"], "added_tokens[\(n)].id")
                added.append(Added(id: id, content: content, special: t["special"] as? Bool ?? false))
                for flag in ["lstrip", "rstrip", "single_word"] where t[flag] as? Bool == true {
                    warnings.append("added token '\(content)' has '\(flag)' set, which is ignored")
                }
            }
        }

        let count = max(pairs.map(\.1).max() ?? -1, added.map(\.id).max() ?? -1) + 1
        guard count > 0 else { throw TokenizerError.malformed(source: source, reason: "'model.vocab' is empty") }
        var tokens = [String?](repeating: nil, count: count)
        var kinds = [TokenKind](repeating: .normal, count: count)
        for (t, i) in pairs {
            if let existing = tokens[i], existing != t {
                throw TokenizerError.malformed(source: source, reason: "id \(i) is both '\(existing)' and '\(t)' in model.vocab")
            }
            tokens[i] = t
        }
        for a in added {
            tokens[a.id] = a.content
            kinds[a.id] = a.special ? .control : .userDefined
        }

        var merges: [(String, String)] = []
        guard let mergeList = model["merges"] as? [Any] else {
            throw TokenizerError.missingKey(source: source, key: "model.merges")
        }
        merges.reserveCapacity(mergeList.count)
        for (n, m) in mergeList.enumerated() {
            if let line = m as? String {
                let parts = line.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 2 else {
                    throw TokenizerError.malformed(source: source, reason: "model.merges[\(n)] '\(line)' is not two tokens")
                }
                merges.append((String(parts[0]), String(parts[1])))
            } else if let pair = m as? [Any], pair.count == 2, let a = pair[0] as? String, let b = pair[1] as? String {
                merges.append((a, b))
            } else {
                throw TokenizerError.malformed(source: source, reason: "model.merges[\(n)] is neither \"a b\" nor [a, b]")
            }
        }

        var vocab: [String: Int32] = [:]
        for (i, t) in tokens.enumerated() { if let t, vocab[t] == nil { vocab[t] = Int32(i) } }
        func lookup(_ name: String?) -> Int32? { name.flatMap { vocab[$0] } }

        var spec: Spec
        if isSentencePiece {
            let prefix = try Self.sentencePiecePrefix(normalizer: root["normalizer"], preTokenizer: root["pre_tokenizer"],
                                                      source: source)
            spec = Spec(source: source, tokens: tokens, kinds: kinds, merges: merges, preTokenizer: .gpt2)
            spec.sentencePiece = SentencePiece(spacePrefix: prefix, scores: nil,
                                               unkId: lookup(model["unk_token"] as? String))
        } else {
            let (pre, addPrefixSpace) = try Self.preTokenizer(root["pre_tokenizer"], source: source, warnings: &warnings)
            if let norm = root["normalizer"], !(norm is NSNull) {
                warnings.append("normalizer \(Self.describe(norm)) is ignored")
            }
            if let dec = root["decoder"] as? [String: Any], dec["type"] as? String != "ByteLevel" {
                warnings.append("decoder \(Self.describe(dec)) is treated as ByteLevel")
            }
            spec = Spec(source: source, tokens: tokens, kinds: kinds, merges: merges, preTokenizer: pre)
            spec.addPrefixSpace = addPrefixSpace
        }
        spec.ignoreMerges = model["ignore_merges"] as? Bool ?? false

        // Post-processor: the ids addSpecial puts around the text.
        var hasTemplate = false
        if let post = root["post_processor"] as? [String: Any] {
            let steps = post["type"] as? String == "Sequence" ? (post["processors"] as? [[String: Any]] ?? []) : [post]
            for step in steps {
                switch step["type"] as? String {
                case "TemplateProcessing":
                    hasTemplate = true
                    (spec.prefixIds, spec.suffixIds) = try Self.template(step, source: source)
                case "ByteLevel": break
                default: warnings.append("post-processor \(Self.describe(step)) is ignored")
                }
            }
        }

        // tokenizer_config.json: chat template, bos/eos names, add_bos/add_eos.
        let configURL = url.deletingLastPathComponent().appendingPathComponent("tokenizer_config.json")
        var config: [String: Any] = [:]
        if FileManager.default.fileExists(atPath: configURL.path) {
            config = try Self.readJSONObject(configURL, source: configURL.path)
        }
        func tokenName(_ key: String) -> String? {
            if let s = config[key] as? String { return s }
            if let d = config[key] as? [String: Any] { return d["content"] as? String }
            return nil
        }
        spec.bosId = lookup(tokenName("bos_token"))
            ?? ["<|begin_of_text|>", "<s>", "<|startoftext|>"].lazy.compactMap { vocab[$0] }.first
        spec.eosId = lookup(tokenName("eos_token"))
            ?? ["<|end_of_text|>", "</s>", "<|endoftext|>"].lazy.compactMap { vocab[$0] }.first
        spec.padId = lookup(tokenName("pad_token"))
        if !hasTemplate {
            if config["add_bos_token"] as? Bool == true, let b = spec.bosId { spec.prefixIds = [b] }
            if config["add_eos_token"] as? Bool == true, let e = spec.eosId { spec.suffixIds = [e] }
        }
        if let t = config["chat_template"] as? String {
            spec.chatTemplate = t
        } else if let list = config["chat_template"] as? [[String: Any]] {
            spec.chatTemplate = (list.first { $0["name"] as? String == "default" } ?? list.first)?["template"] as? String
        }
        spec.warnings = warnings
        try self.init(spec: spec)
    }

    private static func readJSONObject(_ url: URL, source: String) throws -> [String: Any] {
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw TokenizerError.malformed(source: source, reason: "cannot read file: \(error.localizedDescription)")
        }
        let object: Any
        do {
            object = try JSONSerialization.jsonObject(with: data)
        } catch {
            throw TokenizerError.malformed(source: source, reason: "not valid JSON (\(error.localizedDescription))")
        }
        guard let dict = object as? [String: Any] else {
            throw TokenizerError.malformed(source: source, reason: "top level is not a JSON object")
        }
        return dict
    }

    private static func describe(_ v: Any) -> String {
        if let d = v as? [String: Any], let t = d["type"] as? String { return "'\(t)'" }
        return "'\(v)'"
    }

    /// Where a SentencePiece-style tokenizer.json puts "▁": Llama 2's legacy
    /// normalizer (Prepend("▁") then Replace(" ", "▁"), each segment) or a
    /// Metaspace pre-tokenizer (Mistral, newer Llama 2 conversions). Anything
    /// else would tokenize differently, so it is refused by name.
    private static func sentencePiecePrefix(normalizer: Any?, preTokenizer: Any?, source: String) throws -> SpacePrefix {
        func steps(_ v: Any?, _ listKey: String) -> [[String: Any]]? {
            guard let node = v as? [String: Any] else { return v == nil || v is NSNull ? [] : nil }
            return node["type"] as? String == "Sequence" ? node[listKey] as? [[String: Any]] : [node]
        }
        guard let norm = steps(normalizer, "normalizers"), let pre = steps(preTokenizer, "pretokenizers") else {
            throw TokenizerError.malformed(source: source, reason: "'normalizer' or 'pre_tokenizer' is not an object")
        }
        func isSpaceToMeta(_ n: [String: Any]) -> Bool {
            n["type"] as? String == "Replace" && (n["pattern"] as? [String: Any])?["String"] as? String == " "
                && n["content"] as? String == "\u{2581}"
        }
        let types = norm.compactMap { $0["type"] as? String }
        switch (types, pre.count) {
        case (["Prepend", "Replace"], 0) where norm[0]["prepend"] as? String == "\u{2581}" && isSpaceToMeta(norm[1]):
            return .everySegment
        case (["Replace"], 0) where isSpaceToMeta(norm[0]):
            return .none
        case ([], 1) where pre[0]["type"] as? String == "Metaspace":
            let m = pre[0]
            guard m["replacement"] as? String ?? "\u{2581}" == "\u{2581}", m["split"] as? Bool != true else {
                throw TokenizerError.unsupported(source: source, key: "pre_tokenizer", value: describe(m),
                    hint: "only a Metaspace with replacement '▁' and split false is supported")
            }
            switch m["prepend_scheme"] as? String ?? ((m["add_prefix_space"] as? Bool ?? true) ? "always" : "never") {
            case "first": return .firstUnspacedSegment
            case "always": return .everyUnspacedSegment
            case "never": return .none
            case let other:
                throw TokenizerError.unsupported(source: source, key: "pre_tokenizer.prepend_scheme", value: other,
                    hint: "expected first, always or never")
            }
        default:
            throw TokenizerError.unsupported(source: source, key: "normalizer",
                value: "[\(types.joined(separator: ", "))] with pre_tokenizer [\(pre.compactMap { $0["type"] as? String }.joined(separator: ", "))]",
                hint: "a byte-fallback BPE needs Prepend('▁') + Replace(' ', '▁'), or a Metaspace pre-tokenizer")
        }
    }

    /// Recognises the pre-tokenizer configurations byte-level BPE models ship.
    private static func preTokenizer(_ v: Any?, source: String,
                                     warnings: inout [String]) throws -> (PreTokenizer, Bool) {
        guard let node = v as? [String: Any], let type = node["type"] as? String else {
            throw TokenizerError.unsupported(source: source, key: "pre_tokenizer", value: "null",
                hint: "byte-level BPE needs a ByteLevel pre-tokenizer")
        }
        let steps = type == "Sequence" ? (node["pretokenizers"] as? [[String: Any]] ?? []) : [node]
        guard let byteLevel = steps.last, byteLevel["type"] as? String == "ByteLevel" else {
            throw TokenizerError.unsupported(source: source, key: "pre_tokenizer", value: describe(node),
                hint: "byte-level BPE needs a ByteLevel pre-tokenizer as its last step")
        }
        let useRegex = byteLevel["use_regex"] as? Bool ?? true
        let prefixSpace = byteLevel["add_prefix_space"] as? Bool ?? false
        let before = steps.dropLast()
        if prefixSpace && !before.isEmpty {
            // HF would add the space to every piece the earlier steps produce.
            throw TokenizerError.unsupported(source: source, key: "pre_tokenizer.pretokenizers[ByteLevel].add_prefix_space",
                value: "true", hint: "only supported when ByteLevel is the whole pre-tokenizer")
        }
        if before.isEmpty && useRegex { return (.gpt2, prefixSpace) }
        if before.count == 1, let first = before.first {
            switch first["type"] as? String {
            case "Digits" where useRegex && first["individual_digits"] as? Bool == true:
                return (.smollm, prefixSpace)
            case "Split" where !useRegex:
                let pattern = (first["pattern"] as? [String: Any])?["Regex"] as? String
                let isolated = first["behavior"] as? String == "Isolated" && first["invert"] as? Bool != true
                if isolated {
                    switch pattern {
                    case PreTokenizer.llama3Pattern: return (.llama3, prefixSpace)
                    case PreTokenizer.qwen2Pattern: return (.qwen2, prefixSpace)
                    case PreTokenizer.gpt2Pattern: return (.gpt2, prefixSpace)
                    default: break
                    }
                }
            default: break
            }
        }
        let names = steps.compactMap { $0["type"] as? String }.joined(separator: ", ")
        warnings.append("unknown pre-tokenizer [\(names)]; using GPT-2's regex")
        return (.gpt2, prefixSpace)
    }

    /// Ids before and after sequence A in a TemplateProcessing "single" template.
    private static func template(_ node: [String: Any], source: String) throws -> ([Int32], [Int32]) {
        guard let single = node["single"] as? [[String: Any]] else {
            throw TokenizerError.malformed(source: source, reason: "post_processor TemplateProcessing has no 'single'")
        }
        let specials = node["special_tokens"] as? [String: Any] ?? [:]
        var prefix: [Int32] = [], suffix: [Int32] = []
        var seenSequence = false
        for item in single {
            if item["Sequence"] != nil { seenSequence = true; continue }
            guard let st = item["SpecialToken"] as? [String: Any], let name = st["id"] as? String,
                  let entry = specials[name] as? [String: Any], let ids = entry["ids"] as? [Int],
                  ids.allSatisfy({ $0 >= 0 && $0 <= Int(Int32.max) }) else {
                throw TokenizerError.malformed(source: source, reason: "post_processor template item \(item) is not understood")
            }
            if seenSequence { suffix += ids.map(Int32.init) } else { prefix += ids.map(Int32.init) }
        }
        return (prefix, suffix)
    }
}
