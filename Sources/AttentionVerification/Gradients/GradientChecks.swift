import AttentionKit
import Foundation

/// The checks of a kernel's gradients, each recomputed independently of the kernel: the float64
/// reference backward (`ReferenceGradients`) on the whole problem or, when that is too large, on
/// the query heads of one key/value head; finite differences of the float64 forward; and the
/// softmax's Jacobian (every row of `dS` sums to 0, within the reference's own rounding).
///
/// Problems over `referenceScoreLimit` scores per key/value group are checked by
/// `SampledGradientChecks` instead (`canCheck(_:)` says which applies, before any work).
public struct GradientChecks: Sendable {
  /// The part of the problem the reference covers: query flat batches `queryBatches` (the heads
  /// of key/value flat batch `keyValueBatch`), or everything.
  public struct Region: Sendable {
    public var queryBatches: Range<Int>
    public var keyValueBatch: Int?
    /// Offsets of the region's first element in the flat Q (and dO), K and V.
    public var queryOffset: Int
    public var keyOffset: Int
    public var valueOffset: Int
    /// The query heads (within `H`) of the region, whose score terms' parameters it holds.
    public var heads: Range<Int> = 0..<0
    /// Whether the region holds every use of those heads' parameters (one batch element), so
    /// that their gradients (`dSinks`, `dT5Tables`' columns) can be compared.
    public var holdsHeadParameters = false
    public var isWhole: Bool { keyValueBatch == nil }
  }

  /// Scores (`G·Tq·Tk` for one key/value head's group) the float64 reference takes on; about a
  /// second per 2²⁴ scores at D = 64.
  public static let referenceScoreLimit = 1 << 24
  /// Scores below which the finite differences run (each entry costs two reference passes).
  public static let finiteDifferenceScoreLimit = 1 << 16

  public let reference: ReferenceGradients
  public let region: Region
  public let shape: AttentionShape

  /// The reference for the whole problem when it has at most `referenceScoreLimit` scores, else
  /// for the group of key/value flat batch `Philox(seed)`; throws when even one group is larger.
  /// Whether the float64 reference covers one key/value group of `shape` (else the gradients
  /// are checked on sampled rows and keys, `SampledGradientChecks`).
  public static func canCheck(_ shape: AttentionShape) -> Bool {
    let (scores, overflow) = shape.queries.multipliedReportingOverflow(by: shape.keys)
    let (group, groupOverflow) = scores.multipliedReportingOverflow(by: shape.groupSize)
    return !overflow && !groupOverflow && group <= referenceScoreLimit
  }

  public init(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor, mask: AttentionMask,
    dropout: Dropout?, needBiasGradient: Bool, seed: UInt64, scale: Float? = nil,
    terms: ScoreTerms = .none, rounding: Rounding = .float32
  ) throws {
    shape = try AttentionShape(queries: queries, keys: keys, values: values)
    let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
    let scores = shape.batchCount * tq * tk
    if scores <= Self.referenceScoreLimit {
      reference = try ReferenceGradients(
        queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
        scale: scale, dropout: dropout, terms: terms, needBiasGradient: needBiasGradient,
        rounding: rounding)
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
    let heads = shape.batchShape.count >= 2 ? shape.batchShape.last! : 1
    let slicedTerms = try terms.slice(heads: (first % heads)..<(first % heads + group), of: heads)
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
        queries: q, keys: k, values: v, gradOutput: dO, mask: sliced, scale: scale,
        terms: slicedTerms, dropoutKeep: Tensor(shape: [1, group, tq, tk], scalars: keep),
        dropoutKeptScale: Double(dropout.keptScale), needBiasGradient: false)
    } else {
      reference = try ReferenceGradients(
        queries: q, keys: k, values: v, gradOutput: dO, mask: sliced, scale: scale,
        terms: slicedTerms, rounding: rounding)
    }
    region = Region(
      queryBatches: batches, keyValueBatch: pick, queryOffset: first * tq * d,
      keyOffset: pick * tk * d, valueOffset: pick * tk * dv,
      heads: (first % heads)..<(first % heads + group),
      holdsHeadParameters: shape.batchCount == heads)
  }

  /// What the reference covers, in words.
  public var coverage: String {
    guard let kv = region.keyValueBatch else { return "every row" }
    let heads = region.queryBatches
    return "query heads \(heads.lowerBound)…\(heads.upperBound - 1) (flat) and key/value head "
      + "\(kv): the whole problem is over the reference's limit"
  }

  /// One gradient over the region, element by element: `kernel` from `offset` against the
  /// reference's `expected` within `bounds`.
  static func measure(
    _ name: String, _ kernel: Tensor, offset: Int, _ expected: [Double], _ bounds: [Double],
    rowLength: Int
  ) -> ErrorMeasurement {
    var m = ErrorMeasurement(tensor: name, shape: kernel.shape)
    m.rowsChecked = rowLength > 0 ? expected.count / rowLength : 0
    for e in expected.indices {
      m.record(
        actual: Double(kernel.scalars[offset + e]), expected: expected[e], bound: bounds[e],
        at: offset + e)
    }
    return m
  }

  /// Each gradient against the reference: `dQ`, `dK`, `dV`, on the whole problem `dBias`, and
  /// the score terms' `dSinks` and `dT5Tables` — of the region's heads when it holds every use of
  /// their parameters (one batch element), else only on the whole problem.
  public func measure(_ gradients: AttentionGradients) -> [ErrorMeasurement] {
    var measurements = measure(dQ: gradients.dQ, dK: gradients.dK, dV: gradients.dV)
    let bounds = reference.bounds
    if region.isWhole, let dBias = gradients.dBias, let expected = reference.dBias,
      let b = bounds.dBias
    {
      measurements.append(
        Self.measure("dBias", dBias, offset: 0, expected, b, rowLength: dBias.shape.last ?? 1))
    }
    guard region.isWhole || region.holdsHeadParameters else { return measurements }
    // The reference's parameters are of the region's heads: the kernel's column h0 + k.
    let heads =
      region.isWhole ? 0..<(shape.batchShape.count >= 2 ? shape.batchShape.last! : 1) : region.heads
    let total = shape.batchShape.count >= 2 ? shape.batchShape.last! : 1
    func column(_ name: String, _ kernel: Tensor, _ expected: [Double], _ bound: [Double])
      -> ErrorMeasurement
    {
      var m = ErrorMeasurement(tensor: name, shape: kernel.shape)
      m.rowsChecked = expected.count / max(heads.count, 1)
      for e in expected.indices {
        let index = (e / heads.count) * total + heads.lowerBound + e % heads.count
        m.record(
          actual: Double(kernel.scalars[index]), expected: expected[e], bound: bound[e], at: index)
      }
      return m
    }
    if let dSinks = gradients.dSinks, let expected = reference.dSinks, let b = bounds.dSinks {
      measurements.append(column("dSinks", dSinks, expected, b))
    }
    for (k, table) in gradients.dT5Tables.enumerated() where k < reference.dT5Tables.count {
      measurements.append(column("dT5", table, reference.dT5Tables[k], bounds.dT5Tables[k]))
    }
    return measurements
  }

  /// The gradients given (from anywhere, in the layouts of Q, K and V) against the reference.
  public func measure(dQ: Tensor?, dK: Tensor?, dV: Tensor?) -> [ErrorMeasurement] {
    let b = reference.bounds
    let (d, dv) = (shape.headDim, shape.valueDim)
    var measurements: [ErrorMeasurement] = []
    if let dQ {
      measurements.append(
        Self.measure("dQ", dQ, offset: region.queryOffset, reference.dQ, b.dQ, rowLength: d))
    }
    if let dK {
      measurements.append(
        Self.measure("dK", dK, offset: region.keyOffset, reference.dK, b.dK, rowLength: d))
    }
    if let dV {
      measurements.append(
        Self.measure("dV", dV, offset: region.valueOffset, reference.dV, b.dV, rowLength: dv))
    }
    return measurements
  }

  public func run(_ gradients: AttentionGradients, seed: UInt64, finiteDifferences: Bool)
    -> [Check]
  {
    let measurements = measure(gradients)
    let worst = measurements.max { $0.worstRatio < $1.worstRatio }
    var checks = [
      Check(
        name: "matches_reference",
        title: "gradients match the float64 reference backward",
        passed: measurements.allSatisfy(\.passed),
        detail: measurements.map { "\($0.tensor) \(scientific($0.worstRatio))" }
          .joined(separator: ", ") + " (error / bound; \(coverage))",
        measurement: worst)
    ]
    checks.append(
      Check(
        name: "ds_rows_sum_to_zero",
        title: "every row of dS sums to 0 (softmax's Jacobian)",
        passed: reference.rowSumOfDSRatio <= 1,
        detail: "largest |Σ_j dS_ij| / (4·γ⁽⁶⁴⁾·Σ_j P·(|dP| + |Δ|)) = "
          + scientific(reference.rowSumOfDSRatio)))
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
        + "= \(scientific(worst))")
  }
}
