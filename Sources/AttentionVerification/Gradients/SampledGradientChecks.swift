import AttentionKit
import Foundation

/// The gradients of a problem of any length checked in memory linear in `T`: sampled query rows
/// for `dQ`, sampled keys for `dK` and `dV`, through the forward's saved output `O` and
/// log-sum-exp `L` — as FlashAttention's backward itself works.
///
/// Two checks, each in float64 from the inputs:
/// 1. `forward_matches_reference`: on the sampled query rows, the forward's `O` against
///    `ReferenceAttention.row` and its `L` against `log Σ_j exp(s_ij)` within
///    `2·max_j δ_ij + γ_{Tk+8} + 2u·|L| + u` (`δ_ij` the score bound of `ReferenceAttention.score`).
/// 2. `gradients_match_reference`: given that `O` and `L` (float32 values taken as exact inputs,
///    which the kernel's backward also reads), `P_ij = exp(s_ij − L_i)`, `Δ_i = Σ_c dO_ic·O_ic`,
///    `dP_ij = z_ij·Σ_c dO_ic·v_jc`, `dS_ij = P_ij·(dP_ij − Δ_i)`, and
///    `dQ_i = scale·Σ_j dS_ij·k_j` (sampled rows, a sum over `Tk` keys),
///    `dK_j = scale·Σ_i dS_ij·q_i`, `dV_j = Σ_i P_ij·z_ij·dO_i` (sampled keys, sums over the `G·Tq`
///    rows of their group), within per-element bounds of the same form as `ReferenceGradients`:
///    `P` off by `ρ_ij = 2δ_ij(1 + 2δ_ij) + u·(|s_ij| + |L_i| + 8)` relative (the score, the
///    subtraction and `exp`), `Δ_i` by `γ_{Dv}·Σ_c |dO_ic·O_ic|`, `dP_ij` by `γ_{Dv+2}·z_ij·M_ij`
///    (`M_ij = Σ_c |dO_ic|·|v_jc|`), so `dS_ij` by
///    `E_ij = P_ij·((ρ_ij + 2u)(z_ij·M_ij + |Δ_i|) + γ_{Dv+2}·z_ij·M_ij + γ_{Dv}·Σ_c |dO_ic·O_ic|)`,
///    and the sums by `|scale|·Σ (E + γ_{n+2}|dS|)·|k or q|` and `Σ (ρ + γ_{n+2})·P·z·|dO|`.
/// With score terms, `s_ij` is theirs (`ReferenceAttention.exactScore`) and `L` includes the
/// sink; under a soft-cap `c`, `dQ` and `dK` sum `dX = dS·f`, `f = 1 − (t/c)²` (`t` the capped
/// product), within `f·E + |dS|·(2|t|·δ/c² + 6u)`. `dσ_h = −Σ_i exp(σ_h − L_i)·Δ_i` is checked
/// over every row (it needs only `L` and `Δ`), within `Σ_i p_sink,i·((ρ_i + γ_n)|Δ_i| + ε_i)`
/// (`ρ_i = u·(|σ| + |L_i| + 8)`, `ε_i` the error of `Δ_i`).
/// `d(bias)` and T5's table gradient are not checked here (their sums need every score); the
/// report says so.
/// Cost: `O((rows·Tk + keys·G·Tq)·(D + Dv))` float64 operations, `O(B·H·Tq)` memory.
public struct SampledGradientChecks: Sendable {
  public let reference: ReferenceAttention
  public let gradOutput: Tensor
  /// The forward's output `[…, Tq, Dv]` (after dropout) and log-sum-exp `[…, Tq]`, float32.
  public let output: Tensor
  public let logSumExp: Tensor
  /// Sampled flat query rows `(batch, query)` and keys `(key/value batch, key)`.
  public let rows: [(batch: Int, query: Int)]
  public let keys: [(batch: Int, key: Int)]
  let dropout: Dropout?
  let scale: Double
  /// `Δ_i` and `γ_{Dv}·Σ_c |dO_ic·O_ic|` for every flat query row.
  let delta: [Double]
  let deltaError: [Double]

  public init(
    problem: AttentionProblem, gradOutput: Tensor, output: Tensor, logSumExp: Tensor,
    seed: UInt64, rowCount: Int = 32, keyCount: Int = 32
  ) throws {
    reference = try problem.reference()
    let shape = reference.shape
    guard gradOutput.shape == shape.outputShape, output.shape == shape.outputShape else {
      throw AttentionError.shapeMismatch(
        "dO \(shapeForMessage(gradOutput.shape)) and O \(shapeForMessage(output.shape)) must "
          + "have the output's shape \(shapeForMessage(shape.outputShape))")
    }
    guard logSumExp.count == shape.batchCount * shape.queries else {
      throw AttentionError.shapeMismatch(
        "the log-sum-exp \(shapeForMessage(logSumExp.shape)) must hold one value per query row "
          + "(\(shape.batchCount * shape.queries))")
    }
    self.gradOutput = gradOutput
    self.output = output
    self.logSumExp = logSumExp
    dropout = problem.dropout
    scale = Double(shape.resolvedScale(problem.scale))
    rows = RowSample.rows(shape: shape, seed: seed, limit: rowCount, count: rowCount)
    let keyBatches = shape.batchCount / max(shape.groupSize, 1)
    keys = RowSample.rows(
      batchCount: keyBatches, queries: shape.keys, seed: seed &+ 1, limit: keyCount,
      count: keyCount
    ).map { ($0.batch, $0.query) }
    let dv = shape.valueDim
    let gamma = Rounding.float32.gamma(dv)
    var delta = [Double](repeating: 0, count: shape.batchCount * shape.queries)
    var deltaError = delta
    for row in delta.indices {
      var (sum, magnitude) = (0.0, 0.0)
      for c in 0..<dv {
        let term = Double(gradOutput.scalars[row * dv + c]) * Double(output.scalars[row * dv + c])
        sum += term
        magnitude += abs(term)
      }
      delta[row] = sum
      deltaError[row] = gamma * magnitude
    }
    self.delta = delta
    self.deltaError = deltaError
  }

  /// One term `(i, j)` of the backward: `P`, `P·z`, `dS` and their bounds' factors.
  private struct Term {
    var p = 0.0
    var pz = 0.0
    var dS = 0.0
    /// `dS`, times the soft-cap's factor when there is one: what `dQ` and `dK` sum.
    var dX = 0.0
    /// `ρ_ij` and `E_ij` (of `dX`).
    var rho = 0.0
    var error = 0.0
  }

  /// The term of flat query row `b·Tq + i` and key `j` (of its key/value batch).
  private func term(batch b: Int, query i: Int, key j: Int) -> Term? {
    let shape = reference.shape
    let (tq, dv) = (shape.queries, shape.valueDim)
    let (s, delta0) = reference.score(batch: b, query: i, key: j)
    guard s > -.infinity else { return nil }
    let row = b * tq + i
    let l = Double(logSumExp.scalars[row])
    let u = Rounding.float32.unit
    let p = exp(s - l)
    let kept = dropout.map { $0.keeps(row: row, key: j) } ?? true
    // The float32 factor the kernels multiply by (0 for p = 1), exactly.
    let z = kept ? (dropout.map { Double($0.keptScale) } ?? 1) : 0
    let kv = shape.keyRowOffset(b)
    var (dot, magnitude) = (0.0, 0.0)
    for c in 0..<dv {
      let product =
        Double(gradOutput.scalars[row * dv + c])
        * Double(reference.values.scalars[(kv + j) * dv + c])
      dot += product
      magnitude += abs(product)
    }
    let dP = z * dot
    let rho =
      2 * delta0 * (1 + 2 * delta0) + u * (abs(s) + abs(l) + 8)
      + (dropout == nil ? 0 : 2 * u)
    let gammaP = Rounding.float32.gamma(dv + 2)
    var error =
      p
      * ((rho + 2 * u) * (z * magnitude + abs(delta[row])) + gammaP * z * magnitude
        + deltaError[row])
    let dS = p * (dP - delta[row])
    var dX = dS
    if let t = reference.cappedProduct(batch: b, query: i, key: j),
      let c = reference.terms.softcap.map(Double.init)
    {
      // dQ and dK take dX = dS·(1 − (t/c)²).
      let factor = 1 - (t / c) * (t / c)
      error = factor * error + abs(dS) * (2 * abs(t) * delta0 / (c * c) + 6 * u)
      dX = dS * factor
    }
    return Term(p: p, pz: p * z, dS: dS, dX: dX, rho: rho, error: error)
  }

  /// `dσ_h` over every row from `L` and `Δ` against the kernel's, when there are sinks.
  func sinkMeasurement(_ gradients: AttentionGradients) -> ErrorMeasurement? {
    guard let dSinks = gradients.dSinks, reference.sink(batch: 0) != nil else { return nil }
    let shape = reference.shape
    let heads = dSinks.count
    let u = Rounding.float32.unit
    let n = shape.batchCount * shape.queries
    var expected = [Double](repeating: 0, count: heads)
    var bounds = [Double](repeating: 1e6 * Double(Float.leastNormalMagnitude), count: heads)
    for row in 0..<n {
      let l = Double(logSumExp.scalars[row])
      guard l > -.infinity, let sink = reference.sink(batch: row / shape.queries) else { continue }
      let weight = exp(sink - l)
      let h = (row / shape.queries) % heads
      expected[h] -= weight * delta[row]
      let rho = u * (abs(sink) + abs(l) + 8) + Rounding.float32.gamma(n)
      bounds[h] += weight * (rho * abs(delta[row]) + deltaError[row])
    }
    var m = ErrorMeasurement(tensor: "dSinks", shape: dSinks.shape)
    m.rowsChecked = heads
    for h in 0..<heads {
      m.record(
        actual: Double(dSinks.scalars[h]), expected: expected[h], bound: bounds[h], at: h)
    }
    return m
  }

  /// The forward's `O` and `L` on the sampled rows against the float64 reference.
  public func forwardCheck() -> Check {
    let shape = reference.shape
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    var o = ErrorMeasurement(tensor: "output", shape: output.shape)
    var l = ErrorMeasurement(tensor: "logsumexp", shape: logSumExp.shape)
    let u = Rounding.float32.unit
    for (b, i) in rows {
      let row = b * tq + i
      let expected = reference.row(batch: b, query: i)
      o.rowsChecked += 1
      l.rowsChecked += 1
      for c in 0..<dv {
        o.record(
          actual: Double(output.scalars[row * dv + c]), expected: expected.output[c],
          bound: expected.outputBounds[c], at: row * dv + c)
      }
      var (peak, worst) = (-Double.infinity, 0.0)
      var scores = [Double](repeating: 0, count: tk)
      for j in 0..<tk {
        let (s, bound) = reference.score(batch: b, query: i, key: j)
        scores[j] = s
        if s.isNaN || s > peak { peak = s }
        if s.isFinite { worst = max(worst, bound) }
      }
      var lse = peak
      let sink = reference.sink(batch: b)
      if peak.isFinite {
        // A sink is one more key in the denominator (a row that sees no key keeps −∞).
        let top = max(peak, sink ?? peak)
        var sum = sink.map { exp($0 - top) } ?? 0
        for s in scores { sum += exp(s - top) }
        lse = top + log(sum)
      }
      let bound =
        2 * worst + Rounding.float32.gamma(tk + (sink == nil ? 8 : 9)) + 2 * u * abs(lse) + u
      l.record(actual: Double(logSumExp.scalars[row]), expected: lse, bound: bound, at: row)
    }
    o.merge(l)
    o.rowsChecked = rows.count
    return Check(
      name: "forward_matches_reference",
      title: "forward O and log-sum-exp match the float64 reference", measurement: o)
  }

  /// `dQ` on the sampled rows, `dK` and `dV` on the sampled keys.
  public func measure(_ gradients: AttentionGradients) -> [ErrorMeasurement] {
    let shape = reference.shape
    let (tq, tk, d, dv, group) = (
      shape.queries, shape.keys, shape.headDim, shape.valueDim, shape.groupSize
    )
    let q = reference.queries.scalars
    let k = reference.keys.scalars
    let dO = gradOutput.scalars
    var mQ = ErrorMeasurement(tensor: "dQ", shape: gradients.dQ.shape)
    let gammaRows = Rounding.float32.gamma(tk + 2)
    for (b, i) in rows {
      let row = b * tq + i
      let kv = shape.keyRowOffset(b)
      var value = [Double](repeating: 0, count: d)
      var bound = [Double](repeating: 0, count: d)
      for j in 0..<tk {
        guard let t = term(batch: b, query: i, key: j) else { continue }
        for c in 0..<d {
          let key = Double(k[(kv + j) * d + c])
          value[c] += scale * t.dX * key
          bound[c] += abs(scale) * (t.error + gammaRows * abs(t.dX)) * abs(key)
        }
      }
      mQ.rowsChecked += 1
      for c in 0..<d {
        mQ.record(
          actual: Double(gradients.dQ.scalars[row * d + c]), expected: value[c], bound: bound[c],
          at: row * d + c)
      }
    }
    var mK = ErrorMeasurement(tensor: "dK", shape: gradients.dK.shape)
    var mV = ErrorMeasurement(tensor: "dV", shape: gradients.dV.shape)
    let gammaKeys = Rounding.float32.gamma(group * tq + 2)
    for (g, j) in keys {
      var dK = [Double](repeating: 0, count: d)
      var dKBound = dK
      var dV = [Double](repeating: 0, count: dv)
      var dVBound = dV
      for b in (g * group)..<((g + 1) * group) {
        for i in 0..<tq {
          guard let t = term(batch: b, query: i, key: j) else { continue }
          let row = b * tq + i
          for c in 0..<d {
            let query = Double(q[row * d + c])
            dK[c] += scale * t.dX * query
            dKBound[c] += abs(scale) * (t.error + gammaKeys * abs(t.dX)) * abs(query)
          }
          for c in 0..<dv {
            let upstream = Double(dO[row * dv + c])
            dV[c] += t.pz * upstream
            dVBound[c] += (t.rho + gammaKeys) * t.pz * abs(upstream)
          }
        }
      }
      let key = g * tk + j
      mK.rowsChecked += 1
      mV.rowsChecked += 1
      for c in 0..<d {
        mK.record(
          actual: Double(gradients.dK.scalars[key * d + c]), expected: dK[c], bound: dKBound[c],
          at: key * d + c)
      }
      for c in 0..<dv {
        mV.record(
          actual: Double(gradients.dV.scalars[key * dv + c]), expected: dV[c], bound: dVBound[c],
          at: key * dv + c)
      }
    }
    return [mQ, mK, mV] + [sinkMeasurement(gradients)].compactMap { $0 }
  }

  public func run(_ gradients: AttentionGradients) -> [Check] {
    let measurements = measure(gradients)
    let worst = measurements.max { $0.worstRatio < $1.worstRatio }
    return [
      forwardCheck(),
      Check(
        name: "matches_reference",
        title: "gradients match the float64 reference backward",
        passed: measurements.allSatisfy(\.passed),
        detail: measurements.map { "\($0.tensor) \(scientific($0.worstRatio))" }
          .joined(separator: ", ")
          + " (error / bound; \(rows.count) sampled rows of dQ, \(keys.count) sampled keys of "
          + "dK and dV, through the forward's log-sum-exp"
          + (gradients.dSinks == nil ? "" : "; dSinks over every row")
          + (gradients.dBias == nil && gradients.dT5Tables.isEmpty
            ? ")" : "; d(bias) and T5's table are not checked on samples)"),
        measurement: worst),
    ]
  }
}
