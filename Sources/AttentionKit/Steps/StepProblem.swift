import Foundation
import Tensors

/// One batch element of an attention problem, and the kernel's passes over it, each returning a
/// new matrix instead of overwriting the last.
struct StepProblem {
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
        MemoryBudgetExceeded(
          what: "the step-by-step matrices of one [\(tq), \(tk)] attention", neededBytes: bytes,
          budgetBytes: memoryBudget, advice: .other("show fewer queries or keys")))
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
              b: k.baseAddress! + shape.keyRowOffset(batch) * d, ldb: d,
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
              b: v.baseAddress! + shape.keyRowOffset(batch) * dv, ldb: dv, c: o.baseAddress!,
              ldc: dv)
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
