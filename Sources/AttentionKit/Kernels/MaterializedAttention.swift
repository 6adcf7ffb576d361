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
/// `terms` (`ScoreTerms`) soft-caps the scaled scores first, adds its bias by distance with the
/// position term, and puts its sinks into step 4's denominator.
///
/// Work is split into tasks of `rowBlock` query rows of one batch element, taken by `threads`
/// workers; each task runs its two products with OpenBLAS single-threaded (the entry point
/// holds OpenBLAS at one thread) and its row passes itself. The tasks do not depend on the
/// thread count, so neither does any result: OpenBLAS's own threading would split the products
/// differently for different thread counts, and with an inner dimension over 512 its sums then
/// differ in the last bits.
///
/// Returns the output `[…, Tq, Dv]` and the weights after dropout `[…, Tq, Tk]`. The workspace is
/// the weight matrix itself, `B·H·Tq·Tk` floats (plus, for relative positions, at most
/// `rowBlock·(2M + 1)` per worker); `memoryBudget` (bytes) refuses larger problems
/// before allocating, with an error suggesting the tiled kernel.
enum MaterializedAttention {
  /// Query rows per task: enough for efficient products, small enough to balance the threads.
  static let rowBlock = 128

  static func compute(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask, scale: Float?, dropout: Dropout?,
    relativePosition: RelativePositionBias?, terms: ScoreTerms = .none, memoryBudget: Int?,
    threads: Int, keyCount: Int? = nil
  ) throws -> AttentionResult {
    let shape = try AttentionShape(
      queries: queries, keys: keys, values: values, keyCount: keyCount)
    let resolvedTerms = try ResolvedScoreTerms(terms, shape: shape, mask: mask)
    let resolved = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    try relativePosition?.checkHeadDim(shape.headDim)
    let blocks = (shape.queries + rowBlock - 1) / rowBlock
    let tasks = shape.batchCount * blocks
    let workers = max(1, min(threads, tasks))
    // R = scale·Q·Eᵀ for one task's rows, the columns these queries and keys can read:
    // [rowBlock, ≤ min(2M + 1, Tq + Tk − 1)] per worker.
    let columns = relativePosition?.columns(queries: shape.queries, keys: shape.keys) ?? 0...0
    let width = relativePosition == nil ? 0 : columns.count
    let workspaceBytes = try checkBudget(
      shape: shape, tableFloats: workers * min(rowBlock, shape.queries) * width,
      memoryBudget: memoryBudget)
    var weights = try Tensor(shape: shape.weightsShape)
    var output = try Tensor(shape: shape.outputShape)
    guard tasks > 0, shape.keys > 0 else {
      return AttentionResult(
        output: output, weights: weights, workspaceBytes: workspaceBytes, kernel: .materialized)
    }
    let problem = Problem(
      shape: shape, scale: shape.resolvedScale(scale), mask: resolved, dropout: dropout,
      relativePosition: relativePosition, columns: columns, terms: resolvedTerms)
    queries.scalars.withUnsafeBufferPointer { q in
      keys.scalars.withUnsafeBufferPointer { k in
        values.scalars.withUnsafeBufferPointer { v in
          weights.scalars.withUnsafeMutableBufferPointer { w in
            output.scalars.withUnsafeMutableBufferPointer { o in
              let buffers = Buffers(
                q: q.baseAddress!, k: k.baseAddress!, v: v.baseAddress!, w: w.baseAddress!,
                o: o.baseAddress!)
              let queue = TaskQueue()
              DispatchQueue.concurrentPerform(iterations: workers) { _ in
                let table = UnsafeMutablePointer<Float>.allocate(
                  capacity: max(1, rowBlock * width))
                defer { table.deallocate() }
                while case let next = queue.take(), next < tasks {
                  problem.run(
                    batch: next / blocks, firstQuery: (next % blocks) * rowBlock,
                    buffers: buffers, table: table)
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

  /// The weights and the position tables in bytes, refused over `memoryBudget` before
  /// allocating.
  private static func checkBudget(shape: AttentionShape, tableFloats: Int, memoryBudget: Int?)
    throws -> Int
  {
    let weightCount = try Tensor.elementCount(of: shape.weightsShape)
    let (floats, overflow) = weightCount.addingReportingOverflow(tableFloats)
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

  /// Base addresses of a call's tensors, shared read-only (inputs) or by disjoint rows (weights,
  /// output).
  private struct Buffers: @unchecked Sendable {
    let q, k, v: UnsafePointer<Float>
    let w, o: UnsafeMutablePointer<Float>
  }

  /// One attention problem and the passes that compute one task of it in place.
  private struct Problem: Sendable {
    let shape: AttentionShape
    let scale: Float
    let mask: ResolvedMask
    let dropout: Dropout?
    let relativePosition: RelativePositionBias?
    let columns: ClosedRange<Int>
    let terms: ResolvedScoreTerms

    var width: Int { relativePosition == nil ? 0 : columns.count }

    /// Steps 1–6 for rows `firstQuery ..< firstQuery + rowBlock` of batch element `b`; their
    /// scores are rows of the weights, overwritten pass after pass.
    func run(
      batch b: Int, firstQuery: Int, buffers: Buffers, table: UnsafeMutablePointer<Float>
    ) {
      let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
      let kv = shape.keyRowOffset(b)
      let rows = min(rowBlock, tq - firstQuery)
      let scores = buffers.w + (b * tq + firstQuery) * tk
      let q = buffers.q + (b * tq + firstQuery) * d
      // Steps 1–2: scores = Q·Kᵀ · scale (and R = scale·Q·Eᵀ for the position term).
      if d > 0 {
        BLAS.sgemm(
          transposeB: true, m: rows, n: tk, k: d, alpha: scale, a: q, lda: d,
          b: buffers.k + kv * d, ldb: d, c: scores, ldc: tk)
        if let relativePosition {
          relativePosition.embeddings.scalars.withUnsafeBufferPointer { e in
            BLAS.sgemm(
              transposeB: true, m: rows, n: width, k: d, alpha: scale, a: q, lda: d,
              b: e.baseAddress! + columns.lowerBound * d, ldb: d, c: table, ldc: width)
          }
        }
      } else {
        (scores).update(repeating: 0, count: rows * tk)
      }
      // Steps 3–5 row by row. The table pointer is shifted so that it is indexed by full
      // column numbers.
      let shifted = table - columns.lowerBound
      for r in 0..<rows {
        let i = firstQuery + r
        let row = scores + r * tk
        terms.capScores(row, count: tk)
        if let relativePosition, d > 0 {
          relativePosition.add(
            table: shifted + r * width, to: row, query: i, firstKey: 0, count: tk)
        }
        terms.addPositionBias(to: row, batch: b, query: i, firstKey: 0, count: tk)
        // Step 3: mask; step 4: softmax (with the head's sink); step 5: dropout.
        mask.apply(to: row, batch: b, query: i, firstKey: 0, count: tk)
        RowSoftmax.normalize(row, count: tk, sink: terms.sink(batch: b))
        dropout?.apply(to: row, row: b * tq + i, firstKey: 0, count: tk)
      }
      // Step 6: output = weights · V.
      if dv > 0 {
        BLAS.sgemm(
          m: rows, n: dv, k: tk, a: scores, lda: tk, b: buffers.v + kv * dv, ldb: dv,
          c: buffers.o + (b * tq + firstQuery) * dv, ldc: dv)
      }
    }
  }
}
