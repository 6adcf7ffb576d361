import AttentionKit
import Foundation

/// The checks `attn mha` runs on a layer's result: sampled rows of the output (and of each
/// head's weights) against `MultiHeadReference`, the layer in float64 with a bound per value, and
/// with `--decode` the token-by-token outputs against the same reference and the full pass.
struct LayerChecks {
  let rows: [(batch: Int, token: Int)]
  let expected: [MultiHeadReferenceRow]
  let embedDim: Int
  let heads: Int
  let length: Int

  init(reference: MultiHeadReference, rows: [(batch: Int, token: Int)]) {
    self.rows = rows
    expected = reference.rows(rows)
    embedDim = reference.layer.embedDim
    heads = reference.layer.heads
    length = reference.input.shape[1]
  }

  /// The worst `|value − reference| / bound` of `output` `[B, T, E]` over the sampled rows (a
  /// NaN where the reference has one counts as agreement).
  func outputRatio(_ output: Tensor) -> Double {
    var worst = 0.0
    for ((b, t), row) in zip(rows, expected) {
      let base = (b * length + t) * embedDim
      for c in 0..<embedDim {
        worst = max(
          worst, Self.ratio(Double(output.scalars[base + c]), row.output[c], row.bound[c]))
      }
    }
    return worst
  }

  /// The worst ratio of `weights` `[B, H, T, T]` over the sampled rows, every head.
  func weightsRatio(_ weights: Tensor) -> Double {
    var worst = 0.0
    for ((b, t), row) in zip(rows, expected) {
      for h in 0..<heads {
        let base = ((b * heads + h) * length + t) * length
        for j in 0..<length {
          worst = max(
            worst,
            Self.ratio(Double(weights.scalars[base + j]), row.weights[h][j], row.weightBounds[h][j])
          )
        }
      }
    }
    return worst
  }

  static func ratio(_ value: Double, _ expected: Double, _ bound: Double) -> Double {
    if !value.isFinite || !expected.isFinite {
      return sameNonFinite(value, expected) ? 0 : .infinity
    }
    let error = abs(value - expected)
    if error == 0 { return 0 }
    return bound > 0 ? error / bound : .infinity
  }

  func run(output: Tensor, weights: Tensor?, decoded: Tensor?) -> [Check] {
    var checks: [Check] = []
    let outputWorst = outputRatio(output)
    checks.append(
      Check(
        name: "matches_reference",
        title: "output rows match the float64 layer",
        passed: outputWorst <= 1,
        detail:
          "\(rows.count) rows × \(embedDim), worst error / bound = \(sci(outputWorst))"
      ))
    if let weights {
      let worst = weightsRatio(weights)
      checks.append(
        Check(
          name: "weights_match_reference",
          title: "each head's weights match the float64 layer",
          passed: worst <= 1,
          detail:
            "\(rows.count) rows × \(heads) heads, worst error / bound = \(sci(worst))"
        ))
    }
    if let decoded {
      let worst = outputRatio(decoded)
      checks.append(
        Check(
          name: "decode_matches_reference",
          title: "token-by-token outputs match the float64 layer",
          passed: worst <= 1,
          detail: "\(rows.count) rows, worst error / bound = \(sci(worst))"))
      checks.append(decodeAgreement(decoded: decoded, full: output))
    }
    return checks
  }

  /// Token by token against the full causal pass: on the sampled rows both lie within the bound
  /// of the reference, so they differ by at most twice it; the largest difference anywhere is
  /// reported beside it.
  private func decodeAgreement(decoded: Tensor, full: Tensor) -> Check {
    var worst = 0.0
    for ((b, t), row) in zip(rows, expected) {
      let base = (b * length + t) * embedDim
      for c in 0..<embedDim {
        worst = max(
          worst,
          Self.ratio(
            Double(decoded.scalars[base + c]), Double(full.scalars[base + c]), 2 * row.bound[c]))
      }
    }
    var largest: Float = 0
    var scale: Float = 0
    for (a, b) in zip(decoded.scalars, full.scalars) where a.isFinite && b.isFinite {
      largest = max(largest, abs(a - b))
      scale = max(scale, abs(b))
    }
    return Check(
      name: "decode_matches_full",
      title: "token by token equals the full causal pass",
      passed: worst <= 1,
      detail: "worst difference / (2 × bound) = \(sci(worst)); largest "
        + "difference anywhere \(sci(Double(largest))) (outputs up to \(sci(Double(scale))))")
  }
}
