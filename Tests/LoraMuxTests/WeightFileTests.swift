import XCTest
import CKernels
@testable import LoraMux

/// Readers against gguf-py's dequantizer and against broken files.
final class WeightFileTests: XCTestCase {
    func testDequantizersMatchGGUFPyBitForBit() throws {
        let types = try XCTUnwrap(Fixtures.json("tiny/quant_blocks.json")["types"] as? [String: [String: Any]])
        var checked: [String] = []
        for (name, entry) in types.sorted(by: { $0.key < $1.key }) {
            guard let id = (entry["ggml_type"] as? NSNumber)?.uint32Value, let dtype = DType(rawValue: id) else { continue }
            let hex = try XCTUnwrap(entry["raw_hex"] as? String)
            let bytes = stride(from: 0, to: hex.count, by: 2).map { i -> UInt8 in
                let s = hex.index(hex.startIndex, offsetBy: i)
                return UInt8(hex[s..<hex.index(s, offsetBy: 2)], radix: 16)!
            }
            let want = try XCTUnwrap(entry["dequant"] as? [Any]).floats
            let n = try XCTUnwrap((entry["n_elements"] as? NSNumber)?.intValue)
            XCTAssertEqual(bytes.count, dtype.byteCount(elements: n))
            for level in 0...lm_cpu_detect() {
                lm_cpu_set_level(level)
                var got = [Float](repeating: .nan, count: n)
                lm_dequant_row(Int32(id), bytes, &got, Int64(n))
                XCTAssertEqual(got, want, "\(name) at level \(level)")
            }
            checked.append(name)
        }
        lm_cpu_set_level(lm_cpu_detect())
        XCTAssertEqual(Set(checked), ["q4_0", "q4_1", "q8_0", "q4_K", "q6_K", "f16", "bf16"])
    }

    // MARK: malformed files

    func tempCopy(_ rel: String, mutate: (inout [UInt8]) -> Void) throws -> String {
        var bytes = [UInt8](try Data(contentsOf: Fixtures.url(rel)))
        mutate(&bytes)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent((rel as NSString).lastPathComponent)
        try Data(bytes).write(to: url)
        return url.path
    }

    func assertWeightError(_ path: String, contains needle: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try LlamaWeights.load(path: path), file: file, line: line) { e in
            let msg = (e as? LocalizedError)?.errorDescription ?? "\(e)"
            XCTAssertTrue(msg.contains(path) || msg.contains((path as NSString).deletingLastPathComponent), "message names the file: \(msg)", file: file, line: line)
            XCTAssertTrue(msg.contains(needle), "'\(msg)' should mention '\(needle)'", file: file, line: line)
        }
    }

    /// Offset of a tensor-info record's name in the GGUF header.
    func find(_ bytes: [UInt8], _ s: String) -> Int? {
        let n = Array(s.utf8)
        return (0...(bytes.count - n.count)).first { bytes[$0..<($0 + n.count)].elementsEqual(n) }
    }

    func testBadMagic() throws {
        assertWeightError(try tempCopy("tiny/tiny-f32.gguf") { $0[0] = 0x58 }, contains: "magic")
    }

    func testTruncatedFileNamesTheTensor() throws {
        let path = try tempCopy("tiny/tiny-q4_1.gguf") { $0.removeLast(3000) }
        assertWeightError(path, contains: "outside the file")
        assertWeightError(try tempCopy("tiny/tiny-q4_1.gguf") { $0.removeLast($0.count - 700) }, contains: "outside the file")
    }

    func testUnknownDTypeNamesTheTensor() throws {
        let path = try tempCopy("tiny/tiny-f32.gguf") { b in
            // name, n_dims (u32), dims (u64 each), type (u32)
            let name = "blk.0.attn_q.weight"
            let at = find(b, name)! + name.utf8.count
            let nDims = Int(b[at])
            b[at + 4 + 8 * nDims] = 10  // Q2_K
        }
        assertWeightError(path, contains: "'blk.0.attn_q.weight' has unsupported dtype Q2_K")
    }

    func testOffsetOutsideTheFile() throws {
        let path = try tempCopy("tiny/tiny-f32.gguf") { b in
            let name = "output.weight"
            let at = find(b, name)! + name.utf8.count
            let nDims = Int(b[at])
            b[at + 4 + 8 * nDims + 4 + 6] = 0x10  // huge offset
        }
        assertWeightError(path, contains: "output.weight")
    }

    func testWrongShapeAndMissingTensor() throws {
        let path = try tempCopy("tiny/tiny-f32.gguf") { b in
            let name = "blk.1.ffn_up.weight"
            let at = find(b, name)! + name.utf8.count
            b[at + 4] = 32  // first dim 64 -> 32
        }
        assertWeightError(path, contains: "blk.1.ffn_up.weight")
        let missing = try tempCopy("tiny/tiny-f32.gguf") { b in
            let at = find(b, "blk.1.ffn_down.weight")!
            b[at] = UInt8(ascii: "x")
        }
        assertWeightError(missing, contains: "missing tensor 'blk.1.ffn_down.weight'")
    }

    func testCorruptSafetensors() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-st-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.copyItem(at: Fixtures.url("tiny/hf/config.json"), to: dir.appendingPathComponent("config.json"))
        var bytes = [UInt8](try Data(contentsOf: Fixtures.url("tiny/hf/model.safetensors")))
        bytes.removeLast(1000)
        let st = dir.appendingPathComponent("model.safetensors")
        try Data(bytes).write(to: st)
        assertWeightError(dir.path, contains: "outside the file")
        bytes[8] = UInt8(ascii: "x")  // header no longer JSON
        try Data(bytes).write(to: st)
        assertWeightError(dir.path, contains: "JSON")
        try Data([1, 2, 3]).write(to: st)
        assertWeightError(dir.path, contains: "header length")
    }

    func testNotAFileAndEmptyFile() throws {
        XCTAssertThrowsError(try LlamaWeights.load(path: "/nonexistent/model.gguf"))
        let empty = try tempCopy("tiny/tiny-f32.gguf") { $0.removeAll() }
        assertWeightError(empty, contains: "empty")
    }
}
