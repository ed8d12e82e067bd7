import Foundation
import HTTPTypes
import Hummingbird
import Logging
import LoraMux
import Prometheus
import ServiceLifecycle

public struct ServerConfig: Sendable {
    public var host = "127.0.0.1"
    public var port = 8080
    public var modelPath: String
    public var adapterDirs: [String] = []
    public var maxBatch = 32
    public var adapterCacheMB = 1024
    public var maxAdapters = 256
    public var kvCacheMB = 512
    public var adminToken: String?
    public var apiKey: String?
    public var maxBodyBytes = 1 << 20
    public var maxQueued = 256
    /// When the KV pool's pages are faulted in (`loramux serve`: in the background).
    public var kvPrefault: Prefault = .lazily
    public var shutdownGrace: TimeInterval = 10
    /// Reuse KV blocks of earlier requests with the same adapter and prompt prefix.
    public var prefixCaching = true

    public init(modelPath: String) { self.modelPath = modelPath }
}

/// Everything a request handler needs. The HTTP layer parses, validates and
/// formats; the engine (its own thread) owns tensors.
public final class ServerState: @unchecked Sendable {
    public let config: ServerConfig
    public let model: LlamaModel
    public let tokenizer: BPETokenizer
    public let engine: Engine
    public let registry: AdapterRegistry
    public let adapters: AdapterCache
    public let modelId: String
    let metrics: ServerMetrics
    let logger: Logger
    private let drainingLock = NSLock()
    private var _draining = false
    var draining: Bool {
        get { drainingLock.lock(); defer { drainingLock.unlock() }; return _draining }
        set { drainingLock.lock(); _draining = newValue; drainingLock.unlock() }
    }

    public init(config: ServerConfig, logger: Logger = Logger(label: "loramux")) throws {
        self.config = config
        self.logger = logger
        let weights = try LlamaWeights.load(path: config.modelPath)
        model = LlamaModel(weights: weights)
        if let g = weights.gguf { tokenizer = try BPETokenizer(gguf: g) } else {
            tokenizer = try BPETokenizer(tokenizerJSON: URL(fileURLWithPath: config.modelPath).appendingPathComponent("tokenizer.json"))
        }
        modelId = ((config.modelPath as NSString).lastPathComponent as NSString).deletingPathExtension
        let dirs = config.adapterDirs
        for d in dirs where !FileManager.default.fileExists(atPath: d) {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        registry = try AdapterRegistry(roots: dirs)
        let (names, skipped) = registry.scan()
        for (item, why) in skipped { logger.warning("skipping adapter", metadata: ["item": "\(item)", "reason": "\(why)"]) }
        logger.info("adapters registered", metadata: ["count": "\(names.count)", "names": "\(names.joined(separator: ","))"])
        let reg = registry
        adapters = AdapterCache(budgetBytes: config.adapterCacheMB << 20, maxCount: config.maxAdapters) { name in
            guard let e = reg.lookup(name) else { throw AdapterError.unknownAdapter(name) }
            return try AdapterLoader.load(path: e.path, name: name, base: weights)
        }
        engine = try Engine(model: model, tokenizer: tokenizer,
                            config: EngineConfig(maxRunning: config.maxBatch, stepTokenBudget: 256,
                                                 kvCacheBytes: config.kvCacheMB << 20, maxQueued: config.maxQueued,
                                                 kvPrefault: config.kvPrefault, prefixCaching: config.prefixCaching))
        metrics = ServerMetrics()
    }

    /// The adapter a `model` field names: nil for the base model.
    func resolve(model name: String) throws -> String? {
        if name == modelId || name == "base" || name.isEmpty { return nil }
        guard registry.lookup(name) != nil else {
            throw APIError.notFound("The model '\(name)' does not exist: not the base model ('\(modelId)') or a registered adapter")
        }
        return name
    }
}

/// Prometheus collectors (swift-prometheus), labelled where the labels are bounded.
final class ServerMetrics: @unchecked Sendable {
    let registry = PrometheusCollectorRegistry()
    private let lock = NSLock()

    func requests(route: String, adapter: String, status: Int) -> Counter {
        registry.makeCounter(name: "loramux_requests_total", labels: [("route", route), ("adapter", adapter), ("status", String(status))])
    }
    func latency(route: String, adapter: String) -> ValueHistogram {
        registry.makeValueHistogram(name: "loramux_request_seconds", labels: [("route", route), ("adapter", adapter)],
                                    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60])
    }
    lazy var promptTokens = registry.makeCounter(name: "loramux_prompt_tokens_total")
    lazy var completionTokens = registry.makeCounter(name: "loramux_completion_tokens_total")

    /// What each scrape-time counter was at the last scrape.
    private var counted: [String: Double] = [:]

    /// Read from the engine and cache at scrape time: levels as gauges, and
    /// running totals as counters (`_total`) so that rate() sees them as such;
    /// each counter advances by what its source gained since the last scrape.
    func render(_ s: ServerState) -> String {
        lock.lock(); defer { lock.unlock() }
        let m = s.engine.metrics
        let c = s.adapters.statistics
        let g: [(String, Double)] = [
            ("loramux_queue_depth", Double(m.queued)), ("loramux_running_sequences", Double(m.running)),
            ("loramux_batch_rows", Double(m.lastBatchRows)), ("loramux_kv_blocks_used", Double(m.kvBlocksUsed)),
            ("loramux_kv_blocks_total", Double(m.kvBlocksTotal)), ("loramux_kv_blocks_cached", Double(m.kvBlocksCached)),
            ("loramux_adapter_cache_resident_bytes", Double(c.residentBytes)),
            ("loramux_adapter_cache_resident", Double(c.residentCount)), ("loramux_adapter_pins", Double(s.adapters.totalPins)),
        ]
        for (name, v) in g { registry.makeGauge(name: name).set(v) }
        let totals: [(String, Double)] = [
            ("loramux_engine_steps_total", Double(m.steps)), ("loramux_generated_tokens_total", Double(m.generatedTokens)),
            ("loramux_preemptions_total", Double(m.preemptions)),
            ("loramux_prefix_cache_hit_tokens_total", Double(m.cachedPromptTokens)),
            ("loramux_adapter_cache_hits_total", Double(c.hits)), ("loramux_adapter_cache_misses_total", Double(c.misses)),
            ("loramux_adapter_cache_evictions_total", Double(c.evictions)), ("loramux_adapter_cache_loads_total", Double(c.loads)),
            ("loramux_adapter_cache_load_seconds_total", c.loadSeconds),
        ]
        for (name, v) in totals {
            let counter = registry.makeCounter(name: name)
            let gained = v - (counted[name] ?? 0)
            if gained > 0 { counter.increment(by: gained) }
            counted[name] = max(v, counted[name] ?? 0)
        }
        return registry.emitToString()
    }
}

/// Drains on graceful shutdown: new requests get 503, in-flight ones get
/// `shutdownGrace` seconds to finish, then the engine cancels the rest.
struct EngineService: Service {
    let state: ServerState

    func run() async throws {
        try? await gracefulShutdown()
        state.draining = true
        state.logger.info("draining", metadata: ["running": "\(state.engine.metrics.running)"])
        let deadline = Date().addingTimeInterval(state.config.shutdownGrace)
        while Date() < deadline {
            let m = state.engine.metrics
            if m.running == 0 && m.queued == 0 { break }
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
        state.engine.shutdown()
        state.logger.info("engine stopped")
    }
}

public enum LoraMuxServerApp {
    /// The application: router + engine service, ready to `runService()`.
    public static func build(state: ServerState, onRunning: @escaping @Sendable (Int) async -> Void = { _ in }) -> some ApplicationProtocol {
        let router = buildRouter(state)
        return Application(router: router,
                           configuration: .init(address: .hostname(state.config.host, port: state.config.port), serverName: "loramux"),
                           services: [EngineService(state: state)],
                           onServerRunning: { ch in await onRunning(ch.localAddress?.port ?? 0) },
                           logger: state.logger)
    }
}
