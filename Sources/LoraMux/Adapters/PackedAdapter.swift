import Foundation
import CKernels
import CLZ4

/// The packed adapter file (`*.lora`):
///
///     "LMXLORA1"  8 bytes magic
///     u64 LE      header length H
///     H bytes     JSON header (below)
///     data        LZ4 blocks, one per tensor, at header-given offsets
///
/// The header holds the original adapter_config.json text, the resolved plan
/// (modules, ranks, scales), a fingerprint of the base shape, and for every
/// tensor its dtype, shape, offset, compressed and raw size and CRC-32C of the
/// raw bytes. Tensors are stored in kernel layout (A, B^T) in Hugging Face row
/// order, so loading is: decompress into the arena, permute q/k for GGUF bases.
public enum PackedAdapter {
    static let magic: [UInt8] = Array("LMXLORA1".utf8)
    public static let formatVersion = 1

    struct Header: Codable {
        struct Module: Codable { var layer: Int; var proj: String; var rank: Int; var scale: Float; var dora: Bool }
        struct Embedding: Codable { var rank: Int; var scale: Float }
        struct Tensor: Codable {
            var name: String
            var dtype: AdapterDType
            var shape: [Int]
            var offset: Int
            var compressed: Int
            var raw: Int
            var crc32c: UInt32
        }
        var format: String
        var version: Int
        var adapterConfig: String
        var base: BaseShape
        var baseModel: String?
        var dtype: AdapterDType
        /// "bf16": A, B^T and replaced matrices are stored as bf16 in the file and
        /// widened to f32 (`dtype`) at load. nil: stored as `dtype`.
        var storage: String? = nil
        var modules: [Module]
        var embedding: Embedding?
        var embedOverride: Bool
        var lmHeadOverride: Bool
        var tensors: [Tensor]

        enum CodingKeys: String, CodingKey {
            case format, version, base, dtype, modules, embedding, tensors
            case adapterConfig = "adapter_config", baseModel = "base_model_name_or_path"
            case embedOverride = "embed_tokens_replaced", lmHeadOverride = "lm_head_replaced"
        }
    }

    /// Summary of a packed file (for `adapterctl inspect`).
    public struct Info: Sendable {
        public var config: LoraConfig
        public var base: BaseShape
        public var dtype: AdapterDType
        public var modules: [AdapterPlan.Module]
        public var tensorCount: Int
        public var compressedBytes: Int
        public var rawBytes: Int
        public var fileBytes: Int

        public init(config: LoraConfig, base: BaseShape, dtype: AdapterDType, modules: [AdapterPlan.Module], tensorCount: Int,
                    compressedBytes: Int, rawBytes: Int, fileBytes: Int) {
            self.config = config
            self.base = base
            self.dtype = dtype
            self.modules = modules
            self.tensorCount = tensorCount
            self.compressedBytes = compressedBytes
            self.rawBytes = rawBytes
            self.fileBytes = fileBytes
        }
    }

    // MARK: writing

    /// Packs a PEFT directory. Shapes come from the adapter itself, so no base
    /// model is needed; the file records them as its base fingerprint.
    public static func pack(peftDirectory dir: String, to out: String, dtype: AdapterDType = .f16, bf16: Bool = false) throws -> Info {
        let peft = try PEFTAdapter(directory: dir)
        let shape = try peft.inferredShape()
        // bf16 files hold f32 adapters rounded to bf16; they load as f32.
        let dtype: AdapterDType = bf16 ? .f32 : dtype
        let (plan, sources) = try peft.plan(for: shape, storage: dtype)
        let cfgText = try String(contentsOfFile: (dir as NSString).appendingPathComponent("adapter_config.json"), encoding: .utf8)
        var tensors: [Header.Tensor] = []
        var blob = Data()
        for (part, dt, shp) in plan.parts(shape) {
            guard let src = sources[part] else { throw AdapterError.malformed(path: dir, reason: "missing \(part.key)") }
            let count = shp.reduce(1, *)
            let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count * dt.size, 1), alignment: 64)
            defer { raw.deallocate() }
            try PEFTAdapter.convert(src, part: part, to: dt, count: count, dst: raw, path: dir)
            var rawBytes = count * dt.size
            if bf16 && Self.narrowed(part, dt, plan.dtype) {
                lm_f32_to_bf16_in_place(raw, Int64(count))
                rawBytes = count * 2
            }
            let bound = Int(LZ4_compressBound(Int32(rawBytes)))
            var comp = Data(count: bound)
            let n = comp.withUnsafeMutableBytes {
                LZ4_compress_default(raw.assumingMemoryBound(to: CChar.self), $0.baseAddress!.assumingMemoryBound(to: CChar.self),
                                     Int32(rawBytes), Int32(bound))
            }
            guard n > 0 else { throw AdapterError.io(path: out, reason: "LZ4 compression failed for \(part.key)") }
            tensors.append(.init(name: part.key, dtype: dt, shape: shp, offset: blob.count, compressed: Int(n), raw: rawBytes,
                                 crc32c: lm_crc32c(0, raw, rawBytes)))
            blob.append(comp.prefix(Int(n)))
        }
        let header = Header(format: "loramux-lora", version: formatVersion, adapterConfig: cfgText, base: shape,
                            baseModel: plan.config.baseModel, dtype: dtype, storage: bf16 ? "bf16" : nil,
                            modules: plan.modules.map { .init(layer: $0.layer, proj: $0.proj.name, rank: $0.rank, scale: $0.scale, dora: $0.dora) },
                            embedding: plan.embedding.map { .init(rank: $0.rank, scale: $0.scale) },
                            embedOverride: plan.embedOverride, lmHeadOverride: plan.lmHeadOverride, tensors: tensors)
        let hdr = try header.encoded()
        var file = Data(magic)
        var len = UInt64(hdr.count).littleEndian
        file.append(Data(bytes: &len, count: 8))
        file.append(hdr)
        file.append(blob)
        // Write beside the target and rename, so a crash never leaves half a file under the real name.
        let tmp = out + ".tmp-\(getpid())"
        do {
            try file.write(to: URL(fileURLWithPath: tmp))
            if FileManager.default.fileExists(atPath: out) { try FileManager.default.removeItem(atPath: out) }
            try FileManager.default.moveItem(atPath: tmp, toPath: out)
        } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw AdapterError.io(path: out, reason: error.localizedDescription)
        }
        return Info(config: plan.config, base: shape, dtype: dtype, modules: plan.modules, tensorCount: tensors.count,
                    compressedBytes: blob.count, rawBytes: tensors.reduce(0) { $0 + $1.raw }, fileBytes: file.count)
    }

    /// Parts stored narrowed in a bf16 file: those in the adapter's own dtype
    /// (A, B^T, replaced matrices); magnitudes and embedding LoRA stay f32.
    static func narrowed(_ part: AdapterPart, _ dt: AdapterDType, _ planDType: AdapterDType) -> Bool {
        switch part {
        case .loraA, .loraBT, .embedTokens, .lmHead: return dt == planDType
        default: return false
        }
    }

    // MARK: reading

    struct Opened {
        let file: MappedFile
        let header: Header
        let config: LoraConfig
        let plan: AdapterPlan
        let dataStart: Int
    }

    static func map(_ path: String) throws -> MappedFile {
        do { return try MappedFile(readingWhole: path) } catch let e as WeightError {
            throw AdapterError.io(path: path, reason: e.localizedDescription)
        }
    }

    static func open(_ file: MappedFile) throws -> Opened {
        let path = file.path
        func bad(_ why: String) -> AdapterError { .malformed(path: path, reason: why) }
        guard file.count >= 16 else { throw bad("file too short for a .lora header") }
        guard Array(UnsafeRawBufferPointer(start: file.base, count: 8)) == magic else { throw bad("bad magic (not a .lora file)") }
        let stored = UInt64(littleEndian: (file.base + 8).loadUnaligned(as: UInt64.self))
        guard stored > 0, stored <= UInt64(file.count - 16), stored < 64 << 20 else { throw bad("header length \(stored) does not fit the file") }
        let len = Int(stored)
        let header: Header
        do { header = try Header(json: OrderedJSON.parse(Data(bytes: file.base + 16, count: len))) } catch {
            throw bad("header is not valid JSON for this format (\(error))")
        }
        guard header.format == "loramux-lora" else { throw bad("format '\(header.format)'") }
        guard header.version == formatVersion else {
            throw AdapterError.unsupported(path: path, key: "version", reason: "\(header.version) (this build reads \(formatVersion))")
        }
        let cfgJSON: OrderedJSON
        do { cfgJSON = try OrderedJSON.parse(Data(header.adapterConfig.utf8)) } catch { throw bad("embedded adapter_config: \(error)") }
        let config = try LoraConfig(json: cfgJSON, path: path)
        var modules: [AdapterPlan.Module] = []
        for m in header.modules {
            guard let p = Projection(name: m.proj) else { throw bad("unknown projection '\(m.proj)'") }
            modules.append(.init(layer: m.layer, proj: p, rank: m.rank, scale: m.scale, dora: m.dora))
        }
        let plan = AdapterPlan(config: config, modules: modules, embedding: header.embedding.map { ($0.rank, $0.scale) },
                               embedOverride: header.embedOverride, lmHeadOverride: header.lmHeadOverride, dtype: header.dtype)
        try plan.validate(against: header.base, path: path)
        // The tensor table must be exactly what the plan needs, inside the file.
        let dataStart = 16 + len
        let expected = plan.parts(header.base)
        guard expected.count == header.tensors.count else { throw bad("tensor table has \(header.tensors.count) entries, the plan needs \(expected.count)") }
        for (e, t) in zip(expected, header.tensors) {
            let esize = header.storage == "bf16" && narrowed(e.part, e.dtype, plan.dtype) ? 2 : e.dtype.size
            guard e.part.key == t.name, e.dtype == t.dtype, e.shape == t.shape, t.raw == e.shape.reduce(1, *) * esize else {
                throw bad("tensor '\(t.name)' does not match the plan (expected \(e.part.key) \(e.dtype) \(e.shape))")
            }
            guard t.offset >= 0, t.compressed > 0, t.offset <= file.count - dataStart, t.compressed <= file.count - dataStart - t.offset else {
                throw bad("tensor '\(t.name)' lies outside the file")
            }
        }
        return Opened(file: file, header: header, config: config, plan: plan, dataStart: dataStart)
    }

    public static func inspect(path: String) throws -> Info {
        try inspect(file: map(path))
    }

    public static func inspect(file: MappedFile) throws -> Info {
        let o = try open(file)
        return Info(config: o.config, base: o.header.base, dtype: o.header.dtype, modules: o.plan.modules, tensorCount: o.header.tensors.count,
                    compressedBytes: o.header.tensors.reduce(0) { $0 + $1.compressed }, rawBytes: o.header.tensors.reduce(0) { $0 + $1.raw },
                    fileBytes: o.file.count)
    }

    /// Loads a packed adapter for `base`, checking the fingerprint first.
    public static func load(path: String, name: String, base: LlamaWeights) throws -> LoraAdapter {
        try load(file: map(path), name: name, base: base)
    }

    public static func load(file: MappedFile, name: String, base: LlamaWeights) throws -> LoraAdapter {
        let o = try open(file)
        let path = file.path
        let mism = o.header.base.mismatches(base.config.shape)
        guard mism.isEmpty else { throw AdapterError.wrongBase(path: path, reason: mism.joined(separator: "; "), hint: o.header.baseModel) }
        let byName = Dictionary(o.header.tensors.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        // The header holds every tensor's CRC, which the fill below checks against the data.
        let content = AdapterContentKey(kind: "packed", files: [file.identity], crcs: [lm_crc32c(0, file.base + 8, o.dataStart - 8)])
        return try AdapterBuilder.build(name: name, source: path, plan: o.plan, base: base, content: content) { part, dtype, count, dst in
            let widen = o.header.storage == "bf16" && narrowed(part, dtype, o.plan.dtype)
            guard let t = byName[part.key], t.dtype == dtype, t.raw == count * (widen ? 2 : dtype.size) else {
                throw AdapterError.malformed(path: path, reason: "no stored tensor for \(part.key)")
            }
            let src = (o.file.base + o.dataStart + t.offset).assumingMemoryBound(to: CChar.self)
            // bf16 lands in the upper half of the f32 destination, then widens in place, front to back.
            let landing = widen ? dst + count * 2 : dst
            let n = LZ4_decompress_safe(src, landing.assumingMemoryBound(to: CChar.self), Int32(t.compressed), Int32(t.raw))
            guard n == t.raw else { throw AdapterError.malformed(path: path, reason: "tensor '\(t.name)' does not decompress (corrupt file)") }
            guard lm_crc32c(0, landing, t.raw) == t.crc32c else {
                throw AdapterError.malformed(path: path, reason: "tensor '\(t.name)' fails its checksum (corrupt file)")
            }
            if widen { lm_bf16_widen_in_place(dst, Int64(count)) }
            if dtype == .f32, lm_first_nonfinite(dst.assumingMemoryBound(to: Float.self), Int64(count)) >= 0 {
                throw AdapterError.malformed(path: path, reason: "tensor '\(t.name)' holds non-finite values")
            }
        }
    }
}

/// Loads an adapter from a PEFT directory or a `.lora` file.
public enum AdapterLoader {
    public static func load(path: String, name: String, base: LlamaWeights) throws -> LoraAdapter {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw AdapterError.io(path: path, reason: "no such file or directory")
        }
        if isDir.boolValue { return try PEFTAdapter(directory: path).load(name: name, base: base) }
        return try PackedAdapter.load(path: path, name: name, base: base)
    }
}

// Foundation's JSONDecoder costs milliseconds on a 400-tensor header; loading
// must take less than that in total, so the header is read by hand.
extension PackedAdapter.Header {
    struct DecodeError: Error, CustomStringConvertible {
        let description: String
    }

    init(json j: OrderedJSON) throws {
        func fail(_ s: String) -> DecodeError { DecodeError(description: s) }
        func str(_ v: OrderedJSON?, _ k: String) throws -> String {
            guard case let .string(s)? = v else { throw fail("'\(k)' must be a string") }
            return s
        }
        func num(_ v: OrderedJSON?, _ k: String) throws -> Double {
            guard case let .number(n)? = v, n.isFinite else { throw fail("'\(k)' must be a number") }
            return n
        }
        func int(_ v: OrderedJSON?, _ k: String) throws -> Int {
            let n = try num(v, k)
            guard n == n.rounded(), abs(n) < 9e15 else { throw fail("'\(k)' must be an integer") }
            return Int(n)
        }
        func bool(_ v: OrderedJSON?, _ k: String) throws -> Bool {
            guard case let .bool(b)? = v else { throw fail("'\(k)' must be a boolean") }
            return b
        }
        func arr(_ v: OrderedJSON?, _ k: String) throws -> [OrderedJSON] {
            guard case let .array(a)? = v else { throw fail("'\(k)' must be an array") }
            return a
        }
        func parseDType(_ v: OrderedJSON?) throws -> AdapterDType {
            guard let d = AdapterDType(rawValue: try str(v, "dtype")) else { throw fail("unknown dtype") }
            return d
        }
        format = try str(j["format"], "format")
        version = try int(j["version"], "version")
        adapterConfig = try str(j["adapter_config"], "adapter_config")
        guard let b = j["base"] else { throw fail("missing 'base'") }
        base = BaseShape(numLayers: try int(b["num_layers"], "num_layers"), hiddenSize: try int(b["hidden_size"], "hidden_size"),
                         qDim: try int(b["q_dim"], "q_dim"), kvDim: try int(b["kv_dim"], "kv_dim"),
                         intermediateSize: try int(b["intermediate_size"], "intermediate_size"),
                         vocabSize: try int(b["vocab_size"], "vocab_size"))
        if case let .string(s)? = j["base_model_name_or_path"] { baseModel = s } else { baseModel = nil }
        dtype = try parseDType(j["dtype"])
        if case let .string(st)? = j["storage"] {
            guard st == "bf16", dtype == .f32 else { throw fail("unknown storage '\(st)'") }
            storage = st
        } else { storage = nil }
        modules = try arr(j["modules"], "modules").map {
            Module(layer: try int($0["layer"], "layer"), proj: try str($0["proj"], "proj"), rank: try int($0["rank"], "rank"),
                   scale: Float(try num($0["scale"], "scale")), dora: try bool($0["dora"], "dora"))
        }
        if let e = j["embedding"], e != .null {
            embedding = Embedding(rank: try int(e["rank"], "rank"), scale: Float(try num(e["scale"], "scale")))
        } else { embedding = nil }
        embedOverride = try bool(j["embed_tokens_replaced"], "embed_tokens_replaced")
        lmHeadOverride = try bool(j["lm_head_replaced"], "lm_head_replaced")
        // "tensors" holds only what the plan cannot derive: per tensor, in plan
        // order, [offset, compressed bytes, CRC-32C]. Names, dtypes and shapes
        // follow from the modules and base shape, and are checked against them.
        let flat = try arr(j["tensors"], "tensors").map { try int($0, "tensors") }
        guard flat.count % 3 == 0 else { throw fail("'tensors' must hold triples") }
        let plan = AdapterPlan(config: LoraConfig.placeholder, modules: try modules.map {
            guard let p = Projection(name: $0.proj) else { throw fail("unknown projection '\($0.proj)'") }
            return .init(layer: $0.layer, proj: p, rank: $0.rank, scale: $0.scale, dora: $0.dora)
        }, embedding: embedding.map { ($0.rank, $0.scale) }, embedOverride: embedOverride, lmHeadOverride: lmHeadOverride, dtype: dtype)
        let parts = plan.parts(base)
        guard parts.count * 3 == flat.count else { throw fail("'tensors' has \(flat.count / 3) entries, the plan needs \(parts.count)") }
        let (st, planDType) = (storage, dtype)
        tensors = try parts.enumerated().map { i, p in
            let crc = flat[3 * i + 2]
            guard crc >= 0, crc <= Int(UInt32.max) else { throw fail("checksum out of range") }
            let esize = st == "bf16" && PackedAdapter.narrowed(p.part, p.dtype, planDType) ? 2 : p.dtype.size
            return Tensor(name: p.part.key, dtype: p.dtype, shape: p.shape, offset: flat[3 * i], compressed: flat[3 * i + 1],
                          raw: p.shape.reduce(1, *) * esize, crc32c: UInt32(crc))
        }
    }
}

extension PackedAdapter.Header {
    /// JSON with a compact tensor table (see `init(json:)`).
    func encoded() throws -> Data {
        var obj: [String: Any] = [
            "format": format, "version": version, "adapter_config": adapterConfig, "dtype": dtype.rawValue,
            "base": ["num_layers": base.numLayers, "hidden_size": base.hiddenSize, "q_dim": base.qDim, "kv_dim": base.kvDim,
                     "intermediate_size": base.intermediateSize, "vocab_size": base.vocabSize],
            "modules": modules.map { ["layer": $0.layer, "proj": $0.proj, "rank": $0.rank, "scale": Double($0.scale), "dora": $0.dora] as [String: Any] },
            "embed_tokens_replaced": embedOverride, "lm_head_replaced": lmHeadOverride,
            "tensors": tensors.flatMap { [$0.offset, $0.compressed, Int($0.crc32c)] },
        ]
        obj["base_model_name_or_path"] = baseModel ?? NSNull()
        if let storage { obj["storage"] = storage }
        obj["embedding"] = embedding.map { ["rank": $0.rank, "scale": Double($0.scale)] as [String: Any] } ?? NSNull()
        return try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
    }
}

extension LoraConfig {
    /// Stand-in while decoding a packed header; the real config is parsed next.
    static var placeholder: LoraConfig {
        // swiftlint:disable:next force_try
        try! LoraConfig(json: .object([("r", .number(1)), ("target_modules", .array([]))]), path: "")
    }
}
