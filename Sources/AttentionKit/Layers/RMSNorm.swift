import Tensors

/// Root-mean-square normalization over the last dimension, as Llama-family models apply it to
/// each head's query and key (Qwen3's and Gemma 3's `q_norm`, `k_norm`):
/// `y = x/√(mean(x²) + eps)·(offset + w)`, `w` (`weight`) `[D]`; `offset` is 0 for Qwen3
/// (`weight·x̂`) and 1 for Gemma (`x̂·(1 + weight)`, its weights stored around 0).
///
/// The mean of squares is accumulated in `Double`; the row is scaled in float32.
public struct RMSNorm: Sendable, Equatable {
  /// `w`, `[D]`.
  public let weight: Tensor
  public let epsilon: Float
  /// Added to every weight: 0 (Qwen3, Llama) or 1 (Gemma).
  public let offset: Float

  public init(weight: Tensor, epsilon: Float, offset: Float = 0) throws {
    guard weight.rank == 1 else {
      throw AttentionError.shapeMismatch(
        "an RMS norm's weight must be [D], got \(shapeForMessage(weight.shape))")
    }
    guard epsilon.isFinite, epsilon >= 0 else {
      throw AttentionError.invalidArgument("RMS norm eps must be ≥ 0, got \(epsilon)")
    }
    self.weight = weight
    self.epsilon = epsilon
    self.offset = offset
  }

  /// `D`.
  public var features: Int { weight.count }

  /// Normalizes each row of `x` (`[…, D]`) in place.
  public func apply(to x: inout Tensor) throws {
    let width = features
    guard x.rank >= 1, x.shape[x.rank - 1] == width else {
      throw AttentionError.shapeMismatch(
        "an RMS norm over \(width) features takes [..., \(width)], got \(shapeForMessage(x.shape))"
      )
    }
    guard width > 0 else { return }
    let scaled = weight.scalars.map { $0 + offset }
    x.scalars.withUnsafeMutableBufferPointer { buffer in
      for r in 0..<(buffer.count / width) {
        let row = buffer.baseAddress! + r * width
        let inverse = Float(inverseRMS(width) { Double(row[$0]) })
        for c in 0..<width { row[c] = row[c] * inverse * scaled[c] }
      }
    }
  }

  /// `1/√(mean(v²) + eps)` of the `count` values `value(0…)`, in `Double`.
  @inline(__always)
  package func inverseRMS(_ count: Int, _ value: (Int) -> Double) -> Double {
    var squares = 0.0
    for c in 0..<count { squares += value(c) * value(c) }
    return 1 / (squares / Double(count) + Double(epsilon)).squareRoot()
  }

  /// The weight of feature `c` as applied, `offset + w_c`, in `Double`.
  package func scale(_ c: Int) -> Double { Double(offset) + Double(weight.scalars[c]) }
}
