import AttentionKit
import Foundation

/// The error-bound policy for the reference kernel's rows: how far a correct kernel computing in
/// `rounding` (float32 unless it was half precision) may be from `ReferenceAttention`'s float64
/// values.
extension ReferenceAttention {
  /// The weights (after dropout) `[Tk]` and the output `[Dv]` of query `query` in flat batch
  /// `batch`, with the largest difference a correct float32 kernel may show from each value.
  ///
  /// The bounds are the classical worst-case ones (Higham, *Accuracy and Stability of Numerical
  /// Algorithms*, §3.1), with `u = 2⁻²⁴` the float32 unit roundoff and `γₙ = n·u/(1 − n·u)`:
  /// - a score `s_j = scale·Σ_c q_c·k_jc (+ bias)` computed in float32 is off by at most
  ///   `δ_j = γ_{D+2}·|scale|·Σ_c |q_c·k_jc| + γ₂·|s_j|`;
  /// - softmax turns an absolute score error into a relative weight error: the weights are off by
  ///   at most `w_j·ρ`, `ρ = 2·max_j δ_j + γ_{Tk+8}` (the exponentials' own error, about 2u for
  ///   `fastExp`, the sum of `Tk` terms in any order, the normalization, and dropout's scaling);
  /// - the output `o_c = Σ_j w_j·v_jc` is off by at most `Σ_j (w_j·ρ + γ_{Tk}·w_j + φ_j)·|v_jc|`;
  /// - `φ_j = λ` for `w_j > 0` (`λ` the format's smallest normal number), 0 for `w_j = 0`: a
  ///   weight below `λ` may come out anywhere in `[0, λ]` (`Rounding.underflowFloor`) — flushed
  ///   to zero (`fastExp` does), or, with gradual underflow, rounded on the subnormal grid once
  ///   by `exp` and again by the division by the row sum, which can turn `0.42·2⁻¹⁴⁹` into
  ///   `2⁻¹⁴⁹` (no relative bound covers that). So each weight's bound is `w_j·ρ + φ_j`, an
  ///   absolute floor that matters only for weights that small (sharply peaked rows), and a
  ///   masked or dropped weight (`w_j = 0`) must be exactly 0.
  /// A kernel that drops or duplicates a key, mis-masks, or mis-scales exceeds these at once.
  public func row(batch: Int, query i: Int, rounding: Rounding = .float32) -> ReferenceRow {
    let exact = exactRow(batch: batch, query: i)
    let (tk, dv) = (shape.keys, shape.valueDim)
    let kv = shape.keyRowOffset(batch)
    let gamma = rounding.gamma
    let floor = rounding.underflowFloor
    var worstScoreError = 0.0
    for j in 0..<tk where exact.scores[j].isFinite {
      worstScoreError = max(
        worstScoreError,
        scoreBound(
          exact.scores[j], magnitude: exact.scoreMagnitudes[j],
          positionBias: positionBias(batch: batch, query: i, key: j), rounding: rounding))
    }
    // A sink is one more term of the denominator.
    let relative = 2 * worstScoreError + gamma(tk + (terms.sinks == nil ? 8 : 9))
    var outputBounds = [Double](repeating: 0, count: dv)
    for j in 0..<tk {
      let w = exact.weights[j]
      let weightError = w * (relative + gamma(tk)) + (w > 0 ? floor : 0)
      for c in 0..<dv {
        outputBounds[c] += weightError * abs(Double(values.scalars[(kv + j) * dv + c]))
      }
    }
    return ReferenceRow(
      weights: exact.weights, preDropoutWeights: exact.preDropoutWeights, output: exact.output,
      weightBounds: exact.weights.map { $0 * relative + ($0 > 0 ? floor : 0) },
      outputBounds: outputBounds)
  }

  /// The scaled, masked score `s_ij` (`ReferenceAttention.exactScore`) with the largest error a
  /// kernel's score may show: `δ_ij = γ_{D+2}·|scale|·Σ_c |q_c·k_jc| + γ₂·|s_ij|` (0 for a
  /// masked key or a non-finite score).
  public func score(batch: Int, query i: Int, key j: Int, rounding: Rounding = .float32) -> (
    score: Double, bound: Double
  ) {
    let (s, magnitude) = exactScore(batch: batch, query: i, key: j)
    guard s.isFinite else { return (s, 0) }
    let bias = positionBias(batch: batch, query: i, key: j)
    return (s, scoreBound(s, magnitude: magnitude, positionBias: bias, rounding: rounding))
  }

  /// `δ = γ_{D+2}·|scale|·M + γ₂·|s|`, `M = Σ_c |q_c·k_jc|`; with a soft-cap `c`, the capped
  /// product's own error adds `γ₂·|scale|·M + γ₆·c` (tanh has slope at most 1, and the kernels'
  /// `c·tanh(x/c)` is within `6u·c`: `ResolvedScoreTerms.capScores`); a position bias, its
  /// float32 rounding `γ₂·|bias|` (ALiBi's `slope·d` is one float32 product).
  private func scoreBound(
    _ s: Double, magnitude: Double, positionBias: Double, rounding: Rounding
  ) -> Double {
    // |scale|: a negative scale (legal in PyTorch) flips the scores, not the error's sign.
    let scaled = abs(scale) * magnitude
    let products = shape.headDim == 0 ? 0 : rounding.gamma(shape.headDim + 2) * scaled
    let capped =
      terms.softcap.map { rounding.gamma(2) * scaled + rounding.gamma(6) * Double($0) } ?? 0
    return products + capped + rounding.gamma(2) * (abs(s) + abs(positionBias))
  }
}

/// One row of the reference kernel and the bounds a float32 kernel must stay within.
public struct ReferenceRow: Sendable {
  /// `[Tk]`, after dropout.
  public var weights: [Double]
  /// `[Tk]`, the softmax before dropout.
  public var preDropoutWeights: [Double]
  /// `[Dv]`.
  public var output: [Double]
  /// `[Tk]`: the largest |difference| a correct float32 kernel may show on each weight.
  public var weightBounds: [Double]
  /// `[Dv]`: the same for each output element.
  public var outputBounds: [Double]

  /// The worst ratio |actual − reference| / bound over the weights (≤ 1 passes); a non-finite
  /// value passes only where the reference has the same one (NaN for NaN, ∞ for ∞).
  public func weightErrorRatio(_ actual: some Collection<Float>) -> Double {
    errorRatio(actual, weights, weightBounds)
  }

  /// The worst ratio |actual − reference| / bound over the output (≤ 1 passes).
  public func outputErrorRatio(_ actual: some Collection<Float>) -> Double {
    errorRatio(actual, output, outputBounds)
  }

  private func errorRatio(
    _ actual: some Collection<Float>, _ expected: [Double], _ bounds: [Double]
  ) -> Double {
    var worst = 0.0
    for (index, value) in actual.enumerated() {
      // Non-finite inputs give non-finite results (NaN rows, as in PyTorch); there the kernel
      // must give the same non-finite value, which no bound can measure.
      if !value.isFinite || !expected[index].isFinite {
        let same =
          (value.isNaN && expected[index].isNaN)
          || (value.isInfinite && Double(value) == expected[index])
        if same { continue }
        return .infinity
      }
      let difference = abs(Double(value) - expected[index])
      if difference == 0 { continue }
      // A bound of 0 (a masked or dropped weight) is met only exactly.
      worst = max(worst, bounds[index] > 0 ? difference / bounds[index] : .infinity)
    }
    return worst
  }
}
