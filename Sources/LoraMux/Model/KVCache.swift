import Foundation

/// Paged KV cache: one pool of fixed-size blocks shared by all sequences.
/// A block holds `blockSize` consecutive positions of one sequence for every
/// layer, laid out as the attention kernel reads it (see kernels.h).
/// Not thread-safe: the engine thread owns it.
public final class KVCache: @unchecked Sendable {
    public let blockSize: Int
    public let numBlocks: Int
    public let numLayers: Int
    public let kvDim: Int
    /// floats per block per pool: layers * blockSize * kvDim
    public let blockFloats: Int
    let kPool: UnsafeMutablePointer<Float>
    let vPool: UnsafeMutablePointer<Float>
    private let region: HugePageRegion
    private var free: [Int32]

    public var freeBlocks: Int { free.count }
    public var usedBlocks: Int { numBlocks - free.count }

    public static func bytesPerBlock(config: LlamaConfig, blockSize: Int) -> Int {
        2 * config.numLayers * blockSize * config.kvDim * MemoryLayout<Float>.size
    }

    /// A cache of at most `budgetBytes` (at least one block).
    public convenience init(config: LlamaConfig, budgetBytes: Int, blockSize: Int = 16, prefault: Prefault = .lazily) throws {
        let per = KVCache.bytesPerBlock(config: config, blockSize: blockSize)
        try self.init(config: config, numBlocks: max(1, budgetBytes / per), blockSize: blockSize, prefault: prefault)
    }

    /// The pool is on 2 MB pages where the kernel grants them (attention reads
    /// every running sequence's blocks at every layer; batch-32 distinct/none
    /// was ~1 % higher than on 4 KB pages, docs/BENCHMARKS.md).
    /// `.lazily`: a block's pages are faulted when it is first written, so an
    /// unused budget costs no RSS; a server that will use it faults it in the
    /// background instead, keeping the faults (and any compaction they wait
    /// for) out of its steps.
    public init(config: LlamaConfig, numBlocks: Int, blockSize: Int = 16, prefault: Prefault = .lazily) throws {
        guard numBlocks > 0, blockSize > 0 else { throw EngineError.invalidArgument("KV cache needs at least one block") }
        self.blockSize = blockSize
        self.numBlocks = numBlocks
        self.numLayers = config.numLayers
        self.kvDim = config.kvDim
        self.blockFloats = config.numLayers * blockSize * config.kvDim
        let half = (numBlocks * blockFloats * 4 + HugePageRegion.hugePage - 1) / HugePageRegion.hugePage * HugePageRegion.hugePage
        guard let r = HugePageRegion(bytes: 2 * half, prefault: prefault) else {
            throw EngineError.outOfMemory("KV cache of \(2 * half) bytes")
        }
        region = r
        kPool = r.base.assumingMemoryBound(to: Float.self)
        vPool = (r.base + half).assumingMemoryBound(to: Float.self)
        free = (0..<Int32(numBlocks)).reversed().map { $0 }
    }

    public func blocksNeeded(tokens: Int) -> Int { (tokens + blockSize - 1) / blockSize }

    /// Grows `table` so it covers `tokens` positions; false (and no change) when the pool is short.
    public func reserve(_ table: inout [Int32], tokens: Int) -> Bool {
        let need = blocksNeeded(tokens: tokens) - table.count
        if need <= 0 { return true }
        guard need <= free.count else { return false }
        for _ in 0..<need { table.append(free.removeLast()) }
        return true
    }

    public func release(_ table: inout [Int32]) {
        free.append(contentsOf: table.reversed())
        table.removeAll()
    }
}
