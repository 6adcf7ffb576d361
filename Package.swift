// swift-tools-version:6.0
import PackageDescription

let package = Package(
  name: "attn",
  products: [
    .library(name: "AttentionKit", targets: ["AttentionKit"]),
    .executable(name: "attn", targets: ["attn"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2")
  ],
  targets: [
    // OpenBLAS (cblas_sgemm) and LAPACKE (dgels), found through Debian's openblas.pc.
    .systemLibrary(
      name: "CBLAS",
      path: "Sources/CBLAS",
      pkgConfig: "openblas",
      providers: [.apt(["libopenblas-dev", "liblapacke-dev"])]
    ),
    .target(name: "AttentionKit", dependencies: ["CBLAS"]),
    .executableTarget(
      name: "attn",
      dependencies: [
        "AttentionKit",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]
    ),
    .testTarget(
      name: "AttentionKitTests",
      dependencies: ["AttentionKit"],
      exclude: ["Fixtures"]
    ),
    .testTarget(
      name: "attnTests",
      dependencies: ["attn", "AttentionKit"],
      // Expected `--explain` texts, read from the source tree by ExplainTests.
      exclude: ["Golden"]
    ),
  ]
)
