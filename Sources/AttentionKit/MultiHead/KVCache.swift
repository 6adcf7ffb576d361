import Tensors

/// The keys and values a decoder has computed so far, so that each new token attends to them
/// without recomputing them: storage for `capacity` tokens, filled from the front.
///
/// `keys` and `values` are `[B, Hkv, capacity, D]` (and `Dv`); the first `count` rows of each
/// head are filled. Attention reads the filled rows in place (`Attention.scaledDotProduct`'s
/// `keyCount`), so a step costs no copy of the cache — where Hugging Face's `DynamicCache`
/// concatenates, copying the whole cache on every token.
public struct KVCache: Sendable {
  /// `[B, Hkv, capacity, D]`.
  public private(set) var keys: Tensor
  /// `[B, Hkv, capacity, Dv]`.
  public private(set) var values: Tensor
  /// The tokens held, `≤ capacity`.
  public private(set) var count: Int
  /// The position of the cache's first token, for rotary embeddings: token `k` of the cache
  /// sits at position `positionOffset + k`.
  public let positionOffset: Int

  public var capacity: Int { keys.shape[2] }
  public var batch: Int { keys.shape[0] }
  public var keyValueHeads: Int { keys.shape[1] }
  public var headDim: Int { keys.shape[3] }
  public var valueDim: Int { values.shape[3] }

  /// An empty cache; allocates `B·Hkv·capacity·(D + Dv)` floats at once.
  public init(
    batch: Int, keyValueHeads: Int, headDim: Int, valueDim: Int? = nil, capacity: Int,
    positionOffset: Int = 0
  ) throws {
    guard batch >= 0, keyValueHeads > 0, headDim >= 0, capacity >= 0, positionOffset >= 0,
      positionOffset <= Int.max - capacity
    else {
      throw AttentionError.invalidArgument(
        "a KV cache needs B ≥ 0, Hkv ≥ 1, D ≥ 0 a capacity ≥ 0 and a position offset in 0…Int.max − capacity, got B \(batch), Hkv \(keyValueHeads), D \(headDim), capacity \(capacity), position offset \(positionOffset)"
      )
    }
    self.positionOffset = positionOffset
    keys = try Tensor(shape: [batch, keyValueHeads, capacity, headDim])
    values = try Tensor(shape: [batch, keyValueHeads, capacity, valueDim ?? headDim])
    count = 0
  }

  /// Appends `t` new tokens' keys `[B, Hkv, t, D]` and values `[B, Hkv, t, Dv]`; throws, leaving
  /// the cache as it was, when they do not fit its shape or its capacity.
  public mutating func append(keys newKeys: Tensor, values newValues: Tensor) throws {
    let t = newKeys.rank == 4 ? newKeys.shape[2] : -1
    guard newKeys.shape == [batch, keyValueHeads, t, headDim],
      newValues.shape == [batch, keyValueHeads, t, valueDim]
    else {
      throw AttentionError.shapeMismatch(
        "a KV cache of [B, Hkv, ·, D] = [\(batch), \(keyValueHeads), ·, \(headDim)] cannot take keys \(shapeForMessage(newKeys.shape)) and values \(shapeForMessage(newValues.shape))"
      )
    }
    guard t <= capacity - count else {
      throw AttentionError.invalidArgument(
        "the KV cache holds \(count) of \(capacity) tokens; \(t) more do not fit")
    }
    Self.write(newKeys, into: &keys, at: count, tokens: t)
    Self.write(newValues, into: &values, at: count, tokens: t)
    count += t
  }

  /// Forgets every token (the storage stays allocated).
  public mutating func removeAll() { count = 0 }

  /// Keeps the first `newCount` tokens (`≤ count`), forgetting the rest.
  public mutating func truncate(to newCount: Int) throws {
    guard newCount >= 0, newCount <= count else {
      throw AttentionError.invalidArgument(
        "cannot truncate a KV cache of \(count) tokens to \(newCount)")
    }
    count = newCount
  }

  private static func write(
    _ rows: Tensor, into storage: inout Tensor, at start: Int, tokens t: Int
  ) {
    let (heads, capacity, width) = (
      storage.shape[0] * storage.shape[1], storage.shape[2], storage.shape[3]
    )
    guard t > 0, width > 0 else { return }
    rows.scalars.withUnsafeBufferPointer { source in
      storage.scalars.withUnsafeMutableBufferPointer { target in
        for head in 0..<heads {
          (target.baseAddress! + (head * capacity + start) * width)
            .update(from: source.baseAddress! + head * t * width, count: t * width)
        }
      }
    }
  }
}

extension MultiHeadAttention {
  /// The layer on `t` new tokens `x` `[B, t, E]` of a sequence whose earlier tokens' keys and
  /// values `cache` holds: their keys and values (rotated at positions `cache.positionOffset + cache.count …`) are
  /// appended, then the new queries attend to every cached key with the causal diagonal at the
  /// bottom right (query `i` sees keys `0 … cache.count − t + i`). Token by token this gives the
  /// full causal pass's outputs, to float32 rounding.
  ///
  /// One query head group against a long cache takes the tiled kernel's decode path: the heads
  /// sharing a key/value head are stacked, and the cache's keys are split across threads.
  ///
  /// - Parameters:
  ///   - x: the new tokens, `[B, t, E]`.
  ///   - cache: the sequence's keys and values so far; the new tokens' are appended (and removed
  ///     again when the step throws).
  ///   - keyPaddingMask: `[B, cache.count + t]` (after appending), nonzero = padding.
  ///   - attentionMask: for the `[t, cache.count + t]` scores of this step; its causal flag is
  ///     forced on, bottom-right.
  ///   - kernel: the kernel, as for `Attention.scaledDotProduct`.
  ///   - needWeights: whether the per-head weights should come back.
  ///   - threads: worker threads, every core when `nil`; results do not depend on it.
  ///   - memoryBudget: bytes the kernel may allocate for the weights.
  public func step(
    _ x: Tensor, cache: inout KVCache, keyPaddingMask: Tensor? = nil,
    attentionMask: AttentionMask = .none, kernel: Attention.Kernel = .automatic,
    needWeights: Bool = false, threads: Int? = nil, memoryBudget: Int? = nil
  ) throws -> MultiHeadResult {
    let (batch, length) = try checkInput(x)
    guard appendedKeyValue == nil else {
      throw AttentionError.invalidArgument(
        "a layer with an appended key and value (add_bias_kv) does not decode through a cache")
    }
    guard cache.batch == batch, cache.keyValueHeads == keyValueHeads, cache.headDim == headDim,
      cache.valueDim == headDim
    else {
      throw AttentionError.shapeMismatch(
        "the KV cache is [B, Hkv, ·, D] = [\(cache.batch), \(cache.keyValueHeads), ·, \(cache.headDim)], the layer needs [\(batch), \(keyValueHeads), ·, \(headDim)]"
      )
    }
    let projected = try project(x, positionOffset: cache.positionOffset + cache.count)
    var mask = attentionMask
    mask.isCausal = true
    mask.causalAlignment = .bottomRight
    let keys = cache.count + length
    mask = try MultiHeadMasks.combine(
      mask, keyPaddingMask: keyPaddingMask, batch: batch, keys: keys)
    let previous = cache.count
    try cache.append(keys: projected.keys, values: projected.values)
    let attention: AttentionResult
    do {
      attention = try Attention.scaledDotProduct(
        queries: projected.queries, keys: cache.keys, values: cache.values, mask: mask,
        scale: scale, terms: terms, kernel: kernel, needWeights: needWeights, threads: threads,
        memoryBudget: memoryBudget, keyCount: cache.count)
    } catch {
      // A step that fails leaves the cache as it found it.
      try? cache.truncate(to: previous)
      throw error
    }
    return MultiHeadResult(output: try finish(attention.output, input: x), attention: attention)
  }
}
