import AttentionKit
import Foundation
import Testing

/// Tolerance helpers in the manner of swift-numerics' `_TestSupport`: a `Float` result is measured
/// against a `Double` reference, and a failure prints expected, observed, error and tolerance.

/// `|observed − expected| / max(|expected|, leastNormal)`, the relative error swift-numerics
/// measures (the floor keeps it finite at zero). NaN when `observed` is NaN.
package func relativeError(_ observed: Float, _ expected: Double) -> Double {
  abs(Double(observed) - expected) / max(abs(expected), Double(Float.leastNormalMagnitude))
}

/// The distance in float32 ulps between `observed` and `expected` (both floats): the number of
/// representable floats strictly between them, plus one; 0 when equal, `.max` if either is NaN.
package func ulpDistance(_ observed: Float, _ expected: Float) -> UInt32 {
  if observed.isNaN || expected.isNaN { return .max }
  // Map the sign-magnitude bit patterns to a monotonic unsigned line.
  func ordered(_ x: Float) -> Int64 {
    let bits = Int64(x.bitPattern & 0x7FFF_FFFF)
    return x.sign == .minus ? -bits : bits
  }
  return UInt32(min(abs(ordered(observed) - ordered(expected)), Int64(UInt32.max)))
}

/// The worst element of an element-wise comparison.
package struct ComparisonReport: CustomStringConvertible {
  package var label: String
  package var count: Int
  package var failures: Int
  package var worstIndex: [Int]
  package var expected: Double
  package var observed: Double
  package var error: Double
  package var tolerance: Double

  /// `error / tolerance` at the worst element (≤ 1 passes; NaN counts as infinite).
  package var ratio: Double { error.isNaN ? .infinity : error / tolerance }

  package var description: String {
    let head =
      failures > 0
      ? "\(label): \(failures) of \(count) elements out of tolerance; worst"
      : "\(label): \(count) elements within tolerance; worst"
    return "\(head) \(worstIndex): expected \(expected), observed \(observed), "
      + "error \(sci(error)), tolerance \(sci(tolerance)) (ratio \(String(format: "%.3g", ratio)))"
  }
}

/// Checks `|observed[e] − expected[e]| ≤ tolerance(e)` for every element (observed `Float` or
/// `Double`) and records ONE issue, naming the worst element and the number of failures, if any
/// is out. NaN never passes.
/// Returns the report, whose `ratio` tests can print or compare.
@discardableResult
package func expectClose<Scalar: BinaryFloatingPoint>(
  _ observed: some Collection<Scalar>, _ expected: [Double], shape: [Int],
  tolerance: (Int) -> Double, _ label: String,
  sourceLocation: SourceLocation = #_sourceLocation
) -> ComparisonReport {
  let observed = observed.map { Double($0) }
  guard observed.count == expected.count else {
    Issue.record(
      "\(label): \(observed.count) elements observed, \(expected.count) expected",
      sourceLocation: sourceLocation)
    return ComparisonReport(
      label: label, count: 0, failures: 1, worstIndex: [], expected: .nan, observed: .nan,
      error: .infinity, tolerance: 0)
  }
  var report = ComparisonReport(
    label: label, count: observed.count, failures: 0, worstIndex: [], expected: 0, observed: 0,
    error: 0, tolerance: 1)
  var worstRatio = -1.0
  for e in observed.indices {
    let error = abs(observed[e] - expected[e])
    let allowed = tolerance(e)
    let ratio = error.isNaN ? .infinity : error / allowed
    if !(error <= allowed) { report.failures += 1 }
    if ratio > worstRatio {
      worstRatio = ratio
      report.worstIndex = Tensor.multiIndex(ofFlat: e, shape: shape)
      report.expected = expected[e]
      report.observed = observed[e]
      report.error = error.isNaN ? .nan : error
      report.tolerance = allowed
    }
  }
  #expect(report.failures == 0, "\(report)", sourceLocation: sourceLocation)
  return report
}

/// The same with one tolerance for every element.
@discardableResult
package func expectClose<Scalar: BinaryFloatingPoint>(
  _ observed: some Collection<Scalar>, _ expected: [Double], shape: [Int],
  absoluteTolerance: Double, _ label: String,
  sourceLocation: SourceLocation = #_sourceLocation
) -> ComparisonReport {
  expectClose(
    observed, expected, shape: shape, tolerance: { _ in absoluteTolerance }, label,
    sourceLocation: sourceLocation)
}

/// Scientific notation with three significant digits.
package func sci(_ value: Double) -> String {
  value.isFinite ? String(format: "%.2e", value) : "\(value)"
}

/// How far a float32 attention kernel may be from the float64 fixture, element by element.
///
/// Derivation (per query row; `u = 2⁻²⁴`, `γₙ` as above, `S` the case's `max_abs_score`, `B` its
/// largest |finite bias|, `λ` = `Float.leastNormalMagnitude`):
/// 1. A score `s_j = scale·Σ_c q_c·k_jc` from one sgemm of length `D` (the scale is its `alpha`)
///    is off by at most `γ_{D+1}·A`, with `A = scale·max Σ_c |q_c·k_jc|` over all query–key
///    pairs, computed here in Double from the float32 inputs (`A ≥ S` always; `A ≈ S…3S` for
///    these random inputs, so this is about `(D + 1)·u·S`). The kernel's scale is a `Float`:
///    `+u·S`. Adding the bias and subtracting the row max: `+3u·(S + B)`. So
///    `δ = γ_{D+1}·A + 4u·(S + B)`.
/// 2. Moving every score of a row by at most `δ` multiplies each softmax weight by a factor in
///    `[e^{−2δ}, e^{2δ}]`. The exponentials (`fastExp`, relative error below 2·10⁻⁷ < 4u), their
///    sum of `Tk` terms, the reciprocal and the product add `γ_{Tk+6}`; dropout's float32 scale
///    `1/(1 − p)` and its product add `2u`. So weights are within `ρ·w_j + λ`, with
///    `ρ = 2δ·(1 + 2δ) + γ_{Tk+6} (+ 2u)`; `λ` covers weights below float32's normal range,
///    which `fastExp` flushes to zero (for example `e^{−200}` in the large-magnitude case).
/// 3. The output `o_c = Σ_j w_j·v_jc`, one sgemm of length `Tk`, is within
///    `(ρ + γ_Tk)·Σ_j w_j·|v_jc| + Tk·λ·max|v|`.
/// These are worst-case bounds: a dropped or duplicated key, a wrong scale or a misplaced mask
/// moves weights by 10⁻³ or far more, while these tolerances are about 10⁻⁶ relative here.
package struct AttentionTolerance {
  package let scoreError: Double
  package let weightRelative: Double
  package let outputRelative: Double
  /// `A`, `S`, `B` of the derivation.
  package let productMagnitude: Double
  package let maxAbsScore: Double
  package let maxAbsBias: Double
  package let tk: Int
  package let dv: Int
  package let expectedWeights: [Double]
  package let values: [Float]
  package let maxAbsValue: Double

  package init(_ c: LoadedSdpaCase, withDropout: Bool = false) {
    let spec = c.spec
    let (tq, tk, d, dv) = (spec.queries, spec.keys, spec.headDim, spec.valueDim)
    let u = Float32Rounding.unit
    var a = 0.0
    for b in 0..<spec.batchCount {
      for i in 0..<tq {
        for j in 0..<tk {
          var sum = 0.0
          for ch in 0..<d {
            sum += abs(
              Double(c.queries.scalars[(b * tq + i) * d + ch])
                * Double(c.keys.scalars[(b * tk + j) * d + ch]))
          }
          a = max(a, sum)
        }
      }
    }
    productMagnitude = a * spec.scale
    maxAbsScore = spec.maxAbsScore
    maxAbsBias = c.maxAbsBias
    let delta =
      Float32Rounding.gamma(d + 1) * productMagnitude
      + 4 * u * (spec.maxAbsScore + c.maxAbsBias)
    scoreError = delta
    weightRelative =
      2 * delta * (1 + 2 * delta) + Float32Rounding.gamma(tk + 6)
      + (withDropout ? 2 * u : 0)
    outputRelative = weightRelative + Float32Rounding.gamma(tk)
    self.tk = tk
    self.dv = dv
    expectedWeights = c.expectedWeights
    values = c.values.scalars
    maxAbsValue = values.map { Double(abs($0)) }.max() ?? 0
  }

  /// The tolerance of weight element `e` (flat over `[…, Tq, Tk]`).
  package func weight(_ e: Int) -> Double {
    weightRelative * expectedWeights[e] + Double(Float.leastNormalMagnitude)
  }

  /// The tolerance of output element `e` (flat over `[…, Tq, Dv]`); `Tq` is needed to find the
  /// batch of the row.
  package func output(_ e: Int, queries tq: Int) -> Double {
    let row = e / dv
    let ch = e % dv
    let b = row / tq
    var magnitude = 0.0
    for j in 0..<tk {
      magnitude += expectedWeights[row * tk + j] * Double(abs(values[(b * tk + j) * dv + ch]))
    }
    return outputRelative * magnitude
      + Double(tk) * Double(Float.leastNormalMagnitude) * maxAbsValue
  }

  package var summary: String {
    "A = \(sci(productMagnitude)), S = \(sci(maxAbsScore)), B = \(sci(maxAbsBias)), "
      + "δ = \(sci(scoreError)), ρ = \(sci(weightRelative))"
  }
}
