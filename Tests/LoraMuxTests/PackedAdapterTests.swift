import XCTest
@testable import LoraMux

final class PackedAdapterTests: XCTestCase {
    var tmp: URL!

    override func setUpWithError() throws {
        tmp = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-pack-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: tmp) }

    func pack(_ name: String, dtype: AdapterDType = .f16) throws -> (String, PackedAdapter.Info) {
        let out = tmp.appendingPathComponent("\(name).lora").path
        let info = try PackedAdapter.pack(peftDirectory: Fixtures.url("tiny/adapters/\(name)").path, to: out, dtype: dtype)
        return (out, info)
    }

    func lastLogits(_ model: LlamaModel, _ ids: [Int32], _ a: LoraAdapter) throws -> [Float] {
        try prefillLogits(model, ids, adapter: a)
    }

    /// f16 packing vs PEFT's f32 logits: A and B rounded to f16 (relative error
    /// 2^-11) move these logits by at most a few 1e-3; 2e-2 is the stated bound.
    /// f32 packing is exact: 1e-4, like the PEFT directory itself.
    func testPackedFilesMatchPEFTOnBothBases() throws {
        let ref = try Fixtures.json("tiny/adapters/reference.json")
        let prompts = try XCTUnwrap(ref["prompts"] as? [[Any]]).map(\.ints)
        for name in ["qv", "all7", "rslora", "patterns", "regex", "dora", "embed", "mts"] {
            let want = try XCTUnwrap(((ref["adapters"] as? [String: Any])?[name] as? [String: Any])?["logits"] as? [[[Any]]])
            for (dtype, tol) in [(AdapterDType.f16, Float(2e-2)), (.f32, 1e-4)] {
                let (path, info) = try pack(name, dtype: dtype)
                XCTAssertEqual(info.dtype, dtype)
                for base in ["tiny/hf", "tiny/tiny-f32.gguf"] {
                    let model = try Fixtures.model(Fixtures.url(base).path)
                    let a = try AdapterLoader.load(path: path, name: name, base: model.weights)
                    for (p, ids) in prompts.enumerated() {
                        let got = try lastLogits(model, ids, a)
                        XCTAssertLessThan(maxAbsDiff(got, want[p].flatMap(\.floats)), tol, "\(name) \(dtype) on \(base) prompt \(p)")
                    }
                }
            }
        }
    }

    /// bf16 files (on request) load as f32; bf16 keeps 8 bits of mantissa, so
    /// the bound is looser than f16's: 5e-2 on these logits.
    func testBF16PackingLoadsAsF32() throws {
        let ref = try Fixtures.json("tiny/adapters/reference.json")
        let prompts = try XCTUnwrap(ref["prompts"] as? [[Any]]).map(\.ints)
        for name in ["all7", "dora", "mts"] {
            let out = tmp.appendingPathComponent("\(name)-bf16.lora").path
            let info = try PackedAdapter.pack(peftDirectory: Fixtures.url("tiny/adapters/\(name)").path, to: out, bf16: true)
            let f16 = try pack(name).1
            XCTAssertLessThan(abs(info.fileBytes - f16.fileBytes), f16.fileBytes / 10, "same size class as f16")
            let want = try XCTUnwrap(((ref["adapters"] as? [String: Any])?[name] as? [String: Any])?["logits"] as? [[[Any]]])
            for base in ["tiny/hf", "tiny/tiny-f32.gguf"] {
                let model = try Fixtures.model(Fixtures.url(base).path)
                let a = try AdapterLoader.load(path: out, name: name, base: model.weights)
                XCTAssertEqual(a.modules.lazy.compactMap { $0.compactMap { $0 }.first }.first?.dtype, .f32)
                let got = try lastLogits(model, prompts[2], a)
                XCTAssertLessThan(maxAbsDiff(got, want[2].flatMap(\.floats)), 5e-2, "\(name) bf16 on \(base)")
            }
        }
    }

    func testPackedIsSmallerThanPEFT() throws {
        for name in ["all7", "rslora"] {
            let (path, info) = try pack(name)
            let peftBytes = try XCTUnwrap(FileManager.default.attributesOfItem(atPath: Fixtures.url("tiny/adapters/\(name)/adapter_model.safetensors").path)[.size] as? Int)
            let packed = try XCTUnwrap(FileManager.default.attributesOfItem(atPath: path)[.size] as? Int)
            XCTAssertEqual(packed, info.fileBytes)
            // f16 halves the data; on these tiny files the JSON header is a visible share.
            XCTAssertLessThan(Double(packed), 0.7 * Double(peftBytes), "\(name): \(packed) vs \(peftBytes) bytes")
            let i = try PackedAdapter.inspect(path: path)
            XCTAssertEqual(i.modules, info.modules)
            XCTAssertEqual(i.config, info.config)
        }
    }

    func corrupt(_ name: String, _ edit: (inout [UInt8]) -> Void) throws -> String {
        let (path, _) = try pack(name)
        var b = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        edit(&b)
        let out = tmp.appendingPathComponent("bad-\(UUID().uuidString).lora").path
        try Data(b).write(to: URL(fileURLWithPath: out))
        return out
    }

    func expectError(_ path: String, _ needle: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        XCTAssertThrowsError(try AdapterLoader.load(path: path, name: "x", base: model.weights), file: file, line: line) { e in
            let msg = (e as? LocalizedError)?.errorDescription ?? "\(e)"
            XCTAssertTrue(msg.contains(needle), "'\(msg)' should mention '\(needle)'", file: file, line: line)
        }
    }

    /// The prefix cache's salt: equal for two loads of one unchanged file,
    /// different for another file, the same file after a write, the PEFT
    /// directory it came from, and for adapters built in memory.
    func testPrefixSaltFollowsTheFilesContent() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let (qv, _) = try pack("qv")
        let (all7, _) = try pack("all7")
        func salt(_ path: String) throws -> UInt64 { try AdapterLoader.load(path: path, name: "x", base: model.weights).prefixSalt }
        let s = try salt(qv)
        XCTAssertEqual(try salt(qv), s)
        XCTAssertNotEqual(try salt(all7), s)
        let dir = Fixtures.url("tiny/adapters/qv").path
        XCTAssertNotEqual(try salt(dir), s, "PEFT directory and its packed file are converted differently")
        XCTAssertEqual(try salt(dir), try salt(dir))
        let bytes = try Data(contentsOf: URL(fileURLWithPath: qv))
        usleep(20_000)  // past the file system's timestamp tick (jiffies: at most 10 ms)
        try bytes.write(to: URL(fileURLWithPath: qv))  // in place: the same inode
        XCTAssertNotEqual(try salt(qv), s, "rewritten, even with the same bytes")
        let synthetic = try SyntheticAdapter.make(name: "s", base: model.weights, rank: 4, targets: .qv, seed: 1)
        XCTAssertEqual(synthetic.prefixSalt, synthetic.instanceId)
        let twin = try SyntheticAdapter.make(name: "s", base: model.weights, rank: 4, targets: .qv, seed: 1)
        XCTAssertNotEqual(twin.prefixSalt, synthetic.prefixSalt)
    }

    func testCorruptFilesAreRefused() throws {
        try expectError(try corrupt("all7") { $0[0] = 0 }, "bad magic")
        try expectError(try corrupt("all7") { $0.removeLast(50) }, "outside the file")
        try expectError(try corrupt("all7") { $0.removeLast($0.count - 20) }, "does not fit")
        try expectError(try corrupt("all7") { $0[20] = UInt8(ascii: "#") }, "header")
        try expectError(try corrupt("all7") { $0[$0.count - 1] ^= 0x55 }, "corrupt file")
        try expectError(try corrupt("all7") { b in b[b.count - 300] ^= 0x01 }, "corrupt file")
        try expectError(tmp.appendingPathComponent("missing.lora").path, "no such file")
    }

    func testWrongBaseIsRefusedWithHint() throws {
        let out = tmp.appendingPathComponent("wrong.lora").path
        _ = try PackedAdapter.pack(peftDirectory: Fixtures.url("tiny/adapters-bad/wrong_base").path, to: out)
        try expectError(out, "other/tiny-48")
        try expectError(out, "hidden size 48, the base has 64")
    }
}
