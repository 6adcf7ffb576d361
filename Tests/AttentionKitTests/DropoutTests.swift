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
    let d = try #require(spec.dropout)
    #expect(dropout.probability == d.p)
    // numpy's float32(1 / float32(1 − p)) and Swift's, computed apart: the same float.
    #expect(dropout.keptScale == Float(d.scale), "keptScale \(dropout.keptScale), numpy \(d.scale)")
    let result = try Attention.scaledDotProduct(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, scale: spec.scaleArgument,
      dropout: dropout, kernel: .materialized)
    let weights = try #require(result.weights)
    // Tolerances of AttentionTolerance with dropout's scale (+2u: numpy multiplies by the same
    // float32 factor, exactly, so only the product's rounding is new); the expected weights are
    // those after dropout, so the relative bounds carry over unchanged.
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
    let dropout = try Dropout(probability: d.p, seed: d.seed)
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
    let dropout = try Dropout(probability: spec.p, seed: spec.seed)
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
    #expect(UInt64(dropout.threshold) == spec.threshold || spec.p == 1, "\(spec.name)")
    if let scale = spec.scale {
      // numpy's float32(1 / float32(1 − p)): the same float.
      #expect(
        dropout.keptScale == Float(scale),
        "\(spec.name): keptScale \(dropout.keptScale), numpy \(scale)")
    } else {
      #expect(dropout.keptScale == 0, "p = 1: keptScale \(dropout.keptScale) should be 0")
    }
  }

  /// The kernel applies the same mask: with all scores 0 (Q = K = 0, D = 1), every weight is
  /// 1/Tk before dropout, so after it the kept ones are `(1/Tk)·s` (`s` the manifest's float32
  /// scale) and the others 0. `1/Tk` and the product are each rounded once (and a kernel's
  /// normalization may round once more): within 3u of the exact value.
  @Test(
    "dropout_masks: the kernel drops exactly numpy's weights",
    arguments: try ReferenceFixtures.dropoutMaskCases())
  func kernelUsesKeepMasks(spec: DropoutMaskCase) throws {
    let expected = try ReferenceFixtures.bools(spec.keep)
    let (b, tq, tk) = (spec.shape[0], spec.shape[1], spec.shape[2])
    let result = try Attention.scaledDotProduct(
      queries: try Tensor(shape: [b, tq, 1]), keys: try Tensor(shape: [b, tk, 1]),
      values: try Tensor(shape: [b, tk, 1], repeating: 1),
      dropout: try Dropout(probability: spec.p, seed: spec.seed), kernel: .materialized)
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
  static func mask(probability: Double, seed: UInt64, rows: Int = 128, keys: Int = 64) throws
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
    arguments: [0.1, 0.5, 0.9])
  func droppedShare(p: Double) throws {
    let t = 512
    let result = try Attention.scaledDotProduct(
      queries: try Tensor(shape: [1, t, 1]), keys: try Tensor(shape: [1, t, 1]),
      values: try Tensor(shape: [1, t, 1]), dropout: try Dropout(probability: p, seed: 2024),
      kernel: .materialized)
    let weights = try #require(result.weights)
    let dropped = weights.scalars.filter { $0 == 0 }.count
    let interval = BinomialBound.interval(n: t * t, p: p, failureProbability: 1e-6)
    let share = Double(dropped) / Double(t * t)
    #expect(
      interval.contains(dropped),
      "p = \(p): \(dropped) of \(t * t) dropped (\(share)), expected \(interval)")
  }

  /// The Philox word that decides the weight of flat row `row` and key `key`, by the layout of
  /// `Dropout`'s doc comment (and of the numpy script): word `(j mod 64) / 16` of the block with
  /// counter `(r, 16·⌊j/64⌋ + j mod 16, stream 0)`.
  static func dropoutWord(seed: UInt64, row: Int, key: Int) -> UInt32 {
    let (group, within) = key.quotientAndRemainder(dividingBy: 64)
    let w = Philox4x32(seed: seed).block(
      major: UInt64(row), minor: UInt32(16 * group + within % 16), stream: RandomStream.dropout)
    return [w.0, w.1, w.2, w.3][within / 16]
  }

  /// With p = 1/2 the threshold is exactly 2³¹: a weight is kept iff its word's top bit is set.
  @Test("keeps(row:key:) follows the documented counter layout, past 64 and 256 keys")
  func counterLayout() throws {
    let dropout = try Dropout(probability: 0.5, seed: 77)
    var mismatches: [String] = []
    for row in [0, 1, 1000, 1 << 33] {
      for key in 0..<300 {
        let kept = Self.dropoutWord(seed: 77, row: row, key: key) >= 1 << 31
        if dropout.keeps(row: row, key: key) != kept { mismatches.append("(\(row), \(key))") }
      }
    }
    #expect(mismatches.isEmpty, "\(mismatches.count) mismatches: \(mismatches.prefix(5))")
  }

  /// The rule is "dropped iff word < round(p·2³²)": a word equal to the threshold is kept. With
  /// `p = k·2⁻³²` (exact in Double), the threshold is exactly `k`; so a weight whose word is
  /// `h > 0` is kept for `p = h·2⁻³²` and dropped for `p = (h + 1)·2⁻³²`, both by
  /// `keeps(row:key:)` and by the kernel (all scores 0, so every weight is non-zero before dropout).
  @Test("A word equal to the threshold is kept; one below it is dropped")
  func thresholdBoundary() throws {
    let (seed, rows, keys) = (UInt64(5), 64, 160)
    var found: (row: Int, key: Int, word: UInt32)?
    search: for row in 0..<rows {
      // A key past 128 and in word 2 or 3, so that both parts of the layout are exercised.
      for key in 160 - 32..<keys {
        let word = Self.dropoutWord(seed: seed, row: row, key: key)
        if word > 0 && word < .max {
          found = (row, key, word)
          break search
        }
      }
    }
    let (row, key, word) = try #require(found, "no usable word in \(rows * 32) keys")
    for (p, kept) in [(Double(word) * 0x1p-32, true), (Double(word + 1) * 0x1p-32, false)] {
      let dropout = try Dropout(probability: p, seed: seed)
      #expect(
        dropout.keeps(row: row, key: key) == kept,
        "word \(word), p = \(p) (threshold \(p * 0x1p32)): keeps should be \(kept)")
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
      -0.1, -Double.leastNonzeroMagnitude, Double(1).nextUp, 2, -.infinity, .infinity, .nan,
    ])
  func invalidProbability(p: Double) throws {
    let error = #expect(throws: AttentionError.self, "p = \(p)") {
      _ = try Dropout(probability: p, seed: 1)
    }
    guard case .invalidArgument(let message)? = error else {
      Issue.record("p = \(p): expected invalidArgument, got \(String(describing: error))")
      return
    }
    #expect(message.contains("[0, 1]") && message.contains("\(p)"), "message: \(message)")
  }

  /// The drop probability is `t/2³²`, `t = min(round(p·2³²), 2³² − 1)` for `p < 1`: within `2⁻³²`
  /// of `p` (`2⁻³³` but where the cap applies), below 1 while `p < 1`, 0 exactly when `p < 2⁻³³`
  /// — where the float32 scale is exactly 1, so that skipping dropout changes nothing.
  @Test(
    "Valid probabilities: flags, p on the 2⁻³² grid, and the kept scale",
    arguments: [
      0, 0.1, 0.25, 0.5, 0.75, 1, 0.000_005, 0.000_01, 0.999, 0.9999, 0.999_99, 0x1p-34, 0x1p-33,
      3e-10, 1 - 0x1p-34, Double(1).nextDown,
    ])
  func validProbability(p: Double) throws {
    let dropout = try Dropout(probability: p, seed: 1)
    #expect(dropout.probability == p && dropout.seed == 1)
    let effective = dropout.effectiveProbability
    #expect((effective * 0x1p32).rounded() == effective * 0x1p32)
    #expect(abs(effective - p) <= 0x1p-32, "p = \(p): drawn with \(effective)")
    #expect(p == 1 || effective < 1, "p = \(p) < 1 must keep some weights")
    #expect(dropout.dropsNone == (p < 0x1p-33) && dropout.dropsAll == (p == 1), "p = \(p)")
    if dropout.dropsNone { #expect(dropout.keptScale == 1, "p = \(p) drops nothing, scale 1") }
    if p < 1 {
      #expect(dropout.keptScale == 1 / Float(1 - p) && dropout.keptScale.isFinite, "p = \(p)")
    } else {
      #expect(dropout.keptScale == 0)
    }
  }

  /// A `Float` probability is widened exactly: `Float(0.1)` is another probability than `0.1`
  /// (its `1 − p` rounds elsewhere at `p = 0.9`), and an integer literal picks `Double`.
  @Test("A Float probability is widened exactly; literals are Double")
  func floatProbability() throws {
    let p = Float(0.9)
    let fromFloat = try Dropout(probability: p, seed: 3)
    #expect(fromFloat.probability == Double(p))
    #expect(fromFloat.keptScale == 1 / Float(1 - Double(p)))
    #expect(try Dropout(probability: 0.9, seed: 3).keptScale == 10, "PyTorch's 1/(1 − 0.9)")
    #expect(fromFloat.keptScale != 10, "Float(0.9)'s own scale, 1/(1 − 0.89999998)")
    #expect(try Dropout(probability: 1, seed: 3).dropsAll)
  }

  // MARK: Issue 23, item 1: PyTorch's scale, decisions of 32 bits

  /// What `torch.nn.functional.dropout(torch.ones(n), p, training=True)` returns for its kept
  /// elements on the CPU (PyTorch 2.15, read from its output): `fl32(1 / fl32(1 − p))`, as
  /// float32 bit patterns. For `0.021`, `0.025` and `0.04` that is one ulp away from rounding
  /// `1/(1 − p)` once (`Float(1/(1 − p))`): PyTorch rounds `1 − p` to float32 first.
  static let pytorchScales: [(p: Double, bits: UInt32)] = [
    (0.1, 0x3F8E_38E4), (0.3, 0x3FB6_DB6E), (0.5, 0x4000_0000), (0.9, 0x4120_0000),
    (0.999_99, 0x47C3_5000), (0.021, 0x3F82_BEE4), (0.025, 0x3F83_4834), (0.04, 0x3F85_5556),
  ]

  /// Item 1: kept weights are PyTorch's `softmax × 1/(1 − p)` to float32 rounding, the very
  /// floats: `keptScale` is PyTorch's factor bit for bit, and a kept weight is the float32
  /// product `w·keptScale` (PyTorch's `input·noise`), in every path that applies dropout.
  @Test(
    "Item 1: the kept scale is PyTorch's float32 1/(1 − p), and kept weights are w·scale exactly",
    arguments: pytorchScales.map(\.p))
  func item1KeptScaleIsPyTorchs(p: Double) throws {
    let dropout = try Dropout(probability: p, seed: 2024)
    let expected = try #require(Self.pytorchScales.first { $0.p == p }).bits
    #expect(
      dropout.keptScale.bitPattern == expected,
      "p = \(p): keptScale \(dropout.keptScale), PyTorch \(Float(bitPattern: expected))")
    #expect(dropout.keptScale == 1 / Float(1 - p))
    if [0.1, 0.3, 0.5, 0.9, 0.999_99].contains(p) {
      // Here PyTorch's two roundings agree with rounding 1/(1 − p) once.
      #expect(dropout.keptScale == Float(1 / (1 - p)), "p = \(p)")
    }
    // Dropout.apply (the kernels' vector path), on weights in (0, 1) and on a range that starts
    // and ends inside a group of 64 keys: each weight is 0 or w·keptScale, as a float32 product.
    let (row, first, count) = (7, 37, 300)
    var weights = (0..<count).map { Float($0 + 1) / Float(count + 1) }
    let original = weights
    weights.withUnsafeMutableBufferPointer {
      dropout.apply(to: $0.baseAddress!, row: row, firstKey: first, count: count)
    }
    var wrong: [String] = []
    for e in 0..<count {
      let kept = dropout.keeps(row: row, key: first + e)
      let expected = kept ? original[e] * dropout.keptScale : 0
      if weights[e].bitPattern != expected.bitPattern {
        wrong.append("key \(first + e): \(weights[e]), expected \(expected) (kept \(kept))")
      }
    }
    #expect(wrong.isEmpty, "p = \(p): \(wrong.count) wrong: \(wrong.prefix(3))")
  }

  /// Item 1, the check `attn` prints, "kept weights equal softmax × 1/(1−p)": it compares with
  /// the true `1/(1 − p)` within `γ₃` (the roundings of `1 − p`, of its reciprocal and of the
  /// product), so the kernel's weights pass, and weights scaled by the former 16-bit factor
  /// `2¹⁶/(2¹⁶ − round(p·2¹⁶))` (6·10⁻⁶ off at p = 0.3) or by the right factor 16 ulps off fail.
  @Test("Item 1: the kept-weights check compares with the true 1/(1 − p)", arguments: [0.3, 0.1])
  func item1KeptWeightsCheckIsTrue(p: Double) throws {
    let (b, t, d) = (2, 24, 8)
    let q = try Tensor.randomNormal(shape: [b, t, d], seed: 4, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: [b, t, d], seed: 4, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: [b, t, d], seed: 4, stream: RandomStream.values)
    let dropout = try Dropout(probability: p, seed: 4)
    let pre = try #require(
      try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, kernel: .materialized, needWeights: true
      ).weights)
    let result = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, dropout: dropout, kernel: .materialized, needWeights: true)
    let checks = ForwardChecks(
      reference: try ReferenceAttention(queries: q, keys: k, values: v, dropout: dropout),
      dropout: dropout, sampledRows: [(0, 0)])
    func keptCheck(_ result: AttentionResult) throws -> Check {
      try #require(
        checks.run(result: result, preDropout: pre).first { $0.name == "kept_weights_rescaled" })
    }
    let right = try keptCheck(result)
    #expect(right.passed, "p = \(p), the kernel's weights: \(right.detail)")
    let sixteenBit = Float(0x1p16 / (0x1p16 - (p * 0x1p16).rounded()))
    for (label, factor) in [
      ("the 16-bit factor", sixteenBit), ("16 ulps off", dropout.keptScale * (1 + 0x1p-19)),
    ] {
      var planted = result
      let post = try #require(result.weights)
      planted.weights = try Tensor(
        shape: post.shape,
        scalars: zip(pre.scalars, post.scalars).map { $1 == 0 ? 0 : $0 * factor })
      let wrong = try keptCheck(planted)
      #expect(!wrong.passed, "p = \(p), \(label) \(factor) must fail: \(wrong.detail)")
    }
  }

  /// Item 1: the probability of keeping is `1 − p` to within `2⁻³²` (decisions of 32 bits), for
  /// every `p` — here `p = k·10⁻⁶` — where the 16-bit decisions were off by up to `2⁻¹⁷`, all of
  /// `p` below `2⁻¹⁷` (`p = 5·10⁻⁶` dropped nothing).
  @Test("Item 1: the keep probability is within 2⁻³² of 1 − p for p = k·10⁻⁶")
  func item1KeepProbabilityIsExact() throws {
    var worst = 0.0
    for k in 1...1000 {
      let p = Double(k) * 1e-6
      let dropout = try Dropout(probability: p, seed: 1)
      worst = max(worst, abs((1 - dropout.effectiveProbability) - (1 - p)))
      #expect(!dropout.dropsNone, "p = \(p) must drop")
    }
    #expect(worst <= 0x1p-33, "worst |P(keep) − (1 − p)| = \(worst)")
  }

  /// Item 1, measured: the number of weights dropped out of n is Binomial(n, p) for a correct
  /// generator; the interval fails a correct implementation with probability ≤ 10⁻⁶ (the seed is
  /// fixed, so this run either passes or fails every time). `p = 7·10⁻⁶` is off the 2⁻¹⁶ grid —
  /// 16-bit decisions (`round(p·2¹⁶) = 0`) dropped none of the n = 2²² weights, where about 29
  /// are expected (the interval starts above 0); `p = 0.3` checks the bulk. The decisions come
  /// from `Dropout.apply`, the kernels' vector path, on rows of 4096 keys.
  @Test(
    "Item 1: the dropped share over 2²² weights is within a binomial bound of p",
    arguments: [7e-6, 0.3])
  func item1DroppedShareIsUnbiased(p: Double) throws {
    let dropout = try Dropout(probability: p, seed: 23)
    let (rows, keys) = (1024, 4096)
    var dropped = 0
    var row = [Float](repeating: 1, count: keys)
    for r in 0..<rows {
      row.withUnsafeMutableBufferPointer { buffer in
        buffer.update(repeating: 1)
        dropout.apply(to: buffer.baseAddress!, row: r, firstKey: 0, count: keys)
      }
      for w in row where w == 0 { dropped += 1 }
    }
    let n = rows * keys
    let interval = BinomialBound.interval(n: n, p: p, failureProbability: 1e-6)
    let sixteenBit = (p * 0x1p16).rounded() * 0x1p-16 * Double(n)
    #expect(p > 0.1 || interval.lowerBound > 0, "the test could not tell 16-bit decisions apart")
    let message = "p = \(p): \(dropped) of \(n) dropped, expected \(interval) "
    #expect(
      interval.contains(dropped), "\(message)(16-bit decisions would drop about \(sixteenBit))")
  }

  /// Item 1: the same seed drops the same weights in every kernel, whatever the tiles and the
  /// threads. With Q = K = 0 every weight is `1/Tk` before dropout, and with V the identity
  /// (`Dv = Tk`) the output row is the weight row, so every forward kernel's output shows its
  /// mask; with dO the identity (`Dv = Tq`) `dV = Pdᵀ` shows every backward kernel's. Tq = 37 and
  /// Tk = 203 are not multiples of 64, and the key blocks (8, 48, 100, 960) start inside groups.
  @Test("Item 1: masks are identical across kernels, tiles and threads")
  func item1MasksAgreeEverywhere() throws {
    let (tq, tk) = (37, 203)
    let dropout = try Dropout(probability: 0.3, seed: 9)
    var expected = [Bool](repeating: false, count: 2 * tq * tk)
    for e in expected.indices { expected[e] = dropout.keeps(row: e / tk, key: e % tk) }
    func identity(_ n: Int) throws -> Tensor {
      let scalars = (0..<(2 * n * n)).map { Float($0 % n == ($0 / n) % n ? 1 : 0) }
      return try Tensor(shape: [2, n, n], scalars: scalars)
    }
    let q = try Tensor(shape: [2, tq, 4])
    let k = try Tensor(shape: [2, tk, 4])
    var masks: [(String, [Bool])] = []
    let forwardKernels: [(String, Attention.Kernel, Int)] =
      [("reference", .reference, 1), ("materialized", .materialized, 2)]
      + [(8, 8), (16, 48), (5, 100), (16, 960)].flatMap { blocks in
        [1, 3].map { threads in
          (
            "tiled \(blocks) × \(threads) threads",
            Attention.Kernel.tiled(.init(queryBlock: blocks.0, keyBlock: blocks.1)), threads
          )
        }
      }
    let v = try identity(tk)
    for (name, kernel, threads) in forwardKernels {
      let result = try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, dropout: dropout, kernel: kernel, threads: threads)
      masks.append(("forward " + name, result.output.scalars.map { $0 != 0 }))
    }
    let dO = try identity(tq)
    let vq = try Tensor(shape: [2, tk, tq], repeating: 1)
    let backwardKernels: [(String, Attention.Kernel, Int)] = [
      ("reference", .reference, 1), ("materialized", .materialized, 2),
      ("tiled 8 × 8", .tiled(.init(queryBlock: 8, keyBlock: 8)), 3),
      ("tiled 16 × 100", .tiled(.init(queryBlock: 16, keyBlock: 100)), 1),
    ]
    for (name, kernel, threads) in backwardKernels {
      let g = try Attention.backward(
        queries: q, keys: k, values: vq, gradOutput: dO, dropout: dropout, kernel: kernel,
        threads: threads)
      // dV [2, Tk, Tq] = Pdᵀ: its element (b, j, i) is the weight of row b·Tq + i, key j.
      var mask = [Bool](repeating: false, count: 2 * tq * tk)
      for b in 0..<2 {
        for j in 0..<tk {
          for i in 0..<tq { mask[(b * tq + i) * tk + j] = g.dV.scalars[(b * tk + j) * tq + i] != 0 }
        }
      }
      masks.append(("backward " + name, mask))
    }
    for (name, mask) in masks {
      let differ = mask.indices.filter { mask[$0] != expected[$0] }
      let first = differ.first.map { "(row \($0 / tk), key \($0 % tk))" } ?? "-"
      #expect(
        differ.isEmpty, "\(name): \(differ.count) decisions differ from keeps, first at \(first)")
    }
    let share = Double(expected.filter { !$0 }.count) / Double(expected.count)
    #expect(share > 0.2 && share < 0.4, "a mask with p = 0.3 drops \(share) (sanity)")
  }
}
