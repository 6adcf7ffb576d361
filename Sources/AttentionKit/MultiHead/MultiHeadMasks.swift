import Tensors

/// How a multi-head layer's two masks become one `AttentionMask` for the kernels.
enum MultiHeadMasks {
  /// `mask` with the key-padding mask folded in: `keyPaddingMask` `[B, Tk]` (nonzero = padding)
  /// becomes a keep mask `[B, 1, 1, Tk]` (0 where padded) when `mask` has none, an additive
  /// `−∞` bias when it has a keep mask but no bias, and is added to the bias otherwise (broadcast).
  static func combine(
    _ mask: AttentionMask, keyPaddingMask: Tensor?, batch: Int, keys: Int
  ) throws -> AttentionMask {
    guard let padding = keyPaddingMask else { return mask }
    guard padding.shape == [batch, keys] else {
      throw AttentionError.shapeMismatch(
        "the key padding mask must be [B, Tk] = [\(batch), \(keys)], got \(shapeForMessage(padding.shape))"
      )
    }
    var combined = mask
    if mask.keep == nil {
      combined.keep = Tensor(
        validShape: [batch, 1, 1, keys], scalars: padding.scalars.map { $0 != 0 ? 0 : 1 })
      return combined
    }
    let hidden = Tensor(
      validShape: [batch, 1, 1, keys],
      scalars: padding.scalars.map { $0 != 0 ? -Float.infinity : 0 })
    combined.bias = try mask.bias.map { try broadcastSum($0, hidden) } ?? hidden
    return combined
  }

  /// `a + b` with numpy broadcasting (shapes aligned at the right, extent 1 repeats).
  static func broadcastSum(_ a: Tensor, _ b: Tensor) throws -> Tensor {
    let rank = max(a.rank, b.rank)
    let left = [Int](repeating: 1, count: rank - a.rank) + a.shape
    let right = [Int](repeating: 1, count: rank - b.rank) + b.shape
    var shape = [Int](repeating: 1, count: rank)
    for axis in 0..<rank {
      guard left[axis] == right[axis] || left[axis] == 1 || right[axis] == 1 else {
        throw AttentionError.shapeMismatch(
          "masks of shapes \(shapeForMessage(a.shape)) and \(shapeForMessage(b.shape)) do not broadcast together"
        )
      }
      shape[axis] = max(left[axis], right[axis])
    }
    func strides(_ extents: [Int]) -> [Int] {
      var result = [Int](repeating: 0, count: rank)
      var running = 1
      for axis in stride(from: rank - 1, through: 0, by: -1) {
        result[axis] = extents[axis] == 1 ? 0 : running
        running *= extents[axis]
      }
      return result
    }
    let (leftStrides, rightStrides) = (strides(left), strides(right))
    var sum = try Tensor(shape: shape)
    for flat in 0..<sum.count {
      var (rest, i, j) = (flat, 0, 0)
      for axis in stride(from: rank - 1, through: 0, by: -1) {
        let index = rest % shape[axis]
        rest /= shape[axis]
        i += index * leftStrides[axis]
        j += index * rightStrides[axis]
      }
      sum.scalars[flat] = a.scalars[i] + b.scalars[j]
    }
    return sum
  }
}
