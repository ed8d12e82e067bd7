import Foundation

/// A 64-byte aligned, growable f32 scratch buffer owned by the Swift core and
/// lent to kernels as a raw pointer.
final class FloatBuffer {
    private(set) var ptr: UnsafeMutablePointer<Float>
    private(set) var capacity: Int

    init(_ count: Int = 16) {
        capacity = max(count, 16)
        ptr = FloatBuffer.allocate(capacity)
    }

    deinit { ptr.deallocate() }

    /// Pointer to at least `count` floats; contents are not preserved on growth.
    func reserve(_ count: Int) -> UnsafeMutablePointer<Float> {
        if count > capacity {
            ptr.deallocate()
            capacity = max(count, capacity * 3 / 2)
            ptr = FloatBuffer.allocate(capacity)
        }
        return ptr
    }

    private static func allocate(_ n: Int) -> UnsafeMutablePointer<Float> {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: n * 4, alignment: 64)
        return raw.bindMemory(to: Float.self, capacity: n)
    }
}
