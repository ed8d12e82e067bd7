import Foundation

/// Errors from loading a tokenizer. Every message names the source file and,
/// where one is involved, the metadata key or JSON field, so a user can tell
/// which download is broken or which feature is missing.
public enum TokenizerError: Error, LocalizedError, Equatable {
    /// A required key is absent (GGUF metadata key or JSON path).
    case missingKey(source: String, key: String)
    /// A key holds a value this tokenizer does not implement.
    case unsupported(source: String, key: String, value: String, hint: String)
    /// The file is not what it claims to be.
    case malformed(source: String, reason: String)

    public var errorDescription: String? {
        switch self {
        case let .missingKey(source, key):
            return "\(source): tokenizer is missing '\(key)'"
        case let .unsupported(source, key, value, hint):
            return "\(source): unsupported tokenizer: '\(key)' is '\(value)' (\(hint))"
        case let .malformed(source, reason):
            return "\(source): malformed tokenizer: \(reason)"
        }
    }
}
