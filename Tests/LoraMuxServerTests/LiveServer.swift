import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import XCTest

/// A real `loramux serve` process on a free loopback port.
final class LiveServer: @unchecked Sendable {
    let process = Process()
    let port: Int
    let log: URL
    var base: String { "http://127.0.0.1:\(port)" }

    static var repo: URL { URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent() }
    static var fixtures: URL { repo.appendingPathComponent("Tests/Fixtures") }

    static func binary() -> URL {
        let b = Bundle(for: LiveServer.self).bundleURL
        let c = [b.appendingPathComponent("loramux"), b.deletingLastPathComponent().appendingPathComponent("loramux")]
        return c.first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? c[0]
    }

    static func modelPath() throws -> String {
        let p = ProcessInfo.processInfo.environment["LORAMUX_MODEL"] ?? repo.appendingPathComponent("models/SmolLM2-135M-Instruct.Q4_1.gguf").path
        guard FileManager.default.fileExists(atPath: p) else {
            XCTFail("SmolLM2 model not found at \(p): run ops/fetch-model")
            throw XCTSkip("unreachable")
        }
        return p
    }

    init(adapters: String, extra: [String] = []) throws {
        log = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-serve-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        process.executableURL = Self.binary()
        process.arguments = ["serve", "--model", try Self.modelPath(), "--adapters", adapters, "--port", "0"] + extra
        let out = Pipe()
        process.standardOutput = out
        process.standardError = try FileHandle(forWritingTo: log)
        try process.run()
        // Wait for "loramux: listening on http://127.0.0.1:PORT".
        var port = 0
        let deadline = Date().addingTimeInterval(60)
        var seen = ""
        while port == 0 && Date() < deadline {
            let d = out.fileHandleForReading.availableData
            if d.isEmpty { if !process.isRunning { break }; Thread.sleep(forTimeInterval: 0.05); continue }
            seen += String(decoding: d, as: UTF8.self)
            if let r = seen.range(of: #"listening on http://127\.0\.0\.1:(\d+)"#, options: .regularExpression) {
                port = Int(seen[r].split(separator: ":").last!) ?? 0
            }
        }
        self.port = port
        guard port > 0 else {
            process.terminate()
            throw NSError(domain: "LiveServer", code: 1, userInfo: [NSLocalizedDescriptionKey: "server did not start: \(seen) \((try? String(contentsOf: log, encoding: .utf8)) ?? "")"])
        }
    }

    /// SIGTERM and wait; returns the exit status.
    @discardableResult
    func stop(timeout: TimeInterval = 30) -> Int32 {
        if process.isRunning { process.interrupt(); kill(process.processIdentifier, SIGTERM) }
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        if process.isRunning { process.terminate(); return -1 }
        return process.terminationStatus
    }

    deinit { if process.isRunning { process.terminate() } }

    /// Runs a program to completion; returns its status and merged output.
    static func run(_ exe: URL, _ args: [String], environment: [String: String]? = nil) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = exe
        p.arguments = args
        if let environment { p.environment = environment }
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let d = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: d, as: UTF8.self))
    }

    struct Reply {
        var status: Int
        var headers: HTTPHeaders
        var body: Data
        var json: [String: Any]? { try? JSONSerialization.jsonObject(with: body) as? [String: Any] }
        var errorMessage: String { ((json?["error"] as? [String: Any])?["message"] as? String) ?? String(decoding: body, as: UTF8.self) }
    }

    func request(_ method: HTTPMethod, _ path: String, json: Any? = nil, raw: Data? = nil, token: String? = nil,
                 timeout: Int64 = 120) async throws -> Reply {
        var req = HTTPClientRequest(url: base + path)
        req.method = method
        if let token { req.headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let json { req.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: json))) }
        if let raw { req.body = .bytes(ByteBuffer(bytes: raw)) }
        req.headers.add(name: "Content-Type", value: "application/json")
        let resp = try await HTTPClient.shared.execute(req, timeout: .seconds(timeout))
        let body = try await resp.body.collect(upTo: 64 << 20)
        return Reply(status: Int(resp.status.code), headers: resp.headers, body: Data(body.readableBytesView))
    }

    /// SSE `data:` payloads of a streaming request, parsed; stops after `limit` events when given.
    /// `span`: seconds from the first event's arrival to the last's.
    func stream(_ path: String, json: Any, token: String? = nil, limit: Int? = nil) async throws
        -> (status: Int, events: [[String: Any]], done: Bool, span: Double) {
        var req = HTTPClientRequest(url: base + path)
        req.method = .POST
        if let token { req.headers.add(name: "Authorization", value: "Bearer \(token)") }
        req.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: json)))
        let resp = try await HTTPClient.shared.execute(req, timeout: .seconds(300))
        var events: [[String: Any]] = []
        var done = false
        var pending = ""
        var first: Date? = nil, last = Date()
        func span() -> Double { first.map { last.timeIntervalSince($0) } ?? 0 }
        for try await chunk in resp.body {
            last = Date()
            if first == nil { first = last }
            pending += String(buffer: chunk)
            while let r = pending.range(of: "\n\n") {
                let line = String(pending[..<r.lowerBound])
                pending = String(pending[r.upperBound...])
                guard line.hasPrefix("data: ") else { continue }
                let payload = line.dropFirst(6)
                if payload == "[DONE]" { done = true; continue }
                if let o = try? JSONSerialization.jsonObject(with: Data(payload.utf8)) as? [String: Any] { events.append(o) }
                if let limit, events.count >= limit { return (Int(resp.status.code), events, false, span()) }
            }
        }
        return (Int(resp.status.code), events, done, span())
    }

    /// The value of the sample `name{labels...}` whose labels include all of `labels`.
    func metric(_ name: String, labels: [String: String]) async throws -> Double? {
        let r = try await request(.GET, "/metrics")
        for line in String(decoding: r.body, as: UTF8.self).split(separator: "\n") where line.hasPrefix(name + "{") {
            let head = line.split(separator: " ").dropLast().joined(separator: " ")
            if labels.allSatisfy({ head.contains("\($0.key)=\"\($0.value)\"") }) { return Double(line.split(separator: " ").last!) }
        }
        return nil
    }

    func metric(_ name: String) async throws -> Double? {
        let r = try await request(.GET, "/metrics")
        for line in String(decoding: r.body, as: UTF8.self).split(separator: "\n") where line.hasPrefix(name + " ") {
            return Double(line.split(separator: " ").last!)
        }
        return nil
    }
}

extension Array where Element == Any {
    var int32s: [Int32] { compactMap { ($0 as? NSNumber)?.int32Value } }
}
