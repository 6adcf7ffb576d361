// swift-tools-version:6.0
// The package as a table of contents: what users depend on, what it is built from, how it is
// tested. The folder of each target has a README saying what it holds and what it promises.
import PackageDescription

let package = Package(
  name: "attn",
  products: [
    // MARK: - Public API
    // Attention kernels, masks, dropout, relative positions and layers on OpenBLAS. Re-exports
    // `Tensors`, so `import AttentionKit` is all a program needs to compute attention.
    .library(name: "AttentionKit", targets: ["AttentionKit"]),
    // Checking any attention result against a float64 reference: forward, gradients, layers,
    // relative positions, dropout statistics; one error-bound policy; the explain steps and the
    // power-law fit. For your own kernels too (CUDA, Metal, a new CPU kernel).
    .library(name: "AttentionVerification", targets: ["AttentionVerification"]),
    // Reading and writing `.npy` and safetensors files, with no BLAS dependency.
    .library(name: "TensorIO", targets: ["TensorIO"]),
    // The command-line tool: the notebook's exercises, bench, and your own tensors.
    .executable(name: "attn", targets: ["attn"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
  ],
  targets: [
    // MARK: - Public API
    // `Tensor`, `AttentionError` and the message helpers every other target shares.
    .target(name: "Tensors", exclude: ["README.md"]),
    // `.npy` and safetensors readers and writers, JSON header parsing, half precision, atomic
    // file output. The fuzz targets (Tests/Fuzz) build against this target alone.
    .target(name: "TensorIO", dependencies: ["Tensors"], exclude: ["README.md"]),
    // The attention library: one entry point (`Attention.scaledDotProduct`), its kernels, steps,
    // relative positions, layers and random numbers.
    .target(name: "AttentionKit", dependencies: ["Tensors", "CBLAS"], exclude: ["README.md"]),

    // Checks of results the library did not compute, with sound and sharp bounds; depends on
    // AttentionKit and LAPACKE (the least-squares fit), never on TensorIO or ArgumentParser.
    .target(
      name: "AttentionVerification",
      dependencies: ["AttentionKit", "Tensors", "CLAPACKE"],
      exclude: ["README.md"]
    ),

    // MARK: - Implementation details
    // OpenBLAS (cblas_sgemm), found through Debian's openblas.pc.
    .systemLibrary(
      name: "CBLAS",
      path: "Sources/CBLAS",
      pkgConfig: "openblas",
      providers: [.apt(["libopenblas-dev"])]
    ),
    // LAPACKE (dgels) for the power-law fits; a package using AttentionKit alone does not link it.
    .systemLibrary(
      name: "CLAPACKE",
      path: "Sources/CLAPACKE",
      pkgConfig: "lapacke",
      providers: [.apt(["liblapacke-dev"])]
    ),
    // The `attn` command: subcommands, options, verification, rendering.
    .executableTarget(
      name: "attn",
      dependencies: [
        "AttentionKit",
        "AttentionVerification",
        "TensorIO",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ],
      exclude: ["README.md"]
    ),

    // MARK: - Tests
    // Tolerances (one γₙ), fixture loading and the committed fixtures, shared by the test targets.
    .target(
      name: "_TestSupport",
      dependencies: ["AttentionKit", "TensorIO"],
      path: "Tests/_TestSupport",
      exclude: ["Fixtures", "README.md"]
    ),
    .testTarget(name: "TensorIOTests", dependencies: ["TensorIO", "_TestSupport"]),
    // DropoutTests measure masks with the binomial bound of AttentionVerification.
    .testTarget(
      name: "AttentionKitTests",
      dependencies: ["AttentionKit", "AttentionVerification", "_TestSupport"]),
    .testTarget(
      name: "AttentionVerificationTests",
      dependencies: ["AttentionVerification", "AttentionKit", "TensorIO", "_TestSupport"]),
    .testTarget(
      name: "attnTests",
      dependencies: ["attn", "AttentionKit", "AttentionVerification", "TensorIO", "_TestSupport"],
      // Expected `--explain` texts, read from the source tree by ExplainTests.
      exclude: ["Golden"]
    ),
  ]
)
