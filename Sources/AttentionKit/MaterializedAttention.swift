import Foundation

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
/// The products run on OpenBLAS's threads (`BLAS.threadCount`); the row passes on `threads`
/// threads (default: every core).
///
/// Returns the output `[…, Tq, Dv]` and the weights after dropout `[…, Tq, Tk]`. The workspace is
/// the weight matrix itself, `B·H·Tq·Tk` floats (plus at most `Tq·(2M + 1)` for relative
/// positions); `memoryBudget` (bytes) refuses larger problems
/// before allocating, with an error suggesting the tiled kernel.
public enum MaterializedAttention {
  public static func compute(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask = .none, scale: Float? = nil, dropout: Dropout? = nil,
    relativePosition: RelativePositionBias? = nil, memoryBudget: Int? = nil,
    threads: Int? = nil
  ) throws -> AttentionResult {
    if let threads, threads < 1 {
      throw AttentionError.invalidArgument("threads must be ≥ 1, got \(threads)")
    }
    let workers = max(1, threads ?? ProcessInfo.processInfo.activeProcessorCount)
    let shape = try AttentionShape(queries: queries, keys: keys, values: values)
    let resolved = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
    try relativePosition?.checkHeadDim(d)
    let weightCount = try Tensor.elementCount(of: shape.weightsShape)
    // R = scale·Q·Eᵀ for one batch at a time, the columns these queries and keys can read:
    // [Tq, ≤ min(2M + 1, Tq + Tk − 1)].
    let columns = relativePosition?.columns(queries: tq, keys: tk) ?? 0...0
    let width = relativePosition == nil ? 0 : columns.count
    let tableCount = try Tensor.elementCount(of: [tq, width])
    let (floats, overflow) = weightCount.addingReportingOverflow(tableCount)
    let workspaceBytes = overflow ? Int.max : floats.multipliedReportingOverflow(by: 4).partialValue
    if let memoryBudget, overflow || workspaceBytes > memoryBudget {
      throw AttentionError.memoryBudget(
        "the materialized kernel needs \(formatBytes(workspaceBytes)) for the \(shape.weightsShape) "
          + "weights, over the budget of \(formatBytes(memoryBudget)); use the tiled kernel")
    }
    var positionTable = [Float](repeating: 0, count: tableCount)
    var weights = Tensor(
      validShape: shape.weightsShape, scalars: [Float](repeating: 0, count: weightCount))
    var output = Tensor(
      validShape: shape.outputShape,
      scalars: [Float](repeating: 0, count: try Tensor.elementCount(of: shape.outputShape)))
    let alpha = shape.resolvedScale(scale)

    queries.scalars.withUnsafeBufferPointer { q in
      keys.scalars.withUnsafeBufferPointer { k in
        values.scalars.withUnsafeBufferPointer { v in
          weights.scalars.withUnsafeMutableBufferPointer { w in
            output.scalars.withUnsafeMutableBufferPointer { o in
             positionTable.withUnsafeMutableBufferPointer { table in
              for b in 0..<shape.batchCount where tq > 0 && tk > 0 {
                let scores = w.baseAddress! + b * tq * tk
                // Steps 1–2: scores = Q·Kᵀ · scale.
                if d > 0 {
                  BLAS.sgemm(
                    transposeB: true, m: tq, n: tk, k: d, alpha: alpha,
                    a: q.baseAddress! + b * tq * d, lda: d,
                    b: k.baseAddress! + b * tk * d, ldb: d,
                    c: scores, ldc: tk)
                }
                if let relativePosition, d > 0 {
                  relativePosition.embeddings.scalars.withUnsafeBufferPointer { e in
                    BLAS.sgemm(
                      transposeB: true, m: tq, n: width, k: d, alpha: alpha,
                      a: q.baseAddress! + b * tq * d, lda: d,
                      b: e.baseAddress! + columns.lowerBound * d, ldb: d,
                      c: table.baseAddress!, ldc: width)
                  }
                }
                // Steps 3–5 row by row: rows are independent, so they are split over the threads
                // (OpenBLAS threads only the products); the split does not change any row.
                // The table pointer is shifted so that it is indexed by full column numbers.
                let rows = RowPointers(
                  scores: scores, table: table.baseAddress.map { $0 - columns.lowerBound })
                let chunks = min(workers, tq)
                DispatchQueue.concurrentPerform(iterations: chunks) { chunk in
                  for i in stride(from: chunk, to: tq, by: chunks) {
                    let row = rows.scores + i * tk
                    if let relativePosition, let table = rows.table {
                      relativePosition.add(
                        table: table + i * width, to: row, query: i, firstKey: 0, count: tk)
                    }
                    // Step 3: mask; step 4: softmax; step 5: dropout.
                    resolved.apply(to: row, batch: b, query: i, firstKey: 0, count: tk)
                    RowSoftmax.normalize(row, count: tk)
                    dropout?.apply(to: row, row: b * tq + i, firstKey: 0, count: tk)
                  }
                }
                // Step 6: output = weights · V.
                if dv > 0 {
                  BLAS.sgemm(
                    m: tq, n: dv, k: tk,
                    a: scores, lda: tk,
                    b: v.baseAddress! + b * tk * dv, ldb: dv,
                    c: o.baseAddress! + b * tq * dv, ldc: dv)
                }
              }
             }
            }
          }
        }
      }
    }
    return AttentionResult(output: output, weights: weights, workspaceBytes: workspaceBytes)
  }
}

/// Bytes in binary units for messages: "16.00 MiB".
public func formatBytes(_ bytes: Int) -> String {
  let units = ["B", "KiB", "MiB", "GiB", "TiB"]
  var value = Double(bytes)
  var unit = 0
  while value >= 1024 && unit < units.count - 1 {
    value /= 1024
    unit += 1
  }
  return unit == 0 ? "\(bytes) B" : String(format: "%.2f %@", value, units[unit])
}

/// The score rows of one batch and its position table, shared by the row-pass threads, which
/// touch disjoint rows.
private struct RowPointers: @unchecked Sendable {
  let scores: UnsafeMutablePointer<Float>
  let table: UnsafeMutablePointer<Float>?
}
