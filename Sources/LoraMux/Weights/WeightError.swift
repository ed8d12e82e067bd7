import Foundation

/// Errors from the weight store. Every message names the file, and the tensor
/// when one is involved, so a user can tell which download is broken.
public enum WeightError: Error, LocalizedError, Equatable {
    case io(path: String, reason: String)
    case malformed(path: String, reason: String)
    case unsupportedDType(path: String, tensor: String, dtype: String)
    case missingTensor(path: String, tensor: String)
    case badShape(path: String, tensor: String, expected: [Int], found: [Int])
    case missingMetadata(path: String, key: String)
    case unsupported(path: String, reason: String)

    public var errorDescription: String? {
        switch self {
        case let .io(path, reason): return "\(path): \(reason)"
        case let .malformed(path, reason): return "\(path): malformed file: \(reason)"
        case let .unsupportedDType(path, tensor, dtype):
            return "\(path): tensor '\(tensor)' has unsupported dtype \(dtype)"
        case let .missingTensor(path, tensor): return "\(path): missing tensor '\(tensor)'"
        case let .badShape(path, tensor, expected, found):
            return "\(path): tensor '\(tensor)' has shape \(found), expected \(expected)"
        case let .missingMetadata(path, key): return "\(path): missing metadata key '\(key)'"
        case let .unsupported(path, reason): return "\(path): unsupported model: \(reason)"
        }
    }
}
