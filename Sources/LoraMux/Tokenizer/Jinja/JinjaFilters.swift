import Foundation

/// jinja2's built-in filters and tests that chat templates use, with
/// transformers' `tojson`. A template naming any other filter or test fails
/// to parse, as jinja2 refuses it at compile time.
extension JinjaRenderer {
    static let filterNames: Set<String> = [
        "abs", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float", "indent", "int",
        "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace",
        "reverse", "round", "safe", "select", "selectattr", "sort", "string", "sum", "title", "tojson", "trim",
        "unique", "upper", "wordcount",
    ]

    static let testNames: Set<String> = [
        "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped", "even", "false", "float", "ge",
        "greaterthan", "gt", "in", "integer", "iterable", "le", "lessthan", "lower", "lt", "mapping", "ne", "none",
        "number", "odd", "sameas", "sequence", "string", "true", "undefined", "upper", "==", "!=", "<", "<=", ">", ">=",
    ]

    static func checkFilter(_ name: String, line: Int) throws {
        guard filterNames.contains(name) else { throw JinjaError(.syntax, "template syntax error, line \(line): no filter named '\(name)'") }
    }

    static func checkTest(_ name: String, line: Int) throws {
        guard testNames.contains(name) else { throw JinjaError(.syntax, "template syntax error, line \(line): no test named '\(name)'") }
    }

    /// Arguments by position or keyword, as a Python signature binds them.
    struct Arguments {
        let positional: [JinjaValue]
        let keywords: [(String, JinjaValue)]
        let function: String

        func value(_ index: Int, _ name: String) -> JinjaValue? {
            if index >= 0, index < positional.count { return positional[index] }
            return keywords.first { $0.0 == name }?.1
        }

        func bool(_ index: Int, _ name: String, _ fallback: Bool) -> Bool { value(index, name)?.truthy ?? fallback }

        func string(_ index: Int, _ name: String) throws -> String? {
            guard let v = value(index, name), !v.equals(.none) else { return nil }
            guard case let .string(s) = v else { throw JinjaError(.runtime, "\(function): '\(name)' must be a string") }
            return s
        }
    }

    func filter(_ name: String, _ value: JinjaValue, _ argExprs: [JinjaExpr], _ kwargExprs: [(String, JinjaExpr)]) throws -> JinjaValue {
        let args = Arguments(positional: try argExprs.map(eval), keywords: try kwargExprs.map { ($0.0, try eval($0.1)) }, function: name)
        return try filter(name, value, args)
    }

    private func requireDefined(_ v: JinjaValue) throws {
        if case let .undefined(why) = v { throw JinjaError(.runtime, why) }
    }

    private func filter(_ name: String, _ value: JinjaValue, _ a: Arguments) throws -> JinjaValue {
        // A filter on a list or dict works on its printed form, which is bounded like any other text.
        func text() throws -> String { try boundedText(value) }
        switch name {
        case "trim": return .string(Self.pythonStrip(try text(), chars: try a.string(0, "chars")))
        case "length", "count":
            switch value {
            case .undefined: return .int(0)
            case let .string(s): return .int(s.unicodeScalars.count)
            case let .array(x), let .tuple(x): return .int(x.count)
            case let .dict(d): return .int(d.count)
            default: throw JinjaError(.runtime, "object of type '\(value.typeName)' has no len()")
            }
        case "upper": return .string(try text().uppercased())
        case "lower": return .string(try text().lowercased())
        case "capitalize": return .string(Self.capitalize(try text()))
        case "title": return .string(Self.jinjaTitle(try text()))
        case "string": return .string(try boundedText(value))
        case "safe": return value
        case "e", "escape": return .string(Self.htmlEscape(try text()))
        case "wordcount": return .int(try text().split { $0.isWhitespace || $0.isPunctuation }.count)
        case "tojson":
            let indent: String?
            switch a.value(0, "indent") {
            case nil, .none?: indent = nil
            case let .int(n)?: indent = String(repeating: " ", count: max(0, n))
            case let .string(s)?: indent = s
            default: throw JinjaError(.runtime, "tojson: indent must be an int or a string")
            }
            // Nesting times indent is the output's extra size; a sane indent keeps it near the value's own.
            guard (indent?.utf8.count ?? 0) <= 64 else { throw JinjaError(.runtime, "tojson: indent longer than 64") }
            try bound(textSize(value) * (1 + (indent?.utf8.count ?? 0)))
            var items = indent == nil ? ", " : ",", keys = ": "
            if let seps = a.value(1, "separators"), !seps.equals(.none) {
                guard let pair = try? seps.iterated(), pair.count == 2, case let .string(x) = pair[0], case let .string(y) = pair[1] else {
                    throw JinjaError(.runtime, "tojson: separators must be a pair of strings")
                }
                (items, keys) = (x, y)
            }
            return .string(try value.json(indent: indent, itemSeparator: items, keySeparator: keys, sortKeys: a.bool(2, "sort_keys", false)))
        case "d", "default":
            let fallback = a.value(0, "default_value") ?? .string("")
            if value.isUndefined || (a.bool(1, "boolean", false) && !value.truthy) { return fallback }
            return value
        case "int":
            let fallback = a.value(0, "default") ?? .int(0)
            switch value {
            case let .bool(b): return .int(b ? 1 : 0)
            case .int: return value
            case let .double(d): return d.isFinite && abs(d) < 9e18 ? .int(Int(d)) : fallback
            case let .string(s):
                let t = Self.pythonStrip(s, chars: nil).replacingOccurrences(of: "_", with: "")
                if let i = Int(t) { return .int(i) }
                if let d = Double(t), d.isFinite, abs(d) < 9e18 { return .int(Int(d)) }
                return fallback
            default: return fallback
            }
        case "float":
            let fallback = a.value(0, "default") ?? .double(0)
            switch value {
            case let .string(s): return Double(Self.pythonStrip(s, chars: nil)).map(JinjaValue.double) ?? fallback
            default: return value.numeric.map(JinjaValue.double) ?? fallback
            }
        case "abs":
            switch value {
            case let .int(i):
                guard i != Int.min else { throw JinjaError(.runtime, "integer overflow") }
                return .int(abs(i))
            case let .bool(b): return .int(b ? 1 : 0)
            case let .double(d): return .double(abs(d))
            default: throw JinjaError(.runtime, "bad operand type for abs(): '\(value.typeName)'")
            }
        case "round":
            guard let x = value.numeric else { throw JinjaError(.runtime, "round: a number is needed, not \(value.typeName)") }
            let precision = a.value(0, "precision")?.integer ?? 0
            let method = try a.string(1, "method") ?? "common"
            let scale = pow(10, Double(precision))
            let rule: FloatingPointRoundingRule
            switch method {
            case "common": rule = .toNearestOrEven
            case "ceil": rule = .up
            case "floor": rule = .down
            default: throw JinjaError(.runtime, "method must be common, ceil or floor")
            }
            return .double((x * scale).rounded(rule) / scale)
        case "first":
            try requireDefined(value)
            return try value.iterated().first ?? .undefined("no first item, sequence was empty")
        case "last":
            try requireDefined(value)
            return try value.iterated().last ?? .undefined("no last item, sequence was empty")
        case "list": return .array(try value.iterated())
        case "reverse":
            if case let .string(s) = value { return .string(String(String.UnicodeScalarView(s.unicodeScalars.reversed()))) }
            return .array(try value.iterated().reversed())
        case "items":
            switch value {
            case .undefined: return .array([])
            case let .dict(d): return .array(d.pairs.map { .tuple([.string($0.key), $0.value]) })
            default: throw JinjaError(.runtime, "items: can only get item pairs from a mapping")
            }
        case "dictsort":
            guard case let .dict(d) = value else { throw JinjaError(.runtime, "dictsort: can only sort a mapping") }
            let caseSensitive = a.bool(0, "case_sensitive", false)
            let byValue = try a.string(1, "by") == "value"
            let reverse = a.bool(2, "reverse", false)
            let pairs = try stableSort(d.pairs.map { JinjaValue.tuple([.string($0.key), $0.value]) }, reverse: reverse) { v in
                guard case let .tuple(p) = v else { return v }
                return Self.sortKey(p[byValue ? 1 : 0], caseSensitive: caseSensitive)
            }
            return .array(pairs)
        case "join":
            let sep = try a.string(0, "d") ?? ""
            let attr = try a.string(1, "attribute")
            let parts = try value.iterated().map { v in try attr.map { try self.path(v, $0) } ?? v }
            try bound(parts.reduce(0) { $0 + textSize($1) + sep.utf8.count })
            return .string(try parts.map(boundedText).joined(separator: sep))
        case "replace":
            guard let old = try a.string(0, "old"), let new = try a.string(1, "new") else { throw JinjaError(.runtime, "replace takes two strings") }
            let text = try text()
            try bound(text.utf8.count + new.utf8.count * (text.unicodeScalars.count + 1))
            return .string(Self.pythonReplace(text, old, new, count: a.value(2, "count")?.integer ?? -1))
        case "indent":
            let width: String
            switch a.value(0, "width") {
            case nil: width = "    "
            case let .string(s)?: width = s
            case let v?:
                guard let n = v.integer else { throw JinjaError(.runtime, "indent: width must be an int or a string") }
                width = String(repeating: " ", count: max(0, n))
            }
            let text = try text()
            try bound(text.utf8.count + width.utf8.count * (Self.splitLines(text).count + 1))
            return .string(Self.indent(text, width, first: a.bool(1, "first", false), blank: a.bool(2, "blank", false)))
        case "sum":
            let attr = try a.string(0, "attribute")
            var total = a.value(1, "start") ?? .int(0)
            for item in try value.iterated() {
                total = try arithmeticAdd(total, try attr.map { try path(item, $0) } ?? item)
            }
            return total
        case "min", "max":
            let caseSensitive = a.bool(0, "case_sensitive", false)
            let attr = try a.string(1, "attribute")
            let items = try value.iterated()
            guard var best = items.first else { return .undefined("no \(name) item, sequence was empty") }
            func key(_ v: JinjaValue) throws -> JinjaValue { Self.sortKey(try attr.map { try path(v, $0) } ?? v, caseSensitive: caseSensitive) }
            for item in items.dropFirst() {
                let better = name == "min" ? try key(item).less(than: try key(best)) : try key(best).less(than: try key(item))
                if better { best = item }
            }
            return best
        case "sort":
            let reverse = a.bool(0, "reverse", false)
            let caseSensitive = a.bool(1, "case_sensitive", false)
            let attr = try a.string(2, "attribute")
            return .array(try stableSort(try value.iterated(), reverse: reverse) { v in
                Self.sortKey(try attr.map { try self.path(v, $0) } ?? v, caseSensitive: caseSensitive)
            })
        case "unique":
            let caseSensitive = a.bool(0, "case_sensitive", false)
            let attr = try a.string(1, "attribute")
            var seen: [JinjaValue] = []
            var out: [JinjaValue] = []
            for item in try value.iterated() {
                let key = Self.sortKey(try attr.map { try path(item, $0) } ?? item, caseSensitive: caseSensitive)
                if !seen.contains(where: { $0.equals(key) }) {
                    seen.append(key)
                    out.append(item)
                }
            }
            return .array(out)
        case "map":
            let items = try value.iterated()
            if let attr = try a.string(-1, "attribute") {
                let fallback = a.value(-1, "default")
                return .array(try items.map { item in
                    let v = try path(item, attr)
                    return v.isUndefined ? (fallback ?? v) : v
                })
            }
            guard case let .string(f)? = a.positional.first else { throw JinjaError(.runtime, "map needs a filter name or attribute=") }
            guard Self.filterNames.contains(f) else { throw JinjaError(.runtime, "no filter named '\(f)'") }
            let rest = Arguments(positional: Array(a.positional.dropFirst()), keywords: a.keywords, function: f)
            return .array(try items.map { try filter(f, $0, rest) })
        case "select", "reject":
            let keep = name == "select"
            return .array(try value.iterated().filter { item in
                guard case let .string(t)? = a.positional.first else { return item.truthy == keep }
                return try test(t, item, Array(a.positional.dropFirst())) == keep
            })
        case "selectattr", "rejectattr":
            let keep = name == "selectattr"
            guard case let .string(attr)? = a.positional.first else { throw JinjaError(.runtime, "\(name) needs an attribute name") }
            return .array(try value.iterated().filter { item in
                let v = try path(item, attr)
                guard a.positional.count > 1, case let .string(t) = a.positional[1] else { return v.truthy == keep }
                return try test(t, v, Array(a.positional.dropFirst(2))) == keep
            })
        default:
            throw JinjaError(.runtime, "no filter named '\(name)'")
        }
    }

    /// `a.b.c` (and `a.0`) as jinja2's attribute filters read it.
    private func path(_ value: JinjaValue, _ dotted: String) throws -> JinjaValue {
        var v = value
        for part in dotted.split(separator: ".", omittingEmptySubsequences: false) {
            if v.isUndefined { return v }
            v = try Int(part).map { try item(v, .int($0)) } ?? item(v, .string(String(part)))
        }
        return v
    }

    private func arithmeticAdd(_ a: JinjaValue, _ b: JinjaValue) throws -> JinjaValue {
        try eval(.binary("+", .literal(a), .literal(b)))
    }

    /// jinja2's sort key: strings lower-cased unless `case_sensitive`.
    static func sortKey(_ v: JinjaValue, caseSensitive: Bool) -> JinjaValue {
        if !caseSensitive, case let .string(s) = v { return .string(s.lowercased()) }
        return v
    }

    private func stableSort(_ items: [JinjaValue], reverse: Bool, key: (JinjaValue) throws -> JinjaValue) throws -> [JinjaValue] {
        let keyed = try items.enumerated().map { (offset: $0.offset, key: try key($0.element), value: $0.element) }
        var failure: Error?
        let sorted = keyed.sorted { x, y in
            do {
                if try x.key.less(than: y.key) { return !reverse }
                if try y.key.less(than: x.key) { return reverse }
            } catch {
                failure = failure ?? error
            }
            return x.offset < y.offset
        }
        if let failure { throw failure }
        return sorted.map(\.value)
    }

    /// jinja2's `title` filter: each word (after `-`, whitespace or an
    /// opening bracket) gets its first character upper-cased and the rest lower-cased.
    static func jinjaTitle(_ s: String) -> String {
        func isBreak(_ u: Unicode.Scalar) -> Bool { JinjaLexer.isSpace(u) || "-({[<".unicodeScalars.contains(u) }
        var out = ""
        var word = String.UnicodeScalarView()
        func flush() {
            if !word.isEmpty { out += capitalize(String(word)) }
            word = String.UnicodeScalarView()
        }
        for u in s.unicodeScalars {
            if isBreak(u) {
                flush()
                out.unicodeScalars.append(u)
            } else {
                word.append(u)
            }
        }
        flush()
        return out
    }

    /// markupsafe's escape: `& < > " '`.
    static func htmlEscape(_ s: String) -> String {
        var out = ""
        for c in s.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&#34;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    /// jinja2's `indent`: every line but the first (and, with `first`, that
    /// one too) gets the prefix; blank lines only with `blank`.
    static func indent(_ s: String, _ prefix: String, first: Bool, blank: Bool) -> String {
        var lines = splitLines(s + "\n")
        var rv: String
        if blank {
            rv = lines.joined(separator: "\n" + prefix)
        } else {
            rv = lines.isEmpty ? "" : lines.removeFirst()
            if !lines.isEmpty { rv += "\n" + lines.map { $0.isEmpty ? $0 : prefix + $0 }.joined(separator: "\n") }
        }
        return first ? prefix + rv : rv
    }

    // MARK: tests

    func test(_ name: String, _ v: JinjaValue, _ args: [JinjaValue]) throws -> Bool {
        func arg() throws -> JinjaValue {
            guard let a = args.first else { throw JinjaError(.runtime, "test '\(name)' needs an argument") }
            return a
        }
        switch name {
        case "defined": return !v.isUndefined
        case "undefined": return v.isUndefined
        case "none": if case .none = v { return true } else { return false }
        case "boolean": if case .bool = v { return true } else { return false }
        case "true": if case .bool(true) = v { return true } else { return false }
        case "false": if case .bool(false) = v { return true } else { return false }
        case "integer": if case .int = v { return true } else { return false }
        case "float": if case .double = v { return true } else { return false }
        case "number": return v.numeric != nil
        case "string": if case .string = v { return true } else { return false }
        case "mapping": if case .dict = v { return true } else { return false }
        case "callable": if case .function = v { return true } else { return false }
        case "iterable":
            switch v {
            case .undefined, .string, .array, .dict: return true
            default: return false
            }
        case "sequence":
            switch v {
            case .string, .array, .dict: return true
            default: return false
            }
        case "escaped": return false
        case "lower": if case let .string(s) = v { return s == s.lowercased() && s != s.uppercased() } else { return false }
        case "upper": if case let .string(s) = v { return s == s.uppercased() && s != s.lowercased() } else { return false }
        case "even", "odd":
            guard let i = v.integer else { throw JinjaError(.runtime, "test '\(name)' needs an integer, not \(v.typeName)") }
            return (i % 2 == 0) == (name == "even")
        case "divisibleby":
            guard let i = v.integer, let n = try arg().integer else { throw JinjaError(.runtime, "divisibleby needs integers") }
            guard n != 0 else { throw JinjaError(.runtime, "integer modulo by zero") }
            return i % n == 0
        case "eq", "equalto", "==": return v.equals(try arg())
        case "ne", "!=": return !v.equals(try arg())
        case "lt", "lessthan", "<": return try v.less(than: try arg())
        case "le", "<=": return try v.less(than: try arg()) || v.equals(try arg())
        case "gt", "greaterthan", ">": return try arg().less(than: v)
        case "ge", ">=": return try arg().less(than: v) || v.equals(try arg())
        case "in": return try contains(try arg(), v)
        case "sameas":
            let other = try arg()
            switch (v, other) {
            case (.none, .none): return true
            case let (.bool(a), .bool(b)): return a == b
            case let (.namespace(a), .namespace(b)): return a === b
            default: return false
            }
        default: throw JinjaError(.runtime, "no test named '\(name)'")
        }
    }
}
