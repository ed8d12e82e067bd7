import ArgumentParser
import Foundation
import LoraMux
import LoraMuxClient

@main
struct AdapterCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "adapterctl",
        abstract: "Inspect and pack LoRA adapters; load and unload them on a running LoraMux server.",
        subcommands: [Inspect.self, Pack.self, Load.self, Unload.self, List.self])
}

struct ServerOptions: ParsableArguments {
    @Option(help: "Server URL (default: $LORAMUX_SERVER or http://127.0.0.1:8080). The admin token comes from $LORAMUX_ADMIN_TOKEN.")
    var server: String?

    func client() throws -> AdminClient { try AdminClient(server: server) }
}

func printJSON(_ data: Data) {
    if let obj = try? JSONSerialization.jsonObject(with: data),
       let pretty = try? JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]) {
        print(String(decoding: pretty, as: UTF8.self))
    } else {
        print(String(decoding: data, as: UTF8.self))
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Describe a PEFT adapter directory or a .lora file.")
    @Argument(help: "PEFT directory or .lora file.") var path: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw ValidationError("\(path): no such file or directory")
        }
        let info: PackedAdapter.Info
        var fileBytes = 0
        if isDir.boolValue {
            let peft = try PEFTAdapter(directory: path)
            let shape = try peft.inferredShape()
            let (plan, sources) = try peft.plan(for: shape)
            let raw = sources.values.reduce(0) { $0 + $1.byteCount }
            fileBytes = (try? FileManager.default.attributesOfItem(atPath: (path as NSString).appendingPathComponent("adapter_model.safetensors"))[.size] as? Int) ?? 0
            info = PackedAdapter.Info(config: plan.config, base: shape, dtype: plan.dtype, modules: plan.modules,
                                      tensorCount: sources.count, compressedBytes: raw, rawBytes: raw, fileBytes: fileBytes)
        } else {
            info = try PackedAdapter.inspect(path: path)
            fileBytes = info.fileBytes
        }
        let ranks = Set(info.modules.map(\.rank)).sorted()
        let params = info.modules.reduce(0) { n, m in let s = m.proj.shape(info.base); return n + m.rank * (s.in + s.out) }
        let layers = Set(info.modules.map(\.layer)).count
        let projs = Set(info.modules.map(\.proj.name)).sorted()
        if json {
            let obj: [String: Any] = [
                "path": path, "format": isDir.boolValue ? "peft" : "lora", "ranks": ranks, "lora_alpha": info.config.alpha,
                "use_rslora": info.config.useRSLoRA, "use_dora": info.config.useDoRA, "modules": info.modules.count,
                "layers": layers, "projections": projs, "parameters": params, "dtype": info.dtype.rawValue,
                "file_bytes": fileBytes, "data_bytes": info.rawBytes, "base_model_name_or_path": info.config.baseModel ?? NSNull(),
                "base": ["num_layers_at_least": info.base.numLayers, "hidden_size": info.base.hiddenSize, "q_dim": info.base.qDim,
                         "kv_dim": info.base.kvDim, "intermediate_size": info.base.intermediateSize, "vocab_size": info.base.vocabSize],
                "modules_to_save": info.config.modulesToSave]
            printJSON(try JSONSerialization.data(withJSONObject: obj))
            return
        }
        print("\(path) (\(isDir.boolValue ? "PEFT directory" : "packed .lora"))")
        print("  rank \(ranks.map(String.init).joined(separator: ",")), lora_alpha \(info.config.alpha)\(info.config.useRSLoRA ? ", rsLoRA" : "")\(info.config.useDoRA ? ", DoRA" : "")")
        print("  \(info.modules.count) modules over \(layers) layers: \(projs.joined(separator: " "))")
        if !info.config.modulesToSave.isEmpty { print("  modules_to_save: \(info.config.modulesToSave.joined(separator: " "))") }
        print("  \(params) LoRA parameters, stored as \(info.dtype.rawValue); file \(fileBytes) bytes, data \(info.rawBytes) bytes")
        print("  base: \(info.config.baseModel ?? "(not recorded)"); hidden \(info.base.hiddenSize), q \(info.base.qDim), kv \(info.base.kvDim), intermediate \(info.base.intermediateSize), layers >= \(info.base.numLayers)")
    }
}

struct Pack: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pack a PEFT adapter directory into one .lora file.")
    @Argument(help: "PEFT adapter directory.") var directory: String
    @Option(name: .shortAndLong, help: "Output .lora file.") var output: String
    @Option(help: "Stored element type: f16 (default), bf16 (loads as f32) or f32.") var dtype: String = "f16"

    func validate() throws {
        guard ["f16", "bf16", "f32"].contains(dtype) else { throw ValidationError("--dtype must be f16, bf16 or f32") }
        guard output.hasSuffix(".lora") else { throw ValidationError("--output must end in .lora") }
    }

    func run() throws {
        let info = try PackedAdapter.pack(peftDirectory: directory, to: output, dtype: dtype == "f32" ? .f32 : .f16, bf16: dtype == "bf16")
        let src = (try? FileManager.default.attributesOfItem(atPath: (directory as NSString).appendingPathComponent("adapter_model.safetensors"))[.size] as? Int) ?? 0
        print(String(format: "%@: %d modules, %d bytes (PEFT safetensors %d bytes, %.2fx smaller)", output, info.modules.count,
                     info.fileBytes, src, Double(src) / Double(max(info.fileBytes, 1))))
    }
}

struct Load: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Register (and check) an adapter on a running server.")
    @OptionGroup var server: ServerOptions
    @Argument(help: "Adapter name.") var name: String
    @Argument(help: "Path on the server (PEFT directory or .lora), relative to its adapter directory unless absolute; default: found by name there.") var path: String?

    func run() async throws {
        let c = try server.client()
        printJSON(try await c.send(c.loadRequest(name: name, path: path)))
    }
}

struct Unload: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Unregister an adapter; requests using it finish first.")
    @OptionGroup var server: ServerOptions
    @Argument(help: "Adapter name.") var name: String

    func run() async throws {
        let c = try server.client()
        printJSON(try await c.send(c.unloadRequest(name: name)))
    }
}

struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List registered and resident adapters.")
    @OptionGroup var server: ServerOptions

    func run() async throws {
        let c = try server.client()
        printJSON(try await c.send(c.listRequest()))
    }
}
