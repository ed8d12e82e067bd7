import Foundation

/// A PEFT LoRA `adapter_config.json`, checked on read: every key either has
/// a meaning we implement, has no effect at inference, or is refused by name.
public struct LoraConfig: Sendable, Equatable {
    public enum Targets: Sendable, Equatable {
        case names([String])      // exact module name or ".suffix" match
        case regex(String)        // re.fullmatch on the module name
        case allLinear            // every Linear except the output layer
    }

    public var r: Int
    public var alpha: Double
    public var useRSLoRA: Bool
    public var useDoRA: Bool
    public var targets: Targets
    public var exclude: Targets?
    public var layersToTransform: [Int]?
    public var layersPattern: [String]?
    /// In file order: PEFT takes the first key that matches.
    public var rankPattern: [(String, Int)]
    public var alphaPattern: [(String, Double)]
    public var modulesToSave: [String]
    public var baseModel: String?

    public static func == (a: LoraConfig, b: LoraConfig) -> Bool {
        a.r == b.r && a.alpha == b.alpha && a.useRSLoRA == b.useRSLoRA && a.useDoRA == b.useDoRA && a.targets == b.targets
            && a.exclude == b.exclude && a.layersToTransform == b.layersToTransform && a.layersPattern == b.layersPattern
            && a.rankPattern.elementsEqual(b.rankPattern, by: { $0 == $1 })
            && a.alphaPattern.elementsEqual(b.alphaPattern, by: { $0 == $1 })
            && a.modulesToSave == b.modulesToSave && a.baseModel == b.baseModel
    }

    /// Keys that change nothing at inference time (training, initialisation, bookkeeping).
    static let inert: Set<String> = [
        "task_type", "auto_mapping", "peft_version", "revision", "inference_mode", "lora_dropout",
        "init_lora_weights", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
        "lora_ga_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
        // fan_in_fan_out only matters for GPT-2's Conv1D; PEFT resets it to False on nn.Linear, as we do.
        "fan_in_fan_out",
    ]
    /// Keys we implement.
    static let handled: Set<String> = [
        "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "exclude_modules",
        "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save",
        "base_model_name_or_path", "bias",
    ]

    public init(json: OrderedJSON, path: String) throws {
        func bad(_ key: String, _ why: String) -> AdapterError { .unsupported(path: path, key: key, reason: why) }
        func malformed(_ why: String) -> AdapterError { .malformed(path: path, reason: why) }
        guard case let .object(kv) = json else { throw malformed("adapter_config.json is not a JSON object") }
        let type = json["peft_type"].flatMap { if case let .string(s) = $0 { return s } else { return nil } } ?? "LORA"
        guard type == "LORA" else { throw bad("peft_type", "'\(type)' adapters are not supported (only LORA)") }
        for (k, v) in kv where !Self.inert.contains(k) && !Self.handled.contains(k) {
            // Unknown or unimplemented keys are fine only while they are off.
            guard v.isNullOrEmpty else { throw bad(k, "not supported by LoraMux (value \(v.foundationValue))") }
        }
        if let b = json["bias"], b != .null, b != .string("none") {
            throw bad("bias", "\(b.foundationValue) (only \"none\": LoRA bias terms are not supported)")
        }

        func int(_ key: String) throws -> Int? {
            guard let v = json[key], v != .null else { return nil }
            guard case let .number(n) = v, n == n.rounded(), n >= 0, n < 1_048_576 else { throw malformed("'\(key)' must be a non-negative integer") }
            return Int(n)
        }
        func double(_ key: String) throws -> Double? {
            guard let v = json[key], v != .null else { return nil }
            guard case let .number(n) = v, n.isFinite else { throw malformed("'\(key)' must be a number") }
            return n
        }
        func bool(_ key: String) throws -> Bool {
            guard let v = json[key], v != .null else { return false }
            guard case let .bool(b) = v else { throw malformed("'\(key)' must be true or false") }
            return b
        }
        func stringList(_ key: String) throws -> [String]? {
            guard let v = json[key], v != .null else { return nil }
            if case let .string(s) = v { return [s] }
            guard case let .array(a) = v else { throw malformed("'\(key)' must be a string or a list of strings") }
            return try a.map { guard case let .string(s) = $0 else { throw malformed("'\(key)' must hold strings") }; return s }
        }
        func targets(_ key: String) throws -> Targets? {
            guard let v = json[key], v != .null else { return nil }
            if case let .string(s) = v {
                if s.lowercased() == "all-linear" { return .allLinear }
                _ = try Self.regex("^(?:\(s))$", key: key, path: path)
                return .regex(s)
            }
            guard let names = try stringList(key) else { return nil }
            if names.count == 1, names[0].lowercased() == "all-linear" { return .allLinear }
            return .names(names)
        }

        guard let r = try int("r"), r > 0 else { throw malformed("'r' must be a positive integer") }
        self.r = r
        alpha = try double("lora_alpha") ?? 8
        useRSLoRA = try bool("use_rslora")
        useDoRA = try bool("use_dora")
        guard let t = try targets("target_modules") else {
            throw bad("target_modules", "missing (LoraMux cannot guess PEFT's per-architecture defaults)")
        }
        self.targets = t
        exclude = try targets("exclude_modules")
        if let v = json["layers_to_transform"], v != .null {
            // Bounded before Int(_:), which traps past Int.max (found by fuzzing).
            func layer(_ n: Double) -> Int? { n == n.rounded() && n >= 0 && n < 1_048_576 ? Int(n) : nil }
            switch v {
            case let .number(n) where layer(n) != nil: layersToTransform = [layer(n)!]
            case let .array(a):
                layersToTransform = try a.map {
                    guard case let .number(n) = $0, let i = layer(n) else { throw malformed("'layers_to_transform' must hold layer indices") }
                    return i
                }
                if layersToTransform!.isEmpty { layersToTransform = nil }
            default: throw malformed("'layers_to_transform' must be an integer or a list of integers")
            }
        } else { layersToTransform = nil }
        layersPattern = try stringList("layers_pattern").flatMap { $0.isEmpty ? nil : $0 }
        func pattern<T>(_ key: String, _ conv: (Double) -> T?) throws -> [(String, T)] {
            guard let v = json[key], v != .null else { return [] }
            guard case let .object(o) = v else { throw malformed("'\(key)' must be an object") }
            return try o.map { k, val in
                guard case let .number(n) = val, let t = conv(n) else { throw malformed("'\(key)'['\(k)'] has an invalid value") }
                _ = try Self.regex("^(.*\\.)?(\(k))$", key: key, path: path)
                return (k, t)
            }
        }
        rankPattern = try pattern("rank_pattern") { $0 == $0.rounded() && $0 >= 1 && $0 < 1_048_576 ? Int($0) : nil }
        alphaPattern = try pattern("alpha_pattern") { $0.isFinite ? $0 : nil }
        modulesToSave = try stringList("modules_to_save") ?? []
        baseModel = json["base_model_name_or_path"].flatMap { if case let .string(s) = $0, !s.isEmpty { return s } else { return nil } }
    }

    static func regex(_ pattern: String, key: String, path: String) throws -> NSRegularExpression {
        do { return try NSRegularExpression(pattern: pattern) } catch {
            throw AdapterError.unsupported(path: path, key: key, reason: "'\(pattern)' is not a regular expression LoraMux can read")
        }
    }

    static func matches(_ pattern: String, _ s: String) -> Bool {
        guard let re = try? NSRegularExpression(pattern: pattern) else { return false }
        let r = NSRange(s.startIndex..., in: s)
        return re.firstMatch(in: s, options: [.anchored], range: r).map { $0.range == r } ?? false
    }

    /// PEFT's `check_target_module_exists` for a module of the base model
    /// (e.g. "model.layers.3.self_attn.q_proj"). `isLinear`/`isOutput` feed all-linear.
    public func targets(module name: String, isLinear: Bool, isOutput: Bool) -> Bool {
        if let ex = exclude, Self.nameMatches(ex, name, isLinear: isLinear, isOutput: isOutput, layerFilter: nil) { return false }
        if modulesToSave.contains(where: { Self.matches("^(.*\\.)?\(NSRegularExpression.escapedPattern(for: $0))(\\..*)?$", name) }) {
            return false
        }
        return Self.nameMatches(targets, name, isLinear: isLinear, isOutput: isOutput, layerFilter: self)
    }

    static func nameMatches(_ t: Targets, _ name: String, isLinear: Bool, isOutput: Bool, layerFilter: LoraConfig?) -> Bool {
        switch t {
        case .allLinear: return isLinear && !isOutput && (layerFilter?.layerAllowed(name) ?? true)
        case let .regex(re): return matches("^(?:\(re))$", name)
        case let .names(list):
            let found = list.contains(name) || list.contains { name.hasSuffix("." + $0) }
            // PEFT applies layers_to_transform only to list targets matched by suffix.
            if found, !list.contains(name), let f = layerFilter { return f.layerAllowed(name) }
            return found
        }
    }

    func layerAllowed(_ name: String) -> Bool {
        guard let layers = layersToTransform else { return true }
        let patterns = layersPattern.map { $0.map(NSRegularExpression.escapedPattern(for:)) } ?? ["[^.]*"]
        for p in patterns {
            // First numbered segment after the pattern, as PEFT's lazy regex finds it.
            let re = layersPattern == nil ? "^.*?\\.\(p)\\.(\\d+)\\." : "^(?:|.*?\\.)\(p)\\.(\\d+)\\."
            if let m = try? NSRegularExpression(pattern: re).firstMatch(in: name, range: NSRange(name.startIndex..., in: name)),
               let r = Range(m.range(at: 1), in: name), let idx = Int(name[r]) {
                return layers.contains(idx)
            }
        }
        return false
    }

    /// Rank and alpha PEFT uses for a module (before looking at tensor shapes).
    public func rankAndAlpha(module name: String) -> (rank: Int, alpha: Double) {
        let rank = rankPattern.first { Self.matches("^(.*\\.)?(\($0.0))$", name) }?.1 ?? r
        let alpha = alphaPattern.first { Self.matches("^(.*\\.)?(\($0.0))$", name) }?.1 ?? self.alpha
        return (rank, alpha)
    }

    public func scale(rank: Int, alpha: Double) -> Float {
        Float(useRSLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank))
    }
}
