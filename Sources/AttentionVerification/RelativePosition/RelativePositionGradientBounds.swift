import AttentionKit
import Foundation

extension RelativePosition64 {
  /// The float64 gradients (`gradients(gradOutput:)`) with first-order error bounds of a kernel
  /// computing in unit roundoff `unit` with the materialized kernel's order of operations (see
  /// `RelativePositionAttention.backward`), element by element, in `Gradients.bounds`.
  package func gradients(gradOutput dY: [Double], unit: Double) -> Gradients {
    let bounds = RelativePositionGradientBounds(self, dY: dY, unit: unit)
    var result = gradients(gradOutput: dY) { row, p, scores, dP, delta, dS in
      bounds.addRow(row, p: p, scores: scores, dP: dP, delta: delta, dS: dS)
    }
    result.bounds = bounds.finish(result.values)
    return result
  }
}

/// First-order bounds on the errors of the materialized kernel (`RelativePositionAttention.backward`)
/// against the exact gradients, accumulated alongside the reference (see that doc comment).
final class RelativePositionGradientBounds {
  let problem: RelativePosition64
  let q, k, v, dY: [Double]
  let u: Double
  /// The projections' own errors, `γ_{D+1}·(|b_o| + Σ_c |x_c·W_oc|)`, `[B·T, D]`.
  let eQ, eK, eV: [Double]
  var dQ, dK, dV, dE: [Double]

  init(_ problem: RelativePosition64, dY: [Double], unit: Double) {
    self.problem = problem
    q = problem.project(problem.wq, problem.bq)
    k = problem.project(problem.wk, problem.bk)
    v = problem.project(problem.wv, problem.bv)
    (self.dY, u) = (dY, unit)
    let d = problem.modelDim
    let rows = problem.batch * problem.length
    func projectionError(_ w: [Double], _ b: [Double]) -> [Double] {
      var out = [Double](repeating: 0, count: rows * d)
      let g = Self.gamma(d + 1, unit)
      for row in 0..<rows {
        for o in 0..<d {
          var sum = abs(b[o])
          for c in 0..<d { sum += abs(problem.x[row * d + c] * w[o * d + c]) }
          out[row * d + o] = g * sum
        }
      }
      return out
    }
    eQ = projectionError(problem.wq, problem.bq)
    eK = projectionError(problem.wk, problem.bk)
    eV = projectionError(problem.wv, problem.bv)
    dQ = [Double](repeating: 0, count: rows * d)
    dK = dQ
    dV = dQ
    dE = [Double](repeating: 0, count: (2 * problem.maxDistance + 1) * d)
  }

  static func gamma(_ n: Int, _ u: Double) -> Double {
    Rounding(unit: u, underflowFloor: 0).gamma(n)
  }

  /// Adds row `row`'s share: its score error `δ`, the probabilities' relative error `ρ`, the
  /// errors of `dP`, `Δ` and `dS`, and their sums into `dQ`, `dK`, `dV` and `dE`.
  func addRow(
    _ row: Int, p: [Double], scores: [Double], dP: [Double], delta: Double, dS: [Double]
  ) {
    let (b, t, d) = (problem.batch, problem.length, problem.modelDim)
    let (n, i) = (row / t, row % t)
    let scale = problem.scale
    let width = min(2 * problem.maxDistance + 1, 2 * t - 1)
    func gamma(_ n: Int) -> Double { Self.gamma(n, u) }
    // 1. Scores: two sgemms of length D (alpha = the float32 scale), their sum, the bias.
    var delta0 = 0.0
    var peak = 0.0
    for j in 0..<t where problem.visible[row * t + j] {
      let r = problem.index(query: i, key: j)
      var error = 0.0
      for c in 0..<d {
        let key = abs(k[(n * t + j) * d + c]) + abs(problem.e[r * d + c])
        error +=
          (gamma(d + 2) * abs(q[row * d + c]) + eQ[row * d + c]) * key
          + abs(q[row * d + c]) * eK[(n * t + j) * d + c]
      }
      delta0 = max(delta0, scale * error)
      peak = max(peak, abs(scores[j]))
      if let bias = problem.bias?[row * t + j], bias.isFinite { peak = max(peak, abs(bias)) }
    }
    let scoreError = delta0 + 4 * u * peak
    // 2. P: each weight within a factor e^{±2δ}, times the exponentials, sum and division.
    let rho = 2 * scoreError * (1 + 2 * scoreError) + gamma(t + 6)
    // 3. dP_ij = dO_i·v_j (error eP_ij; magnitude M_ij), Δ_i = Σ_j P_ij·dP_ij, dS_ij.
    var magnitude = [Double](repeating: 0, count: t)
    var eP = [Double](repeating: 0, count: t)
    var nSum = 0.0
    var eDelta = 0.0
    for j in 0..<t where p[j] != 0 {
      for c in 0..<d {
        let value = (n * t + j) * d + c
        magnitude[j] += abs(dY[row * d + c] * v[value])
        eP[j] += abs(dY[row * d + c]) * eV[value]
      }
      eP[j] += gamma(d) * magnitude[j]
      nSum += p[j] * magnitude[j]
      eDelta += (rho + gamma(t + 1)) * p[j] * magnitude[j] + p[j] * eP[j]
    }
    // 4. Sums into the gradients: dQ = scale·(dS·K + G·E) (the G sums of ≤ T terms, two sgemms
    //    of lengths T and W, accumulated), dK = scale·dSᵀ·Q, dE = scale·Gᵀ·Q over B·T rows.
    let (gq, gk, ge) = (gamma(2 * t + width + 4), gamma(t + 4), gamma(b * t + t + 4))
    for j in 0..<t where p[j] != 0 {
      let ds = abs(dS[row * t + j])
      let eS = p[j] * ((rho + 2 * u) * (magnitude[j] + nSum) + eP[j] + eDelta)
      let r = problem.index(query: i, key: j)
      for c in 0..<d {
        let key = (n * t + j) * d + c
        let qc = abs(q[row * d + c])
        dQ[row * d + c] +=
          scale * ((eS + gq * ds) * (abs(k[key]) + abs(problem.e[r * d + c])) + ds * eK[key])
        dK[key] += scale * ((eS + gk * ds) * qc + ds * eQ[row * d + c])
        dE[r * d + c] += scale * ((eS + ge * ds) * qc + ds * eQ[row * d + c])
        dV[key] += (rho + gamma(t + 2)) * p[j] * abs(dY[row * d + c])
      }
    }
  }

  /// The bounds of every gradient, the projections' from those of `dQ`, `dK`, `dV`: `dW` and
  /// `db` sums over `B·T` rows, `dx` three sgemms of length `D` accumulated.
  func finish(_ values: [String: [Double]]) -> [String: [Double]] {
    let d = problem.modelDim
    let rows = problem.batch * problem.length
    // fastExp flushes probabilities below float32's normal range: 10⁶·λ covers them times inputs
    // below 10 over fewer than 10⁵ terms (as the attention backward's bounds).
    let floor = 1e6 * Double(Float.leastNormalMagnitude)
    var out: [String: [Double]] = [
      "dQ": dQ, "dK": dK, "dV": dV, "relative_embeddings.weight": dE,
    ]
    var dx = [Double](repeating: 0, count: rows * d)
    let (gw, gx) = (Self.gamma(rows, u), Self.gamma(3 * d, u))
    for (name, e, key, w) in [
      ("W_q", dQ, "dQ", problem.wq), ("W_k", dK, "dK", problem.wk),
      ("W_v", dV, "dV", problem.wv),
    ] {
      let g = values[key]!
      var dW = [Double](repeating: 0, count: d * d)
      var db = [Double](repeating: 0, count: d)
      for row in 0..<rows {
        for o in 0..<d {
          let error = e[row * d + o]
          let magnitude = abs(g[row * d + o])
          db[o] += error + gw * magnitude
          for c in 0..<d {
            dW[o * d + c] += (error + gw * magnitude) * abs(problem.x[row * d + c])
            dx[row * d + c] += (error + gx * magnitude) * abs(w[o * d + c])
          }
        }
      }
      out[name + ".weight"] = dW
      out[name + ".bias"] = db
    }
    out["x"] = dx
    return out.mapValues { $0.map { $0 + floor } }
  }
}
