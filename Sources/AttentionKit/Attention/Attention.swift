import Foundation
import Tensors

/// Scaled dot-product attention: the one entry point of AttentionKit, in the manner of PyTorch's
/// `scaled_dot_product_attention` and its backends.
///
/// `output = dropout(softmax(Q·Kᵀ·scale + mask)) · V`
///
/// Shape legend, used throughout the library: `B` batch, `H` heads, `Tq` queries, `Tk` keys, `D`
/// head dimension (of queries and keys), `Dv` value dimension, `M` largest relative distance.
/// Any leading dimensions are a batch (`[B, H, …]`), the same for Q, K and V — except the heads,
/// where K and V may have fewer (`Hkv`, grouped-query attention; see `AttentionShape`).
public enum Attention {
  /// Which kernel computes the attention. Every kernel has the same semantics and agrees with the
  /// others to float32 rounding; they differ in speed, memory and whether weights come back.
  ///
  /// The same enum names the kernel a call ran (`AttentionResult.kernel`, never `.automatic`),
  /// and the kernels of the backward passes (`Attention.backward`,
  /// `RelativePositionAttention.backward`).
  public enum Kernel: Sendable, Hashable {
    /// `ReferenceAttention`: plain loops in `Double`, one thread, no BLAS. For checking.
    case reference
    /// `MaterializedAttention`: holds the `[B, H, Tq, Tk]` weights (and returns them).
    case materialized
    /// `TiledAttention`: online softmax over `Bq × Bk` tiles; memory linear in `Tq` and `Tk`, no
    /// weights returned.
    case tiled(TiledAttention.Configuration)
    /// Materialized when the weights are asked for and fit the memory budget, tiled otherwise.
    case automatic

    /// `reference`, `materialized`, `tiled` or `automatic`: for reports and messages.
    public var name: String {
      switch self {
      case .reference: return "reference"
      case .materialized: return "materialized"
      case .tiled: return "tiled"
      case .automatic: return "automatic"
      }
    }

    /// Whether this is `.tiled`, with any configuration.
    public var isTiled: Bool {
      if case .tiled = self { return true }
      return false
    }
  }

  /// Computes attention of `queries` over `keys` and `values`.
  ///
  /// - Parameters:
  ///   - queries: `Q`, `[…, Tq, D]`.
  ///   - keys: `K`, `[…, Tk, D]`.
  ///   - values: `V`, `[…, Tk, Dv]`.
  ///   - mask: which scores take part (`AttentionMask`: a keep mask, 0 = masked; an additive
  ///     bias; causal). A row whose every key is masked gives zero weights and a zero output row.
  ///   - scale: the factor on `Q·Kᵀ`, `1/√D` when `nil`.
  ///   - dropout: dropout on the weights after softmax (`nil`: none, as in evaluation). The
  ///     decision for each weight depends only on the seed, the query row and the key, so every
  ///     kernel and thread count drops the same weights.
  ///   - terms: soft-capping, ALiBi or T5 biases, attention sinks and the notebook's
  ///     relative-position term `q_i·E[clip(j − i, −M, M) + M]·scale` (`ScoreTerms`), in every
  ///     kernel; `Attention.backward(terms:)` gives their gradients. With sinks, `logSumExp`
  ///     includes the sink's term.
  ///   - kernel: see `Kernel`; `.automatic` by default.
  ///   - needWeights: whether the `[…, Tq, Tk]` weights should come back (`.automatic` then
  ///     picks the materialized kernel when they fit `memoryBudget`).
  ///   - threads: worker threads, every core when `nil`. Results do not depend on it.
  ///   - memoryBudget: bytes the kernel may allocate for the weights; a larger problem is refused
  ///     before allocating (`AttentionError.memoryBudget`) or, with `.automatic`, goes tiled.
  ///   - keyCount: only the first `keyCount` rows of each head of `keys` and `values` take part
  ///     (`Tk = keyCount`; a `KVCache`'s filled rows, read in place); all of them when `nil`.
  ///   - needLogSumExp: whether `AttentionResult.logSumExp` (`[…, Tq]`, each row's log-sum-exp,
  ///     what `Attention.backward(…, output:logSumExp:)` needs to skip rerunning the forward)
  ///     should come back. Only the tiled kernel provides it (`.automatic` goes tiled when the
  ///     weights are not asked for); from the reference and materialized kernels it is `nil`.
  /// - Returns: the output `[…, Tq, Dv]`, the weights when the kernel holds them, the rows'
  ///   log-sum-exp when asked for (tiled kernel), the kernel's workspace and which kernel ran.
  /// - Throws: `AttentionError` for shapes that do not fit, a mask that does not broadcast, a
  ///   non-positive `threads` or block size, or a problem over the budget.
  public static func scaledDotProduct(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask = .none, scale: Float? = nil, dropout: Dropout? = nil,
    terms: ScoreTerms = .none, kernel: Kernel = .automatic, needWeights: Bool = false,
    threads: Int? = nil, memoryBudget: Int? = nil, keyCount: Int? = nil,
    needLogSumExp: Bool = false
  ) throws -> AttentionResult {
    if let threads, threads < 1 {
      throw AttentionError.invalidArgument("threads must be ≥ 1, got \(threads)")
    }
    let workers = max(1, threads ?? ProcessInfo.processInfo.activeProcessorCount)
    let shape = try AttentionShape(
      queries: queries, keys: keys, values: values, keyCount: keyCount)
    switch resolve(kernel, shape: shape, needWeights: needWeights, memoryBudget: memoryBudget) {
    case .reference:
      let reference = try ReferenceAttention(
        queries: queries, keys: keys, values: values, mask: mask, scale: scale, dropout: dropout,
        terms: terms, keyCount: keyCount)
      try checkWeightsBudget(shape, memoryBudget, kernel: "reference")
      return reference.compute()
    case .materialized:
      // Our threads split the work; OpenBLAS runs each product on one thread, so that no
      // result depends on the thread count (see MaterializedAttention).
      return try BLASThreads.withCount(1) {
        try MaterializedAttention.compute(
          queries: queries, keys: keys, values: values, mask: mask, scale: scale,
          dropout: dropout, relativePosition: terms.relativePosition, terms: terms,
          memoryBudget: memoryBudget,
          threads: workers, keyCount: keyCount)
      }
    case .tiled(let configuration):
      // Our threads split the work; OpenBLAS's own threads would only compete with them.
      return try BLASThreads.withCount(1) {
        try TiledAttention.compute(
          queries: queries, keys: keys, values: values, mask: mask, scale: scale,
          dropout: dropout, relativePosition: terms.relativePosition, terms: terms,
          configuration: configuration,
          threads: workers, keyCount: keyCount, needLogSumExp: needLogSumExp)
      }
    case .automatic:
      preconditionFailure("resolve(_:) never returns .automatic")
    }
  }

  /// The kernel `scaledDotProduct` runs for `kernel`: `.automatic` becomes `.materialized` when
  /// the weights are asked for and `B·H·Tq·Tk` floats fit `memoryBudget`, `.tiled(.default)`
  /// otherwise; the others stay as they are.
  public static func resolve(
    _ kernel: Kernel, shape: AttentionShape, needWeights: Bool, memoryBudget: Int?
  ) -> Kernel {
    guard kernel == .automatic else { return kernel }
    guard needWeights else { return .tiled(.default) }
    let bytes = try? Tensor.elementCount(of: shape.weightsShape)
      .multipliedReportingOverflow(by: MemoryLayout<Float>.stride)
    guard let bytes, !bytes.overflow else { return .tiled(.default) }
    return bytes.partialValue <= (memoryBudget ?? .max) ? .materialized : .tiled(.default)
  }

  /// Refuses a kernel's `[…, Tq, Tk]` weights over `memoryBudget`, before allocating them.
  static func checkWeightsBudget(_ shape: AttentionShape, _ memoryBudget: Int?, kernel: String)
    throws
  {
    guard let memoryBudget else { return }
    let count = try? Tensor.elementCount(of: shape.weightsShape)
    let bytes = count.flatMap { count -> Int? in
      let (bytes, overflow) = count.multipliedReportingOverflow(by: MemoryLayout<Float>.stride)
      return overflow ? nil : bytes
    }
    if let bytes, bytes <= memoryBudget { return }
    throw AttentionError.memoryBudget(
      MemoryBudgetExceeded(
        what: "the \(kernel) kernel's \(shapeForMessage(shape.weightsShape)) weights",
        neededBytes: bytes, budgetBytes: memoryBudget, advice: .useTiledKernel))
  }
}
