/// GPT-2's reversible byte ↔ printable-scalar mapping used by byte-level BPE:
/// printable Latin-1 bytes map to themselves, the other 68 to U+0100….
enum ByteLevel {
    /// byte → scalar value.
    static let byteToScalar: [UInt32] = {
        var table = [UInt32](repeating: 0, count: 256)
        var n: UInt32 = 0
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = UInt32(b)
            } else {
                table[b] = 256 + n
                n += 1
            }
        }
        return table
    }()

    /// scalar value → byte, or -1; covers scalars below 512.
    static let scalarToByte: [Int16] = {
        var table = [Int16](repeating: -1, count: 512)
        for (b, s) in byteToScalar.enumerated() { table[Int(s)] = Int16(b) }
        return table
    }()

    /// The vocabulary spelling of raw bytes.
    static func encode<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        var v = String.UnicodeScalarView()
        for b in bytes { v.append(Unicode.Scalar(byteToScalar[Int(b)])!) }
        return String(v)
    }

    /// The raw bytes a vocabulary token stands for, or nil when some scalar
    /// is outside the mapping (HF then uses the token's own UTF-8).
    static func decode(_ token: String) -> [UInt8]? {
        var out: [UInt8] = []
        out.reserveCapacity(token.unicodeScalars.count)
        for u in token.unicodeScalars {
            guard u.value < 512, case let b = scalarToByte[Int(u.value)], b >= 0 else { return nil }
            out.append(UInt8(b))
        }
        return out
    }
}
