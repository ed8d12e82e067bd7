import Foundation

/// Names → adapter sources (PEFT directories or `.lora` files) under a set of
/// root directories. Nothing outside the roots is ever read: names are
/// validated, and every path is resolved (symlinks included) and checked to
/// lie inside a root before it is registered.
public final class AdapterRegistry: @unchecked Sendable {
    public struct Entry: Sendable, Equatable {
        public let name: String
        public let path: String
        public let isPacked: Bool
    }

    public let roots: [String]
    private var entries: [String: Entry] = [:]
    private let lock = NSLock()

    /// `roots` are created if missing? No: they must exist; they are resolved once.
    public init(roots: [String]) throws {
        self.roots = try roots.map { r in
            guard let real = Self.realPath(r) else { throw AdapterError.io(path: r, reason: "adapter directory does not exist") }
            return real
        }
    }

    public static func validate(name: String) throws {
        guard !name.isEmpty, name.utf8.count <= 128 else { throw AdapterError.invalidName(name, reason: "must be 1 to 128 characters") }
        guard name != ".", name != "..", !name.contains(".."), !name.hasPrefix(".") else {
            throw AdapterError.invalidName(name, reason: "must not start with '.' or contain '..'")
        }
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        guard name.allSatisfy({ allowed.contains($0) }) else {
            throw AdapterError.invalidName(name, reason: "only letters, digits, '.', '_' and '-' are allowed")
        }
    }

    static func realPath(_ p: String) -> String? {
        guard let r = realpath(p, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    /// Resolved path of `path` if it lies inside a root, else an error.
    public func confine(_ path: String) throws -> String {
        let abs = path.hasPrefix("/") ? path : (roots.first.map { ($0 as NSString).appendingPathComponent(path) } ?? path)
        guard let real = Self.realPath(abs) else {
            // The path is the server's: say where a relative one was looked for.
            throw AdapterError.io(path: path, reason: abs == path ? "no such file or directory"
                                  : "no such file or directory (relative paths are taken from the adapter directory, so: \(abs))")
        }
        guard roots.contains(where: { real.hasPrefix($0.hasSuffix("/") ? $0 : $0 + "/") }) else {
            throw AdapterError.outsideRoots(path: path)
        }
        return real
    }

    static func kind(of path: String) -> Bool? {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { return nil }
        if isDir.boolValue {
            return FileManager.default.fileExists(atPath: (path as NSString).appendingPathComponent("adapter_config.json")) ? false : nil
        }
        return path.hasSuffix(".lora") ? true : nil
    }

    /// Registers `name`. Without a path, looks for `<root>/<name>` (PEFT dir)
    /// or `<root>/<name>.lora`. With `replace`, an existing name is re-pointed.
    @discardableResult
    public func register(name: String, path: String? = nil, replace: Bool = false) throws -> Entry {
        try Self.validate(name: name)
        var resolved: String? = nil
        if let path {
            resolved = try confine(path)
        } else {
            for root in roots {
                for cand in [name, name + ".lora"] {
                    let p = (root as NSString).appendingPathComponent(cand)
                    if Self.kind(of: p) != nil { resolved = try confine(p); break }
                }
                if resolved != nil { break }
            }
            guard resolved != nil else { throw AdapterError.unknownAdapter(name) }
        }
        guard let packed = Self.kind(of: resolved!) else {
            throw AdapterError.io(path: path ?? name, reason: "not a PEFT adapter directory or a .lora file")
        }
        let e = Entry(name: name, path: resolved!, isPacked: packed)
        lock.lock(); defer { lock.unlock() }
        if !replace, let old = entries[name], old != e { throw AdapterError.alreadyRegistered(name) }
        entries[name] = e
        return e
    }

    /// Registers every PEFT directory and `.lora` file directly inside the roots.
    /// Returns the names registered and the entries skipped with the reason.
    @discardableResult
    public func scan() -> (registered: [String], skipped: [(String, String)]) {
        var reg: [String] = [], skip: [(String, String)] = []
        for root in roots {
            let items = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
            for item in items.sorted() {
                let p = (root as NSString).appendingPathComponent(item)
                guard let packed = Self.kind(of: p) else { continue }
                let name = packed ? String(item.dropLast(".lora".count)) : item
                do {
                    try register(name: name, path: p)
                    reg.append(name)
                } catch {
                    skip.append((item, (error as? LocalizedError)?.errorDescription ?? "\(error)"))
                }
            }
        }
        return (reg, skip)
    }

    @discardableResult
    public func unregister(_ name: String) -> Bool {
        lock.lock(); defer { lock.unlock() }
        return entries.removeValue(forKey: name) != nil
    }

    public func lookup(_ name: String) -> Entry? {
        lock.lock(); defer { lock.unlock() }
        return entries[name]
    }

    public var all: [Entry] {
        lock.lock(); defer { lock.unlock() }
        return entries.values.sorted { $0.name < $1.name }
    }
}
