import Tensors

/// The notebook's relative-position term in the backward kernels (`RelativePositionBias`): the
/// scores of a block of queries `i0 ..< i0 + n` and keys `j0 ..< j0 + m` gain
/// `R[i, clip(j − i) + M]` from the table `R = scale·Q_blk·E_colsᵀ` (`[n, W]`, `W` the columns the
/// block reads), added after the soft-cap as in the forward; its adjoint, with `dS` the scores'
/// gradient (not the soft-cap's `dX`: the term is added after it), is
/// ```
/// G_ir = Σ_{j : clip(j − i) + M = r} dS_ij      dQ_blk += scale·G·E_cols
/// dE_cols += scale·Gᵀ·Q_blk
/// ```
/// `dE` is summed per slot (a flat batch, or a (flat batch, unit of work) pair), each slot
/// written by one task, then over the slots in increasing order: the result does not depend on
/// the thread count.
final class RelativePositionPass: @unchecked Sendable {
  let bias: RelativePositionBias
  let headDim: Int
  let scale: Float
  /// The columns of `E` the whole problem reads, and each slot's `dE` over them.
  let columns: ClosedRange<Int>
  private let slots: UnsafeMutablePointer<Float>
  private let slotCount: Int

  /// `nil` without the relative-position term.
  init?(_ problem: BackwardProblem, slots: Int) {
    guard let bias = problem.scoreTerms.relativePosition else { return nil }
    self.bias = bias
    let (tq, tk, d, _) = problem.sizes
    headDim = d
    scale = problem.scale
    columns = bias.columns(queries: tq, keys: tk)
    slotCount = slots
    self.slots = .allocate(capacity: max(slots * columns.count * d, 1))
    self.slots.initialize(repeating: 0, count: max(slots * columns.count * d, 1))
  }

  deinit { slots.deallocate() }

  /// The floats of `slots` slots for `problem`'s term (see `init`), 0 without it.
  static func slotFloats(_ problem: BackwardProblem, slots: Int) -> Int {
    guard let bias = problem.scoreTerms.relativePosition else { return 0 }
    let (tq, tk, d, _) = problem.sizes
    return slots * bias.columns(queries: tq, keys: tk).count * d
  }

  /// The widest table a block of `queries × keys` reads.
  func tableWidth(queries: Int, keys: Int) -> Int {
    min(bias.tableWidth, queries + keys - 1)
  }

  /// The columns the block of queries `i0 ..< i0 + n` and keys `j0 ..< j0 + m` reads.
  @inline(__always)
  func columns(firstQuery i0: Int, queries n: Int, firstKey j0: Int, keys m: Int)
    -> ClosedRange<Int>
  {
    bias.columns(firstQuery: i0, queries: n, firstKey: j0, keys: m)
  }

  /// `table = scale·Q_blk·E_colsᵀ`, `[rows, cols.count]` with row stride `stride`.
  @inline(__always)
  func table(
    queries q: UnsafePointer<Float>, rows: Int, columns cols: ClosedRange<Int>,
    into table: UnsafeMutablePointer<Float>, stride: Int
  ) {
    guard headDim > 0, rows > 0 else { return }
    bias.embeddings.scalars.withUnsafeBufferPointer { e in
      BLAS.sgemm(
        transposeB: true, m: rows, n: cols.count, k: headDim, alpha: scale, a: q, lda: headDim,
        b: e.baseAddress! + cols.lowerBound * headDim, ldb: headDim, c: table, ldc: stride)
    }
  }

  /// `dQ_blk += scale·G·E_cols` (`g` `[rows, cols.count]`, stride `stride`) into `dQ` rows.
  @inline(__always)
  func addQueryGradient(
    _ g: UnsafePointer<Float>, rows: Int, columns cols: ClosedRange<Int>, stride: Int,
    into dQ: UnsafeMutablePointer<Float>
  ) {
    guard headDim > 0, rows > 0 else { return }
    bias.embeddings.scalars.withUnsafeBufferPointer { e in
      BLAS.sgemm(
        m: rows, n: headDim, k: cols.count, alpha: scale, a: g, lda: stride,
        b: e.baseAddress! + cols.lowerBound * headDim, ldb: headDim, beta: 1, c: dQ,
        ldc: headDim)
    }
  }

  /// `dE_cols += scale·Gᵀ·Q_blk` into slot `slot`.
  @inline(__always)
  func addEmbeddingGradient(
    _ g: UnsafePointer<Float>, rows: Int, columns cols: ClosedRange<Int>, stride: Int,
    queries q: UnsafePointer<Float>, slot: Int
  ) {
    guard headDim > 0, rows > 0 else { return }
    let target =
      slots + (slot * columns.count + cols.lowerBound - columns.lowerBound) * headDim
    BLAS.sgemm(
      transposeA: true, m: cols.count, n: headDim, k: rows, alpha: scale, a: g, lda: stride,
      b: q, ldb: headDim, beta: 1, c: target, ldc: headDim)
  }

  /// `dE`, `[2M + 1, D]`: the slots summed in increasing order (in `Double`), zero in the
  /// columns no score reads.
  func embeddingGradient() -> Tensor {
    let d = headDim
    var sums = [Double](repeating: 0, count: columns.count * d)
    for slot in 0..<slotCount {
      let base = slots + slot * columns.count * d
      for e in sums.indices { sums[e] += Double(base[e]) }
    }
    var scalars = [Float](repeating: 0, count: bias.tableWidth * d)
    for e in sums.indices { scalars[columns.lowerBound * d + e] = Float(sums[e]) }
    return Tensor(validShape: bias.embeddings.shape, scalars: scalars)
  }
}
