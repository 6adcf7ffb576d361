import Tensors

/// Which query–key pairs may attend, and what is added to their scores.
///
/// Conventions (those of the notebook and of PyTorch):
/// - `keep`: a 0/1 (or boolean) tensor broadcastable to `[…, Tq, Tk]`; **0 means masked** (the
///   notebook's `scores.masked_fill(mask == 0, -inf)`), any other value means "may attend".
/// - `bias`: a float tensor broadcastable to `[…, Tq, Tk]`, added to the scaled scores (an
///   "additive mask": `−∞` masks, finite values shift).
/// - `isCausal`: query `i` sees key `j` only when `j ≤ limit(i)`, with `limit(i) = i` aligned at
///   the top-left corner as PyTorch's `is_causal` is (`causalAlignment = .topLeft`), or
///   `limit(i) = i + Tk − Tq` aligned at the bottom-right corner as PyTorch's
///   `causal_lower_right` (`.bottomRight`: the last query sees every key, as a decoder's new
///   tokens against a KV cache).
/// - `window`: a sliding window of `W` keys (Mistral's convention): query `i` sees at most the
///   `W` most recent keys the causal alignment allows, `limit(i) − W < j ≤ limit(i)`. A window
///   makes the mask causal.
///
/// They compose: a score is masked when any of them masks it. Broadcasting follows numpy:
/// shapes are aligned at the right, and a dimension of 1 repeats.
public struct AttentionMask: Sendable {
  public var keep: Tensor?
  public var bias: Tensor?
  public var isCausal: Bool
  public var causalAlignment: CausalAlignment
  /// `W ≥ 1`, or `nil` for no window.
  public var window: Int?

  public init(
    keep: Tensor? = nil, bias: Tensor? = nil, isCausal: Bool = false,
    causalAlignment: CausalAlignment = .topLeft, window: Int? = nil
  ) {
    self.keep = keep
    self.bias = bias
    self.isCausal = isCausal
    self.causalAlignment = causalAlignment
    self.window = window
  }

  /// Every query sees every key.
  public static let none = AttentionMask()
  /// Query `i` sees keys `0…i`.
  public static let causal = AttentionMask(isCausal: true)
  /// A 0/1 mask, 0 = masked.
  public static func keep(_ mask: Tensor) -> AttentionMask { AttentionMask(keep: mask) }
  /// An additive float mask.
  public static func bias(_ bias: Tensor) -> AttentionMask { AttentionMask(bias: bias) }
}

/// Where the causal diagonal starts when `Tq ≠ Tk` (see `AttentionMask.isCausal`).
public enum CausalAlignment: String, Sendable, Equatable, CaseIterable {
  /// Query `i` sees keys `j ≤ i` (PyTorch's `is_causal`).
  case topLeft = "top-left"
  /// Query `i` sees keys `j ≤ i + Tk − Tq` (PyTorch's `causal_lower_right`).
  case bottomRight = "bottom-right"
}

/// A mask tensor laid over `[batch…, Tq, Tk]` by broadcasting: for each flat batch index, the
/// offset of its `[Tq, Tk]` slab, and the strides of rows and columns (0 where broadcast).
package struct BroadcastMatrix: Sendable {
  let scalars: [Float]
  let batchOffsets: [Int]
  let rowStride: Int
  let columnStride: Int

  /// Lays `tensor` over a target of `batchShape + [rows, columns]`; `name` is for messages.
  init(_ tensor: Tensor, batchShape: [Int], rows: Int, columns: Int, name: String) throws {
    let target = batchShape + [rows, columns]
    guard tensor.rank <= target.count else {
      throw AttentionError.shapeMismatch(
        "\(name) of shape \(shapeForMessage(tensor.shape)) has more dimensions than the scores \(shapeForMessage(target))"
      )
    }
    // Strides of the tensor itself, then aligned to the target at the right.
    var ownStrides = [Int](repeating: 0, count: tensor.rank)
    var running = 1
    for axis in stride(from: tensor.rank - 1, through: 0, by: -1) {
      ownStrides[axis] = running
      running *= tensor.shape[axis]
    }
    let lead = target.count - tensor.rank
    var strides = [Int](repeating: 0, count: target.count)
    for axis in 0..<tensor.rank {
      let extent = tensor.shape[axis]
      let targetExtent = target[lead + axis]
      guard extent == targetExtent || extent == 1 else {
        throw AttentionError.shapeMismatch(
          "\(name) of shape \(shapeForMessage(tensor.shape)) does not broadcast to the scores \(shapeForMessage(target))"
        )
      }
      strides[lead + axis] = extent == 1 ? 0 : ownStrides[axis]
    }
    let batchRank = batchShape.count
    let batchCount = batchShape.reduce(1, *)
    var offsets = [Int](repeating: 0, count: batchCount)
    for flat in 0..<batchCount {
      var rest = flat
      var offset = 0
      for axis in stride(from: batchRank - 1, through: 0, by: -1) {
        offset += (rest % batchShape[axis]) * strides[axis]
        rest /= batchShape[axis]
      }
      offsets[flat] = offset
    }
    self.scalars = tensor.scalars
    self.batchOffsets = offsets
    self.rowStride = strides[batchRank]
    self.columnStride = strides[batchRank + 1]
  }

  @inline(__always)
  package func value(batch: Int, row: Int, column: Int) -> Float {
    scalars[batchOffsets[batch] + row * rowStride + column * columnStride]
  }
}

/// A mask resolved against a problem's shape, ready for the kernels' row passes.
package struct ResolvedMask: Sendable {
  package let keep: BroadcastMatrix?
  package let bias: BroadcastMatrix?
  /// Causal, or windowed (a window is causal).
  let isCausal: Bool
  /// `limit(i) = i + diagonalOffset`: 0 top-left, `Tk − Tq` bottom-right.
  let diagonalOffset: Int
  let window: Int?
  let keys: Int

  package init(_ mask: AttentionMask, batchShape: [Int], queries: Int, keys: Int) throws {
    keep = try mask.keep.map {
      try BroadcastMatrix($0, batchShape: batchShape, rows: queries, columns: keys, name: "mask")
    }
    bias = try mask.bias.map {
      try BroadcastMatrix($0, batchShape: batchShape, rows: queries, columns: keys, name: "bias")
    }
    if let window = mask.window, window < 1 {
      throw AttentionError.invalidArgument("the window must be at least 1 key, got \(window)")
    }
    isCausal = mask.isCausal || mask.window != nil
    diagonalOffset = mask.causalAlignment == .bottomRight ? keys - queries : 0
    window = mask.window
    self.keys = keys
  }

  /// The keys query `i` may see by the causal alignment and the window (before `keep` and
  /// `bias`): `max(0, limit − W + 1) ..< min(Tk, limit + 1)`, empty when none.
  @inline(__always)
  package func visibleKeys(query i: Int) -> Range<Int> {
    guard isCausal else { return 0..<keys }
    let limit = i + diagonalOffset
    let upper = min(keys, max(0, limit + 1))
    let lower = window.map { min(upper, max(0, limit - $0 + 1)) } ?? 0
    return lower..<upper
  }

  /// Applies the mask to scaled scores `row[0..<count]` of keys `firstKey…`: adds the bias and
  /// writes `−∞` where masked.
  @inline(__always)
  func apply(
    to row: UnsafeMutablePointer<Float>, batch: Int, query: Int, firstKey: Int, count: Int
  ) {
    if let bias {
      let base = bias.batchOffsets[batch] + query * bias.rowStride
      bias.scalars.withUnsafeBufferPointer { b in
        for j in 0..<count { row[j] += b[base + (firstKey + j) * bias.columnStride] }
      }
    }
    if let keep {
      let base = keep.batchOffsets[batch] + query * keep.rowStride
      keep.scalars.withUnsafeBufferPointer { k in
        for j in 0..<count where k[base + (firstKey + j) * keep.columnStride] == 0 {
          row[j] = -.infinity
        }
      }
    }
    if isCausal {
      // Keys outside the causal window are hidden; this tile holds keys firstKey ..< +count.
      let visible = visibleKeys(query: query)
      let lower = max(0, min(count, visible.lowerBound - firstKey))
      let upper = max(lower, min(count, visible.upperBound - firstKey))
      for j in 0..<lower { row[j] = -.infinity }
      for j in upper..<count { row[j] = -.infinity }
    }
  }
}
