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
}
