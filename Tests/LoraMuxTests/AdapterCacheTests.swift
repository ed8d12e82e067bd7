import XCTest
@testable import LoraMux

/// A lock-protected box for results gathered from several threads.
final class Collector<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [T] = []
    func add(_ t: T) { lock.lock(); items.append(t); lock.unlock() }
    var all: [T] { lock.lock(); defer { lock.unlock() }; return items }
}

final class AdapterCacheTests: XCTestCase {
    /// Real adapters (tiny model) under names; the loader counts its calls.
    final class Source: @unchecked Sendable {
        let base: LlamaWeights
        var loads: [String] = []
        var failNext: Set<String> = []
        var delay: TimeInterval = 0
        let lock = NSLock()
        init() throws { base = try Fixtures.model(Fixtures.url("tiny/hf").path).weights }
        func load(_ name: String) throws -> LoraAdapter {
            lock.lock()
            loads.append(name)
            let fail = failNext.remove(name) != nil
            lock.unlock()
            if delay > 0 { Thread.sleep(forTimeInterval: delay) }
            if fail { throw AdapterError.malformed(path: name, reason: "injected failure") }
            return try PEFTAdapter(directory: Fixtures.url("tiny/adapters/all7").path).load(name: name, base: base)
        }
        var loadCount: Int { lock.lock(); defer { lock.unlock() }; return loads.count }
    }

    /// Runs `body` on `n` fresh threads at once (not GCD, which may start them late).
    func onThreads(_ n: Int, _ body: @escaping @Sendable () -> Void) -> Bool {
        let group = DispatchGroup()
        for _ in 0..<n {
            group.enter()
            Thread.detachNewThread { body(); group.leave() }
        }
        return group.wait(timeout: .now() + 20) == .success
    }

    func makeCache(_ src: Source, budget: Int = 1 << 30, count: Int = 3, roomTimeout: TimeInterval = 0.2) -> AdapterCache {
        AdapterCache(budgetBytes: budget, maxCount: count, roomTimeout: roomTimeout) { try src.load($0) }
    }

    func testHitsMissesAndLRUEvictionOrder() throws {
        let src = try Source()
        let cache = makeCache(src)
        for n in ["a", "b", "c"] { try cache.acquire(n).release() }
        try cache.acquire("a").release()            // a is now most recent; b is least
        try cache.acquire("d").release()            // evicts b
        XCTAssertFalse(cache.isResident("b"))
        XCTAssertTrue(cache.isResident("a") && cache.isResident("c") && cache.isResident("d"))
        try cache.acquire("e").release()            // evicts c
        XCTAssertFalse(cache.isResident("c"))
        let s = cache.statistics
        XCTAssertEqual(s.hits, 1); XCTAssertEqual(s.misses, 5); XCTAssertEqual(s.evictions, 2); XCTAssertEqual(s.residentCount, 3)
        XCTAssertEqual(src.loadCount, 5)
    }

    func testByteBudgetBoundsResidentBytes() throws {
        let src = try Source()
        let one = try src.load("probe").residentBytes
        let cache = makeCache(src, budget: one * 2 + one / 2, count: 100)
        for i in 0..<8 {
            try cache.acquire("x\(i)").release()
            XCTAssertLessThanOrEqual(cache.statistics.residentBytes, cache.budgetBytes)
        }
        XCTAssertGreaterThan(cache.statistics.evictions, 0)
        XCTAssertThrowsError(try makeCache(src, budget: 100).acquire("big")) { e in
            guard case AdapterError.tooLarge = e else { return XCTFail("\(e)") }
        }
    }

    func testPinnedAdaptersSurvivePressure() throws {
        let src = try Source()
        let cache = makeCache(src, count: 2)
        let pinA = try cache.acquire("a")
        let pinB = try cache.acquire("b")
        XCTAssertThrowsError(try cache.acquire("c")) { e in
            guard case AdapterError.cacheFull = e else { return XCTFail("\(e)") }
        }
        XCTAssertTrue(cache.isResident("a") && cache.isResident("b"))
        // The pinned adapter's memory stays valid and usable.
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let gen = try Generator(model: model, tokenizer: nil, cacheBytes: 1 << 20)
        XCTAssertEqual(try gen.generate(promptIds: [1, 2, 3], params: SamplingParams(maxTokens: 4), adapter: pinA.adapter).tokenIds.count, 4)
        pinB.release()
        try cache.acquire("c").release()                 // evicts b, not the pinned a
        XCTAssertTrue(cache.isResident("a")); XCTAssertFalse(cache.isResident("b"))
        pinA.release()
        XCTAssertEqual(cache.totalPins, 0)
    }

    func testALoadWaitsForAPinToBeReleased() throws {
        let src = try Source()
        let cache = makeCache(src, count: 1, roomTimeout: 10)
        let pin = try cache.acquire("a")
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.3) { pin.release() }
        let t0 = Date()
        try cache.acquire("b").release()  // waits for "a" to be unpinned, then evicts it
        XCTAssertGreaterThan(Date().timeIntervalSince(t0), 0.25)
        XCTAssertTrue(cache.isResident("b")); XCTAssertFalse(cache.isResident("a"))
    }

    func testConcurrentFirstRequestsLoadOnce() throws {
        let src = try Source()
        src.delay = 0.2
        let cache = makeCache(src)
        let adapters = Collector<ObjectIdentifier>()
        XCTAssertTrue(onThreads(8) {
            if let l = try? cache.acquire("cold") {
                adapters.add(ObjectIdentifier(l.adapter))
                l.release()
            }
        })
        XCTAssertEqual(src.loadCount, 1)
        XCTAssertEqual(adapters.all.count, 8)
        XCTAssertEqual(Set(adapters.all).count, 1)
        XCTAssertEqual(cache.statistics.misses, 1); XCTAssertEqual(cache.statistics.hits, 7)
    }

    func testFailedLoadReachesEveryWaiterAndDoesNotPoison() throws {
        let src = try Source()
        src.delay = 0.5
        src.failNext = ["flaky"]
        let cache = makeCache(src)
        let errors = Collector<Int>()
        XCTAssertTrue(onThreads(6) {
            do { try cache.acquire("flaky").release() } catch { errors.add(1) }
        })
        XCTAssertEqual(errors.all.count, 6)
        XCTAssertEqual(src.loadCount, 1)
        XCTAssertEqual(cache.statistics.failedLoads, 1)
        src.delay = 0
        XCTAssertNoThrow(try cache.acquire("flaky").release(), "the next request loads afresh")
        XCTAssertEqual(src.loadCount, 2)
    }

    func testInvalidateWaitsForPins() throws {
        let src = try Source()
        let cache = makeCache(src)
        let lease = try cache.acquire("a")
        cache.invalidate("a")
        XCTAssertFalse(cache.isResident("a"), "new requests do not see it")
        XCTAssertEqual(cache.statistics.residentCount, 1, "still held by the lease")
        lease.release()
        lease.release()  // idempotent
        XCTAssertEqual(cache.statistics.residentCount, 0)
        try cache.acquire("a").release()
        XCTAssertEqual(src.loadCount, 2)
    }

    func testAsyncAcquire() async throws {
        let src = try Source()
        let cache = makeCache(src)
        let l = try await cache.acquire("async")
        XCTAssertEqual(l.adapter.name, "async")
        l.release()
    }
}

final class AdapterRegistryTests: XCTestCase {
    var root: URL!
    override func setUpWithError() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-reg-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: Fixtures.url("tiny/adapters/qv"), to: root.appendingPathComponent("qv"))
        _ = try PackedAdapter.pack(peftDirectory: Fixtures.url("tiny/adapters/all7").path, to: root.appendingPathComponent("all7.lora").path)
        try "not an adapter".write(to: root.appendingPathComponent("notes.txt"), atomically: true, encoding: .utf8)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: root) }

    func testScanRegistersPEFTDirsAndLoraFiles() throws {
        let reg = try AdapterRegistry(roots: [root.path])
        let (names, _) = reg.scan()
        XCTAssertEqual(names.sorted(), ["all7", "qv"])
        XCTAssertEqual(reg.lookup("all7")?.isPacked, true)
        XCTAssertEqual(reg.lookup("qv")?.isPacked, false)
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        for e in reg.all { XCTAssertNoThrow(try AdapterLoader.load(path: e.path, name: e.name, base: model.weights)) }
    }

    func testPathTricksAreRefused() throws {
        let reg = try AdapterRegistry(roots: [root.path])
        for bad in ["../qv", "a/b", "..", ".hidden", "", String(repeating: "x", count: 200), "q v", "qv\u{0}"] {
            XCTAssertThrowsError(try reg.register(name: bad), "name \(bad.debugDescription)") { e in
                guard case AdapterError.invalidName = e else { return XCTFail("\(e)") }
            }
        }
        // A path outside the roots, directly or through a symlink inside them.
        let outside = FileManager.default.temporaryDirectory.appendingPathComponent("loramux-out-\(UUID().uuidString)")
        try FileManager.default.copyItem(at: Fixtures.url("tiny/adapters/qv"), to: outside)
        defer { try? FileManager.default.removeItem(at: outside) }
        XCTAssertThrowsError(try reg.register(name: "evil", path: outside.path)) { e in
            guard case AdapterError.outsideRoots = e else { return XCTFail("\(e)") }
        }
        try FileManager.default.createSymbolicLink(at: root.appendingPathComponent("link"), withDestinationURL: outside)
        XCTAssertThrowsError(try reg.register(name: "link")) { e in
            guard case AdapterError.outsideRoots = e else { return XCTFail("\(e)") }
        }
        XCTAssertThrowsError(try reg.register(name: "x", path: root.appendingPathComponent("../../etc").path))
        XCTAssertThrowsError(try reg.register(name: "notes", path: root.appendingPathComponent("notes.txt").path))
        XCTAssertThrowsError(try reg.register(name: "missing"))
        XCTAssertNil(reg.lookup("evil"))
    }

    func testRegisterUnregisterAndReplace() throws {
        let reg = try AdapterRegistry(roots: [root.path])
        try reg.register(name: "mine", path: root.appendingPathComponent("qv").path)
        XCTAssertThrowsError(try reg.register(name: "mine", path: root.appendingPathComponent("all7.lora").path))
        XCTAssertNoThrow(try reg.register(name: "mine", path: root.appendingPathComponent("all7.lora").path, replace: true))
        XCTAssertEqual(reg.lookup("mine")?.isPacked, true)
        XCTAssertTrue(reg.unregister("mine"))
        XCTAssertFalse(reg.unregister("mine"))
    }
}
