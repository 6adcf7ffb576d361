import Foundation
import Tensors

/// The gradients of `RelativePositionAttention` for an upstream gradient `dY`, as
/// `RelativePositionAttention.backward` returns them.
///
/// Shape legend: `B` batch, `T` sequence length, `D` model width (`d_model`), `M` largest
/// relative distance (the table `E` has `2M + 1` rows).
public struct RelativePositionGradients: Sendable {
  /// `∂L/∂x`, `[B, T, D]`: `dQ·W_q + dK·W_k + dV·W_v`.
  public var dx: Tensor
  /// `∂L/∂θ` under the module's own `state_dict` names — `W_q.weight` `[D, D]`, `W_q.bias` `[D]`,
  /// likewise `W_k.*`, `W_v.*`, and `relative_embeddings.weight` `[2M + 1, D]` — what
  /// `{n: p.grad for n, p in module.named_parameters()}` holds in PyTorch after `backward`.
  public var parameters: StateDict
  /// `∂L/∂Q`, `∂L/∂K`, `∂L/∂V`, each `[B, T, D]`: the gradients at the projections' outputs.
  public var dQ: Tensor
  public var dK: Tensor
  public var dV: Tensor
  /// Bytes of scratch memory allocated beyond the inputs and these gradients: the attention
  /// kernel's workspace and the module's `Q`, `K`, `V` and their gradients.
  public var workspaceBytes: Int
  /// The kernel that ran.
  public var kernel: Attention.Kernel

  /// `dx` and the parameter gradients by name, `"x"` for `dx`: the tensors a file of gradients
  /// holds.
  public func tensor(named name: String) throws -> Tensor {
    name == "x" ? dx : try parameters.tensor(named: name)
  }
}

// MARK: - The float64 problem (the reference kernel; finite differences perturb its inputs)

/// A relative-position attention problem entirely in `Double`: the module's parameters, `x`
/// and the mask laid out over `[B, T, T]`. The reference kernel's own inputs, which the
/// finite-difference checks perturb (`subscript(tensor:)`).
///
/// Flat, row-major: `x` `[B, T, D]`; `W_*` `[D, D]` (`nn.Linear`: `[out, in]`); `b_*` `[D]`;
/// `E` `[2M + 1, D]`; `visible` and `bias` `[B, T, T]`.
package struct RelativePosition64: Sendable {
  package var batch: Int
  package var length: Int
  package var modelDim: Int
  package var maxDistance: Int
  /// `1/√D` in `Double`, as the notebook and PyTorch in float64 compute it.
  package var scale: Double
  package var x: [Double]
  package var wq, bq, wk, bk, wv, bv: [Double]
  package var e: [Double]
  /// Whether query `i` of batch `b` sees key `j` (the keep mask, causal, a window).
  package var visible: [Bool]
  /// The additive mask, `nil` for none.
  package var bias: [Double]?

  /// The names `subscript(tensor:)` knows: `"x"` and the `state_dict` names.
  package static let tensorNames = ["x"] + RelativePositionAttention.parameterNames

  /// `module`, `x` `[B, T, D]` and `mask` (broadcast to `[B, T, T]`) in `Double`.
  package init(module: RelativePositionAttention, x: Tensor, mask: AttentionMask) throws {
    guard x.rank == 3, x.shape[2] == module.modelDim else {
      throw AttentionError.shapeMismatch(
        "input must be [B, T, d_model] = [B, T, \(module.modelDim)], got "
          + shapeForMessage(x.shape))
    }
    let (b, t) = (x.shape[0], x.shape[1])
    batch = b
    length = t
    modelDim = module.modelDim
    maxDistance = module.maxDistance
    scale = 1 / Double(module.modelDim).squareRoot()
    self.x = x.scalars.map(Double.init)
    func doubles(_ tensor: Tensor?) -> [Double] {
      tensor?.scalars.map(Double.init) ?? [Double](repeating: 0, count: module.modelDim)
    }
    wq = doubles(module.queryProjection.weight)
    bq = doubles(module.queryProjection.bias)
    wk = doubles(module.keyProjection.weight)
    bk = doubles(module.keyProjection.bias)
    wv = doubles(module.valueProjection.weight)
    bv = doubles(module.valueProjection.bias)
    e = doubles(module.relativeEmbeddings.weight)
    let resolved = try ResolvedMask(mask, batchShape: [b], queries: t, keys: t)
    visible = [Bool](repeating: false, count: b * t * t)
    bias = resolved.bias == nil ? nil : [Double](repeating: 0, count: b * t * t)
    for n in 0..<b {
      for i in 0..<t {
        let seen = resolved.visibleKeys(query: i)
        for j in 0..<t {
          let at = (n * t + i) * t + j
          visible[at] =
            seen.contains(j)
            && (resolved.keep.map { $0.value(batch: n, row: i, column: j) != 0 } ?? true)
          if let m = resolved.bias { bias![at] = Double(m.value(batch: n, row: i, column: j)) }
        }
      }
    }
  }

  /// The tensor called `name` (`tensorNames`), flat.
  package subscript(tensor name: String) -> [Double] {
    get { self[keyPath: Self.path(name)] }
    set { self[keyPath: Self.path(name)] = newValue }
  }

  private static func path(_ name: String) -> WritableKeyPath<Self, [Double]> {
    switch name {
    case "x": return \.x
    case "W_q.weight": return \.wq
    case "W_q.bias": return \.bq
    case "W_k.weight": return \.wk
    case "W_k.bias": return \.bk
    case "W_v.weight": return \.wv
    case "W_v.bias": return \.bv
    case "relative_embeddings.weight": return \.e
    default: preconditionFailure("no tensor named \(name)")
    }
  }

  /// The shape of the tensor called `name`.
  package func shape(of name: String) -> [Int] {
    switch name {
    case "x": return [batch, length, modelDim]
    case "relative_embeddings.weight": return [2 * maxDistance + 1, modelDim]
    default: return name.hasSuffix(".bias") ? [modelDim] : [modelDim, modelDim]
    }
  }

  /// `clip(j − i, −M, M) + M`.
  @inline(__always)
  package func index(query i: Int, key j: Int) -> Int {
    min(max(j - i, -maxDistance), maxDistance) + maxDistance
  }

  /// `y = x·Wᵀ + b` over all `B·T` rows, with loops.
  package func project(_ w: [Double], _ b: [Double]) -> [Double] {
    let d = modelDim
    var y = [Double](repeating: 0, count: batch * length * d)
    for row in 0..<(batch * length) {
      for o in 0..<d {
        var sum = b[o]
        for c in 0..<d { sum += x[row * d + c] * w[o * d + c] }
        y[row * d + o] = sum
      }
    }
    return y
  }

  /// The notebook's gathered `relative_emb[i, j] = E[clip(j − i) + M]`, `[T, T, D]`.
  func gathered() -> [Double] {
    let (t, d) = (length, modelDim)
    var out = [Double](repeating: 0, count: t * t * d)
    for i in 0..<t {
      for j in 0..<t {
        let r = index(query: i, key: j)
        for c in 0..<d { out[(i * t + j) * d + c] = e[r * d + c] }
      }
    }
    return out
  }

  /// `P` of query row `row` (flat over `B·T`) into `p` (`[T]`): the scores
  /// `scale·(q_i·k_j + q_i·relative_emb[i, j]) + bias`, `−∞` where masked, and a softmax with
  /// `Foundation.exp`; a fully masked row stays zero. Returns the row's scores as well.
  func rowProbabilities(
    row: Int, q: [Double], k: [Double], relative: [Double], into p: inout [Double],
    scores: inout [Double]
  ) {
    let (t, d) = (length, modelDim)
    let (n, i) = (row / t, row % t)
    for j in 0..<t {
      let at = row * t + j
      guard visible[at] else {
        scores[j] = -.infinity
        continue
      }
      var content = 0.0
      var position = 0.0
      for c in 0..<d {
        content += q[row * d + c] * k[(n * t + j) * d + c]
        position += q[row * d + c] * relative[(i * t + j) * d + c]
      }
      scores[j] = (content + position) * scale + (bias?[at] ?? 0)
    }
    let peak = scores.max() ?? -.infinity
    guard peak != -.infinity, !peak.isNaN else {
      for j in 0..<t { p[j] = peak.isNaN ? .nan : 0 }
      return
    }
    var sum = 0.0
    for j in 0..<t { sum += exp(scores[j] - peak) }
    for j in 0..<t { p[j] = exp(scores[j] - peak) / sum }
  }

  /// The forward pass, `Y = softmax(S)·V`, `[B, T, D]`.
  package func forward() -> [Double] {
    let (t, d) = (length, modelDim)
    let q = project(wq, bq)
    let k = project(wk, bk)
    let v = project(wv, bv)
    let relative = gathered()
    var y = [Double](repeating: 0, count: batch * t * d)
    var p = [Double](repeating: 0, count: t)
    var scores = [Double](repeating: 0, count: t)
    for row in 0..<(batch * t) {
      rowProbabilities(row: row, q: q, k: k, relative: relative, into: &p, scores: &scores)
      let n = row / t
      for j in 0..<t where p[j] != 0 {
        for c in 0..<d { y[row * d + c] += p[j] * v[(n * t + j) * d + c] }
      }
    }
    return y
  }

  /// `Σ dY∘Y`, the loss whose gradients `gradients(gradOutput:)` computes.
  package func loss(gradOutput dY: [Double]) -> Double {
    zip(forward(), dY).reduce(0) { $0 + $1.0 * $1.1 }
  }

  /// The gradients in `Double` (and, from `AttentionVerification`, the bounds a float32 kernel
  /// must meet).
  package struct Gradients: Sendable {
    /// By `tensorNames`, and `"dQ"`, `"dK"`, `"dV"`: flat, shaped as the tensors.
    package var values: [String: [Double]]
    /// `dS`, `[B, T, T]`.
    package var dS: [Double]
    /// `P`, `[B, T, T]`.
    package var probabilities: [Double]
    /// The same keys as `values`: how far a kernel computing in a given unit roundoff may be
    /// from `values`, element by element; empty unless `AttentionVerification`'s
    /// `gradients(gradOutput:unit:)` computed them.
    package var bounds: [String: [Double]] = [:]
  }

  /// The backward pass literally, row by row, in `Double` (the formulas of
  /// `RelativePositionAttention.backward`): per row `i` of batch `n`, `P_i`, `dV_j += P_ij·dO_i`,
  /// `dP_ij = dO_i·v_j`, `Δ_i = Σ_j P_ij·dP_ij`, `dS_ij = P_ij(dP_ij − Δ_i)`, then
  /// `dQ_i += scale·dS_ij·(k_j + relative_emb[i, j])`, `dK_j += scale·dS_ij·q_i` and
  /// `dE[clip(j − i) + M] += scale·dS_ij·q_i` (the gather's adjoint, a scatter-add);
  /// then the projections' gradients over all `B·T` rows.
  ///
  /// `rowObserver` sees each row's `P_i`, scores, `dP_i`, `Δ_i` and the `dS` so far (what the
  /// error bounds of `AttentionVerification` are accumulated from).
  package func gradients(
    gradOutput dY: [Double],
    rowObserver: (
      (
        _ row: Int, _ p: [Double], _ scores: [Double], _ dP: [Double], _ delta: Double,
        _ dS: [Double]
      ) -> Void
    )? = nil
  ) -> Gradients {
    let (bt, t, d) = (batch * length, length, modelDim)
    let width = 2 * maxDistance + 1
    let q = project(wq, bq)
    let k = project(wk, bk)
    let v = project(wv, bv)
    let relative = gathered()
    var dQ = [Double](repeating: 0, count: bt * d)
    var dK = dQ
    var dV = dQ
    var dE = [Double](repeating: 0, count: width * d)
    var dS = [Double](repeating: 0, count: bt * t)
    var probabilities = [Double](repeating: 0, count: bt * t)
    var p = [Double](repeating: 0, count: t)
    var scores = [Double](repeating: 0, count: t)
    var dP = [Double](repeating: 0, count: t)
    for row in 0..<bt {
      let (n, i) = (row / t, row % t)
      rowProbabilities(row: row, q: q, k: k, relative: relative, into: &p, scores: &scores)
      var delta = 0.0
      for j in 0..<t {
        var dot = 0.0
        for c in 0..<d { dot += dY[row * d + c] * v[(n * t + j) * d + c] }
        dP[j] = dot
        delta += p[j] * dot
      }
      for j in 0..<t {
        let ds = p[j] * (dP[j] - delta)
        probabilities[row * t + j] = p[j]
        dS[row * t + j] = ds
        let key = (n * t + j) * d
        let r = index(query: i, key: j)
        for c in 0..<d {
          dQ[row * d + c] += scale * ds * (k[key + c] + relative[(i * t + j) * d + c])
          dK[key + c] += scale * ds * q[row * d + c]
          dE[r * d + c] += scale * ds * q[row * d + c]
          dV[key + c] += p[j] * dY[row * d + c]
        }
      }
      rowObserver?(row, p, scores, dP, delta, dS)
    }
    var values: [String: [Double]] = [
      "dQ": dQ, "dK": dK, "dV": dV, "relative_embeddings.weight": dE,
    ]
    var dx = [Double](repeating: 0, count: bt * d)
    for (name, g, w) in [("W_q", dQ, wq), ("W_k", dK, wk), ("W_v", dV, wv)] {
      var dW = [Double](repeating: 0, count: d * d)
      var db = [Double](repeating: 0, count: d)
      for row in 0..<bt {
        for o in 0..<d {
          let go = g[row * d + o]
          db[o] += go
          for c in 0..<d {
            dW[o * d + c] += go * x[row * d + c]
            dx[row * d + c] += go * w[o * d + c]
          }
        }
      }
      values[name + ".weight"] = dW
      values[name + ".bias"] = db
    }
    values["x"] = dx
    return Gradients(values: values, dS: dS, probabilities: probabilities)
  }
}
