import Foundation
import LoraMux
import XCTest

/// Faults a running server must absorb: adapter files that change under it,
/// loads that fail part-way, a full KV cache, clients that vanish, SIGTERM
/// under load. Each ends with the server healthy and nothing left pinned or
/// allocated.
final class FaultTests: XCTestCase {
    let fm = FileManager.default

    /// A root holding `.lora` packs of the two SmolLM2 fixture adapters.
    func packedRoot(_ names: [String: String]) throws -> URL {
        let root = fm.temporaryDirectory.appendingPathComponent("loramux-fault-\(UUID().uuidString)")
        try fm.createDirectory(at: root, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: root) }
        for (name, fixture) in names {
            _ = try PackedAdapter.pack(peftDirectory: LiveServer.fixtures.appendingPathComponent("smollm2/adapters/\(fixture)").path,
                                       to: root.appendingPathComponent("\(name).lora").path)
        }
        return root
    }

    func greedy(_ s: LiveServer, _ model: String, _ n: Int = 8) async throws -> LiveServer.Reply {
        try await s.request(.POST, "/v1/completions", json: ["model": model, "prompt": "The capital of France is", "max_tokens": n,
                                                             "temperature": 0, "ignore_eos": true, "return_token_ids": true])
    }

    func tokens(_ r: LiveServer.Reply) -> [Int32] {
        (((r.json?["choices"] as? [[String: Any]])?.first?["token_ids"]) as? [Any])?.int32s ?? []
    }

    /// Nothing running, no KV blocks, no pins: polled, since a cancelled
    /// sequence is reaped at the engine's next step.
    func assertIdle(_ s: LiveServer, file: StaticString = #filePath, line: UInt = #line) async throws {
        var kv: Double? = -1, pins: Double? = -1, running: Double? = -1
        for _ in 0..<200 {
            kv = try await s.metric("loramux_kv_blocks_used")
            pins = try await s.metric("loramux_adapter_pins")
            running = try await s.metric("loramux_running_sequences")
            if kv == 0 && pins == 0 && running == 0 { break }
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        XCTAssertEqual(kv, 0, "KV blocks leaked", file: file, line: line)
        XCTAssertEqual(pins, 0, "adapter pins leaked", file: file, line: line)
        XCTAssertEqual(running, 0, file: file, line: line)
        let health = try await s.request(.GET, "/health")
        XCTAssertEqual(health.status, 200, "server healthy", file: file, line: line)
    }

    func testAdapterFileDeletedTruncatedOrReplacedWhileRegistered() async throws {
        let root = try packedRoot(["a": "all-r4", "b": "sql-ish-qv"])
        let a = root.appendingPathComponent("a.lora"), b = root.appendingPathComponent("b.lora")
        let goodA = try Data(contentsOf: a), goodB = try Data(contentsOf: b)
        // One resident adapter: naming the other evicts it, so the next use reloads from disk.
        let s = try LiveServer(adapters: root.path, extra: ["--max-adapters", "1"])
        defer { XCTAssertEqual(s.stop(), 0) }
        let tokA = tokens(try await greedy(s, "a")), tokB = tokens(try await greedy(s, "b"))
        XCTAssertEqual(tokA.count, 8)
        XCTAssertNotEqual(tokA, tokB, "the two adapters differ")

        // Truncated while not resident: a clear error naming the file, then normal service.
        try goodA.prefix(goodA.count / 2).write(to: a)
        let truncated = try await greedy(s, "a")
        XCTAssertEqual(truncated.status, 400, truncated.errorMessage)
        XCTAssertTrue(truncated.errorMessage.contains("a.lora"), truncated.errorMessage)
        let r1 = tokens(try await greedy(s, "b"))
        XCTAssertEqual(r1, tokB)

        // Deleted: the same.
        try fm.removeItem(at: a)
        let deleted = try await greedy(s, "a")
        XCTAssertEqual(deleted.status, 400, deleted.errorMessage)
        XCTAssertTrue(deleted.errorMessage.contains("no such file"), deleted.errorMessage)

        // Restored: failed loads are not remembered, the adapter works again.
        try goodA.write(to: a)
        let r2 = tokens(try await greedy(s, "a"))
        XCTAssertEqual(r2, tokA)

        // Truncated while resident and mid-stream: the stream runs on the loaded copy.
        async let stream = s.stream("/v1/completions", json: ["model": "a", "prompt": "Once", "max_tokens": 24, "temperature": 0,
                                                             "ignore_eos": true, "stream": true])
        try await Task.sleep(nanoseconds: 200_000_000)
        try goodA.prefix(100).write(to: a)
        let r = try await stream
        XCTAssertEqual(r.status, 200)
        XCTAssertTrue(r.done)
        XCTAssertEqual(r.events.count, 24)
        XCTAssertNil(r.events.first { $0["error"] != nil }, "\(r.events)")

        // Replaced by another adapter's file: the next load serves the new weights.
        try goodB.write(to: a)
        _ = try await greedy(s, "b")  // evicts a
        let r3 = tokens(try await greedy(s, "a"))
        XCTAssertEqual(r3, tokB, "a reloads what is now on disk")
        try await assertIdle(s)
    }

    func testLoadThatFailsHalfWayLeavesNothingBehind() async throws {
        let root = try packedRoot(["good": "all-r4"])
        // Not scanned at start (a subfolder), but inside the root the load route accepts.
        let incoming = root.appendingPathComponent("incoming")
        try fm.createDirectory(at: incoming, withIntermediateDirectories: true)
        // A checksum failure in the last tensor: every earlier tensor has been
        // decompressed into the new adapter's arena when the load fails.
        var bytes = try Data(contentsOf: root.appendingPathComponent("good.lora"))
        bytes[bytes.count - 1] ^= 0x5A
        let broken = incoming.appendingPathComponent("broken.lora")
        try bytes.write(to: broken)
        let s = try LiveServer(adapters: root.path, extra: ["--admin-token", "t0k"])
        defer { XCTAssertEqual(s.stop(), 0) }
        func load(_ name: String, _ path: URL) async throws -> LiveServer.Reply {
            try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": name, "lora_path": path.path], token: "t0k")
        }
        func cache() async throws -> [String: Any] {
            let r = try await s.request(.GET, "/v1/adapters", token: "t0k")
            return try XCTUnwrap(r.json?["cache"] as? [String: Any])
        }
        let ok = try await load("good", root.appendingPathComponent("good.lora"))  // registered by the scan: "already loaded"
        XCTAssertEqual(ok.status, 200, ok.errorMessage)
        let warm = try await greedy(s, "good")
        XCTAssertEqual(warm.status, 200)
        let before = try await cache()
        let failed = try await load("broken", broken)
        XCTAssertEqual(failed.status, 400)
        XCTAssertTrue(failed.errorMessage.contains("corrupt") && failed.errorMessage.contains("broken.lora"), failed.errorMessage)
        let after = try await cache()
        XCTAssertEqual(after["resident_bytes"] as? Int, before["resident_bytes"] as? Int, "the half-built adapter was freed")
        XCTAssertEqual(after["resident_count"] as? Int, 1)
        XCTAssertEqual(after["failed_loads"] as? Int, (before["failed_loads"] as? Int ?? -1) + 1)
        let list = try await s.request(.GET, "/v1/adapters", token: "t0k")
        let listed = (list.json?["adapters"] as? [[String: Any]])?.compactMap { $0["name"] as? String }
        XCTAssertEqual(listed, ["good"], "the failed adapter is not registered")
        let named = try await greedy(s, "broken")
        XCTAssertEqual(named.status, 404, named.errorMessage)
        let served = try await greedy(s, "good")
        XCTAssertEqual(served.status, 200)
        // Fixed on disk, the same name loads.
        try Data(contentsOf: root.appendingPathComponent("good.lora")).write(to: broken)
        let reload = try await load("broken", broken)
        XCTAssertEqual(reload.status, 200)
        try await assertIdle(s)
    }

    func testKVCacheExhaustionQueuesPreemptsAndStaysExact() async throws {
        let root = try packedRoot(["a": "all-r4", "b": "sql-ish-qv"])
        // 6 MB holds 8 blocks of 16 positions (SmolLM2: 737 KB a block), 128
        // positions: a few of these 40-odd-position sequences at a time, and
        // their growth forces preemption.
        let s = try LiveServer(adapters: root.path, extra: ["--kv-cache-mb", "6", "--max-batch", "8"])
        defer { XCTAssertEqual(s.stop(), 0) }
        let prompts = (0..<6).map { "Story \($0): once upon a time" }
        func body(_ i: Int) -> [String: Any] {
            ["model": i % 3 == 0 ? "" : (i % 3 == 1 ? "a" : "b"), "prompt": prompts[i], "max_tokens": 32, "temperature": 0,
             "ignore_eos": true, "return_token_ids": true]
        }
        var alone: [[Int32]] = []
        for i in 0..<6 { alone.append(tokens(try await s.request(.POST, "/v1/completions", json: body(i)))) }
        let together = try await withThrowingTaskGroup(of: (Int, LiveServer.Reply).self) { g in
            for i in 0..<6 { g.addTask { (i, try await s.request(.POST, "/v1/completions", json: body(i))) } }
            var out = [LiveServer.Reply?](repeating: nil, count: 6)
            for try await (i, r) in g { out[i] = r }
            return out.compactMap { $0 }
        }
        for (i, r) in together.enumerated() {
            XCTAssertEqual(r.status, 200, r.errorMessage)
            XCTAssertEqual(tokens(r), alone[i], "request \(i): same greedy tokens under KV pressure as alone")
        }
        let preemptions = try await s.metric("loramux_preemptions_total") ?? 0
        XCTAssertGreaterThan(preemptions, 0, "the cache was small enough to force preemption")
        // A request that can never fit is refused up front, clearly.
        let huge = try await s.request(.POST, "/v1/completions", json: ["model": "a", "prompt": "Hi", "max_tokens": 200])
        XCTAssertEqual(huge.status, 413)
        XCTAssertTrue(huge.errorMessage.contains("128"), huge.errorMessage)
        try await assertIdle(s)
    }

    func testManyClientsDisconnectMidStream() async throws {
        let root = try packedRoot(["a": "all-r4", "b": "sql-ish-qv"])
        let s = try LiveServer(adapters: root.path)
        defer { XCTAssertEqual(s.stop(), 0) }
        try await withThrowingTaskGroup(of: Int.self) { g in
            for i in 0..<12 {
                g.addTask {
                    try await s.stream("/v1/chat/completions", json: ["model": ["a", "b", ""][i % 3], "messages": [["role": "user", "content": "Tell a long story \(i)"]],
                                                                      "max_tokens": 300, "ignore_eos": true, "stream": true], limit: 2 + i % 3).events.count
                }
            }
            for try await n in g { XCTAssertGreaterThanOrEqual(n, 2) }
        }
        try await assertIdle(s)
        let served = try await greedy(s, "a")
        XCTAssertEqual(served.status, 200, "still serving")
    }

    /// An adapter whose lora_alpha (1e30, finite, so it loads) overflows the
    /// activations makes NaN logits. A stream has sent its 200 and headers
    /// by then: it gets an SSE error event (code 500, the adapter named) as
    /// its last event, then [DONE]. A plain request gets a 500 JSON error.
    /// Requests for other adapters, and the server, carry on.
    func testAdapterThatOverflowsFailsItsRequestsAfterTheHeadersToo() async throws {
        let root = try packedRoot(["a": "all-r4"])
        let src = fm.temporaryDirectory.appendingPathComponent("loramux-huge-\(UUID().uuidString)")
        addTeardownBlock { try? FileManager.default.removeItem(at: src) }
        try fm.copyItem(at: LiveServer.fixtures.appendingPathComponent("smollm2/adapters/all-r4"), to: src)
        let cfg = src.appendingPathComponent("adapter_config.json")
        let text = try String(contentsOf: cfg, encoding: .utf8)
        XCTAssertTrue(text.contains("\"lora_alpha\": 8,"))
        try text.replacingOccurrences(of: "\"lora_alpha\": 8,", with: "\"lora_alpha\": 1e30,").write(to: cfg, atomically: true, encoding: .utf8)
        _ = try PackedAdapter.pack(peftDirectory: src.path, to: root.appendingPathComponent("huge.lora").path)
        let s = try LiveServer(adapters: root.path)
        for path in ["/v1/chat/completions", "/v1/completions"] {
            var body: [String: Any] = ["model": "huge", "max_tokens": 8, "stream": true]
            if path.contains("chat") { body["messages"] = [["role": "user", "content": "Hi"]] } else { body["prompt"] = "Hi" }
            let st = try await s.stream(path, json: body)
            XCTAssertEqual(st.status, 200, path)
            XCTAssertTrue(st.done, "\(path): [DONE] after the error")
            let err = try XCTUnwrap(st.events.last?["error"] as? [String: Any], "\(path): the last event is the error, events \(st.events)")
            XCTAssertEqual(err["code"] as? Int, 500, path)
            let message = err["message"] as? String ?? ""
            XCTAssertTrue(message.contains("not finite") && message.contains("adapter 'huge'"), message)
            XCTAssertEqual(st.events.filter { $0["error"] != nil }.count, 1, path)
        }
        let plain = try await greedy(s, "huge")
        XCTAssertEqual(plain.status, 500)
        XCTAssertTrue(plain.errorMessage.contains("adapter 'huge'"), plain.errorMessage)
        let ok = try await greedy(s, "a")
        XCTAssertEqual(ok.status, 200, ok.errorMessage)
        XCTAssertEqual(tokens(ok).count, 8)
        try await assertIdle(s)
    }

    func testSIGTERMUnderLoadEndsEveryStreamAndExitsCleanly() async throws {
        let root = try packedRoot(["a": "all-r4", "b": "sql-ish-qv"])
        let s = try LiveServer(adapters: root.path)
        // Eight streams (the client's connection pool per host), all admitted before the signal.
        let n = 8
        let results = try await withThrowingTaskGroup(of: (Bool, Int, Bool).self) { g in
            for i in 0..<n {
                g.addTask {
                    let r = try await s.stream("/v1/completions", json: ["model": ["a", "b", ""][i % 3], "prompt": "Count to fifty:",
                                                                       "max_tokens": 30 + 30 * (i % 2), "ignore_eos": true, "stream": true])
                    return (r.done, r.events.count, r.events.contains { $0["error"] != nil })
                }
            }
            var running = 0.0
            for _ in 0..<600 where running < Double(n) {
                running = try await s.metric("loramux_running_sequences") ?? 0
                try await Task.sleep(nanoseconds: 20_000_000)
            }
            XCTAssertEqual(running, Double(n), "all streams running before SIGTERM")
            kill(s.process.processIdentifier, SIGTERM)
            var out: [(Bool, Int, Bool)] = []
            for try await r in g { out.append(r) }
            return out
        }
        let deadline = Date().addingTimeInterval(30)
        while s.process.isRunning && Date() < deadline { try await Task.sleep(nanoseconds: 50_000_000) }
        XCTAssertFalse(s.process.isRunning, "the server exits within the grace period")
        XCTAssertEqual(s.process.terminationStatus, 0)
        // Admitted streams finish during the drain, or end with an error event
        // if the grace ran out; every one ends with [DONE], none hangs.
        XCTAssertEqual(results.count, n)
        for (done, events, errored) in results {
            XCTAssertTrue(done, "every stream ends with [DONE] (events \(events), error \(errored))")
            XCTAssertTrue(errored || events >= 30, "finished, or told why not")
        }
    }
}
