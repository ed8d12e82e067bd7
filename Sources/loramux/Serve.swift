import ArgumentParser
import Foundation
import Hummingbird
import Logging
import LoraMux
import LoraMuxServer

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve the OpenAI-compatible HTTP API.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var poolOptions: AdapterPoolOptions
    @Option(help: "Adapter directory (PEFT dirs and .lora files are registered by name).") var adapters: String = "adapters"
    @Option(help: "Address to listen on.") var host: String = "127.0.0.1"
    @Option(help: "Port (0 picks a free one).") var port: Int = 8080
    @Option(help: "Sequences decoding together.") var maxBatch: Int = 32
    @Option(help: "Adapter cache budget in MB.") var adapterCacheMb: Int = 1024
    @Option(help: "Most adapters resident at once.") var maxAdapters: Int = 256
    @Option(help: "KV cache budget in MB.") var kvCacheMb: Int = 512
    @Option(help: "Requests queued before new ones get 429.") var maxQueued: Int = 256
    @Option(help: "Bearer token for admin routes (default: $LORAMUX_ADMIN_TOKEN).") var adminToken: String?
    @Option(help: "Bearer token for completion routes (default: $LORAMUX_API_KEY).") var apiKey: String?
    @Option(help: "Largest request body in bytes.") var maxBodyBytes: Int = 1 << 20
    @Flag(inversion: .prefixedNo, help: "Reuse the KV cache of earlier requests with the same adapter and prompt prefix.")
    var prefixCaching = true

    func validate() throws {
        guard (0...65535).contains(port) else { throw ValidationError("--port must be in 0...65535") }
        guard maxBatch >= 1, adapterCacheMb >= 1, maxAdapters >= 1, kvCacheMb >= 1, maxQueued >= 1, maxBodyBytes >= 1024 else {
            throw ValidationError("limits must be positive")
        }
    }

    func run() async throws {
        modelOptions.setThreads()
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = ProcessInfo.processInfo.environment["LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .info
            return h
        }
        // Sized to the cache budget, so every resident adapter fits; faulted in
        // the background, so the server listens at once.
        poolOptions.install(defaultMB: adapterCacheMb, prefault: .background)
        let env = ProcessInfo.processInfo.environment
        var cfg = ServerConfig(modelPath: modelOptions.model)
        cfg.host = host
        cfg.port = port
        cfg.adapterDirs = [adapters]
        cfg.maxBatch = maxBatch
        cfg.adapterCacheMB = adapterCacheMb
        cfg.maxAdapters = maxAdapters
        cfg.kvCacheMB = kvCacheMb
        cfg.maxQueued = maxQueued
        // Committed up front, off the request path (the pool's RSS shows at once).
        cfg.kvPrefault = .background
        cfg.adminToken = adminToken ?? env["LORAMUX_ADMIN_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
        cfg.apiKey = apiKey ?? env["LORAMUX_API_KEY"].flatMap { $0.isEmpty ? nil : $0 }
        cfg.maxBodyBytes = maxBodyBytes
        cfg.prefixCaching = prefixCaching
        let logger = Logger(label: "loramux")
        let state = try ServerState(config: cfg, logger: logger)
        let shownHost = cfg.host
        let app = LoraMuxServerApp.build(state: state) { port in
            // One parseable line for scripts and tests that start us on port 0.
            FileHandle.standardOutput.write(Data("loramux: listening on http://\(shownHost):\(port) model=\(state.modelId)\n".utf8))
        }
        try await app.runService()
    }
}
