import Foundation
import CKernels
import Synchronization

/// Element type of adapter matrices in memory (what the LoRA kernel reads).
public enum AdapterDType: String, Sendable, Codable {
    case f32, f16

    var kernel: Int32 { self == .f32 ? Int32(LM_F32) : Int32(LM_F16) }
    var size: Int { self == .f32 ? 4 : 2 }
}

/// One projection's LoRA pair in kernel layout: A (rank, in) and B^T (rank, out),
/// both inside the adapter's arena.
public struct LoraModule: @unchecked Sendable {
    public let rank: Int
    public let inFeatures: Int
    public let outFeatures: Int
    public let scale: Float
    public let dtype: AdapterDType
    let a: UnsafeRawPointer
    let bT: UnsafeRawPointer
    /// DoRA: magnitude / ||W + scale·B·A|| per output row, precomputed at load.
    let dora: UnsafePointer<Float>?
}

extension LoraModule {
    /// This module as a kernel segment over rows [row0, row0 + rows).
    public func kernelSegment(row0: Int, rows: Int) -> lm_lora_seg {
        lm_lora_seg(row0: Int64(row0), n_rows: Int64(rows), A: a, BT: bT, dora: dora, rank: Int32(rank), dtype: dtype.kernel, scale: scale)
    }
}

/// LoRA on the input embedding: delta(token) = scale · B · A[:, token].
public struct EmbeddingLora: @unchecked Sendable {
    public let rank: Int
    public let vocab: Int
    public let hidden: Int
    public let scale: Float
    let aT: UnsafePointer<Float>   // (vocab, rank): A transposed, one row per token
    let bT: UnsafePointer<Float>   // (rank, hidden)
}

/// A full per-adapter replacement matrix from PEFT's modules_to_save.
public struct ReplacedMatrix: @unchecked Sendable {
    public let rows: Int
    public let cols: Int
    public let dtype: AdapterDType
    let data: UnsafeRawPointer
}

/// A loaded adapter, validated against one base model. All matrices live in
/// one 64-byte aligned arena owned by this object, laid out as the kernels
/// read them; it is freed only when the last reference goes away, so a batch
/// that holds the adapter can never see its memory freed.
public final class LoraAdapter: @unchecked Sendable {
    public let name: String
    public let source: String
    public let config: LoraConfig
    /// modules[layer][Projection.rawValue]
    public let modules: [[LoraModule?]]
    public let embedding: EmbeddingLora?
    public let embedOverride: ReplacedMatrix?
    public let lmHeadOverride: ReplacedMatrix?
    public let residentBytes: Int
    /// Unique in the process, never reused.
    public let instanceId: UInt64 = LoraAdapter.nextId()
    /// What the KV prefix cache keys this adapter's blocks by: the same for
    /// every load of the same unchanged files (an adapter evicted and loaded
    /// again finds its prefixes), different for anything else. Adapters not
    /// loaded from files use their `instanceId`.
    public let prefixSalt: UInt64
    private static let instances = Atomic<UInt64>(0)
    private static func nextId() -> UInt64 { instances.add(1, ordering: .relaxed).newValue }
    private let arena: ArenaBlock

    /// One salt per content key, drawn from the instance counter so it never
    /// equals an `instanceId`. Forgetting the table only costs prefix misses.
    private static let salts = Mutex<[AdapterContentKey: UInt64]>([:])
    static func salt(for key: AdapterContentKey) -> UInt64 {
        salts.withLock { table in
            if let s = table[key] { return s }
            if table.count >= 1 << 16 { table.removeAll() }
            let s = nextId()
            table[key] = s
            return s
        }
    }

    init(name: String, source: String, config: LoraConfig, modules: [[LoraModule?]], embedding: EmbeddingLora?,
         embedOverride: ReplacedMatrix?, lmHeadOverride: ReplacedMatrix?, arena: ArenaBlock, content: AdapterContentKey? = nil) {
        self.name = name
        self.source = source
        self.config = config
        self.modules = modules
        self.embedding = embedding
        self.embedOverride = embedOverride
        self.lmHeadOverride = lmHeadOverride
        self.arena = arena
        self.residentBytes = arena.bytes
        self.prefixSalt = content.map(Self.salt(for:)) ?? instanceId
    }

    deinit { arena.free() }

    /// Whether the adapter's matrices live in an AdapterPool (on 2 MB pages where the kernel grants them).
    public var pooled: Bool { arena.pool != nil }

    public var moduleCount: Int { modules.reduce(0) { $0 + $1.compactMap { $0 }.count } }
    /// Trainable parameters (A, B, magnitudes, embedding LoRA, replaced matrices).
    public var parameterCount: Int {
        var n = 0
        for row in modules { for m in row.compactMap({ $0 }) { n += m.rank * (m.inFeatures + m.outFeatures) + (m.dora != nil ? m.outFeatures : 0) } }
        if let e = embedding { n += e.rank * (e.vocab + e.hidden) }
        for r in [embedOverride, lmHeadOverride].compactMap({ $0 }) { n += r.rows * r.cols }
        return n
    }
}

/// Adapter memory: one block per adapter, from the process's AdapterPool
/// when one is installed and has room, else from the heap. (Asking the heap's
/// pages to be huge made cold loads slower: with THP defrag=madvise the
/// kernel compacts memory in the fault path. The pool faults its pages before
/// loads need them.)
public enum Arena {
    private static let current = Mutex<AdapterPool?>(nil)

    /// Serves later arenas from `pool` (nil: the heap). Arenas already cut
    /// from a previous pool go back to it, which lives until they do.
    public static func install(_ pool: AdapterPool?) { current.withLock { $0 = pool } }

    public static var installed: AdapterPool? { current.withLock { $0 } }

    static func allocate(_ bytes: Int) -> ArenaBlock {
        if let pool = installed, let p = pool.allocate(bytes) { return ArenaBlock(pointer: p, bytes: bytes, pool: pool) }
        return ArenaBlock(pointer: UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64), bytes: bytes, pool: nil)
    }
}

/// One adapter's memory and where it came from.
struct ArenaBlock: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let bytes: Int
    let pool: AdapterPool?

    func free() {
        if let pool { pool.release(pointer, bytes: bytes) } else { pointer.deallocate() }
    }
}

/// Bump allocator for building an adapter's arena.
struct ArenaBuilder {
    private(set) var size = 0
    mutating func reserve(_ bytes: Int) -> Int {
        let off = (size + 63) & ~63
        size = off + bytes
        return off
    }
}

/// What an adapter was built from, for sharing its KV prefixes between loads:
/// every file read (its identity and the CRC-32C of the bytes used) and how it
/// was converted. Equal keys mean the same unchanged files converted the same
/// way; a file changed between two loads differs in identity, and in its CRC
/// unless it was rewritten within one timestamp tick to bytes of equal CRC.
public struct AdapterContentKey: Hashable, Sendable {
    var kind: String
    var files: [FileIdentity?]
    var crcs: [UInt32]
}
