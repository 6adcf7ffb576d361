import Foundation
import Testing
import _TestSupport

@testable import AttentionKit
@testable import AttentionVerification

/// Dropout on attention weights: the numpy fixtures' keep masks (Philox4x32-10, the layout of
/// `Dropout`'s doc comment), the kernel with dropout against numpy's float64 values, and the
/// properties that hold whatever the random words (p = 0, p = 1, seeds, the dropped share).
@Suite("Dropout")
struct DropoutTests {
  // MARK: Fixtures

  @Test(
    "sdpa_dropout: kernel output and weights match numpy",
    arguments: try ReferenceFixtures.sdpaDropoutCases())
  func kernelMatchesNumpy(spec: SdpaCase) throws {
    let c = try LoadedSdpaCase(spec)
    let dropout = try #require(try c.dropout())
    #expect(Double(dropout.probability) == spec.dropout?.p, "p must be exactly a float32")
    let result = try Attention.scaledDotProduct(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, scale: spec.scaleArgument,
      dropout: dropout, kernel: .materialized)
    let weights = try #require(result.weights)
    // Tolerances of AttentionTolerance with dropout's scale 1/(1 − p) (+2u); the expected
    // weights are those after dropout, so the relative bounds carry over unchanged.
    let tolerance = AttentionTolerance(c, withDropout: true)
    expectClose(
      weights.scalars, c.expectedWeights, shape: weights.shape, tolerance: tolerance.weight,
      "\(spec.name) weights after dropout [\(tolerance.summary)]")
    expectClose(
      result.output.scalars, c.expectedOutput, shape: result.output.shape,
      tolerance: { tolerance.output($0, queries: spec.queries) },
      "\(spec.name) output [\(tolerance.summary)]")

    // And within the reference kernel's own bounds, which apply the same dropout decisions.
    let reference = try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask,
      scale: spec.scaleArgument, dropout: dropout)
    let (tq, tk, dv) = (spec.queries, spec.keys, spec.valueDim)
    for row in 0..<(spec.batchCount * tq) {
      let expected = reference.row(batch: row / tq, query: row % tq)
      let w = expected.weightErrorRatio(weights.scalars[(row * tk)..<(row * tk + tk)])
      let o = expected.outputErrorRatio(result.output.scalars[(row * dv)..<(row * dv + dv)])
      #expect(w <= 1 && o <= 1, "\(spec.name) row \(row): error/bound weights \(w), output \(o)")
    }
  }

  @Test(
    "sdpa_dropout: the manifest's keep masks equal Dropout.keeps(row:key:)",
    arguments: try ReferenceFixtures.sdpaDropoutCases())
  func keepMasksOfSdpaCases(spec: SdpaCase) throws {
    let d = try #require(spec.dropout)
    #expect(d.stream == Int(RandomStream.dropout))
    let keep = try ReferenceFixtures.bools(d.keep)
    let dropout = try Dropout(probability: Float(d.p), seed: d.seed)
    let (tq, tk) = (spec.queries, spec.keys)
    let c = try LoadedSdpaCase(spec)
    var mismatches: [String] = []
    for row in 0..<(spec.batchCount * tq) {
      for j in 0..<tk where dropout.keeps(row: row, key: j) != keep[row * tk + j] {
        mismatches.append("(row \(row), key \(j)): numpy keep = \(keep[row * tk + j])")
      }
    }
    #expect(
      mismatches.isEmpty, "\(spec.name): \(mismatches.count) mismatches: \(mismatches.prefix(5))")
    // Where numpy drops, the expected weights are zero (the fixture is self-consistent).
    for e in keep.indices where !keep[e] {
      #expect(c.expectedWeights[e] == 0, "\(spec.name): dropped weight \(e) is not zero")
    }
  }

  @Test(
    "dropout_masks: keep masks equal numpy's bit for bit",
    arguments: try ReferenceFixtures.dropoutMaskCases())
  func keepMasks(spec: DropoutMaskCase) throws {
    let expected = try ReferenceFixtures.bools(spec.keep)
    let dropout = try Dropout(probability: Float(spec.p), seed: spec.seed)
    #expect(Double(Float(spec.p)) == spec.p)
    let (b, tq, tk) = (spec.shape[0], spec.shape[1], spec.shape[2])
    var mismatches: [String] = []
    for row in 0..<(b * tq) {
      for j in 0..<tk where dropout.keeps(row: row, key: j) != expected[row * tk + j] {
        mismatches.append("(row \(row), key \(j))")
      }
    }
    #expect(
      mismatches.isEmpty, "\(spec.name): \(mismatches.count) mismatches: \(mismatches.prefix(5))")
    #expect(dropout.dropsNone == (spec.p == 0) && dropout.dropsAll == (spec.p == 1))
    if let scale = spec.scale {
      #expect(
        // One rounding of 2¹⁶/(2¹⁶ − t) to float32.
        relativeError(dropout.keptScale, scale) <= 2 * Float32Rounding.unit,
        "\(spec.name): keptScale \(dropout.keptScale), 2¹⁶/(2¹⁶ − t) = \(scale)")
    } else {
      #expect(dropout.keptScale == 0, "p = 1: keptScale \(dropout.keptScale) should be 0")
    }
  }

  /// The kernel applies the same mask: with all scores 0 (Q = K = 0, D = 1), every weight is
  /// 1/Tk before dropout, so after it the kept ones are `(1/Tk)·1/(1 − p)` and the others 0.
  /// `1/Tk` and the kept scale are each rounded once, and multiplied: within 3u of the exact value.
  @Test(
    "dropout_masks: the kernel drops exactly numpy's weights",
    arguments: try ReferenceFixtures.dropoutMaskCases())
  func kernelUsesKeepMasks(spec: DropoutMaskCase) throws {
    let expected = try ReferenceFixtures.bools(spec.keep)
    let (b, tq, tk) = (spec.shape[0], spec.shape[1], spec.shape[2])
    let result = try Attention.scaledDotProduct(
      queries: try Tensor(shape: [b, tq, 1]), keys: try Tensor(shape: [b, tk, 1]),
      values: try Tensor(shape: [b, tk, 1], repeating: 1),
      dropout: try Dropout(probability: Float(spec.p), seed: spec.seed), kernel: .materialized)
    let weights = try #require(result.weights)
    let kept = (spec.scale ?? 0) / Double(tk)
    let tolerance = 3 * Float32Rounding.unit * kept
    var wrong: [String] = []
    for e in expected.indices {
      let w = weights.scalars[e]
      let ok = expected[e] ? abs(Double(w) - kept) <= tolerance : w == 0
      if !ok {
        wrong.append(
          "\(Tensor.multiIndex(ofFlat: e, shape: spec.shape)): \(w), keep \(expected[e])")
      }
    }
    #expect(
      wrong.isEmpty,
      "\(spec.name): expected kept = \(kept); \(wrong.count) wrong: \(wrong.prefix(5))")
    // Output row = Σ of the row's weights (V = 1): within γ_Tk of the exact sum.
    for row in 0..<(b * tq) {
      let sum = Double(expected[(row * tk)..<(row * tk + tk)].filter { $0 }.count) * kept
      let o = Double(result.output.scalars[row])
      #expect(
        abs(o - sum) <= Float32Rounding.gamma(tk + 3) * sum,
        "\(spec.name) row \(row): output \(o), expected \(sum)")
    }
  }

  // MARK: Properties

  /// A `[2, 64, 64]` mask as booleans, row-major.
  static func mask(probability: Float, seed: UInt64, rows: Int = 128, keys: Int = 64) throws
    -> [Bool]
  {
    let dropout = try Dropout(probability: probability, seed: seed)
    var keep: [Bool] = []
    keep.reserveCapacity(rows * keys)
    for row in 0..<rows {
      for j in 0..<keys { keep.append(dropout.keeps(row: row, key: j)) }
    }
    return keep
  }

  @Test("The same seed gives the same mask and the same kernel result")
  func sameSeed() throws {
    #expect(try Self.mask(probability: 0.5, seed: 7) == Self.mask(probability: 0.5, seed: 7))
    let c = try LoadedSdpaCase(try ReferenceFixtures.sdpaCase(named: "basic"))
    let dropout = try #require(try c.dropout())
    func run() throws -> AttentionResult {
      try Attention.scaledDotProduct(
        queries: c.queries, keys: c.keys, values: c.values, dropout: dropout, kernel: .materialized)
    }
    let (a, b) = (try run(), try run())
    #expect(a.weights == b.weights && a.output == b.output)
  }

  /// Two masks from different seeds are independent: with p = 1/2, each of the n = 8192
  /// decisions agrees with probability 1/2, so the number of disagreements is Binomial(n, 1/2)
  /// (a seed differing only in its high 32 bits checks that key word 1 is used).
  @Test(
    "Different seeds give independent masks",
    arguments: [(42, 43), (42, 42 + (1 << 32)), (0, UInt64.max)] as [(UInt64, UInt64)])
  func differentSeeds(seeds: (UInt64, UInt64)) throws {
    let a = try Self.mask(probability: 0.5, seed: seeds.0)
    let b = try Self.mask(probability: 0.5, seed: seeds.1)
    let differ = zip(a, b).filter { $0 != $1 }.count
    let interval = BinomialBound.interval(n: a.count, p: 0.5, failureProbability: 1e-6)
    #expect(
      interval.contains(differ),
      "seeds \(seeds): \(differ) of \(a.count) decisions differ, expected \(interval)")
  }

  /// On a 512×512 weight matrix the number of dropped weights is Binomial(262144, p) for a
  /// correct generator; the interval fails a correct implementation with probability ≤ 10⁻⁶.
  @Test(
    "The dropped share on a 512×512 matrix is consistent with p",
    arguments: [0.1, 0.5, 0.9] as [Float])
  func droppedShare(p: Float) throws {
    let t = 512
    let result = try Attention.scaledDotProduct(
      queries: try Tensor(shape: [1, t, 1]), keys: try Tensor(shape: [1, t, 1]),
      values: try Tensor(shape: [1, t, 1]), dropout: try Dropout(probability: p, seed: 2024),
      kernel: .materialized)
    let weights = try #require(result.weights)
    let dropped = weights.scalars.filter { $0 == 0 }.count
    let interval = BinomialBound.interval(n: t * t, p: Double(p), failureProbability: 1e-6)
    let share = Double(dropped) / Double(t * t)
    #expect(
      interval.contains(dropped),
      "p = \(p): \(dropped) of \(t * t) dropped (\(share)), expected \(interval)")
  }

  /// The 16 Philox bits that decide the weight of flat row `row` and key `key`, by the layout of
  /// `Dropout`'s doc comment (and of the numpy script): of word `(j mod 128) / 32` of the block
  /// with counter `(r, 16·⌊j/128⌋ + j mod 16, stream 0)`, the low half for `j mod 32 < 16`, else
  /// the high half.
  static func dropoutBits(seed: UInt64, row: Int, key: Int) -> UInt32 {
    let (group, within) = key.quotientAndRemainder(dividingBy: 128)
    let w = Philox4x32(seed: seed).block(
      major: UInt64(row), minor: UInt32(16 * group + within % 16), stream: RandomStream.dropout)
    let word = [w.0, w.1, w.2, w.3][within / 32]
    return within % 32 < 16 ? word & 0xFFFF : word >> 16
  }

  /// With p = 1/2 the threshold is exactly 2¹⁵: a weight is kept iff its 16 bits' top bit is set.
  @Test("keeps(row:key:) follows the documented counter layout, past 128 and 256 keys")
  func counterLayout() throws {
    let dropout = try Dropout(probability: 0.5, seed: 77)
    var mismatches: [String] = []
    for row in [0, 1, 1000, 1 << 33] {
      for key in 0..<300 {
        let kept = Self.dropoutBits(seed: 77, row: row, key: key) >= 1 << 15
        if dropout.keeps(row: row, key: key) != kept { mismatches.append("(\(row), \(key))") }
      }
    }
    #expect(mismatches.isEmpty, "\(mismatches.count) mismatches: \(mismatches.prefix(5))")
  }

  /// The rule is "dropped iff bits < round(p·2¹⁶)": bits equal to the threshold are kept. With
  /// `p = k·2⁻¹⁶` (exact in Float), the threshold is exactly `k`; so a weight whose 16 bits are
  /// `h > 0` is kept for `p = h·2⁻¹⁶` and dropped for `p = (h + 1)·2⁻¹⁶`, both by
  /// `keeps(row:key:)` and by the kernel (all scores 0, so every weight is non-zero before dropout).
  @Test("Bits equal to the threshold are kept; one below it are dropped")
  func thresholdBoundary() throws {
    let (seed, rows, keys) = (UInt64(5), 64, 160)
    var found: (row: Int, key: Int, bits: UInt32)?
    search: for row in 0..<rows {
      // A key past 128 and in a high half, so that both parts of the layout are exercised.
      for key in 144..<keys {
        let bits = Self.dropoutBits(seed: seed, row: row, key: key)
        if bits > 0 && bits < 0xFFFF {
          found = (row, key, bits)
          break search
        }
      }
    }
    let (row, key, bits) = try #require(found, "no usable bits in \(rows * 16) keys")
    let atBits = Float(bits) * 0x1p-16
    let aboveBits = Float(bits + 1) * 0x1p-16
    for (p, kept) in [(atBits, true), (aboveBits, false)] {
      let dropout = try Dropout(probability: p, seed: seed)
      #expect(
        dropout.keeps(row: row, key: key) == kept,
        "bits \(bits), p = \(p) (threshold \(Double(p) * 0x1p16)): keeps should be \(kept)")
      let weights = try #require(
        try Attention.scaledDotProduct(
          queries: try Tensor(shape: [1, rows, 1]), keys: try Tensor(shape: [1, keys, 1]),
          values: try Tensor(shape: [1, keys, 1]), dropout: dropout, kernel: .materialized
        ).weights)
      let w = weights.scalars[row * keys + key]
      #expect((w != 0) == kept, "kernel weight (\(row), \(key)) = \(w) for p = \(p)")
    }
  }

  @Test(
    "p = 0 and no dropout give exactly the same result",
    arguments: ["plain_tiny", "bool_mask_full_row", "causal_and_keep_full_row", "batch_2x3"])
  func zeroProbability(name: String) throws {
    let c = try LoadedSdpaCase(try ReferenceFixtures.sdpaCase(named: name))
    let none = try Attention.scaledDotProduct(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, kernel: .materialized)
    let zero = try Attention.scaledDotProduct(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask,
      dropout: try Dropout(probability: 0, seed: 99), kernel: .materialized)
    #expect(none.weights == zero.weights && none.output == zero.output, "\(name)")
    let referenceNone = try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask
    ).compute()
    let referenceZero = try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask,
      dropout: try Dropout(probability: 0, seed: 99)
    ).compute()
    #expect(referenceNone.weights == referenceZero.weights, "\(name): reference")
    #expect(referenceNone.output == referenceZero.output, "\(name): reference")
  }

  @Test(
    "p = 1 gives all-zero weights and output, never NaN",
    arguments: ["plain_tiny", "bool_mask_full_row", "large_tiles"])
  func fullProbability(name: String) throws {
    let c = try LoadedSdpaCase(try ReferenceFixtures.sdpaCase(named: name))
    let dropout = try Dropout(probability: 1, seed: 3)
    let kernel = try Attention.scaledDotProduct(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, dropout: dropout,
      kernel: .materialized)
    let reference = try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, dropout: dropout
    ).compute()
    for (label, result) in [("kernel", kernel), ("reference", reference)] {
      let weights = try #require(result.weights)
      let nonZeroWeights = weights.scalars.filter { $0 != 0 }
      let nonZeroOutput = result.output.scalars.filter { $0 != 0 }
      #expect(
        nonZeroWeights.isEmpty, "\(name) \(label): non-zero weights \(nonZeroWeights.prefix(5))")
      #expect(nonZeroOutput.isEmpty, "\(name) \(label): non-zero output \(nonZeroOutput.prefix(5))")
    }
  }

  @Test(
    "A probability outside [0, 1] throws invalidArgument",
    arguments: [
      -0.1, -Float.leastNonzeroMagnitude, Float(1).nextUp, 2, -.infinity, .infinity, .nan,
    ] as [Float])
  func invalidProbability(p: Float) throws {
    let error = #expect(throws: AttentionError.self, "p = \(p)") {
      _ = try Dropout(probability: p, seed: 1)
    }
    guard case .invalidArgument(let message)? = error else {
      Issue.record("p = \(p): expected invalidArgument, got \(String(describing: error))")
      return
    }
    #expect(message.contains("[0, 1]") && message.contains("\(p)"), "message: \(message)")
  }

  @Test(
    "Valid probabilities: flags, p on the 2⁻¹⁶ grid, and a kept scale that keeps dropout unbiased",
    arguments: [0, 0.1, 0.25, 0.5, 0.75, 1, 0.000_005, 0.000_01, 0.999, 0.9999, 0.999_99] as [Float]
  )
  func validProbability(p: Float) throws {
    let dropout = try Dropout(probability: p, seed: 1)
    #expect(dropout.probability == p && dropout.seed == 1)
    // The drop probability is p rounded to a multiple of 2⁻¹⁶ (below 1 while p < 1).
    let effective = dropout.effectiveProbability
    #expect((effective * 0x1p16).rounded() == effective * 0x1p16)
    #expect(abs(effective - Double(p)) <= 0x1p-17, "p = \(p): drawn with \(effective)")
    #expect(p == 1 || effective < 1, "p = \(p) < 1 must keep some weights")
    #expect(dropout.dropsNone == (effective == 0) && dropout.dropsAll == (p == 1))
    if p < 0x1p-17 { #expect(dropout.dropsNone, "p = \(p) < 2⁻¹⁷ rounds to no dropout") }
    // Unbiased: E[kept·scale] = (1 − p')·keptScale = 1, to the float32 rounding of keptScale
    // (scaling by the requested 1/(1 − p) would be off by half at p = 0.99999).
    if p < 1 {
      let expectation = (1 - effective) * Double(dropout.keptScale)
      #expect(
        abs(expectation - 1) <= Float32Rounding.unit,
        "p = \(p): (1 − p')·keptScale = \(expectation)")
    } else {
      #expect(dropout.keptScale == 0)
    }
  }
}
