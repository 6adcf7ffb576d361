import AttentionKit
import AttentionVerification
import Foundation
import Testing
import _TestSupport

/// `MultiHeadAttention` against the numpy layers of `Fixtures/mha`.
///
/// Tolerances: the float32 layer must lie within `MultiHeadReference`'s first-order bound of the
/// fixture's float64 value, element by element (the bound is derived in its doc comment; it is
/// orders of magnitude above the errors seen, and a wrong head, rotation, mask or scale is off by
/// O(1)). `MultiHeadReference` itself must agree with the fixture to 1e-12 relative to the
/// output's largest magnitude: both are float64 evaluations of the same formulas from the same
/// float32 parameters, differing only in summation order.
@Suite("Multi-head attention layers")
struct MultiHeadAttentionTests {
  @Test("every layout matches its float64 fixture", arguments: try MHAFixtures.cases())
  func matchesFixture(_ fixture: MHACase) throws {
    let layer = try fixture.layer()
    #expect(layer.heads == fixture.heads)
    #expect(layer.keyValueHeads == fixture.kvHeads)
    #expect(layer.headDim == fixture.headDim)
    let x = try MHAFixtures.tensor(fixture.files.input)
    let (padding, mask) = try fixture.masks()
    let offset = fixture.rope?.offset ?? 0
    let result = try layer(
      x, keyPaddingMask: padding, attentionMask: mask, positionOffset: offset,
      kernel: .materialized, needWeights: true, threads: 2)
    let expected = try MHAFixtures.doubles(fixture.files.expectedOutput)
    let reference = try MultiHeadReference(
      layer: layer, input: x, keyPaddingMask: padding, attentionMask: mask,
      positionOffset: offset)
    let all = (0..<fixture.batch).flatMap { b in (0..<fixture.seq).map { (batch: b, token: $0) } }
    let rows = reference.rows(all)
    let e = fixture.embedDim
    let scale = expected.map(abs).max() ?? 1
    var worstRatio = 0.0
    var worstReference = 0.0
    for (row, r) in zip(all, rows) {
      let base = (row.batch * fixture.seq + row.token) * e
      for c in 0..<e {
        let error = abs(Double(result.output.scalars[base + c]) - expected[base + c])
        worstRatio = max(worstRatio, error / r.bound[c])
        worstReference = max(worstReference, abs(r.output[c] - expected[base + c]) / scale)
      }
    }
    #expect(worstRatio <= 1, "float32 layer vs fixture: worst error / bound \(worstRatio)")
    #expect(worstReference <= 1e-12, "float64 reference vs fixture: \(worstReference)")

    if let weightsRef = fixture.files.expectedWeights {
      let expectedWeights = try MHAFixtures.doubles(weightsRef)
      let weights = try #require(result.weights)
      var worst = 0.0
      for (row, r) in zip(all, rows) {
        for h in 0..<fixture.heads {
          let base = ((row.batch * fixture.heads + h) * fixture.seq + row.token) * fixture.seq
          for j in 0..<fixture.seq {
            let error = abs(Double(weights.scalars[base + j]) - expectedWeights[base + j])
            // A weight the mask zeroes must be exactly 0: its bound is 0 too.
            worst = max(worst, error == 0 ? 0 : error / r.weightBounds[h][j])
          }
        }
      }
      #expect(worst <= 1, "weights: worst error / bound \(worst)")
    }
    if let averageRef = fixture.files.expectedAverageWeights {
      let expectedAverage = try MHAFixtures.doubles(averageRef)
      let average = try #require(result.averagedWeights)
      #expect(average.shape == [fixture.batch, fixture.seq, fixture.seq])
      // The mean of H weights each within w·ρ of its reference: at most the largest ρ, here
      // bounded by 1e-5 (the weights' bounds above are below 1e-6 relative).
      for (a, b) in zip(average.scalars, expectedAverage) {
        #expect(abs(Double(a) - b) <= 1e-5 * max(b, 1e-3))
      }
    }
  }

  @Test("each kernel gives the same layer output", arguments: try MHAFixtures.cases())
  func kernelsAgree(_ fixture: MHACase) throws {
    let layer = try fixture.layer()
    let x = try MHAFixtures.tensor(fixture.files.input)
    let (padding, mask) = try fixture.masks()
    let offset = fixture.rope?.offset ?? 0
    let reference = try MultiHeadReference(
      layer: layer, input: x, keyPaddingMask: padding, attentionMask: mask,
      positionOffset: offset)
    let all = (0..<fixture.batch).flatMap { b in (0..<fixture.seq).map { (batch: b, token: $0) } }
    let rows = reference.rows(all)
    for kernel: Attention.Kernel in [.reference, .tiled(.init(queryBlock: 4, keyBlock: 3))] {
      let output = try layer(
        x, keyPaddingMask: padding, attentionMask: mask, positionOffset: offset, kernel: kernel
      ).output
      for (row, r) in zip(all, rows) {
        let base = (row.batch * fixture.seq + row.token) * fixture.embedDim
        for c in 0..<fixture.embedDim {
          #expect(abs(Double(output.scalars[base + c]) - r.output[c]) <= r.bound[c])
        }
      }
    }
  }

  @Test("the layer's state dict round-trips through each layout")
  func stateDictRoundTrip() throws {
    for fixture in try MHAFixtures.cases() {
      let layer = try fixture.layer()
      let layout = WeightLayout(rawValue: fixture.layout)!
      let saved = try layer.stateDict(layout: layout, prefix: fixture.prefix)
      #expect(
        Set(saved.names) == Set(fixture.files.safetensors.layerTensors), "\(fixture.name)")
      let original = try MHAFixtures.stateDict(fixture.files.safetensors.file)
      for name in saved.names { #expect(saved[name] == original[name], "\(name)") }
    }
  }
}
