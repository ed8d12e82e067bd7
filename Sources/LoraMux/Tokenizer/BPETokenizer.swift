import Foundation

/// Byte-level BPE tokenizer (GPT-2 style), as used by SmolLM2, Llama 3 and
/// Qwen2. Built from GGUF metadata (`init(gguf:)`) or a Hugging Face
/// `tokenizer.json` (`init(tokenizerJSON:)`); both give identical ids for the
/// same vocabulary.
///
/// Encoding: added tokens (control and user-defined) are matched first as
/// whole strings, leftmost-longest, like HF's added tokens; the text between
/// them is cut by the `PreTokenizer`; each piece's UTF-8 bytes are mapped to
/// byte tokens and merged by rank. Results per piece are cached.
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
        self.kinds = kinds

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
        for (i, t) in toks.enumerated() {
            if kinds[i] == .normal, let b = ByteLevel.decode(t) {
                bytes.append(contentsOf: b)
            } else {
                bytes.append(contentsOf: Array(t.utf8))
            }
            offsets.append(Int32(bytes.count))
        }
        tokenBytes = bytes
        byteOffsets = offsets

        var byteIds = [Int32](repeating: -1, count: 256)
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
        self.byteIds = byteIds

        var table = MergeTable(capacity: spec.merges.count)
        var skipped = 0
        for (rank, (a, b)) in spec.merges.enumerated() {
            guard let ia = vocab[a], let ib = vocab[b], let im = vocab[a + b] else { skipped += 1; continue }
            table.insert(left: ia, right: ib, rank: Int32(rank), merged: im)
        }
        if skipped > 0 { warnings.append("\(skipped) merges name tokens outside the vocabulary and were skipped") }
        merges = table

        specials = SpecialMatcher(tokens: toks.indices.compactMap { i in
            (kinds[i] == .control || kinds[i] == .userDefined) && !toks[i].isEmpty
                ? (toks[i], Int32(i)) : nil
        })

        chatTemplateSource = spec.chatTemplate
        chatTemplate = ChatTemplate.detect(template: spec.chatTemplate)
        if let t = spec.chatTemplate, chatTemplate == nil {
            warnings.append(t.contains("<|start_header_id|>")
                ? "Llama 3.1+ chat template whose knowledge cutoff or date could not be read; chat rendering is unavailable"
                : "chat template is neither ChatML nor Llama 3; chat rendering is unavailable")
        }
        self.warnings = warnings
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
                var start = 0
                if parseSpecial && !specials.isEmpty {
                    var i = 0
                    while i < s.count {
                        if let (len, id) = specials.match(s, at: i) {
                            encodeSegment(start, i, s, c)
                            out.append(id)
                            i += len
                            start = i
                        } else {
                            i += 1
                        }
                    }
                }
                encodeSegment(start, s.count, s, c)
            }
        }
        if addSpecial { out.append(contentsOf: suffixIds) }
        return out
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
        var ids = bytes.compactMap { b -> Int32? in
            let id = byteIds[Int(b)]
            return id >= 0 ? id : nil
        }
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
    public func decode(_ ids: [Int32], skipSpecial: Bool = false) -> String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(ids.count * 4)
        for id in ids {
            guard id >= 0, Int(id) < tokens.count else { continue }
            if skipSpecial && kinds[Int(id)] == .control { continue }
            bytes.append(contentsOf: tokenBytes[Int(byteOffsets[Int(id)])..<Int(byteOffsets[Int(id) + 1])])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// A streaming decoder over this tokenizer.
    public func makeDecoder(skipSpecial: Bool = false) -> TokenDecoder {
        TokenDecoder(tokenizer: self, skipSpecial: skipSpecial)
    }
}
