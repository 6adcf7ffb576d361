import AttentionKit
import AttentionVerification
import Foundation

/// The check `attn bench --backward` runs on a score-term case's gradients before timing it: the
/// float64 reference backward (`ReferenceGradients`) with the case's terms on the query heads of
/// one key/value head (picked from the seed, as `GradientChecks` picks; every head when the
/// problem is within the reference's limit), the terms cut to those heads (their ALiBi slopes, T5
/// table columns and sinks), against the kernel's gradients of the whole problem: `dQ`, `dK`,
/// `dV` of those heads, and with one batch `dSinks` and the T5 table's columns of those heads
/// (with several they also sum over batches the slice does not hold, and are not compared).
/// `GradientChecks` slices the inputs and the mask but not the terms.
struct TermGradientChecks {
  let reference: ReferenceGradients
  /// The checked query heads (within `H`) and flat query batches.
  let heads: Range<Int>
  let queryBatches: Range<Int>
  let headCount: Int
  let offsets: (query: Int, key: Int, value: Int)
  let shape: AttentionShape
  let comparesParameters: Bool

  init(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor, mask: AttentionMask,
    terms: ScoreTerms, seed: UInt64
  ) throws {
    shape = try AttentionShape(queries: queries, keys: keys, values: values)
    let (tq, tk, d, dv, group) = (
      shape.queries, shape.keys, shape.headDim, shape.valueDim, shape.groupSize
    )
    headCount = shape.batchShape.last ?? 1
    if shape.batchCount * tq * tk <= GradientChecks.referenceScoreLimit {
      // Small enough for the reference whole: every head, every parameter.
      (queryBatches, heads, offsets) = (0..<shape.batchCount, 0..<headCount, (0, 0, 0))
      reference = try ReferenceGradients(
        queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
        terms: terms)
      comparesParameters = true
      return
    }
    let kvBatches = shape.batchCount / group
    let word = Philox4x32(seed: seed).block(major: 0, minor: 1, stream: RandomStream.sampling).0
    let pick = Int((UInt64(word) * UInt64(kvBatches)) >> 32)
    let first = pick * group
    queryBatches = first..<(first + group)
    heads = (first % headCount)..<(first % headCount + group)
    func chunk(_ tensor: Tensor, _ offset: Int, _ count: Int, _ shape: [Int]) throws -> Tensor {
      try Tensor(shape: shape, scalars: Array(tensor.scalars[offset..<(offset + count)]))
    }
    offsets = (first * tq * d, pick * tk * d, pick * tk * dv)
    reference = try ReferenceGradients(
      queries: chunk(queries, offsets.query, group * tq * d, [1, group, tq, d]),
      keys: chunk(keys, offsets.key, tk * d, [1, 1, tk, d]),
      values: chunk(values, offsets.value, tk * dv, [1, 1, tk, dv]),
      gradOutput: chunk(gradOutput, first * tq * dv, group * tq * dv, [1, group, tq, dv]),
      mask: mask.slice(queryBatches: queryBatches, shape: shape),
      terms: Self.slice(terms, heads: heads, of: headCount))
    comparesParameters = shape.batchCount == headCount
  }

  /// The terms of heads `heads` of `total`: ALiBi's slopes, T5's table columns, the sinks.
  static func slice(_ terms: ScoreTerms, heads: Range<Int>, of total: Int) throws -> ScoreTerms {
    var sliced = ScoreTerms(softcap: terms.softcap, sinks: terms.sinks.map { Array($0[heads]) })
    sliced.positionBiases = try terms.positionBiases.map { bias in
      switch bias {
      case .alibi(let slopes): return .alibi(slopes: Array(slopes[heads]))
      case .t5(let table, let maxDistance, let bidirectional):
        let buckets = table.shape[0]
        let columns = (0..<buckets).flatMap { b in
          table.scalars[(b * total + heads.lowerBound)..<(b * total + heads.upperBound)]
        }
        return .t5(
          table: try Tensor(shape: [buckets, heads.count], scalars: columns),
          maxDistance: maxDistance, bidirectional: bidirectional)
      }
    }
    return sliced
  }

  /// The reference's `expected` against the kernel's `actual` at `index(e)`, within `bounds`.
  private static func measure(
    _ name: String, _ actual: Tensor, _ expected: [Double], _ bounds: [Double], rowLength: Int,
    index: (Int) -> Int
  ) -> ErrorMeasurement {
    var m = ErrorMeasurement(tensor: name, shape: actual.shape)
    m.rowsChecked = expected.count / max(rowLength, 1)
    for e in expected.indices {
      m.record(
        actual: Double(actual.scalars[index(e)]), expected: expected[e], bound: bounds[e],
        at: index(e))
    }
    return m
  }

  func measure(_ g: AttentionGradients) -> [ErrorMeasurement] {
    let (r, b) = (reference, reference.bounds)
    let (d, dv) = (shape.headDim, shape.valueDim)
    var measurements = [
      Self.measure("dQ", g.dQ, r.dQ, b.dQ, rowLength: d) { offsets.query + $0 },
      Self.measure("dK", g.dK, r.dK, b.dK, rowLength: d) { offsets.key + $0 },
      Self.measure("dV", g.dV, r.dV, b.dV, rowLength: dv) { offsets.value + $0 },
    ]
    guard comparesParameters else { return measurements }
    let (h0, count, total) = (heads.lowerBound, heads.count, headCount)
    if let dSinks = g.dSinks, let expected = r.dSinks, let bounds = b.dSinks {
      measurements.append(
        Self.measure("dSinks", dSinks, expected, bounds, rowLength: count) { h0 + $0 })
    }
    for (n, table) in g.dT5Tables.enumerated() where n < r.dT5Tables.count {
      // The slice's table is [buckets, count]; the kernel's [buckets, H].
      measurements.append(
        Self.measure("dT5Table", table, r.dT5Tables[n], b.dT5Tables[n], rowLength: count) {
          ($0 / count) * total + h0 + $0 % count
        })
    }
    return measurements
  }

  /// What the reference covers, in words.
  var coverage: String {
    if queryBatches.count == shape.batchCount { return "every head" }
    let (h, b) = (heads, queryBatches)
    return
      (h.count == 1
      ? "query head \(h.lowerBound) (flat batch \(b.lowerBound))"
      : "query heads \(h.lowerBound)…\(h.upperBound - 1) (flat batches \(b.lowerBound)…)")
      + " of the whole problem's gradients, the terms cut to "
      + (h.count == 1 ? "it" : "them")
      + (comparesParameters ? "" : "; dSinks and dT5Tables not compared (summed over batches)")
  }

  func run(_ gradients: AttentionGradients) -> [Check] {
    let measurements = measure(gradients)
    return [
      Check(
        name: "matches_reference",
        title: "gradients match the float64 reference backward",
        passed: measurements.allSatisfy(\.passed),
        detail: measurements.map { "\($0.tensor) \(scientific($0.worstRatio))" }
          .joined(separator: ", ") + " (error / bound; \(coverage))",
        measurement: measurements.max { $0.worstRatio < $1.worstRatio }),
      Check(
        name: "ds_rows_sum_to_zero",
        title: "every row of dS (with the sink's) sums to 0 (softmax's Jacobian)",
        passed: reference.rowSumOfDSRatio <= 1,
        detail: "largest |Σ_j dS_ij| / bound = " + scientific(reference.rowSumOfDSRatio)),
    ]
  }

  /// Soft-capping on a problem where it bends the scores: at the bench's inputs the scores stay
  /// within about ±6, where `50·tanh(x/50)` differs from `x` by under 0.3 %, and its gradient
  /// factor from 1 by under 1.5 % — below what the float64 bounds resolve on sums over 2,048 keys
  /// (a backward without the soft-cap passes the check above). Here B 1, the case's heads,
  /// T 512, D 64, queries of standard deviation 16 (scores of tens), the same kernel and terms,
  /// every head and gradient against `ReferenceGradients`.
  static func bentSoftcap(
    terms: ScoreTerms, heads: Int, causal: Bool, kernel: Attention.Kernel, threads: Int,
    seed: UInt64
  ) throws -> Check {
    let shape = [1, heads, 512, 64]
    let q = try Tensor.randomNormal(
      shape: shape, std: 16, seed: seed, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
    let dO = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.gradOutput)
    let mask = AttentionMask(isCausal: causal)
    let forward = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: mask, terms: terms, kernel: kernel, threads: threads,
      needLogSumExp: true)
    let gradients = try Attention.backward(
      queries: q, keys: k, values: v, gradOutput: dO, mask: mask, terms: terms,
      output: forward.output, logSumExp: forward.logSumExp, kernel: kernel, threads: threads)
    let checks = try TermGradientChecks(
      queries: q, keys: k, values: v, gradOutput: dO, mask: mask, terms: terms, seed: seed)
    let measurements = checks.measure(gradients)
    return Check(
      name: "softcap_bent_matches_reference",
      title: "gradients match the float64 reference where the soft-cap bends the scores",
      passed: measurements.allSatisfy(\.passed),
      detail: measurements.map { "\($0.tensor) \(scientific($0.worstRatio))" }
        .joined(separator: ", ")
        + " (error / bound; B 1 H \(heads) T 512 D 64, queries ×16, \(checks.coverage))",
      measurement: measurements.max { $0.worstRatio < $1.worstRatio })
  }
}
