import CKernels

/// Tensor element types, numbered as GGML numbers them (GGUF stores these ids).
public enum DType: UInt32, Sendable, CaseIterable {
    case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q2_K = 10, q3_K = 11, q4_K = 12, q5_K = 13, q6_K = 14, iq4_nl = 20, iq4_xs = 23, bf16 = 30

    /// Elements per quantization block (the kernels' table, which reads the blocks).
    public var blockSize: Int { Int(lm_block_size(Int32(rawValue))) }

    /// Bytes per block.
    public var blockBytes: Int { Int(lm_block_bytes(Int32(rawValue))) }

    public var name: String {
        switch self {
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        case .q4_0: return "Q4_0"
        case .q4_1: return "Q4_1"
        case .q5_0: return "Q5_0"
        case .q5_1: return "Q5_1"
        case .q8_0: return "Q8_0"
        case .q2_K: return "Q2_K"
        case .q3_K: return "Q3_K"
        case .q4_K: return "Q4_K"
        case .q5_K: return "Q5_K"
        case .q6_K: return "Q6_K"
        case .iq4_nl: return "IQ4_NL"
        case .iq4_xs: return "IQ4_XS"
        }
    }

    /// Bytes for `elements` values, or nil when they do not fill whole blocks.
    public func byteCount(elements: Int) -> Int? {
        guard elements >= 0, elements % blockSize == 0 else { return nil }
        let (r, o) = (elements / blockSize).multipliedReportingOverflow(by: blockBytes)
        return o ? nil : r
    }

    /// GGML type names we know but cannot compute with, for error messages.
    static func ggmlName(_ id: UInt32) -> String {
        let names: [UInt32: String] = [9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                                       18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S",
                                       22: "IQ2_S", 24: "I8", 25: "I16", 26: "I32",
                                       27: "I64", 28: "F64", 29: "IQ1_M"]
        return names[id] ?? "type #\(id)"
    }
}

/// A tensor inside a mapped file. Shape is outermost-first, as in PyTorch
/// (`[rows, cols]` for a matrix whose rows are contiguous).
public struct TensorView: @unchecked Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let data: UnsafeRawPointer
    public let byteCount: Int
    /// Keeps the mapping alive as long as the view exists.
    public let owner: MappedFile

    public var elementCount: Int { shape.reduce(1, *) }
    public var rows: Int { shape.count >= 2 ? shape.dropLast().reduce(1, *) : 1 }
    public var cols: Int { shape.last ?? 1 }
}
