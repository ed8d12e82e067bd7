import XCTest
@testable import LoraMux

/// Memory on 2 MB pages: the adapter pool's first-fit bookkeeping, the mapped
/// pool, adapters loaded into it (same outputs as on the heap, memory returned
/// when they go, the heap when the pool has no room), and the KV cache faulted
/// in each way.
final class AdapterPoolTests: XCTestCase {
    func testRegionAllocatorFirstFitAndMerge() {
        var r = RegionAllocator(size: 10 * 4096 + 100, granule: 4096)
        XCTAssertEqual(r.size, 10 * 4096, "whole granules only")
        XCTAssertNil(r.allocate(0))
        let a = r.allocate(1), b = r.allocate(4097), c = r.allocate(3 * 4096), d = r.allocate(4096)
        XCTAssertEqual([a, b, c, d], [0, 4096, 3 * 4096, 6 * 4096], "rounded up to granules, lowest address first")
        XCTAssertEqual(r.freeBytes, 3 * 4096)
        XCTAssertNil(r.allocate(4 * 4096), "no room")
        r.release(offset: 4096, bytes: 4097)  // b: a hole of 2 granules
        XCTAssertEqual(r.allocate(4096), 4096, "first fit takes the hole")
        XCTAssertEqual(r.allocate(3 * 4096), 7 * 4096, "too big for what is left of the hole")
        XCTAssertEqual(r.freeBytes, 4096)
        // In use now (granules): 0, 1, [3, 6), 6, [7, 10); free: [2, 3). Releases
        // that merge on the left, on both sides, and on the left again:
        r.release(offset: 0, bytes: 1)
        r.release(offset: 3 * 4096, bytes: 3 * 4096)  // [2, 3) + [3, 6)
        XCTAssertEqual(r.free.map(\.offset), [0, 2 * 4096])
        XCTAssertEqual(r.free.map(\.length), [4096, 4 * 4096])
        r.release(offset: 4096, bytes: 4096)  // [0, 1) + [1, 2) + [2, 6)
        XCTAssertEqual(r.free.map(\.offset), [0])
        XCTAssertEqual(r.free.map(\.length), [6 * 4096])
        r.release(offset: 7 * 4096, bytes: 3 * 4096)  // not adjacent: [0, 6) and [7, 10)
        XCTAssertEqual(r.free.count, 2)
        r.release(offset: 6 * 4096, bytes: 4096)  // merges on the right too
        XCTAssertEqual(r.free.count, 1, "everything merged back")
        XCTAssertEqual(r.freeBytes, r.size)
        XCTAssertEqual(r.allocate(10 * 4096), 0, "the whole region in one piece again")
    }

    func testPoolCutsArenasAndTakesThemBack() throws {
        let pool = try XCTUnwrap(AdapterPool(bytes: 3 << 20, prefault: .now))
        XCTAssertEqual(pool.bytes, 4 << 20, "rounded up to 2 MB pages")
        let a = try XCTUnwrap(pool.allocate(1 << 20)), b = try XCTUnwrap(pool.allocate(2 << 20))
        XCTAssertTrue(pool.contains(a) && pool.contains(b))
        XCTAssertEqual(Int(bitPattern: a) % (2 << 20), 0, "the region starts on a 2 MB boundary")
        XCTAssertEqual(b - a, 1 << 20)
        XCTAssertNil(pool.allocate((1 << 20) + 1), "1 MB left")
        XCTAssertEqual(pool.bytesInUse, 3 << 20)
        b.storeBytes(of: 0xABCD, as: UInt32.self)  // writable
        pool.release(a, bytes: 1 << 20)
        XCTAssertEqual(pool.allocate(4096), a, "first fit reuses the freed range")
        XCTAssertEqual(pool.bytesInUse, (2 << 20) + 4096)
        XCTAssertFalse(pool.contains(UnsafeRawPointer(bitPattern: 64)!))
    }

    func testAdaptersLoadIntoThePoolWithTheSameOutputs() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let dir = Fixtures.url("tiny/adapters/all7").path
        let ids: [Int32] = [1, 5, 9, 2, 7]
        let previous = Arena.installed
        defer { Arena.install(previous) }

        Arena.install(nil)
        let heap = try PEFTAdapter(directory: dir).load(name: "all7", base: model.weights)
        XCTAssertFalse(heap.pooled)
        let want = try prefillLogits(model, ids, adapter: heap)

        // Faulted in the background while the load fills its arena: the
        // populating must not write over what the load wrote.
        let pool = try XCTUnwrap(AdapterPool(bytes: 64 << 20, prefault: .background))
        Arena.install(pool)
        var pooled: LoraAdapter? = try PEFTAdapter(directory: dir).load(name: "all7", base: model.weights)
        XCTAssertTrue(try XCTUnwrap(pooled).pooled)
        XCTAssertEqual(pool.bytesInUse, (try XCTUnwrap(pooled).residentBytes + 4095) / 4096 * 4096)
        XCTAssertEqual(try prefillLogits(model, ids, adapter: pooled), want, "same bits from pool memory")

        // A pool with no room left: the heap, with the same result.
        let full = try XCTUnwrap(AdapterPool(bytes: 2 << 20, prefault: .now))
        XCTAssertNotNil(full.allocate(full.bytes))
        Arena.install(full)
        let spilled = try PEFTAdapter(directory: dir).load(name: "all7", base: model.weights)
        XCTAssertFalse(spilled.pooled)
        XCTAssertEqual(try prefillLogits(model, ids, adapter: spilled), want)

        // Freed into the pool it came from, although another is installed now.
        pooled = nil
        XCTAssertEqual(pool.bytesInUse, 0)
    }

    func testKVCacheFaultedInEachWayGivesTheSameLogits() throws {
        let model = try Fixtures.model(Fixtures.url("tiny/hf").path)
        let ids: [Int32] = (0..<23).map { Int32(($0 * 7 + 3) % 50) }
        let want = try prefillLogits(model, ids)
        XCTAssertEqual(try prefillLogits(model, ids, kvPrefault: .now), want)
        // Populated in the background while the prefill writes K and V.
        XCTAssertEqual(try prefillLogits(model, ids, kvPrefault: .background), want)
        let c = try KVCache(config: model.config, numBlocks: 3, blockSize: 4, prefault: .now)
        XCTAssertEqual(c.freeBlocks, 3)
    }
}
