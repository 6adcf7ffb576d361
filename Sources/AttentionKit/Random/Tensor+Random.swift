import Foundation
import Tensors

/// Random tensors from a seed, drawn from `Philox4x32` (the CLI's generated inputs and the
/// layers' own initialization; `TorchGenerator` draws PyTorch's numbers instead).
extension Tensor {
  /// Uniform numbers in `[low, high)`: element `e` is word `e % 4` of block `major = e / 4`,
  /// `u = (w >> 8) · 2⁻²⁴` (24 random bits, every float in `[0, 1)` on that grid equally likely),
  /// then `low + (high − low)·u`.
  public static func randomUniform(
    shape: [Int], low: Float = 0, high: Float = 1, seed: UInt64, stream: UInt32
  ) throws -> Tensor {
    let count = try elementCount(of: shape)
    let rng = Philox4x32(seed: seed)
    var values = [Float](repeating: 0, count: count)
    let width = high - low
    for blockIndex in 0..<((count + 3) / 4) {
      let w = rng.block(major: UInt64(blockIndex), minor: 0, stream: stream)
      let words = SIMD4<UInt32>(w.0, w.1, w.2, w.3)
      for lane in 0..<4 where blockIndex * 4 + lane < count {
        let u = Float(words[lane] >> 8) * 0x1p-24
        values[blockIndex * 4 + lane] = low + width * u
      }
    }
    return Tensor(validShape: shape, scalars: values)
  }

  /// Standard normal numbers by the Box–Muller transform, computed in `Double` and rounded once.
  ///
  /// Block `major = e / 4` gives elements `4n … 4n+3`: words (0, 1) make the pair
  /// `u₁ = (w₀ + 1)/2³², u₂ = w₁/2³²`, `r = √(−2 ln u₁)`, elements `r·cos 2πu₂, r·sin 2πu₂`;
  /// words (2, 3) make the next pair the same way. `u₁ ∈ (0, 1]`, so the logarithm is finite.
  public static func randomNormal(
    shape: [Int], mean: Float = 0, std: Float = 1, seed: UInt64, stream: UInt32
  ) throws -> Tensor {
    let count = try elementCount(of: shape)
    let rng = Philox4x32(seed: seed)
    var values = [Float](repeating: 0, count: count)
    for blockIndex in 0..<((count + 3) / 4) {
      let w = rng.block(major: UInt64(blockIndex), minor: 0, stream: stream)
      let (a, b) = boxMuller(w.0, w.1)
      let (c, d) = boxMuller(w.2, w.3)
      let normals = SIMD4<Double>(a, b, c, d)
      for lane in 0..<4 where blockIndex * 4 + lane < count {
        values[blockIndex * 4 + lane] = mean + std * Float(normals[lane])
      }
    }
    return Tensor(validShape: shape, scalars: values)
  }
}

@inline(__always)
func boxMuller(_ w0: UInt32, _ w1: UInt32) -> (Double, Double) {
  let u1 = (Double(w0) + 1) * 0x1p-32
  let u2 = Double(w1) * 0x1p-32
  let radius = (-2 * log(u1)).squareRoot()
  let angle = 2 * Double.pi * u2
  return (radius * cos(angle), radius * sin(angle))
}
