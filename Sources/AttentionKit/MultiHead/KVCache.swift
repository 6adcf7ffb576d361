import Foundation
import Tensors

/// The keys and values a decoder has computed so far, so that each new token attends to them
/// without recomputing them: storage for `capacity` tokens, filled from the front.
///
/// The rows are `[B, Hkv, capacity, D]` (and `Dv`), stored as `storage` says: float32 as computed,
/// or float16, bfloat16 or `q8` blocks (`KVStorage`), which hold 1/2 and about 1/4 of the bytes.
/// Attention reads the filled rows in place (`Attention.scaledDotProduct`'s `keyCount`), so a step
/// costs no copy of the cache — where Hugging Face's `DynamicCache` concatenates, copying the
/// whole cache on every token; the tiled kernel widens a compact cache's rows as it reads them
/// (in registers for a decode step's small tiles, else a tile at a time into its scratch), never
/// a float32 copy of the whole cache.
public struct KVCache: Sendable {
  private var keyRows: KVRows
  private var valueRows: KVRows
  /// The tokens held, `≤ capacity`.
  public private(set) var count: Int
  /// The position of the cache's first token, for rotary embeddings: token `k` of the cache
  /// sits at position `positionOffset + k`.
  public let positionOffset: Int
  public let batch: Int
  public let keyValueHeads: Int
  public let headDim: Int
  public let valueDim: Int
  public var capacity: Int { keyRows.capacity }
  /// How the keys and values are stored.
  public var storage: KVStorage { keyRows.storage }

  /// `[B, Hkv, capacity, D]`, the stored keys as `Float`s: for a float32 cache the storage itself
  /// (no copy); for the others a converted copy of every row (rows past `count` are zeros or
  /// stale). `storedKeys()` gives just the filled rows.
  public var keys: Tensor {
    keyRows.floatTensor(batchShape: [batch, keyValueHeads])
      ?? (try! keyRows.floatRows(batchShape: [batch, keyValueHeads], count: capacity))
  }
  /// `[B, Hkv, capacity, Dv]`, as `keys`.
  public var values: Tensor {
    valueRows.floatTensor(batchShape: [batch, keyValueHeads])
      ?? (try! valueRows.floatRows(batchShape: [batch, keyValueHeads], count: capacity))
  }

  /// An empty cache; allocates `B·Hkv·capacity` rows of `D` and of `Dv` values at once, in
  /// `storage` (`KVStorage.rowBytes(width:)` bytes a row).
  public init(
    batch: Int, keyValueHeads: Int, headDim: Int, valueDim: Int? = nil, capacity: Int,
    positionOffset: Int = 0, storage: KVStorage = .float32
  ) throws {
    guard batch >= 0, keyValueHeads > 0, headDim >= 0, (valueDim ?? 0) >= 0, capacity >= 0,
      positionOffset >= 0, positionOffset <= Int.max - capacity
    else {
      throw AttentionError.invalidArgument(
        "a KV cache needs B ≥ 0, Hkv ≥ 1, D ≥ 0 a capacity ≥ 0 and a position offset in 0…Int.max − capacity, got B \(batch), Hkv \(keyValueHeads), D \(headDim), capacity \(capacity), position offset \(positionOffset)"
      )
    }
    self.positionOffset = positionOffset
    (self.batch, self.keyValueHeads, self.headDim) = (batch, keyValueHeads, headDim)
    self.valueDim = valueDim ?? headDim
    let heads = batch * keyValueHeads
    keyRows = try KVRows(storage: storage, heads: heads, capacity: capacity, width: headDim)
    valueRows = try KVRows(
      storage: storage, heads: heads, capacity: capacity, width: self.valueDim)
    count = 0
  }

  /// Appends `t` new tokens' keys `[B, Hkv, t, D]` and values `[B, Hkv, t, Dv]`, converted to the
  /// cache's storage; throws, leaving the cache as it was, when they do not fit its shape or its
  /// capacity, or when a finite value would not be finite once stored (float16 beyond ±65504, a
  /// q8 block's scale beyond float16's range).
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
    try keyRows.checkRepresentable(newKeys, what: "key")
    try valueRows.checkRepresentable(newValues, what: "value")
    keyRows.write(newKeys, at: count, tokens: t)
    valueRows.write(newValues, at: count, tokens: t)
    count += t
  }

  /// `[B, Hkv, count, D]`: the filled rows' keys exactly as stored, as `Float`s (a copy).
  public func storedKeys() throws -> Tensor {
    try keyRows.floatRows(batchShape: [batch, keyValueHeads], count: count)
  }

  /// `[B, Hkv, count, Dv]`: the filled rows' values exactly as stored, as `Float`s (a copy).
  public func storedValues() throws -> Tensor {
    try valueRows.floatRows(batchShape: [batch, keyValueHeads], count: count)
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

  /// The key and value rows as the tiled kernel reads them.
  func withRows<R>(_ body: (KeyValueRows, KeyValueRows) throws -> R) rethrows -> R {
    try keyRows.withSource { k in try valueRows.withSource { v in try body(k, v) } }
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
  /// sharing a key/value head are stacked, and the cache's keys are split across threads. A
  /// float16, bfloat16 or q8 cache is widened by the tiled kernel as it reads it (see
  /// `Attention.scaledDotProduct(queries:cache:…)`).
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
        queries: projected.queries, cache: cache, mask: mask, scale: scale, terms: terms,
        kernel: kernel, needWeights: needWeights, threads: threads, memoryBudget: memoryBudget)
    } catch {
      // A step that fails leaves the cache as it found it.
      try? cache.truncate(to: previous)
      throw error
    }
    return MultiHeadResult(output: try finish(attention.output, input: x), attention: attention)
  }
}

extension Attention {
  /// Attention of `queries` `[B, H, Tq, D]` over the filled rows of `cache` (`Tk = cache.count`),
  /// as `scaledDotProduct(queries:keys:values:…, keyCount: cache.count)` on the stored keys and
  /// values. A float32 cache is read in place by every kernel. A float16, bfloat16 or q8 cache is
  /// read in place by the tiled kernel, which widens the values to `Float` as it reads them: in
  /// registers, sixteen at a time, for tiles of at most four rows (a decode step), else each
  /// `[Bk, D]` tile of keys and `[Bk, Dv]` tile of values into its per-thread scratch for sgemm;
  /// the reference and materialized kernels
  /// (asked for, or for the weights) read a float32 copy of the filled rows. Either way the
  /// result is attention over exactly the stored values.
  public static func scaledDotProduct(
    queries: Tensor, cache: KVCache, mask: AttentionMask = .none, scale: Float? = nil,
    terms: ScoreTerms = .none, kernel: Kernel = .automatic, needWeights: Bool = false,
    threads: Int? = nil, memoryBudget: Int? = nil
  ) throws -> AttentionResult {
    if cache.storage == .float32 {
      return try scaledDotProduct(
        queries: queries, keys: cache.keys, values: cache.values, mask: mask, scale: scale,
        terms: terms, kernel: kernel, needWeights: needWeights, threads: threads,
        memoryBudget: memoryBudget, keyCount: cache.count)
    }
    if let threads, threads < 1 {
      throw AttentionError.invalidArgument("threads must be ≥ 1, got \(threads)")
    }
    let prefix = [cache.batch, cache.keyValueHeads]
    let shape = try AttentionShape(
      queryShape: queries.shape, keyShape: prefix + [cache.capacity, cache.headDim],
      valueShape: prefix + [cache.capacity, cache.valueDim], keyCount: cache.count)
    let resolved = resolve(
      kernel, shape: shape, needWeights: needWeights, memoryBudget: memoryBudget)
    guard case .tiled(let configuration) = resolved else {
      return try scaledDotProduct(
        queries: queries, keys: cache.storedKeys(), values: cache.storedValues(), mask: mask,
        scale: scale, terms: terms, kernel: resolved, needWeights: needWeights,
        threads: threads, memoryBudget: memoryBudget)
    }
    let workers = max(1, threads ?? ProcessInfo.processInfo.activeProcessorCount)
    return try BLASThreads.withCount(1) {
      try TiledAttention.compute(
        queries: queries, shape: shape, rows: { body in cache.withRows(body) }, mask: mask,
        scale: scale, dropout: nil, relativePosition: terms.relativePosition, terms: terms,
        configuration: configuration, threads: workers)
    }
  }
}
