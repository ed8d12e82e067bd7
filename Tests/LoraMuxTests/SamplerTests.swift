import XCTest
@testable import LoraMux

final class SamplerTests: XCTestCase {
    let logits: [Float] = [1.0, 3.0, 2.5, -1.0, 0.0, 2.9]

    func sample(_ p: SamplingParams, _ n: Int) -> [Int32] {
        var s = Sampler(params: p)
        return (0..<n).map { _ in logits.withUnsafeBufferPointer { s.sample($0) } }
    }

    func testGreedyPicksTheArgmax() {
        XCTAssertEqual(sample(SamplingParams(), 5), [1, 1, 1, 1, 1])
        XCTAssertEqual(sample(SamplingParams(temperature: 2, topK: 1, seed: 3), 5), [1, 1, 1, 1, 1])
    }

    func testSeedMakesSamplingReproducible() {
        let p = SamplingParams(temperature: 1.0, seed: 1234)
        XCTAssertEqual(sample(p, 50), sample(p, 50))
        XCTAssertNotEqual(sample(p, 50), sample(SamplingParams(temperature: 1.0, seed: 99), 50))
    }

    func testFrequenciesFollowTheSoftmax() {
        let n = 40_000
        let t: Float = 0.7
        let counts = sample(SamplingParams(temperature: t, seed: 7), n).reduce(into: [Int32: Int]()) { $0[$1, default: 0] += 1 }
        let e = logits.map { exp(Double($0 / t)) }, z = e.reduce(0, +)
        for (i, w) in e.enumerated() {
            let p = w / z
            let freq = Double(counts[Int32(i)] ?? 0) / Double(n)
            // 5 standard deviations of a binomial proportion
            XCTAssertEqual(freq, p, accuracy: 5 * (p * (1 - p) / Double(n)).squareRoot() + 1e-4, "token \(i)")
        }
    }

    func testTopKAndTopPRestrictTheCandidates() {
        let k2 = Set(sample(SamplingParams(temperature: 5, topK: 2, seed: 1), 2000))
        XCTAssertEqual(k2, [1, 5])
        // p(1) + p(5) at temperature 1 is 0.70 < 0.75, so top-p 0.75 keeps {1, 5, 2}.
        let p7 = Set(sample(SamplingParams(temperature: 1, topP: 0.75, seed: 2), 4000))
        XCTAssertEqual(p7, [1, 5, 2])
        XCTAssertEqual(Set(sample(SamplingParams(temperature: 1, topP: 0.01, seed: 2), 200)), [1])
        XCTAssertEqual(Sampler.topK(logits.withUnsafeBufferPointer { $0 }, 3), [1, 5, 2])
    }

    func testInvalidParametersAreRejected() {
        XCTAssertThrowsError(try SamplingParams(temperature: -1).validate())
        XCTAssertThrowsError(try SamplingParams(topP: 0).validate())
        XCTAssertThrowsError(try SamplingParams(topP: 1.5).validate())
        XCTAssertThrowsError(try SamplingParams(topK: -2).validate())
        XCTAssertThrowsError(try SamplingParams(maxTokens: 0).validate())
        XCTAssertThrowsError(try SamplingParams(stop: [""]).validate())
        XCTAssertThrowsError(try SamplingParams(temperature: .nan).validate())
    }
}

/// Generation on the real model: EOS, stop strings, and sampling end to end.
final class GeneratorTests: XCTestCase {
    func testStopsAtEndOfTurnAndAtStopStrings() throws {
        let path = try Fixtures.smolLM2Path()
        let model = try Fixtures.model(path)
        let tok = try BPETokenizer(gguf: XCTUnwrap(model.weights.gguf))
        let gen = try Generator(model: model, tokenizer: tok)
        let golden = try Fixtures.json("smollm2/golden.json")
        let first = try XCTUnwrap((golden["chat"] as? [[String: Any]])?.first)
        let prompt = try XCTUnwrap(first["prompt_ids"] as? [Any]).ints
        let want = try XCTUnwrap(first["token_ids"] as? [Any]).ints

        // "The capital of France is Paris.<|im_end|>": greedy stops before <|im_end|>.
        let r = try gen.generate(promptIds: prompt, params: SamplingParams(maxTokens: 40))
        let eot = try XCTUnwrap(want.firstIndex { tok.eotIds.contains($0) })
        XCTAssertEqual(r.tokenIds, Array(want[..<eot]))
        XCTAssertEqual(r.finishReason, .stop)
        XCTAssertEqual(r.text, tok.decode(Array(want[..<eot])))

        let s = try gen.generate(promptIds: prompt, params: SamplingParams(maxTokens: 40, stop: [" of"]))
        XCTAssertEqual(s.text, "The capital")
        XCTAssertEqual(s.finishReason, .stop)

        let l = try gen.generate(promptIds: prompt, params: SamplingParams(maxTokens: 3))
        XCTAssertEqual(l.tokenIds, Array(want[..<3]))
        XCTAssertEqual(l.finishReason, .length)

        let a = try gen.generate(promptIds: prompt, params: SamplingParams(temperature: 0.8, topP: 0.95, seed: 5, maxTokens: 12, ignoreEOS: true))
        let b = try gen.generate(promptIds: prompt, params: SamplingParams(temperature: 0.8, topP: 0.95, seed: 5, maxTokens: 12, ignoreEOS: true))
        XCTAssertEqual(a.tokenIds, b.tokenIds, "same seed, same tokens")
        XCTAssertEqual(a.tokenIds.count, 12)
        XCTAssertEqual(gen.cache.usedBlocks, 0, "blocks returned after every request")
    }
}
