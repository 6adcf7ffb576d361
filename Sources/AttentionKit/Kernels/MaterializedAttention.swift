import Foundation
import Tensors

/// Scaled dot-product attention that materializes the `[…, Tq, Tk]` weight matrix.
///
/// `output = dropout(softmax(Q·Kᵀ·scale + mask)) · V`, in the notebook's six steps:
/// 1. scores `Q·Kᵀ` and 2. the scale (one sgemm with `alpha = scale`, `1/√D` by default);
/// 3. the mask (`AttentionMask`: 0 = masked, additive bias, causal);
/// 4. softmax over keys (a fully masked row gives zero weights and a zero output row, never NaN);
/// 5. dropout on the weights (`Dropout`, `nil` when not training); 6. `weights · V` (one sgemm).
///
/// With `relativePosition`, step 2 adds the position term `R[i, clip(j − i) + M]·scale` of
/// `RelativePositionBias` (the scores are then those of the notebook's `RelativePositionAttention`).
///
/// The products run on OpenBLAS's threads (`Attention.scaledDotProduct` sets them to `threads`);
/// the row passes on `threads` threads.
///
/// Returns the output `[…, Tq, Dv]` and the weights after dropout `[…, Tq, Tk]`. The workspace is
/// the weight matrix itself, `B·H·Tq·Tk` floats (plus at most `Tq·(2M + 1)` for relative
/// positions); `memoryBudget` (bytes) refuses larger problems
/// before allocating, with an error suggesting the tiled kernel.
enum MaterializedAttention {
  static func compute(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask, scale: Float?, dropout: Dropout?,
    relativePosition: RelativePositionBias?, memoryBudget: Int?, threads: Int
  ) throws -> AttentionResult {
    let shape = try AttentionShape(queries: queries, keys: keys, values: values)
    let resolved = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    try relativePosition?.checkHeadDim(shape.headDim)
    // R = scale·Q·Eᵀ for one batch at a time, the columns these queries and keys can read:
    // [Tq, ≤ min(2M + 1, Tq + Tk − 1)].
    let columns = relativePosition?.columns(queries: shape.queries, keys: shape.keys) ?? 0...0
    let width = relativePosition == nil ? 0 : columns.count
    let workspaceBytes = try checkBudget(
      shape: shape, tableWidth: width, memoryBudget: memoryBudget)
    var problem = Problem(
      shape: shape, scale: shape.resolvedScale(scale), mask: resolved, dropout: dropout,
      relativePosition: relativePosition, columns: columns, threads: threads)
    var positionTable = [Float](repeating: 0, count: shape.queries * width)
    var weights = try Tensor(shape: shape.weightsShape)
    var output = try Tensor(shape: shape.outputShape)
    queries.scalars.withUnsafeBufferPointer { q in
      keys.scalars.withUnsafeBufferPointer { k in
        values.scalars.withUnsafeBufferPointer { v in
          weights.scalars.withUnsafeMutableBufferPointer { w in
            output.scalars.withUnsafeMutableBufferPointer { o in
              positionTable.withUnsafeMutableBufferPointer { table in
                problem.buffers = Buffers(
                  q: q.baseAddress, k: k.baseAddress, v: v.baseAddress, w: w.baseAddress,
                  o: o.baseAddress, table: table.baseAddress)
                for b in 0..<shape.batchCount where shape.queries > 0 && shape.keys > 0 {
                  problem.run(batch: b)
                }
              }
            }
          }
        }
      }
    }
    return AttentionResult(
      output: output, weights: weights, workspaceBytes: workspaceBytes, kernel: .materialized)
  }

  /// The weights and the position table in bytes, refused over `memoryBudget` before allocating.
  private static func checkBudget(shape: AttentionShape, tableWidth: Int, memoryBudget: Int?)
    throws -> Int
  {
    let weightCount = try Tensor.elementCount(of: shape.weightsShape)
    let tableCount = try Tensor.elementCount(of: [shape.queries, tableWidth])
    let (floats, overflow) = weightCount.addingReportingOverflow(tableCount)
    let (bytes, byteOverflow) = floats.multipliedReportingOverflow(by: MemoryLayout<Float>.stride)
    let total = overflow || byteOverflow ? nil : bytes
    if let memoryBudget, total.map({ $0 > memoryBudget }) ?? true {
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the materialized kernel's \(shapeForMessage(shape.weightsShape)) weights",
          neededBytes: total, budgetBytes: memoryBudget, advice: .useTiledKernel))
    }
    return total ?? .max
  }

  /// Base addresses of the buffers `compute` holds for the duration of the batches.
  private struct Buffers {
    var q, k, v: UnsafePointer<Float>?
    var w, o, table: UnsafeMutablePointer<Float>?
  }

  /// One attention problem and the passes that compute one batch of it in place.
  private struct Problem {
    let shape: AttentionShape
    let scale: Float
    let mask: ResolvedMask
    let dropout: Dropout?
    let relativePosition: RelativePositionBias?
    let columns: ClosedRange<Int>
    let threads: Int
    var buffers = Buffers()

    var width: Int { relativePosition == nil ? 0 : columns.count }

    /// Steps 1–6 for batch `b`; its scores are the `[Tq, Tk]` slice `b` of the weights.
    func run(batch b: Int) {
      let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
      let scores = buffers.w! + b * tq * tk
      let q = buffers.q! + b * tq * d
      // Steps 1–2: scores = Q·Kᵀ · scale (and R = scale·Q·Eᵀ for the position term).
      if d > 0 {
        BLAS.sgemm(
          transposeB: true, m: tq, n: tk, k: d, alpha: scale, a: q, lda: d,
          b: buffers.k! + b * tk * d, ldb: d, c: scores, ldc: tk)
        if let relativePosition {
          relativePosition.embeddings.scalars.withUnsafeBufferPointer { e in
            BLAS.sgemm(
              transposeB: true, m: tq, n: width, k: d, alpha: scale, a: q, lda: d,
              b: e.baseAddress! + columns.lowerBound * d, ldb: d, c: buffers.table!, ldc: width)
          }
        }
      }
      rowPasses(batch: b, scores: scores)
      // Step 6: output = weights · V.
      if dv > 0 {
        BLAS.sgemm(
          m: tq, n: dv, k: tk, a: scores, lda: tk, b: buffers.v! + b * tk * dv, ldb: dv,
          c: buffers.o! + b * tq * dv, ldc: dv)
      }
    }

    /// Steps 3–5 row by row: rows are independent, so they are split over the threads (OpenBLAS
    /// threads only the products); the split does not change any row.
    private func rowPasses(batch b: Int, scores: UnsafeMutablePointer<Float>) {
      let (tq, tk, width) = (shape.queries, shape.keys, width)
      let (mask, dropout, relativePosition) = (mask, dropout, relativePosition)
      // The table pointer is shifted so that it is indexed by full column numbers.
      let rows = RowPointers(
        scores: scores, table: buffers.table.map { $0 - columns.lowerBound })
      let chunks = min(threads, tq)
      DispatchQueue.concurrentPerform(iterations: chunks) { chunk in
        for i in stride(from: chunk, to: tq, by: chunks) {
          let row = rows.scores + i * tk
          if let relativePosition, let table = rows.table {
            relativePosition.add(
              table: table + i * width, to: row, query: i, firstKey: 0, count: tk)
          }
          // Step 3: mask; step 4: softmax; step 5: dropout.
          mask.apply(to: row, batch: b, query: i, firstKey: 0, count: tk)
          RowSoftmax.normalize(row, count: tk)
          dropout?.apply(to: row, row: b * tq + i, firstKey: 0, count: tk)
        }
      }
    }
  }
}

/// The score rows of one batch and its position table, shared by the row-pass threads, which
/// touch disjoint rows.
private struct RowPointers: @unchecked Sendable {
  let scores: UnsafeMutablePointer<Float>
  let table: UnsafeMutablePointer<Float>?
}
