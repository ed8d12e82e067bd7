import Foundation

/// A value inside a Jinja template: Python's types as jinja2 sees them, so
/// that printing, comparing and `tojson` give the same text transformers'
/// renderer gives.
enum JinjaValue: Sendable {
    /// A name or key that does not exist. Prints as nothing, is falsy and
    /// iterates as empty; arithmetic on it or an attribute of it is an error,
    /// as in jinja2's default `Undefined`. The payload is that error's message
    /// (`'x' is undefined`, `'dict object' has no attribute 'y'`).
    case undefined(String)
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JinjaValue])
    /// A Python tuple: `dict.items()` pairs and `(a, b)` literals; prints with parentheses.
    case tuple([JinjaValue])
    case dict(JinjaDict)
    /// `namespace(...)`: the one mutable object templates have (`set ns.x = ...`).
    case namespace(JinjaNamespace)
    case function(JinjaFunction)

    var isUndefined: Bool {
        if case .undefined = self { return true }
        return false
    }

    /// Python truthiness (an undefined value is false).
    var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case let .bool(b): return b
        case let .int(i): return i != 0
        case let .double(d): return d != 0
        case let .string(s): return !s.isEmpty
        case let .array(a), let .tuple(a): return !a.isEmpty
        case let .dict(d): return !d.isEmpty
        case .namespace, .function: return true
        }
    }

    /// Python's type name, for error messages that match jinja2's.
    var typeName: String {
        switch self {
        case .undefined: return "Undefined"
        case .none: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .double: return "float"
        case .string: return "str"
        case .array: return "list"
        case .tuple: return "tuple"
        case .dict: return "dict"
        case .namespace: return "Namespace"
        case .function: return "function"
        }
    }

    /// `str(value)`: what `{{ value }}` prints.
    var text: String {
        switch self {
        case .undefined: return ""
        case let .string(s): return s
        default: return repr
        }
    }

    /// Python `repr(value)`: how a value prints inside a list or dict.
    var repr: String {
        switch self {
        case .undefined: return ""
        case .none: return "None"
        case let .bool(b): return b ? "True" : "False"
        case let .int(i): return String(i)
        case let .double(d): return Self.pythonFloat(d)
        case let .string(s): return Self.pythonRepr(s)
        case let .array(a): return "[" + a.map(\.repr).joined(separator: ", ") + "]"
        case let .tuple(a): return "(" + a.map(\.repr).joined(separator: ", ") + (a.count == 1 ? ",)" : ")")
        case let .dict(d):
            return "{" + d.pairs.map { Self.pythonRepr($0.key) + ": " + $0.value.repr }.joined(separator: ", ") + "}"
        case let .namespace(n): return "<Namespace \(n.values.pairs.map { "\($0.key)=\($0.value.repr)" }.joined(separator: ", "))>"
        case let .function(f): return "<function \(f.name)>"
        }
    }

    /// Python's `repr(float)`: the shortest text that reads back the same
    /// number, with `.0` on integral values and an exponent from 1e16 up and
    /// below 1e-4 (Swift's `description` agrees on all of these).
    static func pythonFloat(_ d: Double) -> String {
        if d.isNaN { return "nan" }
        if d.isInfinite { return d < 0 ? "-inf" : "inf" }
        return d.description
    }

    /// Python's `repr(str)`: single quotes unless the text has a single quote
    /// and no double quote; backslash escapes for the quote, `\\`, `\n`, `\r`,
    /// `\t` and other non-printable characters.
    static func pythonRepr(_ s: String) -> String {
        let quote: Character = s.contains("'") && !s.contains("\"") ? "\"" : "'"
        var out = String(quote)
        for u in s.unicodeScalars {
            switch u {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if Character(u) == quote {
                    out += "\\" + String(quote)
                } else if u.value < 0x20 || u.value == 0x7F {
                    out += String(format: "\\x%02x", u.value)
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        out.append(quote)
        return out
    }
}

/// A Python dict with string keys, in insertion order.
struct JinjaDict: Sendable {
    private(set) var keys: [String] = []
    private var storage: [String: JinjaValue] = [:]

    init() {}

    init(_ pairs: [(String, JinjaValue)]) {
        for (k, v) in pairs { self[k] = v }
    }

    subscript(key: String) -> JinjaValue? {
        get { storage[key] }
        set {
            if let newValue {
                if storage.updateValue(newValue, forKey: key) == nil { keys.append(key) }
            } else if storage.removeValue(forKey: key) != nil {
                keys.removeAll { $0 == key }
            }
        }
    }

    var isEmpty: Bool { keys.isEmpty }
    var count: Int { keys.count }
    var pairs: [(key: String, value: JinjaValue)] { keys.map { ($0, storage[$0]!) } }
}

/// `namespace(...)`'s object; a class because `set ns.x = ...` inside a loop
/// must be seen after it.
final class JinjaNamespace: @unchecked Sendable {
    // Only the renderer that made it touches it, on one thread.
    var values: JinjaDict

    init(_ values: JinjaDict) { self.values = values }
}

/// A callable: a global (`range`, `raise_exception`...), a bound method
/// (`'x'.strip`), a macro or `loop.cycle`.
struct JinjaFunction: Sendable {
    let name: String
    let call: @Sendable (_ args: [JinjaValue], _ kwargs: [(String, JinjaValue)], _ renderer: JinjaRenderer) throws -> JinjaValue
}

/// Why a template could not be parsed or rendered: a syntax error (with its
/// line), an error the template raised itself (`raise_exception`), or a
/// runtime error such as an undefined name in arithmetic.
public struct JinjaError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: Sendable, Equatable { case syntax, raised, runtime }
    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

extension JinjaValue {
    /// Python `==` (numbers compare across int, float and bool; an undefined
    /// value equals only another undefined one).
    func equals(_ other: JinjaValue) -> Bool {
        switch (self, other) {
        case (.undefined, .undefined), (.none, .none): return true
        case let (.string(a), .string(b)): return a == b
        case let (.array(a), .array(b)), let (.tuple(a), .tuple(b)): return a.count == b.count && zip(a, b).allSatisfy { $0.equals($1) }
        case let (.dict(a), .dict(b)):
            return a.count == b.count && a.pairs.allSatisfy { p in b[p.key].map { p.value.equals($0) } ?? false }
        case let (.namespace(a), .namespace(b)): return a === b
        default:
            if let x = numeric, let y = other.numeric { return x == y }
            return false
        }
    }

    /// The value as a number for arithmetic and comparison (bool is an int in Python).
    var numeric: Double? {
        switch self {
        case let .bool(b): return b ? 1 : 0
        case let .int(i): return Double(i)
        case let .double(d): return d
        default: return nil
        }
    }

    /// The value as a Python int (bool included), else nil.
    var integer: Int? {
        switch self {
        case let .bool(b): return b ? 1 : 0
        case let .int(i): return i
        default: return nil
        }
    }

    /// Python `<` between two values, or an error for types Python will not order.
    func less(than other: JinjaValue) throws -> Bool {
        switch (self, other) {
        case let (.string(a), .string(b)): return a.unicodeScalars.lexicographicallyPrecedes(b.unicodeScalars)
        case let (.array(a), .array(b)), let (.tuple(a), .tuple(b)):
            for (x, y) in zip(a, b) where !x.equals(y) { return try x.less(than: y) }
            return a.count < b.count
        default:
            if case let .int(a) = self, case let .int(b) = other { return a < b }
            if let x = numeric, let y = other.numeric { return x < y }
            if case let .undefined(why) = self { throw JinjaError(.runtime, why) }
            if case let .undefined(why) = other { throw JinjaError(.runtime, why) }
            throw JinjaError(.runtime, "'<' not supported between instances of '\(typeName)' and '\(other.typeName)'")
        }
    }

    /// The items a `for` loop visits: a list's items, a dict's keys, a
    /// string's characters; nothing for an undefined value.
    func iterated() throws -> [JinjaValue] {
        switch self {
        case .undefined: return []
        case let .array(a), let .tuple(a): return a
        case let .dict(d): return d.keys.map(JinjaValue.string)
        case let .string(s): return s.unicodeScalars.map { .string(String($0)) }
        default: throw JinjaError(.runtime, "'\(typeName)' object is not iterable")
        }
    }
}

extension JinjaValue {
    /// transformers' `tojson` filter: `json.dumps(value, ensure_ascii=False,
    /// indent=..., separators=..., sort_keys=...)`.
    func json(indent: String?, itemSeparator: String, keySeparator: String, sortKeys: Bool, level: Int = 0) throws -> String {
        func nl(_ l: Int) -> String { indent.map { "\n" + String(repeating: $0, count: l) } ?? "" }
        switch self {
        case .none: return "null"
        case let .bool(b): return b ? "true" : "false"
        case let .int(i): return String(i)
        case let .double(d):
            if d.isNaN { return "NaN" }
            if d.isInfinite { return d < 0 ? "-Infinity" : "Infinity" }
            return Self.pythonFloat(d)
        case let .string(s): return Self.jsonString(s)
        case let .array(a), let .tuple(a):
            if a.isEmpty { return "[]" }
            let items = try a.map { try $0.json(indent: indent, itemSeparator: itemSeparator, keySeparator: keySeparator, sortKeys: sortKeys, level: level + 1) }
            return "[" + nl(level + 1) + items.joined(separator: itemSeparator + nl(level + 1)) + nl(level) + "]"
        case let .dict(d):
            if d.isEmpty { return "{}" }
            var pairs = d.pairs
            if sortKeys { pairs.sort { $0.key.unicodeScalars.lexicographicallyPrecedes($1.key.unicodeScalars) } }
            let items = try pairs.map {
                Self.jsonString($0.key) + keySeparator
                    + (try $0.value.json(indent: indent, itemSeparator: itemSeparator, keySeparator: keySeparator, sortKeys: sortKeys, level: level + 1))
            }
            return "{" + nl(level + 1) + items.joined(separator: itemSeparator + nl(level + 1)) + nl(level) + "}"
        case .undefined, .namespace, .function:
            throw JinjaError(.runtime, "Object of type \(typeName) is not JSON serializable")
        }
    }

    /// A JSON string as Python's json module writes it with `ensure_ascii=False`:
    /// only `"`, `\` and control characters are escaped.
    static func jsonString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if u.value < 0x20 { out += String(format: "\\u%04x", u.value) } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
}
