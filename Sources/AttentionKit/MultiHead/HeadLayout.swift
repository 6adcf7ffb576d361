import Tensors

/// Moving between the token-major layout of projections (`[B, T, H·D]`: one row per token, the
/// heads side by side) and the head-major layout the kernels take (`[B, H, T, D]`: one
/// contiguous `[T, D]` matrix per head). Each is one copy.
enum HeadLayout {
  /// Splits `x` `[B, T, (H₀ + H₁ + …)·D]` into `[B, H₀, T, D]`, `[B, H₁, T, D]`, …: the columns of
  /// part `p`, head `h` are `(H₀ + … + H_{p−1} + h)·D ..< +D`.
  static func split(_ x: Tensor, headCounts: [Int], headDim d: Int) throws -> [Tensor] {
    let (b, t, width) = (x.shape[0], x.shape[1], x.shape[2])
    precondition(width == headCounts.reduce(0, +) * d, "split widths do not add up")
    var parts: [Tensor] = []
    var firstHead = 0
    for count in headCounts {
      var part = try Tensor(shape: [b, count, t, d])
      x.scalars.withUnsafeBufferPointer { source in
        part.scalars.withUnsafeMutableBufferPointer { target in
          for batch in 0..<b {
            for head in 0..<count {
              for token in 0..<t {
                let from =
                  source.baseAddress! + (batch * t + token) * width + (firstHead + head) * d
                let to = target.baseAddress! + ((batch * count + head) * t + token) * d
                to.update(from: from, count: d)
              }
            }
          }
        }
      }
      parts.append(part)
      firstHead += count
    }
    return parts
  }

  /// `[B, H, T, D]` → `[B, T, H·D]`.
  static func merge(_ x: Tensor) throws -> Tensor {
    let (b, h, t, d) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    var merged = try Tensor(shape: [b, t, h * d])
    x.scalars.withUnsafeBufferPointer { source in
      merged.scalars.withUnsafeMutableBufferPointer { target in
        for batch in 0..<b {
          for head in 0..<h {
            for token in 0..<t {
              let from = source.baseAddress! + ((batch * h + head) * t + token) * d
              let to = target.baseAddress! + (batch * t + token) * h * d + head * d
              to.update(from: from, count: d)
            }
          }
        }
      }
    }
    return merged
  }
}
