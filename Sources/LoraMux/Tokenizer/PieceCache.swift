import Foundation

/// Bounded, lock-protected cache of piece bytes → ids. When full it is
/// cleared: chat prompts repeat the same few thousand pieces, so it refills at once.
final class PieceCache: @unchecked Sendable {
    private let lock = NSLock()
    private var map: [[UInt8]: [Int32]] = [:]
    private let limit: Int

    init(limit: Int) { self.limit = limit }

    func get(_ key: [UInt8]) -> [Int32]? {
        lock.lock()
        defer { lock.unlock() }
        return map[key]
    }

    func set(_ key: [UInt8], _ ids: [Int32]) {
        lock.lock()
        defer { lock.unlock() }
        if map.count >= limit { map.removeAll(keepingCapacity: true) }
        map[key] = ids
    }
}
