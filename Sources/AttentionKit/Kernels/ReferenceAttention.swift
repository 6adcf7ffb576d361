import Foundation
import Tensors

/// The plain reference kernel: the same semantics as `MaterializedAttention`, computed row by row in
/// `Double` with ordinary loops and `Foundation.exp`, no BLAS, no vector code.
///
/// It is slow on purpose: it is what the fast kernels are checked against, in the tests and in the
/// CLI's verification (which recomputes a sample of rows with `row(batch:query:)`, so checking a
/// long sequence never needs the whole matrix).
public struct ReferenceAttention: Sendable {
  public let shape: AttentionShape
  public let queries: Tensor
  public let keys: Tensor
  public let values: Tensor
  let mask: ResolvedMask
  let scale: Double
  let dropout: Dropout?
  let relativePosition: RelativePositionBias?

  public init(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask = .none, scale: Float? = nil, dropout: Dropout? = nil,
    relativePosition: RelativePositionBias? = nil, keyCount: Int? = nil
  ) throws {
    shape = try AttentionShape(queries: queries, keys: keys, values: values, keyCount: keyCount)
    try relativePosition?.checkHeadDim(shape.headDim)
    self.relativePosition = relativePosition
    self.mask = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    self.queries = queries
    self.keys = keys
    self.values = values
    self.scale = Double(shape.resolvedScale(scale))
    self.dropout = dropout
  }

  /// The weights (after dropout) `[Tk]` and the output `[Dv]` of query `query` in flat batch
  /// `batch`, with the largest difference a correct float32 kernel may show from each value.
  ///
  /// The bounds are the classical worst-case ones (Higham, *Accuracy and Stability of Numerical
  /// Algorithms*, §3.1), with `u = 2⁻²⁴` the float32 unit roundoff and `γₙ = n·u/(1 − n·u)`:
  /// - a score `s_j = scale·Σ_c q_c·k_jc (+ bias)` computed in float32 is off by at most
  ///   `δ_j = γ_{D+2}·scale·Σ_c |q_c·k_jc| + γ₂·|s_j|`;
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
  /// `rounding` is the arithmetic the candidate computed in (float32 unless it was half
  /// precision). A kernel that drops or duplicates a key, mis-masks, or mis-scales exceeds these
  /// at once.
  public func row(batch: Int, query i: Int, rounding: Rounding = .float32) -> ReferenceRow {
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    let kv = shape.keyRowOffset(batch)
    let gamma = rounding.gamma
    let floor = rounding.underflowFloor
    var scores = [Double](repeating: 0, count: tk)
    var worstScoreError = 0.0
    for j in 0..<tk {
      let (s, error) = score(batch: batch, query: i, key: j, rounding: rounding)
      scores[j] = s
      if s.isFinite { worstScoreError = max(worstScoreError, error) }
    }
    var weights = [Double](repeating: 0, count: tk)
    let peak = scores.contains(where: \.isNaN) ? .nan : (scores.max() ?? -.infinity)
    if peak != -.infinity {
      var sum = 0.0
      for j in 0..<tk {
        weights[j] = exp(scores[j] - peak)
        sum += weights[j]
      }
      for j in 0..<tk { weights[j] /= sum }
    }
    let preDropoutWeights = weights
    if let dropout {
      let keptScale = dropout.dropsAll ? 0 : 1 / (1 - dropout.effectiveProbability)
      for j in 0..<tk {
        weights[j] = dropout.keeps(row: batch * tq + i, key: j) ? weights[j] * keptScale : 0
      }
    }
    let relative = 2 * worstScoreError + gamma(tk + 8)
    var output = [Double](repeating: 0, count: dv)
    var outputBounds = [Double](repeating: 0, count: dv)
    // Every key, zero weights included: 0·∞ = NaN in a value column, as in PyTorch's `w @ V`
    // (for finite values a zero weight adds nothing either way).
    for j in 0..<tk {
      let weightError = weights[j] * (relative + gamma(tk)) + (weights[j] > 0 ? floor : 0)
      for c in 0..<dv {
        let value = Double(values.scalars[(kv + j) * dv + c])
        output[c] += weights[j] * value
        outputBounds[c] += weightError * abs(value)
      }
    }
    return ReferenceRow(
      weights: weights, preDropoutWeights: preDropoutWeights, output: output,
      weightBounds: weights.map { $0 * relative + ($0 > 0 ? floor : 0) },
      outputBounds: outputBounds)
  }

  /// The scaled, masked score `s_ij` of query `query` in flat batch `batch` and key `key`, in
  /// float64 (`−∞` where the mask hides the key), with the largest error a float32 kernel's score
  /// may show: `δ_ij = γ_{D+2}·|scale|·Σ_c |q_c·k_jc| + γ₂·|s_ij|` (0 for a masked key).
  public func score(batch: Int, query i: Int, key j: Int, rounding: Rounding = .float32) -> (
    score: Double, bound: Double
  ) {
    let (tq, d) = (shape.queries, shape.headDim)
    let kv = shape.keyRowOffset(batch)
    if !mask.visibleKeys(query: i).contains(j) { return (-.infinity, 0) }
    if let keep = mask.keep, keep.value(batch: batch, row: i, column: j) == 0 {
      return (-.infinity, 0)
    }
    var dot = 0.0
    var magnitude = 0.0
    let q = (batch * tq + i) * d
    for c in 0..<d {
      let product = Double(queries.scalars[q + c]) * Double(keys.scalars[(kv + j) * d + c])
      dot += product
      magnitude += abs(product)
    }
    if let relativePosition {
      // q_i·E[clip(j − i) + M], the position term, in the same sum as q_i·k_j.
      let r = relativePosition.index(query: i, key: j)
      for c in 0..<d {
        let product =
          Double(queries.scalars[q + c]) * Double(relativePosition.embeddings.scalars[r * d + c])
        dot += product
        magnitude += abs(product)
      }
    }
    // D = 0: no products, every score 0 (PyTorch's result is the mean of V, not the NaN of
    // 0·(1/√0)).
    var s = d == 0 ? 0 : dot * scale
    if let bias = mask.bias { s += Double(bias.value(batch: batch, row: i, column: j)) }
    guard s.isFinite else { return (s, 0) }
    // |scale|: a negative scale (legal in PyTorch) flips the scores, not the error's sign.
    let products = d == 0 ? 0 : rounding.gamma(d + 2) * abs(scale) * magnitude
    return (s, products + rounding.gamma(2) * abs(s))
  }

  /// Whether every key is masked for this query (its weights and output are then zero).
  public func isFullyMasked(batch: Int, query i: Int) -> Bool {
    for j in mask.visibleKeys(query: i) {
      if let keep = mask.keep, keep.value(batch: batch, row: i, column: j) == 0 { continue }
      if let bias = mask.bias, bias.value(batch: batch, row: i, column: j) == -.infinity {
        continue
      }
      return false
    }
    return true
  }

  /// Every row, as a result with the same layout as the fast kernels'.
  func compute() -> AttentionResult {
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    var weights = [Float](repeating: 0, count: shape.batchCount * tq * tk)
    var output = [Float](repeating: 0, count: shape.batchCount * tq * dv)
    for b in 0..<shape.batchCount {
      for i in 0..<tq {
        let r = row(batch: b, query: i)
        for j in 0..<tk { weights[(b * tq + i) * tk + j] = Float(r.weights[j]) }
        for c in 0..<dv { output[(b * tq + i) * dv + c] = Float(r.output[c]) }
      }
    }
    return AttentionResult(
      output: Tensor(validShape: shape.outputShape, scalars: output),
      weights: Tensor(validShape: shape.weightsShape, scalars: weights),
      workspaceBytes: weights.count * MemoryLayout<Float>.stride, kernel: .reference)
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
