import Foundation

/// A metadata value from a GGUF header.
public indirect enum GGUFValue: Sendable, Equatable {
    case uint(UInt64)
    case int(Int64)
    case float(Double)
    case bool(Bool)
    case string(String)
    case array([GGUFValue])

    public var intValue: Int? {
        switch self {
        case let .uint(v): return v <= UInt64(Int.max) ? Int(v) : nil
        case let .int(v): return Int(v)
        case let .float(v): return v.isFinite && v == v.rounded() && abs(v) < 9e15 ? Int(v) : nil
        default: return nil
        }
    }
    public var doubleValue: Double? {
        switch self {
        case let .uint(v): return Double(v)
        case let .int(v): return Double(v)
        case let .float(v): return v
        default: return nil
        }
    }
    public var stringValue: String? { if case let .string(s) = self { return s } else { return nil } }
    public var boolValue: Bool? { if case let .bool(b) = self { return b } else { return nil } }
    public var arrayValue: [GGUFValue]? { if case let .array(a) = self { return a } else { return nil } }
}

/// GGUF v2/v3 reader over a memory mapping. Every offset and size read from
/// the file is checked against the file's length before use.
public final class GGUFFile: @unchecked Sendable {
    public let file: MappedFile
    public let version: UInt32
    public let metadata: [String: GGUFValue]
    public let tensors: [String: TensorView]
    /// Tensor names in file order.
    public let tensorNames: [String]
    public var path: String { file.path }

    public convenience init(path: String) throws {
        try self.init(file: MappedFile(path: path))
    }

    public init(file: MappedFile) throws {
        self.file = file
        var r = Reader(file: file)
        let magic = try r.u32("magic")
        guard magic == 0x4655_4747 else {  // "GGUF" little-endian
            throw WeightError.malformed(path: file.path, reason: "bad magic (not a GGUF file)")
        }
        version = try r.u32("version")
        guard version == 2 || version == 3 else {
            throw WeightError.unsupported(path: file.path, reason: "GGUF version \(version) (need 2 or 3)")
        }
        let nTensors = try r.u64("tensor count")
        let nKV = try r.u64("metadata count")
        // Each entry takes at least 8 bytes; anything larger cannot fit the file.
        guard nTensors < UInt64(file.count / 8), nKV < UInt64(file.count / 8) else {
            throw WeightError.malformed(path: file.path, reason: "implausible tensor/metadata counts \(nTensors)/\(nKV)")
        }
        var meta: [String: GGUFValue] = [:]
        for _ in 0..<nKV {
            let key = try r.string("metadata key")
            let type = try r.u32("type of '\(key)'")
            meta[key] = try r.value(type: type, key: key, depth: 0)
        }
        metadata = meta

        var alignment = 32
        if let a = meta["general.alignment"] {
            guard let v = a.intValue, v > 0, v & (v - 1) == 0, v <= 1 << 20 else {
                throw WeightError.malformed(path: file.path, reason: "general.alignment is not a power of two")
            }
            alignment = v
        }

        struct Info { let name: String; let dims: [Int]; let type: UInt32; let offset: UInt64 }
        var infos: [Info] = []
        infos.reserveCapacity(Int(nTensors))
        for _ in 0..<nTensors {
            let name = try r.string("tensor name")
            let nDims = try r.u32("dimension count of '\(name)'")
            guard nDims >= 1, nDims <= 4 else {
                throw WeightError.malformed(path: file.path, reason: "tensor '\(name)' has \(nDims) dimensions")
            }
            var dims: [Int] = []
            for _ in 0..<nDims {
                let d = try r.u64("shape of '\(name)'")
                guard d > 0, d < 1 << 40 else {
                    throw WeightError.malformed(path: file.path, reason: "tensor '\(name)' has dimension \(d)")
                }
                dims.append(Int(d))
            }
            let type = try r.u32("type of '\(name)'")
            let offset = try r.u64("offset of '\(name)'")
            infos.append(Info(name: name, dims: dims, type: type, offset: offset))
        }
        let dataStart = (r.pos + alignment - 1) / alignment * alignment

        var views: [String: TensorView] = [:]
        var names: [String] = []
        for info in infos {
            guard let dtype = DType(rawValue: info.type) else {
                throw WeightError.unsupportedDType(path: file.path, tensor: info.name, dtype: DType.ggmlName(info.type))
            }
            // GGUF lists dimensions innermost first; views use outermost first.
            let shape = Array(info.dims.reversed())
            var elements = 1
            for d in shape {
                let (m, o) = elements.multipliedReportingOverflow(by: d)
                guard !o else { throw WeightError.malformed(path: file.path, reason: "tensor '\(info.name)' is too large") }
                elements = m
            }
            guard info.dims[0] % dtype.blockSize == 0, let bytes = dtype.byteCount(elements: elements) else {
                throw WeightError.malformed(path: file.path,
                    reason: "tensor '\(info.name)': row of \(info.dims[0]) is not a whole number of \(dtype.name) blocks")
            }
            guard info.offset < UInt64(Int.max / 2), info.offset % UInt64(alignment) == 0 else {
                throw WeightError.malformed(path: file.path, reason: "tensor '\(info.name)' has misaligned offset \(info.offset)")
            }
            let ptr = try file.range(dataStart + Int(info.offset), bytes, what: "data of tensor '\(info.name)'")
            guard views[info.name] == nil else {
                throw WeightError.malformed(path: file.path, reason: "duplicate tensor '\(info.name)'")
            }
            views[info.name] = TensorView(name: info.name, dtype: dtype, shape: shape, data: ptr,
                                          byteCount: bytes, owner: file)
            names.append(info.name)
        }
        tensors = views
        tensorNames = names
    }

    public func tensor(_ name: String) throws -> TensorView {
        guard let t = tensors[name] else { throw WeightError.missingTensor(path: path, tensor: name) }
        return t
    }

    public func int(_ key: String) throws -> Int {
        guard let v = metadata[key]?.intValue else { throw WeightError.missingMetadata(path: path, key: key) }
        return v
    }
    public func double(_ key: String) throws -> Double {
        guard let v = metadata[key]?.doubleValue else { throw WeightError.missingMetadata(path: path, key: key) }
        return v
    }
    public func string(_ key: String) throws -> String {
        guard let v = metadata[key]?.stringValue else { throw WeightError.missingMetadata(path: path, key: key) }
        return v
    }
    public func strings(_ key: String) throws -> [String] {
        guard let a = metadata[key]?.arrayValue else { throw WeightError.missingMetadata(path: path, key: key) }
        return try a.map {
            guard let s = $0.stringValue else {
                throw WeightError.malformed(path: path, reason: "metadata '\(key)' is not an array of strings")
            }
            return s
        }
    }
    public func ints(_ key: String) throws -> [Int] {
        guard let a = metadata[key]?.arrayValue else { throw WeightError.missingMetadata(path: path, key: key) }
        return try a.map {
            guard let v = $0.intValue else {
                throw WeightError.malformed(path: path, reason: "metadata '\(key)' is not an array of integers")
            }
            return v
        }
    }

    /// Bounds-checked little-endian cursor over the header.
    struct Reader {
        let file: MappedFile
        var pos = 0

        mutating func bytes(_ n: Int, _ what: String) throws -> UnsafeRawPointer {
            let p = try file.range(pos, n, what: what)
            pos += n
            return p
        }
        mutating func u8(_ what: String) throws -> UInt8 { try bytes(1, what).load(as: UInt8.self) }
        mutating func u16(_ what: String) throws -> UInt16 { UInt16(littleEndian: try bytes(2, what).loadUnaligned(as: UInt16.self)) }
        mutating func u32(_ what: String) throws -> UInt32 { UInt32(littleEndian: try bytes(4, what).loadUnaligned(as: UInt32.self)) }
        mutating func u64(_ what: String) throws -> UInt64 { UInt64(littleEndian: try bytes(8, what).loadUnaligned(as: UInt64.self)) }
        mutating func string(_ what: String) throws -> String {
            let n = try u64("length of \(what)")
            guard n <= UInt64(file.count - pos) else {
                throw WeightError.malformed(path: file.path, reason: "\(what) runs past the end of the file")
            }
            let p = try bytes(Int(n), what)
            let buf = UnsafeBufferPointer(start: p.assumingMemoryBound(to: UInt8.self), count: Int(n))
            // Invalid UTF-8 is repaired rather than fatal: token strings are looked up, not trusted.
            return String(decoding: buf, as: UTF8.self)
        }
        mutating func value(type: UInt32, key: String, depth: Int) throws -> GGUFValue {
            switch type {
            case 0: return .uint(UInt64(try u8(key)))
            case 1: return .int(Int64(Int8(bitPattern: try u8(key))))
            case 2: return .uint(UInt64(try u16(key)))
            case 3: return .int(Int64(Int16(bitPattern: try u16(key))))
            case 4: return .uint(UInt64(try u32(key)))
            case 5: return .int(Int64(Int32(bitPattern: try u32(key))))
            case 6: return .float(Double(Float(bitPattern: try u32(key))))
            case 7: return .bool(try u8(key) != 0)
            case 8: return .string(try string("value of '\(key)'"))
            case 9:
                guard depth < 4 else {
                    throw WeightError.malformed(path: file.path, reason: "metadata '\(key)' nests arrays too deeply")
                }
                let itemType = try u32("array type of '\(key)'")
                let n = try u64("array length of '\(key)'")
                guard n <= UInt64(file.count - pos) else {
                    throw WeightError.malformed(path: file.path, reason: "metadata array '\(key)' runs past the end of the file")
                }
                var items: [GGUFValue] = []
                items.reserveCapacity(Int(n))
                for _ in 0..<n { items.append(try value(type: itemType, key: key, depth: depth + 1)) }
                return .array(items)
            case 10: return .uint(try u64(key))
            case 11: return .int(Int64(bitPattern: try u64(key)))
            case 12: return .float(Double(bitPattern: try u64(key)))
            default:
                throw WeightError.malformed(path: file.path, reason: "metadata '\(key)' has unknown value type \(type)")
            }
        }
    }
}
