import AttentionKit
import Foundation
import Tensors

/// The float64 reference gradients of one attention problem, with, for every element, the
/// largest difference a correct float32 kernel may show from it: what `attn backward` checks a
/// kernel's `dQ`, `dK`, `dV` and `d(bias)` against, and the float64 forward its finite
/// differences perturb.
///
/// The bounds are worst-case, per element, in the manner of `ReferenceAttention.row`, with
/// `u = 2⁻²⁴` and `γₙ = n·u/(1 − n·u)`, built from the reference's own `P` and `dS`:
/// 1. scores are off by `δ = γ_{D+1}·A + 4u·(S + B)` (`A = scale·max Σ_c |q_c·k_c|`, `S` the
///    largest |visible score|, `B` the largest |finite bias|);
/// 2. a probability `P_ij` is off by `ρ_ij·P_ij`, `ρ_ij = 2δ(1 + 2δ) + γ_{Tk+8}
///    + u·(|ln P_ij| + 2(S + B + ln Tk) + 8) (+ 2u with dropout)`: the score error through the
///    softmax, the sum of `Tk` exponentials, and — for the tiled kernel, which recomputes
///    `P = exp(S − L)` — the rounding of `L` and of the exponent;
/// 3. with `M_ij = Σ_c |dO_ic|·|v_jc|`, `z_ij = Z_ij/(1 − p)` and `N_i = Σ_j P_ij·z_ij·M_ij`
///    (which bounds `|Δ_i|`), `Δ_i` is off by at most `N'_i = Σ_j (ρ_ij + γ_{Tk+Dv+2})·P_ij·z_ij·M_ij`,
///    and `dS_ij` by `E_ij = P_ij·((ρ_ij + γ_{Dv+4})·z_ij·M_ij + (ρ_ij + 4u)·N_i + N'_i)`;
/// 4. `dQ_ic` within `scale·Σ_j (E_ij + γ_{Tk+2}|dS_ij|)|k_jc|`, `dK_jc` within
///    `scale·Σ_i (E_ij + γ_{G·Tq+2}|dS_ij|)|q_ic|` (over the `G` heads of a group), `dV_jc` within
///    `Σ_i (ρ_ij + γ_{G·Tq+2})·P_ij·z_ij·|dO_ic|`, `dBias_e` within `Σ (E_ij + γₙ|dS_ij|)` over
///    its `n` contributions;
/// 5. plus `10⁶·λ` (λ = `Float.leastNormalMagnitude`) for probabilities `fastExp` flushes to 0.
/// With score terms, step 1 adds the soft-cap's own `6u·c` and `4u` of the largest |position
/// bias| `Pb` (`S` is then the largest |capped score|), and `ρ` takes `γ_{Tk+9}` and the largest
/// |sink| beside `S + B` (a sink is one more exponential); a soft-cap's factor
/// `f = 1 − (t/c)²` (error `2|t|·δ/c² + 6u`) scales `dS` for `dQ` and `dK`:
/// `E^x_ij = f_ij·E_ij + |dS_ij|·(2|t_ij|·δ/c² + 6u)` takes `E_ij`'s place there. `dσ_h` is within
/// `Σ_i p_sink,i·((ρ_i + γ_n)|Δ_i| + N'_i)` (`ρ_i` with `|ln p_sink,i|`), a T5 table entry within
/// `Σ (E_ij + γ₂|dS_ij|) + u·Σ|dS_ij|` over the scores of its bucket and head.
/// They are about 10⁻⁵ of the sum of |terms| of each element: a dropped key, a missing `Δ`, a
/// wrong scale or a misplaced mask exceeds them by far.
///
/// Memory and time are those of the reference kernel: `O(B·H·Tq·Tk)` doubles, `O(B·H·Tq·Tk·D)`
/// operations — for checking problems of a few million scores.
public struct ReferenceGradients: Sendable {
  /// The reference's values, flat in the layout of `Q`, `K`, `V` and the bias as given.
  public let dQ: [Double]
  public let dK: [Double]
  public let dV: [Double]
  public let dBias: [Double]?
  /// `dσ` `[H]` with sinks, else `nil`; each T5 table's gradient `[buckets·H]`, in
  /// `ScoreTerms.positionBiases` order.
  public let dSinks: [Double]?
  public let dT5Tables: [[Double]]
  /// `dE` `[(2M + 1)·D]` of the relative-position term, `nil` without it.
  public let dRelativeEmbeddings: [Double]?
  /// The output `O` `[…, Tq, Dv]`, flat.
  public let output: [Double]
  /// The softmax `P` (before dropout) and `dS`, `[…, Tq, Tk]` (query heads), flat.
  public let probabilities: [Double]
  public let dS: [Double]
  /// The dropout decisions over `[…, Tq, Tk]` (`true` kept), `nil` without dropout.
  public var dropoutKept: [Bool]? { problem.dropoutKept }
  /// Per element, the largest error of a correct float32 kernel.
  public let bounds: GradientBounds
  /// The largest `|Σ_j dS_ij| / bound_i` over the rows: the softmax's Jacobian makes every row of
  /// `dS` sum to 0, and the float64 reference's own rounding leaves at most
  /// `bound_i = 4·γ⁽⁶⁴⁾_{2Tk+Dv+8}·Σ_j P_ij·(|dP_ij| + |Δ_i|)` (`Σ_j dS_ij = Δ_i·(1 − Σ_j P_ij)` plus
  /// the rounding of each term; `dS_ij = P_ij·(dP_ij − Δ_i)` cancels, so the bound scales with the
  /// terms, not with `Σ_j |dS_ij|`). At most 1 for a correct reference; a wrong `Δ` or a missing
  /// `P` factor is orders of magnitude over.
  public let rowSumOfDSRatio: Double
  let problem: Backward64
  let backwardProblem: BackwardProblem

  /// The reference of `Attention.backward` on these inputs; `dropout`'s decisions are the
  /// counters', as every kernel regenerates them.
  public init(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor,
    mask: AttentionMask = .none, scale: Float? = nil, dropout: Dropout? = nil,
    terms: ScoreTerms = .none, needBiasGradient: Bool = false, rounding: Rounding = .float32
  ) throws {
    try self.init(
      queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
      scale: scale, terms: terms, decisions: dropout.map { .counter($0) } ?? .none,
      needBiasGradient: needBiasGradient, rounding: rounding)
  }

  /// With the dropout decisions given as a keep mask (nonzero = kept, broadcastable to
  /// `[…, Tq, Tk]`) and kept weights scaled by `dropoutKeptScale` (`Dropout.keptScale`): for a
  /// slice of a larger problem, whose counters depend on the flat rows of the whole.
  package init(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor, mask: AttentionMask,
    scale: Float?, terms: ScoreTerms = .none, dropoutKeep: Tensor, dropoutKeptScale: Double,
    needBiasGradient: Bool
  ) throws {
    try self.init(
      queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
      scale: scale, terms: terms,
      decisions: .explicit(keep: dropoutKeep, keptScale: dropoutKeptScale),
      needBiasGradient: needBiasGradient)
  }

  init(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor, mask: AttentionMask,
    scale: Float?, terms: ScoreTerms, decisions: DropoutDecisions, needBiasGradient: Bool,
    rounding: Rounding = .float32
  ) throws {
    let backwardProblem = try BackwardProblem(
      queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
      scale: scale, terms: terms, needBiasGradient: needBiasGradient)
    let expanded = try ReferenceBackward.expand(backwardProblem, dropout: decisions)
    let result = expanded.evaluate()
    problem = expanded
    self.backwardProblem = backwardProblem
    dQ = result.dQ
    dK = result.dK
    dV = result.dV
    output = result.output
    probabilities = result.probabilities
    dS = result.dS
    bounds = GradientBounds(expanded, result, problem: backwardProblem, rounding: rounding)
    let termGradients = ReferenceBackward.exactTermGradients(backwardProblem, result)
    dSinks = termGradients.sinks
    dT5Tables = termGradients.t5Tables
    dRelativeEmbeddings = expanded.relativeEmbeddings == nil ? nil : result.dRelativeEmbeddings
    if let layout = backwardProblem.biasGradient, let bias = mask.bias {
      var sums = [Double](repeating: 0, count: bias.count)
      let (tq, tk) = (expanded.queries, expanded.keys)
      for b in 0..<expanded.batchCount {
        for i in 0..<tq {
          for j in 0..<tk {
            sums[layout.index(batch: b, row: i, column: j)] += result.dS[(b * tq + i) * tk + j]
          }
        }
      }
      dBias = sums
    } else {
      dBias = nil
    }
    var worst = 0.0
    let (tk, dv) = (expanded.keys, expanded.valueDim)
    let allowed = 4 * Rounding.float64.gamma(2 * tk + dv + 8)
    for row in 0..<(expanded.batchCount * expanded.queries) {
      // The sink is one more key: its −p_sink·Δ completes the row.
      var sum = -result.sinkWeights[row] * result.deltas[row]
      for j in 0..<tk { sum += result.dS[row * tk + j] }
      // Rows poisoned by non-finite inputs propagate NaN, which the gradients' check compares.
      guard sum.isFinite, sum != 0 else { continue }
      let bound = allowed * result.dSRowMagnitude[row]
      worst = max(worst, bound > 0 ? abs(sum) / bound : .infinity)
    }
    rowSumOfDSRatio = worst
  }

  /// Which input a finite difference perturbs.
  public enum Input: String, Sendable, CaseIterable {
    case queries, keys, values
  }

  /// The central difference `(f(x + h) − f(x − h)) / 2h` of the loss `f = Σ dO∘O` (the float64
  /// forward, dropout decisions held fixed) along element `index` of `input`, with step
  /// `h = step·max(1, |x|)`: an estimate of that element's gradient, independent of the
  /// backward's formulas. Two reference passes of the whole problem.
  public func finiteDifference(_ input: Input, index: Int, step: Double = 1e-6) -> Double {
    var plus = problem
    var minus = problem
    let x: Double
    switch input {
    case .queries: x = problem.q[index]
    case .keys: x = problem.k[index]
    case .values: x = problem.v[index]
    }
    let h = step * max(1, abs(x))
    switch input {
    case .queries:
      plus.q[index] += h
      minus.q[index] -= h
    case .keys:
      plus.k[index] += h
      minus.k[index] -= h
    case .values:
      plus.v[index] += h
      minus.v[index] -= h
    }
    return Self.centralDifference(plus, minus, step: h)
  }

  /// The central difference of `Σ dO∘O` along sink `σ_head` (every flat batch of that head).
  public func finiteDifferenceOfSink(head: Int, step: Double = 1e-6) -> Double {
    guard let sinks = problem.sinks else { return 0 }
    var plus = problem
    var minus = problem
    let heads =
      backwardProblem.shape.batchShape.count >= 2 ? backwardProblem.shape.batchShape.last! : 1
    let h = step * max(1, abs(sinks[head]))
    for b in 0..<problem.batchCount where b % heads == head {
      plus.sinks![b] += h
      minus.sinks![b] -= h
    }
    return Self.centralDifference(plus, minus, step: h)
  }

  /// The central difference of `Σ dO∘O` along entry `entry` (`bucket·H + h`) of T5 term
  /// `term`'s table: every score that reads it moves.
  public func finiteDifferenceOfT5(term: Int, entry: Int, step: Double = 1e-6) -> Double {
    var plus = problem
    var minus = problem
    let h = step
    let (tq, tk) = (problem.queries, problem.keys)
    for b in 0..<problem.batchCount {
      for i in 0..<tq {
        for j in 0..<tk
        where backwardProblem.t5Entry(term: term, batch: b, query: i, key: j) == entry {
          plus.positionBias![(b * tq + i) * tk + j] += h
          minus.positionBias![(b * tq + i) * tk + j] -= h
        }
      }
    }
    return Self.centralDifference(plus, minus, step: h)
  }

  /// The central difference of `Σ dO∘O` along element `index` of the relative-position
  /// embeddings `E` (`[(2M + 1)·D]`, flat).
  public func finiteDifferenceOfRelativeEmbedding(index: Int, step: Double = 1e-6) -> Double {
    guard let embeddings = problem.relativeEmbeddings else { return 0 }
    var plus = problem
    var minus = problem
    let h = step * max(1, abs(embeddings[index]))
    plus.relativeEmbeddings![index] += h
    minus.relativeEmbeddings![index] -= h
    return Self.centralDifference(plus, minus, step: h)
  }

  private static func centralDifference(_ plus: Backward64, _ minus: Backward64, step h: Double)
    -> Double
  {
    func loss(_ p: Backward64) -> Double {
      zip(p.evaluate().output, p.dO).reduce(0) { $0 + $1.0 * $1.1 }
    }
    return (loss(plus) - loss(minus)) / (2 * h)
  }
}

/// The per-element bounds of `ReferenceGradients` (derived in its comment), in the layouts of
/// `Q`, `K`, `V` and the bias.
public struct GradientBounds: Sendable {
  public var dQ: [Double]
  public var dK: [Double]
  public var dV: [Double]
  /// Shaped as the bias as given; `nil` without a bias gradient.
  public var dBias: [Double]?
  /// `[H]` with sinks, else `nil`; each T5 table's, `[buckets·H]`.
  public var dSinks: [Double]?
  public var dT5Tables: [[Double]]
  /// `[(2M + 1)·D]` with the relative-position term, else `nil`.
  public var dRelativeEmbeddings: [Double]?

  package init(
    _ p: Backward64, _ r: Backward64.Result, problem: BackwardProblem, rounding: Rounding
  ) {
    let u = rounding.unit
    let gamma = rounding.gamma
    let (bh, tq, tk, d, dv) = (p.batchCount, p.queries, p.keys, p.headDim, p.valueDim)
    let group = problem.shape.groupSize
    // Probabilities a kernel flushes below the smallest normal number: 10⁶·λ for float32's and
    // bfloat16's range (far below any gradient worth checking), λ itself for float16's.
    let floor =
      rounding.underflowFloor < 0x1p-100 ? 1e6 * rounding.underflowFloor : rounding.underflowFloor
    // 1. A, S, B, the position biases' Pb and the score error δ.
    var (a, s, bias, positions) = (0.0, 0.0, 0.0, 0.0)
    for b in 0..<bh {
      let g = p.keyValueBatch[b]
      for i in 0..<tq {
        for j in 0..<tk {
          var dot = 0.0
          var magnitude = 0.0
          for c in 0..<d {
            let x = p.q[(b * tq + i) * d + c] * p.k[(g * tk + j) * d + c]
            dot += x
            magnitude += abs(x)
          }
          var position = 0.0
          if let embeddings = p.relativeEmbeddings {
            // The position term's products, summed as the kernels' R = scale·Q·Eᵀ.
            let r = p.relativeIndex(query: i, key: j)
            for c in 0..<d {
              let x = p.q[(b * tq + i) * d + c] * embeddings[r * d + c]
              position += x
              magnitude += abs(x)
            }
          }
          a = max(a, magnitude * abs(p.scale))
          let e = (b * tq + i) * tk + j
          if p.visible[e] {
            let x = dot * p.scale
            s = max(s, abs((p.softcap.map { $0 * tanh(x / $0) } ?? x) + position * p.scale))
            if let value = p.bias?[e], value.isFinite { bias = max(bias, abs(value)) }
            if let value = p.positionBias?[e] { positions = max(positions, abs(value)) }
          }
        }
      }
    }
    let cap = p.softcap ?? 0
    let delta = gamma(d + 1) * a + 6 * u * cap + 4 * u * (s + bias + positions)
    let sinkMagnitude = p.sinks?.map(abs).max() ?? 0
    let rho0 =
      2 * delta * (1 + 2 * delta) + gamma(tk + (p.sinks == nil ? 8 : 9))
      + u * (2 * (s + bias + positions + sinkMagnitude + log(Double(max(tk, 1)))) + 8)
      + (p.dropoutKept == nil ? 0 : 2 * u)
    // 2–3. ρ_ij, z_ij, M_ij, N_i, N'_i and E_ij.
    var rho = [Double](repeating: 0, count: bh * tq * tk)
    var z = [Double](repeating: 1, count: bh * tq * tk)
    var e = [Double](repeating: 0, count: bh * tq * tk)
    var m = [Double](repeating: 0, count: tk)
    var nPrimes = [Double](repeating: 0, count: bh * tq)
    for b in 0..<bh {
      let g = p.keyValueBatch[b]
      for i in 0..<tq {
        let row = b * tq + i
        var n = 0.0
        var nPrime = 0.0
        for j in 0..<tk {
          let x = row * tk + j
          let prob = r.probabilities[x]
          rho[x] = rho0 + (prob > 0 ? u * abs(log(prob)) : 0)
          if let kept = p.dropoutKept { z[x] = kept[x] ? p.keptScale : 0 }
          m[j] = 0
          for c in 0..<dv { m[j] += abs(p.dO[row * dv + c] * p.v[(g * tk + j) * dv + c]) }
          n += prob * z[x] * m[j]
          nPrime += (rho[x] + gamma(tk + dv + 2)) * prob * z[x] * m[j]
        }
        nPrimes[row] = nPrime
        for j in 0..<tk {
          let x = row * tk + j
          e[x] =
            r.probabilities[x]
            * ((rho[x] + gamma(dv + 4)) * z[x] * m[j] + (rho[x] + 4 * u) * n + nPrime)
        }
      }
    }
    // The soft-cap's factor f = 1 − (t/c)² on dS: dX within f·E + |dS|·(2|t|·δ/c² + 6u).
    var ex = e
    var dx = r.dS
    if let c = p.softcap {
      for x in 0..<(bh * tq * tk) {
        let t = c * max(0, 1 - r.capFactors[x]).squareRoot()
        ex[x] = r.capFactors[x] * e[x] + abs(r.dS[x]) * (2 * t * delta / (c * c) + 6 * u)
        dx[x] = r.dS[x] * r.capFactors[x]
      }
    }
    // 4. The gradients' bounds.
    dQ = [Double](repeating: floor, count: r.dQ.count)
    dK = [Double](repeating: floor, count: r.dK.count)
    dV = [Double](repeating: floor, count: r.dV.count)
    var relativeBounds = p.relativeEmbeddings.map { [Double](repeating: floor, count: $0.count) }
    for b in 0..<bh {
      let g = p.keyValueBatch[b]
      for i in 0..<tq {
        let row = b * tq + i
        for j in 0..<tk {
          let x = row * tk + j
          let ds = abs(dx[x])
          for c in 0..<d {
            dQ[row * d + c] +=
              abs(p.scale) * (ex[x] + gamma(tk + 2) * ds) * abs(p.k[(g * tk + j) * d + c])
            dK[(g * tk + j) * d + c] +=
              abs(p.scale) * (ex[x] + gamma(group * tq + 2) * ds) * abs(p.q[row * d + c])
          }
          let pd = r.probabilities[x] * z[x]
          for c in 0..<dv {
            dV[(g * tk + j) * dv + c] +=
              (rho[x] + gamma(group * tq + 2)) * pd * abs(p.dO[row * dv + c])
          }
          if let embeddings = p.relativeEmbeddings {
            // dQ += scale·G·E and dE += scale·Gᵀ·Q, G summing dS (not dX) over keys.
            let index = p.relativeIndex(query: i, key: j)
            let ds = abs(r.dS[x])
            for c in 0..<d {
              dQ[row * d + c] +=
                abs(p.scale) * (e[x] + gamma(2 * tk + 2) * ds) * abs(embeddings[index * d + c])
              relativeBounds![index * d + c] +=
                abs(p.scale) * (e[x] + gamma(tk + bh * tq + 2) * ds) * abs(p.q[row * d + c])
            }
          }
        }
      }
    }
    if let layout = problem.biasGradient, let tensor = problem.mask.bias {
      var counts = [Int](repeating: 0, count: tensor.count)
      for b in 0..<bh {
        for i in 0..<tq {
          for j in 0..<tk { counts[layout.index(batch: b, row: i, column: j)] += 1 }
        }
      }
      var bounds = [Double](repeating: floor, count: tensor.count)
      for b in 0..<bh {
        for i in 0..<tq {
          for j in 0..<tk {
            let x = (b * tq + i) * tk + j
            let out = layout.index(batch: b, row: i, column: j)
            bounds[out] += e[x] + gamma(counts[out]) * abs(r.dS[x])
          }
        }
      }
      dBias = bounds
    } else {
      dBias = nil
    }
    dRelativeEmbeddings = relativeBounds
    // The score terms' parameters.
    if p.sinks != nil {
      let heads = problem.shape.batchShape.count >= 2 ? problem.shape.batchShape.last! : 1
      var bounds = [Double](repeating: floor, count: heads)
      for row in 0..<(bh * tq) where r.sinkWeights[row] > 0 {
        let weight = r.sinkWeights[row]
        let rhoSink = rho0 + u * abs(log(weight)) + gamma(bh * tq)
        bounds[(row / tq) % heads] += weight * (rhoSink * abs(r.deltas[row]) + nPrimes[row])
      }
      dSinks = bounds
    } else {
      dSinks = nil
    }
    dT5Tables = (0..<problem.t5TermCount).map { k in
      var bounds = [Double](repeating: floor, count: problem.t5TableSize(term: k))
      var magnitudes = [Double](repeating: 0, count: bounds.count)
      for b in 0..<bh {
        for i in 0..<tq {
          for j in 0..<tk {
            let x = (b * tq + i) * tk + j
            let entry = problem.t5Entry(term: k, batch: b, query: i, key: j)
            bounds[entry] += e[x] + gamma(2) * abs(r.dS[x])
            magnitudes[entry] += abs(r.dS[x])
          }
        }
      }
      return zip(bounds, magnitudes).map { $0 + u * $1 }
    }
  }
}
