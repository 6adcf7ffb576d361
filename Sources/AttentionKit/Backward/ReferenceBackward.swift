import Foundation
import Tensors

/// The dropout decisions a reference backward uses.
package enum DropoutDecisions {
  /// No dropout.
  case none
  /// `Dropout`'s counter-based decisions, as the other kernels regenerate them.
  case counter(Dropout)
  /// A given keep mask (nonzero = kept), broadcastable to `[…, Tq, Tk]`, kept weights scaled by
  /// `keptScale`: for checking the formulas against references computed elsewhere (numpy), which
  /// cannot reproduce our Philox counters, and for a slice of a larger problem.
  case explicit(keep: Tensor, keptScale: Double)
}

/// The plain reference backward: the formulas of `Attention.backward` in `Double`, row by row, with
/// ordinary loops and `Foundation.exp`, no BLAS. What the fast kernels are checked against, and
/// what the finite-difference tests differentiate (`Backward64.evaluate` also gives the output).
package enum ReferenceBackward {
  /// The bytes `compute` allocates for `problem`: per score `P` and `dS` (8 bytes each), the
  /// visibility (1), the expanded bias (8) and dropout decisions (1) when there are any; the
  /// float64 copies of `Q`, `K`, `V`, `dO`, the output and the three gradients.
  package static func workspaceBytes(_ problem: BackwardProblem, hasDropout: Bool) -> Int? {
    let shape = problem.shape
    guard let scores = try? Tensor.elementCount(of: shape.weightsShape) else { return nil }
    let positions = problem.scoreTerms.positionBiases.isEmpty ? 0 : 8
    let perScore = 17 + (problem.mask.bias == nil ? 0 : 8) + (hasDropout ? 1 : 0) + positions
    let vectors =
      2 * problem.queries.count + 2 * problem.keys.count + 2 * problem.values.count
      + 2 * problem.gradOutput.count
    return byteCount([(scores, perScore), (vectors, 8)])
  }

  /// The gradients as `Float` tensors, `dBias`, `dSinks` and `dT5Tables` summed in `Double`
  /// before rounding.
  package static func compute(
    _ problem: BackwardProblem, dropout: DropoutDecisions, memoryBudget: Int?
  ) throws -> AttentionGradients {
    let hasDropout: Bool
    if case .none = dropout { hasDropout = false } else { hasDropout = true }
    let bytes = workspaceBytes(problem, hasDropout: hasDropout)
    try checkBackwardBudget(
      bytes, memoryBudget,
      what:
        "the reference backward's float64 \(shapeForMessage(problem.shape.weightsShape)) scores",
      advice: .useTiledKernel)
    let result = try expand(problem, dropout: dropout).evaluate()
    var (dQ, dK, dV, dBias) = try problem.zeroGradients()
    dQ.scalars = result.dQ.map { Float($0) }
    dK.scalars = result.dK.map { Float($0) }
    dV.scalars = result.dV.map { Float($0) }
    if let bias = problem.biasGradient, dBias != nil {
      let (tq, tk, _, _) = problem.sizes
      var sums = [Double](repeating: 0, count: dBias!.count)
      for b in 0..<problem.shape.batchCount {
        for i in 0..<tq {
          for j in 0..<tk {
            sums[bias.index(batch: b, row: i, column: j)] += result.dS[(b * tq + i) * tk + j]
          }
        }
      }
      dBias!.scalars = sums.map { Float($0) }
    }
    let gradients = termGradients(problem, result)
    return AttentionGradients(
      dQ: dQ, dK: dK, dV: dV, dBias: dBias, dSinks: gradients.sinks,
      dT5Tables: gradients.t5Tables,
      dRelativeEmbeddings: problem.scoreTerms.relativePosition.map {
        Tensor(
          validShape: $0.embeddings.shape, scalars: result.dRelativeEmbeddings.map { Float($0) })
      }, workspaceBytes: bytes ?? .max, kernel: .reference)
  }

  /// `dSinks` and `dT5Tables` from the reference's `dS`, sink weights and `Δ`, summed in
  /// `Double` in increasing (batch, query, key) order.
  static func termGradients(_ problem: BackwardProblem, _ result: Backward64.Result)
    -> (sinks: Tensor?, t5Tables: [Tensor])
  {
    let exact = exactTermGradients(problem, result)
    let heads = problem.terms.heads
    return (
      exact.sinks.map { Tensor(validShape: [heads], scalars: $0.map { Float($0) }) },
      exact.t5Tables.map {
        Tensor(validShape: [$0.count / heads, heads], scalars: $0.map { Float($0) })
      }
    )
  }

  /// `dσ` `[H]` (`nil` without sinks) and each T5 table's gradient `[buckets·H]` in float64.
  package static func exactTermGradients(_ problem: BackwardProblem, _ result: Backward64.Result)
    -> (sinks: [Double]?, t5Tables: [[Double]])
  {
    let terms = problem.terms
    let (tq, tk, _, _) = problem.sizes
    var sinks: [Double]? = nil
    if terms.sinks != nil {
      var sums = [Double](repeating: 0, count: terms.heads)
      for row in 0..<(problem.shape.batchCount * tq) {
        sums[terms.head(row / tq)] -= result.sinkWeights[row] * result.deltas[row]
      }
      sinks = sums
    }
    var tables: [[Double]] = []
    for (k, rule) in terms.t5Rules.enumerated() {
      var sums = [Double](repeating: 0, count: rule.buckets * terms.heads)
      for b in 0..<problem.shape.batchCount {
        for i in 0..<tq {
          for j in 0..<tk {
            sums[problem.t5Entry(term: k, batch: b, query: i, key: j)] +=
              result.dS[(b * tq + i) * tk + j]
          }
        }
      }
      tables.append(sums)
    }
    return (sinks, tables)
  }

  /// `problem` in `Double`, every mask laid out over `[B·H, Tq, Tk]`.
  package static func expand(_ problem: BackwardProblem, dropout: DropoutDecisions) throws
    -> Backward64
  {
    let shape = problem.shape
    let (tq, tk, _, _) = problem.sizes
    let bh = shape.batchCount
    let mask = problem.resolved
    var visible = [Bool](repeating: false, count: bh * tq * tk)
    var bias: [Double]? = mask.bias == nil ? nil : [Double](repeating: 0, count: bh * tq * tk)
    let terms = problem.terms
    var positionBias: [Double]? =
      problem.scoreTerms.positionBiases.isEmpty ? nil : [Double](repeating: 0, count: bh * tq * tk)
    var kept: [Bool]? = nil
    var keptScale = 1.0
    switch dropout {
    case .none: break
    case .counter(let d):
      kept = [Bool](repeating: false, count: bh * tq * tk)
      // The float32 factor the kernels multiply by, exactly.
      keptScale = Double(d.keptScale)
    case .explicit(_, let scale):
      guard scale.isFinite, scale >= 1 else {
        throw AttentionError.invalidArgument(
          "dropout's kept scale must be finite and at least 1, got \(scale)")
      }
      kept = [Bool](repeating: false, count: bh * tq * tk)
      keptScale = scale
    }
    var explicitKeep: BroadcastMatrix? = nil
    if case .explicit(let keep, _) = dropout {
      explicitKeep = try BroadcastMatrix(
        keep, batchShape: shape.batchShape, rows: tq, columns: tk, name: "dropout keep mask")
    }
    for b in 0..<bh {
      for i in 0..<tq {
        let seen = mask.visibleKeys(query: i)
        for j in 0..<tk {
          let e = (b * tq + i) * tk + j
          visible[e] =
            seen.contains(j)
            && (mask.keep.map { $0.value(batch: b, row: i, column: j) != 0 } ?? true)
          if let m = mask.bias { bias![e] = Double(m.value(batch: b, row: i, column: j)) }
          if positionBias != nil {
            positionBias![e] = problem.scoreTerms.exactPositionBias(
              head: terms.head(b), heads: terms.heads, distance: j - (i + terms.alignment))
          }
          switch dropout {
          case .none: break
          case .counter(let d): kept![e] = d.keeps(row: b * tq + i, key: j)
          case .explicit: kept![e] = explicitKeep!.value(batch: b, row: i, column: j) != 0
          }
        }
      }
    }
    return Backward64(
      batchCount: bh, queries: tq, keys: tk, headDim: shape.headDim, valueDim: shape.valueDim,
      keyValueBatch: (0..<bh).map { shape.keyValueBatch($0) },
      scale: Double(problem.scale),
      q: problem.queries.scalars.map { Double($0) }, k: problem.keys.scalars.map { Double($0) },
      v: problem.values.scalars.map { Double($0) },
      dO: problem.gradOutput.scalars.map { Double($0) },
      bias: bias, visible: visible, dropoutKept: kept, keptScale: keptScale,
      softcap: terms.softcap.map(Double.init), positionBias: positionBias,
      sinks: terms.sinks.map { sinks in (0..<bh).map { Double(sinks[terms.head($0)]) } },
      relative: problem.scoreTerms.relativePosition.map {
        ($0.embeddings.scalars.map { Double($0) }, $0.maxDistance)
      })
  }
}

/// A backward problem in `Double` with every mask laid out over `[B·H, Tq, Tk]`: the reference's
/// own inputs, which the finite-difference tests perturb.
///
/// Q `[B·H, Tq, D]`, K `[B·Hkv, Tk, D]`, V `[B·Hkv, Tk, Dv]`, dO `[B·H, Tq, Dv]`, flat; query batch
/// `b` reads key/value batch `keyValueBatch[b]`.
package struct Backward64: Sendable {
  package var batchCount: Int
  package var queries: Int
  package var keys: Int
  package var headDim: Int
  package var valueDim: Int
  package var keyValueBatch: [Int]
  package var scale: Double
  package var q: [Double]
  package var k: [Double]
  package var v: [Double]
  package var dO: [Double]
  /// `[B·H, Tq, Tk]`, added to the scaled scores (`−∞` masks); `nil` for none.
  package var bias: [Double]?
  /// `[B·H, Tq, Tk]`: whether the keep mask, the causal alignment and the window let the query
  /// see the key.
  package var visible: [Bool]
  /// `[B·H, Tq, Tk]`: the dropout decisions (`true` kept); `nil` without dropout.
  package var dropoutKept: [Bool]?
  /// The factor of kept weights, `1/(1 − p)` as the kernels round it (`Dropout.keptScale`) or as
  /// given with an explicit keep mask.
  package var keptScale: Double
  /// The soft-cap `c` of `c·tanh(x/c)` on the scaled scores; `nil` for none.
  package var softcap: Double?
  /// `[B·H, Tq, Tk]`: the score terms' position biases (ALiBi, T5), added after the soft-cap;
  /// `nil` for none.
  package var positionBias: [Double]?
  /// `[B·H]`: the sink logit of each flat batch's head; `nil` without sinks.
  package var sinks: [Double]?
  /// The notebook's relative-position term: `E` `[2M + 1, D]` flat, and `M`; the score gains
  /// `scale·q_i·E[clip(j − i, −M, M) + M]` after the soft-cap. `nil` for none.
  package var relativeEmbeddings: [Double]?
  package var relativeMaxDistance = 0

  package init(
    batchCount: Int, queries: Int, keys: Int, headDim: Int, valueDim: Int, keyValueBatch: [Int],
    scale: Double, q: [Double], k: [Double], v: [Double], dO: [Double], bias: [Double]?,
    visible: [Bool], dropoutKept: [Bool]?, keptScale: Double, softcap: Double? = nil,
    positionBias: [Double]? = nil, sinks: [Double]? = nil,
    relative: (embeddings: [Double], maxDistance: Int)? = nil
  ) {
    relativeEmbeddings = relative?.embeddings
    relativeMaxDistance = relative?.maxDistance ?? 0
    (self.batchCount, self.queries, self.keys, self.headDim, self.valueDim) = (
      batchCount, queries, keys, headDim, valueDim
    )
    self.keyValueBatch = keyValueBatch
    self.scale = scale
    (self.q, self.k, self.v, self.dO) = (q, k, v, dO)
    self.bias = bias
    self.visible = visible
    self.dropoutKept = dropoutKept
    self.keptScale = keptScale
    self.softcap = softcap
    self.positionBias = positionBias
    self.sinks = sinks
  }

  /// Everything the reference computes, flat: the output `[B·H, Tq, Dv]`, the gradients shaped as
  /// `q`, `k`, `v`, and `dS` and `P` (before dropout) `[B·H, Tq, Tk]`.
  package struct Result {
    package var output: [Double]
    package var dQ: [Double]
    package var dK: [Double]
    package var dV: [Double]
    package var dS: [Double]
    package var probabilities: [Double]
    /// Per query row, `Σ_j P_ij·(|dP_ij| + |Δ_i|)`: what `Σ_j dS_ij`'s float64 rounding scales
    /// with (the terms cancel; their sum is 0 in exact arithmetic).
    package var dSRowMagnitude: [Double]
    /// `[B·H·Tq]`: each row's sink weight `p_sink = exp(σ − L)` (0 without sinks, and for a row
    /// that sees no key).
    package var sinkWeights: [Double]
    /// `[B·H·Tq]`: each row's `Δ_i = Σ_j P_ij·dP_ij`.
    package var deltas: [Double]
    /// `[B·H, Tq, Tk]`: the soft-cap's factor `1 − (t/c)²` on each score's gradient (1 without
    /// a soft-cap, 0 where masked).
    package var capFactors: [Double]
    /// `dE`, `[2M + 1, D]`, with the relative-position term; empty without it.
    package var dRelativeEmbeddings: [Double]
  }

  /// `clip(j − i, −M, M) + M`, the row of `E` score `(i, j)` reads.
  package func relativeIndex(query i: Int, key j: Int) -> Int {
    let m = relativeMaxDistance
    return min(max(j - i, -m), m) + m
  }

  /// The forward pass and the gradients, query row by query row; `dK` and `dV` accumulate over
  /// rows (and over the query heads of a group) in increasing order.
  package func evaluate() -> Result {
    let (bh, tq, tk, d, dv) = (batchCount, queries, keys, headDim, valueDim)
    var r = Result(
      output: .init(repeating: 0, count: bh * tq * dv), dQ: .init(repeating: 0, count: q.count),
      dK: .init(repeating: 0, count: k.count), dV: .init(repeating: 0, count: v.count),
      dS: .init(repeating: 0, count: bh * tq * tk),
      probabilities: .init(repeating: 0, count: bh * tq * tk),
      dSRowMagnitude: .init(repeating: 0, count: bh * tq),
      sinkWeights: .init(repeating: 0, count: bh * tq), deltas: .init(repeating: 0, count: bh * tq),
      capFactors: .init(repeating: 0, count: bh * tq * tk),
      dRelativeEmbeddings: .init(repeating: 0, count: relativeEmbeddings?.count ?? 0))
    var scores = [Double](repeating: 0, count: tk)
    var dP = [Double](repeating: 0, count: tk)
    for b in 0..<bh {
      let g = keyValueBatch[b]
      for i in 0..<tq {
        let row = b * tq + i
        // 1. Scores: softcap(scale·q·k) + position bias + bias, −∞ where masked (D = 0: every
        //    scaled score 0, as the forward).
        for j in 0..<tk {
          let e = row * tk + j
          guard visible[e] else {
            scores[j] = -.infinity
            continue
          }
          var dot = 0.0
          for c in 0..<d { dot += q[row * d + c] * k[(g * tk + j) * d + c] }
          var x = d == 0 ? 0 : dot * scale
          r.capFactors[e] = 1
          if let c = softcap {
            x = c * tanh(x / c)
            r.capFactors[e] = 1 - (x / c) * (x / c)
          }
          if let embeddings = relativeEmbeddings, d > 0 {
            let r = relativeIndex(query: i, key: j)
            var position = 0.0
            for c in 0..<d { position += q[row * d + c] * embeddings[r * d + c] }
            x += position * scale
          }
          scores[j] = x + (positionBias?[e] ?? 0) + (bias?[e] ?? 0)
        }
        // 2. P = softmax, the sink in the denominator; a fully masked row keeps zeros everywhere.
        let visiblePeak = scores.contains(where: \.isNaN) ? .nan : (scores.max() ?? -.infinity)
        if visiblePeak == -.infinity { continue }
        let sink = sinks?[b]
        let peak =
          sink.map { visiblePeak.isNaN ? visiblePeak : max(visiblePeak, $0) } ?? visiblePeak
        var sum = sink.map { exp($0 - peak) } ?? 0
        for j in 0..<tk { sum += exp(scores[j] - peak) }
        for j in 0..<tk { r.probabilities[row * tk + j] = exp(scores[j] - peak) / sum }
        if let sink { r.sinkWeights[row] = exp(sink - peak) / sum }
        // 3. O = Pd·V with Pd = P·z, z = keptScale where kept, 0 where dropped.
        func z(_ j: Int) -> Double {
          guard let kept = dropoutKept else { return 1 }
          return kept[row * tk + j] ? keptScale : 0
        }
        for j in 0..<tk {
          let pd = r.probabilities[row * tk + j] * z(j)
          for c in 0..<dv { r.output[row * dv + c] += pd * v[(g * tk + j) * dv + c] }
        }
        // 4. dP = (dO·Vᵀ)∘z, Δ = Σ_j P·dP, dS = P∘(dP − Δ).
        var delta = 0.0
        for j in 0..<tk {
          var dot = 0.0
          for c in 0..<dv { dot += dO[row * dv + c] * v[(g * tk + j) * dv + c] }
          dP[j] = dot * z(j)
          delta += r.probabilities[row * tk + j] * dP[j]
        }
        r.deltas[row] = delta
        // With a sink, Σ_j dS_ij = p_sink·Δ: the sink takes the rest of the Jacobian's row.
        r.dSRowMagnitude[row] += r.sinkWeights[row] * abs(delta)
        for j in 0..<tk {
          let p = r.probabilities[row * tk + j]
          let ds = p * (dP[j] - delta)
          r.dSRowMagnitude[row] += p * (abs(dP[j]) + abs(delta))
          r.dS[row * tk + j] = ds
          // 5. dQ = scale·dX·K, dK += scale·dXᵀ·Q with dX = dS∘(1 − (t/c)²), dV += Pdᵀ·dO.
          let dx = ds * r.capFactors[row * tk + j]
          let pd = p * z(j)
          for c in 0..<d {
            r.dQ[row * d + c] += scale * dx * k[(g * tk + j) * d + c]
            r.dK[(g * tk + j) * d + c] += scale * dx * q[row * d + c]
          }
          for c in 0..<dv { r.dV[(g * tk + j) * dv + c] += pd * dO[row * dv + c] }
          // The position term: dQ_i += scale·dS·E[r], dE[r] += scale·dS·q_i.
          if let embeddings = relativeEmbeddings {
            let index = relativeIndex(query: i, key: j)
            for c in 0..<d {
              r.dQ[row * d + c] += scale * ds * embeddings[index * d + c]
              r.dRelativeEmbeddings[index * d + c] += scale * ds * q[row * d + c]
            }
          }
        }
      }
    }
    return r
  }
}

extension Attention {
  /// The reference backward with the dropout decisions given as a keep mask `dropoutKeep`
  /// (nonzero = kept, broadcastable to `[…, Tq, Tk]`; kept weights scaled by
  /// `1/(1 − dropoutProbability)` in `Double`) instead of `Dropout`'s counters: for checking the
  /// formulas against references computed elsewhere, which cannot reproduce the counters.
  package static func referenceBackward(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor,
    mask: AttentionMask = .none, scale: Float? = nil, dropoutKeep: Tensor,
    dropoutProbability: Double, needBiasGradient: Bool = false
  ) throws -> AttentionGradients {
    guard dropoutProbability >= 0, dropoutProbability < 1 else {
      throw AttentionError.invalidArgument(
        "dropout probability must be in [0, 1), got \(dropoutProbability)")
    }
    let problem = try BackwardProblem(
      queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
      scale: scale, needBiasGradient: needBiasGradient)
    return try ReferenceBackward.compute(
      problem, dropout: .explicit(keep: dropoutKeep, keptScale: 1 / (1 - dropoutProbability)),
      memoryBudget: nil)
  }
}
