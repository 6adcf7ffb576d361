import Tensors

/// A multi-head attention layer: projections in, scaled dot-product attention per head, a
/// projection out — PyTorch's `nn.MultiheadAttention`, Hugging Face's `BertAttention` and
/// `LlamaAttention` are all this layer with different weights and options (`WeightLayout`).
///
/// Shapes: input `x` `[B, T, E]`; `H` query heads and `Hkv` key/value heads of dimension `D`
/// (`H = Hkv`: classic multi-head; `Hkv < H`: grouped-query, `Hkv = 1`: multi-query, query head
/// `h` reading key/value head `h / (H / Hkv)`).
/// 1. `Q = x·W_qᵀ + b_q` `[B, T, H·D]`, `K = x·W_kᵀ + b_k` and `V = x·W_vᵀ + b_v` `[B, T, Hkv·D]`
///    — three sgemms into one output (`Linear.sideBySide`; the weights are held once) — then
///    split into heads: `Q` `[B, H, T, D]`, `K` and `V` `[B, Hkv, T, D]`;
/// 2. optionally, an RMS norm on each head's query and key (`queryNorm`, `keyNorm`: Qwen3,
///    Gemma 3), then rotary position embeddings on `Q` and `K` (`RotaryEmbedding`), token `t` at
///    position `positionOffset + t`;
/// 3. `Attention.scaledDotProduct` with the layer's scale (`1/√D` unless given) and score terms
///    (`terms`: soft-capping, sinks, ALiBi, T5's bias) and the masks (`MultiHeadMasks`: a
///    key-padding mask `[B, Tk]`, True = padding, and an SDPA attention mask), with a zero
///    output row for a query that sees no key (PyTorch's `nn.MultiheadAttention` gives NaN);
///    With `appendedKeyValue` (`nn.MultiheadAttention(add_bias_kv=True)`'s `bias_k`, `bias_v`),
///    one more key and value, the same for every batch element, after the sequence's: visible to
///    every query, never padded;
/// 4. heads merged, `[B, T, H·D]`, and `y = ctx·W_oᵀ + b_o` `[B, T, E]`;
/// 5. with `residualNorm` (BERT's `BertSelfOutput`), `y = LayerNorm(y + x)`.
///
/// `step(_:cache:…)` runs the same layer on new tokens against a `KVCache` (decoding).
/// `MultiHeadReference` computes the layer in `Double` with error bounds, for checking.
public struct MultiHeadAttention: Sendable {
  /// `W_q` `[H·D, E]`, `W_k` and `W_v` `[Hkv·D, E]`, `W_o` `[E, H·D]`, biases optional.
  public let queryProjection: Linear
  public let keyProjection: Linear
  public let valueProjection: Linear
  public let outputProjection: Linear
  /// `H`, `Hkv`, `D`.
  public let heads: Int
  public let keyValueHeads: Int
  public let headDim: Int
  /// Rotary embeddings on queries and keys, or `nil`.
  public let rotary: RotaryEmbedding?
  /// `LayerNorm(y + x)` after the output projection (BERT), or `nil`.
  public let residualNorm: LayerNorm?
  /// RMS norms of each head's query and key (`[D]` weights), before the rotary embedding.
  public let queryNorm: RMSNorm?
  public let keyNorm: RMSNorm?
  /// The factor on `q·k` in float64 as the model states it (`1/√D` unless given, e.g. Gemma 2's
  /// `query_pre_attn_scalar^(−1/2)` or T5's 1); the kernels take it rounded to float32 (`scale`).
  public let exactScale: Double
  /// Score terms of every call (`ScoreTerms`: per query head, `[H]` sinks and slopes, T5's
  /// `[buckets, H]` table).
  public let terms: ScoreTerms
  /// A key and a value appended after the sequence's (`add_bias_kv`), `[Hkv·D]` each.
  public let appendedKeyValue: AppendedKeyValue?

  /// `E`, the width of inputs and outputs.
  public var embedDim: Int { queryProjection.inputFeatures }
  /// `exactScale` as float32, what the kernels multiply by.
  public var scale: Float { Float(exactScale) }

  /// A layer from its parts; throws `AttentionError.shapeMismatch` naming the projection whose
  /// shape does not fit `H`, `Hkv` and `D`, or `invalidArgument` when `Hkv` does not divide `H`.
  public init(
    queryProjection: Linear, keyProjection: Linear, valueProjection: Linear,
    outputProjection: Linear, heads: Int, keyValueHeads: Int? = nil,
    rotary: RotaryEmbedding? = nil, residualNorm: LayerNorm? = nil, queryNorm: RMSNorm? = nil,
    keyNorm: RMSNorm? = nil, scale: Double? = nil, terms: ScoreTerms = .none,
    appendedKeyValue: AppendedKeyValue? = nil
  ) throws {
    let kvHeads = keyValueHeads ?? heads
    guard heads > 0, kvHeads > 0 else {
      throw AttentionError.invalidArgument(
        "a multi-head layer needs at least one head, got \(heads) query and \(kvHeads) key/value heads"
      )
    }
    guard heads % kvHeads == 0 else {
      throw AttentionError.invalidArgument(
        "the key/value heads (\(kvHeads)) must divide the query heads (\(heads))")
    }
    let e = queryProjection.inputFeatures
    guard queryProjection.outputFeatures % heads == 0 else {
      throw AttentionError.shapeMismatch(
        "the query projection's \(queryProjection.outputFeatures) outputs do not split into \(heads) heads"
      )
    }
    let d = queryProjection.outputFeatures / heads
    func check(_ layer: Linear, _ name: String, out: Int, in width: Int) throws {
      guard layer.weight.shape == [out, width] else {
        throw AttentionError.shapeMismatch(
          "the \(name) projection's weight is \(shapeForMessage(layer.weight.shape)), expected [\(out), \(width)] for E \(e), H \(heads), Hkv \(kvHeads), D \(d)"
        )
      }
    }
    try check(keyProjection, "key", out: kvHeads * d, in: e)
    try check(valueProjection, "value", out: kvHeads * d, in: e)
    try check(outputProjection, "output", out: e, in: heads * d)
    if let rotary, rotary.dimension > d {
      throw AttentionError.shapeMismatch(
        "the rotary embedding rotates \(rotary.dimension) features, the head dimension is \(d)")
    }
    if let residualNorm, residualNorm.features != e {
      throw AttentionError.shapeMismatch(
        "the layer norm normalizes \(residualNorm.features) features, the layer's width is \(e)")
    }
    for (norm, name) in [(queryNorm, "query"), (keyNorm, "key")] {
      if let norm, norm.features != d {
        throw AttentionError.shapeMismatch(
          "the \(name) norm normalizes \(norm.features) features, the head dimension is \(d)")
      }
    }
    if let appended = appendedKeyValue,
      appended.key.shape != [kvHeads * d] || appended.value.shape != [kvHeads * d]
    {
      throw AttentionError.shapeMismatch(
        "an appended key and value must be [Hkv·D] = [\(kvHeads * d)] each, got "
          + "\(shapeForMessage(appended.key.shape)) and \(shapeForMessage(appended.value.shape))")
    }
    if let scale, !scale.isFinite {
      throw AttentionError.invalidArgument("the layer's scale must be finite, got \(scale)")
    }
    self.queryProjection = queryProjection
    self.keyProjection = keyProjection
    self.valueProjection = valueProjection
    self.outputProjection = outputProjection
    self.heads = heads
    self.keyValueHeads = kvHeads
    self.headDim = d
    self.rotary = rotary
    self.residualNorm = residualNorm
    self.queryNorm = queryNorm
    self.keyNorm = keyNorm
    exactScale = scale ?? 1 / Double(d).squareRoot()
    self.terms = terms
    self.appendedKeyValue = appendedKeyValue
  }

  // MARK: - Forward

  /// The layer on `x` `[B, T, E]` (self-attention): output `[B, T, E]`, and with `needWeights`
  /// the per-head weights `[B, H, T, T]` (when the kernel holds them).
  ///
  /// - Parameters:
  ///   - x: the input, `[B, T, E]`.
  ///   - keyPaddingMask: `[B, T]`, nonzero (True) = padding: that key is hidden from every query
  ///     of its batch element (PyTorch's `key_padding_mask`).
  ///   - attentionMask: SDPA's mask: keep (0 = masked), additive bias, causal, window —
  ///     broadcast to `[B, H, T, T]`. (`nn.MultiheadAttention`'s own boolean `attn_mask` is the
  ///     opposite, True = masked.)
  ///   - positionOffset: the position of token 0 for the rotary embedding.
  ///   - kernel: the kernel, as for `Attention.scaledDotProduct`.
  ///   - needWeights: whether the per-head weights should come back.
  ///   - threads: worker threads, every core when `nil`; results do not depend on it.
  ///   - memoryBudget: bytes the kernel may allocate for the weights.
  public func callAsFunction(
    _ x: Tensor, keyPaddingMask: Tensor? = nil, attentionMask: AttentionMask = .none,
    positionOffset: Int = 0, kernel: Attention.Kernel = .automatic, needWeights: Bool = false,
    threads: Int? = nil, memoryBudget: Int? = nil
  ) throws -> MultiHeadResult {
    let (batch, length) = try checkInput(x)
    let heads = try project(x, positionOffset: positionOffset)
    let mask = try combinedMask(
      attentionMask, keyPaddingMask: keyPaddingMask, batch: batch, length: length)
    let attention = try Attention.scaledDotProduct(
      queries: heads.queries, keys: heads.keys, values: heads.values, mask: mask, scale: scale,
      terms: terms, kernel: kernel, needWeights: needWeights, threads: threads,
      memoryBudget: memoryBudget)
    return MultiHeadResult(output: try finish(attention.output, input: x), attention: attention)
  }

  /// The one `AttentionMask` the kernels see for `attentionMask` and a key-padding mask
  /// `[B, T]` (nonzero = padding) folded in (see `callAsFunction`), over the `T` keys of the
  /// sequence and the appended one, if any (never padded). An appended key goes with a key
  /// padding mask only: an attention mask, causal or a window is refused with it.
  public func combinedMask(
    _ attentionMask: AttentionMask, keyPaddingMask: Tensor?, batch: Int, length: Int
  ) throws -> AttentionMask {
    guard appendedKeyValue != nil else {
      return try MultiHeadMasks.combine(
        attentionMask, keyPaddingMask: keyPaddingMask, batch: batch, keys: length)
    }
    guard attentionMask.keep == nil, attentionMask.bias == nil, !attentionMask.isCausal,
      attentionMask.window == nil
    else {
      throw AttentionError.invalidArgument(
        "a layer with an appended key and value (add_bias_kv) takes a key padding mask only, "
          + "not an attention mask, causal or a window")
    }
    guard let padding = keyPaddingMask else { return attentionMask }
    guard padding.shape == [batch, length] else {
      throw AttentionError.shapeMismatch(
        "the key padding mask must be [B, T] = [\(batch), \(length)], got "
          + shapeForMessage(padding.shape))
    }
    var extended = [Float](repeating: 0, count: batch * (length + 1))
    for b in 0..<batch {
      for t in 0..<length { extended[b * (length + 1) + t] = padding.scalars[b * length + t] }
    }
    return try MultiHeadMasks.combine(
      attentionMask, keyPaddingMask: Tensor(validShape: [batch, length + 1], scalars: extended),
      batch: batch, keys: length + 1)
  }

  /// Steps 1–2: `Q` `[B, H, T, D]`, `K` and `V` `[B, Hkv, T, D]`, normalized and rotated when the
  /// layer has query and key norms and rotary embeddings; with `appendedKeyValue`, `K` and `V`
  /// are `[B, Hkv, T + 1, D]`.
  public func project(_ x: Tensor, positionOffset: Int = 0) throws -> ProjectedHeads {
    _ = try checkInput(x)
    let stacked = try Linear.sideBySide([queryProjection, keyProjection, valueProjection], x)
    var split = try HeadLayout.split(
      stacked, headCounts: [heads, keyValueHeads, keyValueHeads], headDim: headDim)
    try queryNorm?.apply(to: &split[0])
    try keyNorm?.apply(to: &split[1])
    if let rotary {
      try rotary.apply(to: &split[0], positionOffset: positionOffset)
      try rotary.apply(to: &split[1], positionOffset: positionOffset)
    }
    if let appended = appendedKeyValue {
      split[1] = Self.appending(appended.key, to: split[1])
      split[2] = Self.appending(appended.value, to: split[2])
    }
    return ProjectedHeads(queries: split[0], keys: split[1], values: split[2])
  }

  /// `x` `[B, Hkv, T, D]` with `row` (`[Hkv·D]`, heads side by side) appended to every
  /// batch element's heads: `[B, Hkv, T + 1, D]`.
  static func appending(_ row: Tensor, to x: Tensor) -> Tensor {
    let (b, hkv, t, d) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    var scalars: [Float] = []
    scalars.reserveCapacity(b * hkv * (t + 1) * d)
    for batch in 0..<b {
      for head in 0..<hkv {
        let start = (batch * hkv + head) * t * d
        scalars += x.scalars[start..<(start + t * d)]
        scalars += row.scalars[(head * d)..<((head + 1) * d)]
      }
    }
    return Tensor(validShape: [b, hkv, t + 1, d], scalars: scalars)
  }

  /// Steps 4–5: the attention output `[B, H, T, D]` merged, projected and (BERT) normalized.
  func finish(_ context: Tensor, input x: Tensor) throws -> Tensor {
    var y = try outputProjection(HeadLayout.merge(context))
    if let residualNorm {
      for index in y.scalars.indices { y.scalars[index] += x.scalars[index] }
      try residualNorm.apply(to: &y)
    }
    return y
  }

  @discardableResult
  package func checkInput(_ x: Tensor) throws -> (batch: Int, length: Int) {
    guard x.rank == 3, x.shape[2] == embedDim else {
      throw AttentionError.shapeMismatch(
        "the input must be [B, T, E] = [B, T, \(embedDim)], got \(shapeForMessage(x.shape))")
    }
    return (x.shape[0], x.shape[1])
  }
}

/// `nn.MultiheadAttention(add_bias_kv=True)`'s `bias_k` and `bias_v`: one more key and value
/// after the sequence's, `[Hkv·D]` each (heads side by side).
public struct AppendedKeyValue: Sendable, Equatable {
  public var key: Tensor
  public var value: Tensor

  public init(key: Tensor, value: Tensor) {
    self.key = key
    self.value = value
  }
}

/// The projections of one call, split into heads.
public struct ProjectedHeads: Sendable {
  /// `[B, H, T, D]`.
  public var queries: Tensor
  /// `[B, Hkv, T, D]`.
  public var keys: Tensor
  public var values: Tensor
}

/// What `MultiHeadAttention` returns.
public struct MultiHeadResult: Sendable {
  /// `[B, Tq, E]`.
  public var output: Tensor
  /// The attention call: its output `[B, H, Tq, D]` (before the heads are merged), weights
  /// `[B, H, Tq, Tk]` when asked for and held, workspace, kernel.
  public var attention: AttentionResult

  /// `[B, H, Tq, Tk]`, or `nil`.
  public var weights: Tensor? { attention.weights }

  /// The weights averaged over the heads, `[B, Tq, Tk]` (`average_attn_weights=True`), or `nil`.
  public var averagedWeights: Tensor? {
    guard let weights, weights.rank == 4 else { return nil }
    let (b, h, plane) = (weights.shape[0], weights.shape[1], weights.shape[2] * weights.shape[3])
    var mean = [Float](repeating: 0, count: b * plane)
    for batch in 0..<b {
      for head in 0..<h {
        let source = (batch * h + head) * plane
        for k in 0..<plane { mean[batch * plane + k] += weights.scalars[source + k] }
      }
    }
    let inverse = 1 / Float(max(h, 1))
    return Tensor(
      validShape: [b, weights.shape[2], weights.shape[3]], scalars: mean.map { $0 * inverse })
  }
}
