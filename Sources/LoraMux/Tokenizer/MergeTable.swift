/// Pair → (rank, merged id), open addressing over packed 64-bit keys.
struct MergeTable: Sendable {
    struct Entry: Sendable { var key: UInt64; var rank: Int32; var merged: Int32 }
    private var slots: [Entry]
    private let mask: Int
    private static let empty = UInt64.max

    init(capacity: Int) {
        var size = 16
        while size < capacity * 2 { size <<= 1 }
        slots = [Entry](repeating: Entry(key: Self.empty, rank: 0, merged: 0), count: size)
        mask = size - 1
    }

    @inline(__always)
    private static func key(_ a: Int32, _ b: Int32) -> UInt64 {
        UInt64(UInt32(bitPattern: a)) << 32 | UInt64(UInt32(bitPattern: b))
    }

    @inline(__always)
    private func slot(_ k: UInt64) -> Int {
        var h = k &* 0x9E37_79B9_7F4A_7C15
        h ^= h >> 29
        return Int(truncatingIfNeeded: h) & mask
    }

    /// Later duplicates replace earlier ones, as HF's merge map does.
    mutating func insert(left: Int32, right: Int32, rank: Int32, merged: Int32) {
        let k = Self.key(left, right)
        var i = slot(k)
        while slots[i].key != Self.empty && slots[i].key != k { i = (i + 1) & mask }
        slots[i] = Entry(key: k, rank: rank, merged: merged)
    }

    @inline(__always)
    func lookup(_ a: Int32, _ b: Int32) -> (rank: Int32, merged: Int32)? {
        guard a >= 0, b >= 0 else { return nil }
        let k = Self.key(a, b)
        var i = slot(k)
        return slots.withUnsafeBufferPointer { s in
            while true {
                let e = s[i]
                if e.key == k { return (e.rank, e.merged) }
                if e.key == Self.empty { return nil }
                i = (i + 1) & mask
            }
        }
    }
}

/// Binary min-heap of packed (rank << 32 | position) keys.
struct MinHeap {
    private var a: [UInt64] = []

    mutating func push(_ v: UInt64) {
        a.append(v)
        var i = a.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            if a[p] <= a[i] { break }
            a.swapAt(p, i)
            i = p
        }
    }

    mutating func pop() -> UInt64? {
        guard let last = a.popLast() else { return nil }
        guard !a.isEmpty else { return last }
        let top = a[0]
        a[0] = last
        var i = 0
        let n = a.count
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < n && a[l] < a[m] { m = l }
            if r < n && a[r] < a[m] { m = r }
            if m == i { break }
            a.swapAt(i, m)
            i = m
        }
        return top
    }
}
