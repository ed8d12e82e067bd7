import Foundation

/// A JSON value that keeps object keys in file order. PEFT matches
/// `rank_pattern`/`alpha_pattern` keys first-match-wins in the order Python
/// wrote them, so adapter configs are read with this instead of
/// JSONSerialization (which forgets the order).
public indirect enum OrderedJSON: Equatable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([OrderedJSON])
    case object([(String, OrderedJSON)])

    public static func == (a: OrderedJSON, b: OrderedJSON) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.number(x), .number(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.object(x), .object(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    public subscript(key: String) -> OrderedJSON? {
        if case let .object(kv) = self { return kv.first { $0.0 == key }?.1 }
        return nil
    }

    public var isNullOrEmpty: Bool {
        switch self {
        case .null: return true
        case let .bool(b): return !b
        case let .array(a): return a.isEmpty
        case let .object(o): return o.isEmpty
        case let .string(s): return s.isEmpty
        case .number: return false
        }
    }

    /// Plain Foundation value, for re-serialising.
    public var foundationValue: Any {
        switch self {
        case .null: return NSNull()
        case let .bool(b): return b
        case let .number(n): return n == n.rounded() && abs(n) < 1e15 ? Int(n) as Any : n as Any
        case let .string(s): return s
        case let .array(a): return a.map(\.foundationValue)
        case let .object(o): return Dictionary(o.map { ($0.0, $0.1.foundationValue) }, uniquingKeysWith: { _, b in b })
        }
    }

    public struct ParseError: Error, CustomStringConvertible {
        public let offset: Int
        public let reason: String
        public var description: String { "invalid JSON at byte \(offset): \(reason)" }
    }

    public static func parse(_ data: Data) throws -> OrderedJSON {
        var p = Parser(bytes: [UInt8](data))
        p.skipWS()
        let v = try p.value(depth: 0)
        p.skipWS()
        guard p.i == p.bytes.count else { throw ParseError(offset: p.i, reason: "trailing characters") }
        return v
    }

    struct Parser {
        let bytes: [UInt8]
        var i = 0

        mutating func skipWS() {
            while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x0A || bytes[i] == 0x0D || bytes[i] == 0x09 { i += 1 }
        }
        func fail(_ why: String) -> ParseError { ParseError(offset: i, reason: why) }

        mutating func literal(_ s: String, _ v: OrderedJSON) throws -> OrderedJSON {
            let u = Array(s.utf8)
            guard i + u.count <= bytes.count, Array(bytes[i..<(i + u.count)]) == u else { throw fail("unexpected token") }
            i += u.count
            return v
        }

        mutating func value(depth: Int) throws -> OrderedJSON {
            guard depth < 64 else { throw fail("nesting too deep") }
            guard i < bytes.count else { throw fail("unexpected end") }
            switch bytes[i] {
            case UInt8(ascii: "{"):
                i += 1
                var kv: [(String, OrderedJSON)] = []
                skipWS()
                if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(kv) }
                while true {
                    skipWS()
                    guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { throw fail("expected a key") }
                    let k = try string()
                    skipWS()
                    guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw fail("expected ':'") }
                    i += 1
                    skipWS()
                    kv.append((k, try value(depth: depth + 1)))
                    skipWS()
                    guard i < bytes.count else { throw fail("unexpected end") }
                    if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                    if bytes[i] == UInt8(ascii: "}") { i += 1; return .object(kv) }
                    throw fail("expected ',' or '}'")
                }
            case UInt8(ascii: "["):
                i += 1
                var a: [OrderedJSON] = []
                skipWS()
                if i < bytes.count, bytes[i] == UInt8(ascii: "]") { i += 1; return .array(a) }
                while true {
                    skipWS()
                    a.append(try value(depth: depth + 1))
                    skipWS()
                    guard i < bytes.count else { throw fail("unexpected end") }
                    if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                    if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(a) }
                    throw fail("expected ',' or ']'")
                }
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): return try literal("true", .bool(true))
            case UInt8(ascii: "f"): return try literal("false", .bool(false))
            case UInt8(ascii: "n"): return try literal("null", .null)
            case UInt8(ascii: "N"): return try literal("NaN", .number(.nan))
            case UInt8(ascii: "I"): return try literal("Infinity", .number(.infinity))
            default: return try number()
            }
        }

        mutating func number() throws -> OrderedJSON {
            let start = i
            // Fast path: plain integers (most of a packed adapter's header).
            var j = i, neg = false, v: Int64 = 0, digits = 0
            if j < bytes.count, bytes[j] == UInt8(ascii: "-") { neg = true; j += 1 }
            while j < bytes.count, (0x30...0x39).contains(bytes[j]), digits < 15 {
                v = v * 10 + Int64(bytes[j] - 0x30); j += 1; digits += 1
            }
            if digits > 0, j == bytes.count || !(bytes[j] == UInt8(ascii: ".") || bytes[j] == UInt8(ascii: "e")
                                                  || bytes[j] == UInt8(ascii: "E") || (0x30...0x39).contains(bytes[j])) {
                i = j
                return .number(Double(neg ? -v : v))
            }
            if i < bytes.count, bytes[i] == UInt8(ascii: "-") {
                i += 1
                if i < bytes.count, bytes[i] == UInt8(ascii: "I") { _ = try literal("Infinity", .null); return .number(-.infinity) }
            }
            while i < bytes.count, (0x30...0x39).contains(bytes[i]) || bytes[i] == UInt8(ascii: ".") || bytes[i] == UInt8(ascii: "e")
                    || bytes[i] == UInt8(ascii: "E") || bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-") { i += 1 }
            guard i > start, let d = Double(String(decoding: bytes[start..<i], as: UTF8.self)) else { throw fail("bad number") }
            return .number(d)
        }

        mutating func string() throws -> String {
            i += 1  // opening quote
            // Fast path: no escapes before the closing quote.
            var j = i
            while j < bytes.count, bytes[j] != UInt8(ascii: "\""), bytes[j] != UInt8(ascii: "\\") { j += 1 }
            if j < bytes.count, bytes[j] == UInt8(ascii: "\"") {
                let s = bytes.withUnsafeBufferPointer { String(decoding: UnsafeBufferPointer(rebasing: $0[i..<j]), as: UTF8.self) }
                i = j + 1
                return s
            }
            var out: [UInt8] = []
            while true {
                guard i < bytes.count else { throw fail("unterminated string") }
                let c = bytes[i]
                i += 1
                if c == UInt8(ascii: "\"") { break }
                if c != UInt8(ascii: "\\") { out.append(c); continue }
                guard i < bytes.count else { throw fail("unterminated escape") }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "u"):
                    var cp = try hex4()
                    if (0xD800..<0xDC00).contains(cp), i + 1 < bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") {
                        let next = i
                        i += 2
                        let lo = try hex4()
                        // Not a low surrogate: the high one stands alone (U+FFFD), the escape after it is read on its own.
                        if (0xDC00..<0xE000).contains(lo) { cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00) } else { i = next }
                    }
                    out.append(contentsOf: Array(String(Unicode.Scalar(cp).map(Character.init) ?? "\u{FFFD}").utf8))
                default: out.append(e)
                }
            }
            return String(decoding: out, as: UTF8.self)
        }

        mutating func hex4() throws -> UInt32 {
            guard i + 4 <= bytes.count, bytes[i..<(i + 4)].allSatisfy({ UInt8(ascii: "0")...UInt8(ascii: "9") ~= $0 || UInt8(ascii: "a")...UInt8(ascii: "f") ~= $0 | 0x20 }),
                  let v = UInt32(String(decoding: bytes[i..<(i + 4)], as: UTF8.self), radix: 16) else {
                throw fail("bad \\u escape")
            }
            i += 4
            return v
        }
    }
}
