import Tensors

/// Layer normalization over the last dimension, in `nn.LayerNorm`'s layout:
/// `y = (x − μ)/√(σ² + eps)·γ + β`, with `μ` and the biased variance `σ²` of each row of `E`
/// features, `γ` (`weight`) and `β` (`bias`) `[E]`.
///
/// The mean and variance of each row are accumulated in `Double` (two passes), so a row with a
/// large mean loses nothing to cancellation.
public struct LayerNorm: Sendable, Equatable {
  /// `γ`, `[E]`.
  public let weight: Tensor
  /// `β`, `[E]`.
  public let bias: Tensor
  /// Added to the variance: 1e-5 in `nn.LayerNorm`, 1e-12 in BERT.
  public let epsilon: Float

  public init(weight: Tensor, bias: Tensor, epsilon: Float) throws {
    guard weight.rank == 1, bias.shape == weight.shape else {
      throw AttentionError.shapeMismatch(
        "a layer norm's weight and bias must both be [E], got \(shapeForMessage(weight.shape)) and \(shapeForMessage(bias.shape))"
      )
    }
    guard epsilon.isFinite, epsilon >= 0 else {
      throw AttentionError.invalidArgument("layer norm eps must be ≥ 0, got \(epsilon)")
    }
    self.weight = weight
    self.bias = bias
    self.epsilon = epsilon
  }

  /// `E`.
  public var features: Int { weight.count }

  /// Normalizes each row of `x` (`[…, E]`) in place.
  public func apply(to x: inout Tensor) throws {
    let width = features
    guard x.rank >= 1, x.shape[x.rank - 1] == width else {
      throw AttentionError.shapeMismatch(
        "a layer norm over \(width) features takes [..., \(width)], got \(shapeForMessage(x.shape))"
      )
    }
    guard width > 0 else { return }
    let rows = x.count / width
    x.scalars.withUnsafeMutableBufferPointer { buffer in
      for r in 0..<rows {
        let row = buffer.baseAddress! + r * width
        let (mean, inverse) = statistics(width) { Double(row[$0]) }
        let (m, s) = (Float(mean), Float(inverse))
        for c in 0..<width { row[c] = (row[c] - m) * s * weight.scalars[c] + bias.scalars[c] }
      }
    }
  }

  /// The mean and `1/√(σ² + eps)` of the `count` values `value(0…)`, in `Double`.
  @inline(__always)
  package func statistics(_ count: Int, _ value: (Int) -> Double) -> (mean: Double, inverse: Double)
  {
    Self.statistics(count, epsilon: Double(epsilon), value)
  }

  @inline(__always)
  static func statistics(_ count: Int, epsilon: Double, _ value: (Int) -> Double)
    -> (mean: Double, inverse: Double)
  {
    var sum = 0.0
    for c in 0..<count { sum += value(c) }
    let mean = sum / Double(count)
    var squares = 0.0
    for c in 0..<count {
      let centred = value(c) - mean
      squares += centred * centred
    }
    return (mean, 1 / (squares / Double(count) + epsilon).squareRoot())
  }

  /// The reference in `Double` of one row `v` (`E` values), in place.
  public func normalizeReference(_ v: inout [Double]) {
    let (mean, inverse) = statistics(v.count) { v[$0] }
    for c in v.indices {
      v[c] = (v[c] - mean) * inverse * Double(weight.scalars[c]) + Double(bias.scalars[c])
    }
  }
}
