import Foundation
import XCTest

/// The official `openai` Python package against the live server; greedy
/// adapter answers must equal `loramux generate --adapter` for the same request.
final class OpenAIClientTests: XCTestCase {
    func run(_ exe: String, _ args: [String]) throws -> (Int32, String) {
        try LiveServer.run(URL(fileURLWithPath: exe), args)
    }

    func testOpenAIPythonClient() throws {
        let python = "/usr/bin/env"
        let (ok, msg) = try run(python, ["python3", "-c", "import openai"])
        XCTAssertEqual(ok, 0, "the openai package is missing (ops/test installs it with pip): \(msg)")
        guard ok == 0 else { return }
        let model = try LiveServer.modelPath()
        let adapterDir = LiveServer.fixtures.appendingPathComponent("smollm2/adapters")
        let prompt = "Name three colors."
        func generate(_ extra: [String]) throws -> String {
            let (st, out) = try run(LiveServer.binary().path, ["generate", "--model", model, "--chat", "--prompt", prompt,
                                                               "--max-tokens", "24", "--json"] + extra)
            XCTAssertEqual(st, 0, out)
            let line = out.split(separator: "\n").first { $0.hasPrefix("{") }.map(String.init) ?? "{}"
            return (try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["text"] as? String ?? ""
        }
        let expected: [String: Any] = ["prompt": prompt, "max_tokens": 24,
                                       "adapter_text": try generate(["--adapter", adapterDir.appendingPathComponent("sql-ish-qv").path]),
                                       "base_text": try generate([])]
        XCTAssertNotEqual(expected["adapter_text"] as? String, expected["base_text"] as? String, "the adapter changes the answer")
        let expPath = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-expected-\(UUID().uuidString).json")
        try JSONSerialization.data(withJSONObject: expected).write(to: expPath)
        defer { try? FileManager.default.removeItem(at: expPath) }

        let s = try LiveServer(adapters: adapterDir.path)
        defer { s.stop() }
        let script = LiveServer.repo.appendingPathComponent("Tests/LiveTests/openai_client_check.py").path
        let (st, out) = try run(python, ["python3", script, s.base, "SmolLM2-135M-Instruct.Q4_1", "sql-ish-qv", expPath.path])
        XCTAssertEqual(st, 0, out)
        XCTAssertTrue(out.contains("openai client checks passed"), out)
    }
}
