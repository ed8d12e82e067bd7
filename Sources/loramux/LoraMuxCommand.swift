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

/// Where adapters' matrices live: a pool on 2 MB pages (AdapterPool), faulted
/// in at start, or the heap.
struct AdapterPoolOptions: ParsableArguments {
    @Option(help: "Adapter memory pool on 2 MB pages, in MB, faulted in at start; arenas beyond it come from the heap (0: no pool; default: the adapter cache budget for serve, 1024 for the benchmarks that load adapters).")
    var adapterPoolMb: Int?

    func validate() throws {
        if let mb = adapterPoolMb, mb < 0 || mb > 1 << 20 { throw ValidationError("--adapter-pool-mb must be between 0 and 1048576") }
    }

    /// Installs the pool for the adapters this process will load. At most
    /// half the machine's memory: the pool is committed up front, and a cache
    /// budget set high as "no limit" must not take the machine down.
    func install(defaultMB: Int, prefault: Prefault) {
        let cap = Int(ProcessInfo.processInfo.physicalMemory / 2) >> 20
        var mb = adapterPoolMb ?? defaultMB
        guard mb > 0 else { return }
        if mb > cap {
            print("loramux: adapter pool capped at \(cap) MB (half the machine's memory); adapters beyond it go on the heap", to: &stderrStream)
            mb = cap
        }
        if let pool = AdapterPool(bytes: mb << 20, prefault: prefault) { Arena.install(pool) }
        else { print("loramux: could not map a \(mb) MB adapter pool; adapters go on the heap", to: &stderrStream) }
    }
}
