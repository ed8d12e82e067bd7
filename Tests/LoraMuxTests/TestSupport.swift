import XCTest
import Foundation
@testable import LoraMux

enum Fixtures {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures")
    static let repo = root.deletingLastPathComponent().deletingLastPathComponent()

    static func url(_ rel: String) -> URL { root.appendingPathComponent(rel) }

    static func json(_ rel: String) throws -> [String: Any] {
        let data = try Data(contentsOf: url(rel))
        return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    /// The real default model. Missing means the test fails: run ops/fetch-model.
    static func smolLM2Path(file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let path = ProcessInfo.processInfo.environment["LORAMUX_MODEL"]
            ?? repo.appendingPathComponent("models/SmolLM2-135M-Instruct.Q4_1.gguf").path
        guard FileManager.default.fileExists(atPath: path) else {
            XCTFail("SmolLM2 model not found at \(path): run ops/fetch-model", file: file, line: line)
            throw XCTSkip("unreachable: failed above")
        }
        return path
    }

    /// One model per path for the whole test run (loading is cheap, but the
    /// real model's pages are worth keeping warm).
    nonisolated(unsafe) private static var models: [String: LlamaModel] = [:]
    private static let lock = NSLock()
    static func model(_ path: String) throws -> LlamaModel {
        lock.lock(); defer { lock.unlock() }
        if let m = models[path] { return m }
        let m = try LlamaModel(path: path)
        models[path] = m
        return m
    }
}

extension Array where Element == Any {
    var ints: [Int32] { compactMap { ($0 as? NSNumber)?.int32Value } }
    var floats: [Float] { compactMap { ($0 as? NSNumber)?.floatValue } }
}

func maxAbsDiff(_ a: [Float], _ b: [Float]) -> Float {
    precondition(a.count == b.count, "length \(a.count) vs \(b.count)")
    return zip(a, b).map { abs($0 - $1) }.max() ?? 0
}

/// Logits of every position of one prompt (one prefill), optionally through an adapter.
func prefillLogits(_ model: LlamaModel, _ ids: [Int32], adapter: LoraAdapter? = nil, kvPrefault: Prefault = .lazily) throws -> [Float] {
    let cache = try KVCache(config: model.config, numBlocks: (ids.count + 3) / 4 + 1, blockSize: 4, prefault: kvPrefault)
    var t: [Int32] = []
    guard cache.reserve(&t, tokens: ids.count) else { throw EngineError.cacheFull("test") }
    let rows = ids.enumerated().map { BatchRow(token: $1, position: Int32($0), sequence: 0, wantsLogits: true) }
    return try model.forward(ForwardBatch(rows: rows, tables: [t], adapters: [adapter]), cache: cache)
}

/// Every prompt prefilled in one batch, each sequence asking for its last
/// position's logits: (sequences × vocab) values, sequence by sequence.
func batchedLastLogits(_ model: LlamaModel, _ prompts: [[Int32]], cache: KVCache) throws -> [Float] {
    var tables: [[Int32]] = []
    var rows: [BatchRow] = []
    for (s, ids) in prompts.enumerated() {
        var t: [Int32] = []
        guard cache.reserve(&t, tokens: ids.count) else { throw EngineError.cacheFull("test") }
        tables.append(t)
        for (i, id) in ids.enumerated() { rows.append(BatchRow(token: id, position: Int32(i), sequence: s, wantsLogits: i == ids.count - 1)) }
    }
    defer { for i in tables.indices { cache.release(&tables[i]) } }
    return try model.forward(ForwardBatch(rows: rows, tables: tables), cache: cache)
}
