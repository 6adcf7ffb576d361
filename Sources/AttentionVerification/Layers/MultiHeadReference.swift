import AttentionKit
import Foundation
import Tensors

/// A `MultiHeadAttention` layer computed in `Double` with plain loops — projections, rotary
/// embeddings, masks, softmax, output projection, layer norm — for chosen query rows, with a
/// bound on how far a correct float32 computation of each value may lie from it.
///
/// The bound follows each stage's worst-case float32 error to first order (Higham, *Accuracy and
/// Stability of Numerical Algorithms*, §3.1; `u = 2⁻²⁴`, `γₙ = n·u/(1 − n·u)`), carrying an
/// absolute error `e` beside every value:
/// - a projection `p = b + Σ_e x_e·W_e` (one sgemm over `E`): `e_p = γ_{E+1}·(|b| + Σ|x_e·W_e|)`;
/// - an RMS norm of a head's `D` values (`queryNorm`, `keyNorm`): output `c` within
///   `|w_c|·r·(1 + |x̂_c|)·max_k e_k + γ₅·|y_c|` (`r = 1/rms`, `x̂ = x·r`: the norm's Jacobian
///   has row sums `≤ |w_c|·r·(1 + |x̂_c|)`; the scaling's own roundings);
/// - a rotated pair: `e' = |cos θ|·e₀ + |sin θ|·e₁ + γ₄·(|x₀| + |x₁|)` (the products, the sum,
///   and the rounding of `cos θ`, `sin θ`);
/// - a score `s_j = scale·Σ_c q_c·k_jc`: `δ_j = γ_{D+3}·scale·Σ|q_c·k_jc| + scale·Σ(e_q·|k| + |q|·e_k)`
///   (the sum, the scale's own rounding, and the projections' errors); with the layer's score
///   terms, a soft-cap `c` adds `γ₆·c` (`c·tanh(x/c)` has slope at most 1), a position bias
///   `γ₂·|bias|`;
/// - the weights, relatively: `ρ = 2·max_j δ_j + γ_{Tk+8}` (`γ_{Tk+9}` with a sink, which joins
///   the denominator), so `|Δw_j| ≤ w_j·ρ` (as `ReferenceRow`);
/// - the context `c = Σ_j w_j·v_j`: `Σ_j w_j·((ρ + γ_{Tk})·|v_j| + e_v)`;
/// - the output projection: `γ_{H·D+1}·(|b| + Σ|c_k·W_k|) + Σ e_c·|W_k|`;
/// - with a layer norm on `z = y + x`: `e_z = e_y + u·|z|`, and output feature `i` is off by at
///   most `|γ_i|·σ⁻¹·(2 + |n_i|)·max_j e_z + γ₈·((|z_i| + |μ|)·σ⁻¹·|γ_i| + |β_i|)`, `n_i` the
///   normalized value (the norm's Jacobian has row sums `≤ σ⁻¹·|γ_i|·(2 + |n_i|)`).
/// A kernel that drops a head, mis-rotates, mis-masks or mis-scales exceeds these at once.
public struct MultiHeadReference: Sendable {
  public let layer: MultiHeadAttention
  public let input: Tensor
  let mask: ResolvedMask
  let positionOffset: Int
  let batch: Int
  let length: Int
  /// `[B, Hkv, T, D]` keys and values to use as they are, in place of `x`'s projections: a
  /// `KVCache`'s stored (rounded or quantized) rows (`KVCache.storedKeys()`).
  let stored: (keys: Tensor, values: Tensor)?
  /// The keys each query may see: the sequence's, and the appended one (`add_bias_kv`).
  var keyCount: Int { length + (layer.appendedKeyValue == nil ? 0 : 1) }

  /// The reference of `layer` on `x` `[B, T, E]` with the forward's masks and offset.
  ///
  /// With `storedKeys` and `storedValues` (`[B, Hkv, T, D]`, exact as a decoder's `KVCache` holds
  /// them: `KVCache.storedKeys()`), the attention uses those keys and values as exact inputs
  /// instead of projecting them from `x`: the reference of a decode through a float16, bfloat16
  /// or q8 cache, whose float32 error it bounds (the storage's own effect is not an error).
  public init(
    layer: MultiHeadAttention, input x: Tensor, keyPaddingMask: Tensor? = nil,
    attentionMask: AttentionMask = .none, positionOffset: Int = 0, storedKeys: Tensor? = nil,
    storedValues: Tensor? = nil
  ) throws {
    let (b, t) = try layer.checkInput(x)
    if storedKeys != nil || storedValues != nil {
      let wanted = [b, layer.keyValueHeads, t, layer.headDim]
      guard storedKeys?.shape == wanted, storedValues?.shape == wanted,
        layer.appendedKeyValue == nil
      else {
        throw AttentionError.shapeMismatch(
          "stored keys and values must both be \(shapeForMessage(wanted)) (and the layer without an appended key), got \(storedKeys.map { shapeForMessage($0.shape) } ?? "none") and \(storedValues.map { shapeForMessage($0.shape) } ?? "none")"
        )
      }
    }
    stored = storedKeys.flatMap { k in storedValues.map { (k, $0) } }
    guard positionOffset >= 0, positionOffset <= Int.max - t else {
      throw AttentionError.invalidArgument(
        "the position offset must be in 0…\(Int.max - t) for \(t) tokens, got \(positionOffset)")
    }
    let combined = try layer.combinedMask(
      attentionMask, keyPaddingMask: keyPaddingMask, batch: b, length: t)
    mask = try ResolvedMask(
      combined, batchShape: [b, layer.heads], queries: t,
      keys: t + (layer.appendedKeyValue == nil ? 0 : 1))
    self.layer = layer
    self.input = x
    self.positionOffset = positionOffset
    batch = b
    length = t
  }

  /// Output rows `(batch, token)`: the layer's output `[E]`, its bound, and each head's weights
  /// `[Tk]` with theirs. Rows of one batch element share their key and value projections.
  public func rows(_ wanted: [(batch: Int, token: Int)]) -> [MultiHeadReferenceRow] {
    var byBatch: [Int: KeyValues] = [:]
    return wanted.map { row in
      let kv =
        byBatch[row.batch]
        ?? {
          let computed = keyValues(batch: row.batch)
          byBatch[row.batch] = computed
          return computed
        }()
      return self.row(batch: row.batch, token: row.token, keyValues: kv)
    }
  }

  /// Whether the masks hide key `j` from query `i` of head `h` in batch element `b` (a keep
  /// mask's 0, a bias of `−∞`, the causal diagonal or window, or padding).
  public func isHidden(batch b: Int, head h: Int, query i: Int, key j: Int) -> Bool {
    let flat = b * layer.heads + h
    if !mask.visibleKeys(query: i).contains(j) { return true }
    if let keep = mask.keep, keep.value(batch: flat, row: i, column: j) == 0 { return true }
    if let bias = mask.bias, bias.value(batch: flat, row: i, column: j) == -.infinity {
      return true
    }
    return false
  }

  /// Values with their error bounds.
  struct Bounded {
    var value: [Double]
    var error: [Double]
  }

  /// Keys and values of every token of one batch element: `[T][Hkv·D]`, rotated.
  struct KeyValues {
    var keys: [Bounded]
    var values: [Bounded]
  }

  /// `x_row·Wᵀ + b` in `Double`, with `γ_{E+1}·(|b| + Σ|x·W|)`.
  func project(_ layer: Linear, batch b: Int, token t: Int) -> Bounded {
    let e = self.layer.embedDim
    let x = input.scalars[((b * length + t) * e)..<((b * length + t + 1) * e)].map(Double.init)
    return Self.project(layer, x: x, errors: nil)
  }

  /// `x·Wᵀ + b` for a row `x` whose entries carry `errors` (or none).
  static func project(_ layer: Linear, x: [Double], errors: [Double]?) -> Bounded {
    let (width, outputs) = (layer.inputFeatures, layer.outputFeatures)
    let gamma = Float32Rounding.gamma(width + 1)
    var result = Bounded(
      value: [Double](repeating: 0, count: outputs), error: [Double](repeating: 0, count: outputs))
    layer.weight.scalars.withUnsafeBufferPointer { w in
      for o in 0..<outputs {
        let bias = layer.bias.map { Double($0.scalars[o]) } ?? 0
        var (sum, magnitude, carried) = (bias, abs(bias), 0.0)
        for c in 0..<width {
          let weight = Double(w[o * width + c])
          sum += x[c] * weight
          magnitude += abs(x[c] * weight)
          if let errors { carried += errors[c] * abs(weight) }
        }
        result.value[o] = sum
        result.error[o] = gamma * magnitude + carried
      }
    }
    return result
  }

  /// Rotates each head's `D` values of `v` (heads side by side) at `position` — their first
  /// `rotary.dimension` features — with the bound.
  func rotate(_ v: inout Bounded, position: Int) {
    guard let rotary = layer.rotary else { return }
    let d = layer.headDim
    let gamma = Float32Rounding.gamma(4)
    for head in 0..<(v.value.count / d) {
      let base = head * d
      for i in 0..<(rotary.dimension / 2) {
        let angle = Double(position) * rotary.frequency(i)
        let (c, s) = (cos(angle) * rotary.attentionFactor, sin(angle) * rotary.attentionFactor)
        let (a, b) = rotary.pair(i)
        let (x0, x1) = (v.value[base + a], v.value[base + b])
        let (e0, e1) = (v.error[base + a], v.error[base + b])
        let own = gamma * (abs(x0) + abs(x1))
        v.value[base + a] = x0 * c - x1 * s
        v.value[base + b] = x0 * s + x1 * c
        v.error[base + a] = abs(c) * e0 + abs(s) * e1 + own
        v.error[base + b] = abs(s) * e0 + abs(c) * e1 + own
      }
    }
  }

  /// Each head's `D` values of `v` (heads side by side) through `norm`, with the bound.
  func normalize(_ v: inout Bounded, _ norm: RMSNorm?) {
    guard let norm else { return }
    let d = layer.headDim
    let gamma = Float32Rounding.gamma(5)
    for head in 0..<(v.value.count / d) {
      let base = head * d
      let r = norm.inverseRMS(d) { v.value[base + $0] }
      let worst = v.error[base..<(base + d)].max() ?? 0
      for c in 0..<d {
        let normalized = v.value[base + c] * r
        let y = normalized * norm.scale(c)
        v.value[base + c] = y
        v.error[base + c] = abs(norm.scale(c)) * r * (1 + abs(normalized)) * worst + gamma * abs(y)
      }
    }
  }

  func keyValues(batch b: Int) -> KeyValues {
    var result = KeyValues(keys: [], values: [])
    if let stored {
      // Token t's heads side by side, `[Hkv·D]`, exact.
      let (hkv, d) = (layer.keyValueHeads, layer.headDim)
      for t in 0..<length {
        for (tensor, list) in [(stored.keys, \KeyValues.keys), (stored.values, \KeyValues.values)] {
          var row = [Double](repeating: 0, count: hkv * d)
          for head in 0..<hkv {
            let base = ((b * hkv + head) * length + t) * d
            for c in 0..<d { row[head * d + c] = Double(tensor.scalars[base + c]) }
          }
          result[keyPath: list].append(
            Bounded(value: row, error: [Double](repeating: 0, count: hkv * d)))
        }
      }
      return result
    }
    for t in 0..<length {
      var k = project(layer.keyProjection, batch: b, token: t)
      normalize(&k, layer.keyNorm)
      rotate(&k, position: positionOffset + t)
      result.keys.append(k)
      result.values.append(project(layer.valueProjection, batch: b, token: t))
    }
    if let appended = layer.appendedKeyValue {
      // The appended key and value are parameters, exact as stored.
      for (row, list) in [(appended.key, \KeyValues.keys), (appended.value, \KeyValues.values)] {
        result[keyPath: list].append(
          Bounded(
            value: row.scalars.map(Double.init),
            error: [Double](repeating: 0, count: row.count)))
      }
    }
    return result
  }

  func row(batch b: Int, token i: Int, keyValues kv: KeyValues) -> MultiHeadReferenceRow {
    let (h, d, tk) = (layer.heads, layer.headDim, keyCount)
    let group = h / layer.keyValueHeads
    // The exact scale (1/√D unless the model gives one): the float32 layer's rounded scale is
    // one of the errors the bound covers.
    let scale = layer.exactScale
    let terms = layer.terms
    var q = project(layer.queryProjection, batch: b, token: i)
    normalize(&q, layer.queryNorm)
    rotate(&q, position: positionOffset + i)
    var context = Bounded(
      value: [Double](repeating: 0, count: h * d), error: [Double](repeating: 0, count: h * d))
    var weights: [[Double]] = []
    var weightBounds: [[Double]] = []
    let scoreGamma = Float32Rounding.gamma(d + 3)
    for head in 0..<h {
      let kvBase = (head / group) * d
      let qBase = head * d
      let flat = b * h + head
      var scores = [Double](repeating: -.infinity, count: tk)
      var worst = 0.0
      for j in mask.visibleKeys(query: i) {
        if let keep = mask.keep, keep.value(batch: flat, row: i, column: j) == 0 { continue }
        var (dot, magnitude, carried) = (0.0, 0.0, 0.0)
        for c in 0..<d {
          let (qc, kc) = (q.value[qBase + c], kv.keys[j].value[kvBase + c])
          dot += qc * kc
          magnitude += abs(qc * kc)
          carried += q.error[qBase + c] * abs(kc) + abs(qc) * kv.keys[j].error[kvBase + c]
        }
        var s = dot * scale
        var error = scoreGamma * abs(scale) * magnitude + abs(scale) * carried
        if let c = terms.softcap.map(Double.init) {
          s = c * tanh(s / c)
          error += Float32Rounding.gamma(6) * c
        }
        if !terms.positionBiases.isEmpty {
          // Distances as the kernels see them: j − i (the layer's full pass, top-left).
          let bias = terms.exactPositionBias(head: head, heads: h, distance: j - i)
          s += bias
          error += Float32Rounding.gamma(2) * abs(bias)
        }
        if let bias = mask.bias {
          s += Double(bias.value(batch: flat, row: i, column: j))
          error += Float32Rounding.gamma(1) * abs(s)
        }
        if s == -.infinity { continue }
        scores[j] = s
        worst = max(worst, error)
      }
      let visiblePeak = scores.max() ?? -.infinity
      let sink = terms.sinks.map { Double($0[head]) }
      var w = [Double](repeating: 0, count: tk)
      var bound = [Double](repeating: 0, count: tk)
      if visiblePeak > -.infinity {
        // A sink is one more key with no value, in the shift and the denominator.
        let peak = max(visiblePeak, sink ?? visiblePeak)
        let exps = scores.map { exp($0 - peak) }
        let sum = exps.reduce(0, +) + (sink.map { exp($0 - peak) } ?? 0)
        let rho = 2 * worst + Float32Rounding.gamma(tk + (sink == nil ? 8 : 9))
        let sumGamma = Float32Rounding.gamma(tk)
        // A weight below float32's smallest normal may come out anywhere in [0, λ] (flushed by
        // fastExp, or rounded twice on the subnormal grid): an absolute floor λ on it and on its
        // share of the context (ReferenceAttention.row does the same).
        let floor = Rounding.float32.underflowFloor
        for j in 0..<tk where exps[j] > 0 {
          w[j] = exps[j] / sum
          let flushed = w[j] > 0 ? floor : 0
          bound[j] = w[j] * rho + flushed
          for c in 0..<d {
            let v = kv.values[j].value[kvBase + c]
            context.value[qBase + c] += w[j] * v
            context.error[qBase + c] +=
              w[j] * ((rho + sumGamma) * abs(v) + kv.values[j].error[kvBase + c])
              + flushed * abs(v)
          }
        }
      }
      weights.append(w)
      weightBounds.append(bound)
    }
    let y = finish(context, batch: b, token: i)
    return MultiHeadReferenceRow(
      batch: b, token: i, output: y.value, bound: y.error, weights: weights,
      weightBounds: weightBounds)
  }

  /// Steps 4–5 on a context row (`[H·D]`, heads side by side, with its error bounds): the output
  /// projection and, for BERT, `LayerNorm(· + x)` of token `i` of batch element `b`.
  func finish(_ context: Bounded, batch b: Int, token i: Int) -> Bounded {
    var y = Self.project(layer.outputProjection, x: context.value, errors: context.error)
    if let norm = layer.residualNorm {
      let e = layer.embedDim
      let x = (0..<e).map { Double(input.scalars[(b * length + i) * e + $0]) }
      let u = Float32Rounding.unit
      var z = y.value
      for c in 0..<e {
        z[c] += x[c]
        y.error[c] += u * abs(z[c])
      }
      let (mean, inverse) = norm.statistics(e) { z[$0] }
      let worstZ = y.error.max() ?? 0
      let gamma8 = Float32Rounding.gamma(8)
      for c in 0..<e {
        let n = (z[c] - mean) * inverse
        let (g, beta) = (Double(norm.weight.scalars[c]), Double(norm.bias.scalars[c]))
        y.value[c] = n * g + beta
        y.error[c] =
          abs(g) * inverse * (2 + abs(n)) * worstZ
          + gamma8 * ((abs(z[c]) + abs(mean)) * inverse * abs(g) + abs(beta))
      }
    }
    return y
  }

  // MARK: - Stage by stage

  /// Token `t` of batch element `b`'s projections in `Double` from `x`, rotated: queries
  /// `[H·D]`, keys and values `[Hkv·D]` (heads side by side), each with its bound — the first
  /// stage alone, so that its bound does not compound with the later ones'.
  public func projections(batch b: Int, token t: Int) -> (
    queries: (value: [Double], bound: [Double]), keys: (value: [Double], bound: [Double]),
    values: (value: [Double], bound: [Double])
  ) {
    var q = project(layer.queryProjection, batch: b, token: t)
    var k = project(layer.keyProjection, batch: b, token: t)
    normalize(&q, layer.queryNorm)
    normalize(&k, layer.keyNorm)
    rotate(&q, position: positionOffset + t)
    rotate(&k, position: positionOffset + t)
    let v = project(layer.valueProjection, batch: b, token: t)
    return ((q.value, q.error), (k.value, k.error), (v.value, v.error))
  }

  /// The last stage alone: the layer's output for token `t` of batch element `b` from a float32
  /// context row `[H·D]` (the attention's output, heads side by side), with its bound.
  public func output(fromContext context: [Float], batch b: Int, token t: Int) -> (
    value: [Double], bound: [Double]
  ) {
    let row = Bounded(
      value: context.map(Double.init), error: [Double](repeating: 0, count: context.count))
    let y = finish(row, batch: b, token: t)
    return (y.value, y.error)
  }
}

/// One query row of `MultiHeadReference`.
public struct MultiHeadReferenceRow: Sendable {
  public var batch: Int
  public var token: Int
  /// The layer's output `[E]` and, per feature, the largest error a correct float32 layer shows.
  public var output: [Double]
  public var bound: [Double]
  /// `[H][Tk]`: each head's weights and their bounds.
  public var weights: [[Double]]
  public var weightBounds: [[Double]]
}
