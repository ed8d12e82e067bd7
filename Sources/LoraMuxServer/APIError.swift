import Foundation
import HTTPTypes
import Hummingbird
import LoraMux
import NIOCore

/// An error as the HTTP API reports it: status plus OpenAI's error shape
/// `{"error": {"message", "type", "code"}}`. Every failure is mapped here, once.
public struct APIError: Error, Sendable {
    public var status: HTTPResponse.Status
    public var message: String
    public var type: String
    public var retryAfter: Int? = nil

    static func badRequest(_ m: String) -> APIError { APIError(status: .badRequest, message: m, type: "invalid_request_error") }
    static func notFound(_ m: String) -> APIError { APIError(status: .notFound, message: m, type: "not_found_error") }
    static func unauthorized(_ m: String) -> APIError { APIError(status: .unauthorized, message: m, type: "authentication_error") }

    /// Maps any error from the core (or from decoding) to a status and message.
    static func from(_ error: Error) -> APIError {
        switch error {
        case let e as APIError: return e
        case let e as EngineError:
            switch e {
            case .invalidArgument, .tokenOutOfRange: return .badRequest(e.localizedDescription)
            // DESIGN's contract: too long is 413 (OpenAI says 400), whether the body or the sequence.
            case .promptTooLong: return APIError(status: .contentTooLarge, message: e.localizedDescription, type: "invalid_request_error")
            case .overloaded: return APIError(status: .tooManyRequests, message: e.localizedDescription, type: "overloaded_error", retryAfter: 1)
            case .shuttingDown: return APIError(status: .serviceUnavailable, message: e.localizedDescription, type: "unavailable_error")
            case .cacheFull, .outOfMemory: return APIError(status: .serviceUnavailable, message: e.localizedDescription, type: "overloaded_error", retryAfter: 1)
            // The request was valid; the model (with its adapter) could not serve it.
            case .nonFiniteLogits: return APIError(status: .internalServerError, message: e.localizedDescription, type: "model_error")
            }
        case let e as AdapterError:
            switch e {
            case .unknownAdapter: return .notFound(e.localizedDescription)
            case .cacheFull: return APIError(status: .serviceUnavailable, message: e.localizedDescription, type: "overloaded_error", retryAfter: 1)
            default: return .badRequest(e.localizedDescription)
            }
        case let e as TokenizerError: return .badRequest(e.localizedDescription)
        case is NIOTooManyBytesError:
            return APIError(status: .contentTooLarge, message: "request body too large", type: "invalid_request_error")
        case let e as HTTPError where e.status == .contentTooLarge:
            return APIError(status: .contentTooLarge, message: "request body too large", type: "invalid_request_error")
        case let e as DecodingError: return .badRequest("invalid request body: \(Self.describe(e))")
        default:
            return APIError(status: .internalServerError, message: "internal error: \(error)", type: "internal_error")
        }
    }

    static func describe(_ e: DecodingError) -> String {
        func path(_ c: DecodingError.Context) -> String {
            let p = c.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
            return p.isEmpty ? "" : " at '\(p)'"
        }
        switch e {
        case let .typeMismatch(_, c): return "wrong type\(path(c)): \(c.debugDescription)"
        case let .valueNotFound(_, c): return "missing value\(path(c))"
        case let .keyNotFound(k, c): return "missing field '\(k.stringValue)'\(path(c))"
        case let .dataCorrupted(c): return "malformed JSON\(path(c)): \(c.debugDescription)"
        @unknown default: return "\(e)"
        }
    }

    var response: Response {
        let body: [String: Any] = ["error": ["message": message, "type": type, "code": Int(status.code)]]
        let data = (try? JSONSerialization.data(withJSONObject: body, options: [.sortedKeys])) ?? Data()
        var headers: HTTPFields = [.contentType: "application/json"]
        if let r = retryAfter { headers[.retryAfter] = String(r) }
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }
}
