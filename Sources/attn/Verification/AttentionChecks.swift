import AttentionKit

/// The checks `attn dropout` and `attn relpos` run on a kernel's result. Each one recomputes what
/// it checks independently of the kernel (in `Double`, from the inputs), so a wrong kernel fails it.
struct AttentionChecks {
  let reference: ReferenceAttention
  let dropout: Dropout?
  /// Flat (batch, query) rows that are compared with the reference kernel.
  let sampledRows: [(batch: Int, query: Int)]
  /// The reference kernel's result for each sampled row, computed once (each costs O(Tk·D)).
  let sampledReference: [ReferenceRow]

  init(reference: ReferenceAttention, dropout: Dropout?, sampledRows: [(batch: Int, query: Int)]) {
    self.reference = reference
    self.dropout = dropout
    self.sampledRows = sampledRows
    sampledReference = sampledRows.map { reference.row(batch: $0.batch, query: $0.query) }
  }

  /// All rows when there are at most `limit`, else `count` rows drawn with the seed.
  static func sampleRows(
    shape: AttentionShape, seed: UInt64, limit: Int = 64, count: Int = 32
  ) -> [(batch: Int, query: Int)] {
    sampleRows(
      batchCount: shape.batchCount, queries: shape.queries, seed: seed, limit: limit, count: count)
  }

  /// All `batchCount·queries` rows when there are at most `limit`, else `count` of them drawn
  /// with the seed, in order.
  static func sampleRows(
    batchCount: Int, queries: Int, seed: UInt64, limit: Int = 64, count: Int = 32
  ) -> [(batch: Int, query: Int)] {
    let total = batchCount * queries
    var flat: [Int]
    if total <= limit {
      flat = Array(0..<total)
    } else {
      let rng = Philox4x32(seed: seed)
      var chosen = Set<Int>()
      var counter: UInt64 = 0
      while chosen.count < count {
        let w = rng.block(major: counter, minor: 0, stream: RandomStream.sampling)
        for word in [w.0, w.1, w.2, w.3] where chosen.count < count {
          chosen.insert(Int((UInt64(word) * UInt64(total)) >> 32))
        }
        counter += 1
      }
      flat = chosen.sorted()
    }
    return flat.map { ($0 / max(queries, 1), $0 % max(queries, 1)) }
  }

  /// Runs every check that the available tensors allow. `preDropout` are the kernel's weights
  /// without dropout (from a second run), `result.weights` those after it; both `nil` for the tiled
  /// kernel, whose rows are then checked through the output alone.
  func run(result: AttentionResult, preDropout: Tensor?) -> [Check] {
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

  private static let unitRoundoff = Double(Float.ulpOfOne) / 2

  /// Rows of the pre-dropout weights sum to 1; rows the reference leaves all zero (every key
  /// masked, by the mask or by −∞ scores) are zero, on every kernel alike.
  private func rowSumCheck(_ pre: Tensor) -> Check {
    let shape = reference.shape
    let (tq, tk) = (shape.queries, shape.keys)
    var worst = 0.0
    var maskedRows = 0
    var nonFiniteRows = 0
    var rowsOK = true
    let bound = Double(tk + 8) * Self.unitRoundoff * 2
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
      let error = abs(sum - 1)
      worst = max(worst, error.isNaN ? .infinity : error)
      if !(error <= bound) { rowsOK = false }
    }
    let rows = shape.batchCount * tq
    return Check(
      name: "weights_sum_to_one",
      title: dropout == nil ? "softmax rows sum to 1" : "softmax rows sum to 1 (before dropout)",
      passed: rowsOK,
      detail: "max |sum − 1| = \(sci(worst)) ≤ \(sci(bound)) over"
        + " \(rows - maskedRows - nonFiniteRows) rows"
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
          Double(tk + 2) * Self.unitRoundoff * magnitude
          + Double(Float.leastNormalMagnitude)
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
    let (tq, tk, dv) = (reference.shape.queries, reference.shape.keys, reference.shape.valueDim)
    var worst = 0.0
    for ((b, i), expected) in zip(sampledRows, sampledReference) {
      let row = b * tq + i
      if let post = result.weights {
        worst = max(worst, expected.weightErrorRatio(post.scalars[(row * tk)..<(row * tk + tk)]))
      }
      worst = max(
        worst, expected.outputErrorRatio(result.output.scalars[(row * dv)..<(row * dv + dv)]))
    }
    return Check(
      name: "matches_reference",
      title: "rows match the float64 reference kernel",
      passed: worst <= 1,
      detail: "\(sampledRows.count) rows, worst error / bound = \(String(format: "%.3f", worst))")
  }

  /// Dropout drops about `p` of the weights, and keeps the others scaled by `1/(1 − p)`.
  private func dropoutChecks(pre: Tensor, post: Tensor, dropout: Dropout) -> [Check] {
    var candidates = 0
    var dropped = 0
    var worstScaling = 0.0
    for (w0, w1) in zip(pre.scalars, post.scalars) where w0 != 0 {
      candidates += 1
      if w1 == 0 {
        dropped += 1
      } else if w0.isFinite {
        let expected = Double(w0) * Double(dropout.keptScale)
        worstScaling = max(worstScaling, abs(Double(w1) - expected) / expected)
      }
    }
    let scalingBound = 2 * Double(Float.ulpOfOne)
    return [
      dropShareCheck(dropped: dropped, candidates: candidates, dropout: dropout),
      Check(
        name: "kept_weights_rescaled",
        title: "kept weights equal softmax × 1/(1−p)",
        passed: worstScaling <= scalingBound,
        detail: "max relative error \(sci(worstScaling)) ≤ \(sci(scalingBound))"),
    ]
  }
}

extension AttentionChecks {
  /// Dropped and visible (non-zero softmax) weights over the sampled rows, by the reference.
  func sampledDrops(_ dropout: Dropout) -> (dropped: Int, candidates: Int) {
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
  func droppedFraction(result: AttentionResult, preDropout: Tensor?) -> Double {
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
  func dropShareCheck(
    dropped: Int, candidates: Int, dropout: Dropout,
    title: String = "share of dropped weights is consistent with p"
  ) -> Check {
    // The probability the decisions are drawn with: p on the 2⁻¹⁶ grid (see `Dropout`).
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

/// Whether `a` and `b` are the same non-finite value (both NaN, or equal infinities): all that can
/// be checked of a result computed from non-finite inputs.
func sameNonFinite(_ a: Double, _ b: Double) -> Bool {
  (a.isNaN && b.isNaN) || (a.isInfinite && a == b)
}
