import Foundation
import Tensors

/// The plain reference kernel: the same semantics as `MaterializedAttention`, computed row by row in
/// `Double` with ordinary loops and `Foundation.exp`, no BLAS, no vector code.
///
/// It is slow on purpose: it is what the fast kernels are checked against. `exactRow` gives one
/// row's float64 values and the magnitudes of its sums (`Σ_c |q_c·k_jc|`), the facts an error
/// bound is built from; the bounds themselves, the policy of how far a float32 kernel may be from
/// these values, are `AttentionVerification`'s (`ReferenceAttention.row(batch:query:rounding:)`).
/// Checking a long sequence recomputes a sample of rows, never the whole matrix.
public struct ReferenceAttention: Sendable {
  public let shape: AttentionShape
  public let queries: Tensor
  public let keys: Tensor
  public let values: Tensor
  let mask: ResolvedMask
  /// The factor on `q·k` (`1/√D` unless given), in float64.
  package let scale: Double
  let dropout: Dropout?
  let relativePosition: RelativePositionBias?
  /// The score terms as given (their error bounds depend on them) and laid out for the call.
  package let terms: ScoreTerms
  let resolvedTerms: ResolvedScoreTerms

  public init(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask = .none, scale: Float? = nil, dropout: Dropout? = nil,
    terms: ScoreTerms = .none, keyCount: Int? = nil
  ) throws {
    let relativePosition = terms.relativePosition
    shape = try AttentionShape(queries: queries, keys: keys, values: values, keyCount: keyCount)
    try relativePosition?.checkHeadDim(shape.headDim)
    self.terms = terms
    resolvedTerms = try ResolvedScoreTerms(terms, shape: shape, mask: mask)
    self.relativePosition = relativePosition
    self.mask = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    self.queries = queries
    self.keys = keys
    self.values = values
    self.scale = Double(shape.resolvedScale(scale))
    self.dropout = dropout
  }

  /// Query `query` of flat batch `batch` in float64: its scores, weights before and after
  /// dropout, output, and the magnitude of each score's sum, `Σ_c |q_c·k_jc|` (position term
  /// included), which an error bound scales with.
  ///
  /// A masked key has score `−∞`, weight 0 and magnitude 0; a fully masked row has zero weights
  /// and a zero output. Dropout scales kept weights by `Dropout.keptScale`'s exact value
  /// `1/(1 − p')`.
  public func exactRow(batch: Int, query i: Int) -> ExactReferenceRow {
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    let kv = shape.keyRowOffset(batch)
    var scores = [Double](repeating: 0, count: tk)
    var magnitudes = [Double](repeating: 0, count: tk)
    for j in 0..<tk {
      (scores[j], magnitudes[j]) = exactScore(batch: batch, query: i, key: j)
    }
    var weights = [Double](repeating: 0, count: tk)
    let visible = scores.contains(where: \.isNaN) ? .nan : (scores.max() ?? -.infinity)
    if visible != -.infinity {
      // The head's sink, one more key with no value, shares the shift and the denominator.
      let sink = resolvedTerms.sink(batch: batch).map(Double.init)
      let peak = sink.map { visible.isNaN ? visible : max(visible, $0) } ?? visible
      var sum = sink.map { exp($0 - peak) } ?? 0
      for j in 0..<tk {
        weights[j] = exp(scores[j] - peak)
        sum += weights[j]
      }
      for j in 0..<tk { weights[j] /= sum }
    }
    let preDropoutWeights = weights
    if let dropout {
      // The float32 factor the kernels (and PyTorch) multiply by, exactly.
      let keptScale = Double(dropout.keptScale)
      for j in 0..<tk {
        weights[j] = dropout.keeps(row: batch * tq + i, key: j) ? weights[j] * keptScale : 0
      }
    }
    var output = [Double](repeating: 0, count: dv)
    // Every key, zero weights included: 0·∞ = NaN in a value column, as in PyTorch's `w @ V`
    // (for finite values a zero weight adds nothing either way).
    for j in 0..<tk {
      for c in 0..<dv { output[c] += weights[j] * Double(values.scalars[(kv + j) * dv + c]) }
    }
    return ExactReferenceRow(
      scores: scores, scoreMagnitudes: magnitudes, preDropoutWeights: preDropoutWeights,
      weights: weights, output: output)
  }

  /// The scaled, masked score `s_ij` of query `query` in flat batch `batch` and key `key`, in
  /// float64 (`−∞` where the mask hides the key), and the magnitude of its sum,
  /// `Σ_c |q_c·k_jc|` (and `|q_c·E_rc|` with a position term; 0 for a masked key).
  public func exactScore(batch: Int, query i: Int, key j: Int) -> (
    score: Double, magnitude: Double
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
    // D = 0: no products, every score 0 (PyTorch's result is the mean of V, not the NaN of
    // 0·(1/√0)).
    var s = d == 0 ? 0 : dot * scale
    if let c = terms.softcap.map(Double.init) { s = c * tanh(s / c) }
    if let relativePosition, d > 0 {
      // q_i·E[clip(j − i) + M], the position term, after the soft-cap as the kernels add it.
      let r = relativePosition.index(query: i, key: j)
      var position = 0.0
      for c in 0..<d {
        let product =
          Double(queries.scalars[q + c]) * Double(relativePosition.embeddings.scalars[r * d + c])
        position += product
        magnitude += abs(product)
      }
      s += position * scale
    }
    s += positionBias(batch: batch, query: i, key: j)
    if let bias = mask.bias { s += Double(bias.value(batch: batch, row: i, column: j)) }
    return (s, magnitude)
  }

  /// The soft-capped scaled product `t = c·tanh(scale·q_i·k_j / c)` in float64, before the
  /// position terms and the mask; `nil` without a soft-cap. Its derivative `1 − (t/c)²` is the
  /// soft-cap's factor on the score's gradient.
  package func cappedProduct(batch: Int, query i: Int, key j: Int) -> Double? {
    guard let c = terms.softcap.map(Double.init) else { return nil }
    let (tq, d) = (shape.queries, shape.headDim)
    let kv = shape.keyRowOffset(batch)
    var dot = 0.0
    for k in 0..<d {
      dot +=
        Double(queries.scalars[(batch * tq + i) * d + k]) * Double(keys.scalars[(kv + j) * d + k])
    }
    return c * tanh((d == 0 ? 0 : dot * scale) / c)
  }

  /// The head's sink `σ` of flat batch `batch` in float64, `nil` without sinks.
  package func sink(batch: Int) -> Double? { resolvedTerms.sink(batch: batch).map(Double.init) }

  /// `ScoreTerms.positionBias` at `(i, j)` of flat batch `batch`'s head, exactly: ALiBi's
  /// `slope_h·(j − i_abs)` in float64, T5's table entry as stored.
  package func positionBias(batch: Int, query i: Int, key j: Int) -> Double {
    terms.exactPositionBias(
      head: resolvedTerms.head(batch), heads: resolvedTerms.heads,
      distance: j - (i + resolvedTerms.alignment))
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
        let r = exactRow(batch: b, query: i)
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

/// One row of the reference kernel in float64 (`ReferenceAttention.exactRow`).
public struct ExactReferenceRow: Sendable {
  /// `[Tk]`: the scaled, masked scores (`−∞` where masked).
  public var scores: [Double]
  /// `[Tk]`: `Σ_c |q_c·k_jc|` of each score's sum (0 where masked).
  public var scoreMagnitudes: [Double]
  /// `[Tk]`, the softmax before dropout.
  public var preDropoutWeights: [Double]
  /// `[Tk]`, after dropout.
  public var weights: [Double]
  /// `[Dv]`.
  public var output: [Double]
}
