import AttentionKit
import Foundation

/// The checks of one forward result against the float64 reference kernel (`ReferenceAttention`):
/// every check recomputes what it checks in `Double`, from the inputs, so a wrong kernel fails it.
///
/// Sampled rows are compared element by element within the bounds of `ReferenceAttention.row`
/// (in the candidate's `rounding`); the kernel's own weights, when there are any, are checked for
/// rows summing to 1, for dropout's share and scale, and for giving the output through `·V`.
public struct ForwardChecks: Sendable {
  public let reference: ReferenceAttention
  public let dropout: Dropout?
  /// The arithmetic the candidate computed in.
  public let rounding: Rounding
  /// Flat (batch, query) rows that are compared with the reference kernel.
  public let sampledRows: [(batch: Int, query: Int)]
  /// The reference kernel's result for each sampled row, computed once (each costs O(Tk·D)).
  public let sampledReference: [ReferenceRow]

  public init(
    reference: ReferenceAttention, dropout: Dropout?, sampledRows: [(batch: Int, query: Int)],
    rounding: Rounding = .float32
  ) {
    self.reference = reference
    self.dropout = dropout
    self.rounding = rounding
    self.sampledRows = sampledRows
    sampledReference = sampledRows.map {
      reference.row(batch: $0.batch, query: $0.query, rounding: rounding)
    }
  }

  /// The checks of `problem`'s rows chosen by `rows`.
  public init(problem: AttentionProblem, rows: RowSelection, rounding: Rounding = .float32) throws {
    let reference = try problem.reference()
    let shape = reference.shape
    self.init(
      reference: reference, dropout: problem.dropout,
      sampledRows: rows.rows(
        batchCount: shape.batchCount, queries: shape.queries,
        rowWork: shape.keys * (shape.headDim + shape.valueDim + 1)),
      rounding: rounding)
  }

  /// Runs every check that the available tensors allow. `preDropout` are the kernel's weights
  /// without dropout (from a second run), `result.weights` those after it; both `nil` for the tiled
  /// kernel, whose rows are then checked through the output alone.
  public func run(result: AttentionResult, preDropout: Tensor?) -> [Check] {
    // Without dropout the kernel's weights are the softmax itself.
    let preDropout = preDropout ?? (dropout == nil ? result.weights : nil)
    var checks: [Check] = []
    if let pre = preDropout { checks.append(rowSumCheck(pre)) }
    if let dropout, let pre = preDropout, let post = result.weights {
      checks += dropoutChecks(pre: pre, post: post, dropout: dropout)
    } else if let dropout {
      // No weights from the kernel (tiled): the dropped share over the sampled rows' visible keys.
      let (dropped, candidates) = sampledDrops(dropout)
      // These are the reference's decisions (the kernel's are checked through its output by
      // matches_reference): the check is of the generator, on the sampled rows.
      checks.append(
        dropShareCheck(
          dropped: dropped, candidates: candidates, dropout: dropout,
          title: "share of dropped weights (Philox, sampled rows) is consistent with p"))
    }
    if let post = result.weights {
      checks.append(outputCheck(output: result.output, weights: post))
    }
    checks.append(referenceCheck(result))
    return checks
  }

  /// Rows of the pre-dropout weights sum to 1 — with sinks, to the reference row's sum, what the
  /// sink leaves to the keys; rows the reference leaves all zero (every key masked, by the mask
  /// or by −∞ scores) are zero, on every kernel alike.
  private func rowSumCheck(_ pre: Tensor) -> Check {
    let shape = reference.shape
    let (tq, tk) = (shape.queries, shape.keys)
    var worst = 0.0
    var maskedRows = 0
    var nonFiniteRows = 0
    var rowsOK = true
    let bound = Double(tk + (reference.terms.sinks == nil ? 8 : 9)) * rounding.unit * 2
    // Flat row → the sampled reference row's sum (what the sink leaves), with sinks only.
    var sinkShares: [Int: Double] = [:]
    if reference.terms.sinks != nil {
      for (index, sampled) in sampledRows.enumerated() {
        sinkShares[sampled.batch * tq + sampled.query] =
          sampledReference[index].preDropoutWeights.reduce(0, +)
      }
    }
    for row in 0..<(shape.batchCount * tq) {
      let (b, i) = (row / max(tq, 1), row % max(tq, 1))
      let weights = pre.scalars[(row * tk)..<(row * tk + tk)]
      let sum = weights.reduce(0.0) { $0 + Double($1) }
      if weights.allSatisfy({ $0 == 0 }),
        reference.isFullyMasked(batch: b, query: i)
          || reference.row(batch: b, query: i).preDropoutWeights.allSatisfy({ $0 == 0 })
      {
        maskedRows += 1
        continue
      }
      // Non-finite inputs (--allow-nonfinite) make whole rows NaN, as in PyTorch; such a row
      // passes when the reference row is non-finite too.
      if !sum.isFinite
        && reference.row(batch: b, query: i).preDropoutWeights.contains(where: { !$0.isFinite })
      {
        nonFiniteRows += 1
        continue
      }
      // With sinks a row sums to what the sink leaves: known on the sampled rows (from their
      // float64 reference rows, already computed), at most 1 on the others (recomputing every
      // row in float64 would cost as much as the reference kernel on the whole problem).
      let error: Double
      if sinkShares.isEmpty {
        error = abs(sum - 1)
      } else if let expected = sinkShares[row] {
        error = abs(sum - expected)
      } else {
        error = max(sum - 1, 0)
      }
      worst = max(worst, error.isNaN ? .infinity : error)
      if !(error <= bound) { rowsOK = false }
    }
    let rows = shape.batchCount * tq
    return Check(
      name: "weights_sum_to_one",
      title: (reference.terms.sinks == nil
        ? "softmax rows sum to 1" : "softmax rows sum to 1 − the sink's share")
        + (dropout == nil ? "" : " (before dropout)"),
      passed: rowsOK,
      detail: (reference.terms.sinks == nil
        ? "max |sum − 1| = \(scientific(worst)) ≤ \(scientific(bound)) over"
          + " \(rows - maskedRows - nonFiniteRows) rows"
        : "max |sum − the reference's| = \(scientific(worst)) ≤ \(scientific(bound)) over "
          + "\(sinkShares.count) sampled rows; sums ≤ 1 over \(rows - maskedRows - nonFiniteRows) rows")
        + (maskedRows > 0 ? "; \(maskedRows) fully masked rows are zero" : "")
        + (nonFiniteRows > 0 ? "; \(nonFiniteRows) rows non-finite as in the reference" : ""))
  }

  /// output = (weights after dropout)·V, recomputed in Double from the kernel's own weights.
  private func outputCheck(output: Tensor, weights post: Tensor) -> Check {
    let shape = reference.shape
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    var worst = 0.0
    let values = reference.values.scalars
    for row in 0..<(shape.batchCount * tq) {
      let b = row / max(tq, 1)
      let kv = shape.keyValueBatch(b)
      for c in 0..<dv {
        var sum = 0.0
        var magnitude = 0.0
        for j in 0..<tk {
          let term = Double(post.scalars[row * tk + j]) * Double(values[(kv * tk + j) * dv + c])
          sum += term
          magnitude += abs(term)
        }
        let actual = Double(output.scalars[row * dv + c])
        // Non-finite weights or values (--allow-nonfinite) propagate: equal is all that holds.
        if !sum.isFinite || !actual.isFinite {
          if !sameNonFinite(actual, sum) { worst = .infinity }
          continue
        }
        let bound =
          rounding.gamma(tk + 2) * magnitude + rounding.underflowFloor
        let ratio = abs(actual - sum) / bound
        worst = max(worst, ratio.isNaN ? .infinity : ratio)
      }
    }
    return Check(
      name: "output_equals_weights_v",
      title: dropout == nil ? "output equals weights·V" : "output equals (weights after dropout)·V",
      passed: worst <= 1,
      detail: "worst error / bound = \(String(format: "%.3f", worst)) (bound γ_{Tk+2}·Σ|w·v|)")
  }

  /// Sampled rows against the float64 reference kernel, with the same dropout decisions.
  private func referenceCheck(_ result: AttentionResult) -> Check {
    var (output, weights) = measure(output: result.output, weights: result.weights)
    if let weights {
      output.merge(weights)
      output.rowsChecked = sampledRows.count
    }
    return Check(
      name: "matches_reference", title: "rows match the float64 reference kernel",
      measurement: output)
  }

  /// The candidate `output` `[…, Tq, Dv]` and `weights` `[…, Tq, Tk]` (after dropout) on the
  /// sampled rows against the reference, element by element.
  public func measure(output: Tensor?, weights: Tensor?) -> (
    output: ErrorMeasurement, weights: ErrorMeasurement?
  ) {
    let shape = reference.shape
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    var o = ErrorMeasurement(tensor: "output", shape: output?.shape ?? shape.outputShape)
    var w = weights.map { ErrorMeasurement(tensor: "weights", shape: $0.shape) }
    for ((b, i), expected) in zip(sampledRows, sampledReference) {
      let row = b * tq + i
      if let output {
        o.rowsChecked += 1
        for c in 0..<dv {
          o.record(
            actual: Double(output.scalars[row * dv + c]), expected: expected.output[c],
            bound: expected.outputBounds[c], at: row * dv + c)
        }
      }
      if let weights {
        w?.rowsChecked += 1
        for j in 0..<tk {
          w?.record(
            actual: Double(weights.scalars[row * tk + j]), expected: expected.weights[j],
            bound: expected.weightBounds[j], at: row * tk + j)
        }
      }
    }
    return (o, w)
  }

  /// A candidate computed elsewhere: each given tensor's sampled rows against the reference,
  /// one check per tensor (`output_matches_reference`, `weights_match_reference`).
  public func check(output: Tensor?, weights: Tensor?) throws -> [Check] {
    let shape = reference.shape
    if let output, output.shape != shape.outputShape {
      throw AttentionError.shapeMismatch(
        "the output has shape \(shapeForMessage(output.shape)); these inputs give "
          + "\(shapeForMessage(shape.outputShape))")
    }
    if let weights, weights.shape != shape.weightsShape {
      throw AttentionError.shapeMismatch(
        "the weights have shape \(shapeForMessage(weights.shape)); these inputs give "
          + "\(shapeForMessage(shape.weightsShape))")
    }
    let (o, w) = measure(output: output, weights: weights)
    var checks: [Check] = []
    if output != nil {
      checks.append(
        Check(
          name: "output_matches_reference", title: "output rows match the float64 reference",
          measurement: o))
    }
    if let w {
      checks.append(
        Check(
          name: "weights_match_reference", title: "weight rows match the float64 reference",
          measurement: w))
    }
    return checks
  }

  /// Dropout drops about `p` of the weights, and keeps the others scaled by `1/(1 − p)`.
  ///
  /// A kept weight `w'` is compared with `w/(1 − p)` in `Double`, the true factor (not the
  /// kernel's float32 `keptScale`). A float32 kernel rounds `1 − p`, its reciprocal and the
  /// product once each (PyTorch's `noise.div_(1 − p)`, then `input·noise`), so
  /// `|w' − w/(1 − p)| ≤ γ₃·w/(1 − p)`; below float32's smallest normal `λ` the product's
  /// rounding is absolute (at most `u·λ`), so the error is measured against `max(w/(1 − p), λ)`.
  private func dropoutChecks(pre: Tensor, post: Tensor, dropout: Dropout) -> [Check] {
    var candidates = 0
    var dropped = 0
    var worstScaling = 0.0
    let trueScale = 1 / (1 - dropout.probability)
    let floor = Rounding.float32.underflowFloor
    for (w0, w1) in zip(pre.scalars, post.scalars) where w0 != 0 {
      candidates += 1
      if w1 == 0 {
        dropped += 1
      } else if w0.isFinite {
        let expected = Double(w0) * trueScale
        worstScaling = max(worstScaling, abs(Double(w1) - expected) / max(expected, floor))
      }
    }
    let scalingBound = Rounding.float32.gamma(3)
    return [
      dropShareCheck(dropped: dropped, candidates: candidates, dropout: dropout),
      Check(
        name: "kept_weights_rescaled",
        title: "kept weights equal softmax × 1/(1−p)",
        passed: worstScaling <= scalingBound,
        detail: "max relative error \(scientific(worstScaling)) ≤ \(scientific(scalingBound))"),
    ]
  }
}

extension ForwardChecks {
  /// Dropped and visible (non-zero softmax) weights over the sampled rows, by the reference.
  public func sampledDrops(_ dropout: Dropout) -> (dropped: Int, candidates: Int) {
    var dropped = 0
    var candidates = 0
    for row in sampledReference {
      for (pre, post) in zip(row.preDropoutWeights, row.weights) where pre != 0 {
        candidates += 1
        if post == 0 { dropped += 1 }
      }
    }
    return (dropped, candidates)
  }

  /// The share of non-zero softmax weights that dropout zeroed: over all weights when the kernel
  /// returned them, else over the sampled rows.
  public func droppedFraction(result: AttentionResult, preDropout: Tensor?) -> Double {
    guard let dropout else { return 0 }
    var dropped = 0
    var candidates = 0
    if let pre = preDropout, let post = result.weights {
      for (a, b) in zip(pre.scalars, post.scalars) where a != 0 {
        candidates += 1
        if b == 0 { dropped += 1 }
      }
    } else {
      (dropped, candidates) = sampledDrops(dropout)
    }
    return candidates == 0 ? 0 : Double(dropped) / Double(candidates)
  }

  /// `dropped` lies in the binomial interval a correct dropout leaves with probability 1 − 10⁻⁴.
  public func dropShareCheck(
    dropped: Int, candidates: Int, dropout: Dropout,
    title: String = "share of dropped weights is consistent with p"
  ) -> Check {
    // The probability the decisions are drawn with: round(p·2³²)/2³², within 2⁻³² of p.
    let interval = BinomialBound.interval(
      n: candidates, p: dropout.effectiveProbability, failureProbability: 1e-4)
    let share = candidates > 0 ? Double(dropped) / Double(candidates) : 0
    return Check(
      name: "dropped_share",
      title: title,
      passed: interval.contains(dropped),
      detail: String(
        format: "%d of %d dropped (%.1f%%); p = %@ allows %d…%d (binomial, α = 1e-4)",
        dropped, candidates, share * 100, "\(dropout.probability)",
        interval.lowerBound, interval.upperBound))
  }
}
