import Foundation

/// How text is cut into pieces before byte-level BPE runs on each piece.
///
/// Each case is a hand-written matcher over Unicode scalars that reproduces a
/// regex exactly as Hugging Face `tokenizers` (Oniguruma) evaluates it, with
/// alternatives tried in order and the same backtracking results:
///
/// - `gpt2`:  `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// - `smollm`: every numeric scalar is its own piece (HF `Digits(individual_digits)`),
///   then `gpt2` over each stretch between them (HF `ByteLevel(use_regex)`).
/// - `llama3`: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|`
///   ` ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// - `qwen2`: as `llama3` with `\p{N}` (one digit per piece) instead of `\p{N}{1,3}`.
///
/// `\s` is Unicode White_Space; `\p{L}`/`\p{N}` are the L*/N* general
/// categories as of Unicode 16 (the version Oniguruma in `tokenizers` uses):
/// scalars first assigned later count as unassigned, i.e. "other".
public enum PreTokenizer: String, Sendable, Equatable, CaseIterable {
    case gpt2
    case smollm
    case llama3
    case qwen2

    /// Maps a GGUF `tokenizer.ggml.pre` name to a matcher, or nil when unknown
    /// (names as llama.cpp's `llama-vocab.cpp` groups them).
    public static func fromGGUFName(_ name: String) -> PreTokenizer? {
        switch name {
        case "gpt2", "gpt-2", "phi-2", "default": return .gpt2
        case "smollm": return .smollm
        case "smaug-bpe": return .llama3
        case _ where llamaBPENames.contains(name): return .llama3
        case "qwen2", "deepseek-r1-qwen", "megrez": return .qwen2
        default: return nil
        }
    }

    /// GGUF pre-tokenizer names llama.cpp treats as Llama 3: besides the
    /// regex, whole-word vocabulary hits skip merging (`ignore_merges`) and
    /// BOS is added unless `tokenizer.ggml.add_bos_token` says otherwise.
    static let llamaBPENames: Set<String> = ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                             "pixtral", "midm-2.0", "lfm2"]

    /// The Split regex of HF's Llama 3 tokenizer.json.
    static let llama3Pattern =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    /// The Split regex of HF's Qwen2 tokenizer.json.
    static let qwen2Pattern =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    /// The regex ByteLevel(use_regex: true) applies (GPT-2's).
    static let gpt2Pattern =
        #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#

    /// Cuts `text` into pieces; convenience for tests and inspection.
    public func split(_ text: String) -> [String] {
        let scalars = Array(text.unicodeScalars)
        let values = scalars.map(\.value)
        let classes = values.map(ScalarClass.of)
        var ranges: [Range<Int>] = []
        values.withUnsafeBufferPointer { s in
            classes.withUnsafeBufferPointer { c in
                pieces(s, c, 0, s.count, into: &ranges)
            }
        }
        return ranges.map { r in
            var v = String.UnicodeScalarView()
            v.append(contentsOf: scalars[r])
            return String(v)
        }
    }

    /// Appends the piece ranges of `s[lo..<hi]` to `out`. `hi` acts as the end
    /// of the text for look-ahead, as HF pre-tokenizes each segment between
    /// added tokens separately.
    func pieces(_ s: UnsafeBufferPointer<UInt32>, _ c: UnsafeBufferPointer<UInt8>,
                _ lo: Int, _ hi: Int, into out: inout [Range<Int>]) {
        switch self {
        case .gpt2: Self.gpt2Pieces(s, c, lo, hi, into: &out)
        case .llama3: Self.llama3Pieces(s, c, lo, hi, maxDigits: 3, into: &out)
        case .qwen2: Self.llama3Pieces(s, c, lo, hi, maxDigits: 1, into: &out)
        case .smollm:
            var start = lo
            for i in lo..<hi where c[i] & ScalarClass.numeric != 0 {
                if start < i { Self.gpt2Pieces(s, c, start, i, into: &out) }
                out.append(i..<i + 1)
                start = i + 1
            }
            if start < hi { Self.gpt2Pieces(s, c, start, hi, into: &out) }
        }
    }

    private static let apostrophe: UInt32 = 0x27, space: UInt32 = 0x20, cr: UInt32 = 0x0D, lf: UInt32 = 0x0A

    /// End of a run of scalars from `i` whose class has any bit of `mask`.
    @inline(__always)
    private static func run(_ c: UnsafeBufferPointer<UInt8>, _ i: Int, _ hi: Int, _ mask: UInt8) -> Int {
        var j = i
        while j < hi, c[j] & mask != 0 { j += 1 }
        return j
    }

    /// End of a run of "other" scalars (`[^\s\p{L}\p{N}]`) from `i`.
    @inline(__always)
    private static func otherRun(_ c: UnsafeBufferPointer<UInt8>, _ i: Int, _ hi: Int) -> Int {
        var j = i
        while j < hi, c[j] & ScalarClass.regexMask == 0 { j += 1 }
        return j
    }

    /// `\s+(?!\S)|\s+` at `i` (a whitespace scalar): the whole run at the end
    /// of the text, else the run minus its last scalar, else one scalar.
    @inline(__always)
    private static func whitespaceEnd(_ c: UnsafeBufferPointer<UInt8>, _ i: Int, _ hi: Int) -> Int {
        let r = run(c, i, hi, ScalarClass.space)
        if r == hi { return r }
        return r - i >= 2 ? r - 1 : i + 1
    }

    static func gpt2Pieces(_ s: UnsafeBufferPointer<UInt32>, _ c: UnsafeBufferPointer<UInt8>,
                           _ lo: Int, _ hi: Int, into out: inout [Range<Int>]) {
        var i = lo
        while i < hi {
            let ch = s[i]
            var end = i
            // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive)
            if ch == apostrophe, i + 1 < hi {
                let a = s[i + 1]
                if a == 0x73 || a == 0x74 || a == 0x6D || a == 0x64 {  // s t m d
                    end = i + 2
                } else if i + 2 < hi {
                    let b = s[i + 2]
                    if (a == 0x72 && b == 0x65) || (a == 0x76 && b == 0x65) || (a == 0x6C && b == 0x6C) {  // re ve ll
                        end = i + 3
                    }
                }
            }
            if end == i {
                // ` ?X+` for X in \p{L}, \p{N}, [^\s\p{L}\p{N}]: an optional
                // space only when the next scalar starts such a run.
                var j = i
                if ch == space, i + 1 < hi, c[i + 1] & ScalarClass.space == 0 { j = i + 1 }
                let k = c[j]
                if k & ScalarClass.letter != 0 {
                    end = run(c, j, hi, ScalarClass.letter)
                } else if k & ScalarClass.number != 0 {
                    end = run(c, j, hi, ScalarClass.number)
                } else if k & ScalarClass.space == 0 {
                    end = otherRun(c, j, hi)
                } else {
                    end = whitespaceEnd(c, i, hi)
                }
            }
            out.append(i..<end)
            i = end
        }
    }

    /// `(?i:…)` contraction letter test: ASCII case-insensitive, plus U+017F
    /// LATIN SMALL LETTER LONG S, which Unicode case-folds to `s`.
    @inline(__always)
    private static func folds(_ v: UInt32, to lower: UInt32) -> Bool {
        v == lower || v == lower - 0x20 || (lower == 0x73 && v == 0x17F)
    }

    static func llama3Pieces(_ s: UnsafeBufferPointer<UInt32>, _ c: UnsafeBufferPointer<UInt8>,
                             _ lo: Int, _ hi: Int, maxDigits: Int, into out: inout [Range<Int>]) {
        var i = lo
        while i < hi {
            let ch = s[i]
            let k = c[i]
            var end = i
            // (?i:'s|'t|'re|'ve|'m|'ll|'d)
            if ch == apostrophe, i + 1 < hi {
                let a = s[i + 1]
                if folds(a, to: 0x73) || folds(a, to: 0x74) || folds(a, to: 0x6D) || folds(a, to: 0x64) {
                    end = i + 2
                } else if i + 2 < hi {
                    let b = s[i + 2]
                    if (folds(a, to: 0x72) && folds(b, to: 0x65)) || (folds(a, to: 0x76) && folds(b, to: 0x65))
                        || (folds(a, to: 0x6C) && folds(b, to: 0x6C)) {
                        end = i + 3
                    }
                }
            }
            if end > i {
            } else if k & ScalarClass.letter != 0 {
                // [^\r\n\p{L}\p{N}]?\p{L}+ with the option empty
                end = run(c, i, hi, ScalarClass.letter)
            } else if k & ScalarClass.number == 0, ch != cr, ch != lf, i + 1 < hi, c[i + 1] & ScalarClass.letter != 0 {
                // … with one leading scalar that is not \r, \n, letter or number
                end = run(c, i + 1, hi, ScalarClass.letter)
            } else if k & ScalarClass.number != 0 {
                // \p{N}{1,maxDigits}
                end = i + 1
                while end < hi, end - i < maxDigits, c[end] & ScalarClass.number != 0 { end += 1 }
            } else if k & ScalarClass.space == 0
                        || (ch == space && i + 1 < hi && c[i + 1] & ScalarClass.regexMask == 0) {
                // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
                end = otherRun(c, k & ScalarClass.space == 0 ? i : i + 1, hi)
                while end < hi, s[end] == cr || s[end] == lf { end += 1 }
            } else {
                // \s*[\r\n]+ : up to and including the last \r or \n of the run
                let r = run(c, i, hi, ScalarClass.space)
                var lastNewline = -1
                var j = r - 1
                while j >= i {
                    if s[j] == cr || s[j] == lf { lastNewline = j; break }
                    j -= 1
                }
                if lastNewline >= 0 {
                    end = lastNewline + 1
                } else {
                    end = whitespaceEnd(c, i, hi)
                }
            }
            out.append(i..<end)
            i = end
        }
    }
}

/// Per-scalar class bits used by the pre-tokenizers.
enum ScalarClass {
    /// `\p{L}` as of Unicode 16.
    static let letter: UInt8 = 1
    /// `\p{N}` as of Unicode 16.
    static let number: UInt8 = 2
    /// `\s`: Unicode White_Space.
    static let space: UInt8 = 4
    /// Rust `char::is_numeric` (N* in the running Unicode version): HF `Digits`.
    static let numeric: UInt8 = 8
    /// A scalar with none of these bits is "other": `[^\s\p{L}\p{N}]`.
    static let regexMask: UInt8 = letter | number | space

    /// Classes of the Basic Multilingual Plane, computed once.
    private static let bmp: [UInt8] = (0..<0x10000).map { compute(UInt32($0)) }

    @inline(__always)
    static func of(_ v: UInt32) -> UInt8 {
        v < 0x10000 ? bmp[Int(v)] : compute(v)
    }

    static func compute(_ v: UInt32) -> UInt8 {
        guard let u = Unicode.Scalar(v) else { return 0 }
        let p = u.properties
        var r: UInt8 = p.isWhitespace ? space : 0
        var regexClass: UInt8 = 0
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter:
            regexClass = letter
        case .decimalNumber, .letterNumber, .otherNumber:
            regexClass = number
            r |= numeric
        default: break
        }
        // Oniguruma in HF tokenizers knows Unicode 16: later scalars are unassigned there.
        if regexClass != 0, let age = p.age, age.major >= 17 { regexClass = 0 }
        return r | regexClass
    }
}
