import Foundation

/// What a full block holds, for prefix caching: its tokens, the content id of
/// the block before it (0 at position 0) and what computed it (an adapter
/// instance's id, 0 for the base model). By induction a key names the whole
/// prefix up to the block's end. Keys compare tokens exactly, so a hash
/// collision can never hand a sequence another prefix's K/V.
struct BlockKey: Hashable {
    let parent: UInt64
    let salt: UInt64
    let tokens: [Int32]
}

/// The cached blocks that cover the start of a sequence.
public struct PrefixHit: Sendable {
    public var blocks: [Int32] = []
    /// The content id of each block, for `KVCache.register`'s chain.
    public var ids: [UInt64] = []
    /// Blocks among them that no sequence holds: they count as free until taken.
    public var idle = 0
    public init() {}
}

/// Paged KV cache: one pool of fixed-size blocks shared by all sequences.
/// A block holds `blockSize` consecutive positions of one sequence for every
/// layer, laid out as the attention kernel reads it (see kernels.h).
///
/// Prefix caching: a full block can be registered under its `BlockKey`; a
/// later sequence with the same prefix and adapter takes it instead of
/// recomputing it. Blocks are refcounted. A registered block that no sequence
/// holds stays cached but counts as free; when the free list is empty the
/// least recently released one is evicted (tail blocks of a sequence go
/// before the blocks they extend, so chains are cut from the end).
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
    /// Sequences holding each block.
    private var refs: [Int32]
    private var keys: [BlockKey?]
    private var contentIds: [UInt64]
    private var index: [BlockKey: Int32] = [:]
    private var nextContentId: UInt64 = 1
    /// Idle registered blocks as a doubly linked list, least recently released at the head.
    private var prev: [Int32], next: [Int32]
    private var idleHead: Int32 = -1, idleTail: Int32 = -1
    private var idleCount = 0

    /// Blocks a new sequence can have: never used, or cached and idle.
    public var freeBlocks: Int { free.count + idleCount }
    /// Blocks some sequence holds.
    public var usedBlocks: Int { numBlocks - freeBlocks }
    /// Registered blocks, held or idle.
    public var cachedBlocks: Int { index.count }

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
        refs = [Int32](repeating: 0, count: numBlocks)
        keys = [BlockKey?](repeating: nil, count: numBlocks)
        contentIds = [UInt64](repeating: 0, count: numBlocks)
        prev = [Int32](repeating: -1, count: numBlocks)
        next = [Int32](repeating: -1, count: numBlocks)
    }

    public func blocksNeeded(tokens: Int) -> Int { (tokens + blockSize - 1) / blockSize }

    /// Grows `table` so it covers `tokens` positions; false (and no change) when the pool is short.
    public func reserve(_ table: inout [Int32], tokens: Int) -> Bool {
        let need = blocksNeeded(tokens: tokens) - table.count
        if need <= 0 { return true }
        guard need <= freeBlocks else { return false }
        for _ in 0..<need { table.append(take()) }
        return true
    }

    /// Drops the table's hold on each of its blocks; a block no one holds is
    /// free again, or idle in the cache when it is registered.
    public func release(_ table: inout [Int32]) {
        for b in table.reversed() {
            let i = Int(b)
            precondition(refs[i] > 0, "KV block \(b) released more often than taken")
            refs[i] -= 1
            guard refs[i] == 0 else { continue }
            if keys[i] != nil { linkIdle(b) } else { free.append(b) }
        }
        table.removeAll()
    }

    /// The registered blocks that hold the first whole blocks of `tokens`,
    /// within the first `limit` positions, computed with `salt`.
    public func lookup(_ tokens: [Int32], limit: Int, salt: UInt64) -> PrefixHit {
        var hit = PrefixHit()
        guard !index.isEmpty else { return hit }
        var parent: UInt64 = 0
        var i = 0
        while (i + 1) * blockSize <= min(limit, tokens.count) {
            let key = BlockKey(parent: parent, salt: salt, tokens: Array(tokens[(i * blockSize)..<((i + 1) * blockSize)]))
            guard let b = index[key] else { break }
            parent = contentIds[Int(b)]
            hit.blocks.append(b)
            hit.ids.append(parent)
            if refs[Int(b)] == 0 { hit.idle += 1 }
            i += 1
        }
        return hit
    }

    /// Starts an empty table with a lookup's blocks, holding each.
    public func acquire(_ hit: PrefixHit, into table: inout [Int32]) {
        precondition(table.isEmpty, "a prefix starts a table")
        for b in hit.blocks {
            if refs[Int(b)] == 0 { unlinkIdle(b) }
            refs[Int(b)] += 1
        }
        table = hit.blocks
    }

    /// Registers each block of `table` that the first `computed` positions of
    /// `tokens` fill and that is not registered yet. `chain` holds the content
    /// id of each leading block already seen and grows with the new ones. A
    /// block whose content is already cached elsewhere stays private (it is
    /// freed as usual) and the chain goes on from the cached one.
    public func register(_ table: [Int32], tokens: [Int32], computed: Int, salt: UInt64, chain: inout [UInt64]) {
        while (chain.count + 1) * blockSize <= min(computed, tokens.count), chain.count < table.count {
            let i = chain.count
            let key = BlockKey(parent: chain.last ?? 0, salt: salt, tokens: Array(tokens[(i * blockSize)..<((i + 1) * blockSize)]))
            if let other = index[key] {
                chain.append(contentIds[Int(other)])
                continue
            }
            let b = Int(table[i])
            // A registered block in the table came from a lookup of this very key.
            guard keys[b] == nil else { assertionFailure("block \(b) registered under another key"); return }
            keys[b] = key
            index[key] = Int32(b)
            contentIds[b] = nextContentId
            nextContentId += 1
            chain.append(contentIds[b])
        }
    }

    /// A block for a table: a never-used one first, else the least recently
    /// released cached one, which leaves the cache.
    private func take() -> Int32 {
        let b: Int32
        if let f = free.popLast() {
            b = f
        } else {
            b = idleHead
            precondition(b >= 0, "no KV block to take")
            unlinkIdle(b)
            if let k = keys[Int(b)] { index[k] = nil; keys[Int(b)] = nil }
        }
        refs[Int(b)] = 1
        return b
    }

    private func linkIdle(_ b: Int32) {
        prev[Int(b)] = idleTail
        next[Int(b)] = -1
        if idleTail >= 0 { next[Int(idleTail)] = b } else { idleHead = b }
        idleTail = b
        idleCount += 1
    }

    private func unlinkIdle(_ b: Int32) {
        let (p, n) = (prev[Int(b)], next[Int(b)])
        if p >= 0 { next[Int(p)] = n } else { idleHead = n }
        if n >= 0 { prev[Int(n)] = p } else { idleTail = p }
        prev[Int(b)] = -1
        next[Int(b)] = -1
        idleCount -= 1
    }
}
