// swift-tools-version:6.0
import PackageDescription

// CKernels is always built with -O3: the test suite runs in debug, and the hot
// loops must stay fast there too (the Swift core may be unoptimised).
let kernelFlags: [CSetting] = [.unsafeFlags(["-O3", "-fno-math-errno", "-std=gnu11"])]

let package = Package(
    name: "LoraMux",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "LoraMux", targets: ["LoraMux"]),
        .executable(name: "loramux", targets: ["loramux"]),
        .executable(name: "adapterctl", targets: ["adapterctl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS",
                       providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CLZ4", path: "Sources/CLZ4",
                       providers: [.apt(["liblz4-dev"])]),
        .target(name: "CKernels", dependencies: ["CBLAS"], cSettings: kernelFlags,
                linkerSettings: [.linkedLibrary("openblas"), .linkedLibrary("pthread"), .linkedLibrary("m")]),
        .target(name: "LoraMux", dependencies: ["CKernels", "CBLAS", "CLZ4"]),
        .target(name: "LoraMuxServer", dependencies: [
            "LoraMux",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "loramux", dependencies: [
            "LoraMux", "LoraMuxServer",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Client for the server's admin API (adapterctl, tests).
        .target(name: "LoraMuxClient", dependencies: [
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
        ]),
        .executableTarget(name: "adapterctl", dependencies: [
            "LoraMux", "LoraMuxClient",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // The parsers of untrusted input as fuzz targets (ops/fuzz, corpus replay in tests).
        .target(name: "LoraMuxFuzz", dependencies: ["LoraMux"]),
        .executableTarget(name: "loramux-fuzz", dependencies: ["LoraMuxFuzz"]),
        .testTarget(name: "CKernelsTests", dependencies: ["CKernels"]),
        .testTarget(name: "LoraMuxClientTests", dependencies: ["LoraMuxClient"]),
        .testTarget(name: "LoraMuxServerTests", dependencies: [
            "LoraMuxServer", "LoraMux", "LoraMuxClient",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
        ]),
        .testTarget(name: "LoraMuxTests", dependencies: ["LoraMux", "CKernels", "LoraMuxFuzz"]),
    ]
)
