import ArgumentParser
import Foundation
import LoraMux

@main
struct LoraMuxCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "loramux",
        abstract: "Multi-adapter LLM inference on the CPU.",
        subcommands: [Serve.self, Generate.self, Bench.self, BenchLoad.self, BenchKernel.self, BenchReplay.self])
}

/// Options every command that loads a model shares.
struct ModelOptions: ParsableArguments {
    @Option(help: "Base model: a .gguf file or a Hugging Face directory (config.json + safetensors).")
    var model: String

    @Option(help: "Worker threads (default: all cores).")
    var threads: Int?

    func validate() throws {
        if let t = threads, t < 1 || t > 64 { throw ValidationError("--threads must be between 1 and 64") }
    }

    func setThreads() {
        if let t = threads { setenv("LORAMUX_THREADS", String(t), 1) }
    }
}

func loadTokenizer(for weights: LlamaWeights) throws -> BPETokenizer {
    if let g = weights.gguf { return try BPETokenizer(gguf: g) }
    let url = URL(fileURLWithPath: weights.path).appendingPathComponent("tokenizer.json")
    return try BPETokenizer(tokenizerJSON: url)
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) { FileHandle.standardError.write(Data(string.utf8)) }
}
nonisolated(unsafe) var stderrStream = StandardError()
