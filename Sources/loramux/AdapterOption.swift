import ArgumentParser
import Foundation
import LoraMux

/// `--adapter` takes a PEFT directory, a `.lora` file, or a name registered
/// under `--adapters` (default: ./adapters).
struct AdapterOptions: ParsableArguments {
    @Option(help: "Adapter: a PEFT directory, a .lora file, or a name found under --adapters.")
    var adapter: String?

    @Option(help: "Adapter store searched for --adapter names.")
    var adapters: String = "adapters"

    func load(base: LlamaWeights) throws -> LoraAdapter? {
        guard let a = adapter else { return nil }
        if FileManager.default.fileExists(atPath: a) {
            let name = ((a as NSString).lastPathComponent as NSString).deletingPathExtension
            return try AdapterLoader.load(path: a, name: name, base: base)
        }
        let registry = try AdapterRegistry(roots: [adapters])
        let entry = try registry.register(name: a)
        return try AdapterLoader.load(path: entry.path, name: entry.name, base: base)
    }
}
