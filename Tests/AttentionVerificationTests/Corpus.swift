import AttentionKit
import AttentionVerification
import Foundation
import Testing

/// Random attention problems for the soundness and sharpness suites, reproducible from a seed:
/// every shape, scale and mask is drawn from `Philox4x32`, every input from
/// `Tensor.randomNormal`/`randomUniform` (no system randomness).
///
/// A `ProblemSpec` names what the problem exercises (negative, tiny or large scales, `D = 1`,
/// `Dv ≠ D`, grouped-query heads, keep and bias masks, fully masked rows, both causal alignments
/// with `Tq ≠ Tk`, windows, `Tk = 1`, dropout); `problem()` builds the tensors.
struct ProblemSpec: Sendable, CustomStringConvertible, CustomTestStringConvertible {
  enum Keep: String, Sendable {
    /// About 30% of the keys masked, independently per `(b, h, i, j)`.
    case random
    /// The same 30% over `[Tq, Tk]`, broadcast to every batch and head.
    case broadcast
    /// Random, and every third query row masked whole.
    case fullyMaskedRows
  }

  enum Bias: String, Sendable {
    /// Normal values (σ = 1), about 15% of them `−∞`.
    case random
    /// Random, and every third query row all `−∞`.
    case fullyMaskedRows
    /// Normal values with σ = 30 over `[1, H, Tq, Tk]`: rows peaked by the bias, not the scores.
    case large
  }

  var category: String
  var seed: UInt64
  var batch = 1
  var heads = 1
  var kvHeads = 1
  var tq = 8
  var tk = 8
  var d = 8
  var dv = 8
  /// `nil`: the default `1/√D`.
  var scale: Float?
  /// Standard deviations of Q and K, and of V.
  var queryKeyStd: Float = 1
  var valueStd: Float = 1
  var keep: Keep?
  var bias: Bias?
  var causal: CausalAlignment?
  var window: Int?
  var dropout: Float?

  var description: String {
    var parts = [
      "\(category) #\(seed): B \(batch) H \(heads)/\(kvHeads) Tq \(tq) Tk \(tk) D \(d) Dv \(dv)"
    ]
    if let scale { parts.append("scale \(scale)") }
    if queryKeyStd != 1 { parts.append("σ(Q, K) \(queryKeyStd)") }
    if let keep { parts.append("keep \(keep.rawValue)") }
    if let bias { parts.append("bias \(bias.rawValue)") }
    if let causal { parts.append("causal \(causal.rawValue)") }
    if let window { parts.append("window \(window)") }
    if let dropout { parts.append("dropout \(dropout)") }
    return parts.joined(separator: ", ")
  }

  var testDescription: String { description }

  var queryShape: [Int] { [batch, heads, tq, d] }
  var keyShape: [Int] { [batch, kvHeads, tk, d] }
  var valueShape: [Int] { [batch, kvHeads, tk, dv] }
  var outputShape: [Int] { [batch, heads, tq, dv] }

  func queries() throws -> Tensor {
    try Tensor.randomNormal(
      shape: queryShape, std: queryKeyStd, seed: seed, stream: RandomStream.queries)
  }

  func keys() throws -> Tensor {
    try Tensor.randomNormal(
      shape: keyShape, std: queryKeyStd, seed: seed, stream: RandomStream.keys)
  }

  func values() throws -> Tensor {
    try Tensor.randomNormal(
      shape: valueShape, std: valueStd, seed: seed, stream: RandomStream.values)
  }

  /// `dO`, for the gradient suites.
  func gradOutput() throws -> Tensor {
    try Tensor.randomNormal(shape: outputShape, seed: seed, stream: RandomStream.gradOutput)
  }

  func mask() throws -> AttentionMask {
    var mask = AttentionMask(
      isCausal: causal != nil, causalAlignment: causal ?? .topLeft, window: window)
    if let keep {
      let shape = keep == .broadcast ? [tq, tk] : [batch, heads, tq, tk]
      let u = try Tensor.randomUniform(shape: shape, seed: seed, stream: 6)
      var scalars = u.scalars.map { $0 < 0.3 ? Float(0) : 1 }
      if keep == .fullyMaskedRows {
        for row in stride(from: 0, to: scalars.count / tk, by: 3) {
          for j in 0..<tk { scalars[row * tk + j] = 0 }
        }
      }
      mask.keep = try Tensor(shape: shape, scalars: scalars)
    }
    if let bias {
      let shape = bias == .large ? [1, heads, tq, tk] : [batch, heads, tq, tk]
      let std: Float = bias == .large ? 30 : 1
      var scalars = try Tensor.randomNormal(shape: shape, std: std, seed: seed, stream: 7).scalars
      if bias != .large {
        let u = try Tensor.randomUniform(shape: shape, seed: seed, stream: 8)
        for e in scalars.indices where u.scalars[e] < 0.15 { scalars[e] = -.infinity }
      }
      if bias == .fullyMaskedRows {
        for row in stride(from: 1, to: scalars.count / tk, by: 3) {
          for j in 0..<tk { scalars[row * tk + j] = -.infinity }
        }
      }
      mask.bias = try Tensor(shape: shape, scalars: scalars)
    }
    return mask
  }

  func problem() throws -> AttentionProblem {
    AttentionProblem(
      queries: try queries(), keys: try keys(), values: try values(), mask: try mask(),
      scale: scale, dropout: try dropout.map { try Dropout(probability: $0, seed: seed) })
  }
}

/// Uniform draws from `Philox4x32` for one corpus case: word 0 of the blocks
/// `(major: case, minor: 0, 1, 2, …)` on a stream no input uses.
struct CaseDraws {
  let rng: Philox4x32
  let major: UInt64
  var minor: UInt32 = 0

  init(seed: UInt64, index: Int) {
    rng = Philox4x32(seed: seed)
    major = UInt64(index)
  }

  mutating func word() -> UInt32 {
    defer { minor += 1 }
    return rng.block(major: major, minor: minor, stream: 99).0
  }

  /// An integer of `range`, each equally likely (up to 2⁻³² of bias).
  mutating func int(_ range: ClosedRange<Int>) -> Int {
    range.lowerBound + Int((UInt64(word()) * UInt64(range.count)) >> 32)
  }

  mutating func pick<T>(_ options: [T]) -> T { options[int(0...(options.count - 1))] }
}

/// The corpora: categories, each drawn several times with its own shapes.
enum Corpus {
  typealias Category = (
    name: String, adjust: @Sendable (inout ProblemSpec, inout CaseDraws) -> Void
  )

  /// What the forward corpus exercises; each is drawn `forwardDraws` times.
  static let forwardCategories: [Category] = [
    ("plain", { _, _ in }),
    ("scale −1", { s, _ in s.scale = -1 }),
    ("scale −0.05", { s, _ in s.scale = -0.05 }),
    ("scale 1e-6", { s, _ in s.scale = 1e-6 }),
    (
      "peaked ×20",
      { s, _ in
        s.scale = 20 / Float(s.d).squareRoot()
        s.queryKeyStd = 1.5
      }
    ),
    (
      "peaked −×20, keep",
      { s, _ in
        s.scale = -20 / Float(s.d).squareRoot()
        s.queryKeyStd = 1.5
        s.keep = .random
      }
    ),
    ("D = 1", { s, _ in (s.d, s.dv) = (1, 1) }),
    ("D = 1, Dv 7, scale 3", { s, _ in (s.d, s.dv, s.scale) = (1, 7, 3) }),
    ("Dv ≠ D", { s, r in s.dv = r.pick([1, 3, 5, 24, 40].filter { $0 != s.d }) }),
    ("GQA 4:2", { s, _ in (s.heads, s.kvHeads) = (4, 2) }),
    ("GQA 4:1, bias", { s, _ in (s.heads, s.kvHeads, s.bias) = (4, 1, .random) }),
    ("keep", { s, _ in s.keep = .random }),
    ("keep [Tq, Tk]", { s, _ in s.keep = .broadcast }),
    ("bias with −∞", { s, _ in s.bias = .random }),
    ("keep, fully masked rows", { s, _ in s.keep = .fullyMaskedRows }),
    ("bias, fully masked rows", { s, _ in s.bias = .fullyMaskedRows }),
    ("large bias, keep", { s, _ in (s.bias, s.keep) = (.large, .random) }),
    (
      "causal top-left Tq < Tk",
      { s, r in
        (s.tq, s.tk, s.causal) = (r.int(1...12), r.int(14...40), .topLeft)
      }
    ),
    (
      "causal top-left Tq > Tk",
      { s, r in
        (s.tq, s.tk, s.causal) = (r.int(14...24), r.int(1...12), .topLeft)
      }
    ),
    (
      "causal bottom-right Tq < Tk",
      { s, r in
        (s.tq, s.tk, s.causal) = (r.int(1...12), r.int(14...40), .bottomRight)
      }
    ),
    (
      "causal bottom-right Tq > Tk",
      { s, r in
        (s.tq, s.tk, s.causal) = (r.int(14...24), r.int(1...12), .bottomRight)
      }
    ),
    (
      "window",
      { s, r in
        (s.window, s.causal) = (r.int(1...6), r.pick([.topLeft, .bottomRight]))
      }
    ),
    ("Tk = 1", { s, r in (s.tk, s.keep) = (1, r.pick([nil, .random])) }),
    ("Tq = 1", { s, r in (s.tq, s.causal) = (1, r.pick([nil, .bottomRight])) }),
    ("dropout 0.25", { s, _ in s.dropout = 0.25 }),
    (
      "mixed",
      { s, r in
        (s.heads, s.kvHeads) = (4, 2)
        s.scale = r.pick([-1, -0.3, 0.5, 4])
        s.bias = r.pick([.random, .fullyMaskedRows, .large])
        s.causal = .bottomRight
        s.window = r.pick([nil, 3, 9])
        s.dv = r.pick([s.d, 6])
      }
    ),
  ]

  static let forwardDraws = 10

  /// The forward corpus: `forwardCategories` × `forwardDraws` problems (260), shapes drawn
  /// first (`B` 1…2, `H = Hkv` 1…2, `Tq` 1…20, `Tk` 1…40, `D` of 2…32, `Dv = D`), then adjusted.
  static let forward: [ProblemSpec] = draw(forwardCategories, times: forwardDraws, seed: 1_000)

  /// What the gradient corpus exercises, each drawn twice, on smaller shapes.
  static let gradientCategories: [Category] = [
    ("plain", { _, _ in }),
    ("scale −1", { s, _ in s.scale = -1 }),
    ("scale −0.05, Dv ≠ D", { s, _ in (s.scale, s.dv) = (-0.05, 5) }),
    ("peaked (σ(Q, K) 3)", { s, _ in s.queryKeyStd = 3 }),
    (
      "peaked, negative scale, keep",
      { s, _ in (s.queryKeyStd, s.scale, s.keep) = (3, -0.4, .random) }
    ),
    ("GQA 4:2", { s, _ in (s.heads, s.kvHeads) = (4, 2) }),
    ("GQA 4:1, bias", { s, _ in (s.heads, s.kvHeads, s.bias) = (4, 1, .random) }),
    ("keep, fully masked rows", { s, _ in s.keep = .fullyMaskedRows }),
    ("bias, fully masked rows", { s, _ in s.bias = .fullyMaskedRows }),
    (
      "causal top-left Tq ≠ Tk",
      { s, r in
        (s.tq, s.tk) = r.pick([(5, 14), (14, 5)])
        s.causal = .topLeft
      }
    ),
    (
      "causal bottom-right Tq ≠ Tk",
      { s, r in
        (s.tq, s.tk) = r.pick([(5, 14), (14, 5)])
        s.causal = .bottomRight
      }
    ),
    ("window 3, bottom-right", { s, _ in (s.window, s.causal) = (3, .bottomRight) }),
    ("D = 1", { s, _ in (s.d, s.dv) = (1, 1) }),
    ("scale 1e-6", { s, _ in s.scale = 1e-6 }),
    ("dropout 0.2", { s, _ in s.dropout = 0.2 }),
  ]

  /// The gradient corpus: `gradientCategories` × 2 problems (30), `B` 1…2, `H = Hkv` 1…2,
  /// `Tq`, `Tk` 1…16, `D` of 2…16, `Dv = D`, then adjusted.
  static let gradients: [ProblemSpec] = draw(
    gradientCategories, times: 2, seed: 2_000, queries: 1...16, keys: 1...16,
    headDims: [2, 4, 8, 16])

  static func draw(
    _ categories: [Category], times: Int, seed: UInt64, queries: ClosedRange<Int> = 1...20,
    keys: ClosedRange<Int> = 1...40, headDims: [Int] = [2, 3, 4, 8, 16, 32]
  ) -> [ProblemSpec] {
    var specs: [ProblemSpec] = []
    for (c, category) in categories.enumerated() {
      for n in 0..<times {
        let index = c * times + n
        var r = CaseDraws(seed: seed, index: index)
        let heads = r.int(1...2)
        let d = r.pick(headDims)
        var spec = ProblemSpec(
          category: category.name, seed: seed + UInt64(index), batch: r.int(1...2),
          heads: heads, kvHeads: heads, tq: r.int(queries), tk: r.int(keys), d: d, dv: d)
        category.adjust(&spec, &r)
        specs.append(spec)
      }
    }
    return specs
  }
}
