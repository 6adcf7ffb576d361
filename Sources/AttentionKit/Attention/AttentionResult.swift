import Tensors

/// The result of an attention kernel.
public struct AttentionResult: Sendable {
  /// `[…, Tq, Dv]`.
  public var output: Tensor
  /// `[…, Tq, Tk]`, after dropout (as the notebook returns them); `nil` for kernels that never hold
  /// the whole matrix (the tiled kernel).
  public var weights: Tensor?
  /// The bytes of scratch memory the kernel allocated, beyond its inputs and its output.
  public var workspaceBytes: Int
  /// The kernel that ran (`Attention.Kernel.automatic` resolved to one of the others).
  public var kernel: Attention.Kernel
  /// The `Bq × Bk` tiles the tiled kernel computed (causal and windowed calls skip the others);
  /// `nil` from the other kernels.
  public var tilesComputed: Int?
  /// `[…, Tq]`, float32: each query row's log-sum-exp of its scaled, masked scores (with the
  /// relative-position term, if any), `L_i = log Σ_j exp(S_ij)` (computed as `m_i + log ℓ_i`
  /// from the running max and sum, before dropout), `−∞` for a row that sees no key, NaN for a
  /// row poisoned by NaN. Filled by the tiled
  /// kernel when `Attention.scaledDotProduct` is called with `needLogSumExp: true`, `nil`
  /// otherwise (and always `nil` from the reference and materialized kernels). Hand it, with
  /// `output`, to `Attention.backward(…, output:logSumExp:)` to spare the backward its rerun of
  /// the forward pass.
  public var logSumExp: Tensor?

  public init(
    output: Tensor, weights: Tensor?, workspaceBytes: Int, kernel: Attention.Kernel,
    tilesComputed: Int? = nil, logSumExp: Tensor? = nil
  ) {
    self.output = output
    self.weights = weights
    self.workspaceBytes = workspaceBytes
    self.kernel = kernel
    self.tilesComputed = tilesComputed
    self.logSumExp = logSumExp
  }
}
