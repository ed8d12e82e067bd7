import Foundation
import LoraMux
import XCTest

/// 64 simultaneous streams over 16 adapters while adapters come and go.
final class ConcurrencyTests: XCTestCase {
    func testSixtyFourStreamsWhileAdaptersLoadAndUnload() async throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-conc-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: root) }
        for n in ["sql-ish-qv", "all-r4"] {
            try FileManager.default.copyItem(at: LiveServer.fixtures.appendingPathComponent("smollm2/adapters/\(n)"), to: root.appendingPathComponent(n))
        }
        let base = try LlamaWeights.load(path: try LiveServer.modelPath())
        let scratch = root.appendingPathComponent(".scratch")
        for i in 0..<16 {  // 14 more adapters in the root, and a spare outside the scan
            let peft = scratch.appendingPathComponent("s\(i)").path
            try SyntheticAdapter.writePEFT(to: peft, base: base.config, rank: 4, targets: i % 2 == 0 ? .qv : .all, seed: UInt64(100 + i))
            let name = i < 14 ? "syn-\(i)" : "spare-\(i)"
            _ = try PackedAdapter.pack(peftDirectory: peft, to: root.appendingPathComponent("\(name).lora").path)
        }
        try FileManager.default.removeItem(at: scratch)
        // The spares are loaded and unloaded live; start without them.
        let spares = ["spare-14", "spare-15"].map { root.appendingPathComponent("\($0).lora") }
        let hidden = root.deletingLastPathComponent().appendingPathComponent("loramux-spares-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: hidden, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: hidden) }
        for s in spares { try FileManager.default.moveItem(at: s, to: hidden.appendingPathComponent(s.lastPathComponent)) }

        let s = try LiveServer(adapters: root.path, extra: ["--max-batch", "16", "--max-adapters", "12"])
        defer { XCTAssertEqual(s.stop(), 0) }
        let names = ["sql-ish-qv", "all-r4"] + (0..<14).map { "syn-\($0)" }
        let churnNames = ["syn-0", "syn-1"]

        let outcome = try await withThrowingTaskGroup(of: String.self) { group in
            for i in 0..<64 {
                group.addTask {
                    let r = try await s.stream("/v1/completions", json: ["model": names[i % 16], "prompt": "Request \(i): tell me", "max_tokens": 16,
                                                                       "temperature": 0.7, "seed": i, "ignore_eos": true, "stream": true])
                    if r.status == 404 { return "404" }
                    guard r.status == 200 else { return "status \(r.status)" }
                    guard r.done else { return "no [DONE]" }
                    if r.events.contains(where: { $0["error"] != nil }) { return "stream error" }
                    let reason = (r.events.last?["choices"] as? [[String: Any]])?.first?["finish_reason"] as? String
                    return reason == "length" ? "ok" : "finish \(reason ?? "nil")"
                }
            }
            // Churn: unload and reload two in-use adapters, load and unload two new ones, check health.
            group.addTask {
                for round in 0..<3 {
                    for n in churnNames {
                        _ = try await s.request(.POST, "/v1/unload_lora_adapter", json: ["lora_name": n])
                        _ = try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": n])
                    }
                    for (k, sp) in spares.enumerated() {
                        let src = hidden.appendingPathComponent(sp.lastPathComponent)
                        let dst = root.appendingPathComponent("live-\(round)-\(k).lora")
                        try? FileManager.default.copyItem(at: src, to: dst)
                        let l = try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": "live-\(round)-\(k)", "lora_path": dst.path])
                        if l.status != 200 { return "load failed: \(l.errorMessage)" }
                        let u = try await s.request(.POST, "/v1/unload_lora_adapter", json: ["lora_name": "live-\(round)-\(k)"])
                        if u.status != 200 { return "unload failed: \(u.errorMessage)" }
                    }
                    let h = try await s.request(.GET, "/health")
                    if h.status != 200 { return "health \(h.status)" }
                }
                return "churn ok"
            }
            var out: [String] = []
            for try await r in group { out.append(r) }
            return out
        }
        let counts = outcome.reduce(into: [String: Int]()) { $0[$1, default: 0] += 1 }
        XCTAssertEqual(counts["churn ok"], 1, "\(counts)")
        XCTAssertEqual((counts["ok"] ?? 0) + (counts["404"] ?? 0), 64, "every request completes or gets a proper error: \(counts)")
        XCTAssertGreaterThanOrEqual(counts["ok"] ?? 0, 56, "only requests for the churned adapters may miss: \(counts)")

        var blocks = try await s.metric("loramux_kv_blocks_used")
        for _ in 0..<100 where blocks != 0 { try await Task.sleep(nanoseconds: 50_000_000); blocks = try await s.metric("loramux_kv_blocks_used") }
        XCTAssertEqual(blocks, 0, "KV blocks return to zero")
        let list = try await s.request(.GET, "/v1/adapters")
        let pins = (list.json?["adapters"] as? [[String: Any]])?.compactMap { $0["pins"] as? Int }.reduce(0, +)
        XCTAssertEqual(pins, 0, "no adapter stays pinned")
        let health = try await s.request(.GET, "/health")
        XCTAssertEqual(health.status, 200)
    }
}
