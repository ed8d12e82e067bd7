#if canImport(Glibc)
import Glibc
#endif
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

/// A region of adapter memory on 2 MB pages, faulted in once, from which
/// adapters' arenas are cut (S-LoRA keeps adapter weights in one
/// preallocated pool for the same reasons). Every decode step streams each
/// row's adapter: 313 MB a step at batch-32 `distinct` (rank 16, all seven
/// projections), one TLB miss per 4 KB page on ordinary pages; on 2 MB pages
/// the fused LoRA kernel ran ~8 % faster (`loramux bench-kernel`). Per-load
/// huge pages were not an option: faulting fresh 2 MB pages inside a load
/// gave 40-50 ms cold-load tails (docs/BENCHMARKS.md), and the pool's pages
/// are faulted before any load needs them. An arena that does not fit (the
/// pool full or fragmented) comes from the heap as before.
public final class AdapterPool: Sendable {
    public enum Prefault: Sendable {
        /// Fault every page before returning (benchmarks: nothing left for the timed part).
        case now
        /// Fault the pages on a background thread, lowest addresses first, where
        /// first fit puts the first arenas (servers: no wait at start).
        case background
    }

    private struct State: ~Copyable {
        var alloc: RegionAllocator
        var inUse = 0
    }

    private let base: Int  // address of the region's first byte (2 MB-aligned)
    private let mapping: (address: Int, bytes: Int)
    public let bytes: Int
    private let state: Mutex<State>

    /// Maps `bytes` (rounded up to 2 MB) and asks for huge pages. Nil if the
    /// mapping fails.
    public init?(bytes: Int, prefault: Prefault) {
        let huge = 2 << 20
        guard bytes > 0 else { return nil }
        let size = (bytes + huge - 1) / huge * huge
        let len = size + huge  // room to align the start
        guard let raw = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              raw != UnsafeMutableRawPointer(bitPattern: -1) else { return nil }
        let start = (Int(bitPattern: raw) + huge - 1) / huge * huge
        // Without transparent huge pages (or with them off) this fails and the
        // pool still works on 4 KB pages: only the TLB gain is lost.
        _ = madvise(UnsafeMutableRawPointer(bitPattern: start), size, MADV_HUGEPAGE)
        base = start
        mapping = (Int(bitPattern: raw), len)
        self.bytes = size
        state = Mutex(State(alloc: RegionAllocator(size: size)))
        switch prefault {
        case .now:
            // Nothing else can see the region yet, so plain writes may do
            // where the kernel cannot populate.
            if !Self.populate(start, size) {
                let p = UnsafeMutablePointer<UInt8>(bitPattern: start)!
                for off in stride(from: 0, to: size, by: 4096) { p[off] = 0 }
            }
        case .background:
            // Without MADV_POPULATE_WRITE the pages fault when loads first write them.
            let t = Thread { [self] in _ = Self.populate(base, self.bytes) }  // holds the pool until done
            t.qualityOfService = .utility
            t.start()
        }
    }

    deinit { munmap(UnsafeMutableRawPointer(bitPattern: mapping.address), mapping.bytes) }

    // Faults the pages in, 2 MB at a time from the lowest address, without
    // writing to them (MADV_POPULATE_WRITE, Linux 5.14): it may run while
    // loads fill arenas it has already handed out, where a write of its own
    // would overwrite theirs. False where the kernel lacks it.
    private static func populate(_ start: Int, _ size: Int) -> Bool {
        let step = 2 << 20
        for off in stride(from: 0, to: size, by: step) {
            if madvise(UnsafeMutableRawPointer(bitPattern: start + off), min(step, size - off), MADV_POPULATE_WRITE) != 0 {
                return false
            }
        }
        return true
    }

    /// `bytes` of zero or stale content, 4 KB-aligned, or nil when no free range is large enough.
    public func allocate(_ bytes: Int) -> UnsafeMutableRawPointer? {
        let off: Int? = state.withLock { s in
            guard let o = s.alloc.allocate(bytes) else { return nil }
            s.inUse += s.alloc.rounded(bytes)
            return o
        }
        return off.map { UnsafeMutableRawPointer(bitPattern: base + $0)! }
    }

    public func contains(_ p: UnsafeRawPointer) -> Bool {
        let a = Int(bitPattern: p)
        return a >= base && a < base + bytes
    }

    /// Returns what `allocate(bytes)` gave.
    public func release(_ p: UnsafeRawPointer, bytes: Int) {
        precondition(contains(p), "pointer outside the pool")
        state.withLock { s in
            s.alloc.release(offset: Int(bitPattern: p) - base, bytes: bytes)
            s.inUse -= s.alloc.rounded(bytes)
        }
    }

    /// Bytes held by arenas (in whole 4 KB pages).
    public var bytesInUse: Int { state.withLock { $0.inUse } }
}
