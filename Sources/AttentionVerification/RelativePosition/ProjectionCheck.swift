import AttentionKit
import Foundation

/// The forward checks of relative-position self-attention beyond the attention itself.
public enum RelativePositionChecks {
  /// Q, K, V of the sampled rows recomputed in Double from x and the parameters.
  ///
  /// Each element `y_o = b_o + Σ_c x_c·W_oc` is a sum of `D + 1` float32 terms (sgemm adds `x·Wᵀ`
  /// onto the bias), so it may be off by `γ_{D+1}·(|b_o| + Σ_c |x_c·W_oc|)` (Higham §3.1).
  public static func projectionCheck(
    module: RelativePositionAttention, x: Tensor, result: RelativePositionResult,
    rows: [(batch: Int, query: Int)]
  ) -> Check {
    let d = module.modelDim
    let t = x.shape[1]
    let gamma = Rounding.float32.gamma(d + 1)
    var worst = 0.0
    let layers = [
      (module.queryProjection, result.queries), (module.keyProjection, result.keys),
      (module.valueProjection, result.values),
    ]
    for (b, i) in rows {
      let row = b * t + i
      for (layer, projected) in layers {
        for o in 0..<d {
          let bias = Double(layer.bias?.scalars[o] ?? 0)
          var sum = bias
          var magnitude = abs(bias)
          for c in 0..<d {
            let term = Double(x.scalars[row * d + c]) * Double(layer.weight.scalars[o * d + c])
            sum += term
            magnitude += abs(term)
          }
          let actual = Double(projected.scalars[row * d + o])
          // Non-finite inputs (--allow-nonfinite) propagate: equal is all that can be checked.
          if !sum.isFinite || !actual.isFinite {
            if !sameNonFinite(actual, sum) { worst = .infinity }
            continue
          }
          let bound = gamma * magnitude + Rounding.float32.underflowFloor
          let ratio = abs(actual - sum) / bound
          worst = max(worst, ratio.isNaN ? .infinity : ratio)
        }
      }
    }
    return Check(
      name: "projections_match_reference",
      title: "Q, K, V equal x·Wᵀ + b in float64",
      passed: worst <= 1,
      detail: "\(rows.count) rows, worst error / bound = \(String(format: "%.3f", worst))"
        + " (bound γ_{D+1}·Σ|x·w|)")
  }
}
