import Foundation
import Testing
import _TestSupport

@testable import AttentionKit

/// `MaterializedAttention` and `ReferenceAttention` on every `sdpa` case of the numpy fixtures.
///
/// Two independent checks of the fast kernel: against the reference kernel's documented per-row
/// error bounds (`ReferenceAttention.row`), and directly against numpy's float64 values with the
/// tolerances of `AttentionTolerance` (Support/Tolerance.swift, where they are derived).
@Suite("Materialized and reference attention against numpy")
struct MaterializedAttentionTests {
  /// The kernel's output and weights for a case, with its own scale.
  static func run(_ c: LoadedSdpaCase) throws -> AttentionResult {
    try run(c, scale: c.spec.scaleArgument)
  }

  /// The same with another scale (`nil`: the default `1/√D`).
  static func run(_ c: LoadedSdpaCase, scale: Float?) throws -> AttentionResult {
    try Attention.scaledDotProduct(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, scale: scale,
      dropout: try c.dropout(), kernel: .materialized)
  }

  static func reference(_ c: LoadedSdpaCase) throws -> ReferenceAttention {
    try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask,
      scale: c.spec.scaleArgument, dropout: try c.dropout())
  }

  @Test(
    "The manifest's cases are consistent with their inputs",
    arguments: try ReferenceFixtures.sdpaCases())
  func manifestConsistency(spec: SdpaCase) throws {
    let c = try LoadedSdpaCase(spec)
    #expect(spec.dropout == nil, "\(spec.name): the sdpa section has no dropout")
    if spec.scaleIsDefault {
      let defaultScale = 1 / Double(spec.headDim).squareRoot()
      #expect(spec.scale == defaultScale, "\(spec.name): scale \(spec.scale) ≠ 1/√D")
    }
    #expect(c.expectedOutput.allSatisfy(\.isFinite) && c.expectedWeights.allSatisfy(\.isFinite))
    // A = scale·max Σ|q·k| bounds every |score|, so it is at least max_abs_score.
    let tolerance = AttentionTolerance(c)
    #expect(
      tolerance.productMagnitude >= spec.maxAbsScore * (1 - 1e-12),
      "\(spec.name): \(tolerance.summary)")
  }

  @Test(
    "Kernel rows are within the reference kernel's error bounds",
    arguments: try ReferenceFixtures.sdpaCases())
  func withinReferenceBounds(spec: SdpaCase) throws {
    let c = try LoadedSdpaCase(spec)
    let result = try Self.run(c)
    let weights = try #require(result.weights)
    let reference = try Self.reference(c)
    let (tq, tk, dv) = (spec.queries, spec.keys, spec.valueDim)
    var worstWeights = (ratio: 0.0, row: 0)
    var worstOutput = (ratio: 0.0, row: 0)
    for b in 0..<spec.batchCount {
      for i in 0..<tq {
        let row = b * tq + i
        let expected = reference.row(batch: b, query: i)
        let w = expected.weightErrorRatio(weights.scalars[(row * tk)..<(row * tk + tk)])
        let o = expected.outputErrorRatio(result.output.scalars[(row * dv)..<(row * dv + dv)])
        if !(w <= worstWeights.ratio) { worstWeights = (w, row) }
        if !(o <= worstOutput.ratio) { worstOutput = (o, row) }
      }
    }
    #expect(
      worstWeights.ratio <= 1,
      "\(spec.name): weights error/bound \(worstWeights.ratio) at flat row \(worstWeights.row)")
    #expect(
      worstOutput.ratio <= 1,
      "\(spec.name): output error/bound \(worstOutput.ratio) at flat row \(worstOutput.row)")
  }

  @Test(
    "Kernel matches numpy's float64 output and weights",
    arguments: try ReferenceFixtures.sdpaCases())
  func matchesNumpy(spec: SdpaCase) throws {
    let c = try LoadedSdpaCase(spec)
    let result = try Self.run(c)
    let weights = try #require(result.weights)
    #expect(result.output.shape == spec.expected.output.shape)
    #expect(weights.shape == spec.expected.weights.shape)
    let tolerance = AttentionTolerance(c)
    expectClose(
      weights.scalars, c.expectedWeights, shape: weights.shape, tolerance: tolerance.weight,
      "\(spec.name) weights [\(tolerance.summary)]")
    expectClose(
      result.output.scalars, c.expectedOutput, shape: result.output.shape,
      tolerance: { tolerance.output($0, queries: spec.queries) },
      "\(spec.name) output [\(tolerance.summary)]")
  }

  /// `ReferenceAttention` computes in Double but with the kernels' float32 scale
  /// (`Double(Float(scale))`), whose relative error is at most `u`: every score moves by at most
  /// `u·S`, so weights by a factor `e^{±2u·S}`, and the outputs by as much relative to
  /// `Σ_j w_j·|v_jc|`. Double rounding adds about `(D + Tk)·2⁻⁵³`, far below `10⁻¹²`.
  @Test(
    "Reference rows (Double) match numpy's float64 values",
    arguments: try ReferenceFixtures.sdpaCases())
  func referenceRowsMatchNumpy(spec: SdpaCase) throws {
    let c = try LoadedSdpaCase(spec)
    let reference = try Self.reference(c)
    let (tq, tk, dv) = (spec.queries, spec.keys, spec.valueDim)
    let relative = 2.2 * Float32Rounding.unit * spec.maxAbsScore + 1e-12
    var weights: [Double] = []
    var output: [Double] = []
    for b in 0..<spec.batchCount {
      for i in 0..<tq {
        let row = reference.row(batch: b, query: i)
        #expect(row.weights.count == tk && row.output.count == dv)
        weights += row.weights
        output += row.output
      }
    }
    expectClose(
      weights, c.expectedWeights, shape: spec.expected.weights.shape,
      tolerance: { relative * c.expectedWeights[$0] + 1e-300 }, "\(spec.name) reference weights")
    expectClose(
      output, c.expectedOutput, shape: spec.expected.output.shape,
      tolerance: { relative * Self.outputMagnitude(c, $0) + 1e-300 },
      "\(spec.name) reference output")
  }

  /// `compute()` rounds the Double rows to Float: the tolerance above plus the rounding, at most
  /// `u` relative (1.01·u covers the reference's own tiny error), and `λ` for values below
  /// float32's normal range.
  @Test(
    "Reference compute() (Float) matches numpy's float64 values",
    arguments: try ReferenceFixtures.sdpaCases())
  func referenceComputeMatchesNumpy(spec: SdpaCase) throws {
    let c = try LoadedSdpaCase(spec)
    let result = try Self.reference(c).compute()
    let weights = try #require(result.weights)
    #expect(result.output.shape == spec.expected.output.shape)
    #expect(weights.shape == spec.expected.weights.shape)
    let u = Float32Rounding.unit
    let relative = 2.2 * u * spec.maxAbsScore + 1e-12
    let lambda = Double(Float.leastNormalMagnitude)
    expectClose(
      weights.scalars, c.expectedWeights, shape: weights.shape,
      tolerance: { (relative + 1.01 * u) * c.expectedWeights[$0] + lambda },
      "\(spec.name) reference compute() weights")
    expectClose(
      result.output.scalars, c.expectedOutput, shape: result.output.shape,
      tolerance: { e in
        relative * Self.outputMagnitude(c, e) + 1.01 * u * abs(c.expectedOutput[e]) + lambda
      }, "\(spec.name) reference compute() output")
  }

  /// `Σ_j w_j·|v_jc|` for output element `e`, from the float64 weights.
  static func outputMagnitude(_ c: LoadedSdpaCase, _ e: Int) -> Double {
    let (tq, tk, dv) = (c.spec.queries, c.spec.keys, c.spec.valueDim)
    let row = e / dv
    let ch = e % dv
    let b = row / tq
    var sum = 0.0
    for j in 0..<tk {
      sum += c.expectedWeights[row * tk + j] * Double(abs(c.values.scalars[(b * tk + j) * dv + ch]))
    }
    return sum
  }

  @Test(
    "No NaN or infinity anywhere; fully masked rows are exactly zero",
    arguments: try ReferenceFixtures.sdpaCases())
  func fullyMaskedRows(spec: SdpaCase) throws {
    let c = try LoadedSdpaCase(spec)
    let (tq, tk, dv) = (spec.queries, spec.keys, spec.valueDim)
    let kernel = try Self.run(c)
    let reference = try Self.reference(c)
    let referenceResult = reference.compute()
    for (name, result) in [("kernel", kernel), ("reference", referenceResult)] {
      let weights = try #require(result.weights)
      #expect(
        weights.scalars.allSatisfy(\.isFinite) && result.output.scalars.allSatisfy(\.isFinite),
        "\(spec.name) \(name): non-finite values")
      var zeroRows: [Int] = []
      for row in 0..<(spec.batchCount * tq) {
        let expectedZero = c.expectedWeights[(row * tk)..<(row * tk + tk)].allSatisfy { $0 == 0 }
        #expect(
          reference.isFullyMasked(batch: row / tq, query: row % tq) == expectedZero,
          "\(spec.name): isFullyMasked(row \(row)) should be \(expectedZero)")
        guard expectedZero else { continue }
        zeroRows.append(row)
        let w = Array(weights.scalars[(row * tk)..<(row * tk + tk)])
        let o = Array(result.output.scalars[(row * dv)..<(row * dv + dv)])
        #expect(w.allSatisfy { $0 == 0 }, "\(spec.name) \(name) row \(row) weights \(w)")
        #expect(o.allSatisfy { $0 == 0 }, "\(spec.name) \(name) row \(row) output \(o)")
      }
      #expect(
        zeroRows.count == spec.fullyMaskedRows,
        """
        \(spec.name): \(zeroRows.count) all-zero rows \(zeroRows), \
        manifest says \(spec.fullyMaskedRows)
        """)
    }
  }

  @Test("An explicit scale is used, and the default scale is 1/√D")
  func scaleOverride() throws {
    let c = try LoadedSdpaCase(try ReferenceFixtures.sdpaCase(named: "scale_override"))
    #expect(!c.spec.scaleIsDefault && c.spec.scale == 0.3)
    let tolerance = AttentionTolerance(c)
    // With the default scale 1/√8 ≈ 0.354 instead of 0.3, the weights must be far off: this is
    // what makes the fixture comparison able to catch an ignored scale.
    let wrong = try #require(try Self.run(c, scale: nil).weights)
    var worst = 0.0
    for e in wrong.scalars.indices {
      worst = max(worst, abs(Double(wrong.scalars[e]) - c.expectedWeights[e]) / tolerance.weight(e))
    }
    #expect(worst > 100, "default scale should miss the 0.3-scaled weights; error/tol = \(worst)")

    // Passing 1/√D explicitly is the same computation as passing nil: bit for bit.
    let plain = try LoadedSdpaCase(try ReferenceFixtures.sdpaCase(named: "plain_tiny"))
    let implicit = try Self.run(plain, scale: nil)
    let explicit = try Self.run(plain, scale: 1 / Float(plain.spec.headDim).squareRoot())
    #expect(implicit.output == explicit.output && implicit.weights == explicit.weights)
  }

  @Test(
    "Causal masks are top-left aligned: query i sees exactly keys 0…i",
    arguments: ["causal_square", "causal_tq_lt_tk", "causal_tq_gt_tk", "causal_and_keep_full_row"])
  func causalAlignment(name: String) throws {
    let c = try LoadedSdpaCase(try ReferenceFixtures.sdpaCase(named: name))
    let spec = c.spec
    #expect(spec.causal)
    let (tq, tk) = (spec.queries, spec.keys)
    let weights = try #require(try Self.run(c).weights)
    let keep = c.mask.keep
    for b in 0..<spec.batchCount {
      for i in 0..<tq {
        for j in 0..<tk {
          let w = weights.scalars[(b * tq + i) * tk + j]
          // The only keep mask among these cases is [B, Tq, Tk].
          let kept = keep.map { $0.scalars[(b * tq + i) * tk + j] != 0 } ?? true
          if j > i || !kept {
            #expect(w == 0, "\(name): batch \(b) query \(i) key \(j) should be masked, got \(w)")
          } else {
            #expect(w > 0, "\(name): batch \(b) query \(i) key \(j) should be visible, got \(w)")
          }
        }
      }
    }
  }

  @Test(
    "A broadcast mask gives the same result as its explicit expansion",
    arguments: [
      "float_mask_broadcast_batch", "mask_broadcast_heads", "key_padding_mask", "additive_bias",
      "bias_and_keep", "large_tiles_causal_masked",
    ])
  func broadcastMasks(name: String) throws {
    let c = try LoadedSdpaCase(try ReferenceFixtures.sdpaCase(named: name))
    let target = c.spec.expected.weights.shape
    var expanded = c
    expanded.mask.keep = try c.mask.keep.map { try Self.broadcast($0, to: target) }
    expanded.mask.bias = try c.mask.bias.map { try Self.broadcast($0, to: target) }
    #expect(expanded.mask.keep?.shape ?? target == target)
    let a = try Self.run(c)
    let b = try Self.run(expanded)
    #expect(a.weights == b.weights, "\(name): weights differ between broadcast and expanded masks")
    #expect(a.output == b.output, "\(name): output differs between broadcast and expanded masks")
  }

  /// numpy broadcasting, written out: `tensor` (shape aligned at the right, 1 repeats) repeated
  /// to `target`.
  static func broadcast(_ tensor: Tensor, to target: [Int]) throws -> Tensor {
    let lead = target.count - tensor.rank
    let count = target.reduce(1, *)
    var scalars = [Float](repeating: 0, count: count)
    for e in 0..<count {
      let index = Tensor.multiIndex(ofFlat: e, shape: target)
      var source = 0
      for axis in 0..<tensor.rank {
        let extent = tensor.shape[axis]
        source = source * extent + (extent == 1 ? 0 : index[lead + axis])
      }
      scalars[e] = tensor.scalars[source]
    }
    return try Tensor(shape: target, scalars: scalars)
  }
}
