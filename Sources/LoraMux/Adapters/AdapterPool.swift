import Foundation
import Synchronization

/// First-fit bookkeeping over a region of `size` bytes, in whole granules,
/// with neighbouring free ranges merged on release. No memory of its own:
/// offsets only, so it is tested on its own.
struct RegionAllocator {
    let size: Int
    let granule: Int
    /// Free ranges, sorted by offset, disjoint and never adjacent.
    private(set) var free: [(offset: Int, length: Int)]

    init(size: Int, granule: Int = 4096) {
        precondition(granule > 0 && size >= 0)
        self.granule = granule
        self.size = size / granule * granule
        free = self.size > 0 ? [(0, self.size)] : []
    }

    var freeBytes: Int { free.reduce(0) { $0 + $1.length } }

    func rounded(_ bytes: Int) -> Int { (bytes + granule - 1) / granule * granule }

    /// The offset of `bytes` (rounded up to granules) at the lowest address
    /// that fits, or nil.
    mutating func allocate(_ bytes: Int) -> Int? {
        guard bytes > 0 else { return nil }
        let n = rounded(bytes)
        guard let i = free.firstIndex(where: { $0.length >= n }) else { return nil }
        let off = free[i].offset
        if free[i].length == n { free.remove(at: i) } else { free[i] = (off + n, free[i].length - n) }
        return off
    }

    /// Gives back what `allocate(bytes)` returned at `offset`.
    mutating func release(offset: Int, bytes: Int) {
        let n = rounded(bytes)
        precondition(offset >= 0 && offset % granule == 0 && offset + n <= size, "range outside the region")
        let i = free.firstIndex(where: { $0.offset > offset }) ?? free.count
        precondition(i == 0 || free[i - 1].offset + free[i - 1].length <= offset, "released twice")
        precondition(i == free.count || offset + n <= free[i].offset, "released twice")
        var range = (offset: offset, length: n)
        var at = i
        if at > 0, free[at - 1].offset + free[at - 1].length == offset {
            at -= 1
            range = (free[at].offset, free[at].length + n)
            free.remove(at: at)
        }
        if at < free.count, range.offset + range.length == free[at].offset {
            range.length += free[at].length
            free.remove(at: at)
        }
        free.insert(range, at: at)
    }
}

/// A region of adapter memory on 2 MB pages (HugePageRegion), faulted in
/// once, from which adapters' arenas are cut (S-LoRA keeps adapter weights in
/// one preallocated pool for the same reasons). Every decode step streams
/// each row's adapter: 313 MB a step at batch-32 `distinct` (rank 16, all
/// seven projections); on 2 MB pages the fused LoRA kernel ran 6-12 % faster
/// (`loramux bench-kernel`). Per-load huge pages were not an option: faulting
/// fresh 2 MB pages inside a load gave 40-50 ms cold-load tails
/// (docs/BENCHMARKS.md), and the pool's pages are faulted before loads need
/// them. An arena that does not fit (the pool full or fragmented) comes from
/// the heap as before.
public final class AdapterPool: Sendable {
    private struct State: ~Copyable {
        var alloc: RegionAllocator
        var inUse = 0
    }

    private let region: HugePageRegion
    private let state: Mutex<State>
    /// The pool's size (the request rounded up to 2 MB).
    public var bytes: Int { region.bytes }

    /// Nil if the mapping fails.
    public init?(bytes: Int, prefault: Prefault) {
        guard let r = HugePageRegion(bytes: bytes, prefault: prefault) else { return nil }
        region = r
        state = Mutex(State(alloc: RegionAllocator(size: r.bytes)))
    }

    /// `bytes` of zero or stale content, 4 KB-aligned, or nil when no free range is large enough.
    public func allocate(_ bytes: Int) -> UnsafeMutableRawPointer? {
        let off: Int? = state.withLock { s in
            guard let o = s.alloc.allocate(bytes) else { return nil }
            s.inUse += s.alloc.rounded(bytes)
            return o
        }
        return off.map { region.base + $0 }
    }

    public func contains(_ p: UnsafeRawPointer) -> Bool { region.contains(p) }

    /// Returns what `allocate(bytes)` gave.
    public func release(_ p: UnsafeRawPointer, bytes: Int) {
        precondition(contains(p), "pointer outside the pool")
        state.withLock { s in
            s.alloc.release(offset: p - UnsafeRawPointer(region.base), bytes: bytes)
            s.inUse -= s.alloc.rounded(bytes)
        }
    }

    /// Bytes held by arenas (in whole 4 KB pages).
    public var bytesInUse: Int { state.withLock { $0.inUse } }
}
