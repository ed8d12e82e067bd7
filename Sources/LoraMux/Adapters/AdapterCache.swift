import Foundation
import Dispatch

/// Resident adapters under a byte budget and a count limit, evicted least
/// recently used first. Every user holds an `AdapterLease` (a pin): a pinned
/// adapter is never evicted or freed. Concurrent first requests for a cold
/// adapter share one load (single flight); a failed load reaches every waiter
/// and leaves nothing behind, so the next request tries again.
public final class AdapterCache: @unchecked Sendable {
    public typealias Loader = @Sendable (_ name: String) throws -> LoraAdapter

    public struct Stats: Sendable, Equatable {
        public var hits = 0, misses = 0, evictions = 0, loads = 0, failedLoads = 0
        public var loadSeconds = 0.0
        public var residentBytes = 0, residentCount = 0
    }

    public struct EntryInfo: Sendable {
        public let name: String
        public let bytes: Int
        public let pins: Int
        public let hits: Int
        public let lastUse: Date
    }

    final class Entry {
        let name: String
        var adapter: LoraAdapter?
        var loading = true
        var error: Error?
        var pins = 0
        var hits = 0
        var tick: UInt64 = 0
        var lastUse = Date()
        /// Unloaded while pinned: freed when the last pin goes.
        var doomed = false
        init(name: String) { self.name = name }
    }

    public let budgetBytes: Int
    public let maxCount: Int
    private let loader: Loader
    private let cond = NSCondition()
    private var entries: [String: Entry] = [:]
    private var doomed: [ObjectIdentifier: Entry] = [:]
    private var clock: UInt64 = 0
    private var stats = Stats()

    /// How long a load waits for a pinned adapter to be released when every
    /// resident adapter is in use, before failing with `cacheFull`.
    public let roomTimeout: TimeInterval

    public init(budgetBytes: Int, maxCount: Int = 1 << 20, roomTimeout: TimeInterval = 30, loader: @escaping Loader) {
        self.budgetBytes = budgetBytes
        self.maxCount = max(1, maxCount)
        self.roomTimeout = roomTimeout
        self.loader = loader
    }

    /// Pins `name`, loading it if needed. Blocks while another caller loads it.
    public func acquire(_ name: String) throws -> AdapterLease {
        cond.lock()
        while true {
            if let e = entries[name] {
                if e.loading {
                    // Wait for this load, then report its outcome to us too.
                    while e.loading { cond.wait() }
                    if let err = e.error { cond.unlock(); throw err }
                    continue
                }
                e.pins += 1
                e.hits += 1
                clock += 1
                e.tick = clock
                e.lastUse = Date()
                stats.hits += 1
                let a = e.adapter!
                cond.unlock()
                return AdapterLease(cache: self, entry: e, adapter: a)
            }
            break
        }
        let e = Entry(name: name)
        entries[name] = e
        stats.misses += 1
        cond.unlock()

        let t0 = DispatchTime.now().uptimeNanoseconds
        let result = Result { try loader(name) }
        let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9

        cond.lock()
        // `loading` stays set until the entry is final: makeRoom may wait (and
        // drop the lock), and meanwhile other callers must keep waiting on it.
        defer { e.loading = false; cond.broadcast(); cond.unlock() }
        stats.loadSeconds += dt
        switch result {
        case let .failure(err):
            stats.failedLoads += 1
            e.error = err
            // Waiters already blocked see the error; later callers start afresh.
            if entries[name] === e { entries[name] = nil }
            throw err
        case let .success(adapter):
            stats.loads += 1
            do {
                try makeRoom(for: adapter.residentBytes, name: name)
            } catch {
                e.error = error
                if entries[name] === e { entries[name] = nil }
                throw error
            }
            e.adapter = adapter
            e.pins = 1
            clock += 1
            e.tick = clock
            stats.residentBytes += adapter.residentBytes
            stats.residentCount += 1
            return AdapterLease(cache: self, entry: e, adapter: adapter)
        }
    }

    /// Async form for callers on Swift concurrency's pool: the blocking wait
    /// and the load run on a dispatch thread, never on the cooperative pool.
    public func acquire(_ name: String) async throws -> AdapterLease {
        try await withCheckedThrowingContinuation { cont in
            DispatchQueue.global().async {
                cont.resume(with: Result { try self.acquire(name) })
            }
        }
    }

    /// Evicts unpinned adapters, least recently used first. When every
    /// resident adapter is pinned, waits (up to `roomTimeout`) for a release.
    /// Caller holds the lock.
    private func makeRoom(for bytes: Int, name: String) throws {
        guard bytes <= budgetBytes else { throw AdapterError.tooLarge(name: name, bytes: bytes, budget: budgetBytes) }
        let deadline = Date().addingTimeInterval(roomTimeout)
        while stats.residentBytes + bytes > budgetBytes || stats.residentCount + 1 > maxCount {
            let victim = entries.values.filter { $0.adapter != nil && $0.pins == 0 && $0.name != name }.min { $0.tick < $1.tick }
            guard let v = victim else {
                if cond.wait(until: deadline) { continue }
                throw AdapterError.cacheFull("every resident adapter is in use; '\(name)' does not fit (\(stats.residentCount) adapters, \(stats.residentBytes) of \(budgetBytes) bytes)")
            }
            remove(v)
            stats.evictions += 1
        }
    }

    private func remove(_ e: Entry) {
        if entries[e.name] === e { entries[e.name] = nil }
        doomed[ObjectIdentifier(e)] = nil
        if let a = e.adapter {
            stats.residentBytes -= a.residentBytes
            stats.residentCount -= 1
        }
        e.adapter = nil
    }

    fileprivate func release(_ e: Entry) {
        cond.lock(); defer { cond.unlock() }
        precondition(e.pins > 0, "adapter lease released twice")
        e.pins -= 1
        e.lastUse = Date()
        if e.pins == 0 {
            if e.doomed { remove(e) }
            cond.broadcast()  // a load may be waiting for room
        }
    }

    /// Drops `name` from the cache: now if unpinned, else when its last pin goes.
    /// New acquires after this load afresh.
    public func invalidate(_ name: String) {
        cond.lock(); defer { cond.unlock() }
        guard let e = entries[name], !e.loading else { return }
        if e.pins == 0 {
            remove(e)
        } else {
            e.doomed = true
            entries[name] = nil
            doomed[ObjectIdentifier(e)] = e
        }
    }

    public var statistics: Stats {
        cond.lock(); defer { cond.unlock() }
        return stats
    }

    public var resident: [EntryInfo] {
        cond.lock(); defer { cond.unlock() }
        return (Array(entries.values) + Array(doomed.values)).compactMap { e in
            e.adapter.map { EntryInfo(name: e.name, bytes: $0.residentBytes, pins: e.pins, hits: e.hits, lastUse: e.lastUse) }
        }.sorted { $0.name < $1.name }
    }

    public func isResident(_ name: String) -> Bool {
        cond.lock(); defer { cond.unlock() }
        return entries[name]?.adapter != nil
    }

    public var totalPins: Int {
        cond.lock(); defer { cond.unlock() }
        return (Array(entries.values) + Array(doomed.values)).reduce(0) { $0 + $1.pins }
    }
}

/// A pin on a resident adapter. The adapter cannot be evicted or freed while
/// any lease on it exists; `release()` (or deinit) returns the pin once.
public final class AdapterLease: @unchecked Sendable {
    public let adapter: LoraAdapter
    private weak var cache: AdapterCache?
    private let entry: AdapterCache.Entry
    private var released = false
    private let lock = NSLock()

    init(cache: AdapterCache, entry: AdapterCache.Entry, adapter: LoraAdapter) {
        self.cache = cache
        self.entry = entry
        self.adapter = adapter
    }

    public func release() {
        lock.lock()
        let first = !released
        released = true
        lock.unlock()
        if first { cache?.release(entry) }
    }

    deinit { release() }
}
