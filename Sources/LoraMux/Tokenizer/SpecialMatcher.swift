/// Leftmost-longest matcher for added tokens over Unicode scalars (a trie).
struct SpecialMatcher: Sendable {
    private struct Node: Sendable {
        var children: [UInt32: Int32] = [:]
        var id: Int32 = -1
        var depth: Int = 0
    }
    private var nodes: [Node] = [Node()]
    /// First scalars of all tokens below U+0080, as a bitmap, for a fast reject.
    private var asciiFirst: (UInt64, UInt64) = (0, 0)

    var isEmpty: Bool { nodes[0].children.isEmpty }

    init(tokens: [(String, Int32)]) {
        for (text, id) in tokens {
            var n = 0
            for u in text.unicodeScalars {
                if let c = nodes[n].children[u.value] {
                    n = Int(c)
                } else {
                    nodes.append(Node(children: [:], id: -1, depth: nodes[n].depth + 1))
                    nodes[n].children[u.value] = Int32(nodes.count - 1)
                    n = nodes.count - 1
                }
            }
            // The lowest id wins for a spelling listed twice.
            if n != 0 && nodes[n].id < 0 { nodes[n].id = id }
        }
        for first in nodes[0].children.keys where first < 128 {
            if first < 64 { asciiFirst.0 |= 1 << UInt64(first) } else { asciiFirst.1 |= 1 << UInt64(first - 64) }
        }
    }

    /// The longest added token starting at `i`: (length in scalars, id).
    @inline(__always)
    func match(_ s: UnsafeBufferPointer<UInt32>, at i: Int) -> (Int, Int32)? {
        let first = s[i]
        if first < 64 {
            if asciiFirst.0 & (1 << UInt64(first)) == 0 { return nil }
        } else if first < 128 {
            if asciiFirst.1 & (1 << UInt64(first - 64)) == 0 { return nil }
        }
        var n = 0
        var best: (Int, Int32)?
        var j = i
        while j < s.count, let c = nodes[n].children[s[j]] {
            n = Int(c)
            j += 1
            if nodes[n].id >= 0 { best = (nodes[n].depth, nodes[n].id) }
        }
        return best
    }
}
