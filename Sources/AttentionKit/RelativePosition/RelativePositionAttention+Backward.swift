import Foundation
import Tensors

extension RelativePositionAttention {
  /// The gradients of the module's output `Y = forward(x, mask)` for an upstream gradient
  /// `dY = ∂L/∂Y`: `∂L/∂x` and `∂L/∂θ` for every parameter, under the `state_dict` names.
  ///
  /// Shape legend: `B` batch, `T` sequence length, `D` model width, `M` largest relative distance,
  /// `W = min(2M + 1, 2T − 1)` the columns of `E` that a length-`T` sequence reads.
  /// Per batch element, with `S = scale·(Q·Kᵀ + R)`, `R_ij = q_i·E[r(i, j)]`,
  /// `r(i, j) = clip(j − i, −M, M) + M`, `P = softmax(S)` with the mask and `O = P·V` (the
  /// module's output `Y`, so `dO = dY`):
  /// ```
  /// dV = Pᵀ·dO                dP = dO·Vᵀ              dS = P∘(dP − rowsum(dP∘P))
  /// G_ir = Σ_{j : r(i, j) = r} dS_ij                   ([T, 2M + 1]; the end columns sum
  ///                                                     every key beyond ±M)
  /// dQ = scale·(dS·K + G·E)   dK = scale·dSᵀ·Q        dE = scale·Gᵀ·Q (summed over B)
  /// ```
  /// then through the projections `Q = x·W_qᵀ + b_q` (likewise `K`, `V`), over all `B·T` rows:
  /// `dW_q = dQᵀ·x`, `db_q = Σ_rows dQ` (likewise `k`, `v`), `dx = dQ·W_q + dK·W_k + dV·W_v`.
  /// A fully masked row has `P = 0`, so `dS = 0` and its `dQ` row is exactly zero: its `dx` row
  /// is `dK·W_k + dV·W_v` alone. Every row of `dS` sums to 0 (`scoreGradientRowSums`).
  ///
  /// The `.materialized` kernel (also what `.automatic` runs):
  /// 1. `Q`, `K`, `V` by the module's `Linear` layers (one sgemm each);
  /// 2. one task per batch element, taken by `threads` workers, each with its own `P` and `dS`
  ///    (`[T, T]`) and position table (`[T, W]`): `P` as the forward computes it (`scale·Q·Kᵀ`
  ///    and `scale·Q·Eᵀ` by sgemm, the position term added, the mask, the softmax),
  ///    `dV = Pᵀ·dO` and `dP = dO·Vᵀ` by sgemm, `dS` row by row, `G` summed from `dS` row by
  ///    row (kept, `[B, T, W]`), `dQ = scale·dS·K + scale·G·E` and `dK = scale·dSᵀ·Q` by sgemm;
  /// 3. `dE = scale·Gᵀ·Q` over all `B·T` rows, `dW = dQᵀ·x` and `dx` by sgemm; `db` summed in
  ///    `Double`.
  /// OpenBLAS runs on one thread throughout and the tasks do not depend on the thread count,
  /// so the results are bit-identical for any `threads`.
  /// Workspace: `workers·(2T² + T·W) + B·T·W + 6·B·T·D` floats (`P`, `dS` and the table per
  /// worker; `G`; `Q`, `K`, `V` and their gradients). Memory is quadratic in `T` per worker, not
  /// per batch: there is no tiled variant yet.
  ///
  /// Errors: the materialized kernel's gradients are within first-order float32 bounds of the exact
  /// ones, built from the reference's own magnitudes (`RelativePosition64.gradients(unit:)`):
  /// the projections' errors `γ_{D+1}·Σ|x·w|`, the score error `δ` through the softmax
  /// (`ρ = 2δ(1 + 2δ) + γ_{T+6}`), then `dP`, `Δ`, `dS` and each sum of products with its own
  /// `γ_n`, as `Attention.backward`'s tests derive them.
  ///
  /// - Parameters:
  ///   - x: the forward's input, `[B, T, D]`.
  ///   - mask: the forward's mask (keep mask, bias, causal, window), broadcast to `[B, T, T]`.
  ///   - gradOutput: `dY`, `[B, T, D]`.
  ///   - kernel: `.materialized` (sgemm, `P` and `dS` held per batch element; also what
  ///     `.automatic` runs) or `.reference` (the formulas in `Double` with loops, gathering `E`
  ///     per `(i, j)` as the notebook's forward does, for `T·T·D ≤ referenceElementLimit`: what
  ///     the materialized kernel is checked against). There is no tiled backward for the
  ///     position term yet: `.tiled` is an `AttentionError.invalidArgument`.
  ///   - threads: worker threads of the materialized kernel, every core when `nil`.
  ///   - memoryBudget: bytes of workspace the kernel may allocate; over it, the call throws
  ///     `AttentionError.memoryBudget` before allocating.
  public func backward(
    _ x: Tensor, mask: AttentionMask = .none, gradOutput: Tensor,
    kernel: Attention.Kernel = .materialized,
    threads: Int? = nil, memoryBudget: Int? = nil
  ) throws -> RelativePositionGradients {
    if let threads, threads < 1 {
      throw AttentionError.invalidArgument("threads must be ≥ 1, got \(threads)")
    }
    guard x.rank == 3, x.shape[2] == modelDim else {
      throw AttentionError.shapeMismatch(
        "input must be [B, T, d_model] = [B, T, \(modelDim)], got \(shapeForMessage(x.shape))")
    }
    guard gradOutput.shape == x.shape else {
      throw AttentionError.shapeMismatch(
        "gradOutput \(shapeForMessage(gradOutput.shape)) is not the output's shape "
          + shapeForMessage(x.shape))
    }
    let (b, t) = (x.shape[0], x.shape[1])
    _ = try ResolvedMask(mask, batchShape: [b], queries: t, keys: t)
    switch kernel {
    case .reference:
      return try referenceBackward(
        x, mask: mask, gradOutput: gradOutput, memoryBudget: memoryBudget)
    case .tiled:
      throw AttentionError.invalidArgument(
        "relative-position gradients have no tiled kernel; use .materialized")
    case .materialized, .automatic:
      let workers = max(1, threads ?? ProcessInfo.processInfo.activeProcessorCount)
      return try BLASThreads.withCount(1) {
        try materializedBackward(
          x, mask: mask, gradOutput: gradOutput, threads: workers, memoryBudget: memoryBudget)
      }
    }
  }

  /// The bytes the materialized kernel allocates for `x` `[B, T, D]` with `threads` workers (see
  /// `backward`), `nil` on overflow.
  public func materializedBackwardWorkspaceBytes(batch b: Int, length t: Int, threads: Int) -> Int?
  {
    let workers = max(1, min(threads, b))
    let width = t == 0 ? 0 : positionBias.columns(queries: t, keys: t).count
    let (square, overflow) = t.multipliedReportingOverflow(by: t)
    guard !overflow else { return nil }
    let float = MemoryLayout<Float>.stride
    return byteCount([
      (square, 2 * workers * float), (t * width, workers * float), (t * width, b * float),
      (t * modelDim, 6 * b * float),
    ])
  }

  // MARK: - Reference

  private func referenceBackward(
    _ x: Tensor, mask: AttentionMask, gradOutput: Tensor, memoryBudget: Int?
  ) throws -> RelativePositionGradients {
    let (b, t, d) = (x.shape[0], x.shape[1], modelDim)
    let (gathered, overflow) = t.multipliedReportingOverflow(by: t * d)
    guard !overflow, gathered <= Self.referenceElementLimit else {
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the reference backward's gathered [T, T, D] = [\(t), \(t), \(d)] tensor",
          neededBytes: overflow ? nil : gathered * 8,
          budgetBytes: Self.referenceElementLimit * 8,
          advice: .other("it is for small problems; use the materialized kernel")))
    }
    // Doubles: the gathered tensor, P, dS, the mask, x, dY, Q, K, V and their gradients.
    let bytes = byteCount([(gathered, 8), (b * t * t, 8 * 3 + 1), (b * t * d, 8 * 9)])
    try checkBackwardBudget(
      bytes, memoryBudget, what: "the reference backward's float64 [T, T, D] gather",
      advice: .other("it is for small problems; use the materialized kernel"))
    let problem = try RelativePosition64(module: self, x: x, mask: mask)
    var magnitudes = [Double](repeating: 0, count: b * t)
    let result = problem.gradients(gradOutput: gradOutput.scalars.map(Double.init)) {
      row, p, _, dP, delta, _ in
      magnitudes[row] = zip(p, dP).reduce(abs(delta)) { $0 + $1.0 * abs($1.1) }
    }
    func tensor(_ name: String, _ shape: [Int]) throws -> Tensor {
      try Tensor(shape: shape, scalars: result.values[name]!.map { Float($0) })
    }
    var parameters = StateDict()
    for name in Self.parameterNames where stateDict.tensors[name] != nil {
      parameters.tensors[name] = try tensor(name, problem.shape(of: name))
    }
    var rowSums = [Double](repeating: 0, count: b * t)
    for row in 0..<(b * t) {
      for j in 0..<t { rowSums[row] += result.dS[row * t + j] }
    }
    return RelativePositionGradients(
      dx: try tensor("x", x.shape), parameters: parameters, dQ: try tensor("dQ", x.shape),
      dK: try tensor("dK", x.shape), dV: try tensor("dV", x.shape),
      scoreGradientRowSums: rowSums, scoreGradientRowMagnitudes: magnitudes,
      workspaceBytes: bytes ?? .max, kernel: .reference)
  }

  // MARK: - Fast

  private func materializedBackward(
    _ x: Tensor, mask: AttentionMask, gradOutput: Tensor, threads: Int, memoryBudget: Int?
  ) throws -> RelativePositionGradients {
    let (b, t, d) = (x.shape[0], x.shape[1], modelDim)
    try BLAS.checkDimensions(b * t, t, d, context: "relative-position backward")
    let workers = max(1, min(threads, b))
    let bytes = materializedBackwardWorkspaceBytes(batch: b, length: t, threads: threads)
    try checkBackwardBudget(
      bytes, memoryBudget,
      what: "the relative-position backward's \(shapeForMessage([t, t])) P and dS per worker",
      advice: .other("use a shorter sequence or fewer threads"))
    let resolved = try ResolvedMask(mask, batchShape: [b], queries: t, keys: t)
    let columns = positionBias.columns(queries: t, keys: max(t, 1))
    let width = t == 0 ? 0 : columns.count
    // 1. Q, K, V: [B, T, D].
    let (q, k, v) = try project(x)
    var dQ = try Tensor(shape: x.shape)
    var dK = try Tensor(shape: x.shape)
    var dV = try Tensor(shape: x.shape)
    // G for every row, [B·T, W] (columns `columns` of the [B·T, 2M + 1] matrix).
    var g = [Float](repeating: 0, count: b * t * width)
    var rowSums = [Double](repeating: 0, count: b * t)
    var rowMagnitudes = rowSums
    var dE = try Tensor(shape: relativeEmbeddings.weight.shape)
    if b > 0, t > 0 {
      let task = BackwardTask(
        length: t, modelDim: d, scale: scale, bias: positionBias, mask: resolved,
        columns: columns)
      // 2. One task per batch element.
      withPointers(
        q, k, v, gradOutput, relativeEmbeddings.weight, &dQ, &dK, &dV, &g, &rowSums, &rowMagnitudes
      ) { buffers in
        let queue = TaskQueue()
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
          let p = UnsafeMutablePointer<Float>.allocate(capacity: t * t)
          let s = UnsafeMutablePointer<Float>.allocate(capacity: t * t)
          let table = UnsafeMutablePointer<Float>.allocate(capacity: max(1, t * width))
          defer {
            p.deallocate()
            s.deallocate()
            table.deallocate()
          }
          while case let n = queue.take(), n < b {
            task.run(batch: n, buffers: buffers, probabilities: p, scores: s, table: table)
          }
        }
      }
      // 3. dE[columns] = scale·Gᵀ·Q over all B·T rows: [W, D].
      g.withUnsafeBufferPointer { gp in
        q.scalars.withUnsafeBufferPointer { qp in
          dE.scalars.withUnsafeMutableBufferPointer { ep in
            BLAS.sgemm(
              transposeA: true, m: width, n: d, k: b * t, alpha: scale, a: gp.baseAddress!,
              lda: width, b: qp.baseAddress!, ldb: d,
              c: ep.baseAddress! + columns.lowerBound * d, ldc: d)
          }
        }
      }
    }
    // 3. The projections: dW = dGᵀ·x, db = Σ_rows dG, dx = Σ dG·W.
    var parameters = StateDict(["relative_embeddings.weight": dE])
    var dx = try Tensor(shape: x.shape)
    for (name, layer, grad) in [
      ("W_q", queryProjection, dQ), ("W_k", keyProjection, dK), ("W_v", valueProjection, dV),
    ] {
      var dW = try Tensor(shape: [d, d])
      let rows = b * t
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
    return RelativePositionGradients(
      dx: dx, parameters: parameters, dQ: dQ, dK: dK, dV: dV, scoreGradientRowSums: rowSums,
      scoreGradientRowMagnitudes: rowMagnitudes, workspaceBytes: bytes ?? .max,
      kernel: .materialized)
  }

  /// Runs `body` with the pointers of the materialized kernel's tensors.
  private func withPointers(
    _ q: Tensor, _ k: Tensor, _ v: Tensor, _ dO: Tensor, _ e: Tensor, _ dQ: inout Tensor,
    _ dK: inout Tensor, _ dV: inout Tensor, _ g: inout [Float], _ sums: inout [Double],
    _ bounds: inout [Double], _ body: (RelposBackwardBuffers) -> Void
  ) {
    q.scalars.withUnsafeBufferPointer { q in
      k.scalars.withUnsafeBufferPointer { k in
        v.scalars.withUnsafeBufferPointer { v in
          dO.scalars.withUnsafeBufferPointer { dO in
            e.scalars.withUnsafeBufferPointer { e in
              dQ.scalars.withUnsafeMutableBufferPointer { dq in
                dK.scalars.withUnsafeMutableBufferPointer { dk in
                  dV.scalars.withUnsafeMutableBufferPointer { dv in
                    g.withUnsafeMutableBufferPointer { g in
                      sums.withUnsafeMutableBufferPointer { sums in
                        bounds.withUnsafeMutableBufferPointer { bounds in
                          body(
                            RelposBackwardBuffers(
                              q: q.baseAddress!, k: k.baseAddress!, v: v.baseAddress!,
                              dO: dO.baseAddress!, e: e.baseAddress!, dQ: dq.baseAddress!,
                              dK: dk.baseAddress!, dV: dv.baseAddress!, g: g.baseAddress,
                              rowSums: sums.baseAddress!, rowMagnitudes: bounds.baseAddress!))
                        }
                      }
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

/// Raw pointers to the fast backward's tensors: inputs shared read-only, outputs written by the
/// task that owns their batch element.
private struct RelposBackwardBuffers: @unchecked Sendable {
  /// `[B, T, D]`.
  let q, k, v, dO: UnsafePointer<Float>
  /// `E`, `[2M + 1, D]`.
  let e: UnsafePointer<Float>
  /// `[B, T, D]`.
  let dQ, dK, dV: UnsafeMutablePointer<Float>
  /// `G`, `[B·T, W]`; `nil` when `W·B·T = 0`.
  let g: UnsafeMutablePointer<Float>?
  /// `[B·T]`.
  let rowSums, rowMagnitudes: UnsafeMutablePointer<Double>
}

/// Step 2 of the fast backward for one batch element.
private struct BackwardTask: Sendable {
  let length: Int
  let modelDim: Int
  let scale: Float
  let bias: RelativePositionBias
  let mask: ResolvedMask
  /// The columns of `E` that the sequence reads; `W = columns.count`.
  let columns: ClosedRange<Int>

  /// `probabilities` and `scores` are `[T, T]` (`scores` holds `dP`, then `dS`); `table` is
  /// `[T, W]`, the position term `scale·Q·Eᵀ`.
  func run(
    batch n: Int, buffers: RelposBackwardBuffers, probabilities p: UnsafeMutablePointer<Float>,
    scores s: UnsafeMutablePointer<Float>, table: UnsafeMutablePointer<Float>
  ) {
    let (t, d, width) = (length, modelDim, columns.count)
    let offset = n * t * d
    let (q, k, v, dO) = (
      buffers.q + offset, buffers.k + offset, buffers.v + offset, buffers.dO + offset
    )
    let e = buffers.e + columns.lowerBound * d
    let g = buffers.g! + n * t * width
    // a. P = softmax(scale·Q·Kᵀ + scale·R + mask), R from the table as the forward adds it.
    BLAS.sgemm(
      transposeB: true, m: t, n: t, k: d, alpha: scale, a: q, lda: d, b: k, ldb: d, c: p, ldc: t)
    BLAS.sgemm(
      transposeB: true, m: t, n: width, k: d, alpha: scale, a: q, lda: d, b: e, ldb: d, c: table,
      ldc: width)
    let shifted = table - columns.lowerBound
    for i in 0..<t {
      let row = p + i * t
      bias.add(table: shifted + i * width, to: row, query: i, firstKey: 0, count: t)
      mask.apply(to: row, batch: n, query: i, firstKey: 0, count: t)
      RowSoftmax.normalize(row, count: t)
    }
    // b. dV = Pᵀ·dO; dP = dO·Vᵀ.
    BLAS.sgemm(
      transposeA: true, m: t, n: d, k: t, a: p, lda: t, b: dO, ldb: d, c: buffers.dV + offset,
      ldc: d)
    BLAS.sgemm(transposeB: true, m: t, n: t, k: d, a: dO, lda: d, b: v, ldb: d, c: s, ldc: t)
    // c. dS = P∘(dP − Δ), Δ = Σ_j P_ij·dP_ij, row by row; the row's sum and magnitude; G.
    for i in 0..<t {
      let (pRow, sRow) = (p + i * t, s + i * t)
      let delta = BackwardRows.dot(pRow, sRow, count: t)
      var weighted = 0.0
      for j in 0..<t { weighted += Double(pRow[j]) * abs(Double(sRow[j])) }
      BackwardRows.softmaxGradient(probabilities: pRow, gradient: sRow, count: t, delta: delta)
      var sum = 0.0
      for j in 0..<t { sum += Double(sRow[j]) }
      buffers.rowSums[n * t + i] = sum
      buffers.rowMagnitudes[n * t + i] = weighted + abs(Double(delta))
      let gRow = g + i * width
      gRow.update(repeating: 0, count: width)
      bias.accumulate(row: sRow, into: gRow - columns.lowerBound, query: i, count: t)
    }
    // d. dQ = scale·dS·K + scale·G·E; dK = scale·dSᵀ·Q.
    BLAS.sgemm(
      m: t, n: d, k: t, alpha: scale, a: s, lda: t, b: k, ldb: d, c: buffers.dQ + offset, ldc: d)
    BLAS.sgemm(
      m: t, n: d, k: width, alpha: scale, a: g, lda: width, b: e, ldb: d, beta: 1,
      c: buffers.dQ + offset, ldc: d)
    BLAS.sgemm(
      transposeA: true, m: t, n: d, k: t, alpha: scale, a: s, lda: t, b: q, ldb: d,
      c: buffers.dK + offset, ldc: d)
  }
}

extension RelativePositionBias {
  /// The adjoint of `add`: `table[clip(j − i) + M] += row[j]` for keys `j ∈ 0..<count` of query
  /// `i`, so that `table` (indexed by full column number) gets `G_i`, the sums of `dS_ij` over
  /// the keys that read each embedding. Keys beyond `±M` all land in the end columns; each
  /// column is summed in increasing `j`.
  @inline(__always)
  func accumulate(
    row: UnsafePointer<Float>, into table: UnsafeMutablePointer<Float>, query i: Int, count: Int
  ) {
    let m = maxDistance
    let leftEnd = min(max(i - m, 0), count)
    let rightStart = min(max(i + m + 1, leftEnd), count)
    var far: Float = 0
    for j in 0..<leftEnd { far += row[j] }
    if leftEnd > 0 { table[0] += far }
    let offset = m - i
    for j in leftEnd..<rightStart { table[j + offset] += row[j] }
    var farRight: Float = 0
    for j in rightStart..<count { farRight += row[j] }
    if rightStart < count { table[2 * m] += farRight }
  }
}
