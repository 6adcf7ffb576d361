import Tensors

/// The gradients of scaled dot-product attention, as `Attention.backward` returns them.
///
/// Shape legend: `B` batch, `H` query heads, `Hkv` key/value heads, `Tq` queries, `Tk` keys,
/// `D` head dimension, `Dv` value dimension.
public struct AttentionGradients: Sendable {
  /// `∂L/∂Q`, `[…, Tq, D]`, shaped as the queries.
  public var dQ: Tensor
  /// `∂L/∂K`, `[…, Tk, D]`, shaped as the keys: with grouped-query heads, the sum over the
  /// `H / Hkv` query heads that share each key/value head.
  public var dK: Tensor
  /// `∂L/∂V`, `[…, Tk, Dv]`, shaped as the values (summed over a group as `dK` is).
  public var dV: Tensor
  /// `∂L/∂bias`, shaped as the mask's bias tensor as given (summed over the dimensions it is
  /// broadcast along); `nil` unless asked for.
  public var dBias: Tensor?
  /// `∂L/∂σ`, `[H]`, of the score terms' sinks (summed over the batch and the rows); `nil`
  /// without sinks.
  public var dSinks: Tensor?
  /// `∂L/∂table`, `[buckets, H]`, of each T5 position bias of the score terms, in
  /// `ScoreTerms.positionBiases` order; empty without T5.
  public var dT5Tables: [Tensor]
  /// `∂L/∂E`, `[2M + 1, D]`, of the relative-position term (`ScoreTerms.relativePosition`);
  /// `nil` without it.
  public var dRelativeEmbeddings: Tensor?
  /// The bytes of scratch memory the kernel allocated, beyond its inputs and its gradients.
  public var workspaceBytes: Int
  /// The kernel that ran (`Attention.Kernel.automatic` resolved to one of the others).
  public var kernel: Attention.Kernel
  /// The `Bq × Bk` tiles of the tiled kernel (each of five sgemms; with the bias gradient, the
  /// tiles of both its passes), causal and windowed calls skipping the others; the forward pass
  /// it may rerun is not counted. `nil` from the other kernels.
  public var tilesComputed: Int?

  public init(
    dQ: Tensor, dK: Tensor, dV: Tensor, dBias: Tensor?, dSinks: Tensor? = nil,
    dT5Tables: [Tensor] = [], dRelativeEmbeddings: Tensor? = nil, workspaceBytes: Int,
    kernel: Attention.Kernel, tilesComputed: Int? = nil
  ) {
    self.dRelativeEmbeddings = dRelativeEmbeddings
    self.dSinks = dSinks
    self.dT5Tables = dT5Tables
    self.dQ = dQ
    self.dK = dK
    self.dV = dV
    self.dBias = dBias
    self.workspaceBytes = workspaceBytes
    self.kernel = kernel
    self.tilesComputed = tilesComputed
  }
}
