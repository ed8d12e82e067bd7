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
        for d in DType.allCases {  // the kernels' block table knows every type we accept
            XCTAssertGreaterThan(d.blockSize, 0, d.name)
            XCTAssertGreaterThan(d.blockBytes, 0, d.name)
        }
        XCTAssertEqual(Set(checked), ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs", "f16", "bf16"])
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

    /// A whole-file read checksummed piece by piece gives the CRC of the whole.
    func testReadingWholeChecksumsTheFile() throws {
        var x: UInt64 = 9
        let bytes = Data((0..<(3 * 256 * 1024 + 12_345)).map { _ in x = x &* 6364136223846793005 &+ 1; return UInt8(x >> 56) })
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-crc-\(UUID().uuidString)")
        try bytes.write(to: url)
        defer { try? FileManager.default.removeItem(at: url) }
        let f = try MappedFile(readingWhole: url.path, checksum: true)
        XCTAssertEqual(f.crc32c, bytes.withUnsafeBytes { lm_crc32c_ref(0, $0.baseAddress, $0.count) })
        XCTAssertNil(try MappedFile(readingWhole: url.path).crc32c)
        XCTAssertEqual(f.identity, FileIdentity(path: url.path))
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
            b[at + 4 + 8 * nDims] = 17  // IQ2_XS
        }
        assertWeightError(path, contains: "'blk.0.attn_q.weight' has unsupported dtype IQ2_XS")
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

/// Resident memory after loading: the weights must be file-backed pages of the
/// mapping, never an anonymous heap copy. Checked with RssAnon/RssFile from
/// /proc/self/status around load + one forward pass.
final class MappingTests: XCTestCase {
    /// Writes an ~84 MB f32 Llama in safetensors form (values from a repeated random chunk).
    func writeF32Model(to dir: URL) throws -> Int {
        let H = 512, I = 1536, L = 4, heads = 8, kvHeads = 4, V = 16384, hd = H / heads
        let config: [String: Any] = ["model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
                                     "num_attention_heads": heads, "num_key_value_heads": kvHeads, "vocab_size": V,
                                     "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
                                     "max_position_embeddings": 512, "hidden_act": "silu"]
        try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("config.json"))
        var tensors: [(String, [Int])] = [("model.embed_tokens.weight", [V, H]), ("model.norm.weight", [H])]
        for l in 0..<L {
            let p = "model.layers.\(l)."
            tensors += [(p + "input_layernorm.weight", [H]), (p + "post_attention_layernorm.weight", [H]),
                        (p + "self_attn.q_proj.weight", [H, H]), (p + "self_attn.k_proj.weight", [kvHeads * hd, H]),
                        (p + "self_attn.v_proj.weight", [kvHeads * hd, H]), (p + "self_attn.o_proj.weight", [H, H]),
                        (p + "mlp.gate_proj.weight", [I, H]), (p + "mlp.up_proj.weight", [I, H]), (p + "mlp.down_proj.weight", [H, I])]
        }
        var header: [String: Any] = [:]
        var offset = 0
        for (name, shape) in tensors {
            let bytes = shape.reduce(1, *) * 4
            header[name] = ["dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]]
            offset += bytes
        }
        var hdr = try JSONSerialization.data(withJSONObject: header)
        while hdr.count % 8 != 0 { hdr.append(0x20) }
        let url = dir.appendingPathComponent("model.safetensors")
        XCTAssertTrue(FileManager.default.createFile(atPath: url.path, contents: nil))
        let fh = try FileHandle(forWritingTo: url)
        defer { try? fh.close() }
        var len = UInt64(hdr.count).littleEndian
        fh.write(Data(bytes: &len, count: 8))
        fh.write(hdr)
        var seed: UInt32 = 1
        let chunk: [Float] = (0..<(1 << 18)).map { _ in
            seed = seed &* 1_664_525 &+ 1_013_904_223
            return (Float(seed >> 8) / Float(1 << 24) - 0.5) * 0.1
        }
        let chunkData = chunk.withUnsafeBytes { Data($0) }
        var left = offset
        while left > 0 {
            let n = min(left, chunkData.count)
            fh.write(chunkData.prefix(n))
            left -= n
        }
        return offset
    }

    func testF32SafetensorsAreNotCopied() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-f32-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let bytes = try writeF32Model(to: dir)
        XCTAssertGreaterThan(bytes, 80 << 20)
        let before = try ProcStatus.read()
        let model = try LlamaModel(path: dir.path)
        let cache = try KVCache(config: model.config, numBlocks: 2, blockSize: 16)
        var t: [Int32] = []
        XCTAssertTrue(cache.reserve(&t, tokens: 8))
        for rows in [8, 1] {  // the tiled (sgemm) path and the few-rows path
            let batch = (0..<rows).map { BatchRow(token: Int32($0 * 7), position: Int32($0), sequence: 0, wantsLogits: $0 == rows - 1) }
            let logits = try model.forward(ForwardBatch(rows: batch, tables: [t]), cache: cache)
            XCTAssertTrue(logits.allSatisfy(\.isFinite))
        }
        let after = try ProcStatus.read()
        XCTAssertLessThan(after.rssAnon - before.rssAnon, 24 << 20, "anonymous RSS grew by \((after.rssAnon - before.rssAnon) >> 20) MiB")
        withExtendedLifetime((model, cache)) {}
    }
}
