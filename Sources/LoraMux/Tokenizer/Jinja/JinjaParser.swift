/// A parsed expression.
indirect enum JinjaExpr: Sendable {
    case literal(JinjaValue)
    case name(String)
    case list([JinjaExpr])
    case tuple([JinjaExpr])
    case dict([(JinjaExpr, JinjaExpr)])
    case attribute(JinjaExpr, String)
    case item(JinjaExpr, JinjaExpr)
    case slice(JinjaExpr, JinjaExpr?, JinjaExpr?, JinjaExpr?)
    case call(JinjaExpr, [JinjaExpr], [(String, JinjaExpr)])
    case filter(JinjaExpr, String, [JinjaExpr], [(String, JinjaExpr)])
    case test(JinjaExpr, String, [JinjaExpr], negated: Bool)
    case unary(String, JinjaExpr)
    case binary(String, JinjaExpr, JinjaExpr)
    /// `a < b < c`: each operator with its right operand.
    case compare(JinjaExpr, [(String, JinjaExpr)])
    /// `value if condition else otherwise` (`otherwise` nil: undefined).
    case conditional(value: JinjaExpr, condition: JinjaExpr, otherwise: JinjaExpr?)
}

/// A parsed statement.
indirect enum JinjaNode: Sendable {
    case text(String)
    case output(JinjaExpr)
    case ifs([(JinjaExpr, [JinjaNode])], otherwise: [JinjaNode])
    case forLoop(targets: [String], iterable: JinjaExpr, filter: JinjaExpr?, body: [JinjaNode], otherwise: [JinjaNode])
    case set(targets: [String], JinjaExpr)
    case setAttribute(object: String, attribute: String, JinjaExpr)
    case setBlock(String, filters: [(String, [JinjaExpr], [(String, JinjaExpr)])], body: [JinjaNode])
    case macro(name: String, parameters: [(String, JinjaExpr?)], body: [JinjaNode])
    case filterBlock(filters: [(String, [JinjaExpr], [(String, JinjaExpr)])], body: [JinjaNode])
    /// transformers' `{% generation %}` marks assistant text; it renders its body.
    case generation([JinjaNode])
    case breakLoop, continueLoop
}

/// A recursive-descent parser with jinja2's grammar and operator
/// precedence (lowest first): `x if c else y`, `or`, `and`, `not`,
/// comparisons and `in`, `+ -`, `~`, `* / // %`, `**`, unary `- +`, then
/// postfix `.a [i] (args)`, filters `|f` and tests `is t`.
struct JinjaParser {
    private let tokens: [JinjaToken]
    private var i = 0
    /// How deeply statements and expressions nest; bounded so a hostile
    /// template fails to parse instead of overflowing the stack.
    private var depth = 0
    static let maxDepth = 200

    init(tokens: [JinjaToken]) { self.tokens = tokens }

    static func parse(_ source: String) throws -> [JinjaNode] {
        var p = JinjaParser(tokens: try JinjaLexer.tokenize(source))
        let (body, end) = try p.statements(until: [])
        assert(end == nil)
        return body
    }

    // MARK: tokens

    private var current: JinjaToken.Kind { tokens[i].kind }
    private var line: Int { tokens[i].line }

    private func peek(_ k: Int = 1) -> JinjaToken.Kind { tokens[min(i + k, tokens.count - 1)].kind }

    private mutating func advance() { if i < tokens.count - 1 { i += 1 } }

    private func error(_ message: String) -> JinjaError {
        JinjaError(.syntax, "template syntax error, line \(line): \(message)")
    }

    private func isOp(_ op: String) -> Bool { current == .op(op) }
    private func isName(_ n: String) -> Bool { current == .name(n) }

    private mutating func skip(op: String) -> Bool {
        guard isOp(op) else { return false }
        advance()
        return true
    }

    private mutating func skip(name: String) -> Bool {
        guard isName(name) else { return false }
        advance()
        return true
    }

    private mutating func expect(op: String) throws {
        guard skip(op: op) else { throw error("expected '\(op)', got \(describe(current))") }
    }

    private mutating func expect(name: String) throws {
        guard skip(name: name) else { throw error("expected '\(name)', got \(describe(current))") }
    }

    private mutating func expectName() throws -> String {
        guard case let .name(n) = current else { throw error("expected a name, got \(describe(current))") }
        advance()
        return n
    }

    private mutating func expectBlockEnd() throws {
        guard current == .blockEnd else { throw error("expected the end of the tag, got \(describe(current))") }
        advance()
    }

    private func describe(_ k: JinjaToken.Kind) -> String {
        switch k {
        case let .text(t): return "text '\(t.prefix(20))'"
        case .varBegin: return "'{{'"
        case .varEnd: return "'}}'"
        case .blockBegin: return "'{%'"
        case .blockEnd: return "'%}'"
        case let .name(n): return "'\(n)'"
        case let .string(s): return "string '\(s.prefix(20))'"
        case let .int(v): return "\(v)"
        case let .float(v): return "\(v)"
        case let .op(o): return "'\(o)'"
        case .eof: return "the end of the template"
        }
    }

    // MARK: statements

    /// Statements up to a block tag whose first name is in `ends` (consumed,
    /// with that name returned; the rest of its tag is the caller's).
    private mutating func statements(until ends: Set<String>) throws -> ([JinjaNode], String?) {
        var body: [JinjaNode] = []
        while true {
            switch current {
            case let .text(t):
                body.append(.text(t))
                advance()
            case .varBegin:
                advance()
                let e = try tuple()
                guard current == .varEnd else { throw error("expected '}}', got \(describe(current))") }
                advance()
                body.append(.output(e))
            case .blockBegin:
                advance()
                if case let .name(n) = current, ends.contains(n) {
                    advance()
                    return (body, n)
                }
                body.append(try statement())
            case .eof:
                guard ends.isEmpty else {
                    throw error("unexpected end of template; expected " + ends.sorted().map { "'\($0)'" }.joined(separator: " or "))
                }
                return (body, nil)
            default:
                throw error("unexpected \(describe(current))")
            }
        }
    }

    private mutating func body(until ends: Set<String>) throws -> ([JinjaNode], String) {
        let (nodes, end) = try statements(until: ends)
        return (nodes, end!)
    }

    private mutating func nest() throws {
        depth += 1
        guard depth <= Self.maxDepth else { throw error("nested more than \(Self.maxDepth) deep") }
    }

    private mutating func statement() throws -> JinjaNode {
        try nest()
        defer { depth -= 1 }
        let keyword = try expectName()
        switch keyword {
        case "if":
            var branches: [(JinjaExpr, [JinjaNode])] = []
            var condition = try tuple(conditional: false)
            while true {
                try expectBlockEnd()
                let (nodes, end) = try body(until: ["elif", "else", "endif"])
                branches.append((condition, nodes))
                switch end {
                case "elif": condition = try tuple(conditional: false)
                case "else":
                    try expectBlockEnd()
                    let (otherwise, _) = try body(until: ["endif"])
                    try expectBlockEnd()
                    return .ifs(branches, otherwise: otherwise)
                default:
                    try expectBlockEnd()
                    return .ifs(branches, otherwise: [])
                }
            }
        case "for":
            var targets = [try expectName()]
            while skip(op: ",") { targets.append(try expectName()) }
            try expect(name: "in")
            let iterable = try tuple(conditional: false)
            let filter = skip(name: "if") ? try expression() : nil
            if isName("recursive") { throw error("recursive loops are not supported") }
            try expectBlockEnd()
            let (nodes, end) = try body(until: ["else", "endfor"])
            var otherwise: [JinjaNode] = []
            if end == "else" {
                try expectBlockEnd()
                (otherwise, _) = try body(until: ["endfor"])
            }
            try expectBlockEnd()
            return .forLoop(targets: targets, iterable: iterable, filter: filter, body: nodes, otherwise: otherwise)
        case "set":
            let first = try expectName()
            if skip(op: ".") {
                let attribute = try expectName()
                try expect(op: "=")
                let value = try tuple()
                try expectBlockEnd()
                return .setAttribute(object: first, attribute: attribute, value)
            }
            var targets = [first]
            while skip(op: ",") { targets.append(try expectName()) }
            if skip(op: "=") {
                let value = try tuple()
                try expectBlockEnd()
                return .set(targets: targets, value)
            }
            guard targets.count == 1 else { throw error("a block set assigns one name") }
            let filters = try filterChain()
            try expectBlockEnd()
            let (nodes, _) = try body(until: ["endset"])
            try expectBlockEnd()
            return .setBlock(first, filters: filters, body: nodes)
        case "macro":
            let name = try expectName()
            try expect(op: "(")
            var parameters: [(String, JinjaExpr?)] = []
            while !skip(op: ")") {
                if !parameters.isEmpty { try expect(op: ",") }
                if skip(op: ")") { break }
                let p = try expectName()
                parameters.append((p, skip(op: "=") ? try expression() : nil))
            }
            try expectBlockEnd()
            let (nodes, _) = try body(until: ["endmacro"])
            if case .name = current { advance() }  // `{% endmacro name %}`
            try expectBlockEnd()
            return .macro(name: name, parameters: parameters, body: nodes)
        case "filter":
            let filters = try filterChain(leadingBar: false)
            try expectBlockEnd()
            let (nodes, _) = try body(until: ["endfilter"])
            try expectBlockEnd()
            return .filterBlock(filters: filters, body: nodes)
        case "generation":
            try expectBlockEnd()
            let (nodes, _) = try body(until: ["endgeneration"])
            try expectBlockEnd()
            return .generation(nodes)
        case "break", "continue":
            try expectBlockEnd()
            return keyword == "break" ? .breakLoop : .continueLoop
        default:
            throw error("unknown or unsupported tag '\(keyword)'")
        }
    }

    /// `| f(args) | g` after a block `set` or `filter` tag.
    private mutating func filterChain(leadingBar: Bool = true) throws -> [(String, [JinjaExpr], [(String, JinjaExpr)])] {
        var out: [(String, [JinjaExpr], [(String, JinjaExpr)])] = []
        var needBar = leadingBar
        while !needBar || skip(op: "|") {
            needBar = true
            let name = try filterName()
            try JinjaRenderer.checkFilter(name, line: line)
            let (args, kwargs) = isOp("(") ? try callArguments() : ([], [])
            out.append((name, args, kwargs))
        }
        return out
    }

    // MARK: expressions

    /// An expression, or a tuple of them separated by commas (a list value).
    private mutating func tuple(conditional: Bool = true) throws -> JinjaExpr {
        let first = conditional ? try expression() : try or()
        guard isOp(",") else { return first }
        var items = [first]
        while skip(op: ",") {
            if current == .varEnd || current == .blockEnd || isOp(")") || isName("in") { break }
            items.append(conditional ? try expression() : try or())
        }
        return .tuple(items)
    }

    private mutating func expression() throws -> JinjaExpr {
        var value = try or()
        while skip(name: "if") {
            let condition = try or()
            let otherwise = skip(name: "else") ? try expression() : nil
            value = .conditional(value: value, condition: condition, otherwise: otherwise)
        }
        return value
    }

    private mutating func or() throws -> JinjaExpr {
        var left = try and()
        while skip(name: "or") { left = .binary("or", left, try and()) }
        return left
    }

    private mutating func and() throws -> JinjaExpr {
        var left = try not()
        while skip(name: "and") { left = .binary("and", left, try not()) }
        return left
    }

    private mutating func not() throws -> JinjaExpr {
        if skip(name: "not") { return .unary("not", try not()) }
        return try compare()
    }

    private mutating func compare() throws -> JinjaExpr {
        let first = try sum()
        var ops: [(String, JinjaExpr)] = []
        while true {
            if case let .op(o) = current, ["==", "!=", "<", "<=", ">", ">="].contains(o) {
                advance()
                ops.append((o, try sum()))
            } else if skip(name: "in") {
                ops.append(("in", try sum()))
            } else if isName("not"), peek() == .name("in") {
                advance()
                advance()
                ops.append(("not in", try sum()))
            } else {
                break
            }
        }
        return ops.isEmpty ? first : .compare(first, ops)
    }

    private mutating func sum() throws -> JinjaExpr {
        var left = try concat()
        while case let .op(o) = current, o == "+" || o == "-" {
            advance()
            left = .binary(o, left, try concat())
        }
        return left
    }

    private mutating func concat() throws -> JinjaExpr {
        var left = try product()
        while skip(op: "~") { left = .binary("~", left, try product()) }
        return left
    }

    private mutating func product() throws -> JinjaExpr {
        var left = try power()
        while case let .op(o) = current, ["*", "/", "//", "%"].contains(o) {
            advance()
            left = .binary(o, left, try power())
        }
        return left
    }

    private mutating func power() throws -> JinjaExpr {
        var left = try unary()
        while skip(op: "**") { left = .binary("**", left, try unary()) }
        return left
    }

    private mutating func unary(withFilters: Bool = true) throws -> JinjaExpr {
        try nest()
        defer { depth -= 1 }
        var node: JinjaExpr
        if case let .op(o) = current, o == "-" || o == "+" {
            advance()
            node = .unary(o, try unary(withFilters: false))
        } else {
            node = try primary()
        }
        node = try postfix(node)
        return withFilters ? try filters(node) : node
    }

    private mutating func primary() throws -> JinjaExpr {
        switch current {
        case let .name(n):
            advance()
            switch n {
            case "true", "True": return .literal(.bool(true))
            case "false", "False": return .literal(.bool(false))
            case "none", "None": return .literal(.none)
            default: return .name(n)
            }
        case let .string(s):
            advance()
            var text = s
            while case let .string(more) = current {
                text += more
                advance()
            }
            return .literal(.string(text))
        case let .int(v):
            advance()
            return .literal(.int(v))
        case let .float(v):
            advance()
            return .literal(.double(v))
        case .op("("):
            advance()
            if skip(op: ")") { return .tuple([]) }
            let e = try tuple()
            try expect(op: ")")
            return e
        case .op("["):
            advance()
            var items: [JinjaExpr] = []
            while !skip(op: "]") {
                if !items.isEmpty { try expect(op: ",") }
                if skip(op: "]") { break }
                items.append(try expression())
            }
            return .list(items)
        case .op("{"):
            advance()
            var pairs: [(JinjaExpr, JinjaExpr)] = []
            while !skip(op: "}") {
                if !pairs.isEmpty { try expect(op: ",") }
                if skip(op: "}") { break }
                let key = try expression()
                try expect(op: ":")
                pairs.append((key, try expression()))
            }
            return .dict(pairs)
        default:
            throw error("unexpected \(describe(current))")
        }
    }

    private mutating func postfix(_ start: JinjaExpr) throws -> JinjaExpr {
        var node = start
        while true {
            if isOp(".") || isOp("[") {
                node = try subscripted(node)
            } else if isOp("(") {
                let (args, kwargs) = try callArguments()
                node = .call(node, args, kwargs)
            } else {
                return node
            }
        }
    }

    private mutating func filters(_ start: JinjaExpr) throws -> JinjaExpr {
        var node = start
        while true {
            if skip(op: "|") {
                let name = try filterName()
                try JinjaRenderer.checkFilter(name, line: line)
                let (args, kwargs) = isOp("(") ? try callArguments() : ([], [])
                node = .filter(node, name, args, kwargs)
            } else if skip(name: "is") {
                let negated = skip(name: "not")
                let name = try filterName()
                try JinjaRenderer.checkTest(name, line: line)
                var args: [JinjaExpr] = []
                if isOp("(") {
                    let (a, kwargs) = try callArguments()
                    guard kwargs.isEmpty else { throw error("tests take no keyword arguments") }
                    args = a
                } else if startsArgument, !(isName("else") || isName("or") || isName("and")) {
                    args = [try postfix(try primary())]
                }
                node = .test(node, name, args, negated: negated)
            } else if isOp("(") {
                let (args, kwargs) = try callArguments()
                node = .call(node, args, kwargs)
            } else {
                return node
            }
        }
    }

    /// Whether the current token can start the one bare argument of a test (`is divisibleby 3`).
    private var startsArgument: Bool {
        switch current {
        case .name, .string, .int, .float, .op("("), .op("["), .op("{"): return true
        default: return false
        }
    }

    private mutating func filterName() throws -> String {
        var name = try expectName()
        while isOp("."), case .name = peek() {
            advance()
            name += "." + (try expectName())
        }
        return name
    }

    private mutating func subscripted(_ node: JinjaExpr) throws -> JinjaExpr {
        if skip(op: ".") {
            switch current {
            case let .name(n):
                advance()
                return .attribute(node, n)
            case let .int(v):
                advance()
                return .item(node, .literal(.int(v)))
            default:
                throw error("expected an attribute name after '.', got \(describe(current))")
            }
        }
        try expect(op: "[")
        var parts: [JinjaExpr?] = [nil]
        var isSlice = false
        while !isOp("]") {
            if skip(op: ":") {
                isSlice = true
                parts.append(nil)
                guard parts.count <= 3 else { throw error("a slice has at most three parts") }
            } else {
                guard parts[parts.count - 1] == nil else { throw error("expected ']', got \(describe(current))") }
                parts[parts.count - 1] = try expression()
            }
        }
        advance()
        if isSlice {
            while parts.count < 3 { parts.append(nil) }
            return .slice(node, parts[0], parts[1], parts[2])
        }
        guard let index = parts[0] else { throw error("empty subscript") }
        return .item(node, index)
    }

    private mutating func callArguments() throws -> ([JinjaExpr], [(String, JinjaExpr)]) {
        try expect(op: "(")
        var args: [JinjaExpr] = []
        var kwargs: [(String, JinjaExpr)] = []
        while !skip(op: ")") {
            if !(args.isEmpty && kwargs.isEmpty) { try expect(op: ",") }
            if skip(op: ")") { break }
            if isOp("*") || isOp("**") { throw error("*args and **kwargs in calls are not supported") }
            if case let .name(n) = current, peek() == .op("=") {
                advance()
                advance()
                kwargs.append((n, try expression()))
            } else {
                guard kwargs.isEmpty else { throw error("a positional argument follows a keyword argument") }
                args.append(try expression())
            }
        }
        return (args, kwargs)
    }
}
