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
    private var free: [Int32]

    public var freeBlocks: Int { free.count }
    public var usedBlocks: Int { numBlocks - free.count }

    public static func bytesPerBlock(config: LlamaConfig, blockSize: Int) -> Int {
        2 * config.numLayers * blockSize * config.kvDim * MemoryLayout<Float>.size
    }

    /// A cache of at most `budgetBytes` (at least one block).
    public convenience init(config: LlamaConfig, budgetBytes: Int, blockSize: Int = 16) throws {
        let per = KVCache.bytesPerBlock(config: config, blockSize: blockSize)
        try self.init(config: config, numBlocks: max(1, budgetBytes / per), blockSize: blockSize)
    }

    public init(config: LlamaConfig, numBlocks: Int, blockSize: Int = 16) throws {
        guard numBlocks > 0, blockSize > 0 else { throw EngineError.invalidArgument("KV cache needs at least one block") }
        self.blockSize = blockSize
        self.numBlocks = numBlocks
        self.numLayers = config.numLayers
        self.kvDim = config.kvDim
        self.blockFloats = config.numLayers * blockSize * config.kvDim
        let total = numBlocks * blockFloats
        // Pages are touched lazily by the kernel, so an unused budget costs no RSS.
        let k = try mmapAnonymous(bytes: total * 4)
        guard let v = try? mmapAnonymous(bytes: total * 4) else {
            munmap(k, total * 4)
            throw EngineError.outOfMemory("KV cache of \(2 * total * 4) bytes")
        }
        kPool = k.assumingMemoryBound(to: Float.self)
        vPool = v.assumingMemoryBound(to: Float.self)
        free = (0..<Int32(numBlocks)).reversed().map { $0 }
    }

    deinit {
        munmap(kPool, numBlocks * blockFloats * 4)
        munmap(vPool, numBlocks * blockFloats * 4)
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

private func mmapAnonymous(bytes: Int) throws -> UnsafeMutableRawPointer {
    let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    guard let p, p != MAP_FAILED else { throw EngineError.outOfMemory("KV cache of \(bytes) bytes") }
    return p
}
