/// One token of a template, with the line it starts on.
struct JinjaToken: Equatable {
    enum Kind: Equatable {
        case text(String)
        case varBegin, varEnd, blockBegin, blockEnd
        case name(String)
        case string(String)
        case int(Int)
        case float(Double)
        case op(String)
        case eof
    }

    let kind: Kind
    let line: Int
}

/// Splits a template into text and the tokens inside its tags, applying
/// whitespace control as transformers' environment does: `trim_blocks`
/// (the newline after a block or comment tag goes), `lstrip_blocks` (spaces
/// before a block or comment tag on its own line go), `-` on either side of
/// a tag (all whitespace on that side goes), `+` (keep it). As jinja2 does,
/// line breaks are normalised to `\n` and one trailing newline is dropped.
enum JinjaLexer {
    static func tokenize(_ source: String) throws -> [JinjaToken] {
        var src: [Unicode.Scalar] = []
        src.reserveCapacity(source.unicodeScalars.count)
        var it = source.unicodeScalars.makeIterator()
        var pending: Unicode.Scalar? = it.next()
        while let u = pending {
            pending = it.next()
            if u == "\r" {
                src.append("\n")
                if pending == "\n" { pending = it.next() }
            } else {
                src.append(u)
            }
        }
        if src.last == "\n" { src.removeLast() }
        var lexer = Lexer(src: src)
        try lexer.run()
        return lexer.out
    }

    /// Python's `str.isspace()`: White_Space plus U+001C…U+001F.
    static func isSpace(_ u: Unicode.Scalar) -> Bool {
        u.properties.isWhitespace || (0x1C...0x1F).contains(u.value)
    }

    private struct Lexer {
        let src: [Unicode.Scalar]
        var pos = 0
        var line = 1
        var lineCountedTo = 0
        var out: [JinjaToken] = []
        /// jinja2's `line_starting`: the text before the previous tag's end
        /// ended a line, so `lstrip_blocks` applies to text from position 0.
        var lineStarting = true

        init(src: [Unicode.Scalar]) { self.src = src }

        func at(_ i: Int, _ s: String) -> Bool {
            var j = i
            for u in s.unicodeScalars {
                guard j < src.count, src[j] == u else { return false }
                j += 1
            }
            return true
        }

        /// The line of position `i` (called with non-decreasing positions).
        mutating func lineOf(_ i: Int) -> Int {
            while lineCountedTo < i && lineCountedTo < src.count {
                if src[lineCountedTo] == "\n" { line += 1 }
                lineCountedTo += 1
            }
            return line
        }

        mutating func emit(_ kind: JinjaToken.Kind, at i: Int) {
            out.append(JinjaToken(kind: kind, line: lineOf(i)))
        }

        func error(_ message: String, line: Int) -> JinjaError {
            JinjaError(.syntax, "template syntax error, line \(line): \(message)")
        }

        /// Skips whitespace from `i`; returns where it ends.
        func skipSpace(_ i: Int) -> Int {
            var j = i
            while j < src.count, JinjaLexer.isSpace(src[j]) { j += 1 }
            return j
        }

        /// `text` before a tag, with that tag's whitespace control applied.
        func trimmed(_ text: ArraySlice<Unicode.Scalar>, sign: Unicode.Scalar?, isVariable: Bool) -> ArraySlice<Unicode.Scalar> {
            if sign == "-" {
                var end = text.endIndex
                while end > text.startIndex, JinjaLexer.isSpace(text[end - 1]) { end -= 1 }
                return text[text.startIndex..<end]
            }
            guard sign != "+", !isVariable else { return text }
            let lineStart = (text.lastIndex(of: "\n").map { $0 + 1 }) ?? text.startIndex
            guard lineStart > text.startIndex || lineStarting else { return text }
            let tail = text[lineStart...]
            guard !tail.isEmpty, tail.allSatisfy(JinjaLexer.isSpace) else { return text }
            return text[text.startIndex..<lineStart]
        }

        mutating func emitText(_ text: ArraySlice<Unicode.Scalar>, at i: Int) {
            guard !text.isEmpty else { return }
            var s = String.UnicodeScalarView()
            s.append(contentsOf: text)
            emit(.text(String(s)), at: i)
        }

        /// The end of a block or comment tag at `i` (`+%}`, `-%}` plus the
        /// whitespace after it, `%}` plus one newline), or nil.
        func closer(at i: Int, _ mark: String) -> Int? {
            if at(i, "+" + mark) { return i + 3 }
            if at(i, "-" + mark) { return skipSpace(i + 3) }
            if at(i, mark) { return i + 2 < src.count && src[i + 2] == "\n" ? i + 3 : i + 2 }
            return nil
        }

        mutating func run() throws {
            while pos < src.count {
                // The next `{{`, `{%` or `{#`.
                var j = pos
                while j + 1 < src.count, !(src[j] == "{" && (src[j + 1] == "{" || src[j + 1] == "%" || src[j + 1] == "#")) { j += 1 }
                guard j + 1 < src.count else {
                    emitText(src[pos...], at: pos)
                    break
                }
                let kind = src[j + 1]
                var bodyStart = j + 2
                var sign: Unicode.Scalar?
                if bodyStart < src.count, src[bodyStart] == "-" || src[bodyStart] == "+" {
                    sign = src[bodyStart]
                    bodyStart += 1
                }
                let text = trimmed(src[pos..<j], sign: sign, isVariable: kind == "{")
                if kind == "%", let rawEnd = rawOpening(at: bodyStart) {
                    emitText(text, at: pos)
                    try raw(from: rawEnd, line: lineOf(j))
                    continue
                }
                emitText(text, at: pos)
                switch kind {
                case "#":
                    var k = bodyStart
                    while k < src.count, closer(at: k, "#}") == nil { k += 1 }
                    guard k < src.count, let end = closer(at: k, "#}") else {
                        throw error("missing end of comment tag", line: lineOf(j))
                    }
                    lineStarting = src[end - 1] == "\n"
                    pos = end
                case "{":
                    emit(.varBegin, at: j)
                    pos = try tag(from: bodyStart, isBlock: false)
                    emit(.varEnd, at: pos)
                default:
                    emit(.blockBegin, at: j)
                    pos = try tag(from: bodyStart, isBlock: true)
                    emit(.blockEnd, at: pos)
                }
            }
            emit(.eof, at: src.count)
        }

        /// After `{%` (and its sign): the end of `raw %}` when this tag opens a raw block.
        func rawOpening(at i: Int) -> Int? {
            var k = skipSpace(i)
            guard at(k, "raw") else { return nil }
            k = skipSpace(k + 3)
            if at(k, "-%}") { return skipSpace(k + 3) }
            if at(k, "%}") { return k + 2 }
            return nil
        }

        /// A raw block's text up to its `{% endraw %}`, emitted untouched
        /// except for the end tag's own whitespace control.
        mutating func raw(from start: Int, line: Int) throws {
            var k = start
            while k + 1 < src.count {
                if src[k] == "{", src[k + 1] == "%" {
                    var b = k + 2
                    var sign: Unicode.Scalar?
                    if b < src.count, src[b] == "-" || src[b] == "+" {
                        sign = src[b]
                        b += 1
                    }
                    var e = skipSpace(b)
                    if at(e, "endraw") {
                        e = skipSpace(e + 6)
                        if let end = closer(at: e, "%}") {
                            emitText(trimmed(src[start..<k], sign: sign, isVariable: false), at: start)
                            lineStarting = src[end - 1] == "\n"
                            pos = end
                            return
                        }
                    }
                }
                k += 1
            }
            throw error("missing end of raw directive", line: line)
        }

        /// The tokens of one `{{ }}` or `{% %}` tag from `i`; returns the
        /// position after its end (and the whitespace control consumed).
        mutating func tag(from start: Int, isBlock: Bool) throws -> Int {
            var i = start
            var brackets: [Unicode.Scalar] = []
            while true {
                i = skipSpace(i)
                guard i < src.count else { throw error("unexpected end of template inside a tag", line: lineOf(start)) }
                if brackets.isEmpty {
                    if isBlock, let end = closer(at: i, "%}") {
                        lineStarting = src[end - 1] == "\n"
                        return end
                    }
                    if !isBlock {
                        if at(i, "-}}") {
                            let end = skipSpace(i + 3)
                            lineStarting = src[end - 1] == "\n"
                            return end
                        }
                        if at(i, "}}") {
                            lineStarting = false
                            return i + 2
                        }
                    }
                }
                let u = src[i]
                if u == "'" || u == "\"" {
                    i = try string(from: i)
                } else if ("0"..."9").contains(u) {
                    i = try number(from: i)
                } else if u == "_" || u.properties.isAlphabetic {
                    var k = i + 1
                    while k < src.count, src[k] == "_" || src[k].properties.isAlphabetic || ("0"..."9").contains(src[k]) { k += 1 }
                    var s = String.UnicodeScalarView()
                    s.append(contentsOf: src[i..<k])
                    emit(.name(String(s)), at: i)
                    i = k
                } else {
                    let ops = ["//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]", "(", ")",
                               "{", "}", ">", "<", "=", ".", ":", "|", ",", ";"]
                    guard let op = ops.first(where: { at(i, $0) }) else {
                        throw error("unexpected character '\(Character(u))'", line: lineOf(i))
                    }
                    switch op {
                    case "(": brackets.append(")")
                    case "[": brackets.append("]")
                    case "{": brackets.append("}")
                    case ")", "]", "}":
                        guard let want = brackets.popLast() else { throw error("unexpected '\(op)'", line: lineOf(i)) }
                        guard String(Character(want)) == op else {
                            throw error("unexpected '\(op)', expected '\(Character(want))'", line: lineOf(i))
                        }
                    default: break
                    }
                    emit(.op(op), at: i)
                    i += op.unicodeScalars.count
                }
            }
        }

        /// A quoted string literal, unescaped as Python's `unicode-escape`
        /// codec does (what jinja2 applies to string literals).
        mutating func string(from start: Int) throws -> Int {
            let quote = src[start]
            var k = start + 1
            var s = String.UnicodeScalarView()
            while true {
                guard k < src.count else { throw error("unterminated string", line: lineOf(start)) }
                let u = src[k]
                if u == quote { break }
                guard u == "\\", k + 1 < src.count else {
                    s.append(u)
                    k += 1
                    continue
                }
                let e = src[k + 1]
                k += 2
                switch e {
                case "n": s.append("\n")
                case "t": s.append("\t")
                case "r": s.append("\r")
                case "\\": s.append("\\")
                case "'": s.append("'")
                case "\"": s.append("\"")
                case "a": s.append("\u{07}")
                case "b": s.append("\u{08}")
                case "f": s.append("\u{0C}")
                case "v": s.append("\u{0B}")
                case "\n": break
                case "x", "u", "U":
                    let n = e == "x" ? 2 : e == "u" ? 4 : 8
                    guard k + n <= src.count, let v = UInt32(String(String.UnicodeScalarView(src[k..<k + n])), radix: 16),
                          let scalar = Unicode.Scalar(v)
                    else { throw error("bad \\\(Character(e)) escape in a string", line: lineOf(start)) }
                    s.append(scalar)
                    k += n
                case "0"..."7":
                    var v = e.value - 48
                    var digits = 1
                    while digits < 3, k < src.count, ("0"..."7").contains(src[k]) {
                        v = v * 8 + src[k].value - 48
                        k += 1
                        digits += 1
                    }
                    s.append(Unicode.Scalar(v)!)
                default:
                    // Python keeps an unknown escape as written.
                    s.append("\\")
                    s.append(e)
                }
            }
            emit(.string(String(s)), at: start)
            return k + 1
        }

        /// An integer or float literal (digits with `_` separators, a
        /// fraction and/or exponent; `0x`/`0o`/`0b` integers).
        mutating func number(from start: Int) throws -> Int {
            func digits(_ k: inout Int, _ ok: (Unicode.Scalar) -> Bool) -> String {
                var s = ""
                while k < src.count, ok(src[k]) || (src[k] == "_" && k + 1 < src.count && ok(src[k + 1])) {
                    if src[k] != "_" { s.unicodeScalars.append(src[k]) }
                    k += 1
                }
                return s
            }
            let isDigit: (Unicode.Scalar) -> Bool = { ("0"..."9").contains($0) }
            var k = start
            if src[k] == "0", k + 1 < src.count, "xXoObB".unicodeScalars.contains(src[k + 1]) {
                let radix: Int = "xX".unicodeScalars.contains(src[k + 1]) ? 16 : "oO".unicodeScalars.contains(src[k + 1]) ? 8 : 2
                k += 2
                let d = digits(&k) { Int(String($0), radix: radix) != nil }
                guard let v = Int(d, radix: radix) else { throw error("bad integer literal", line: lineOf(start)) }
                emit(.int(v), at: start)
                return k
            }
            var text = digits(&k, isDigit)
            var isFloat = false
            if k + 1 < src.count, src[k] == ".", isDigit(src[k + 1]) {
                k += 1
                text += "." + digits(&k, isDigit)
                isFloat = true
            }
            if k < src.count, src[k] == "e" || src[k] == "E" {
                var m = k + 1
                var sign = ""
                if m < src.count, src[m] == "+" || src[m] == "-" {
                    sign = String(Character(src[m]))
                    m += 1
                }
                if m < src.count, isDigit(src[m]) {
                    text += "e" + sign + digits(&m, isDigit)
                    k = m
                    isFloat = true
                }
            }
            if isFloat {
                guard let d = Double(text) else { throw error("bad float literal", line: lineOf(start)) }
                emit(.float(d), at: start)
            } else {
                guard let v = Int(text) else { throw error("integer literal out of range", line: lineOf(start)) }
                emit(.int(v), at: start)
            }
            return k
        }
    }
}
