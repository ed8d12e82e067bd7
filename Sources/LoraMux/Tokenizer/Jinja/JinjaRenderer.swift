import Foundation

/// Runs a parsed template against a context, with the globals transformers'
/// chat-template environment defines (`raise_exception`, `strftime_now`,
/// `namespace`, `dict`, `range`) and jinja2's filters and tests that chat
/// templates use. Bounded: a template that loops or prints without end
/// stops with an error instead of taking the server with it.
final class JinjaRenderer {
    /// A 1000-message conversation through a long template takes about 20 000.
    static let maxSteps = 250_000
    static let maxOutputBytes = 4 << 20
    static let maxCallDepth = 64
    static let maxRange = 100_000

    private var scopes: [[String: JinjaValue]]
    private var out = ""
    private var steps = 0
    private var callDepth = 0
    private var loopDepth = 0
    /// Containers built around other containers. Printing, comparing and
    /// `tojson` recurse into values, so nesting is bounded by bounding these
    /// (chat templates build a handful).
    private var nestedBuilds = 0
    static let maxNestedBuilds = 256
    let now: Date

    init(context: [String: JinjaValue], now: Date) {
        self.now = now
        var globals = Self.globals
        for (k, v) in context { globals[k] = v }
        scopes = [globals]
    }

    func render(_ nodes: [JinjaNode]) throws -> String {
        _ = try run(nodes)
        return out
    }

    private enum Flow { case normal, breakLoop, continueLoop }

    private func tick() throws {
        steps += 1
        if steps > Self.maxSteps { throw JinjaError(.runtime, "the template ran more than \(Self.maxSteps) steps") }
    }

    private func write(_ s: String) throws {
        out += s
        if out.utf8.count > Self.maxOutputBytes { throw JinjaError(.runtime, "the template wrote more than \(Self.maxOutputBytes) bytes") }
    }

    /// Refuses a string the template is about to build when it would pass
    /// the output bound: doubling a string in a loop must fail, not exhaust memory.
    func bound(_ bytes: Int) throws {
        if bytes > Self.maxOutputBytes { throw JinjaError(.runtime, "the template built a string of more than \(Self.maxOutputBytes) bytes") }
    }

    /// About how many bytes `v.text` is, counted no further than past the bound.
    func textSize(_ v: JinjaValue) -> Int {
        var total = 0
        func add(_ v: JinjaValue) {
            guard total <= Self.maxOutputBytes else { return }
            switch v {
            case let .string(s): total += s.utf8.count + 2
            case let .array(a), let .tuple(a):
                total += 2
                for x in a { add(x); total += 2 }
            case let .dict(d):
                total += 2
                for p in d.pairs { total += p.key.utf8.count + 4; add(p.value) }
            case let .namespace(n): add(.dict(n.values))
            default: total += 24
            }
        }
        add(v)
        return total
    }

    /// `v.text`, refused when it would pass the bound.
    func boundedText(_ v: JinjaValue) throws -> String {
        if case let .string(s) = v { return s }
        try bound(textSize(v))
        return v.text
    }

    private func lookup(_ name: String) -> JinjaValue {
        for scope in scopes.reversed() {
            if let v = scope[name] { return v }
        }
        return .undefined("'\(name)' is undefined")
    }

    private func assign(_ name: String, _ value: JinjaValue) {
        scopes[scopes.count - 1][name] = value
    }

    /// Renders `nodes` into a string of its own (block `set`, `filter`, macros).
    private func capture(_ nodes: [JinjaNode]) throws -> String {
        let saved = out
        out = ""
        defer { out = saved }
        _ = try run(nodes)
        return out
    }

    // MARK: statements

    private func run(_ nodes: [JinjaNode]) throws -> Flow {
        for node in nodes {
            try tick()
            switch node {
            case let .text(t):
                try write(t)
            case let .output(e):
                try write(try boundedText(try eval(e)))
            case let .ifs(branches, otherwise):
                var taken: [JinjaNode] = otherwise
                for (condition, body) in branches where try eval(condition).truthy {
                    taken = body
                    break
                }
                let flow = try run(taken)
                if flow != .normal { return flow }
            case let .forLoop(targets, iterable, filter, body, otherwise):
                try forLoop(targets: targets, iterable: iterable, filter: filter, body: body, otherwise: otherwise)
            case let .set(targets, e):
                let value = try eval(e)
                if targets.count == 1 {
                    assign(targets[0], value)
                } else {
                    let items = try value.iterated()
                    guard items.count == targets.count else {
                        throw JinjaError(.runtime, "cannot unpack \(items.count) values into \(targets.count) names")
                    }
                    for (t, v) in zip(targets, items) { assign(t, v) }
                }
            case let .setAttribute(object, attribute, e):
                guard case let .namespace(ns) = lookup(object) else {
                    throw JinjaError(.runtime, "cannot assign attribute on non-namespace object '\(object)'")
                }
                let value = try eval(e)
                // A namespace inside a namespace could hold itself; printing that would never end.
                guard !Self.holdsNamespace(value) else {
                    throw JinjaError(.runtime, "a namespace attribute cannot hold a namespace")
                }
                ns.values[attribute] = value
            case let .setBlock(name, filters, body):
                var value = JinjaValue.string(try capture(body))
                for (f, args, kwargs) in filters { value = try filter(f, value, args, kwargs) }
                assign(name, value)
            case let .macro(name, parameters, body):
                assign(name, macro(name: name, parameters: parameters, body: body))
            case let .filterBlock(filters, body):
                var value = JinjaValue.string(try capture(body))
                for (f, args, kwargs) in filters { value = try filter(f, value, args, kwargs) }
                try write(value.text)
            case let .generation(body):
                let flow = try run(body)
                if flow != .normal { return flow }
            case .breakLoop, .continueLoop:
                guard loopDepth > 0 else { throw JinjaError(.syntax, "'break' or 'continue' outside a loop") }
                if case .breakLoop = node { return .breakLoop }
                return .continueLoop
            }
        }
        return .normal
    }

    private func bind(_ targets: [String], _ item: JinjaValue) throws {
        if targets.count == 1 {
            assign(targets[0], item)
            return
        }
        let parts = try item.iterated()
        guard parts.count == targets.count else {
            throw JinjaError(.runtime, "cannot unpack \(parts.count) values into \(targets.count) loop variables")
        }
        for (t, v) in zip(targets, parts) { assign(t, v) }
    }

    /// A `for` loop: each pass in a scope of its own (what it sets is gone
    /// after the pass, as in jinja2), with `loop` describing the pass.
    private func forLoop(targets: [String], iterable: JinjaExpr, filter: JinjaExpr?, body: [JinjaNode], otherwise: [JinjaNode]) throws {
        var items = try eval(iterable).iterated()
        if let filter {
            var kept: [JinjaValue] = []
            for item in items {
                try tick()
                scopes.append([:])
                defer { scopes.removeLast() }
                try bind(targets, item)
                if try eval(filter).truthy { kept.append(item) }
            }
            items = kept
        }
        if items.isEmpty {
            _ = try run(otherwise)
            return
        }
        loopDepth += 1
        defer { loopDepth -= 1 }
        let n = items.count
        for (index, item) in items.enumerated() {
            try tick()
            var loop = JinjaDict()
            loop["index"] = .int(index + 1)
            loop["index0"] = .int(index)
            loop["revindex"] = .int(n - index)
            loop["revindex0"] = .int(n - index - 1)
            loop["first"] = .bool(index == 0)
            loop["last"] = .bool(index == n - 1)
            loop["length"] = .int(n)
            loop["depth"] = .int(1)
            loop["depth0"] = .int(0)
            if index > 0 { loop["previtem"] = items[index - 1] }
            if index < n - 1 { loop["nextitem"] = items[index + 1] }
            loop["cycle"] = .function(JinjaFunction(name: "loop.cycle") { args, _, _ in
                guard !args.isEmpty else { throw JinjaError(.runtime, "no items for cycling given") }
                return args[index % args.count]
            })
            scopes.append(["loop": .dict(loop)])
            defer { scopes.removeLast() }
            try bind(targets, item)
            if try run(body) == .breakLoop { break }
        }
    }

    /// A macro: called with positional or keyword arguments, it renders its
    /// body in a scope of its own over the template's globals and returns the text.
    private func macro(name: String, parameters: [(String, JinjaExpr?)], body: [JinjaNode]) -> JinjaValue {
        .function(JinjaFunction(name: name) { args, kwargs, r in
            guard args.count <= parameters.count else {
                throw JinjaError(.runtime, "macro '\(name)' takes not more than \(parameters.count) argument(s)")
            }
            var frame: [String: JinjaValue] = [:]
            for (k, (p, _)) in parameters.enumerated() where k < args.count { frame[p] = args[k] }
            for (k, v) in kwargs {
                guard parameters.contains(where: { $0.0 == k }) else {
                    throw JinjaError(.runtime, "macro '\(name)' takes no keyword argument '\(k)'")
                }
                frame[k] = v
            }
            guard r.callDepth < Self.maxCallDepth else { throw JinjaError(.runtime, "macros nested more than \(Self.maxCallDepth) deep") }
            let saved = r.scopes
            r.scopes = [r.scopes[0], frame]
            r.callDepth += 1
            let savedLoops = r.loopDepth
            r.loopDepth = 0
            defer {
                r.scopes = saved
                r.callDepth -= 1
                r.loopDepth = savedLoops
            }
            for (p, d) in parameters where frame[p] == nil {
                r.scopes[1][p] = try d.map { try r.eval($0) } ?? .undefined("parameter '\(p)' was not provided")
            }
            return .string(try r.capture(body))
        })
    }

    // MARK: expressions

    func eval(_ e: JinjaExpr) throws -> JinjaValue {
        switch e {
        case let .literal(v): return v
        case let .name(n): return lookup(n)
        case let .list(items): return .array(try counted(try items.map(eval)))
        case let .tuple(items): return .tuple(try counted(try items.map(eval)))
        case let .dict(pairs):
            var d = JinjaDict()
            for (k, v) in pairs {
                let key = try eval(k)
                guard case let .string(s) = key else { throw JinjaError(.runtime, "dict keys must be strings here, not \(key.typeName)") }
                d[s] = try eval(v)
            }
            _ = try counted(d.pairs.map(\.value))
            return .dict(d)
        case let .attribute(object, name): return try attribute(try eval(object), name)
        case let .item(object, index): return try item(try eval(object), try eval(index))
        case let .slice(object, start, stop, step):
            return try slice(try eval(object), try start.map(eval), try stop.map(eval), try step.map(eval))
        case let .call(f, args, kwargs):
            let callee = try eval(f)
            guard case let .function(fn) = callee else {
                if case let .undefined(why) = callee { throw JinjaError(.runtime, why) }
                throw JinjaError(.runtime, "'\(callee.typeName)' object is not callable")
            }
            return try fn.call(try args.map(eval), try kwargs.map { ($0.0, try eval($0.1)) }, self)
        case let .filter(value, name, args, kwargs):
            return try filter(name, try eval(value), args, kwargs)
        case let .test(value, name, args, negated):
            let result = try test(name, try eval(value), try args.map(eval))
            return .bool(result != negated)
        case let .unary(op, operand):
            let v = try eval(operand)
            switch op {
            case "not": return .bool(!v.truthy)
            case "-":
                switch v {
                case let .int(i): return .int(try checked(0.subtractingReportingOverflow(i)))
                case let .bool(b): return .int(b ? -1 : 0)
                case let .double(d): return .double(-d)
                default: throw try operandError("-", v)
                }
            default:
                guard v.numeric != nil else { throw try operandError("+", v) }
                if case let .bool(b) = v { return .int(b ? 1 : 0) }
                return v
            }
        case let .binary(op, l, r):
            switch op {
            case "and":
                let a = try eval(l)
                return a.truthy ? try eval(r) : a
            case "or":
                let a = try eval(l)
                return a.truthy ? a : try eval(r)
            case "~":
                let a = try eval(l), b = try eval(r)
                try bound(textSize(a) + textSize(b))
                return .string(a.text + b.text)
            default:
                return try arithmetic(op, try eval(l), try eval(r))
            }
        case let .compare(first, ops):
            var left = try eval(first)
            for (op, rightExpr) in ops {
                let right = try eval(rightExpr)
                if !(try compare(op, left, right)) { return .bool(false) }
                left = right
            }
            return .bool(true)
        case let .conditional(value, condition, otherwise):
            if try eval(condition).truthy { return try eval(value) }
            return try otherwise.map(eval) ?? .undefined("the inline if-expression evaluated to false and has no else")
        }
    }

    static func holdsNamespace(_ v: JinjaValue) -> Bool {
        switch v {
        case .namespace: return true
        case let .array(a), let .tuple(a): return a.contains(where: holdsNamespace)
        case let .dict(d): return d.pairs.contains { holdsNamespace($0.value) }
        default: return false
        }
    }

    /// `items`, counted against `maxNestedBuilds` when any is a container.
    func counted(_ items: [JinjaValue]) throws -> [JinjaValue] {
        let nests = items.contains {
            switch $0 {
            case .array, .tuple, .dict, .namespace: return true
            default: return false
            }
        }
        if nests {
            nestedBuilds += 1
            guard nestedBuilds <= Self.maxNestedBuilds else {
                throw JinjaError(.runtime, "the template built more than \(Self.maxNestedBuilds) containers of containers")
            }
        }
        return items
    }

    private func checked(_ r: (partialValue: Int, overflow: Bool)) throws -> Int {
        guard !r.overflow else { throw JinjaError(.runtime, "integer overflow") }
        return r.partialValue
    }

    private func operandError(_ op: String, _ a: JinjaValue, _ b: JinjaValue? = nil) throws -> JinjaError {
        if case let .undefined(why) = a { return JinjaError(.runtime, why) }
        if let b, case let .undefined(why) = b { return JinjaError(.runtime, why) }
        if let b { return JinjaError(.runtime, "unsupported operand type(s) for \(op): '\(a.typeName)' and '\(b.typeName)'") }
        return JinjaError(.runtime, "bad operand type for unary \(op): '\(a.typeName)'")
    }

    private func arithmetic(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> JinjaValue {
        switch (op, a, b) {
        case let ("+", .string(x), .string(y)):
            try bound(x.utf8.count + y.utf8.count)
            return .string(x + y)
        case let ("+", .array(x), .array(y)):
            guard x.count + y.count <= Self.maxRange else { throw JinjaError(.runtime, "list longer than \(Self.maxRange)") }
            return .array(x + y)
        case let ("+", .tuple(x), .tuple(y)):
            guard x.count + y.count <= Self.maxRange else { throw JinjaError(.runtime, "tuple longer than \(Self.maxRange)") }
            return .tuple(x + y)
        case let ("*", .string(s), n), let ("*", n, .string(s)):
            guard let k = n.integer else { throw try operandError(op, a, b) }
            try bound(s.utf8.count * max(0, min(k, Self.maxOutputBytes + 1)))
            return .string(String(repeating: s, count: max(0, k)))
        case let ("*", .array(s), n), let ("*", n, .array(s)):
            guard let k = n.integer else { throw try operandError(op, a, b) }
            guard k <= 0 || s.count * k <= Self.maxRange else { throw JinjaError(.runtime, "list repetition too long") }
            return .array(k <= 0 ? [] : Array(repeating: s, count: k).flatMap { $0 })
        default: break
        }
        if let x = a.integer, let y = b.integer {
            switch op {
            case "+": return .int(try checked(x.addingReportingOverflow(y)))
            case "-": return .int(try checked(x.subtractingReportingOverflow(y)))
            case "*": return .int(try checked(x.multipliedReportingOverflow(by: y)))
            case "/":
                guard y != 0 else { throw JinjaError(.runtime, "division by zero") }
                return .double(Double(x) / Double(y))
            case "//", "%":
                guard y != 0 else { throw JinjaError(.runtime, op == "%" ? "integer modulo by zero" : "integer division or modulo by zero") }
                var q = x / y
                var m = x % y
                if m != 0, (m < 0) != (y < 0) {
                    q -= 1
                    m += y
                }
                return .int(op == "%" ? m : q)
            case "**":
                if y < 0 { return .double(pow(Double(x), Double(y))) }
                var result = 1
                for _ in 0..<y {
                    result = try checked(result.multipliedReportingOverflow(by: x))
                    if result == 0 || result == 1 { break }
                }
                return .int(result)
            default: break
            }
        }
        guard let x = a.numeric, let y = b.numeric else { throw try operandError(op, a, b) }
        switch op {
        case "+": return .double(x + y)
        case "-": return .double(x - y)
        case "*": return .double(x * y)
        case "/":
            guard y != 0 else { throw JinjaError(.runtime, "float division by zero") }
            return .double(x / y)
        case "//":
            guard y != 0 else { throw JinjaError(.runtime, "float floor division by zero") }
            return .double((x / y).rounded(.down))
        case "%":
            guard y != 0 else { throw JinjaError(.runtime, "float modulo") }
            var m = fmod(x, y)
            if m != 0, (m < 0) != (y < 0) { m += y }
            return .double(m)
        default: return .double(pow(x, y))
        }
    }

    private func compare(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> Bool {
        switch op {
        case "==": return a.equals(b)
        case "!=": return !a.equals(b)
        case "<": return try a.less(than: b)
        case ">": return try b.less(than: a)
        case "<=": return try a.less(than: b) || a.equals(b)
        case ">=": return try b.less(than: a) || a.equals(b)
        case "in": return try contains(b, a)
        default: return !(try contains(b, a))
        }
    }

    /// Python's `needle in haystack`.
    func contains(_ haystack: JinjaValue, _ needle: JinjaValue) throws -> Bool {
        switch haystack {
        case let .string(s):
            guard case let .string(n) = needle else {
                throw JinjaError(.runtime, "'in <string>' requires string as left operand, not \(needle.typeName)")
            }
            return n.isEmpty || s.contains(n)
        case let .array(a), let .tuple(a): return a.contains { $0.equals(needle) }
        case let .dict(d):
            guard case let .string(k) = needle else { return false }
            return d[k] != nil
        case .undefined: return false
        default: throw JinjaError(.runtime, "argument of type '\(haystack.typeName)' is not iterable")
        }
    }

    /// `value.name`: a method of a string or dict, else the dict's item of
    /// that name (jinja2's `getattr` tries the attribute, then the item).
    func attribute(_ value: JinjaValue, _ name: String) throws -> JinjaValue {
        switch value {
        case let .undefined(why): throw JinjaError(.runtime, why)
        case let .dict(d):
            if let m = Self.dictMethod(d, name) { return m }
            return d[name] ?? .undefined("'dict object' has no attribute '\(name)'")
        case let .string(s):
            return Self.stringMethod(s, name) ?? .undefined("'str object' has no attribute '\(name)'")
        case let .namespace(ns):
            return ns.values[name] ?? .undefined("'Namespace' has no attribute '\(name)'")
        default:
            return .undefined("'\(value.typeName) object' has no attribute '\(name)'")
        }
    }

    /// `value[key]` (jinja2's `getitem` tries the item, then the attribute).
    func item(_ value: JinjaValue, _ key: JinjaValue) throws -> JinjaValue {
        switch (value, key) {
        case let (.undefined(why), _): throw JinjaError(.runtime, why)
        case let (.dict(d), .string(k)):
            return d[k] ?? Self.dictMethod(d, k) ?? .undefined("'dict object' has no attribute '\(k)'")
        case let (.namespace(ns), .string(k)):
            return ns.values[k] ?? .undefined("'Namespace' has no attribute '\(k)'")
        case let (.array(a), k), let (.tuple(a), k):
            guard let i = k.integer else {
                if case let .string(name) = k { return try attribute(value, name) }
                return .undefined("'list object' has no element \(k.repr)")
            }
            let j = i < 0 ? a.count + i : i
            return a.indices.contains(j) ? a[j] : .undefined("'list object' has no element \(i)")
        case let (.string(s), k):
            guard let i = k.integer else {
                if case let .string(name) = k { return try attribute(value, name) }
                return .undefined("'str object' has no element \(k.repr)")
            }
            let u = Array(s.unicodeScalars)
            let j = i < 0 ? u.count + i : i
            return u.indices.contains(j) ? .string(String(u[j])) : .undefined("'str object' has no element \(i)")
        case let (_, .string(name)):
            return try attribute(value, name)
        default:
            return .undefined("'\(value.typeName) object' has no element \(key.repr)")
        }
    }

    /// Python slicing of a list or string.
    private func slice(_ value: JinjaValue, _ start: JinjaValue?, _ stop: JinjaValue?, _ step: JinjaValue?) throws -> JinjaValue {
        func bound(_ v: JinjaValue?) throws -> Int? {
            guard let v, !(v.isUndefined), !(v.equals(.none)) else { return nil }
            guard let i = v.integer else { throw JinjaError(.runtime, "slice indices must be integers or None") }
            return i
        }
        let st = try bound(step) ?? 1
        guard st != 0 else { throw JinjaError(.runtime, "slice step cannot be zero") }
        func indices(_ n: Int) throws -> [Int] {
            func clamp(_ i: Int?, _ def: Int) -> Int {
                guard var i else { return def }
                if i < 0 { i += n }
                return st > 0 ? min(max(i, 0), n) : min(max(i, -1), n - 1)
            }
            let lo = try clamp(bound(start), st > 0 ? 0 : n - 1)
            let hi = try clamp(bound(stop), st > 0 ? n : -1)
            return Array(stride(from: lo, to: hi, by: st))
        }
        switch value {
        case let .undefined(why): throw JinjaError(.runtime, why)
        case let .array(a): return .array(try indices(a.count).map { a[$0] })
        case let .tuple(a): return .tuple(try indices(a.count).map { a[$0] })
        case let .string(s):
            let u = Array(s.unicodeScalars)
            var out = String.UnicodeScalarView()
            for i in try indices(u.count) { out.append(u[i]) }
            return .string(String(out))
        default: throw JinjaError(.runtime, "'\(value.typeName)' object is not subscriptable")
        }
    }
}

extension JinjaRenderer {
    // MARK: globals

    static let globals: [String: JinjaValue] = [
        "raise_exception": .function(JinjaFunction(name: "raise_exception") { args, _, _ in
            throw JinjaError(.raised, args.first?.text ?? "")
        }),
        "strftime_now": .function(JinjaFunction(name: "strftime_now") { args, _, r in
            guard case let .string(format)? = args.first else { throw JinjaError(.runtime, "strftime_now takes a format string") }
            return .string(ChatTemplate.strftime(format, r.now))
        }),
        "range": .function(JinjaFunction(name: "range") { args, _, _ in
            let ints = try args.map { v -> Int in
                guard let i = v.integer else { throw JinjaError(.runtime, "range() takes integers, not \(v.typeName)") }
                return i
            }
            let (lo, hi, step): (Int, Int, Int)
            switch ints.count {
            case 1: (lo, hi, step) = (0, ints[0], 1)
            case 2: (lo, hi, step) = (ints[0], ints[1], 1)
            case 3: (lo, hi, step) = (ints[0], ints[1], ints[2])
            default: throw JinjaError(.runtime, "range() takes 1 to 3 arguments")
            }
            guard step != 0 else { throw JinjaError(.runtime, "range() arg 3 must not be zero") }
            let r = stride(from: lo, to: hi, by: step)
            guard r.underestimatedCount <= maxRange else { throw JinjaError(.runtime, "range() longer than \(maxRange)") }
            return .array(r.map(JinjaValue.int))
        }),
        "namespace": .function(JinjaFunction(name: "namespace") { args, kwargs, r in
            let d = try keywordDict("namespace", args, kwargs)
            _ = try r.counted(d.pairs.map(\.value))
            return .namespace(JinjaNamespace(d))
        }),
        "dict": .function(JinjaFunction(name: "dict") { args, kwargs, r in
            let d = try keywordDict("dict", args, kwargs)
            _ = try r.counted(d.pairs.map(\.value))
            return .dict(d)
        }),
    ]

    /// `dict(...)` and `namespace(...)`'s arguments: dicts, then keywords over them.
    static func keywordDict(_ function: String, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaDict {
        var d = JinjaDict()
        for a in args {
            guard case let .dict(given) = a else { throw JinjaError(.runtime, "\(function)() takes a dict or keyword arguments") }
            for p in given.pairs { d[p.key] = p.value }
        }
        for (k, v) in kwargs { d[k] = v }
        return d
    }

    // MARK: methods

    static func dictMethod(_ d: JinjaDict, _ name: String) -> JinjaValue? {
        switch name {
        case "items": return .function(JinjaFunction(name: "items") { _, _, _ in .array(d.pairs.map { .tuple([.string($0.key), $0.value]) }) })
        case "keys": return .function(JinjaFunction(name: "keys") { _, _, _ in .array(d.keys.map(JinjaValue.string)) })
        case "values": return .function(JinjaFunction(name: "values") { _, _, _ in .array(d.pairs.map(\.value)) })
        case "get":
            return .function(JinjaFunction(name: "get") { args, _, _ in
                guard let k = args.first else { throw JinjaError(.runtime, "get expected at least 1 argument") }
                guard case let .string(key) = k, let v = d[key] else { return args.count > 1 ? args[1] : .none }
                return v
            })
        default: return nil
        }
    }

    static func stringArg(_ args: [JinjaValue], _ i: Int, _ method: String) throws -> String? {
        guard i < args.count else { return nil }
        switch args[i] {
        case let .string(s): return s
        case .none: return nil
        default: throw JinjaError(.runtime, "\(method)() argument must be str or None, not \(args[i].typeName)")
        }
    }

    static func stringMethod(_ s: String, _ name: String) -> JinjaValue? {
        func method(_ body: @escaping @Sendable ([JinjaValue]) throws -> JinjaValue) -> JinjaValue {
            .function(JinjaFunction(name: name) { args, _, _ in try body(args) })
        }
        switch name {
        case "strip", "lstrip", "rstrip":
            return method { args in
                .string(pythonStrip(s, chars: try stringArg(args, 0, name), leading: name != "rstrip", trailing: name != "lstrip"))
            }
        case "upper": return method { _ in .string(s.uppercased()) }
        case "lower": return method { _ in .string(s.lowercased()) }
        case "capitalize": return method { _ in .string(capitalize(s)) }
        case "title": return method { _ in .string(pythonTitle(s)) }
        case "startswith", "endswith":
            return method { args in
                guard let first = args.first else { throw JinjaError(.runtime, "\(name)() takes at least 1 argument") }
                let candidates: [JinjaValue]
                if case let .tuple(a) = first { candidates = a } else { candidates = [first] }
                for c in candidates {
                    guard case let .string(p) = c else { throw JinjaError(.runtime, "\(name) first arg must be str or a tuple of str") }
                    let hit = name == "startswith"
                        ? s.unicodeScalars.starts(with: p.unicodeScalars)
                        : s.unicodeScalars.reversed().starts(with: p.unicodeScalars.reversed())
                    if hit { return .bool(true) }
                }
                return .bool(false)
            }
        case "split", "rsplit":
            return method { args in
                let sep = try stringArg(args, 0, name)
                let maxSplit = args.count > 1 ? (args[1].integer ?? -1) : -1
                return .array(try pythonSplit(s, sep: sep, maxSplit: maxSplit, fromRight: name == "rsplit").map(JinjaValue.string))
            }
        case "splitlines": return method { _ in .array(splitLines(s).map(JinjaValue.string)) }
        case "replace":
            return method { args in
                guard args.count >= 2, case let .string(old) = args[0], case let .string(new) = args[1] else {
                    throw JinjaError(.runtime, "replace() takes two strings")
                }
                return .string(pythonReplace(s, old, new, count: args.count > 2 ? (args[2].integer ?? -1) : -1))
            }
        case "find", "count":
            return method { args in
                guard case let .string(sub)? = args.first else { throw JinjaError(.runtime, "\(name)() takes a string") }
                let hay = Array(s.unicodeScalars), needle = Array(sub.unicodeScalars)
                if name == "find" {
                    if needle.isEmpty { return .int(0) }
                    guard hay.count >= needle.count else { return .int(-1) }
                    for i in 0...(hay.count - needle.count) where occurs(needle, in: hay, at: i) { return .int(i) }
                    return .int(-1)
                }
                if needle.isEmpty { return .int(hay.count + 1) }
                var n = 0, i = 0
                while i + needle.count <= hay.count {
                    if occurs(needle, in: hay, at: i) {
                        n += 1
                        i += needle.count
                    } else {
                        i += 1
                    }
                }
                return .int(n)
            }
        case "join":
            return method { args in
                guard let first = args.first else { throw JinjaError(.runtime, "join() takes exactly one argument") }
                return .string(try first.iterated().map { v -> String in
                    guard case let .string(t) = v else { throw JinjaError(.runtime, "sequence item: expected str instance, \(v.typeName) found") }
                    return t
                }.joined(separator: s))
            }
        default: return nil
        }
    }

    // MARK: Python string helpers

    /// Whether `pattern` stands in `text` at `i` (without copying either).
    static func occurs(_ pattern: [Unicode.Scalar], in text: [Unicode.Scalar], at i: Int) -> Bool {
        i >= 0 && i + pattern.count <= text.count && text[i..<i + pattern.count].elementsEqual(pattern)
    }

    static func pythonStrip(_ s: String, chars: String?, leading: Bool = true, trailing: Bool = true) -> String {
        let set = chars.map { Set($0.unicodeScalars) }
        func strip(_ u: Unicode.Scalar) -> Bool { set?.contains(u) ?? JinjaLexer.isSpace(u) }
        let u = Array(s.unicodeScalars)
        var lo = 0, hi = u.count
        if leading { while lo < hi, strip(u[lo]) { lo += 1 } }
        if trailing { while hi > lo, strip(u[hi - 1]) { hi -= 1 } }
        var out = String.UnicodeScalarView()
        out.append(contentsOf: u[lo..<hi])
        return String(out)
    }

    static func capitalize(_ s: String) -> String {
        guard let first = s.unicodeScalars.first else { return s }
        return String(first).uppercased() + String(String.UnicodeScalarView(s.unicodeScalars.dropFirst())).lowercased()
    }

    /// Python `str.title()`: a letter after a non-letter is upper-cased, every other letter lower-cased.
    static func pythonTitle(_ s: String) -> String {
        var out = ""
        var previousCased = false
        for u in s.unicodeScalars {
            let cased = u.properties.isCased
            out += previousCased ? String(u).lowercased() : String(u).uppercased()
            previousCased = cased
        }
        return out
    }

    static func pythonSplit(_ s: String, sep: String?, maxSplit: Int, fromRight: Bool) throws -> [String] {
        let u = Array(s.unicodeScalars)
        func str(_ r: ArraySlice<Unicode.Scalar>) -> String { String(String.UnicodeScalarView(r)) }
        guard let sep else {
            // Runs of whitespace separate; none at either end makes an empty part. The part
            // left when maxsplit runs out keeps its whitespace on the far side, as in Python.
            var parts: [ArraySlice<Unicode.Scalar>] = []
            var i = 0
            if fromRight {
                var hi = u.count
                while true {
                    while hi > 0, JinjaLexer.isSpace(u[hi - 1]) { hi -= 1 }
                    guard hi > 0 else { break }
                    if maxSplit >= 0, parts.count == maxSplit {
                        parts.append(u[0..<hi])
                        break
                    }
                    var lo = hi
                    while lo > 0, !JinjaLexer.isSpace(u[lo - 1]) { lo -= 1 }
                    parts.append(u[lo..<hi])
                    hi = lo
                }
                return parts.reversed().map(str)
            }
            while true {
                while i < u.count, JinjaLexer.isSpace(u[i]) { i += 1 }
                guard i < u.count else { break }
                if maxSplit >= 0, parts.count == maxSplit {
                    parts.append(u[i...])
                    break
                }
                var j = i
                while j < u.count, !JinjaLexer.isSpace(u[j]) { j += 1 }
                parts.append(u[i..<j])
                i = j
            }
            return parts.map(str)
        }
        let p = Array(sep.unicodeScalars)
        guard !p.isEmpty else { throw JinjaError(.runtime, "empty separator") }
        var cuts: [Int] = []
        if fromRight {
            var i = u.count - p.count
            while i >= 0, maxSplit < 0 || cuts.count < maxSplit {
                if occurs(p, in: u, at: i) {
                    cuts.insert(i, at: 0)
                    i -= p.count
                } else {
                    i -= 1
                }
            }
        } else {
            var i = 0
            while i + p.count <= u.count, maxSplit < 0 || cuts.count < maxSplit {
                if occurs(p, in: u, at: i) {
                    cuts.append(i)
                    i += p.count
                } else {
                    i += 1
                }
            }
        }
        var parts: [String] = []
        var start = 0
        for c in cuts {
            parts.append(str(u[start..<c]))
            start = c + p.count
        }
        parts.append(str(u[start...]))
        return parts
    }

    static func pythonReplace(_ s: String, _ old: String, _ new: String, count: Int) -> String {
        let u = Array(s.unicodeScalars), o = Array(old.unicodeScalars)
        var out = String.UnicodeScalarView()
        var done = 0
        if o.isEmpty {
            // Python inserts `new` before every character and at the end.
            for c in u {
                if count < 0 || done < count {
                    out.append(contentsOf: new.unicodeScalars)
                    done += 1
                }
                out.append(c)
            }
            if count < 0 || done < count { out.append(contentsOf: new.unicodeScalars) }
            return String(out)
        }
        var i = 0
        while i < u.count {
            if count < 0 || done < count, occurs(o, in: u, at: i) {
                out.append(contentsOf: new.unicodeScalars)
                i += o.count
                done += 1
            } else {
                out.append(u[i])
                i += 1
            }
        }
        return String(out)
    }

    /// Python `str.splitlines()`.
    static func splitLines(_ s: String) -> [String] {
        let breaks: Set<UInt32> = [0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029]
        let u = Array(s.unicodeScalars)
        var lines: [String] = []
        var start = 0, i = 0
        while i < u.count {
            if breaks.contains(u[i].value) {
                lines.append(String(String.UnicodeScalarView(u[start..<i])))
                if u[i] == "\r", i + 1 < u.count, u[i + 1] == "\n" { i += 1 }
                start = i + 1
            }
            i += 1
        }
        if start < u.count { lines.append(String(String.UnicodeScalarView(u[start...]))) }
        return lines
    }
}
