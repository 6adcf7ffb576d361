import Tensors

/// The validated shapes of one attention call.
///
/// Legend used everywhere: `B` batch, `H` heads, `Tq` queries, `Tk` keys, `D` head dimension,
/// `Dv` value dimension. Queries `[…, Tq, D]`, keys `[…, Tk, D]`, values `[…, Tk, Dv]`; the leading
/// dimensions `…` (for example `[B, H]`) are any number of equal batch dimensions — except the
/// last one, the heads, where keys and values may have fewer, `Hkv`, with `H % Hkv == 0`
/// (grouped-query attention; `Hkv = 1` is multi-query): query head `h` then uses key/value head
/// `h / (H / Hkv)`, PyTorch's `enable_gqa` mapping, and K and V are read in place, never copied.
public struct AttentionShape: Sendable, Equatable {
  /// The queries' leading dimensions, `[B, H]`.
  public let batchShape: [Int]
  /// The product of `batchShape` (`B·H` for `[B, H, T, D]` inputs).
  public let batchCount: Int
  /// `H / Hkv`: query heads per key/value head (1 without grouping).
  public let groupSize: Int
  /// The keys' and values' leading dimensions, `[B, Hkv]`.
  public let keyValueBatchShape: [Int]
  public let queries: Int
  /// `Tk`, the keys that take part: every stored key, or the first `keyCount` of them.
  public let keys: Int
  /// The key (and value) rows stored per head, `≥ Tk`: a KV cache holds its capacity and fills
  /// the first `Tk`, and the kernels read head `h`'s keys from row `h·keyRows`.
  public let keyRows: Int
  public let headDim: Int
  public let valueDim: Int

  /// Validates the shapes of `q`, `k`, `v`; with `keyCount`, only the first `keyCount` rows of
  /// each head of `k` and `v` are keys (the rest, a cache's unused capacity, is never read).
  public init(queries q: Tensor, keys k: Tensor, values v: Tensor, keyCount: Int? = nil) throws {
    try self.init(queryShape: q.shape, keyShape: k.shape, valueShape: v.shape, keyCount: keyCount)
  }

  /// As `init(queries:keys:values:keyCount:)`, from the shapes alone (a `KVCache` in a compact
  /// storage has no `Tensor` of keys).
  init(queryShape qs: [Int], keyShape ks: [Int], valueShape vs: [Int], keyCount: Int?) throws {
    let (q, k, v) = (ShapeOnly(qs), ShapeOnly(ks), ShapeOnly(vs))
    guard q.rank >= 2, k.rank >= 2, v.rank >= 2 else {
      throw AttentionError.shapeMismatch(
        "queries \(shapeForMessage(q.shape)), keys \(shapeForMessage(k.shape)) and values \(shapeForMessage(v.shape)) need at least 2 dimensions"
      )
    }
    let heads = q.batchShape.last ?? 1
    let kvHeads = k.batchShape.last ?? 1
    guard k.batchShape == v.batchShape, q.batchShape.count == k.batchShape.count,
      q.batchShape.dropLast() == k.batchShape.dropLast(), kvHeads > 0 || heads == 0,
      heads == kvHeads || (kvHeads > 0 && heads % kvHeads == 0)
    else {
      let grouped =
        q.batchShape.count == k.batchShape.count
          && q.batchShape.dropLast() == k.batchShape.dropLast()
        ? " (grouped-query attention needs the query heads \(heads) to be a multiple of the "
          + "key/value heads \(kvHeads))" : ""
      throw AttentionError.shapeMismatch(
        "leading dimensions differ: queries \(shapeForMessage(q.shape)), keys \(shapeForMessage(k.shape)), values \(shapeForMessage(v.shape))"
          + grouped)
    }
    groupSize = heads == 0 || kvHeads == 0 ? 1 : heads / kvHeads
    keyValueBatchShape = k.batchShape
    guard q.shape[q.rank - 1] == k.shape[k.rank - 1] else {
      throw AttentionError.shapeMismatch(
        "queries \(shapeForMessage(q.shape)) and keys \(shapeForMessage(k.shape)) have different head dimensions D"
      )
    }
    guard k.shape[k.rank - 2] == v.shape[v.rank - 2] else {
      throw AttentionError.shapeMismatch(
        "keys \(shapeForMessage(k.shape)) and values \(shapeForMessage(v.shape)) have different numbers of keys Tk"
      )
    }
    batchShape = q.batchShape
    batchCount = q.batchCount
    queries = q.shape[q.rank - 2]
    keyRows = k.shape[k.rank - 2]
    if let keyCount, keyCount < 0 || keyCount > keyRows {
      throw AttentionError.invalidArgument(
        "keyCount \(keyCount) is outside the \(keyRows) key rows of keys \(shapeForMessage(k.shape))"
      )
    }
    keys = keyCount ?? keyRows
    headDim = q.shape[q.rank - 1]
    valueDim = v.shape[v.rank - 1]
    try BLAS.checkDimensions(queries, keys, headDim, valueDim, context: "attention")
  }

  /// Whether keys and values have fewer heads than the queries.
  public var isGrouped: Bool { groupSize != 1 }

  /// The flat key/value batch index that flat query batch `b` reads: `(b / H)·Hkv + (b % H) / G`
  /// with `G = H / Hkv`; `b` itself without grouping.
  @inline(__always)
  public func keyValueBatch(_ b: Int) -> Int {
    guard groupSize != 1 else { return b }
    let heads = batchShape.last ?? 1
    let kvHeads = heads / groupSize
    return (b / heads) * kvHeads + (b % heads) / groupSize
  }

  /// The first row of flat query batch `b`'s keys and values: `keyValueBatch(b)·keyRows`.
  @inline(__always)
  public func keyRowOffset(_ b: Int) -> Int { keyValueBatch(b) * keyRows }

  /// The output's shape, `[…, Tq, Dv]`.
  public var outputShape: [Int] { batchShape + [queries, valueDim] }
  /// The attention weights' shape, `[…, Tq, Tk]`.
  public var weightsShape: [Int] { batchShape + [queries, keys] }

  /// `1/√D`, the scale of "Attention Is All You Need", unless overridden.
  public func resolvedScale(_ scale: Float?) -> Float {
    scale ?? 1 / Float(headDim).squareRoot()
  }
}

/// A shape read as `AttentionShape`'s initializer reads a tensor's.
private struct ShapeOnly {
  let shape: [Int]
  init(_ shape: [Int]) { self.shape = shape }
  var rank: Int { shape.count }
  var batchShape: [Int] { Array(shape.dropLast(2)) }
  var batchCount: Int { batchShape.reduce(1, *) }
}
