import AttentionKit
import Foundation
import Testing
import _TestSupport

@testable import AttentionVerification

/// A result in half precision is checked in half precision's rounding: the bounds of
/// `ReferenceAttention.row` with `Rounding.float16` (`u = 2⁻¹¹`, underflow floor `2⁻¹⁴`).
///
/// Tolerances: none of the test's own. The candidate is AttentionKit's materialized float32
/// result with each output and weight rounded to `Float16` — within float16 rounding of the exact
/// result, so it must pass with `rounding: .float16`; its rounding (up to `2⁻¹²` relative, about
/// 100 times the float32 bounds of these problems) must fail `rounding: .float32`. The float32
/// result itself must pass both.
@Suite("Half-precision results are checked in their own rounding")
struct HalfPrecisionTests {
  static let specs: [ProblemSpec] = [
    ProblemSpec(category: "plain", seed: 41, tq: 8, tk: 16, d: 16, dv: 16),
    ProblemSpec(
      category: "GQA 4:2, keep", seed: 42, heads: 4, kvHeads: 2, tq: 6, tk: 9, d: 8, dv: 8,
      keep: .random),
    ProblemSpec(
      category: "peaked ×20", seed: 43, batch: 2, tq: 7, tk: 30, d: 8, dv: 8,
      scale: 20 / Float(8).squareRoot(),
      queryKeyStd: 1.5),
    ProblemSpec(
      category: "bias, fully masked rows", seed: 44, heads: 2, tq: 9, tk: 12, d: 4, dv: 6,
      bias: .fullyMaskedRows),
  ]

  @Test(
    "A float32 result rounded to float16 passes with .float16 and fails with .float32",
    arguments: specs)
  func float16(spec: ProblemSpec) throws {
    let problem = try spec.problem()
    let result = try Attention.scaledDotProduct(
      queries: problem.queries, keys: problem.keys, values: problem.values, mask: problem.mask,
      scale: problem.scale, kernel: .materialized, needWeights: true)
    let weights = try #require(result.weights)
    func half(_ t: Tensor) -> Tensor {
      var rounded = t
      rounded.scalars = t.scalars.map { Float(Float16($0)) }
      return rounded
    }
    let (output16, weights16) = (half(result.output), half(weights))
    let asHalf = try check(
      output: output16, weights: weights16, against: problem, rows: .all, rounding: .float16)
    #expect(asHalf.allPassed, "\(spec), float16 rounding:\n\(asHalf.report())")
    let asSingle = try check(
      output: output16, weights: weights16, against: problem, rows: .all, rounding: .float32)
    #expect(
      asSingle.allSatisfy { !$0.passed }, "\(spec), float32 rounding:\n\(asSingle.report())")
    for rounding in [Rounding.float16, .float32] {
      let exact = try check(
        output: result.output, weights: weights, against: problem, rows: .all, rounding: rounding)
      #expect(exact.allPassed, "\(spec), float32 result, \(rounding):\n\(exact.report())")
    }
  }
}
