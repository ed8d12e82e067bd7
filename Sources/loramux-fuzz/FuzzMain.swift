import Foundation
import LoraMuxFuzz

// Built two ways. Under ops/fuzz (`-sanitize=fuzzer,address -D LORAMUX_LIBFUZZER`)
// libFuzzer's driver runs the target named by $LORAMUX_FUZZ_TARGET. SwiftPM
// links an executable's main to `<module>_main`, so that symbol is ours and
// hands over to LLVMFuzzerRunDriver. In a plain build this is a replayer:
// `loramux-fuzz TARGET FILE|DIR...` runs each input once (reproduce a crash).

#if LORAMUX_LIBFUZZER
let selected: FuzzTarget = {
    let name = ProcessInfo.processInfo.environment["LORAMUX_FUZZ_TARGET"] ?? ""
    guard let t = FuzzTarget(rawValue: name) else {
        fatalError("set LORAMUX_FUZZ_TARGET to one of \(FuzzTarget.allCases.map(\.rawValue))")
    }
    return t
}()

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("loramux_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    selected.prepare()
    return LLVMFuzzerRunDriver(&c, &v) { bytes, count in
        selected.run(bytes.map { Data(bytes: $0, count: count) } ?? Data())
        return 0
    }
}
#else
@main
struct Replay {
    static func main() {
        let args = CommandLine.arguments.dropFirst()
        guard let name = args.first, let target = FuzzTarget(rawValue: name), args.count >= 2 else {
            FileHandle.standardError.write(Data("usage: loramux-fuzz \(FuzzTarget.allCases.map(\.rawValue).joined(separator: "|")) FILE|DIR...\n".utf8))
            exit(2)
        }
        var n = 0
        for path in args.dropFirst() {
            var isDir: ObjCBool = false
            FileManager.default.fileExists(atPath: path, isDirectory: &isDir)
            let files = isDir.boolValue
                ? ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted().map { "\(path)/\($0)" } : [path]
            for f in files {
                guard let d = FileManager.default.contents(atPath: f) else { continue }
                target.run(d)
                n += 1
            }
        }
        print("\(name): \(n) inputs ran without a crash")
    }
}
#endif
