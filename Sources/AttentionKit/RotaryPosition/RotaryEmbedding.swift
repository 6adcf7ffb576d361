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
/// Long-context checkpoints rescale the frequencies (`Scaling`: linear interpolation, Llama 3.1's
/// `llama3`, YaRN as gpt-oss uses it), and YaRN also multiplies `cos` and `sin` by an attention factor.
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

  /// How the frequencies `theta^(−2i/D)` are rescaled for long contexts (Hugging Face's
  /// `rope_scaling` / `rope_parameters`, `modeling_rope_utils`).
  public enum Scaling: Sendable, Equatable {
    case none
    /// Position interpolation (`rope_type: linear`, Gemma 3's global layers): `ω_i/factor`.
    case linear(factor: Double)
    /// Llama 3.1's (`rope_type: llama3`): with wavelength `λ_i = 2π/ω_i`, `L` the original
    /// context, `ω_i/factor` where `λ_i > L/low`, `ω_i` where `λ_i < L/high`, and between them
    /// `(1 − a)·ω_i/factor + a·ω_i` with `a = (L/λ_i − low)/(high − low)`.
    case llama3(
      factor: Double, lowFrequencyFactor: Double, highFrequencyFactor: Double,
      originalContext: Double)
    /// YaRN (`rope_type: yarn`): `ω_i·e_i + (ω_i/factor)·(1 − e_i)` with the extrapolation
    /// weight `e_i = 1 − clamp((i − low)/(high − low), 0, 1)`, `low`, `high` the dimensions
    /// where `β_fast` and `β_slow` rotations fit the original context (floored and ceiled when
    /// `truncate`), and `cos`, `sin` multiplied by `attentionFactor`.
    case yarn(
      factor: Double, originalContext: Double, betaFast: Double, betaSlow: Double,
      truncate: Bool, attentionFactor: Double)
  }

  /// `theta`, the base of the frequencies (> 0).
  public let theta: Double
  /// The rotated width (even): a query's or key's head dimension `D`, or its first features
  /// only (Phi-3's, NeoX's `partial_rotary_factor`), the rest passing through.
  public let dimension: Int
  public let layout: Layout
  public let scaling: Scaling
  /// `ω_i` for `i < D/2`, scaled.
  public let frequencies: [Double]

  /// The factor on `cos` and `sin`: YaRN's attention factor, else 1.
  public var attentionFactor: Double {
    if case .yarn(_, _, _, _, _, let factor) = scaling { return factor }
    return 1
  }

  public init(theta: Double, dimension: Int, layout: Layout = .half, scaling: Scaling = .none)
    throws
  {
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
    self.scaling = scaling
    frequencies = try Self.frequencies(theta: theta, dimension: dimension, scaling: scaling)
  }

  /// `ω_i`, scaled (see `Scaling`).
  public func frequency(_ i: Int) -> Double { frequencies[i] }

  private static func frequencies(theta: Double, dimension d: Int, scaling: Scaling) throws
    -> [Double]
  {
    let base = (0..<(d / 2)).map { pow(theta, -2 * Double($0) / Double(d)) }
    switch scaling {
    case .none:
      return base
    case .linear(let factor):
      guard factor > 0 else {
        throw AttentionError.invalidArgument("linear rope scaling needs a factor > 0")
      }
      return base.map { $0 / factor }
    case .llama3(let factor, let low, let high, let context):
      guard factor > 0, high > low, low > 0, context > 0 else {
        throw AttentionError.invalidArgument(
          "llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0")
      }
      let (lowWavelength, highWavelength) = (context / low, context / high)
      return base.map { omega in
        let wavelength = 2 * Double.pi / omega
        if wavelength < highWavelength { return omega }
        if wavelength > lowWavelength { return omega / factor }
        let a = (context / wavelength - low) / (high - low)
        return (1 - a) * omega / factor + a * omega
      }
    case .yarn(let factor, let context, let betaFast, let betaSlow, let truncate, _):
      guard factor > 0, context > 0, betaFast > 0, betaSlow > 0 else {
        throw AttentionError.invalidArgument(
          "yarn rope scaling needs a positive factor, original context and betas")
      }
      func correction(_ rotations: Double) -> Double {
        Double(d) * log(context / (rotations * 2 * Double.pi)) / (2 * log(theta))
      }
      var (low, high) = (correction(betaFast), correction(betaSlow))
      if truncate { (low, high) = (low.rounded(.down), high.rounded(.up)) }
      (low, high) = (max(low, 0), min(high, Double(d - 1)))
      if low == high { high += 0.001 }
      return base.enumerated().map { i, omega in
        let ramp = min(max((Double(i) - low) / (high - low), 0), 1)
        let extrapolation = 1 - ramp
        return omega / factor * (1 - extrapolation) + omega * extrapolation
      }
    }
  }

  /// The indices of pair `i`'s two features.
  @inline(__always)
  public func pair(_ i: Int) -> (Int, Int) {
    layout == .half ? (i, i + dimension / 2) : (2 * i, 2 * i + 1)
  }

  /// Rotates every vector of `x` (`[…, T, D]`, `D ≥ dimension`: the first `dimension` features
  /// of each): the vector at row `t` sits at position `positionOffset + t` (a KV cache's length
  /// when new tokens are appended to it).
  public func apply(to x: inout Tensor, positionOffset: Int = 0) throws {
    guard x.rank >= 2, x.shape[x.rank - 1] >= dimension else {
      throw AttentionError.shapeMismatch(
        "rotary embeddings of dimension \(dimension) take [..., T, D ≥ \(dimension)], got \(shapeForMessage(x.shape))"
      )
    }
    let width = x.shape[x.rank - 1]
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
        let angle = position * frequencies[i]
        cosines[t * half + i] = Float(cos(angle) * attentionFactor)
        sines[t * half + i] = Float(sin(angle) * attentionFactor)
      }
    }
    let matrices = x.count / (rows * width)
    x.scalars.withUnsafeMutableBufferPointer { buffer in
      for m in 0..<matrices {
        for t in 0..<rows {
          let v = buffer.baseAddress! + (m * rows + t) * width
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

  /// The same rotation in `Double`, of one vector `v` (`D ≥ dimension` values) at `position`:
  /// the reference.
  public func rotateReference(_ v: inout [Double], position: Int) {
    for i in 0..<dimension / 2 {
      let angle = Double(position) * frequencies[i]
      let (c, s) = (cos(angle) * attentionFactor, sin(angle) * attentionFactor)
      let (a, b) = pair(i)
      let (x0, x1) = (v[a], v[b])
      v[a] = x0 * c - x1 * s
      v[b] = x0 * s + x1 * c
    }
  }
}
