import Foundation
import LoraMux
import LoraMuxFuzz
import XCTest

/// Replays the committed fuzz corpus (Tests/Fuzz/TARGET/) and every crash
/// reproducer (Tests/Fuzz/regressions/TARGET/) through the fuzz targets: a
/// parser that traps on one of them fails the run.
final class FuzzCorpusTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fuzz")

    func inputs(_ dir: URL) -> [URL] {
        ((try? FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)) ?? [])
            .filter { !$0.hasDirectoryPath }.sorted { $0.path < $1.path }
    }

    func testCorpusAndRegressionsRunClean() throws {
        for t in FuzzTarget.allCases {
            let corpus = inputs(Self.root.appendingPathComponent(t.rawValue))
            XCTAssertFalse(corpus.isEmpty, "no committed corpus for \(t.rawValue)")
            let regressions = inputs(Self.root.appendingPathComponent("regressions/\(t.rawValue)"))
            t.prepare()
            for f in corpus + regressions { t.run(try Data(contentsOf: f)) }
        }
    }

    /// The reproducers fail cleanly with the error a user would see.
    func testRegressionInputsAreRefusedWithAClearError() throws {
        let lora = Self.root.appendingPathComponent("regressions/lora/header-length-over-int-max")
        let file = try MappedFile(copying: Data(contentsOf: lora), name: "x.lora")
        XCTAssertThrowsError(try PackedAdapter.inspect(file: file)) { e in
            XCTAssertTrue("\(e)".contains("header length"), "\(e)")
        }
        // A layer index past Int.max once trapped in Int(Double).
        let cfg = try OrderedJSON.parse(Data(#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "layers_to_transform": [3777777777777777777]}"#.utf8))
        XCTAssertThrowsError(try LoraConfig(json: cfg, path: "a/adapter_config.json")) { e in
            XCTAssertTrue("\(e)".contains("layers_to_transform"), "\(e)")
        }
        // max_tokens near Int.max once overflowed prompt + max_tokens (a trap).
        var huge = SamplingParams()
        huge.maxTokens = Int.max
        XCTAssertThrowsError(try huge.validate())
        let tok = try BPETokenizer(gguf: GGUFFile(path: FuzzTarget.fixtures.appendingPathComponent("tokenizer/llama3-tiny/tokenizer.gguf").path))
        let body = Data(#"{"model":"","prompt":[1,2],"max_tokens":9223372036854775807}"#.utf8)
        XCTAssertThrowsError(try OpenAIRequest.completion(body, tokenizer: tok, contextTokens: 2048)) { e in
            XCTAssertTrue("\(e)".contains("max_tokens"), "\(e)")
        }
        let ok = try OpenAIRequest.completion(Data(#"{"model":"a","prompt":[1,2],"max_tokens":5,"stream":true}"#.utf8),
                                              tokenizer: tok, contextTokens: 2048)
        XCTAssertEqual(ok.promptIds, [1, 2])
        XCTAssertEqual(ok.params.maxTokens, 5)
        XCTAssertTrue(ok.stream)
        XCTAssertThrowsError(try OpenAIRequest.completion(Data(#"{"model":"a","prompt":[1,2],"max_tokens":2047}"#.utf8),
                                                          tokenizer: tok, contextTokens: 2048))
    }

    func testJSONSurrogates() throws {
        func str(_ json: String) throws -> String? {
            if case let .string(s) = try OrderedJSON.parse(Data(json.utf8)) { return s }
            return nil
        }
        XCTAssertEqual(try str(#""\ud83d\ude00""#), "\u{1F600}")
        // A high surrogate not followed by a low one: U+FFFD, and the next escape stands on its own.
        XCTAssertEqual(try str(#""\ud998\u0041""#), "\u{FFFD}A")
        XCTAssertEqual(try str(#""\ud998\ud998\ude00""#), "\u{FFFD}\u{76200}")
        XCTAssertEqual(try str(#""\udc00""#), "\u{FFFD}")
        XCTAssertThrowsError(try OrderedJSON.parse(Data(#""\u+123""#.utf8)))
        XCTAssertThrowsError(try OrderedJSON.parse(Data(#""\u12""#.utf8)))
    }
}
