import Foundation

/// Hugging Face safetensors reader over a memory mapping: an 8-byte header
/// length, a JSON table of tensors, then raw little-endian data.
public final class SafetensorsFile: @unchecked Sendable {
    public let file: MappedFile
    public let tensors: [String: TensorView]
    public let metadata: [String: String]
    public var path: String { file.path }

    public convenience init(path: String) throws {
        try self.init(file: MappedFile(path: path))
    }

    public init(file: MappedFile) throws {
        self.file = file
        let path = file.path
        let lenPtr = try file.range(0, 8, what: "header length")
        let headerLen = UInt64(littleEndian: lenPtr.loadUnaligned(as: UInt64.self))
        guard headerLen >= 2, headerLen <= UInt64(file.count - 8), headerLen < 100 << 20 else {
            throw WeightError.malformed(path: path, reason: "header length \(headerLen) does not fit the file")
        }
        let hp = try file.range(8, Int(headerLen), what: "header")
        let headerData = Data(bytes: hp, count: Int(headerLen))
        guard let obj = try? JSONSerialization.jsonObject(with: headerData),
              let table = obj as? [String: Any] else {
            throw WeightError.malformed(path: path, reason: "header is not a JSON object")
        }
        let dataStart = 8 + Int(headerLen)
        let dataLen = file.count - dataStart
        var views: [String: TensorView] = [:]
        var meta: [String: String] = [:]
        for (name, value) in table {
            if name == "__metadata__" {
                if let m = value as? [String: Any] {
                    for (k, v) in m { if let s = v as? String { meta[k] = s } }
                }
                continue
            }
            guard let entry = value as? [String: Any],
                  let dtypeName = entry["dtype"] as? String,
                  let shapeAny = entry["shape"] as? [Any],
                  let offsAny = entry["data_offsets"] as? [Any], offsAny.count == 2 else {
                throw WeightError.malformed(path: path, reason: "tensor '\(name)' has an invalid header entry")
            }
            let dtype: DType
            switch dtypeName {
            case "F32": dtype = .f32
            case "F16": dtype = .f16
            case "BF16": dtype = .bf16
            default: throw WeightError.unsupportedDType(path: path, tensor: name, dtype: dtypeName)
            }
            var shape: [Int] = []
            var elements = 1
            for s in shapeAny {
                guard let d = (s as? NSNumber)?.intValue, d >= 0, d < 1 << 40 else {
                    throw WeightError.malformed(path: path, reason: "tensor '\(name)' has an invalid shape")
                }
                shape.append(d)
                let (m, o) = elements.multipliedReportingOverflow(by: d)
                guard !o else { throw WeightError.malformed(path: path, reason: "tensor '\(name)' is too large") }
                elements = m
            }
            guard let begin = (offsAny[0] as? NSNumber)?.intValue, let end = (offsAny[1] as? NSNumber)?.intValue,
                  begin >= 0, end >= begin, end <= dataLen else {
                throw WeightError.malformed(path: path, reason: "tensor '\(name)' has data offsets outside the file")
            }
            guard let bytes = dtype.byteCount(elements: elements), bytes == end - begin else {
                throw WeightError.malformed(path: path,
                    reason: "tensor '\(name)': \(end - begin) bytes of data for shape \(shape) in \(dtypeName)")
            }
            let ptr = try file.range(dataStart + begin, bytes, what: "data of tensor '\(name)'")
            views[name] = TensorView(name: name, dtype: dtype, shape: shape, data: ptr, byteCount: bytes, owner: file)
        }
        tensors = views
        metadata = meta
    }

    public func tensor(_ name: String) throws -> TensorView {
        guard let t = tensors[name] else { throw WeightError.missingTensor(path: path, tensor: name) }
        return t
    }
}

/// One or more safetensors files read as a single tensor namespace
/// (`model.safetensors` or the shards listed by `model.safetensors.index.json`).
public struct SafetensorsCollection: Sendable {
    public let files: [SafetensorsFile]
    public let tensors: [String: TensorView]
    public let directory: String

    public init(directory: String) throws {
        self.directory = directory
        let fm = FileManager.default
        let single = (directory as NSString).appendingPathComponent("model.safetensors")
        let index = (directory as NSString).appendingPathComponent("model.safetensors.index.json")
        var paths: [String] = []
        if fm.fileExists(atPath: single) {
            paths = [single]
        } else if fm.fileExists(atPath: index) {
            guard let data = fm.contents(atPath: index),
                  let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let map = obj["weight_map"] as? [String: String] else {
                throw WeightError.malformed(path: index, reason: "no weight_map")
            }
            for shard in Set(map.values).sorted() {
                guard !shard.contains("/"), !shard.hasPrefix(".") else {
                    throw WeightError.malformed(path: index, reason: "shard name '\(shard)' leaves the directory")
                }
                paths.append((directory as NSString).appendingPathComponent(shard))
            }
        } else {
            throw WeightError.io(path: directory, reason: "no model.safetensors or model.safetensors.index.json")
        }
        var all: [String: TensorView] = [:]
        var files: [SafetensorsFile] = []
        for p in paths {
            let f = try SafetensorsFile(path: p)
            files.append(f)
            for (k, v) in f.tensors {
                guard all[k] == nil else { throw WeightError.malformed(path: p, reason: "tensor '\(k)' appears in two shards") }
                all[k] = v
            }
        }
        self.files = files
        self.tensors = all
    }

    public func tensor(_ name: String) throws -> TensorView {
        guard let t = tensors[name] else { throw WeightError.missingTensor(path: directory, tensor: name) }
        return t
    }
}
