import AsyncHTTPClient
import Foundation
import LoraMux
import NIOHTTP1
import XCTest

/// The real server over loopback: every route, every error status, streaming.
final class ServerTests: XCTestCase {
    static let adminToken = "test-admin-token"

    /// A fresh adapter root holding the two real SmolLM2 adapters.
    func adapterRoot() throws -> URL {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-root-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        for n in ["sql-ish-qv", "all-r4"] {
            try FileManager.default.copyItem(at: LiveServer.fixtures.appendingPathComponent("smollm2/adapters/\(n)"), to: root.appendingPathComponent(n))
        }
        addTeardownBlock { try? FileManager.default.removeItem(at: root) }
        return root
    }

    func golden() throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: LiveServer.fixtures.appendingPathComponent("smollm2/adapters/golden.json"))) as? [String: Any])
    }

    func testCompletionsChatStreamingAndModels() async throws {
        let root = try adapterRoot()
        let s = try LiveServer(adapters: root.path)
        defer { XCTAssertEqual(s.stop(), 0, "clean exit on SIGTERM") }

        let health = try await s.request(.GET, "/health")
        XCTAssertEqual(health.status, 200)
        let models = try await s.request(.GET, "/v1/models")
        let ids = (models.json?["data"] as? [[String: Any]])?.compactMap { $0["id"] as? String } ?? []
        XCTAssertEqual(Set(ids), ["SmolLM2-135M-Instruct.Q4_1", "sql-ish-qv", "all-r4"])
        let parents = (models.json?["data"] as? [[String: Any]])?.filter { $0["id"] as? String == "sql-ish-qv" }.first?["parent"] as? String
        XCTAssertEqual(parents, "SmolLM2-135M-Instruct.Q4_1")
        let one = try await s.request(.GET, "/v1/models/sql-ish-qv")
        XCTAssertEqual(one.status, 200, one.errorMessage)
        XCTAssertEqual(one.json?["id"] as? String, "sql-ish-qv")
        XCTAssertEqual(one.json?["parent"] as? String, "SmolLM2-135M-Instruct.Q4_1")
        let baseOne = try await s.request(.GET, "/v1/models/SmolLM2-135M-Instruct.Q4_1")
        XCTAssertTrue(baseOne.json?["parent"] is NSNull)
        let missing = try await s.request(.GET, "/v1/models/nope")
        XCTAssertEqual(missing.status, 404)
        XCTAssertTrue(missing.errorMessage.contains("does not exist"), missing.errorMessage)

        // Chat with an adapter, greedy: the tokens PEFT produced (golden), with ids returned.
        let g = try golden()
        let spec = try XCTUnwrap((g["adapters"] as? [String: [String: Any]])?["sql-ish-qv"])
        let c = try XCTUnwrap((spec["chat"] as? [[String: Any]])?[1])
        let want = try XCTUnwrap(c["token_ids"] as? [Any]).int32s
        let messages = try XCTUnwrap(c["messages"] as? [[String: Any]])
        let chat = try await s.request(.POST, "/v1/chat/completions", json: [
            "model": "sql-ish-qv", "messages": messages, "max_tokens": 40, "temperature": 0, "ignore_eos": true, "return_token_ids": true])
        XCTAssertEqual(chat.status, 200, chat.errorMessage)
        let choice = try XCTUnwrap((chat.json?["choices"] as? [[String: Any]])?.first)
        XCTAssertEqual((choice["token_ids"] as? [Any])?.int32s, want)
        XCTAssertEqual((choice["prompt_token_ids"] as? [Any])?.int32s, (c["prompt_ids"] as? [Any])?.int32s)
        XCTAssertEqual((chat.json?["usage"] as? [String: Any])?["completion_tokens"] as? Int, 40)
        XCTAssertEqual(((chat.json?["usage"] as? [String: Any])?["prompt_tokens_details"] as? [String: Any])?["cached_tokens"] as? Int, 0,
                       "the first request computes its whole prompt")
        XCTAssertEqual(chat.json?["object"] as? String, "chat.completion")

        // The same request streamed: same tokens, same text, ends with [DONE].
        let chatLabels = ["route": "chat", "adapter": "sql-ish-qv"]
        let before = try await s.metric("loramux_request_seconds_sum", labels: chatLabels)
        let secondsBefore = try XCTUnwrap(before)
        let st = try await s.stream("/v1/chat/completions", json: [
            "model": "sql-ish-qv", "messages": messages, "max_tokens": 40, "temperature": 0, "ignore_eos": true,
            "return_token_ids": true, "stream": true, "stream_options": ["include_usage": true]])
        XCTAssertEqual(st.status, 200)
        XCTAssertTrue(st.done)
        // Its latency covers the whole stream, not just the headers (the events
        // came over 40 decode steps of the real model).
        let after = try await s.metric("loramux_request_seconds_sum", labels: chatLabels)
        let secondsAfter = try XCTUnwrap(after)
        XCTAssertGreaterThan(st.span, 0.05)
        XCTAssertGreaterThanOrEqual(secondsAfter - secondsBefore, st.span, "the streamed request's seconds include its span")
        let streamed = st.events.flatMap { (($0["choices"] as? [[String: Any]])?.first?["token_ids"] as? [Any])?.int32s ?? [] }
        XCTAssertEqual(streamed, want)
        let streamedText = st.events.compactMap { (($0["choices"] as? [[String: Any]])?.first?["delta"] as? [String: Any])?["content"] as? String }.joined()
        XCTAssertEqual(streamedText, (choice["message"] as? [String: Any])?["content"] as? String)
        XCTAssertEqual(st.events.last?["object"] as? String, "chat.completion.chunk")
        // include_usage as OpenAI streams it: usage null on every chunk, then a last chunk with no choices.
        XCTAssertEqual((st.events.last?["usage"] as? [String: Any])?["completion_tokens"] as? Int, 40)
        // The repeat took the first request's whole KV blocks (16 positions each) from the prefix cache.
        let promptLen = try XCTUnwrap((c["prompt_ids"] as? [Any])?.count)
        XCTAssertEqual(((st.events.last?["usage"] as? [String: Any])?["prompt_tokens_details"] as? [String: Any])?["cached_tokens"] as? Int,
                       (promptLen - 1) / 16 * 16)
        XCTAssertEqual((st.events.last?["choices"] as? [Any])?.count, 0)
        XCTAssertTrue(st.events.dropLast().allSatisfy { $0["usage"] is NSNull }, "usage is null before the last chunk")
        XCTAssertEqual(st.events.dropLast().last.flatMap { ($0["choices"] as? [[String: Any]])?.first?["finish_reason"] as? String }, "length")

        // Completions: text prompt and token-id prompt, base model by name.
        let byText = try await s.request(.POST, "/v1/completions", json: ["model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The capital of France is",
                                                                       "max_tokens": 8, "temperature": 0, "return_token_ids": true])
        XCTAssertEqual(byText.status, 200, byText.errorMessage)
        let t1 = try XCTUnwrap((byText.json?["choices"] as? [[String: Any]])?.first)
        let promptIds = try XCTUnwrap((t1["prompt_token_ids"] as? [Any])?.int32s)
        let byIds = try await s.request(.POST, "/v1/completions", json: ["model": "SmolLM2-135M-Instruct.Q4_1", "prompt": promptIds.map(Int.init),
                                                                      "max_tokens": 8, "temperature": 0])
        XCTAssertEqual((byIds.json?["choices"] as? [[String: Any]])?.first?["text"] as? String, t1["text"] as? String)
        let raw = try XCTUnwrap((try Fixtures.golden()["raw"] as? [[String: Any]])?.first)
        XCTAssertEqual(promptIds, (raw["prompt_ids"] as? [Any])?.int32s)
        XCTAssertEqual((t1["token_ids"] as? [Any])?.int32s, Array(try XCTUnwrap(raw["token_ids"] as? [Any]).int32s.prefix(8)))
        let sc = try await s.stream("/v1/completions", json: ["model": "all-r4", "prompt": "Hello", "max_tokens": 5, "stream": true])
        XCTAssertTrue(sc.done)
        XCTAssertEqual(sc.events.last?["object"] as? String, "text_completion")
        XCTAssertEqual((sc.events.last?["choices"] as? [[String: Any]])?.first?["finish_reason"] as? String, "length")

        let metrics = try await s.request(.GET, "/metrics")
        let text = String(decoding: metrics.body, as: UTF8.self)
        for name in ["loramux_requests_total", "loramux_request_seconds", "loramux_queue_depth", "loramux_kv_blocks_used",
                     "loramux_adapter_cache_hits_total", "loramux_completion_tokens_total", "loramux_batch_rows",
                     "loramux_kv_blocks_cached", "loramux_prefix_cache_hit_tokens_total", "loramux_engine_steps_total"] {
            XCTAssertTrue(text.contains(name), "metrics expose \(name)")
        }
        XCTAssertTrue(text.contains("adapter=\"sql-ish-qv\""))
        // Running totals are counters, and a scrape does not add to them.
        XCTAssertTrue(text.contains("# TYPE loramux_engine_steps_total counter"), text)
        XCTAssertTrue(text.contains("# TYPE loramux_queue_depth gauge"), text)
        let steps = try await s.metric("loramux_engine_steps_total")
        let again = try await s.metric("loramux_engine_steps_total")
        XCTAssertGreaterThan(try XCTUnwrap(steps), 40, "at least one step per generated token")
        XCTAssertEqual(steps, again, "idle between the scrapes")
    }

    /// `n` choices: greedy ones all give PEFT's tokens; seeded ones differ
    /// from each other (choice i samples with seed + i), repeat across
    /// requests, and stream interleaved under their own indices.
    func testSeveralChoices() async throws {
        let root = try adapterRoot()
        let s = try LiveServer(adapters: root.path, extra: ["--admin-token", Self.adminToken])
        defer { XCTAssertEqual(s.stop(), 0, "clean exit on SIGTERM") }
        let spec = try XCTUnwrap((try golden()["adapters"] as? [String: [String: Any]])?["sql-ish-qv"])
        let c = try XCTUnwrap((spec["chat"] as? [[String: Any]])?[2])
        let want = try XCTUnwrap(c["token_ids"] as? [Any]).int32s
        let greedy = try await s.request(.POST, "/v1/chat/completions", json: [
            "model": "sql-ish-qv", "messages": try XCTUnwrap(c["messages"]), "max_tokens": 40, "temperature": 0, "ignore_eos": true,
            "return_token_ids": true, "n": 3])
        XCTAssertEqual(greedy.status, 200, greedy.errorMessage)
        let gc = try XCTUnwrap(greedy.json?["choices"] as? [[String: Any]])
        XCTAssertEqual(gc.compactMap { $0["index"] as? Int }, [0, 1, 2])
        for ch in gc { XCTAssertEqual((ch["token_ids"] as? [Any])?.int32s, want) }
        let gu = try XCTUnwrap(greedy.json?["usage"] as? [String: Any])
        XCTAssertEqual(gu["completion_tokens"] as? Int, 120)
        XCTAssertEqual(gu["prompt_tokens"] as? Int, (c["prompt_ids"] as? [Any])?.count, "the prompt counts once")

        let body: [String: Any] = ["model": "all-r4", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1, "seed": 7,
                                   "ignore_eos": true, "return_token_ids": true, "n": 2]
        func tokens(_ r: LiveServer.Reply) -> [[Int32]] {
            ((r.json?["choices"] as? [[String: Any]]) ?? []).map { ($0["token_ids"] as? [Any])?.int32s ?? [] }
        }
        let a = try await s.request(.POST, "/v1/completions", json: body)
        XCTAssertEqual(a.status, 200, a.errorMessage)
        let ta = tokens(a)
        XCTAssertEqual(ta.count, 2)
        XCTAssertNotEqual(ta[0], ta[1], "seeds 7 and 8")
        let b = try await s.request(.POST, "/v1/completions", json: body)
        XCTAssertEqual(tokens(b), ta, "seeded choices repeat")
        var one = body; one["n"] = 1
        let single = try await s.request(.POST, "/v1/completions", json: one)
        XCTAssertEqual(tokens(single), [ta[0]], "choice 0 is the request with n = 1")
        var eight = body; eight["seed"] = 8; eight["n"] = 1
        let next = try await s.request(.POST, "/v1/completions", json: eight)
        XCTAssertEqual(tokens(next), [ta[1]], "choice 1 samples with seed + 1")

        var streamed = body
        streamed["stream"] = true
        streamed["stream_options"] = ["include_usage": true]
        let st = try await s.stream("/v1/completions", json: streamed)
        XCTAssertEqual(st.status, 200)
        XCTAssertTrue(st.done)
        var perChoice: [Int: [Int32]] = [:]
        var finishes: [Int: String] = [:]
        for e in st.events {
            for ch in (e["choices"] as? [[String: Any]]) ?? [] {
                let i = try XCTUnwrap(ch["index"] as? Int)
                perChoice[i, default: []] += (ch["token_ids"] as? [Any])?.int32s ?? []
                if let f = ch["finish_reason"] as? String { finishes[i] = f }
            }
        }
        XCTAssertEqual(perChoice[0], ta[0])
        XCTAssertEqual(perChoice[1], ta[1])
        XCTAssertEqual(finishes, [0: "length", 1: "length"])
        XCTAssertEqual((st.events.last?["usage"] as? [String: Any])?["completion_tokens"] as? Int, 24)
        XCTAssertEqual((st.events.last?["choices"] as? [Any])?.count, 0)
        // Logprobs per choice: greedy choices are the same, so are their
        // lists, and each choice's text_offset counts along its own text.
        var lp: [String: Any] = ["model": "all-r4", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                                 "logprobs": 1, "n": 2]
        let lr = try await s.request(.POST, "/v1/completions", json: lp)
        XCTAssertEqual(lr.status, 200, lr.errorMessage)
        let lists = ((lr.json?["choices"] as? [[String: Any]]) ?? []).compactMap { $0["logprobs"] as? [String: Any] }
        XCTAssertEqual(lists.count, 2)
        let offsets = lists.map { ($0["text_offset"] as? [Int]) ?? [] }
        XCTAssertEqual(offsets[0].first, 0)
        XCTAssertEqual(offsets[0], offsets[1])
        lp["stream"] = true
        let ls = try await s.stream("/v1/completions", json: lp)
        var streamedOffsets: [Int: [Int]] = [:]
        for e in ls.events {
            for ch in (e["choices"] as? [[String: Any]]) ?? [] {
                let i = try XCTUnwrap(ch["index"] as? Int)
                streamedOffsets[i, default: []] += ((ch["logprobs"] as? [String: Any])?["text_offset"] as? [Int]) ?? []
            }
        }
        XCTAssertEqual(streamedOffsets, [0: offsets[0], 1: offsets[0]])

        // Every pin returned (the engine drops a sequence's pin just after its last event).
        var pins: [Int] = []
        for _ in 0..<100 {
            let list = try await s.request(.GET, "/v1/adapters", token: Self.adminToken)
            XCTAssertEqual(list.status, 200, list.errorMessage)
            pins = ((list.json?["adapters"] as? [[String: Any]]) ?? []).compactMap { $0["pins"] as? Int }
            if pins == [0, 0] { break }
            try await Task.sleep(nanoseconds: 20_000_000)
        }
        XCTAssertEqual(pins, [0, 0], "both adapters resident, no pin left")
    }

    func testErrorStatuses() async throws {
        let root = try adapterRoot()
        let s = try LiveServer(adapters: root.path, extra: ["--max-body-bytes", "4096", "--admin-token", Self.adminToken])
        defer { s.stop() }
        func expect(_ status: Int, _ r: LiveServer.Reply, _ needle: String, file: StaticString = #filePath, line: UInt = #line) {
            XCTAssertEqual(r.status, status, r.errorMessage, file: file, line: line)
            XCTAssertTrue(r.errorMessage.contains(needle), "'\(r.errorMessage)' should contain '\(needle)'", file: file, line: line)
            XCTAssertNotNil((r.json?["error"] as? [String: Any])?["type"], "OpenAI error shape", file: file, line: line)
        }
        expect(400, try await s.request(.POST, "/v1/completions", raw: Data("{not json".utf8)), "malformed JSON")
        expect(400, try await s.request(.POST, "/v1/completions", json: ["prompt": "x"]), "model")
        expect(400, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": 5]), "prompt")
        expect(400, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": "x", "max_tokens": "ten"]), "max_tokens")
        expect(400, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": "x", "n": 17]), "'n'")
        expect(400, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": "x", "n": 0]), "'n'")
        expect(400, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": "x", "temperature": -1]), "temperature")
        expect(400, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": [1, 99_999_999]]), "vocabulary")
        expect(413, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": "x", "max_tokens": 100_000]), "context")
        expect(400, try await s.request(.POST, "/v1/chat/completions", json: ["model": "all-r4", "messages": []]), "messages")
        expect(400, try await s.request(.POST, "/v1/chat/completions", json: ["model": "all-r4", "messages": [["role": "tool", "content": "x"]]]), "role")
        expect(400, try await s.request(.POST, "/v1/chat/completions", json: ["model": "all-r4", "messages": [["role": "user", "content": [
            ["type": "text", "text": "x"], ["type": "image_url", "image_url": ["url": "http://x/y.png"]]]]]]), "content part type 'image_url'")
        for (bad, needle) in [(["logprobs": 21], "logprobs"), (["logprobs": true], "integer"), (["top_logprobs": 2], "chat"),
                              (["logit_bias": ["abc": 1]], "logit_bias"), (["logit_bias": ["5": 500]], "logit_bias"),
                              (["frequency_penalty": 3], "frequency_penalty"), (["repetition_penalty": 0], "repetition_penalty")] as [([String: Any], String)] {
            var body: [String: Any] = ["model": "all-r4", "prompt": "x"]
            body.merge(bad) { $1 }
            expect(400, try await s.request(.POST, "/v1/completions", json: body), needle)
        }
        for (bad, needle) in [(["logprobs": 3], "boolean"), (["top_logprobs": 3], "'logprobs': true"), (["echo": true], "echo"),
                              (["logprobs": true, "top_logprobs": 50], "logprobs")] as [([String: Any], String)] {
            var body: [String: Any] = ["model": "all-r4", "messages": [["role": "user", "content": "x"]]]
            body.merge(bad) { $1 }
            expect(400, try await s.request(.POST, "/v1/chat/completions", json: body), needle)
        }
        expect(404, try await s.request(.POST, "/v1/completions", json: ["model": "no-such-adapter", "prompt": "x"]), "does not exist")
        expect(404, try await s.request(.GET, "/v1/no-such-route"), "no route for GET /v1/no-such-route")
        expect(404, try await s.request(.GET, "/v1/completions"), "no route for GET /v1/completions")
        expect(413, try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": String(repeating: "a", count: 10_000)]), "too large")
        expect(413, try await s.request(.POST, "/v1/chat/completions", json: ["model": "all-r4", "messages": [["role": "user", "content": "x"]],
                                                                              "max_tokens": 100_000]), "more than the context")
        // Admin routes need the token.
        expect(401, try await s.request(.GET, "/v1/adapters"), "Bearer")
        expect(401, try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": "x"], token: "wrong"), "Bearer")
        let list = try await s.request(.GET, "/v1/adapters", token: Self.adminToken)
        XCTAssertEqual(list.status, 200)
        // Path tricks and broken adapters are refused; the server keeps serving.
        expect(400, try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": "../etc", "lora_path": "/etc"], token: Self.adminToken), "invalid adapter name")
        expect(400, try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": "evil", "lora_path": "/etc"], token: Self.adminToken), "outside")
        expect(400, try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": "rel", "lora_path": "adapters/rel.lora"], token: Self.adminToken),
               "taken from the adapter directory, so: \(root.path)/adapters/rel.lora")
        let bad = root.appendingPathComponent("broken")
        try FileManager.default.copyItem(at: LiveServer.fixtures.appendingPathComponent("tiny/adapters-bad/wrong_base"), to: bad)
        expect(400, try await s.request(.POST, "/v1/load_lora_adapter", json: ["lora_name": "broken", "lora_path": bad.path], token: Self.adminToken), "does not fit this base model")
        expect(404, try await s.request(.POST, "/v1/completions", json: ["model": "broken", "prompt": "x"]), "does not exist")
        expect(404, try await s.request(.POST, "/v1/unload_lora_adapter", json: ["lora_name": "never-loaded"], token: Self.adminToken), "unknown adapter")
        let health = try await s.request(.GET, "/health")
        XCTAssertEqual(health.status, 200)
    }

    func testLoadUnloadAndAdapterctl() async throws {
        let root = try adapterRoot()
        let s = try LiveServer(adapters: root.path, extra: ["--admin-token", Self.adminToken])
        defer { s.stop() }
        // Pack one adapter into the root under a new name and load it live.
        let packed = root.appendingPathComponent("qv-packed.lora").path
        _ = try PackedAdapter.pack(peftDirectory: root.appendingPathComponent("sql-ish-qv").path, to: packed)
        let ctl = LiveServer.binary().deletingLastPathComponent().appendingPathComponent("adapterctl")
        func adapterctl(_ args: [String]) throws -> (Int32, String) {
            var env = ProcessInfo.processInfo.environment
            env["LORAMUX_SERVER"] = s.base
            env["LORAMUX_ADMIN_TOKEN"] = Self.adminToken
            return try LiveServer.run(ctl, args, environment: env)
        }
        var r = try adapterctl(["load", "live-qv", packed])
        XCTAssertEqual(r.0, 0, r.1)
        let done = try await s.request(.POST, "/v1/completions", json: ["model": "live-qv", "prompt": "Hi", "max_tokens": 3])
        XCTAssertEqual(done.status, 200, done.errorMessage)
        r = try adapterctl(["list"])
        XCTAssertEqual(r.0, 0, r.1)
        XCTAssertTrue(r.1.contains("live-qv"))
        XCTAssertTrue(r.1.contains("\"resident\" : true"))
        // Unload while a stream is in flight: it finishes; new requests get 404.
        async let inflight = s.stream("/v1/completions", json: ["model": "live-qv", "prompt": "Tell me a story", "max_tokens": 60,
                                                               "ignore_eos": true, "stream": true])
        try await Task.sleep(nanoseconds: 200_000_000)
        r = try adapterctl(["unload", "live-qv"])
        XCTAssertEqual(r.0, 0, r.1)
        let after = try await s.request(.POST, "/v1/completions", json: ["model": "live-qv", "prompt": "Hi", "max_tokens": 3])
        XCTAssertEqual(after.status, 404)
        let finished = try await inflight
        XCTAssertTrue(finished.done)
        XCTAssertEqual((finished.events.last?["choices"] as? [[String: Any]])?.first?["finish_reason"] as? String, "length")
        r = try adapterctl(["unload", "live-qv"])
        XCTAssertNotEqual(r.0, 0)
        XCTAssertTrue(r.1.contains("404"), r.1)
        r = try adapterctl(["--help"])
        XCTAssertEqual(r.0, 0)
    }

    func testClientDisconnectCancelsAndQueueFullGets429() async throws {
        let root = try adapterRoot()
        let s = try LiveServer(adapters: root.path, extra: ["--max-batch", "1", "--max-queued", "1"])
        defer { s.stop() }
        // Read three events of a long stream and hang up.
        let partial = try await s.stream("/v1/completions", json: ["model": "all-r4", "prompt": "Once", "max_tokens": 400,
                                                                   "ignore_eos": true, "stream": true], limit: 3)
        XCTAssertEqual(partial.events.count, 3)
        var blocks = try await s.metric("loramux_kv_blocks_used")
        for _ in 0..<100 where blocks != 0 {
            try await Task.sleep(nanoseconds: 50_000_000)
            blocks = try await s.metric("loramux_kv_blocks_used")
        }
        XCTAssertEqual(blocks, 0, "the abandoned sequence released its KV blocks")
        let closed = try await s.metric("loramux_requests_total", labels: ["route": "completions", "status": "499"])
        XCTAssertEqual(closed, 1, "the hung-up stream is counted as closed by the client, not as a 200")
        // One running, one queued: the rest are refused with 429 and Retry-After.
        let statuses = try await withThrowingTaskGroup(of: (Int, String?).self) { g in
            for _ in 0..<6 {
                g.addTask {
                    let r = try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": "Count", "max_tokens": 40, "ignore_eos": true])
                    return (r.status, r.headers.first(name: "Retry-After"))
                }
            }
            var out: [(Int, String?)] = []
            for try await x in g { out.append(x) }
            return out
        }
        XCTAssertTrue(statuses.contains { $0.0 == 200 })
        XCTAssertTrue(statuses.contains { $0.0 == 429 && $0.1 == "1" }, "\(statuses)")
        XCTAssertTrue(statuses.allSatisfy { $0.0 == 200 || $0.0 == 429 })
    }

    func testAPIKeyGuardsCompletionRoutes() async throws {
        let root = try adapterRoot()
        let s = try LiveServer(adapters: root.path, extra: ["--api-key", "k-123"])
        defer { s.stop() }
        let body: [String: Any] = ["model": "all-r4", "prompt": "Hi", "max_tokens": 2]
        let noKey = try await s.request(.POST, "/v1/completions", json: body)
        XCTAssertEqual(noKey.status, 401)
        let wrong = try await s.request(.POST, "/v1/completions", json: body, token: "nope")
        XCTAssertEqual(wrong.status, 401)
        let ok = try await s.request(.POST, "/v1/completions", json: body, token: "k-123")
        XCTAssertEqual(ok.status, 200, ok.errorMessage)
        let models = try await s.request(.GET, "/v1/models")
        XCTAssertEqual(models.status, 401)
        let health = try await s.request(.GET, "/health")
        XCTAssertEqual(health.status, 200, "health stays open")
    }

    func testGracefulShutdownFinishesInFlightWork() async throws {
        let root = try adapterRoot()
        let s = try LiveServer(adapters: root.path)
        async let inflight = s.stream("/v1/completions", json: ["model": "sql-ish-qv", "prompt": "Once", "max_tokens": 30,
                                                               "ignore_eos": true, "stream": true])
        try await Task.sleep(nanoseconds: 300_000_000)
        kill(s.process.processIdentifier, SIGTERM)
        try await Task.sleep(nanoseconds: 100_000_000)
        // New work during the drain is refused: 503 if the request reaches the
        // server, or a refused connection once the listener has closed.
        do {
            let late = try await s.request(.POST, "/v1/completions", json: ["model": "all-r4", "prompt": "Hi", "max_tokens": 2], timeout: 10)
            XCTAssertEqual(late.status, 503, late.errorMessage)
        } catch {}
        let r = try await inflight
        XCTAssertTrue(r.done, "the stream in flight completes")
        XCTAssertEqual(r.events.count, 30)
        XCTAssertEqual(s.stop(), 0)
    }
}

enum Fixtures {
    static func golden() throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: LiveServer.fixtures.appendingPathComponent("smollm2/golden.json"))) as? [String: Any])
    }
}
