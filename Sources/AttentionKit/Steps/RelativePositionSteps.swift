import Foundation
import Tensors

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
