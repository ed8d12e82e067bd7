import Foundation

extension BPETokenizer {
    /// Reads the tokenizer from GGUF metadata (`tokenizer.ggml.*`,
    /// `tokenizer.chat_template`): byte-level BPE (`tokenizer.ggml.model` =
    /// "gpt2") or SentencePiece BPE ("llama": scores, byte-fallback tokens,
    /// `add_space_prefix`), read as llama.cpp reads them.
    public convenience init(gguf: GGUFFile) throws {
        let source = gguf.path
        let meta = gguf.metadata
        guard let model = meta["tokenizer.ggml.model"]?.stringValue else {
            throw TokenizerError.missingKey(source: source, key: "tokenizer.ggml.model")
        }
        guard model == "gpt2" || model == "llama" else {
            throw TokenizerError.unsupported(source: source, key: "tokenizer.ggml.model", value: model,
                hint: "only byte-level BPE ('gpt2') and SentencePiece BPE ('llama') tokenizers are supported")
        }
        let isSentencePiece = model == "llama"
        func strings(_ key: String) throws -> [String] {
            guard let a = meta[key]?.arrayValue else { throw TokenizerError.missingKey(source: source, key: key) }
            return try a.map {
                guard let s = $0.stringValue else {
                    throw TokenizerError.malformed(source: source, reason: "'\(key)' is not an array of strings")
                }
                return s
            }
        }
        func optionalID(_ key: String) throws -> Int32? { try Self.tokenID(gguf, key) }
        func flag(_ key: String) -> Bool? { meta[key]?.boolValue }

        let tokens = try strings("tokenizer.ggml.tokens")
        // SentencePiece vocabularies merge by score; llama.cpp ignores merges there too.
        let mergeLines = isSentencePiece ? [] : try strings("tokenizer.ggml.merges")
        var kinds = [TokenKind](repeating: .normal, count: tokens.count)
        if let types = meta["tokenizer.ggml.token_type"]?.arrayValue {
            guard types.count == tokens.count else {
                throw TokenizerError.malformed(source: source,
                    reason: "'tokenizer.ggml.token_type' has \(types.count) entries for \(tokens.count) tokens")
            }
            for (i, t) in types.enumerated() {
                // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
                switch t.intValue {
                case 2, 3: kinds[i] = .control
                case 4: kinds[i] = .userDefined
                case 5: kinds[i] = .unused
                case 6 where isSentencePiece: kinds[i] = .byte
                default: kinds[i] = .normal
                }
            }
        }
        var merges: [(String, String)] = []
        merges.reserveCapacity(mergeLines.count)
        for (n, line) in mergeLines.enumerated() {
            // Split at the first space after the first character, as llama.cpp does.
            let u = line.unicodeScalars
            guard let space = u.dropFirst().firstIndex(of: " ") else {
                throw TokenizerError.malformed(source: source,
                    reason: "merge \(n) in 'tokenizer.ggml.merges' is not two tokens separated by a space")
            }
            merges.append((String(u[..<space]), String(u[u.index(after: space)...])))
        }

        if isSentencePiece {
            try self.init(sentencePieceGGUF: gguf, tokens: tokens, kinds: kinds)
            return
        }
        var warnings: [String] = []
        let preName = meta["tokenizer.ggml.pre"]?.stringValue ?? "default"
        var pre = PreTokenizer.fromGGUFName(preName)
        if pre == nil {
            warnings.append("unknown pre-tokenizer 'tokenizer.ggml.pre' = '\(preName)'; using GPT-2's regex")
            pre = .gpt2
        } else if preName == "default" {
            warnings.append("pre-tokenizer 'default' approximated by GPT-2's regex")
        }

        var spec = Spec(source: source, tokens: tokens, kinds: kinds, merges: merges, preTokenizer: pre!)
        let llamaBPE = PreTokenizer.llamaBPENames.contains(preName)
        spec.ignoreMerges = llamaBPE
        spec.bosId = try optionalID("tokenizer.ggml.bos_token_id")
        spec.eosId = try optionalID("tokenizer.ggml.eos_token_id")
        spec.padId = try optionalID("tokenizer.ggml.padding_token_id")
        spec.extraEOT = [try optionalID("tokenizer.ggml.eot_token_id"),
                         try optionalID("tokenizer.ggml.eom_token_id")].compactMap { $0 }
        if flag("tokenizer.ggml.add_bos_token") ?? llamaBPE {
            guard let bos = spec.bosId else { throw TokenizerError.missingKey(source: source, key: "tokenizer.ggml.bos_token_id") }
            spec.prefixIds = [bos]
        }
        if flag("tokenizer.ggml.add_eos_token") == true {
            guard let eos = spec.eosId else { throw TokenizerError.missingKey(source: source, key: "tokenizer.ggml.eos_token_id") }
            spec.suffixIds = [eos]
        }
        spec.chatTemplate = meta["tokenizer.chat_template"]?.stringValue
        spec.warnings = warnings
        try self.init(spec: spec)
    }

    /// The token id under `key`, nil when the key is absent.
    private static func tokenID(_ gguf: GGUFFile, _ key: String) throws -> Int32? {
        guard let v = gguf.metadata[key] else { return nil }
        guard let i = v.intValue, i >= 0, i <= Int(Int32.max) else {
            throw TokenizerError.malformed(source: gguf.path, reason: "'\(key)' is not a token id")
        }
        return Int32(i)
    }

    /// The "llama" (SentencePiece BPE) half of `init(gguf:)`, with llama.cpp's
    /// defaults: BOS added, "▁" before the text, <unk>/<s>/</s> at 0/1/2.
    private convenience init(sentencePieceGGUF gguf: GGUFFile, tokens: [String], kinds: [TokenKind]) throws {
        let source = gguf.path
        let meta = gguf.metadata
        guard let list = meta["tokenizer.ggml.scores"]?.arrayValue else {
            throw TokenizerError.missingKey(source: source, key: "tokenizer.ggml.scores")
        }
        let scores = try list.map { v -> Float in
            guard let x = v.doubleValue else {
                throw TokenizerError.malformed(source: source, reason: "'tokenizer.ggml.scores' is not an array of numbers")
            }
            return Float(x)
        }
        if meta["tokenizer.ggml.remove_extra_whitespaces"]?.boolValue == true {
            throw TokenizerError.unsupported(source: source, key: "tokenizer.ggml.remove_extra_whitespaces", value: "true",
                hint: "SentencePiece's whitespace folding is not implemented")
        }
        if meta["tokenizer.ggml.precompiled_charsmap"] != nil {
            throw TokenizerError.unsupported(source: source, key: "tokenizer.ggml.precompiled_charsmap", value: "present",
                hint: "SentencePiece normalization rules are not implemented")
        }
        func id(_ key: String, default value: Int32?) throws -> Int32? { try Self.tokenID(gguf, key) ?? value }
        let prefix = meta["tokenizer.ggml.add_space_prefix"]?.boolValue ?? true
        var spec = Spec(source: source, tokens: tokens, kinds: kinds, merges: [], preTokenizer: .gpt2)
        spec.sentencePiece = SentencePiece(spacePrefix: prefix ? .everySegment : .none, scores: scores,
                                           unkId: try id("tokenizer.ggml.unknown_token_id", default: 0))
        spec.bosId = try id("tokenizer.ggml.bos_token_id", default: 1)
        spec.eosId = try id("tokenizer.ggml.eos_token_id", default: 2)
        spec.padId = try id("tokenizer.ggml.padding_token_id", default: nil)
        spec.extraEOT = [try id("tokenizer.ggml.eot_token_id", default: nil),
                         try id("tokenizer.ggml.eom_token_id", default: nil)].compactMap { $0 }
        if meta["tokenizer.ggml.add_bos_token"]?.boolValue ?? true, let bos = spec.bosId { spec.prefixIds = [bos] }
        if meta["tokenizer.ggml.add_eos_token"]?.boolValue == true, let eos = spec.eosId { spec.suffixIds = [eos] }
        spec.chatTemplate = meta["tokenizer.chat_template"]?.stringValue
        try self.init(spec: spec)
    }
}
