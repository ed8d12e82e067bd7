import Foundation

/// Errors from running the model (as opposed to reading it).
public enum EngineError: Error, LocalizedError, Equatable {
    case invalidArgument(String)
    case outOfMemory(String)
    case promptTooLong(tokens: Int, limit: Int)
    case tokenOutOfRange(Int32, vocab: Int)
    case cacheFull(String)
    case overloaded(queued: Int)
    case shuttingDown
    /// A row's logits came out NaN or infinite (an adapter whose weights or
    /// scale overflow float32): the request is stopped, not fed garbage.
    case nonFiniteLogits(adapter: String?, position: Int)

    public var errorDescription: String? {
        switch self {
        case let .invalidArgument(s): return s
        case let .outOfMemory(s): return "out of memory: \(s)"
        case let .promptTooLong(t, l): return "prompt plus max tokens is \(t) tokens, more than the context of \(l)"
        case let .tokenOutOfRange(t, v): return "token id \(t) is outside the vocabulary (0..<\(v))"
        case let .cacheFull(s): return "KV cache full: \(s)"
        case let .overloaded(q): return "server overloaded: \(q) requests already queued"
        case .shuttingDown: return "the engine is shutting down"
        case let .nonFiniteLogits(a, pos):
            return "the logits at position \(pos) are not finite (NaN or infinity) with "
                + (a.map { "adapter '\($0)': its weights or scale overflow float32" } ?? "the base model alone")
                + "; the request was stopped"
        }
    }
}
