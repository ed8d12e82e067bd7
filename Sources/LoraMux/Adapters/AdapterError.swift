import Foundation

/// Errors from reading, validating and caching adapters. Messages name the
/// adapter (or file) and the key or tensor involved.
public enum AdapterError: Error, LocalizedError, Equatable {
    case io(path: String, reason: String)
    case unsupported(path: String, key: String, reason: String)
    case malformed(path: String, reason: String)
    case wrongBase(path: String, reason: String, hint: String?)
    case invalidName(String, reason: String)
    case unknownAdapter(String)
    case alreadyRegistered(String)
    case outsideRoots(path: String)
    case tooLarge(name: String, bytes: Int, budget: Int)
    case cacheFull(String)

    public var errorDescription: String? {
        switch self {
        case let .io(path, reason): return "\(path): \(reason)"
        case let .unsupported(path, key, reason): return "\(path): unsupported adapter setting '\(key)': \(reason)"
        case let .malformed(path, reason): return "\(path): invalid adapter: \(reason)"
        case let .wrongBase(path, reason, hint):
            var s = "\(path): adapter does not fit this base model: \(reason)"
            if let hint { s += " (hint: it was trained on '\(hint)')" }
            return s
        case let .invalidName(name, reason): return "invalid adapter name '\(name)': \(reason)"
        case let .unknownAdapter(name): return "unknown adapter '\(name)'"
        case let .alreadyRegistered(name): return "adapter '\(name)' is already registered"
        case let .outsideRoots(path): return "\(path): outside the adapter directories this server reads"
        case let .tooLarge(name, bytes, budget): return "adapter '\(name)' needs \(bytes) bytes, more than the cache budget of \(budget)"
        case let .cacheFull(s): return "adapter cache full: \(s)"
        }
    }
}
