import Foundation
import LoraMux
import XCTest

/// Logprobs, echo, penalties and logit_bias over HTTP on the real model,
/// against transformers' log-softmax (Tests/Fixtures/smollm2/logprobs.json).
final class LogprobServerTests: XCTestCase {
    /// Against transformers' f32 forward over 30 layers; this test prints the
    /// largest difference (1.9e-5 when written, AVX-512).
    let tolerance = 1e-4
    let base = "SmolLM2-135M-Instruct.Q4_1"

    func reference() throws -> [String: Any] {
        let d = try Data(contentsOf: LiveServer.fixtures.appendingPathComponent("smollm2/logprobs.json"))
        let cases = try XCTUnwrap((try JSONSerialization.jsonObject(with: d) as? [String: Any])?["cases"] as? [[String: Any]])
        return try XCTUnwrap(cases.first)
    }

    /// A server with no adapters (these tests use the base model).
    func server() throws -> LiveServer {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-empty-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: root) }
        return try LiveServer(adapters: root.path)
    }

    func choice(_ r: LiveServer.Reply) throws -> [String: Any] {
        XCTAssertEqual(r.status, 200, r.errorMessage)
        return try XCTUnwrap((r.json?["choices"] as? [[String: Any]])?.first)
    }

    func testCompletionLogprobsWithEchoMatchTransformers() async throws {
        let ref = try reference()
        let promptIds = try XCTUnwrap(ref["prompt_ids"] as? [Any]).int32s
        let want = try XCTUnwrap(ref["token_ids"] as? [Any]).int32s.prefix(8)
        let next = try XCTUnwrap(ref["next_logprob"] as? [Double])
        let top5 = try XCTUnwrap(ref["top5_logprobs"] as? [[Double]])
        let top5Ids = try XCTUnwrap(ref["top5_ids"] as? [[Int]])
        let promptText = try XCTUnwrap(ref["prompt_text"] as? String)
        let s = try server()
        defer { s.stop() }
        let body: [String: Any] = ["model": base, "prompt": promptText, "max_tokens": 8, "temperature": 0,
                                   "logprobs": 5, "echo": true, "return_token_ids": true]
        let c = try choice(try await s.request(.POST, "/v1/completions", json: body))
        XCTAssertEqual((c["token_ids"] as? [Any])?.int32s, Array(want))
        let text = try XCTUnwrap(c["text"] as? String)
        XCTAssertTrue(text.hasPrefix(promptText), "echo puts the prompt first: \(text)")
        let lp = try XCTUnwrap(c["logprobs"] as? [String: Any])
        let tokens = try XCTUnwrap(lp["tokens"] as? [String])
        let values = try XCTUnwrap(lp["token_logprobs"] as? [Any])
        let tops = try XCTUnwrap(lp["top_logprobs"] as? [Any])
        let offsets = try XCTUnwrap(lp["text_offset"] as? [Int])
        let n = promptIds.count + want.count
        XCTAssertEqual([tokens.count, values.count, tops.count, offsets.count], [n, n, n, n])
        XCTAssertTrue(values[0] is NSNull, "the first prompt token has no logprob")
        XCTAssertTrue(tops[0] is NSNull)
        XCTAssertEqual(tokens.joined(), text, "the tokens spell the text (ASCII here)")
        var pos = 0
        for (i, t) in tokens.enumerated() { XCTAssertEqual(offsets[i], pos, "text_offset \(i)"); pos += t.unicodeScalars.count }
        var worst = 0.0
        for i in 1..<n {
            let v = try XCTUnwrap((values[i] as? NSNumber)?.doubleValue, "token \(i)")
            worst = max(worst, abs(v - next[i - 1]))
            // Alternatives by their texts: the reference's top 5 ids, as text.
            let top = try XCTUnwrap(tops[i] as? [String: Double], "top_logprobs \(i)")
            let got = top.values.sorted(by: >)
            XCTAssertEqual(got.count, 5, "top \(i): \(top)")
            for (g, w) in zip(got, top5[i - 1]) { worst = max(worst, abs(g - w)) }
            if i >= promptIds.count {  // a generated token, greedy: it is the most likely one
                XCTAssertEqual(v, got[0], accuracy: 1e-6, "greedy token \(i) is its position's top logprob")
                XCTAssertEqual(Int(want[i - promptIds.count]), top5Ids[i - 1][0])
            }
        }
        print("largest |logprob - transformers| over prompt, tokens and top 5: \(worst)")
        XCTAssertLessThanOrEqual(worst, tolerance)

        // Streamed: the prompt as its own first chunk, then a chunk per token; same numbers.
        var sbody = body
        sbody["stream"] = true
        let st = try await s.stream("/v1/completions", json: sbody)
        XCTAssertTrue(st.done)
        let chunks = st.events.compactMap { ($0["choices"] as? [[String: Any]])?.first }
        XCTAssertEqual(chunks.first?["text"] as? String, promptText)
        XCTAssertEqual(((chunks.first?["logprobs"] as? [String: Any])?["tokens"] as? [String])?.count, promptIds.count)
        let streamed = chunks.flatMap { (($0["logprobs"] as? [String: Any])?["token_logprobs"] as? [Any]) ?? [] }
        XCTAssertEqual(streamed.count, n)
        for i in 1..<min(n, streamed.count) {
            XCTAssertEqual((streamed[i] as? NSNumber)?.doubleValue ?? .nan, (values[i] as! NSNumber).doubleValue, accuracy: 1e-5, "streamed \(i)")
        }
        let streamedOffsets = chunks.flatMap { (($0["logprobs"] as? [String: Any])?["text_offset"] as? [Int]) ?? [] }
        XCTAssertEqual(streamedOffsets, offsets)
        XCTAssertEqual(chunks.compactMap { $0["text"] as? String }.joined(), text)

        // Without echo: only the generated tokens; logprobs 0 gives no alternatives.
        let plain = try choice(try await s.request(.POST, "/v1/completions", json: [
            "model": base, "prompt": promptText, "max_tokens": 8, "temperature": 0, "logprobs": 0]))
        let plp = try XCTUnwrap(plain["logprobs"] as? [String: Any])
        XCTAssertEqual((plp["tokens"] as? [String])?.count, 8)
        XCTAssertEqual((plp["top_logprobs"] as? [[String: Double]])?.map(\.count), Array(repeating: 0, count: 8))
        XCTAssertEqual((plp["text_offset"] as? [Int])?.first, 0)
        let none = try choice(try await s.request(.POST, "/v1/completions", json: ["model": base, "prompt": promptText, "max_tokens": 2]))
        XCTAssertTrue(none["logprobs"] is NSNull, "no logprobs unless asked")
    }

    func testChatLogprobsAndTopLogprobs() async throws {
        let s = try server()
        defer { s.stop() }
        let body: [String: Any] = ["model": base, "messages": [["role": "user", "content": "Name a color."]], "max_tokens": 6,
                                   "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 3, "return_token_ids": true]
        let c = try choice(try await s.request(.POST, "/v1/chat/completions", json: body))
        let ids = try XCTUnwrap(c["token_ids"] as? [Any]).int32s
        let content = try XCTUnwrap((c["logprobs"] as? [String: Any])?["content"] as? [[String: Any]])
        XCTAssertEqual(content.count, 6)
        var text = ""
        for (i, e) in content.enumerated() {
            let token = try XCTUnwrap(e["token"] as? String), lp = try XCTUnwrap(e["logprob"] as? Double)
            let bytes = try XCTUnwrap(e["bytes"] as? [Int])
            XCTAssertEqual(String(decoding: bytes.map(UInt8.init), as: UTF8.self), token)
            text += token
            XCTAssertLessThanOrEqual(lp, 0)
            let top = try XCTUnwrap(e["top_logprobs"] as? [[String: Any]])
            XCTAssertEqual(top.count, 3)
            let tv = top.compactMap { $0["logprob"] as? Double }
            XCTAssertEqual(tv, tv.sorted(by: >), "entry \(i): most likely first")
            XCTAssertEqual(tv[0], lp, accuracy: 1e-6, "entry \(i): the greedy token is the top one")
            XCTAssertEqual(top[0]["token"] as? String, token)
            XCTAssertNotNil(top[0]["bytes"] as? [Int])
        }
        XCTAssertEqual(text, (c["message"] as? [String: Any])?["content"] as? String)
        XCTAssertEqual(ids.count, 6)

        var sbody = body
        sbody["stream"] = true
        let st = try await s.stream("/v1/chat/completions", json: sbody)
        let streamed = st.events.compactMap { ((($0["choices"] as? [[String: Any]])?.first?["logprobs"] as? [String: Any])?["content"] as? [[String: Any]]) }.flatMap { $0 }
        XCTAssertEqual(streamed.map { $0["token"] as? String }, content.map { $0["token"] as? String })
        for (a, b) in zip(streamed, content) {
            XCTAssertEqual(a["logprob"] as? Double ?? .nan, b["logprob"] as? Double ?? 0, accuracy: 1e-5)
        }
        let plain = try choice(try await s.request(.POST, "/v1/chat/completions", json: [
            "model": base, "messages": [["role": "user", "content": "Hi"]], "max_tokens": 2]))
        XCTAssertTrue(plain["logprobs"] is NSNull, "no logprobs unless asked")
    }

    func testPenaltiesAndLogitBiasReachTheSampler() async throws {
        let s = try server()
        defer { s.stop() }
        func ids(_ extra: [String: Any]) async throws -> [Int32] {
            var body: [String: Any] = ["model": base, "prompt": "One, two, three, four,", "max_tokens": 24, "temperature": 0,
                                       "ignore_eos": true, "return_token_ids": true]
            body.merge(extra) { $1 }
            let r = try await s.request(.POST, "/v1/completions", json: body)
            return try XCTUnwrap(try choice(r)["token_ids"] as? [Any]).int32s
        }
        let plain = try await ids([:])
        let again = try await ids([:])
        XCTAssertEqual(again, plain, "greedy is repeatable")
        // A +100 bias makes one token certain; the bias is only for this request.
        let forced = try await ids(["logit_bias": ["28": 100]])
        XCTAssertEqual(forced, Array(repeating: 28, count: 24))
        let after = try await ids([:])
        XCTAssertEqual(after, plain)
        // Counting is repetitive: each penalty changes what greedy picks.
        for p: [String: Any] in [["frequency_penalty": 2], ["presence_penalty": 2], ["repetition_penalty": 1.5]] {
            let got = try await ids(p)
            XCTAssertNotEqual(got, plain, "\(p) changed nothing")
            let twice = try await ids(p)
            XCTAssertEqual(twice, got, "\(p) is deterministic")
        }
        // The presence penalty is applied once per token that has appeared:
        // with 2 (the maximum) a 24-token greedy reply repeats fewer tokens.
        let pres = try await ids(["presence_penalty": 2])
        XCTAssertGreaterThan(Set(pres).count, Set(plain).count)
    }
}
