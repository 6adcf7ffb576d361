import AttentionKit
import Foundation
import Testing
import _TestSupport

/// `TorchGenerator` and `MT19937` against PyTorch's own numbers, the fixtures of
/// `Scripts/fixtures/make_torch_fixtures.py` (its docstring is the schema).
///
/// Every drawn value is compared bit for bit, with no tolerance: both kernels reproduce the
/// arithmetic of PyTorch's builds operation for operation (the C library's `logf`, `sinf`,
/// `cosf` for `.scalar`; the Cephes polynomials with GCC's fused multiply-adds for
/// `.vectorized`). A failure names the first differing element and the distance in ulps.
/// Only the module's forward pass (computed, not drawn) is compared with a tolerance,
/// `RelposErrorBounds`.
@Suite("PyTorch's CPU generator")
struct TorchGeneratorTests {
  @Test("MT19937 seeded with 5489 gives 4123659995 as its 10,000th output (C++ [rand.predef])")
  func mersenneTwisterStandardValue() {
    var engine = MT19937(seed: 5489)
    for _ in 1..<10_000 { _ = engine.next() }
    #expect(engine.next() == 4_123_659_995)
  }

  @Test("Every draw matches torch bit for bit", arguments: try TorchFixtures.drawCases())
  func draws(spec: TorchDrawCase) throws {
    var generator = TorchGenerator(seed: spec.seed, kernel: try spec.generatorKernel())
    for (index, step) in spec.steps.enumerated() {
      let observed: Tensor
      switch step.op {
      case "randn": observed = try generator.randn(shape: step.shape)
      case "rand": observed = try generator.rand(shape: step.shape)
      case "uniform":
        observed = try generator.uniform(
          shape: step.shape, low: try #require(step.low), high: try #require(step.high))
      case "normal":
        observed = try generator.normal(
          shape: step.shape, mean: try #require(step.mean), std: try #require(step.std))
      case "bernoulli":
        observed = try generator.bernoulli(shape: step.shape, probability: try #require(step.p))
      default:
        throw FixtureError("\(spec.name): unknown op \(step.op)")
      }
      #expect(observed.shape == step.shape)
      expectBitwiseEqual(
        observed, try TorchFixtures.tensor(step.expected),
        "\(spec.kernel) \(spec.name) step \(index) (\(step.op) \(step.shape))")
    }
  }

  @Test("The kernel matters: PyTorch's builds differ on ≥ 16 normals, agree below 16")
  func kernelsDiffer() throws {
    func fixture(_ kernel: String, _ name: String) throws -> Tensor {
      let found = try TorchFixtures.drawCases().first { $0.kernel == kernel && $0.name == name }
      return try TorchFixtures.tensor(try #require(found?.steps.first).expected)
    }
    // Below 16 elements both builds take the same double path.
    let small = try ["vectorized", "scalar"].map { try fixture($0, "randn_seed42_n15") }
    #expect(small[0].scalars.map(\.bitPattern) == small[1].scalars.map(\.bitPattern))
    // From 16 on, the same uniforms go through different float math: the results differ, but
    // only by rounding. θ = 2π·u is a float product in one, a rounded double product in the
    // other (|Δθ| ≤ 2π·2⁻²⁴), and ln, sin, cos differ by a few ulps, so with r ≤ √(48 ln 2) ≈ 5.8
    // the normals differ by at most about r·2π·2⁻²⁴ + a few ulps ≈ 3·10⁻⁶.
    let large = try ["vectorized", "scalar"].map { try fixture($0, "randn_seed42_n1000") }
    let pairs = zip(large[0].scalars, large[1].scalars)
    let differing = pairs.filter { $0.bitPattern != $1.bitPattern }.count
    #expect(differing > 0, "the two builds' fixtures are identical: the kernel would not matter")
    let worst = pairs.map { abs(Double($0) - Double($1)) }.max() ?? .infinity
    #expect(worst <= 3e-6, "the builds differ by up to \(worst): not the same uniforms")
    var generator = TorchGenerator(seed: 42, kernel: .scalar)
    let mismatched = try generator.randn(shape: [1000])
    #expect(mismatched.scalars.map(\.bitPattern) != large[0].scalars.map(\.bitPattern))
  }

  @Test(
    "Exercise 1: Q, K, V and the dropout mask are the notebook's",
    arguments: ["vectorized", "scalar"])
  func exercise1Inputs(kernel: String) throws {
    let spec = try TorchFixtures.exercise1(kernel: kernel)
    var generator = TorchGenerator(seed: spec.seed, kernel: try generatorKernel(kernel))
    // torch.manual_seed(42); Q = torch.randn(1, 4, 8); K = …; V = …
    for (name, ref) in [("Q", spec.q), ("K", spec.k), ("V", spec.v)] {
      let observed = try generator.randn(shape: ref.shape)
      expectBitwiseEqual(observed, try TorchFixtures.tensor(ref), "\(kernel) exercise 1 \(name)")
    }
    // F.dropout(weights, p=0.1, training=True) draws its mask next: bernoulli_(1 − p).
    let keep = try TorchFixtures.tensor(spec.training.keep)
    let mask = try generator.bernoulli(shape: keep.shape, probability: 1 - spec.training.p)
    expectBitwiseEqual(mask, keep, "\(kernel) exercise 1 dropout mask")
  }

  @Test(
    "RelativePositionAttention(64, 16) after manual_seed(42): parameters, then x",
    arguments: ["vectorized", "scalar"])
  func relposParameters(kernel: String) throws {
    let spec = try TorchFixtures.relpos(kernel: kernel)
    var generator = TorchGenerator(seed: spec.seed, kernel: try generatorKernel(kernel))
    let module = try RelativePositionAttention.torchInitialized(
      modelDim: spec.modelDim, maxDistance: spec.maxDistance,
      generator: &generator)
    let parameters = module.stateDict.tensors
    #expect(Set(parameters.keys) == Set(spec.parameters.keys))
    for (name, ref) in spec.parameters.sorted(by: { $0.key < $1.key }) {
      let observed = try #require(parameters[name], "no parameter \(name)")
      expectBitwiseEqual(observed, try TorchFixtures.tensor(ref), "\(kernel) \(name)")
    }
    // x = torch.randn(2, 20, 64), drawn after the construction.
    let x = try generator.randn(shape: spec.x.shape)
    expectBitwiseEqual(x, try TorchFixtures.tensor(spec.x), "\(kernel) x")
  }

  @Test("RelativePositionAttention(64, 16): the forward pass matches torch's float64 one")
  func relposForward() throws {
    let spec = try TorchFixtures.relpos(kernel: "vectorized")
    var generator = TorchGenerator(seed: spec.seed)
    let module = try RelativePositionAttention.torchInitialized(
      modelDim: spec.modelDim, maxDistance: spec.maxDistance,
      generator: &generator)
    let x = try generator.randn(shape: spec.x.shape)
    let result = try module(x)
    let weights = try #require(result.weights)
    let bounds = RelposErrorBounds(module: module, x: x, keeps: { _, _, _ in true })
    let ratios = bounds.worstRatios(
      output: result.output, weights: weights,
      expectedOutput: try TorchFixtures.doubles(try #require(spec.outputF64)),
      expectedWeights: try TorchFixtures.doubles(try #require(spec.attentionF64)))
    #expect(ratios.weights <= 1, "attention error / bound = \(ratios.weights)")
    #expect(ratios.output <= 1, "output error / bound = \(ratios.output)")
  }

  @Test("The notebook top to bottom: exercise 3's module after exercises 1 and 2's draws")
  func notebookOrder() throws {
    let spec = try TorchFixtures.manifest().relposNotebookOrder
    var generator = TorchGenerator(seed: spec.seed)
    // Exercise 1: Q, K, V (3 × 32 elements, ≥ 16: one draw each) and the dropout mask on the
    // [1, 4, 4] weights (two draws each).
    for _ in 0..<3 { _ = try generator.randn(shape: [1, 4, 8]) }
    _ = try generator.bernoulli(shape: [1, 4, 4], probability: 0.9)
    // Exercise 2: torch.randn(1, n, n) for n = 128 … 2048, only drawn: n² draws each (a multiple
    // of 16, so no redraw), and no cached normal involved. Skipping them is far faster.
    let lengths = [128, 256, 512, 1024, 2048]
    let skipped = lengths.map { $0 * $0 }.reduce(0, +)
    #expect(3 * 32 + 2 * 16 + skipped == spec.drawsBeforeModule)
    for _ in 0..<skipped { _ = generator.random() }
    let module = try RelativePositionAttention.torchInitialized(
      modelDim: 64, maxDistance: 16, generator: &generator)
    let parameters = module.stateDict
    for (name, ref) in spec.firstRows.sorted(by: { $0.key < $1.key }) {
      let tensor = try #require(parameters[name], "no parameter \(name)")
      let width = tensor.shape[1]
      let row = try Tensor(shape: [width], scalars: Array(tensor.scalars[0..<width]))
      expectBitwiseEqual(row, try TorchFixtures.tensor(ref), "notebook order: \(name)[0]")
    }
    let x = try generator.randn(shape: [2, 20, 64])
    let firstRow = try Tensor(shape: [64], scalars: Array(x.scalars[0..<64]))
    expectBitwiseEqual(
      firstRow, try TorchFixtures.tensor(spec.xFirstRow), "notebook order: x[0, 0]")
  }

  @Test("Invalid arguments throw, as PyTorch's checks do")
  func invalidArguments() {
    var generator = TorchGenerator(seed: 0)
    #expect(throws: AttentionError.self) { try generator.uniform(shape: [3], low: 1, high: 0) }
    #expect(throws: AttentionError.self) {
      try generator.uniform(shape: [3], low: -.infinity, high: 0)
    }
    #expect(throws: AttentionError.self) { try generator.normal(shape: [3], mean: 0, std: -1) }
    #expect(throws: AttentionError.self) { try generator.normal(shape: [3], mean: 0, std: .nan) }
    #expect(throws: AttentionError.self) { try generator.bernoulli(shape: [3], probability: 1.5) }
    #expect(throws: AttentionError.self) { try generator.randn(shape: [-1, 2]) }
  }
}

// MARK: - Comparison

/// Records one issue if any element differs in its bits from `expected` (so `-0` ≠ `+0`), naming
/// the count, the first differing element and the largest distance in ulps.
private func expectBitwiseEqual(
  _ observed: Tensor, _ expected: Tensor, _ label: String,
  sourceLocation: SourceLocation = #_sourceLocation
) {
  guard observed.shape == expected.shape else {
    Issue.record(
      "\(label): shape \(observed.shape), expected \(expected.shape)",
      sourceLocation: sourceLocation)
    return
  }
  let differing = observed.scalars.indices.filter {
    observed.scalars[$0].bitPattern != expected.scalars[$0].bitPattern
  }
  guard let first = differing.first else { return }
  let worst = differing.map { ulpDistance(observed.scalars[$0], expected.scalars[$0]) }.max() ?? 0
  let message =
    "\(label): \(differing.count) of \(observed.count) elements differ; first at "
    + "\(Tensor.multiIndex(ofFlat: first, shape: expected.shape)): expected \(expected.scalars[first]), "
    + "observed \(observed.scalars[first]); worst \(worst) ulp"
  Issue.record("\(message)", sourceLocation: sourceLocation)
}

private func generatorKernel(_ name: String) throws -> TorchGenerator.Kernel {
  guard let kernel = TorchGenerator.Kernel(rawValue: name) else {
    throw FixtureError("unknown kernel \(name) in the torch fixtures")
  }
  return kernel
}

// MARK: - Fixtures

/// `Tests/_TestSupport/Fixtures/torch`: `manifest.json` decoded, and the `.npy` files it names.
enum TorchFixtures {
  static let folder = Fixtures.folder("torch")

  static func manifest() throws -> TorchManifest { try cachedManifest.get() }

  private static let cachedManifest: Result<TorchManifest, any Error> = Result {
    try Fixtures.manifest(
      in: folder, as: TorchManifest.self, schemaVersion: \.schemaVersion,
      script: "Scripts/fixtures/make_torch_fixtures.py")
  }

  static func drawCases() throws -> [TorchDrawCase] { try manifest().draws }

  static func exercise1(kernel: String) throws -> TorchExercise1 {
    guard let found = try manifest().exercise1.first(where: { $0.kernel == kernel }) else {
      throw FixtureError("no exercise1 entry for kernel \(kernel)")
    }
    return found
  }

  static func relpos(kernel: String) throws -> TorchRelpos {
    guard let found = try manifest().relpos.first(where: { $0.kernel == kernel }) else {
      throw FixtureError("no relpos entry for kernel \(kernel)")
    }
    return found
  }

  static func path(_ file: String) -> String { folder.appendingPathComponent(file).path }

  /// A `<f4` or `|b1` array as a tensor (booleans as 1 and 0), with the manifest's shape and dtype.
  static func tensor(_ ref: FileRef) throws -> Tensor { try loadTensor(ref, in: folder) }

  /// A `<f8` array at full precision, with the manifest's shape and dtype.
  static func doubles(_ ref: FileRef) throws -> [Double] { try loadDoubles(ref, in: folder) }
}

struct TorchManifest: Decodable, Sendable {
  var schemaVersion: Int
  var torchVersion: String
  var draws: [TorchDrawCase]
  var exercise1: [TorchExercise1]
  var relpos: [TorchRelpos]
  var relposNotebookOrder: TorchNotebookOrder

  enum CodingKeys: String, CodingKey {
    case schemaVersion = "schema_version"
    case torchVersion = "torch_version"
    case draws, exercise1, relpos
    case relposNotebookOrder = "relpos_notebook_order"
  }
}

/// `manual_seed(seed)`, then `steps` in order on one generator.
struct TorchDrawCase: Decodable, Sendable, CustomTestStringConvertible {
  struct Step: Decodable, Sendable {
    var op: String
    var shape: [Int]
    var low: Double?
    var high: Double?
    var mean: Double?
    var std: Double?
    var p: Double?
    var expected: FileRef
  }

  var name: String
  var kernel: String
  var seed: UInt64
  var steps: [Step]

  var testDescription: String { "\(kernel) \(name)" }

  func generatorKernel() throws -> TorchGenerator.Kernel {
    try AttentionKitTests.generatorKernel(kernel)
  }
}

struct TorchExercise1: Decodable, Sendable {
  struct Training: Decodable, Sendable {
    var p: Double
    var keep: FileRef
  }

  var kernel: String
  var seed: UInt64
  var q: FileRef
  var k: FileRef
  var v: FileRef
  var training: Training
}

struct TorchRelpos: Decodable, Sendable {
  var kernel: String
  var seed: UInt64
  var modelDim: Int
  var maxDistance: Int
  var parameters: [String: FileRef]
  var x: FileRef
  var outputF64: FileRef?
  var attentionF64: FileRef?

  enum CodingKeys: String, CodingKey {
    case kernel, seed, parameters, x
    case modelDim = "d_model"
    case maxDistance = "max_relative_position"
    case outputF64 = "output_f64"
    case attentionF64 = "attention_f64"
  }
}

struct TorchNotebookOrder: Decodable, Sendable {
  var seed: UInt64
  var drawsBeforeModule: Int
  var firstRows: [String: FileRef]
  var xFirstRow: FileRef

  enum CodingKeys: String, CodingKey {
    case seed
    case drawsBeforeModule = "draws_before_module"
    case firstRows = "first_rows"
    case xFirstRow = "x_first_row"
  }
}
