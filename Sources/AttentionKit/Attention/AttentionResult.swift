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
  public var kernel: Attention.KernelName
  /// The `Bq × Bk` tiles the tiled kernel computed (causal and windowed calls skip the others);
  /// `nil` from the other kernels.
  public var tilesComputed: Int?

  public init(
    output: Tensor, weights: Tensor?, workspaceBytes: Int, kernel: Attention.KernelName,
    tilesComputed: Int? = nil
  ) {
    self.output = output
    self.weights = weights
    self.workspaceBytes = workspaceBytes
    self.kernel = kernel
    self.tilesComputed = tilesComputed
  }
}
