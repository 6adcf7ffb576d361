import Tensors

/// What `MultiHeadAttention.decode` returns: the layer's output `[B, T, E]`, assembled from one
/// step per token, and how long each step took.
public struct DecodedSequence: Sendable {
  /// `[B, T, E]`: row `t` is step `t`'s output.
  public var output: Tensor
  /// Step `t`'s wall-clock seconds (the layer's `step`, cache append included), `T` of them.
  public var stepSeconds: [Double]
  /// The cache after the last step: every token's keys and values as stored
  /// (`KVCache.storedKeys()`), for checking the outputs against them.
  public var cache: KVCache
}

extension MultiHeadAttention {
  /// Runs `x` (`[B, T, E]`) one token at a time through a fresh `KVCache` of capacity `T`, as a
  /// decoder generates: step `t` appends token `t`'s keys and values and attends its query to
  /// keys `0…t`, with row `t` and keys `0…t` of the masks.
  ///
  /// The result equals the full pass with `isCausal` (top-left aligned: token `t` sees keys
  /// `0…t`) to float32 rounding, whatever `attentionMask.isCausal` says: a step cannot see
  /// tokens that are not in the cache yet.
  ///
  /// - Parameters:
  ///   - x: the tokens, `[B, T, E]`.
  ///   - keyPaddingMask: `[B, T]`, 0 = padding (its first `t + 1` columns at step `t`).
  ///   - attentionMask: keep and bias broadcast over `[…, T, T]` (row `t`, keys `0…t` at step
  ///     `t`; an extent-1 axis stays).
  ///   - positionOffset: the position of token 0, for rotary embeddings.
  ///   - kernel: each step's attention kernel (`Attention.Kernel`).
  ///   - threads: worker threads, every core when `nil`. Results do not depend on it.
  ///   - memoryBudget: bytes each step's kernel may allocate (see `Attention.scaledDotProduct`).
  ///   - storage: how the cache stores keys and values (`KVStorage`); with float16, bfloat16
  ///     or q8 the outputs are attention over the stored (rounded or quantized) values.
  public func decode(
    _ x: Tensor, keyPaddingMask: Tensor? = nil, attentionMask: AttentionMask = .none,
    positionOffset: Int = 0, kernel: Attention.Kernel = .automatic, threads: Int? = nil,
    memoryBudget: Int? = nil, storage: KVStorage = .float32
  ) throws -> DecodedSequence {
    let (batch, length) = try checkInput(x)
    let e = embedDim
    var cache = try KVCache(
      batch: batch, keyValueHeads: keyValueHeads, headDim: headDim, capacity: length,
      positionOffset: positionOffset, storage: storage)
    var output = try Tensor(shape: [batch, length, e])
    var seconds: [Double] = []
    seconds.reserveCapacity(length)
    let clock = ContinuousClock()
    for t in 0..<length {
      let token = try x.slice(axis: 1, t..<(t + 1))
      var stepMask = attentionMask
      if let keep = attentionMask.keep { stepMask.keep = try Self.stepRows(keep, t) }
      if let bias = attentionMask.bias { stepMask.bias = try Self.stepRows(bias, t) }
      let stepPadding = try keyPaddingMask.map { try $0.slice(axis: 1, 0..<(t + 1)) }
      var result: MultiHeadResult?
      let elapsed = try clock.measure {
        result = try step(
          token, cache: &cache, keyPaddingMask: stepPadding, attentionMask: stepMask,
          kernel: kernel, threads: threads, memoryBudget: memoryBudget)
      }
      let (whole, fraction) = elapsed.components
      seconds.append(Double(whole) + Double(fraction) * 1e-18)
      let stepOutput = result!.output.scalars
      for b in 0..<batch {
        for c in 0..<e { output.scalars[(b * length + t) * e + c] = stepOutput[b * e + c] }
      }
    }
    return DecodedSequence(output: output, stepSeconds: seconds, cache: cache)
  }

  /// Row `t` and keys `0…t` of a mask broadcast over `[…, T, T]` (`slice` keeps an extent-1
  /// axis whole, so a mask broadcast along an axis stays broadcast).
  static func stepRows(_ mask: Tensor, _ t: Int) throws -> Tensor {
    let keys = t + 1
    guard mask.rank >= 2 else { return try mask.rank == 1 ? mask.slice(axis: 0, 0..<keys) : mask }
    return try mask.slice(axis: mask.rank - 2, t..<(t + 1)).slice(axis: mask.rank - 1, 0..<keys)
  }
}
