import AttentionKit
import Foundation
import Testing
import _TestSupport

@testable import AttentionVerification

/// `SampledGradientChecks` — what checks gradients past `GradientChecks.referenceScoreLimit` —
/// on small problems, where it works the same (sampled query rows for `dQ`, sampled keys for
/// `dK` and `dV`, through the forward's `O` and log-sum-exp) and runs in milliseconds in a debug
/// build. Each problem has more rows and keys than the 32 sampled, so the samples are a subset.
///
/// Tolerances: none of the test's own. The verdicts are the library's: the forward's `O` within
/// `ReferenceAttention.row`'s bounds and its `L` within `2·max_j δ_ij + γ_{Tk+8} + 2u·|L| + u`;
/// each sampled gradient element within the per-element bound derived in
/// `SampledGradientChecks`' comment. The tiled kernel's gradients (from the tiled forward's `O`
/// and `L`, as FlashAttention's backward takes them) must pass; one element of a sampled `dQ` row
/// or of a sampled key's `dV` moved by 8 of its bounds must fail there, and by half a bound
/// pass. The element's reference value and bound are read from the check itself: the element is
/// first moved far off, and the measurement reports both at its worst element.
@Suite("Sampled gradient checks are sound and sharp")
struct SampledGradientChecksTests {
  static let specs: [ProblemSpec] = [
    ProblemSpec(category: "GQA 4:2", seed: 31, heads: 4, kvHeads: 2, tq: 24, tk: 40, d: 16, dv: 16),
    ProblemSpec(
      category: "causal bottom-right, keep, Dv ≠ D", seed: 32, batch: 2, tq: 20, tk: 31, d: 8,
      dv: 5, keep: .random, causal: .bottomRight),
    ProblemSpec(
      category: "negative scale, bias", seed: 33, heads: 2, kvHeads: 1, tq: 40, tk: 37, d: 4,
      dv: 4, scale: -1, bias: .random),
    ProblemSpec(category: "peaked", seed: 34, tq: 48, tk: 48, d: 16, dv: 16, queryKeyStd: 3),
  ]

  /// The tiled forward (with its log-sum-exp), the tiled backward from its `O` and `L`, and the
  /// sampled checks of the problem.
  static func run(_ spec: ProblemSpec) throws -> (SampledGradientChecks, AttentionGradients) {
    let (problem, dO) = (try spec.problem(), try spec.gradOutput())
    let forward = try Attention.scaledDotProduct(
      queries: problem.queries, keys: problem.keys, values: problem.values, mask: problem.mask,
      scale: problem.scale, dropout: problem.dropout, kernel: .tiled(.default),
      needLogSumExp: true)
    let logSumExp = try #require(forward.logSumExp)
    let gradients = try Attention.backward(
      queries: problem.queries, keys: problem.keys, values: problem.values, gradOutput: dO,
      mask: problem.mask, scale: problem.scale, dropout: problem.dropout,
      output: forward.output, logSumExp: logSumExp,
      kernel: .tiled(TiledBackward.defaultConfiguration))
    let checks = try SampledGradientChecks(
      problem: problem, gradOutput: dO, output: forward.output, logSumExp: logSumExp,
      seed: spec.seed)
    return (checks, gradients)
  }

  @Test("The tiled kernel's forward and gradients pass", arguments: specs)
  func tiledPasses(spec: ProblemSpec) throws {
    let (checks, gradients) = try Self.run(spec)
    #expect(checks.rows.count == 32 && checks.keys.count == 32)
    #expect(
      checks.rows.count < spec.batch * spec.heads * spec.tq
        && checks.keys.count < spec.batch * spec.kvHeads * spec.tk)
    let results = checks.run(gradients)
    #expect(results.allPassed, "\(spec):\n\(results.report())")
    let worst = checks.measure(gradients).map(\.worstRatio).max() ?? .infinity
    #expect(worst > 0 && worst <= 1, "\(spec): worst error / bound \(worst)")
  }

  /// The reference value and bound of element `e` of one gradient, as the check measures it: the
  /// element moved far off becomes the worst, and the measurement reports both there.
  static func probe(
    _ checks: SampledGradientChecks, _ gradients: AttentionGradients,
    _ path: WritableKeyPath<AttentionGradients, Tensor>, _ name: String, at e: Int
  ) throws -> (expected: Double, bound: Double) {
    var probed = gradients
    probed[keyPath: path].scalars[e] += 1e6
    let m = try #require(checks.measure(probed).first { $0.tensor == name })
    try #require(m.worstAt == Tensor.multiIndex(ofFlat: e, shape: gradients[keyPath: path].shape))
    return (try #require(m.expected), try #require(m.bound))
  }

  /// Moves element `e` by 8 bounds (must fail there) and by half a bound (must pass).
  static func plant(
    _ checks: SampledGradientChecks, _ gradients: AttentionGradients,
    _ path: WritableKeyPath<AttentionGradients, Tensor>, _ name: String, at e: Int, _ label: String
  ) throws {
    let (expected, bound) = try probe(checks, gradients, path, name, at: e)
    let at = Tensor.multiIndex(ofFlat: e, shape: gradients[keyPath: path].shape)
    for (multiple, fails) in [(8.0, true), (0.5, false)] {
      var planted = gradients
      planted[keyPath: path].scalars[e] = Float(expected - multiple * bound)
      let m = try #require(checks.measure(planted).first { $0.tensor == name })
      let verdict = checks.run(planted).first { $0.name == "matches_reference" }
      #expect(
        m.passed != fails && verdict?.passed != fails,
        "\(label): \(name)\(at) off by \(multiple) bounds: \(m.summary)")
      if fails {
        #expect(
          m.worstAt == at && abs(m.worstRatio - multiple) < 0.5,
          "\(label): \(name)\(at) off by 8 bounds: \(m.summary)")
      }
    }
  }

  @Test("One element of a sampled dQ row off by 8 bounds fails there", arguments: specs)
  func plantedQueryRow(spec: ProblemSpec) throws {
    let (checks, gradients) = try Self.run(spec)
    let (b, i) = checks.rows[checks.rows.count / 2]
    let e = (b * spec.tq + i) * spec.d + spec.d / 2
    try Self.plant(checks, gradients, \.dQ, "dQ", at: e, "\(spec), row (\(b), \(i))")
  }

  @Test("One element of a sampled key's dV off by 8 bounds fails there", arguments: specs)
  func plantedKey(spec: ProblemSpec) throws {
    let (checks, gradients) = try Self.run(spec)
    let (g, j) = checks.keys[checks.keys.count / 2]
    let e = (g * spec.tk + j) * spec.dv + spec.dv / 2
    try Self.plant(checks, gradients, \.dV, "dV", at: e, "\(spec), key (\(g), \(j))")
  }
}
