import AttentionKit
import Foundation

/// The checks `attn backward` runs on a kernel's gradients, each recomputed independently of the
/// kernel: the float64 reference backward (`ReferenceGradients`) on the whole problem or, when
/// that is too large, on the query heads of one key/value head; finite differences of the
/// float64 forward; and the softmax's Jacobian (every row of `dS` sums to 0).
struct GradientChecks {
  /// The part of the problem the reference covers: query flat batches `queryBatches` (the heads
  /// of key/value flat batch `keyValueBatch`), or everything.
  struct Region {
    var queryBatches: Range<Int>
    var keyValueBatch: Int?
    /// Offsets of the region's first element in the flat Q (and dO), K and V.
    var queryOffset: Int
    var keyOffset: Int
    var valueOffset: Int
    var isWhole: Bool { keyValueBatch == nil }
  }

  /// Scores (`G·Tq·Tk` for one key/value head's group) the float64 reference takes on; about a
  /// second per 2²⁴ scores at D = 64.
  static let referenceScoreLimit = 1 << 24
  /// Scores below which the finite differences run (each entry costs two reference passes).
  static let finiteDifferenceScoreLimit = 1 << 16

  let reference: ReferenceGradients
  let region: Region
  let shape: AttentionShape

  /// The reference for the whole problem when it has at most `referenceScoreLimit` scores, else
  /// for the group of key/value flat batch `Philox(seed)`; throws when even one group is larger.
  init(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor, mask: AttentionMask,
    dropout: Dropout?, needBiasGradient: Bool, seed: UInt64
  ) throws {
    shape = try AttentionShape(queries: queries, keys: keys, values: values)
    let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
    let scores = shape.batchCount * tq * tk
    if scores <= Self.referenceScoreLimit {
      reference = try ReferenceGradients(
        queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
        dropout: dropout, needBiasGradient: needBiasGradient)
      region = Region(
        queryBatches: 0..<shape.batchCount, keyValueBatch: nil, queryOffset: 0, keyOffset: 0,
        valueOffset: 0)
      return
    }
    let group = shape.groupSize
    guard group * tq * tk <= Self.referenceScoreLimit else {
      throw AttentionError.invalidArgument(
        "the float64 reference that checks the gradients would hold \(group) × \(tq) × \(tk) "
          + "scores, over its limit of \(Self.referenceScoreLimit); check smaller inputs, and "
          + "time large ones with attn bench --backward")
    }
    let kvBatches = shape.batchCount / group
    let rng = Philox4x32(seed: seed)
    let pick = Int(
      (UInt64(rng.block(major: 0, minor: 1, stream: RandomStream.sampling).0)
        * UInt64(kvBatches)) >> 32)
    let first = pick * group
    let batches = first..<(first + group)
    func chunk(_ tensor: Tensor, offset: Int, count: Int, shape: [Int]) -> Tensor {
      Tensor(validShape: shape, scalars: Array(tensor.scalars[offset..<(offset + count)]))
    }
    let q = chunk(queries, offset: first * tq * d, count: group * tq * d, shape: [1, group, tq, d])
    let k = chunk(keys, offset: pick * tk * d, count: tk * d, shape: [1, 1, tk, d])
    let v = chunk(values, offset: pick * tk * dv, count: tk * dv, shape: [1, 1, tk, dv])
    let dO = chunk(
      gradOutput, offset: first * tq * dv, count: group * tq * dv, shape: [1, group, tq, dv])
    let sliced = try mask.slice(queryBatches: batches, shape: shape)
    if let dropout {
      // The decisions of the whole problem's rows: the counters depend on the flat row.
      var keep = [Float](repeating: 0, count: group * tq * tk)
      for (n, b) in batches.enumerated() {
        for i in 0..<tq {
          for j in 0..<tk where dropout.keeps(row: b * tq + i, key: j) {
            keep[(n * tq + i) * tk + j] = 1
          }
        }
      }
      reference = try ReferenceGradients(
        queries: q, keys: k, values: v, gradOutput: dO, mask: sliced, scale: nil,
        dropoutKeep: Tensor(shape: [1, group, tq, tk], scalars: keep),
        dropoutProbability: dropout.effectiveProbability, needBiasGradient: false)
    } else {
      reference = try ReferenceGradients(
        queries: q, keys: k, values: v, gradOutput: dO, mask: sliced)
    }
    region = Region(
      queryBatches: batches, keyValueBatch: pick, queryOffset: first * tq * d,
      keyOffset: pick * tk * d, valueOffset: pick * tk * dv)
  }

  /// What the reference covers, in words.
  var coverage: String {
    guard let kv = region.keyValueBatch else { return "every row" }
    let heads = region.queryBatches
    return "query heads \(heads.lowerBound)…\(heads.upperBound - 1) (flat) and key/value head "
      + "\(kv): the whole problem is over the reference's limit"
  }

  /// The worst `|kernel − reference| / bound` over one gradient's region.
  static func worstRatio(_ kernel: Tensor, offset: Int, _ expected: [Double], _ bounds: [Double])
    -> Double
  {
    var worst = 0.0
    for e in expected.indices {
      let value = Double(kernel.scalars[offset + e])
      if !value.isFinite || !expected[e].isFinite {
        if !sameNonFinite(value, expected[e]) { worst = .infinity }
        continue
      }
      let error = abs(value - expected[e])
      if error > 0 { worst = max(worst, bounds[e] > 0 ? error / bounds[e] : .infinity) }
    }
    return worst
  }

  func run(_ gradients: AttentionGradients, seed: UInt64, finiteDifferences: Bool) -> [Check] {
    let b = reference.bounds
    var ratios = [
      ("dQ", Self.worstRatio(gradients.dQ, offset: region.queryOffset, reference.dQ, b.dQ)),
      ("dK", Self.worstRatio(gradients.dK, offset: region.keyOffset, reference.dK, b.dK)),
      ("dV", Self.worstRatio(gradients.dV, offset: region.valueOffset, reference.dV, b.dV)),
    ]
    if region.isWhole, let dBias = gradients.dBias, let expected = reference.dBias,
      let bounds = b.dBias
    {
      ratios.append(("dBias", Self.worstRatio(dBias, offset: 0, expected, bounds)))
    }
    let worst = ratios.map(\.1).max() ?? 0
    var checks = [
      Check(
        name: "matches_reference",
        title: "gradients match the float64 reference backward",
        passed: worst <= 1,
        detail: ratios.map { "\($0.0) \(sci($0.1))" }.joined(separator: ", ")
          + " (error / bound; \(coverage))")
    ]
    checks.append(
      Check(
        name: "ds_rows_sum_to_zero",
        title: "every row of dS sums to 0 (softmax's Jacobian)",
        passed: reference.largestRowSumOfDS <= 1e-12,
        detail: "largest |Σ_j dS_ij| / Σ_j |dS_ij| = \(sci(reference.largestRowSumOfDS))"))
    let scores = region.queryBatches.count * shape.queries * shape.keys
    if finiteDifferences && scores <= Self.finiteDifferenceScoreLimit {
      checks.append(finiteDifferenceCheck(gradients, seed: seed))
    }
    return checks
  }

  /// Central differences of `Σ dO∘O` in float64 on sampled entries of Q, K and V, against the
  /// kernel's gradient: they differ by at most the kernel's bound plus the difference's own
  /// error, `10⁻⁶·(1 + |g|)` (truncation `O(h²)` and cancellation `ε·|f|/h` for `h = 10⁻⁶`).
  private func finiteDifferenceCheck(_ gradients: AttentionGradients, seed: UInt64) -> Check {
    let rng = Philox4x32(seed: seed)
    var worst = 0.0
    var count = 0
    let b = reference.bounds
    for (n, input) in ReferenceGradients.Input.allCases.enumerated() {
      let (kernel, offset, bounds): (Tensor, Int, [Double])
      switch input {
      case .queries: (kernel, offset, bounds) = (gradients.dQ, region.queryOffset, b.dQ)
      case .keys: (kernel, offset, bounds) = (gradients.dK, region.keyOffset, b.dK)
      case .values: (kernel, offset, bounds) = (gradients.dV, region.valueOffset, b.dV)
      }
      guard !bounds.isEmpty else { continue }
      for sample in 0..<4 {
        let word = rng.block(
          major: UInt64(n), minor: UInt32(sample) + 2, stream: RandomStream.sampling
        ).0
        let index = Int((UInt64(word) * UInt64(bounds.count)) >> 32)
        let estimate = reference.finiteDifference(input, index: index)
        let value = Double(kernel.scalars[offset + index])
        let allowed = bounds[index] + 1e-6 * (1 + abs(estimate))
        worst = max(worst, abs(value - estimate) / allowed)
        count += 1
      }
    }
    return Check(
      name: "finite_differences",
      title: "gradients match finite differences (float64)",
      passed: worst <= 1,
      detail: "\(count) entries of dQ, dK, dV; worst |g − Δf/2h| / (bound + 1e-6·(1 + |Δf/2h|)) "
        + "= \(sci(worst))")
  }
}
