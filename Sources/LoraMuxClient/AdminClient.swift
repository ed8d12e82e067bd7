import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1

/// Talks to a running LoraMux server's admin API (vLLM-compatible routes).
/// Requests are built by pure functions so they can be checked without a server.
public struct AdminClient: Sendable {
    public let server: URL
    public let token: String?

    public struct Request: Equatable, Sendable {
        public var method: String
        public var url: String
        public var headers: [String: String]
        public var body: Data?
    }

    public struct ServerError: Error, LocalizedError, Equatable {
        public let status: Int
        public let message: String
        public var errorDescription: String? { "server answered \(status): \(message)" }
    }

    public struct ConfigError: Error, LocalizedError {
        public let message: String
        public var errorDescription: String? { message }
    }

    /// `server` from the flag, else LORAMUX_SERVER, else http://127.0.0.1:8080;
    /// the token from LORAMUX_ADMIN_TOKEN unless given.
    public init(server: String?, token: String? = nil, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        let s = server ?? environment["LORAMUX_SERVER"] ?? "http://127.0.0.1:8080"
        guard let url = URL(string: s), let scheme = url.scheme, ["http", "https"].contains(scheme), url.host != nil else {
            throw ConfigError(message: "invalid server URL '\(s)' (expected http://HOST:PORT)")
        }
        self.server = url
        self.token = token ?? environment["LORAMUX_ADMIN_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
    }

    func url(_ path: String) -> String {
        var base = server.absoluteString
        while base.hasSuffix("/") { base.removeLast() }
        return base + path
    }

    func headers(json: Bool) -> [String: String] {
        var h = ["Accept": "application/json", "User-Agent": "adapterctl"]
        if json { h["Content-Type"] = "application/json" }
        if let token { h["Authorization"] = "Bearer \(token)" }
        return h
    }

    public func loadRequest(name: String, path: String?) throws -> Request {
        var body: [String: String] = ["lora_name": name]
        if let path { body["lora_path"] = path }
        return Request(method: "POST", url: url("/v1/load_lora_adapter"), headers: headers(json: true),
                       body: try JSONSerialization.data(withJSONObject: body, options: [.sortedKeys]))
    }

    public func unloadRequest(name: String) throws -> Request {
        Request(method: "POST", url: url("/v1/unload_lora_adapter"), headers: headers(json: true),
                body: try JSONSerialization.data(withJSONObject: ["lora_name": name], options: [.sortedKeys]))
    }

    public func listRequest() -> Request {
        Request(method: "GET", url: url("/v1/adapters"), headers: headers(json: false), body: nil)
    }

    /// Turns a response into its body, or a `ServerError` carrying the
    /// OpenAI-shaped error message when the status is not 2xx.
    public static func interpret(status: Int, body: Data) throws -> Data {
        guard (200..<300).contains(status) else {
            let obj = try? JSONSerialization.jsonObject(with: body) as? [String: Any]
            let msg = ((obj?["error"] as? [String: Any])?["message"] as? String)
                ?? String(decoding: body.prefix(500), as: UTF8.self)
            throw ServerError(status: status, message: msg.isEmpty ? "(no message)" : msg)
        }
        return body
    }

    public func send(_ r: Request, timeout: TimeAmount = .seconds(60)) async throws -> Data {
        var req = HTTPClientRequest(url: r.url)
        req.method = HTTPMethod(rawValue: r.method)
        for (k, v) in r.headers { req.headers.add(name: k, value: v) }
        if let b = r.body { req.body = .bytes(ByteBuffer(bytes: b)) }
        let resp = try await HTTPClient.shared.execute(req, timeout: timeout)
        let buf = try await resp.body.collect(upTo: 16 << 20)
        return try Self.interpret(status: Int(resp.status.code), body: Data(buf.readableBytesView))
    }
}
