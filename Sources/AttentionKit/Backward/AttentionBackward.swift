import Foundation
import Tensors

extension Attention {
  /// The gradients of `scaledDotProduct` with respect to its queries, keys, values and
  /// (optionally) additive bias, given the gradient `dO` of a loss with respect to its output.
  ///
  /// With `S = scale·Q·Kᵀ + bias` (`−∞` where masked), `P = softmax(S)` row by row, the dropout
  /// decisions `Z` (1 kept, 0 dropped) and `Pd = P∘Z/(1 − p)`, the forward pass is `O = Pd·V`, and
  /// ```
  /// dV = Pdᵀ·dO               dP = (dO·Vᵀ)∘Z/(1 − p)
  /// dS = P∘(dP − Δ),  Δ_i = Σ_j P_ij·dP_ij = Σ_c dO_ic·O_ic
  /// dQ = scale·dS·K           dK = scale·dSᵀ·Q           dBias = dS
  /// ```
  /// With score terms (`ScoreTerms`), `S` is theirs and `P` shares its denominator with the
  /// sinks; `dQ` and `dK` take `dS∘(1 − (t/c)²)` under a soft-cap `c` (`t` the capped score),
  /// and the terms' parameters get `dSinks` and `dT5Tables` (see `ScoreTermGradients`).
  /// (`Δ` is the softmax's Jacobian at work: every row of `dS` sums to 0). A fully masked row has
  /// `P = 0`, so it gives zero gradients and contributes nothing to `dK`, `dV` or `dBias`. The
  /// dropout decisions are those of the forward pass with the same `Dropout` (they depend only
  /// on its seed, the flat query row and the key), regenerated, never stored.
  ///
  /// - Parameters:
  ///   - queries: `Q`, `[…, Tq, D]`.
  ///   - keys: `K`, `[…, Tk, D]`; with grouped-query heads (`Hkv < H`, see `AttentionShape`),
  ///     `dK` and `dV` sum the gradients of the query heads that share a key/value head.
  ///   - values: `V`, `[…, Tk, Dv]`.
  ///   - gradOutput: `dO`, `[…, Tq, Dv]`, the shape of the forward's output.
  ///   - mask: as for `scaledDotProduct` (a keep mask, an additive bias, causal, a window).
  ///   - scale: the factor on `Q·Kᵀ`, `1/√D` when `nil`.
  ///   - dropout: the forward's dropout (the same seed drops the same weights), `nil` for none.
  ///   - terms: the forward's score terms: soft-capping, ALiBi, T5, sinks and the notebook's
  ///     relative-position term (every kernel); their parameters' gradients come back as
  ///     `dSinks`, `dT5Tables` and `dRelativeEmbeddings`.
  ///   - output: the forward's output `O`, `[…, Tq, Dv]`, from `scaledDotProduct` with the same
  ///     inputs, mask, scale and dropout; give it together with `logSumExp`, or neither.
  ///   - logSumExp: the forward's `AttentionResult.logSumExp`, `[…, Tq]` (`scaledDotProduct`
  ///     with `needLogSumExp: true`, tiled kernel). With both, the tiled kernel takes `L` and
  ///     `Δ = rowsum(dO∘O)` from them instead of rerunning the forward pass: the same gradients,
  ///     bit for bit, when that forward ran with the same `TiledAttention.Configuration` as the
  ///     backward (to float32 rounding with other blocks). When `nil`, the tiled kernel reruns
  ///     the forward. The reference and materialized kernels check their shapes and ignore them
  ///     (they recompute the softmax whole).
  ///   - kernel: `.reference` (float64 loops), `.materialized` (holds `P` and `dS`, `[Tq, Tk]`, per
  ///     task), `.tiled` (FlashAttention-2: each row's log-sum-exp from `logSumExp` or a rerun of
  ///     the forward, then `P` recomputed tile by tile, five sgemms a tile; memory linear in `Tq`
  ///     and `Tk`, see `TiledBackward`); `.automatic` is
  ///     `.tiled(TiledBackward.defaultConfiguration)`.
  ///   - needBiasGradient: whether `dBias` should come back; the mask must then have a bias.
  ///   - threads: worker threads, every core when `nil`. Results do not depend on it: they are
  ///     bit-identical for any count.
  ///   - memoryBudget: bytes of workspace the kernel may allocate; a larger problem is refused
  ///     before allocating (`AttentionError.memoryBudget`).
  /// - Returns: `dQ`, `dK`, `dV` shaped as `Q`, `K`, `V`, `dBias` shaped as the bias, the
  ///   workspace and which kernel ran.
  /// - Throws: `AttentionError` for shapes that do not fit (`dO` or `output` not `[…, Tq, Dv]`,
  ///   `logSumExp` not `[…, Tq]`, a mask that does not broadcast), `output` without `logSumExp`
  ///   or the reverse, `needBiasGradient` without a bias, a non-positive `threads` or block size,
  ///   or a workspace over `memoryBudget`.
  public static func backward(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor,
    mask: AttentionMask = .none, scale: Float? = nil, dropout: Dropout? = nil,
    terms: ScoreTerms = .none, output: Tensor? = nil, logSumExp: Tensor? = nil,
    kernel: Kernel = .automatic, needBiasGradient: Bool = false,
    threads: Int? = nil, memoryBudget: Int? = nil
  ) throws -> AttentionGradients {
    if let threads, threads < 1 {
      throw AttentionError.invalidArgument("threads must be ≥ 1, got \(threads)")
    }
    let workers = max(1, threads ?? ProcessInfo.processInfo.activeProcessorCount)
    let problem = try BackwardProblem(
      queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
      scale: scale, terms: terms, needBiasGradient: needBiasGradient)
    let forward = try problem.forwardResults(output: output, logSumExp: logSumExp)
    switch kernel {
    case .reference:
      return try ReferenceBackward.compute(
        problem, dropout: dropout.map { .counter($0) } ?? .none, memoryBudget: memoryBudget)
    case .materialized:
      // Our threads split the work; OpenBLAS runs each product on one thread, so that no
      // result depends on the thread count (see MaterializedBackward).
      return try BLASThreads.withCount(1) {
        try MaterializedBackward.compute(
          problem, dropout: dropout, threads: workers, memoryBudget: memoryBudget)
      }
    case .tiled(let configuration):
      return try BLASThreads.withCount(1) {
        try TiledBackward.compute(
          problem, dropout: dropout, configuration: configuration, threads: workers,
          memoryBudget: memoryBudget, forward: forward)
      }
    case .automatic:
      return try BLASThreads.withCount(1) {
        try TiledBackward.compute(
          problem, dropout: dropout, configuration: TiledBackward.defaultConfiguration,
          threads: workers, memoryBudget: memoryBudget, forward: forward)
      }
    }
  }
}

/// The validated inputs of one backward call, shared by the three kernels.
package struct BackwardProblem: Sendable {
  package let queries: Tensor
  package let keys: Tensor
  package let values: Tensor
  package let gradOutput: Tensor
  package let shape: AttentionShape
  /// The mask as given (the tiled kernel hands it to the forward pass) and resolved.
  package let mask: AttentionMask
  let resolved: ResolvedMask
  /// The float32 scale, `1/√D` by default.
  package let scale: Float
  /// The scale as asked for (`nil`: the default), for the forward pass.
  package let requestedScale: Float?
  /// The bias whose gradient is asked for (laid over the scores), `nil` when not asked.
  package let biasGradient: BroadcastMatrix?
  /// The score terms as given (for the forward pass and the references) and laid out.
  package let scoreTerms: ScoreTerms
  let terms: ResolvedScoreTerms

  package init(
    queries: Tensor, keys: Tensor, values: Tensor, gradOutput: Tensor, mask: AttentionMask,
    scale: Float?, terms: ScoreTerms = .none, needBiasGradient: Bool
  ) throws {
    shape = try AttentionShape(queries: queries, keys: keys, values: values)
    try terms.relativePosition?.checkHeadDim(shape.headDim)
    scoreTerms = terms
    self.terms = try ResolvedScoreTerms(terms, shape: shape, mask: mask)
    guard gradOutput.shape == shape.outputShape else {
      throw AttentionError.shapeMismatch(
        "gradOutput \(shapeForMessage(gradOutput.shape)) is not the output's shape \(shapeForMessage(shape.outputShape))"
      )
    }
    resolved = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    if needBiasGradient && resolved.bias == nil {
      throw AttentionError.invalidArgument(
        "needBiasGradient asks for the bias gradient, but the mask has no bias")
    }
    self.queries = queries
    self.keys = keys
    self.values = values
    self.gradOutput = gradOutput
    self.mask = mask
    self.scale = shape.resolvedScale(scale)
    requestedScale = scale
    biasGradient = needBiasGradient ? resolved.bias : nil
  }

  /// The forward's `output` and `logSumExp` checked against the shapes: both or neither.
  package func forwardResults(output: Tensor?, logSumExp: Tensor?) throws -> (
    output: Tensor, logSumExp: Tensor
  )? {
    switch (output, logSumExp) {
    case (nil, nil):
      return nil
    case (let output?, let logSumExp?):
      guard output.shape == shape.outputShape else {
        throw AttentionError.shapeMismatch(
          "output \(shapeForMessage(output.shape)) is not the output's shape \(shapeForMessage(shape.outputShape))"
        )
      }
      let rows = shape.batchShape + [shape.queries]
      guard logSumExp.shape == rows else {
        throw AttentionError.shapeMismatch(
          "logSumExp \(shapeForMessage(logSumExp.shape)) is not \(shapeForMessage(rows)), one value per query row"
        )
      }
      return (output, logSumExp)
    default:
      throw AttentionError.invalidArgument(
        "output and logSumExp go together: give both (from the forward) or neither")
    }
  }

  /// `Tq`, `Tk`, `D`, `Dv`.
  package var sizes: (tq: Int, tk: Int, d: Int, dv: Int) {
    (shape.queries, shape.keys, shape.headDim, shape.valueDim)
  }

  /// Zero tensors shaped as `Q`, `K`, `V` and the bias (when its gradient is asked for).
  package func zeroGradients() throws -> (dQ: Tensor, dK: Tensor, dV: Tensor, dBias: Tensor?) {
    (
      try Tensor(shape: queries.shape), try Tensor(shape: keys.shape),
      try Tensor(shape: values.shape),
      try biasGradient.map { _ in try Tensor(shape: mask.bias!.shape) }
    )
  }

  /// Tensors shaped as `Q`, `K`, `V` whose scalars are left as the allocator gives them, not
  /// zeroed: for a kernel that writes every element (the tiled kernel's five-sgemm pass).
  package func unfilledGradients() throws -> (dQ: Tensor, dK: Tensor, dV: Tensor) {
    func unfilled(_ shape: [Int]) throws -> Tensor {
      let count = try Tensor.elementCount(of: shape)
      return try Tensor(
        shape: shape,
        scalars: [Float](unsafeUninitializedCapacity: count) { _, initialized in
          initialized = count
        })
    }
    return (try unfilled(queries.shape), try unfilled(keys.shape), try unfilled(values.shape))
  }

  /// The flat query batches `b` that read key/value batch `g`, ascending: `G` consecutive query
  /// heads (the inverse of `AttentionShape.keyValueBatch`).
  package func queryBatches(ofKeyValueBatch g: Int) -> Range<Int> {
    let group = shape.groupSize
    guard group != 1 else { return g..<(g + 1) }
    let heads = shape.batchShape.last ?? 1
    let kvHeads = heads / group
    let first = (g / kvHeads) * heads + (g % kvHeads) * group
    return first..<(first + group)
  }

  /// The number of T5 terms among the score terms.
  package var t5TermCount: Int { terms.t5Rules.count }

  /// The entries of T5 term `k`'s table, `buckets·H`.
  package func t5TableSize(term k: Int) -> Int { terms.t5Rules[k].buckets * terms.heads }

  /// The entry `bucket·H + h` of T5 term `k`'s table (`[buckets, H]`, flat) that score
  /// `(query i, key j)` of flat batch `b` reads.
  package func t5Entry(term k: Int, batch b: Int, query i: Int, key j: Int) -> Int {
    let rule = terms.t5Rules[k]
    let bucket = PositionBias.t5Bucket(
      relativePosition: j - (i + terms.alignment), bidirectional: rule.bidirectional,
      buckets: rule.buckets, maxDistance: rule.maxDistance)
    return bucket * terms.heads + terms.head(b)
  }

  /// The number of key/value batches, `B·Hkv`.
  package var keyValueBatchCount: Int { shape.batchCount / max(shape.groupSize, 1) }
}

extension BroadcastMatrix {
  /// The index into the tensor's own scalars of score `(row, column)` of flat batch `batch`:
  /// where that score's bias was read, so where its gradient is summed.
  @inline(__always)
  package func index(batch: Int, row: Int, column: Int) -> Int {
    batchOffsets[batch] + row * rowStride + column * columnStride
  }
}

/// Refuses a workspace over `memoryBudget` before anything is allocated.
func checkBackwardBudget(
  _ bytes: Int?, _ memoryBudget: Int?, what: String, advice: MemoryBudgetExceeded.Advice
) throws {
  guard let memoryBudget else { return }
  if let bytes, bytes <= memoryBudget { return }
  throw AttentionError.memoryBudget(
    MemoryBudgetExceeded(what: what, neededBytes: bytes, budgetBytes: memoryBudget, advice: advice))
}

/// `Σ counts[k]·sizes[k]` bytes, `nil` on overflow.
func byteCount(_ terms: [(count: Int, size: Int)]) -> Int? {
  var total = 0
  for term in terms {
    let (bytes, overflow) = term.count.multipliedReportingOverflow(by: term.size)
    guard !overflow else { return nil }
    let (sum, sumOverflow) = total.addingReportingOverflow(bytes)
    guard !sumOverflow else { return nil }
    total = sum
  }
  return total
}
