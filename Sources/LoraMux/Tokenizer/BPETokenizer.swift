import Foundation

/// BPE tokenizer of the two kinds Llama-family models ship: byte-level BPE
/// (GPT-2 style: SmolLM2, Llama 3, Qwen2) and SentencePiece BPE with byte
/// fallback (Llama 2, Mistral, TinyLlama). Built from GGUF metadata
/// (`init(gguf:)`) or a Hugging Face `tokenizer.json` (`init(tokenizerJSON:)`);
/// both give identical ids for the same vocabulary.
///
/// Encoding: added tokens (control and user-defined) are matched first as
/// whole strings, leftmost-longest, like HF's added tokens. Byte-level: the
/// text between them is cut by the `PreTokenizer`; each piece's UTF-8 bytes
/// are mapped to byte tokens and merged by rank. SentencePiece: each segment
/// between them becomes "▁" + the text with spaces as "▁", one symbol per
/// character (a character without a token becomes its bytes' `<0xXX>`
/// tokens), merged by rank. Results per piece are cached.
///
/// Immutable after init except for the lock-protected piece cache, so one
/// instance can be shared across threads.
public final class BPETokenizer: Sendable {
    /// Where the tokenizer came from (file path), for messages.
    public let source: String
    public let preTokenizer: PreTokenizer
    /// Number of ids (embedding rows), including added tokens.
    public let vocabSize: Int
    public let bosId: Int32?
    public let eosId: Int32?
    public let padId: Int32?
    /// Ids that end an assistant turn: eos plus end-of-turn control tokens
    /// the vocabulary has (`<|im_end|>`, `<|eot_id|>`, `<|end_of_text|>`, …).
    public let eotIds: Set<Int32>
    /// Ids `encode(_:addSpecial: true)` puts before / after the text.
    public let prefixIds: [Int32]
    public let suffixIds: [Int32]
    /// The model's chat template text (Jinja), if it has one.
    public let chatTemplateSource: String?
    /// The chat template recognised from `chatTemplateSource`, if any.
    public let chatTemplate: ChatTemplate?
    /// Things that were accepted but approximated (e.g. an unknown
    /// pre-tokenizer name replaced by GPT-2's regex).
    public let warnings: [String]

    /// id → vocabulary spelling (byte-mapped for normal tokens).
    let tokens: [String]
    let vocab: [String: Int32]
    let kinds: [TokenKind]
    /// Decoded bytes of every id: `tokenBytes[byteOffsets[i]..<byteOffsets[i+1]]`.
    let tokenBytes: [UInt8]
    let byteOffsets: [Int32]
    /// byte → id of its single-byte token, or -1.
    let byteIds: [Int32]
    let merges: MergeTable
    let ignoreMerges: Bool
    let addPrefixSpace: Bool
    let specials: SpecialMatcher
    let cache = PieceCache(limit: 50_000)

    enum TokenKind: UInt8, Sendable {
        case normal
        /// Control / special: matched in text, skipped by `skipSpecial`.
        case control
        /// Added but not special: matched in text, always decoded.
        case userDefined
        /// Listed by the vocabulary but never produced (unused or unknown).
        case unused
        /// SentencePiece byte-fallback token (`<0xXX>`): decodes to that byte.
        case byte
    }

    /// How a SentencePiece tokenizer puts "▁" before the text.
    enum SpacePrefix: Sendable {
        case none
        /// Before every segment that starts the text or follows an added
        /// token (HF's legacy Prepend normalizer; llama.cpp's add_space_prefix).
        case everySegment
        /// Before every segment that does not already start with a space
        /// (HF's Metaspace, prepend_scheme "always").
        case everyUnspacedSegment
        /// Before the text's first segment, when the text starts neither with
        /// an added token nor with a space (HF's Metaspace, prepend_scheme "first").
        case firstUnspacedSegment
    }

    /// What a SentencePiece BPE model adds to the spec.
    struct SentencePiece {
        var spacePrefix: SpacePrefix
        /// GGUF's piece scores: merges are every split of a piece into two
        /// pieces, the higher score first (SentencePiece's own order), when
        /// the file lists no merges.
        var scores: [Float]?
        var unkId: Int32?
    }

    /// Everything a tokenizer is built from, whatever the file format.
    struct Spec {
        var source: String
        /// id → spelling; nil for ids the file does not define.
        var tokens: [String?]
        var kinds: [TokenKind]
        var merges: [(String, String)]
        var preTokenizer: PreTokenizer
        var ignoreMerges = false
        var addPrefixSpace = false
        var bosId: Int32?
        var eosId: Int32?
        var padId: Int32?
        var extraEOT: [Int32] = []
        var prefixIds: [Int32] = []
        var suffixIds: [Int32] = []
        var chatTemplate: String?
        var warnings: [String] = []
        var sentencePiece: SentencePiece?
    }

    /// Set for SentencePiece BPE vocabularies.
    let sentencePiece: SentencePieceState?

    struct SentencePieceState: Sendable {
        let spacePrefix: SpacePrefix
        let unkId: Int32?
        /// Unicode scalar → id of its single-character normal token.
        let charIds: [UInt32: Int32]
    }

    init(spec: Spec) throws {
        source = spec.source
        preTokenizer = spec.preTokenizer
        ignoreMerges = spec.ignoreMerges
        addPrefixSpace = spec.addPrefixSpace
        guard !spec.tokens.isEmpty, spec.tokens.count == spec.kinds.count else {
            throw TokenizerError.malformed(source: spec.source, reason: "empty vocabulary")
        }
        vocabSize = spec.tokens.count
        var warnings = spec.warnings

        var toks: [String] = []
        toks.reserveCapacity(spec.tokens.count)
        var vocab: [String: Int32] = [:]
        vocab.reserveCapacity(spec.tokens.count)
        var kinds = spec.kinds
        if spec.sentencePiece == nil, kinds.contains(.byte) {
            throw TokenizerError.malformed(source: spec.source, reason: "byte tokens in a byte-level BPE vocabulary")
        }
        for (i, t) in spec.tokens.enumerated() {
            guard let t else {
                toks.append("")
                kinds[i] = .unused
                continue
            }
            toks.append(t)
            // First id wins for a spelling listed twice (as HF's vocab map would keep one).
            if vocab[t] == nil { vocab[t] = Int32(i) }
        }
        tokens = toks
        self.vocab = vocab

        func check(_ id: Int32?, _ what: String) throws -> Int32? {
            guard let id else { return nil }
            guard id >= 0, Int(id) < toks.count else {
                throw TokenizerError.malformed(source: spec.source,
                    reason: "\(what) id \(id) is outside the vocabulary of \(toks.count)")
            }
            return id
        }
        bosId = try check(spec.bosId, "bos")
        eosId = try check(spec.eosId, "eos")
        padId = try check(spec.padId, "padding")
        prefixIds = try spec.prefixIds.map { try check($0, "post-processor")! }
        suffixIds = try spec.suffixIds.map { try check($0, "post-processor")! }

        var eot = Set<Int32>()
        if let e = eosId { eot.insert(e) }
        for id in spec.extraEOT { if let c = try check(id, "end-of-turn") { eot.insert(c) } }
        for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>",
                     "<end_of_turn>", "<|end|>"] {
            if let id = vocab[name], kinds[Int(id)] == .control { eot.insert(id) }
        }
        eotIds = eot

        // Decoded bytes per id.
        var bytes: [UInt8] = []
        var offsets: [Int32] = [0]
        offsets.reserveCapacity(toks.count + 1)
        var byteIds = [Int32](repeating: -1, count: 256)
        if let sp = spec.sentencePiece {
            // Byte-fallback pieces are spelled <0xXX>; a tokenizer.json marks them no other way.
            for (i, t) in toks.enumerated() where kinds[i] == .normal || kinds[i] == .byte {
                if let b = Self.fallbackByte(t) {
                    kinds[i] = .byte
                    if byteIds[Int(b)] < 0 { byteIds[Int(b)] = Int32(i) }
                } else if kinds[i] == .byte {
                    kinds[i] = .unused
                }
            }
            for (i, t) in toks.enumerated() {
                switch kinds[i] {
                case .byte: bytes.append(Self.fallbackByte(t)!)
                case .control: bytes.append(contentsOf: Array(t.utf8))
                default:
                    // "▁" (E2 96 81) is a space.
                    let u = Array(t.utf8)
                    var k = 0
                    while k < u.count {
                        if k + 2 < u.count && u[k] == 0xE2 && u[k + 1] == 0x96 && u[k + 2] == 0x81 {
                            bytes.append(0x20)
                            k += 3
                        } else {
                            bytes.append(u[k])
                            k += 1
                        }
                    }
                }
                offsets.append(Int32(bytes.count))
            }
            var charIds: [UInt32: Int32] = [:]
            for (i, t) in toks.enumerated() where kinds[i] == .normal {
                let u = t.unicodeScalars
                if u.count == 1, charIds[u.first!.value] == nil { charIds[u.first!.value] = Int32(i) }
            }
            let unk = try check(sp.unkId, "unknown-token")
            let missing = byteIds.filter { $0 < 0 }.count
            if missing > 0 {
                warnings.append("\(missing) of the 256 byte-fallback tokens <0xXX> are missing: characters that need them "
                    + (unk != nil ? "encode as the unknown token" : "are dropped"))
            }
            sentencePiece = SentencePieceState(spacePrefix: sp.spacePrefix, unkId: unk, charIds: charIds)
        } else {
            for (i, t) in toks.enumerated() {
                if kinds[i] == .normal, let b = ByteLevel.decode(t) {
                    bytes.append(contentsOf: b)
                } else {
                    bytes.append(contentsOf: Array(t.utf8))
                }
                offsets.append(Int32(bytes.count))
            }
            var missingBytes: [String] = []
            for b in 0..<256 {
                let spelling = String(Unicode.Scalar(ByteLevel.byteToScalar[b])!)
                if let id = vocab[spelling] {
                    byteIds[b] = id
                } else if b != 0xC0 && b != 0xC1 && b < 0xF5 {  // bytes valid UTF-8 can contain
                    missingBytes.append(String(format: "0x%02X", b))
                }
            }
            if !missingBytes.isEmpty {
                warnings.append("no token for byte(s) \(missingBytes.joined(separator: " ")): "
                    + "encoding drops them, as Hugging Face tokenizers does")
            }
            sentencePiece = nil
        }
        self.kinds = kinds
        tokenBytes = bytes
        byteOffsets = offsets
        self.byteIds = byteIds

        if let scores = spec.sentencePiece?.scores, spec.merges.isEmpty {
            merges = try Self.mergesFromScores(scores, tokens: toks, kinds: kinds, source: spec.source)
        } else {
            var table = MergeTable(capacity: spec.merges.count)
            var skipped = 0
            for (rank, (a, b)) in spec.merges.enumerated() {
                guard let ia = vocab[a], let ib = vocab[b], let im = vocab[a + b] else { skipped += 1; continue }
                table.insert(left: ia, right: ib, rank: Int32(rank), merged: im)
            }
            if skipped > 0 { warnings.append("\(skipped) merges name tokens outside the vocabulary and were skipped") }
            merges = table
        }

        specials = SpecialMatcher(tokens: toks.indices.compactMap { i in
            (kinds[i] == .control || kinds[i] == .userDefined) && !toks[i].isEmpty
                ? (toks[i], Int32(i)) : nil
        })

        chatTemplateSource = spec.chatTemplate
        var special: [String: String] = [:]
        for (key, id) in [("bos_token", bosId), ("eos_token", eosId), ("pad_token", padId), ("unk_token", spec.sentencePiece?.unkId)] {
            if let id { special[key] = toks[Int(id)] }
        }
        let (template, problem) = ChatTemplate.load(template: spec.chatTemplate, specialTokens: special)
        chatTemplate = template
        if let problem { warnings.append("chat template cannot be rendered (\(problem)); chat rendering is unavailable") }
        self.warnings = warnings
    }

    /// The byte of a `<0xXX>` spelling (two hex digits, either case).
    static func fallbackByte(_ t: String) -> UInt8? {
        let u = Array(t.utf8)
        guard u.count == 6, u[0] == 0x3C, u[1] == 0x30, u[2] == 0x78, u[5] == 0x3E else { return nil }
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case 0x30...0x39: return c - 0x30
            case 0x41...0x46: return c - 0x41 + 10
            case 0x61...0x66: return c - 0x61 + 10
            default: return nil
            }
        }
        guard let hi = hex(u[3]), let lo = hex(u[4]) else { return nil }
        return hi << 4 | lo
    }

    /// SentencePiece BPE as a merge table: each normal piece of two or more
    /// characters is the merge of every split into two normal pieces, ranked
    /// by its score (higher first; equal scores share a rank, so the leftmost
    /// pair wins, as in SentencePiece and llama.cpp).
    static func mergesFromScores(_ scores: [Float], tokens: [String], kinds: [TokenKind],
                                 source: String) throws -> MergeTable {
        guard scores.count == tokens.count else {
            throw TokenizerError.malformed(source: source,
                reason: "'tokenizer.ggml.scores' has \(scores.count) entries for \(tokens.count) tokens")
        }
        if let bad = scores.firstIndex(where: { !$0.isFinite }) {
            throw TokenizerError.malformed(source: source, reason: "score of token \(bad) is not finite")
        }
        let distinct = Array(Set(scores)).sorted(by: >)
        var rankOf: [Float: Int32] = [:]
        for (r, v) in distinct.enumerated() { rankOf[v] = Int32(r) }
        // Pieces looked up by an FNV-1a hash of their UTF-8 bytes, checked
        // byte for byte: String keys would hash every "▁" piece through
        // Unicode normalization, ~10× slower for a 32k vocabulary.
        let utf8 = tokens.map { Array($0.utf8) }
        func fnv(_ b: ArraySlice<UInt8>) -> UInt64 {
            var h: UInt64 = 0xCBF2_9CE4_8422_2325
            for x in b { h = (h ^ UInt64(x)) &* 0x100_0000_01B3 }
            return h
        }
        var byHash: [UInt64: Int32] = [:]
        byHash.reserveCapacity(tokens.count)
        for i in tokens.indices where kinds[i] == .normal && !utf8[i].isEmpty {
            let h = fnv(utf8[i][...])
            if byHash[h] == nil { byHash[h] = Int32(i) }
        }
        func piece(_ b: ArraySlice<UInt8>) -> Int32? {
            guard let id = byHash[fnv(b)], utf8[Int(id)].elementsEqual(b) else { return nil }
            return id
        }
        var found: [(Int32, Int32, Int32, Int32)] = []
        for i in tokens.indices where kinds[i] == .normal {
            let b = utf8[i]
            // Split only between characters: before a byte that is not a UTF-8 continuation byte.
            for k in 1..<max(b.count, 1) where b[k] & 0xC0 != 0x80 {
                guard let l = piece(b[..<k]), let r = piece(b[k...]) else { continue }
                found.append((l, r, rankOf[scores[i]]!, Int32(i)))
            }
        }
        var table = MergeTable(capacity: found.count)
        for (l, r, rank, m) in found { table.insert(left: l, right: r, rank: rank, merged: m) }
        return table
    }

    // MARK: - Lookup

    /// The vocabulary spelling of `id` (byte-mapped, as HF's `convert_ids_to_tokens`).
    public func tokenString(_ id: Int32) -> String? {
        guard id >= 0, Int(id) < tokens.count else { return nil }
        let t = tokens[Int(id)]
        return t.isEmpty && kinds[Int(id)] == .unused ? nil : t
    }

    /// The id of a vocabulary spelling (e.g. `"<|im_end|>"`, `"Ġthe"`).
    public func id(of token: String) -> Int32? { vocab[token] }

    /// Whether `id` is a control (special) token.
    public func isSpecial(_ id: Int32) -> Bool {
        id >= 0 && Int(id) < kinds.count && kinds[Int(id)] == .control
    }

    /// The raw bytes `id` decodes to (empty for unknown ids).
    public func bytes(of id: Int32) -> ArraySlice<UInt8> {
        guard id >= 0, Int(id) < tokens.count else { return [] }
        return tokenBytes[Int(byteOffsets[Int(id)])..<Int(byteOffsets[Int(id) + 1])]
    }

    // MARK: - Encode

    /// Token ids of `text`. `addSpecial` adds the model's BOS/EOS as its
    /// post-processor says (SmolLM2: nothing; Llama 3: BOS). With
    /// `parseSpecial` false, special-token spellings in `text` are encoded as
    /// plain text (use for untrusted user content).
    public func encode(_ text: String, addSpecial: Bool = false, parseSpecial: Bool = true) -> [Int32] {
        if let sp = sentencePiece { return encodeSentencePiece(text, sp, addSpecial: addSpecial, parseSpecial: parseSpecial) }
        var out: [Int32] = []
        out.reserveCapacity(text.utf8.count / 3 + 4)
        if addSpecial { out.append(contentsOf: prefixIds) }
        var values = text.unicodeScalars.map(\.value)
        var classes = values.map(ScalarClass.of)
        var pieces: [Range<Int>] = []
        var buffer: [UInt8] = []
        buffer.reserveCapacity(64)

        func encodeSegment(_ lo: Int, _ hi: Int, _ s: UnsafeBufferPointer<UInt32>, _ c: UnsafeBufferPointer<UInt8>) {
            guard lo < hi else { return }
            pieces.removeAll(keepingCapacity: true)
            preTokenizer.pieces(s, c, lo, hi, into: &pieces)
            for r in pieces {
                buffer.removeAll(keepingCapacity: true)
                for i in r { appendUTF8(s[i], to: &buffer) }
                encodePiece(buffer, into: &out)
            }
        }

        if addPrefixSpace {
            // HF ByteLevel(add_prefix_space): a space before each segment that lacks one.
            values = prefixSpaced(values, classes: &classes, parseSpecial: parseSpecial)
        }
        values.withUnsafeBufferPointer { s in
            classes.withUnsafeBufferPointer { c in
                splitAtAddedTokens(s, parseSpecial: parseSpecial,
                                   segment: { encodeSegment($0, $1, s, c) }, added: { out.append($0) })
            }
        }
        if addSpecial { out.append(contentsOf: suffixIds) }
        return out
    }

    /// Calls `segment(lo, hi)` for the text between added tokens (empty
    /// ranges included) and `added(id)` for each added token, in order.
    private func splitAtAddedTokens(_ s: UnsafeBufferPointer<UInt32>, parseSpecial: Bool,
                                    segment: (Int, Int) -> Void, added: (Int32) -> Void) {
        var start = 0
        if parseSpecial && !specials.isEmpty {
            var i = 0
            while i < s.count {
                if let (len, id) = specials.match(s, at: i) {
                    segment(start, i)
                    added(id)
                    i += len
                    start = i
                } else {
                    i += 1
                }
            }
        }
        segment(start, s.count)
    }

    private func encodeSentencePiece(_ text: String, _ sp: SentencePieceState, addSpecial: Bool,
                                     parseSpecial: Bool) -> [Int32] {
        var out: [Int32] = []
        out.reserveCapacity(text.utf8.count / 3 + 4)
        if addSpecial { out.append(contentsOf: prefixIds) }
        let values = text.unicodeScalars.map(\.value)
        var normalized: [UInt32] = []
        values.withUnsafeBufferPointer { s in
            splitAtAddedTokens(s, parseSpecial: parseSpecial, segment: { lo, hi in
                guard lo < hi else { return }
                let prefix: Bool
                switch sp.spacePrefix {
                case .none: prefix = false
                case .everySegment: prefix = true  // every segment starts the text or follows an added token
                case .everyUnspacedSegment: prefix = s[lo] != 0x20 && s[lo] != 0x2581
                case .firstUnspacedSegment: prefix = lo == 0 && s[lo] != 0x20 && s[lo] != 0x2581
                }
                normalized.removeAll(keepingCapacity: true)
                if prefix { normalized.append(0x2581) }
                for i in lo..<hi { normalized.append(s[i] == 0x20 ? 0x2581 : s[i]) }
                encodeNormalized(normalized, sp, into: &out)
            }, added: { out.append($0) })
        }
        if addSpecial { out.append(contentsOf: suffixIds) }
        return out
    }

    /// One SentencePiece segment ("▁" for spaces): characters to ids (byte
    /// fallback for those without a token), then merges, through the cache.
    private func encodeNormalized(_ scalars: [UInt32], _ sp: SentencePieceState, into out: inout [Int32]) {
        var key: [UInt8] = []
        key.reserveCapacity(scalars.count * 3)
        for v in scalars { appendUTF8(v, to: &key) }
        let cacheable = key.count <= 256
        if cacheable, let hit = cache.get(key) {
            out.append(contentsOf: hit)
            return
        }
        var ids: [Int32] = []
        ids.reserveCapacity(scalars.count)
        var utf8: [UInt8] = []
        for v in scalars {
            if let id = sp.charIds[v] { ids.append(id); continue }
            utf8.removeAll(keepingCapacity: true)
            appendUTF8(v, to: &utf8)
            if utf8.allSatisfy({ byteIds[Int($0)] >= 0 }) {
                for b in utf8 { ids.append(byteIds[Int(b)]) }
            } else if let unk = sp.unkId, ids.last != unk {
                ids.append(unk)  // consecutive unknowns fuse into one, as HF's fuse_unk does
            }
        }
        let merged = mergeIds(ids)
        if cacheable { cache.set(key, merged) }
        out.append(contentsOf: merged)
    }

    /// Inserts a space at the start of every non-special segment that does
    /// not start with one (HF `add_prefix_space`).
    private func prefixSpaced(_ values: [UInt32], classes: inout [UInt8], parseSpecial: Bool) -> [UInt32] {
        var out: [UInt32] = []
        out.reserveCapacity(values.count + 1)
        var segmentStart = true
        values.withUnsafeBufferPointer { s in
            var i = 0
            while i < s.count {
                if parseSpecial, let (len, _) = specials.match(s, at: i) {
                    out.append(contentsOf: s[i..<i + len])
                    i += len
                    segmentStart = true
                    continue
                }
                if segmentStart && s[i] != 0x20 { out.append(0x20) }
                segmentStart = false
                out.append(s[i])
                i += 1
            }
        }
        if out.isEmpty && !values.isEmpty { return values }
        classes = out.map(ScalarClass.of)
        return out
    }

    @inline(__always)
    private func appendUTF8(_ v: UInt32, to buffer: inout [UInt8]) {
        switch v {
        case 0..<0x80:
            buffer.append(UInt8(v))
        case 0x80..<0x800:
            buffer.append(UInt8(0xC0 | (v >> 6)))
            buffer.append(UInt8(0x80 | (v & 0x3F)))
        case 0x800..<0x10000:
            buffer.append(UInt8(0xE0 | (v >> 12)))
            buffer.append(UInt8(0x80 | ((v >> 6) & 0x3F)))
            buffer.append(UInt8(0x80 | (v & 0x3F)))
        default:
            buffer.append(UInt8(0xF0 | (v >> 18)))
            buffer.append(UInt8(0x80 | ((v >> 12) & 0x3F)))
            buffer.append(UInt8(0x80 | ((v >> 6) & 0x3F)))
            buffer.append(UInt8(0x80 | (v & 0x3F)))
        }
    }

    /// BPE of one pre-tokenized piece (its UTF-8 bytes), through the cache.
    func encodePiece(_ bytes: [UInt8], into out: inout [Int32]) {
        if bytes.count == 1 {
            let id = byteIds[Int(bytes[0])]
            if id >= 0 { out.append(id) }
            return
        }
        // Keyed by bytes, not String: String equality is canonical equivalence
        // (U+2000 == U+2002), which would hand one piece another's ids.
        let cacheable = bytes.count <= 256
        if cacheable, let hit = cache.get(bytes) {
            out.append(contentsOf: hit)
            return
        }
        var ids: [Int32] = []
        if ignoreMerges, let whole = vocab[ByteLevel.encode(bytes)] {
            ids = [whole]
        } else {
            ids = merge(bytes)
        }
        // Long pieces (minified code, base64) rarely repeat; keep them out of the cache.
        if cacheable { cache.set(bytes, ids) }
        out.append(contentsOf: ids)
    }

    /// Applies merges lowest rank first, ties broken leftmost (HF's
    /// `Word::merge_all` with no dropout): a min-heap of (rank, position)
    /// over a doubly linked list of symbols; stale heap entries are skipped.
    /// Bytes without a token are dropped first (HF does the same when the
    /// model has no unknown token), so their neighbours may merge.
    func merge(_ bytes: [UInt8]) -> [Int32] {
        mergeIds(bytes.compactMap { b -> Int32? in
            let id = byteIds[Int(b)]
            return id >= 0 ? id : nil
        })
    }

    func mergeIds(_ symbols: [Int32]) -> [Int32] {
        var ids = symbols
        let n = ids.count
        guard n > 1 else { return ids }
        var prev = [Int32](repeating: -1, count: n)
        var next = [Int32](repeating: -1, count: n)
        for i in 0..<n {
            prev[i] = Int32(i - 1)
            next[i] = i + 1 < n ? Int32(i + 1) : -1
        }
        let dead = Int32.min
        var heap = MinHeap()
        for i in 0..<(n - 1) {
            if let m = merges.lookup(ids[i], ids[i + 1]) { heap.push(UInt64(m.rank) << 32 | UInt64(i)) }
        }
        while let top = heap.pop() {
            let pos = Int(top & 0xFFFF_FFFF)
            let rank = Int32(truncatingIfNeeded: top >> 32)
            guard ids[pos] != dead else { continue }
            let nx = Int(next[pos])
            guard nx >= 0, let m = merges.lookup(ids[pos], ids[nx]), m.rank == rank else { continue }
            ids[pos] = m.merged
            ids[nx] = dead
            let after = next[nx]
            next[pos] = after
            if after >= 0 { prev[Int(after)] = Int32(pos) }
            let pv = Int(prev[pos])
            if pv >= 0, let l = merges.lookup(ids[pv], ids[pos]) { heap.push(UInt64(l.rank) << 32 | UInt64(pv)) }
            if after >= 0, let r = merges.lookup(ids[pos], ids[Int(after)]) { heap.push(UInt64(r.rank) << 32 | UInt64(pos)) }
        }
        var result: [Int32] = []
        var i = 0
        while i >= 0 {
            result.append(ids[i])
            i = Int(next[i])
        }
        return result
    }

    // MARK: - Decode

    /// Text of `ids`. Invalid UTF-8 (e.g. a sequence cut off mid-character)
    /// becomes U+FFFD, as HF's lossy decode does. Unknown ids are ignored.
    ///
    /// SentencePiece vocabularies that put "▁" before the text lose one
    /// leading space, as HF's decoder strips it: right for the text of a
    /// whole prompt. Generated tokens continue a prompt, so their text keeps
    /// it (`continuation: true`, and `TokenDecoder`), as vLLM and llama.cpp
    /// return it.
    public func decode(_ ids: [Int32], skipSpecial: Bool = false, continuation: Bool = false) -> String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(ids.count * 4)
        for id in ids {
            guard id >= 0, Int(id) < tokens.count else { continue }
            if skipSpecial && kinds[Int(id)] == .control { continue }
            bytes.append(contentsOf: tokenBytes[Int(byteOffsets[Int(id)])..<Int(byteOffsets[Int(id) + 1])])
        }
        if !continuation, bytes.first == 0x20, let sp = sentencePiece, sp.spacePrefix != .none {
            bytes.removeFirst()
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// A streaming decoder over this tokenizer.
    public func makeDecoder(skipSpecial: Bool = false) -> TokenDecoder {
        TokenDecoder(tokenizer: self, skipSpecial: skipSpecial)
    }
}
