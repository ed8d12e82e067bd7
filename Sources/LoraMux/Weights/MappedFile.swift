#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import CKernels

/// A read-only memory mapping of a whole file. Weight data is read straight
/// from here; nothing in the weight store copies it into the heap. Views into
/// the mapping hold a reference to this object, so the mapping outlives them.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let base: UnsafeRawPointer
    public let count: Int
    /// The file as opened (nil for `init(copying:)`).
    public let identity: FileIdentity?
    /// CRC-32C of the bytes, when `init(readingWhole:checksum: true)` computed it.
    public let crc32c: UInt32?
    /// Owned heap copy (readingWhole/copying) rather than a mapping.
    private let heap: Bool

    /// Opens `path` read-only and checks it is a non-empty regular file: (fd, size, identity).
    private static func openRegular(_ path: String) throws -> (Int32, Int, FileIdentity) {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else {
            throw WeightError.io(path: path, reason: String(cString: strerror(errno)))
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw WeightError.io(path: path, reason: reason)
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw WeightError.io(path: path, reason: "not a regular file")
        }
        guard st.st_size > 0 else {
            close(fd)
            throw WeightError.malformed(path: path, reason: "file is empty")
        }
        return (fd, Int(st.st_size), FileIdentity(st))
    }

    public init(path: String) throws {
        self.path = path
        let (fd, size, id) = try Self.openRegular(path)
        defer { close(fd) }
        identity = id
        crc32c = nil
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let p, p != MAP_FAILED else {
            throw WeightError.io(path: path, reason: "mmap failed: \(String(cString: strerror(errno)))")
        }
        self.base = UnsafeRawPointer(p)
        self.count = size
        self.heap = false
    }

    /// The whole file read into heap memory. For adapter files: they are small
    /// and read once, and another process may truncate or replace one while it
    /// loads, which must give an error, not the SIGBUS a file-backed mapping
    /// raises when a page past the new end is touched. (Heap, not a fresh
    /// anonymous mapping: the allocator recycles the block between loads, where
    /// a new mapping page-faults every page again — 5x slower cold loads.)
    ///
    /// `checksum` reads in 256 KB pieces and checksums each while it is still
    /// in the core's L2 (a pass over the whole buffer afterwards would stream
    /// it from memory again: ~2 ms for a 20 MB adapter).
    public init(readingWhole path: String, checksum: Bool = false) throws {
        self.path = path
        let (fd, size, id) = try Self.openRegular(path)
        defer { close(fd) }
        identity = id
        let p = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
        let piece = checksum ? 256 << 10 : size
        var crc: UInt32 = 0
        var done = 0
        while done < size {
            let n = pread(fd, p + done, min(piece, size - done), off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                p.deallocate()
                throw WeightError.malformed(path: path, reason: n == 0 ? "file shrank while being read (\(done) of \(size) bytes)"
                                                                       : "read failed: \(String(cString: strerror(errno)))")
            }
            if checksum { crc = lm_crc32c(crc, p + done, n) }
            done += n
        }
        base = UnsafeRawPointer(p)
        count = size
        heap = true
        crc32c = checksum ? crc : nil
    }

    /// A heap copy of `bytes`, named `name` in errors:
    /// lets the readers run on bytes that never touched a file (fuzzing, tests).
    public init(copying bytes: Data, name: String) throws {
        path = name
        identity = nil
        crc32c = nil
        guard !bytes.isEmpty else { throw WeightError.malformed(path: name, reason: "file is empty") }
        let p = UnsafeMutableRawPointer.allocate(byteCount: bytes.count, alignment: 64)
        bytes.copyBytes(to: p.assumingMemoryBound(to: UInt8.self), count: bytes.count)
        base = UnsafeRawPointer(p)
        count = bytes.count
        heap = true
    }

    deinit {
        if heap { UnsafeMutableRawPointer(mutating: base).deallocate() } else { munmap(UnsafeMutableRawPointer(mutating: base), count) }
    }

    /// Bounds-checked view of `length` bytes at `offset`.
    func range(_ offset: Int, _ length: Int, what: @autoclosure () -> String) throws -> UnsafeRawPointer {
        guard offset >= 0, length >= 0, offset <= count, length <= count - offset else {
            throw WeightError.malformed(path: path,
                reason: "\(what()) lies outside the file (offset \(offset), \(length) bytes, file is \(count) bytes)")
        }
        return base + offset
    }
}

/// Which version of which file: device, inode, size and the modification and
/// status-change times. Any write, truncation, rename over or `touch` changes
/// one of them (ctime cannot be set back by a user).
public struct FileIdentity: Hashable, Sendable {
    var device: UInt64, inode: UInt64, size: Int64
    var mtime: Int64, mtimeNsec: Int64, ctime: Int64, ctimeNsec: Int64

    init(_ st: stat) {
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
        size = Int64(st.st_size)
        #if canImport(Darwin)
        let (m, c) = (st.st_mtimespec, st.st_ctimespec)
        #else
        let (m, c) = (st.st_mtim, st.st_ctim)
        #endif
        mtime = Int64(m.tv_sec)
        mtimeNsec = Int64(m.tv_nsec)
        ctime = Int64(c.tv_sec)
        ctimeNsec = Int64(c.tv_nsec)
    }

    /// `stat(2)` of `path`, following links; nil when it fails.
    public init?(path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        self.init(st)
    }
}
