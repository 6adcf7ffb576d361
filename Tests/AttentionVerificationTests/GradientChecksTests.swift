import Foundation
import Testing
import _TestSupport

@testable import AttentionKit
@testable import AttentionVerification

/// `GradientChecks` is sound on a randomized corpus of 30 problems (`Corpus.gradients`: negative
/// and tiny scales, rows peaked by `σ(Q, K) = 3` — a score spread of about 30, where the `dS`
/// row-sum check once failed —, grouped-query heads, keep and bias masks with fully masked rows,
/// both causal alignments with `Tq ≠ Tk`, a window, `D = 1`, dropout) for AttentionKit's
/// materialized and tiled backward kernels, for the textbook backward in plain float32 loops, and
/// for the float64 reference's gradients rounded once to float32; and sharp on planted bugs.
///
/// Tolerances: none of the test's own. The three checks of `GradientChecks.run` decide:
/// `matches_reference` (each element within the per-element bound of `GradientBounds`, derived in
/// `ReferenceGradients`' comment: the score error through the softmax, `Δ` and `dS`, then the sums
/// of `dQ`, `dK`, `dV`, `d(bias)`), `ds_rows_sum_to_zero` (the float64 reference's own
/// cancellation, `4·γ⁽⁶⁴⁾_{2Tk+Dv+8}·Σ_j P·(|dP| + |Δ|)`) and `finite_differences` (the kernel's
/// bound plus the difference's own error `10⁻⁶·(1 + |g|)`). A correct kernel must pass all three;
/// `dQ` scaled by `1 + 10·min_e(bound_e / |dQ_e|)` (ten bounds at the element whose bound is
/// relatively smallest), or by 1.001, one element of `dQ`, `dK`, `dV` or `d(bias)` moved by 8
/// bounds, or `dK` and `dV` swapped must fail; the element moved by half a bound must pass.
@Suite("Gradient checks are sound and sharp")
struct GradientChecksTests {
  enum Kernel: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case materialized, tiledDefault, tiledSmall, naiveFloat32, roundedReference

    var kernel: Attention.Kernel {
      switch self {
      case .materialized: return .materialized
      case .tiledSmall: return .tiled(TiledAttention.Configuration(queryBlock: 4, keyBlock: 8))
      default: return .tiled(TiledBackward.defaultConfiguration)
      }
    }

    /// The candidate's gradients; `checks` holds the float64 reference.
    func gradients(_ problem: AttentionProblem, _ dO: Tensor, _ checks: GradientChecks) throws
      -> AttentionGradients
    {
      switch self {
      case .naiveFloat32: return try GradientChecksTests.naiveFloat32(problem, dO)
      case .roundedReference: return try GradientChecksTests.rounded(checks.reference, problem)
      default: return try GradientChecksTests.gradients(problem, dO, kernel: kernel)
      }
    }

    var testDescription: String {
      switch self {
      case .materialized: return "materialized backward"
      case .tiledDefault: return "tiled backward, default blocks"
      case .tiledSmall: return "tiled backward, 4 × 8 blocks"
      case .naiveFloat32: return "plain float32 loops, exp and divide, gradual underflow"
      case .roundedReference: return "float64 reference rounded to float32"
      }
    }
  }

  static func gradients(
    _ problem: AttentionProblem, _ dO: Tensor, kernel: Attention.Kernel
  ) throws -> AttentionGradients {
    try Attention.backward(
      queries: problem.queries, keys: problem.keys, values: problem.values, gradOutput: dO,
      mask: problem.mask, scale: problem.scale, dropout: problem.dropout, kernel: kernel,
      needBiasGradient: problem.mask.bias != nil)
  }

  static func checks(_ problem: AttentionProblem, _ dO: Tensor, seed: UInt64) throws
    -> GradientChecks
  {
    try GradientChecks(
      queries: problem.queries, keys: problem.keys, values: problem.values, gradOutput: dO,
      mask: problem.mask, dropout: problem.dropout, needBiasGradient: problem.mask.bias != nil,
      seed: seed, scale: problem.scale)
  }

  /// The float64 reference's gradients, each rounded once to float32.
  static func rounded(_ reference: ReferenceGradients, _ problem: AttentionProblem) throws
    -> AttentionGradients
  {
    func tensor(_ values: [Double], _ shape: [Int]) throws -> Tensor {
      try Tensor(shape: shape, scalars: values.map { Float($0) })
    }
    return AttentionGradients(
      dQ: try tensor(reference.dQ, problem.queries.shape),
      dK: try tensor(reference.dK, problem.keys.shape),
      dV: try tensor(reference.dV, problem.values.shape),
      dBias: try reference.dBias.map { try tensor($0, problem.mask.bias!.shape) },
      workspaceBytes: 0, kernel: .reference)
  }

  /// The backward in plain float32 loops, row by row, as a textbook (or PyTorch's math backend)
  /// computes it: `P_j = exp(s_j − m) / Σ e` (gradual underflow), `O = Σ_j P_j·z_j·v_j`,
  /// `dP_j = z_j·dO·v_j`, `Δ = dO·O`, `dS_j = P_j·(dP_j − Δ)`, then `dQ += scale·dS_j·k_j`,
  /// `dK_j += scale·dS_j·q`, `dV_j += P_j·z_j·dO`, `d(bias) = dS` (the bias given whole,
  /// `[B, H, Tq, Tk]`).
  static func naiveFloat32(_ problem: AttentionProblem, _ dO: Tensor) throws
    -> AttentionGradients
  {
    let shape = try problem.shape()
    let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
    let mask = try ResolvedMask(problem.mask, batchShape: shape.batchShape, queries: tq, keys: tk)
    let scale = shape.resolvedScale(problem.scale)
    let (q, k, v) = (problem.queries.scalars, problem.keys.scalars, problem.values.scalars)
    var dQ = [Float](repeating: 0, count: q.count)
    var dK = [Float](repeating: 0, count: k.count)
    var dV = [Float](repeating: 0, count: v.count)
    var dS = [Float](repeating: 0, count: shape.batchCount * tq * tk)
    for b in 0..<shape.batchCount {
      let kv = shape.keyRowOffset(b)
      for i in 0..<tq {
        let row = b * tq + i
        var s = [Float](repeating: 0, count: tk)
        for j in 0..<tk {
          var dot: Float = 0
          for c in 0..<d { dot += q[row * d + c] * k[(kv + j) * d + c] }
          s[j] = scale * dot
        }
        s.withUnsafeMutableBufferPointer {
          mask.apply(to: $0.baseAddress!, batch: b, query: i, firstKey: 0, count: tk)
        }
        let m = s.max() ?? -.infinity
        guard m > -.infinity else { continue }
        let e = s.map { Foundation.exp($0 - m) }
        let sum = e.reduce(0, +)
        let p = e.map { $0 / sum }
        let z = (0..<tk).map { j -> Float in
          guard let dropout = problem.dropout else { return 1 }
          return dropout.keeps(row: row, key: j) ? dropout.keptScale : 0
        }
        var o = [Float](repeating: 0, count: dv)
        for j in 0..<tk {
          for c in 0..<dv { o[c] += p[j] * z[j] * v[(kv + j) * dv + c] }
        }
        var delta: Float = 0
        for c in 0..<dv { delta += dO.scalars[row * dv + c] * o[c] }
        for j in 0..<tk where p[j] != 0 {
          var dP: Float = 0
          for c in 0..<dv { dP += dO.scalars[row * dv + c] * v[(kv + j) * dv + c] }
          let ds = p[j] * (z[j] * dP - delta)
          dS[row * tk + j] = ds
          for c in 0..<d {
            dQ[row * d + c] += scale * ds * k[(kv + j) * d + c]
            dK[(kv + j) * d + c] += scale * ds * q[row * d + c]
          }
          for c in 0..<dv { dV[(kv + j) * dv + c] += p[j] * z[j] * dO.scalars[row * dv + c] }
        }
      }
    }
    let bias = problem.mask.bias
    if let bias { precondition(bias.shape == shape.weightsShape, "the bias must be given whole") }
    return AttentionGradients(
      dQ: try Tensor(shape: problem.queries.shape, scalars: dQ),
      dK: try Tensor(shape: problem.keys.shape, scalars: dK),
      dV: try Tensor(shape: problem.values.shape, scalars: dV),
      dBias: try bias.map { try Tensor(shape: $0.shape, scalars: dS) },
      workspaceBytes: 0, kernel: .reference)
  }

  @Test("Every correct gradient of the corpus passes all three checks", arguments: Kernel.allCases)
  func corpusPasses(kernel: Kernel) throws {
    var worst = (ratio: 0.0, place: "")
    var worstRowSum = 0.0
    var failures: [String] = []
    for spec in Corpus.gradients {
      let (problem, dO) = (try spec.problem(), try spec.gradOutput())
      let checks = try Self.checks(problem, dO, seed: spec.seed)
      let g = try kernel.gradients(problem, dO, checks)
      for m in checks.measure(g) where m.worstRatio > worst.ratio {
        worst = (m.worstRatio, "\(m.tensor)\(m.worstAt ?? []) of \(spec)")
      }
      worstRowSum = max(worstRowSum, checks.reference.rowSumOfDSRatio)
      for check in checks.run(g, seed: spec.seed, finiteDifferences: true) where !check.passed {
        failures.append("\(spec): \(check.name) \(check.detail)")
      }
    }
    #expect(
      failures.isEmpty && worst.ratio <= 1,
      """
      \(kernel.testDescription): worst error / bound \(worst.ratio) at \(worst.place), worst dS \
      row sum / bound \(worstRowSum), over \(Corpus.gradients.count) problems; \(failures.count) \
      refused: \(failures.prefix(4))
      """)
    #expect(worst.ratio > 0, "\(kernel.testDescription): every element matched exactly")
  }

  @Test("The gradient corpus has rows with a score spread of about 30")
  func peakedRows() throws {
    var spread = 0.0
    for spec in Corpus.gradients where spec.queryKeyStd > 1 {
      let reference = try spec.problem().reference()
      for b in 0..<reference.shape.batchCount {
        for i in 0..<spec.tq {
          let scores = (0..<spec.tk).map { reference.score(batch: b, query: i, key: $0).score }
            .filter(\.isFinite)
          if let high = scores.max(), let low = scores.min() { spread = max(spread, high - low) }
        }
      }
    }
    #expect(spread >= 25, "largest score spread \(spread)")
  }

  /// Shapes for the planted bugs: grouped-query heads; a keep mask with a negative scale;
  /// a bias (so `d(bias)` is checked) with the bottom-right alignment and `Dv ≠ D`.
  static let bugShapes: [ProblemSpec] = [
    ProblemSpec(category: "GQA 4:2", seed: 21, heads: 4, kvHeads: 2, tq: 9, tk: 13, d: 8, dv: 8),
    ProblemSpec(
      category: "keep, negative scale", seed: 22, batch: 2, tq: 6, tk: 6, d: 16, dv: 16,
      scale: -0.5, keep: .random),
    ProblemSpec(
      category: "bias, causal bottom-right, Dv ≠ D", seed: 23, heads: 2, kvHeads: 1, tq: 12,
      tk: 7, d: 4, dv: 6, bias: .random, causal: .bottomRight),
  ]

  static func matchesReference(_ checks: [Check]) -> Check? {
    checks.first { $0.name == "matches_reference" }
  }

  @Test(
    "dQ scaled by 1 + 10 of its smallest relative bounds, or by 1.001, fails", arguments: bugShapes)
  func scaledDQ(spec: ProblemSpec) throws {
    let (problem, dO) = (try spec.problem(), try spec.gradOutput())
    let g = try Self.gradients(problem, dO, kernel: .tiled(TiledBackward.defaultConfiguration))
    let checks = try Self.checks(problem, dO, seed: spec.seed)
    let (expected, bounds) = (checks.reference.dQ, checks.reference.bounds.dQ)
    let relative = zip(expected, bounds).filter { $0.0 != 0 }.map { $0.1 / abs($0.0) }.min()
    let epsilon = 10 * (try #require(relative))
    for factor in [1 + epsilon, 1.001] {
      var scaled = g
      scaled.dQ.scalars = g.dQ.scalars.map { Float(Double($0) * factor) }
      let dQ = try #require(checks.measure(scaled).first { $0.tensor == "dQ" })
      #expect(!dQ.passed, "\(spec): dQ × \(factor): \(dQ.summary)")
      #expect(
        Self.matchesReference(checks.run(scaled, seed: spec.seed, finiteDifferences: false))?
          .passed == false)
      if factor == 1 + epsilon {
        #expect(abs(dQ.worstRatio - 10) < 1, "\(spec): dQ × (1 + \(epsilon)): \(dQ.summary)")
      }
    }
  }

  @Test(
    "One element of dQ, dK, dV or d(bias) off by 8 bounds fails there; half a bound passes",
    arguments: bugShapes)
  func element(spec: ProblemSpec) throws {
    let (problem, dO) = (try spec.problem(), try spec.gradOutput())
    let g = try Self.gradients(problem, dO, kernel: .tiled(TiledBackward.defaultConfiguration))
    let checks = try Self.checks(problem, dO, seed: spec.seed)
    let reference = checks.reference
    var targets: [(String, WritableKeyPath<AttentionGradients, Tensor>, [Double], [Double])] = [
      ("dQ", \.dQ, reference.dQ, reference.bounds.dQ),
      ("dK", \.dK, reference.dK, reference.bounds.dK),
      ("dV", \.dV, reference.dV, reference.bounds.dV),
    ]
    if let dBias = reference.dBias, let bounds = reference.bounds.dBias, g.dBias != nil {
      targets.append(("dBias", \.dBias!, dBias, bounds))
    }
    for (n, (name, path, expected, bounds)) in targets.enumerated() {
      // An element with a nonzero reference, a different one in each tensor.
      let candidates = expected.indices.filter { expected[$0] != 0 }
      let e = candidates[(candidates.count * (n + 1)) / (targets.count + 1)]
      let sign: Double = n % 2 == 0 ? 1 : -1
      for (multiple, fails) in [(8.0, true), (0.5, false)] {
        var planted = g
        planted[keyPath: path].scalars[e] = Float(expected[e] + sign * multiple * bounds[e])
        let m = try #require(checks.measure(planted).first { $0.tensor == name })
        let verdict = Self.matchesReference(
          checks.run(planted, seed: spec.seed, finiteDifferences: false))
        let at = Tensor.multiIndex(ofFlat: e, shape: g[keyPath: path].shape)
        #expect(
          m.passed != fails && verdict?.passed != fails,
          "\(spec): \(name)\(at) off by \(multiple) bounds: \(m.summary)")
        if fails {
          #expect(
            m.worstAt == at && abs(m.worstRatio - multiple) < 0.5,
            "\(spec): \(name)\(at) off by 8 bounds: \(m.summary)")
        }
      }
    }
  }

  @Test("dK and dV swapped fail", arguments: bugShapes.filter { $0.d == $0.dv })
  func swappedKeyValueGradients(spec: ProblemSpec) throws {
    let (problem, dO) = (try spec.problem(), try spec.gradOutput())
    let g = try Self.gradients(problem, dO, kernel: .materialized)
    let checks = try Self.checks(problem, dO, seed: spec.seed)
    var swapped = g
    (swapped.dK, swapped.dV) = (g.dV, g.dK)
    let measurements = checks.measure(swapped)
    let verdict = Self.matchesReference(
      checks.run(swapped, seed: spec.seed, finiteDifferences: true))
    #expect(
      verdict?.passed == false
        && measurements.filter { !$0.passed }.map(\.tensor).sorted() == ["dK", "dV"],
      "\(spec): \(measurements.map(\.summary))")
  }
}
