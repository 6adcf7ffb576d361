import Foundation
import Tensors

/// Rotary position embedding (RoPE, Su et al. 2021): rotates pairs of a query's or key's features
/// by an angle proportional to its position, so that `q_m·k_n` depends on `m − n` alone.
///
/// Pair `i` (`0 ≤ i < D/2`) of the vector at position `p` turns by `θ_i = p·ω_i`, with the
/// frequency `ω_i = theta^(−2i/D)` (`theta` = Hugging Face's `rope_theta`, 10,000 in Llama 1 and
/// 2): `(x₀, x₁) → (x₀·cos θ_i − x₁·sin θ_i, x₀·sin θ_i + x₁·cos θ_i)`. Which two features form
/// pair `i` is the `Layout`.
///
/// Angles and their sines are computed in `Double` and rounded once: Hugging Face computes
/// `p·ω_i` in float32, off by up to `p·2⁻²⁴` radians, so at position 1,000 the two differ by about
/// 6·10⁻⁵ in a rotated feature — the float64 reference agrees with this type, not with float32
/// angles.
public struct RotaryEmbedding: Sendable, Equatable {
  /// Which features are rotated together.
  public enum Layout: String, Sendable, Equatable, CaseIterable {
    /// Pair `i` is `(x_i, x_{i + D/2})`: GPT-NeoX and Hugging Face's Llama (`rotate_half`).
    case half
    /// Pair `i` is `(x_{2i}, x_{2i+1})`: GPT-J, Meta's original Llama code.
    case interleaved
  }

  /// `theta`, the base of the frequencies (> 0).
  public let theta: Double
  /// `D`, the rotated width: a query's or key's head dimension (even).
  public let dimension: Int
  public let layout: Layout

  public init(theta: Double, dimension: Int, layout: Layout = .half) throws {
    guard theta.isFinite, theta > 0 else {
      throw AttentionError.invalidArgument("rope theta must be a positive number, got \(theta)")
    }
    guard dimension > 0, dimension % 2 == 0 else {
      throw AttentionError.invalidArgument(
        "rotary embeddings need an even, positive head dimension, got \(dimension)")
    }
    self.theta = theta
    self.dimension = dimension
    self.layout = layout
  }

  /// `ω_i = theta^(−2i/D)`.
  public func frequency(_ i: Int) -> Double { pow(theta, -2 * Double(i) / Double(dimension)) }

  /// The indices of pair `i`'s two features.
  @inline(__always)
  public func pair(_ i: Int) -> (Int, Int) {
    layout == .half ? (i, i + dimension / 2) : (2 * i, 2 * i + 1)
  }

  /// Rotates every vector of `x` (`[…, T, D]`): the vector at row `t` sits at position
  /// `positionOffset + t` (a KV cache's length when new tokens are appended to it).
  public func apply(to x: inout Tensor, positionOffset: Int = 0) throws {
    guard x.rank >= 2, x.shape[x.rank - 1] == dimension else {
      throw AttentionError.shapeMismatch(
        "rotary embeddings of dimension \(dimension) take [..., T, \(dimension)], got \(shapeForMessage(x.shape))"
      )
    }
    let rows = x.shape[x.rank - 2]
    guard positionOffset >= 0, positionOffset <= Int.max - rows else {
      throw AttentionError.invalidArgument(
        "the position offset must be in 0…\(Int.max - rows) for \(rows) rows, got \(positionOffset)"
      )
    }
    let half = dimension / 2
    guard rows > 0, x.count > 0 else { return }
    // One table of cos and sin per call, shared by every head and batch element.
    var cosines = [Float](repeating: 0, count: rows * half)
    var sines = [Float](repeating: 0, count: rows * half)
    for t in 0..<rows {
      let position = Double(positionOffset + t)
      for i in 0..<half {
        let angle = position * frequency(i)
        cosines[t * half + i] = Float(cos(angle))
        sines[t * half + i] = Float(sin(angle))
      }
    }
    let matrices = x.count / (rows * dimension)
    x.scalars.withUnsafeMutableBufferPointer { buffer in
      for m in 0..<matrices {
        for t in 0..<rows {
          let v = buffer.baseAddress! + (m * rows + t) * dimension
          for i in 0..<half {
            let (a, b) = pair(i)
            let (x0, x1) = (v[a], v[b])
            let (c, s) = (cosines[t * half + i], sines[t * half + i])
            v[a] = x0 * c - x1 * s
            v[b] = x0 * s + x1 * c
          }
        }
      }
    }
  }

  /// `apply(to:positionOffset:)` on a copy.
  public func applied(to x: Tensor, positionOffset: Int = 0) throws -> Tensor {
    var rotated = x
    try apply(to: &rotated, positionOffset: positionOffset)
    return rotated
  }

  /// The same rotation in `Double`, of one vector `v` (`D` values) at `position`: the reference.
  public func rotateReference(_ v: inout [Double], position: Int) {
    for i in 0..<dimension / 2 {
      let angle = Double(position) * frequency(i)
      let (a, b) = pair(i)
      let (x0, x1) = (v[a], v[b])
      v[a] = x0 * cos(angle) - x1 * sin(angle)
      v[b] = x0 * sin(angle) + x1 * cos(angle)
    }
  }
}
