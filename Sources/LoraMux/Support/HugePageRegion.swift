#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// When a region's pages are faulted in.
public enum Prefault: Sendable {
    /// When first written, by whoever writes them.
    case lazily
    /// Before the region is returned (benchmarks: nothing left for the timed part).
    case now
    /// On a background thread, lowest addresses first (servers: no wait at start).
    case background
}

/// Anonymous memory on 2 MB pages where the kernel grants them
/// (`MADV_HUGEPAGE`): what the decode step streams every step (adapters' A
/// and Bᵀ, the KV cache) costs a TLB miss per 4 KB page on ordinary pages.
/// Without transparent huge pages the region still works on 4 KB pages; only
/// that gain is lost.
final class HugePageRegion: @unchecked Sendable {
    static let hugePage = 2 << 20
    /// 2 MB-aligned; `bytes` long (the request rounded up to 2 MB).
    let base: UnsafeMutableRawPointer
    let bytes: Int
    private let mapping: (address: UnsafeMutableRawPointer, bytes: Int)

    /// Nil if the mapping fails.
    init?(bytes: Int, prefault: Prefault) {
        let huge = Self.hugePage
        guard bytes > 0 else { return nil }
        let size = (bytes + huge - 1) / huge * huge
        let len = size + huge  // room to align the start
        guard let raw = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != UnsafeMutableRawPointer(bitPattern: -1) else { return nil }
        base = UnsafeMutableRawPointer(bitPattern: (Int(bitPattern: raw) + huge - 1) / huge * huge)!
        self.bytes = size
        mapping = (raw, len)
        _ = madvise(base, size, MADV_HUGEPAGE)
        switch prefault {
        case .lazily: break
        case .now:
            // Nothing else can see the region yet, so plain writes may do
            // where the kernel cannot populate.
            if !populate() {
                for off in stride(from: 0, to: size, by: 4096) { base.storeBytes(of: 0, toByteOffset: off, as: UInt8.self) }
            }
        case .background:
            // Without MADV_POPULATE_WRITE the pages fault when first written.
            let t = Thread { [self] in _ = populate() }  // holds the region until done
            t.qualityOfService = .utility
            t.start()
        }
    }

    deinit { munmap(mapping.address, mapping.bytes) }

    func contains(_ p: UnsafeRawPointer) -> Bool { p >= UnsafeRawPointer(base) && p < UnsafeRawPointer(base + bytes) }

    // Faults the pages in, 2 MB at a time from the lowest address, without
    // writing to them (MADV_POPULATE_WRITE, Linux 5.14): it may run while the
    // region is in use, where a write of its own would overwrite what others
    // wrote. False where the kernel lacks it.
    private func populate() -> Bool {
        let step = Self.hugePage
        for off in stride(from: 0, to: bytes, by: step) {
            if madvise(base + off, min(step, bytes - off), MADV_POPULATE_WRITE) != 0 { return false }
        }
        return true
    }
}
