import Tensors

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
