import Foundation
import Tensors

extension RelativePositionAttention {
  /// The gradients of the module's output `Y = forward(x, mask)` for an upstream gradient
  /// `dY = ∂L/∂Y`: `∂L/∂x` and `∂L/∂θ` for every parameter, under the `state_dict` names.
  ///
  /// Shape legend: `B` batch, `T` sequence length, `D` model width, `M` largest relative distance.
  /// The attention runs through `Attention.backward` with the module's position term
  /// (`ScoreTerms.relativePosition`) and scale, as the forward runs through
  /// `Attention.scaledDotProduct`: with `S = scale·(Q·Kᵀ + R)`, `R_ij = q_i·E[clip(j − i, −M, M) + M]`,
  /// `P = softmax(S)` with the mask and `O = P·V` (so `dO = dY`), it gives
  /// ```
  /// dV = Pᵀ·dO                dP = dO·Vᵀ              dS = P∘(dP − rowsum(dP∘P))
  /// G_ir = Σ_{j : clip(j − i) + M = r} dS_ij        (the end columns sum every key beyond ±M)
  /// dQ = scale·(dS·K + G·E)   dK = scale·dSᵀ·Q        dE = scale·Gᵀ·Q (summed over B)
  /// ```
  /// then through the projections `Q = x·W_qᵀ + b_q` (likewise `K`, `V`), over all `B·T` rows:
  /// `dW_q = dQᵀ·x` (sgemm), `db_q = Σ_rows dQ` (in `Double`), likewise `k`, `v`, and
  /// `dx = dQ·W_q + dK·W_k + dV·W_v` (sgemm). A fully masked row has `P = 0`, so its `dQ` row is
  /// exactly zero. OpenBLAS runs on one thread in the projections' products here as in the
  /// attention kernels, so the results are bit-identical for any `threads`.
  ///
  /// - Parameters:
  ///   - x: the forward's input, `[B, T, D]`.
  ///   - mask: the forward's mask (keep mask, bias, causal, a window), broadcast to `[B, T, T]`.
  ///   - gradOutput: `dY`, `[B, T, D]`.
  ///   - kernel: `Attention.backward`'s kernel: `.reference` (float64 loops), `.materialized`
  ///     (`P` and `dS` per batch element), `.tiled` (memory linear in `T`); `.automatic` is the
  ///     tiled kernel.
  ///   - threads: worker threads, every core when `nil`.
  ///   - memoryBudget: bytes of workspace the call may allocate — the attention kernel's and
  ///     `6·B·T·D` floats of the module's own (`Q`, `K`, `V` and their gradients); over it, the
  ///     call throws `AttentionError.memoryBudget` before allocating.
  public func backward(
    _ x: Tensor, mask: AttentionMask = .none, gradOutput: Tensor,
    kernel: Attention.Kernel = .automatic, threads: Int? = nil, memoryBudget: Int? = nil
  ) throws -> RelativePositionGradients {
    guard x.rank == 3, x.shape[2] == modelDim else {
      throw AttentionError.shapeMismatch(
        "input must be [B, T, d_model] = [B, T, \(modelDim)], got \(shapeForMessage(x.shape))")
    }
    guard gradOutput.shape == x.shape else {
      throw AttentionError.shapeMismatch(
        "gradOutput \(shapeForMessage(gradOutput.shape)) is not the output's shape "
          + shapeForMessage(x.shape))
    }
    // The module's own tensors, Q, K, V and their gradients, count against the budget beside
    // the attention kernel's workspace.
    let own = byteCount([(x.count, 6 * MemoryLayout<Float>.stride)])
    try checkBackwardBudget(
      own, memoryBudget, what: "the relative-position backward's Q, K, V and their gradients",
      advice: .other("use a shorter input"))
    let (q, k, v) = try project(x)
    let attention: AttentionGradients
    do {
      attention = try Attention.backward(
        queries: q, keys: k, values: v, gradOutput: gradOutput, mask: mask, scale: scale,
        terms: ScoreTerms(relativePosition: positionBias), kernel: kernel, threads: threads,
        memoryBudget: memoryBudget.map { $0 - own! })
    } catch AttentionError.memoryBudget(var exceeded) {
      // Reported against the whole budget, the module's own tensors included.
      exceeded.neededBytes = exceeded.neededBytes.map { $0 + own! }
      exceeded.budgetBytes = memoryBudget ?? exceeded.budgetBytes
      throw AttentionError.memoryBudget(exceeded)
    }
    var parameters = StateDict(
      ["relative_embeddings.weight": attention.dRelativeEmbeddings ?? relativeEmbeddings.weight])
    let dx = try BLASThreads.withCount(1) {
      try projectionGradients(
        x, dQ: attention.dQ, dK: attention.dK, dV: attention.dV, into: &parameters)
    }
    return RelativePositionGradients(
      dx: dx, parameters: parameters, dQ: attention.dQ, dK: attention.dK, dV: attention.dV,
      workspaceBytes: attention.workspaceBytes + own!, kernel: attention.kernel)
  }

  /// Through the projections: `dW = dGᵀ·x`, `db = Σ_rows dG` (in `Double`) into `parameters`,
  /// and `dx = Σ dG·W`, returned.
  private func projectionGradients(
    _ x: Tensor, dQ: Tensor, dK: Tensor, dV: Tensor, into parameters: inout StateDict
  ) throws -> Tensor {
    let d = modelDim
    let rows = x.shape[0] * x.shape[1]
    var dx = try Tensor(shape: x.shape)
    for (name, layer, grad) in [
      ("W_q", queryProjection, dQ), ("W_k", keyProjection, dK), ("W_v", valueProjection, dV),
    ] {
      var dW = try Tensor(shape: [d, d])
      if rows > 0 {
        grad.scalars.withUnsafeBufferPointer { gp in
          x.scalars.withUnsafeBufferPointer { xp in
            layer.weight.scalars.withUnsafeBufferPointer { wp in
              dW.scalars.withUnsafeMutableBufferPointer { dwp in
                dx.scalars.withUnsafeMutableBufferPointer { dxp in
                  BLAS.sgemm(
                    transposeA: true, m: d, n: d, k: rows, a: gp.baseAddress!, lda: d,
                    b: xp.baseAddress!, ldb: d, c: dwp.baseAddress!, ldc: d)
                  BLAS.sgemm(
                    m: rows, n: d, k: d, a: gp.baseAddress!, lda: d, b: wp.baseAddress!, ldb: d,
                    beta: 1, c: dxp.baseAddress!, ldc: d)
                }
              }
            }
          }
        }
      }
      parameters.tensors[name + ".weight"] = dW
      if layer.bias != nil {
        var sums = [Double](repeating: 0, count: d)
        for row in 0..<rows {
          for o in 0..<d { sums[o] += Double(grad.scalars[row * d + o]) }
        }
        parameters.tensors[name + ".bias"] = try Tensor(shape: [d], scalars: sums.map(Float.init))
      }
    }
    return dx
  }
}
