// swift-tools-version:6.0
// A package that uses AttentionKit as any other package would: through its product alone, with
// none of the root package's build flags. Scripts/check-consumer.sh builds and runs it and checks
// that the executable does not link LAPACKE (only `attn` needs it). Not part of the root package:
// the root declares its targets explicitly, so this folder is invisible to it.
import PackageDescription

let package = Package(
  name: "AttentionKitConsumer",
  dependencies: [
    .package(name: "attn", path: "../..")
  ],
  targets: [
    .executableTarget(
      name: "consumer",
      dependencies: [.product(name: "AttentionKit", package: "attn")]
    )
  ]
)
