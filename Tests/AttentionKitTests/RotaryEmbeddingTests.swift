import AttentionKit
import Foundation
import Testing
import _TestSupport

/// Rotary embeddings against `Fixtures/mha`'s numpy rotations (both layouts, offsets 0 and
/// 1000). Tolerance per element: `γ₄·(|x₀| + |x₁|)` over its pair — two products and a sum in
/// float32 plus the rounding of `cos θ` and `sin θ` to float32 (`RotaryEmbedding` computes the
/// angle itself in `Double`, as the fixture does).
@Suite("Rotary position embeddings")
struct RotaryEmbeddingTests {
  @Test("rotations match numpy", arguments: try MHAFixtures.ropeCases())
  func matchesFixture(_ fixture: RopeCase) throws {
    let x = try MHAFixtures.tensor(fixture.input)
    let d = x.shape[x.rank - 1]
    let rope = try RotaryEmbedding(
      theta: fixture.theta, dimension: d, layout: RotaryEmbedding.Layout(rawValue: fixture.layout)!)
    let rotated = try rope.applied(to: x, positionOffset: fixture.offset)
    let expected = try MHAFixtures.doubles(fixture.expected)
    let gamma = Float32Rounding.gamma(4)
    for vector in 0..<(x.count / d) {
      for i in 0..<(d / 2) {
        let (a, b) = rope.pair(i)
        let magnitude = Double(abs(x.scalars[vector * d + a]) + abs(x.scalars[vector * d + b]))
        for k in [a, b] {
          let error = abs(Double(rotated.scalars[vector * d + k]) - expected[vector * d + k])
          #expect(error <= gamma * magnitude, "vector \(vector), feature \(k)")
        }
      }
    }
  }

  @Test("a rotated query·key depends on the positions' difference alone")
  func relativeProperty() throws {
    for layout in RotaryEmbedding.Layout.allCases {
      let rope = try RotaryEmbedding(theta: 10_000, dimension: 16, layout: layout)
      let q = try Tensor.randomNormal(shape: [1, 16], seed: 1, stream: 0)
      let k = try Tensor.randomNormal(shape: [1, 16], seed: 2, stream: 0)
      func dot(_ m: Int, _ n: Int) throws -> Double {
        let a = try rope.applied(to: q, positionOffset: m)
        let b = try rope.applied(to: k, positionOffset: n)
        return zip(a.scalars, b.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
      }
      // Same distance 3 at positions 5 and 505: equal to float32 rounding of the rotations.
      #expect(abs(try dot(8, 5) - dot(508, 505)) < 1e-4)
      // Different distances: different products (the rotation is not the identity).
      #expect(abs(try dot(8, 5) - dot(5, 8)) > 1e-3)
    }
  }

  @Test("odd or non-positive dimensions and bad theta are refused")
  func invalid() {
    #expect(throws: AttentionError.self) { try RotaryEmbedding(theta: 10_000, dimension: 7) }
    #expect(throws: AttentionError.self) { try RotaryEmbedding(theta: 0, dimension: 8) }
    #expect(throws: AttentionError.self) { try RotaryEmbedding(theta: .nan, dimension: 8) }
    let rope = try? RotaryEmbedding(theta: 10_000, dimension: 8)
    var wrong = try! Tensor(shape: [2, 6])
    #expect(throws: AttentionError.self) { try rope?.apply(to: &wrong) }
  }
}
