/// Streaming detokenizer: feed ids one at a time and get text back as soon as
/// the bytes so far form whole UTF-8 characters. A character split across
/// tokens (emoji, CJK, accented letters in byte-level BPE) is held until its
/// last byte arrives, so it is never emitted as U+FFFD halves.
///
/// The concatenation of every `feed` result and `finish()` equals
/// `tokenizer.decode(ids, skipSpecial:, continuation: true)` for the same ids.
public struct TokenDecoder: Sendable {
    public let tokenizer: BPETokenizer
    public let skipSpecial: Bool
    /// Bytes of an incomplete character at the end of the input so far.
    private var pending: [UInt8] = []

    public init(tokenizer: BPETokenizer, skipSpecial: Bool = false) {
        self.tokenizer = tokenizer
        self.skipSpecial = skipSpecial
    }

    /// Whether bytes of an unfinished character are being held back.
    public var hasPendingBytes: Bool { !pending.isEmpty }

    /// Adds one token; returns the text that became complete ("" if none).
    public mutating func feed(_ id: Int32) -> String {
        if skipSpecial && tokenizer.isSpecial(id) { return "" }
        pending.append(contentsOf: tokenizer.bytes(of: id))
        let keep = Self.incompleteSuffixLength(pending)
        guard keep < pending.count else { return "" }
        let text = String(decoding: pending[..<(pending.count - keep)], as: UTF8.self)
        pending.removeFirst(pending.count - keep)
        return text
    }

    /// Adds several tokens; returns the text that became complete.
    public mutating func feed<S: Sequence>(_ ids: S) -> String where S.Element == Int32 {
        var out = ""
        for id in ids { out += feed(id) }
        return out
    }

    /// Ends the stream: held bytes come out, an unfinished character as U+FFFD.
    public mutating func finish() -> String {
        defer { pending.removeAll() }
        return String(decoding: pending, as: UTF8.self)
    }

    /// Length of the trailing bytes that are a proper prefix of a valid UTF-8
    /// sequence (0…3). Anything else is either complete or already invalid,
    /// and a lossy decode of it now gives what decoding the whole stream would.
    static func incompleteSuffixLength(_ b: [UInt8]) -> Int {
        let n = b.count
        var i = n - 1
        // Find the last byte that is not a continuation byte, at most 3 back.
        while i >= 0 && i >= n - 3 && b[i] & 0xC0 == 0x80 { i -= 1 }
        guard i >= 0 else { return 0 }
        let lead = b[i]
        let need: Int
        switch lead {
        case 0xC2...0xDF: need = 2
        case 0xE0...0xEF: need = 3
        case 0xF0...0xF4: need = 4
        default: return 0
        }
        let have = n - i
        guard have < need else { return 0 }
        // The second byte's allowed range depends on the lead (no overlongs/surrogates).
        if have >= 2 {
            let second = b[i + 1]
            let ok: Bool
            switch lead {
            case 0xE0: ok = (0xA0...0xBF).contains(second)
            case 0xED: ok = (0x80...0x9F).contains(second)
            case 0xF0: ok = (0x90...0xBF).contains(second)
            case 0xF4: ok = (0x80...0x8F).contains(second)
            default: ok = true
            }
            if !ok { return 0 }
        }
        return have
    }
}
