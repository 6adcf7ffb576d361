/// Every intermediate matrix of attention for one batch element, step by step, computed with the
/// kernels' own code: for showing what the kernel does (`attn … --explain`, heatmaps) and for
/// testing each step on its own.
///
/// `MaterializedAttention` overwrites one `[Tq, Tk]` buffer in place, pass after pass; here each
/// pass writes a copy, so every stage survives. The passes are the kernel's, not a re-derivation:
/// the same `BLAS.sgemm` calls with the same `alpha`, then `ResolvedMask.apply`,
/// `RowSoftmax.normalize` and `Dropout.apply` on each row, with the same flat row index for the
/// dropout decisions. So `weightsAfterDropout` and `output` are the values the materialized
/// kernel returns for this batch element, bit for bit (the tests hold it to that).
///
/// Shapes: queries `[…, Tq, D]`, keys `[…, Tk, D]`, values `[…, Tk, Dv]`; `batch` is a flat index
/// over the leading dimensions `…` (`b·H + h` for `[B, H, T, D]`). Every matrix here is one batch
/// element's: `[Tq, Tk]`, and `[Tq, Dv]` for the output. Memory is about six `Tq·Tk` matrices:
/// meant for small problems (display, tests); `memoryBudget` refuses larger ones.
public struct AttentionSteps: Sendable {
  /// The flat batch index these matrices belong to.
  public let batch: Int
  /// The scale of step 2 (`1/√D` unless overridden).
  public let scale: Float
  /// Step 1: `Q·Kᵀ`, `[Tq, Tk]` (an sgemm with `alpha = 1`, for display only: the kernel folds
  /// the scale into its single sgemm, which `scaledScores` reproduces).
  public let scores: Tensor
  /// Step 2: `Q·Kᵀ·scale`, `[Tq, Tk]`: the kernel's sgemm with `alpha = scale`.
  public let scaledScores: Tensor
  /// Step 3: the mask applied: the bias added, `−∞` where masked. Equal to `scaledScores` when
  /// the mask is `.none`.
  public let maskedScores: Tensor
  /// Step 4: softmax over each row (a fully masked row is all zeros), `[Tq, Tk]`.
  public let weights: Tensor
  /// Step 5, the decisions: 1 where the weight is kept, 0 where dropped, `[Tq, Tk]`; `nil`
  /// without dropout. (A masked weight is 0 whatever its decision.)
  public let keep: Tensor?
  /// Step 5: the weights after dropout (dropped ones 0, kept ones `× 1/(1 − p)`), `[Tq, Tk]`;
  /// `weights` itself without dropout.
  public let weightsAfterDropout: Tensor
  /// Step 6: `weightsAfterDropout · V`, `[Tq, Dv]`.
  public let output: Tensor

  /// The steps of `dropout(softmax(Q·Kᵀ·scale + mask))·V` for batch element `batch`, with the
  /// same arguments as `MaterializedAttention.compute`.
  ///
  /// Throws `AttentionError.invalidArgument` when `batch` is out of range, the kernel's shape and
  /// mask errors, and `AttentionError.memoryBudget` when the matrices would exceed
  /// `memoryBudget` bytes.
  public static func compute(
    queries: Tensor, keys: Tensor, values: Tensor, batch: Int,
    mask: AttentionMask = .none, scale: Float? = nil, dropout: Dropout? = nil,
    memoryBudget: Int? = nil
  ) throws -> AttentionSteps {
    let problem = try StepProblem(
      queries: queries, keys: keys, values: values, batch: batch, mask: mask,
      matrices: dropout == nil ? 5 : 7, extraColumns: 0, memoryBudget: memoryBudget)
    let alpha = problem.shape.resolvedScale(scale)
    let scores = problem.product(scale: 1)
    let scaled = problem.product(scale: alpha)
    let masked = problem.masked(scaled)
    let weights = problem.softmax(masked)
    let keep = dropout.map { problem.decisions(of: $0) }
    let after = dropout.map { problem.dropped(weights, by: $0) } ?? weights
    return AttentionSteps(
      batch: batch, scale: alpha, scores: scores, scaledScores: scaled, maskedScores: masked,
      weights: weights, keep: keep, weightsAfterDropout: after,
      output: problem.output(after))
  }
}

/// Every intermediate matrix of relative-position attention for one batch element, computed with
/// the kernels' own code (see `AttentionSteps`): `score(i, j) = (q_i·k_j + q_i·E[idx(i, j)])·scale`
/// with `idx(i, j) = clip(j − i, −M, M) + M`, then the mask, softmax and `·V`.
///
/// The kernel adds `scale·Q·Kᵀ` (one sgemm) and the gathered `scale·Q·Eᵀ` (another); `scores` is
/// computed that way, so it is what the kernel feeds to softmax. `content`, `positionTable` and
/// `position` are the unscaled terms, for display: `scores` equals `(content + position)·scale`
/// up to float32 rounding.
public struct RelativePositionSteps: Sendable {
  /// The flat batch index these matrices belong to.
  public let batch: Int
  /// `M`.
  public let maxDistance: Int
  /// The scale of both terms (`1/√d_model` in the module).
  public let scale: Float
  /// `idx(i, j) = clip(j − i, −M, M) + M` as floats, `[Tq, Tk]`: constant along each diagonal
  /// (a Toeplitz matrix), `0` far left of the diagonal, `2M` far right of it.
  public let relativeIndex: Tensor
  /// The content term `Q·Kᵀ`, `[Tq, Tk]`.
  public let content: Tensor
  /// `R = Q·Eᵀ`, `[Tq, 2M + 1]`: each query against each relative-position embedding.
  public let positionTable: Tensor
  /// The position term `R[i, idx(i, j)]` (the notebook's `q_i·E[idx(i, j)]`), `[Tq, Tk]`.
  public let position: Tensor
  /// `scale·Q·Kᵀ + scale·R[i, idx(i, j)]`, as the kernel computes them, `[Tq, Tk]`.
  public let scores: Tensor
  /// The mask applied to `scores` (`−∞` where masked); equal to `scores` without a mask.
  public let maskedScores: Tensor
  /// Softmax over each row, `[Tq, Tk]`.
  public let weights: Tensor
  /// `weights · V`, `[Tq, Dv]`.
  public let output: Tensor

  /// The steps for batch element `batch` of `Q`, `K`, `V` (`[…, Tq, D]`, `[…, Tk, D]`,
  /// `[…, Tk, Dv]`), with the position term of `positionBias`.
  ///
  /// Throws as `AttentionSteps.compute`, and when the table's width is not `D`.
  public static func compute(
    queries: Tensor, keys: Tensor, values: Tensor, batch: Int,
    positionBias: RelativePositionBias, scale: Float? = nil, mask: AttentionMask = .none,
    memoryBudget: Int? = nil
  ) throws -> RelativePositionSteps {
    let problem = try StepProblem(
      queries: queries, keys: keys, values: values, batch: batch, mask: mask, matrices: 7,
      extraColumns: 2 * positionBias.tableWidth, memoryBudget: memoryBudget)
    try positionBias.checkHeadDim(problem.shape.headDim)
    let alpha = problem.shape.resolvedScale(scale)
    let (tq, tk) = (problem.shape.queries, problem.shape.keys)
    let width = positionBias.tableWidth

    var index = [Float](repeating: 0, count: tq * tk)
    for i in 0..<tq {
      for j in 0..<tk { index[i * tk + j] = Float(positionBias.index(query: i, key: j)) }
    }
    let table = problem.positionTable(positionBias.embeddings, scale: 1)
    var position = [Float](repeating: 0, count: tq * tk)
    for i in 0..<tq {
      for j in 0..<tk {
        position[i * tk + j] = table.scalars[i * width + positionBias.index(query: i, key: j)]
      }
    }
    // The kernel's scores: scale·Q·Kᵀ, then the gathered row of scale·Q·Eᵀ added in place.
    var scores = problem.product(scale: alpha)
    let scaledTable = problem.positionTable(positionBias.embeddings, scale: alpha)
    scores.scalars.withUnsafeMutableBufferPointer { s in
      scaledTable.scalars.withUnsafeBufferPointer { r in
        for i in 0..<tq {
          positionBias.add(
            table: r.baseAddress! + i * width, to: s.baseAddress! + i * tk, query: i,
            firstKey: 0, count: tk)
        }
      }
    }
    let masked = problem.masked(scores)
    let weights = problem.softmax(masked)
    return RelativePositionSteps(
      batch: batch, maxDistance: positionBias.maxDistance, scale: alpha,
      relativeIndex: Tensor(validShape: [tq, tk], scalars: index),
      content: problem.product(scale: 1), positionTable: table,
      position: Tensor(validShape: [tq, tk], scalars: position), scores: scores,
      maskedScores: masked, weights: weights, output: problem.output(weights))
  }
}

extension RelativePositionAttention {
  /// The steps of this module's attention for batch element `batch` of the projections `Q`, `K`,
  /// `V` (`[B, T, D]`, from `project(_:)`), with its table and its scale `1/√d_model`.
  public func steps(
    queries: Tensor, keys: Tensor, values: Tensor, batch: Int, mask: AttentionMask = .none,
    memoryBudget: Int? = nil
  ) throws -> RelativePositionSteps {
    try RelativePositionSteps.compute(
      queries: queries, keys: keys, values: values, batch: batch, positionBias: positionBias,
      scale: scale, mask: mask, memoryBudget: memoryBudget)
  }
}

/// One batch element of an attention problem, and the kernel's passes over it, each returning a
/// new matrix instead of overwriting the last.
private struct StepProblem {
  let shape: AttentionShape
  let batch: Int
  let queries: Tensor
  let keys: Tensor
  let values: Tensor
  let mask: ResolvedMask

  /// Validates the shapes, the mask and `batch`, and refuses `matrices` matrices of `[Tq, Tk]`
  /// (plus `extraColumns` per query, and the output) over `memoryBudget` bytes.
  init(
    queries: Tensor, keys: Tensor, values: Tensor, batch: Int, mask: AttentionMask,
    matrices: Int, extraColumns: Int, memoryBudget: Int?
  ) throws {
    shape = try AttentionShape(queries: queries, keys: keys, values: values)
    guard batch >= 0, batch < shape.batchCount else {
      throw AttentionError.invalidArgument(
        "batch element \(batch) is out of range: the inputs hold \(shape.batchCount) "
          + "(0…\(shape.batchCount - 1))")
    }
    self.mask = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    let (tq, tk) = (shape.queries, shape.keys)
    let perQuery = tk.multipliedReportingOverflow(by: matrices)
    let floats =
      perQuery.overflow
      ? nil
      : tq.multipliedReportingOverflow(by: perQuery.partialValue + extraColumns + shape.valueDim)
    let bytes = floats.flatMap { $0.overflow ? nil : $0.partialValue * MemoryLayout<Float>.stride }
    if let memoryBudget, (bytes ?? .max) > memoryBudget {
      throw AttentionError.memoryBudget(
        "the step-by-step matrices of one [\(tq), \(tk)] attention need "
          + (bytes.map(formatBytes) ?? "more than the address space")
          + ", over the budget of \(formatBytes(memoryBudget))")
    }
    self.batch = batch
    self.queries = queries
    self.keys = keys
    self.values = values
  }

  /// `scale·Q·Kᵀ`, `[Tq, Tk]`: the kernel's sgemm, on this batch element's slices.
  func product(scale: Float) -> Tensor {
    let (tq, tk, d) = (shape.queries, shape.keys, shape.headDim)
    var result = [Float](repeating: 0, count: tq * tk)
    if tq > 0 && tk > 0 && d > 0 {
      queries.scalars.withUnsafeBufferPointer { q in
        keys.scalars.withUnsafeBufferPointer { k in
          result.withUnsafeMutableBufferPointer { c in
            BLAS.sgemm(
              transposeB: true, m: tq, n: tk, k: d, alpha: scale,
              a: q.baseAddress! + batch * tq * d, lda: d,
              b: k.baseAddress! + batch * tk * d, ldb: d,
              c: c.baseAddress!, ldc: tk)
          }
        }
      }
    }
    return Tensor(validShape: [tq, tk], scalars: result)
  }

  /// `scale·Q·Eᵀ`, `[Tq, 2M + 1]`, as the kernel computes its position table.
  func positionTable(_ embeddings: Tensor, scale: Float) -> Tensor {
    let (tq, d) = (shape.queries, shape.headDim)
    let width = embeddings.shape[0]
    var result = [Float](repeating: 0, count: tq * width)
    if tq > 0 && d > 0 {
      queries.scalars.withUnsafeBufferPointer { q in
        embeddings.scalars.withUnsafeBufferPointer { e in
          result.withUnsafeMutableBufferPointer { c in
            BLAS.sgemm(
              transposeB: true, m: tq, n: width, k: d, alpha: scale,
              a: q.baseAddress! + batch * tq * d, lda: d, b: e.baseAddress!, ldb: d,
              c: c.baseAddress!, ldc: width)
          }
        }
      }
    }
    return Tensor(validShape: [tq, width], scalars: result)
  }

  /// A copy of `scores` with the mask applied row by row.
  func masked(_ scores: Tensor) -> Tensor {
    rowPass(scores) { row, i, count in
      mask.apply(to: row, batch: batch, query: i, firstKey: 0, count: count)
    }
  }

  /// A copy of `scores` with softmax applied row by row.
  func softmax(_ scores: Tensor) -> Tensor {
    rowPass(scores) { row, _, count in RowSoftmax.normalize(row, count: count) }
  }

  /// A copy of `weights` after dropout, with the kernel's flat row index `batch·Tq + i`.
  func dropped(_ weights: Tensor, by dropout: Dropout) -> Tensor {
    rowPass(weights) { row, i, count in
      dropout.apply(to: row, row: batch * shape.queries + i, firstKey: 0, count: count)
    }
  }

  /// The dropout decisions: 1 kept, 0 dropped.
  func decisions(of dropout: Dropout) -> Tensor {
    let (tq, tk) = (shape.queries, shape.keys)
    var keep = [Float](repeating: 0, count: tq * tk)
    for i in 0..<tq {
      for j in 0..<tk where dropout.keeps(row: batch * tq + i, key: j) { keep[i * tk + j] = 1 }
    }
    return Tensor(validShape: [tq, tk], scalars: keep)
  }

  /// `weights · V`, `[Tq, Dv]`: the kernel's second sgemm.
  func output(_ weights: Tensor) -> Tensor {
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    var result = [Float](repeating: 0, count: tq * dv)
    if tq > 0 && tk > 0 && dv > 0 {
      weights.scalars.withUnsafeBufferPointer { w in
        values.scalars.withUnsafeBufferPointer { v in
          result.withUnsafeMutableBufferPointer { o in
            BLAS.sgemm(
              m: tq, n: dv, k: tk, a: w.baseAddress!, lda: tk,
              b: v.baseAddress! + batch * tk * dv, ldb: dv, c: o.baseAddress!, ldc: dv)
          }
        }
      }
    }
    return Tensor(validShape: [tq, dv], scalars: result)
  }

  /// A copy of the `[Tq, Tk]` matrix `input` with `pass(row, i, Tk)` applied to each row `i`.
  private func rowPass(
    _ input: Tensor, _ pass: (UnsafeMutablePointer<Float>, Int, Int) -> Void
  ) -> Tensor {
    var result = input
    let (tq, tk) = (shape.queries, shape.keys)
    if tk > 0 {
      result.scalars.withUnsafeMutableBufferPointer { m in
        for i in 0..<tq { pass(m.baseAddress! + i * tk, i, tk) }
      }
    }
    return result
  }
}
