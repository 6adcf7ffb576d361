import AttentionKit
import AttentionVerification
import Foundation
import Testing
import _TestSupport

/// `ScoreTerms` in every kernel: the rules (BLOOM's slopes, T5's buckets) against values derived
/// by hand, and the materialized and tiled kernels (whole and split keys, several threads and
/// blocks) against the float64 reference kernel within `ReferenceAttention.row`'s bounds. The
/// numpy and PyTorch fixtures of the terms (`ScoreTermsFixtureTests`) hold the reference itself.
@Suite("Score terms: soft-capping, ALiBi, T5 buckets, sinks")
struct ScoreTermsTests {
  @Test("BLOOM's slopes: powers of 2^(−8/n), the extra heads from 2n's every other slope")
  func bloomSlopes() {
    #expect(PositionBias.bloomSlopes(heads: 8) == (1...8).map { Float(pow(2, -Double($0))) })
    // H = 6: n = 4 (base 2⁻²) and two extra heads from 8's base 2⁻¹, odd powers 1 and 3.
    #expect(
      PositionBias.bloomSlopes(heads: 6)
        == [0x1p-2, 0x1p-4, 0x1p-6, 0x1p-8, 0x1p-1, 0x1p-3])
    #expect(PositionBias.bloomSlopes(heads: 1) == [0x1p-8])
    #expect(PositionBias.bloomSlopes(heads: 0).isEmpty)
  }

  @Test("T5's buckets: exact below half, log-spaced to the max distance, then the last")
  func t5Buckets() {
    func bucket(_ d: Int, _ bidirectional: Bool) -> Int {
      PositionBias.t5Bucket(
        relativePosition: d, bidirectional: bidirectional, buckets: 32, maxDistance: 128)
    }
    // Bidirectional, 32 buckets: 16 per side, exact below 8; keys after the query (d > 0) use
    // the upper 16. log(127/8)/log(16)·8 = 7.98 → bucket 8 + 7; log(25)/log(16)·8 = 9.3 → 15.
    #expect(bucket(0, true) == 0)
    #expect(bucket(-1, true) == 1)
    #expect(bucket(1, true) == 17)
    #expect(bucket(-7, true) == 7)
    #expect(bucket(-8, true) == 8)
    #expect(bucket(-127, true) == 15)
    #expect(bucket(-200, true) == 15)
    #expect(bucket(200, true) == 31)
    // Unidirectional: keys after the query are bucket 0, exact below 16.
    #expect(bucket(5, false) == 0)
    #expect(bucket(-15, false) == 15)
    // log(32/16)/log(8)·16 = 5.33 → 16 + 5.
    #expect(bucket(-32, false) == 21)
  }

  struct Case: Sendable, CustomTestStringConvertible {
    var name: String
    var terms: @Sendable (_ heads: Int) throws -> ScoreTerms
    var mask: AttentionMask
    var testDescription: String { name }
  }

  static let cases: [Case] = [
    Case(name: "softcap 5", terms: { _ in ScoreTerms(softcap: 5) }, mask: .none),
    Case(
      name: "ALiBi, causal bottom-right",
      terms: { ScoreTerms(positionBiases: [.alibi(slopes: PositionBias.bloomSlopes(heads: $0))]) },
      mask: AttentionMask(isCausal: true, causalAlignment: .bottomRight)),
    Case(
      name: "T5 bidirectional",
      terms: { heads in
        ScoreTerms(
          positionBiases: [
            .t5(
              table: try Tensor.randomNormal(shape: [32, heads], seed: 4, stream: 9),
              maxDistance: 20, bidirectional: true)
          ])
      }, mask: .none),
    Case(
      name: "T5 causal, window 9",
      terms: { heads in
        ScoreTerms(
          positionBiases: [
            .t5(
              table: try Tensor.randomNormal(shape: [16, heads], seed: 5, stream: 9),
              maxDistance: 24, bidirectional: false)
          ])
      }, mask: AttentionMask(isCausal: true, window: 9)),
    Case(
      name: "sinks",
      terms: { heads in ScoreTerms(sinks: (0..<heads).map { Float($0) - 1.5 }) }, mask: .causal),
    Case(
      name: "all four, causal",
      terms: { heads in
        ScoreTerms(
          softcap: 3, positionBiases: [.alibi(slopes: PositionBias.bloomSlopes(heads: heads))],
          sinks: (0..<heads).map { 2 - Float($0) })
      }, mask: .causal),
  ]

  @Test("materialized and tiled kernels match the float64 reference", arguments: cases)
  func kernelsMatchReference(spec: Case) throws {
    // Q [2, 4, 13, 8] scaled up so that the soft-cap bites; GQA: K, V [2, 2, 29, 8].
    var q = try Tensor.randomNormal(shape: [2, 4, 13, 8], seed: 1, stream: RandomStream.queries)
    for k in q.scalars.indices { q.scalars[k] *= 4 }
    let k = try Tensor.randomNormal(shape: [2, 2, 29, 8], seed: 1, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: [2, 2, 29, 8], seed: 1, stream: RandomStream.values)
    let terms = try spec.terms(4)
    let problem = try ReferenceAttention(
      queries: q, keys: k, values: v, mask: spec.mask, terms: terms)
    let rows = RowSample.rows(shape: problem.shape, seed: 0, limit: .max)
    let checker = ForwardChecks(reference: problem, dropout: nil, sampledRows: rows)
    let kernels: [(String, Attention.Kernel, Int)] = [
      ("materialized", .materialized, 3),
      ("tiled", .tiled(.default), 2),
      ("tiled 4 × 8", .tiled(.init(queryBlock: 4, keyBlock: 8)), 3),
      ("tiled 16 × 5", .tiled(.init(queryBlock: 16, keyBlock: 5)), 1),
    ]
    for (name, kernel, threads) in kernels {
      let result = try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, mask: spec.mask, terms: terms, kernel: kernel,
        needWeights: kernel == .materialized, threads: threads)
      let checks = checker.run(result: result, preDropout: result.weights)
      for check in checks {
        #expect(check.passed, "\(spec.name), \(name): \(check.title): \(check.detail)")
      }
    }
  }

  /// Each kernel's output and weights against numpy's float64 (`make_score_terms_fixtures.py`),
  /// element by element. Tolerance: the float32 bound of `ReferenceAttention.row` around the
  /// exact value (numpy's float64 is exact to ~1e-15, far below it) — so a term applied with
  /// other semantics than the fixtures' (a bucket off, a slope's sign, the sink's place, the
  /// alignment of `i`) fails, while float32 rounding passes.
  @Test(
    "every kernel matches numpy's float64 on the fixtures",
    arguments: try ScoreTermsFixtures.cases())
  func kernelsMatchFixtures(spec: ScoreTermsCase) throws {
    let c = try LoadedScoreTermsCase(spec)
    let terms = c.scoreTerms
    let reference = try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, scale: c.scale,
      terms: terms)
    let shape = reference.shape
    let (tq, tk, dv) = (shape.queries, shape.keys, shape.valueDim)
    let rows = (0..<(shape.batchCount * tq)).map { reference.row(batch: $0 / tq, query: $0 % tq) }
    for kernel: Attention.Kernel in [
      .reference, .materialized, .tiled(.default), .tiled(.init(queryBlock: 3, keyBlock: 7)),
    ] {
      let result = try Attention.scaledDotProduct(
        queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, scale: c.scale,
        terms: terms, kernel: kernel, needWeights: !kernel.isTiled, threads: 2)
      var worst = 0.0
      for (row, bounds) in rows.enumerated() {
        for e in 0..<dv {
          let difference = abs(
            Double(result.output.scalars[row * dv + e]) - c.expectedOutput[row * dv + e])
          worst = max(worst, difference / (bounds.outputBounds[e] + 1e-12))
        }
        if let weights = result.weights {
          for j in 0..<tk {
            let expected = c.expectedWeights[row * tk + j]
            let difference = abs(Double(weights.scalars[row * tk + j]) - expected)
            if expected == 0 {
              #expect(difference == 0, "\(spec.name), \(kernel.name): masked weight [\(row), \(j)]")
            }
            worst = max(worst, difference / (bounds.weightBounds[j] + 1e-12))
          }
        }
      }
      #expect(worst <= 1, "\(spec.name), \(kernel.name): worst |kernel − numpy| / bound = \(worst)")
    }
  }

  @Test("split keys (decode): one query over many keys, sinks merged once, any thread count")
  func splitKeysWithSinks() throws {
    let q = try Tensor.randomNormal(shape: [1, 4, 1, 16], seed: 2, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: [1, 4, 3000, 16], seed: 2, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: [1, 4, 3000, 16], seed: 2, stream: RandomStream.values)
    let terms = ScoreTerms(softcap: 8, sinks: [4, -1, 0, 9])
    let reference = try ReferenceAttention(queries: q, keys: k, values: v, terms: terms)
    let rows = RowSample.rows(shape: reference.shape, seed: 0, limit: .max)
    var outputs: [Tensor] = []
    for threads in [1, 2, 5, 8] {
      let result = try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, terms: terms, kernel: .tiled(.default), threads: threads)
      let checks = ForwardChecks(reference: reference, dropout: nil, sampledRows: rows)
        .run(result: result, preDropout: nil)
      for check in checks { #expect(check.passed, "\(threads) threads: \(check.detail)") }
      outputs.append(result.output)
    }
    #expect(outputs.allSatisfy { $0 == outputs[0] }, "bit-identical for 1, 2, 5, 8 threads")
  }

  @Test(
    "a tiled run at T = 16,384 with each term, windowed: sampled rows verify, tiles outside the window skipped, workspace independent of T"
  )
  func longTiledRun() throws {
    // A causal window of 512 keys: the tiles outside it are skipped, so this runs in seconds
    // even unoptimized, and shows the terms keep the skipping.
    let (t, window) = (16_384, 512)
    let mask = AttentionMask(isCausal: true, window: window)
    let q = try Tensor.randomNormal(shape: [1, 2, t, 16], seed: 6, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: [1, 2, t, 16], seed: 6, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: [1, 2, t, 16], seed: 6, stream: RandomStream.values)
    let table = try Tensor.randomNormal(shape: [32, 2], seed: 6, stream: 9)
    let all: [(String, ScoreTerms)] = [
      ("softcap", ScoreTerms(softcap: 2)),
      ("ALiBi", ScoreTerms(positionBiases: [.alibi(slopes: PositionBias.bloomSlopes(heads: 2))])),
      (
        "T5",
        ScoreTerms(positionBiases: [.t5(table: table, maxDistance: 128, bidirectional: false)])
      ),
      ("sinks", ScoreTerms(sinks: [1, -2])),
    ]
    // The tiled kernel's workspace for this shape (per-thread tiles): no [T, T] term anywhere.
    let workspace = TiledAttention.workspaceBytes(
      queries: t, keys: t, headDim: 16, valueDim: 16, batchCount: 2, window: window, threads: 2)
    for (name, terms) in all {
      let result = try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, mask: mask, terms: terms, kernel: .tiled(.default),
        threads: 2)
      #expect(result.workspaceBytes == workspace, "\(name): \(result.workspaceBytes) bytes")
      // The band holds T·W of the T² pairs: far fewer than all the tiles.
      let tile = TiledAttention.tile(
        queries: t, keys: t, headDim: 16, batchCount: 2, window: window)
      let allTiles = 2 * ((t + tile.rows - 1) / tile.rows) * ((t + tile.keys - 1) / tile.keys)
      #expect(
        (result.tilesComputed ?? .max) * 4 < allTiles,
        "\(name): \(result.tilesComputed ?? -1) tiles")
      let reference = try ReferenceAttention(
        queries: q, keys: k, values: v, mask: mask, terms: terms)
      let checks = ForwardChecks(
        reference: reference, dropout: nil,
        sampledRows: RowSample.rows(shape: reference.shape, seed: 3, count: 24)
      ).run(result: result, preDropout: nil)
      for check in checks { #expect(check.passed, "\(name): \(check.detail)") }
    }
  }

  @Test("a fully masked row is zero with a sink; a sink far above the scores takes the row")
  func sinkEdges() throws {
    let q = try Tensor.randomNormal(shape: [1, 2, 3, 4], seed: 3, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: [1, 2, 5, 4], seed: 3, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: [1, 2, 5, 4], seed: 3, stream: RandomStream.values)
    var keep = try Tensor(shape: [1, 1, 3, 5])
    for j in 0..<5 { keep[0, 0, 0, j] = 0 }  // row 0: every key masked
    for index in 5..<15 { keep.scalars[index] = 1 }
    for kernel: Attention.Kernel in [.materialized, .tiled(.default)] {
      let result = try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, mask: AttentionMask(keep: keep),
        terms: ScoreTerms(sinks: [0, 80]), kernel: kernel, needWeights: kernel == .materialized)
      for h in 0..<2 {
        for c in 0..<4 { #expect(result.output[0, h, 0, c] == 0, "\(kernel.name): masked row") }
      }
      // Head 1's sink (80) dwarfs scores of size ~3: its weights are e^(s − 80), below 1e-30.
      for i in 1..<3 {
        for c in 0..<4 { #expect(abs(result.output[0, 1, i, c]) < 1e-30) }
      }
    }
  }

  @Test("terms that do not fit the heads are errors naming the count")
  func shapeErrors() throws {
    let q = try Tensor.randomNormal(shape: [1, 4, 3, 4], seed: 3, stream: RandomStream.queries)
    #expect(throws: AttentionError.self) {
      try Attention.scaledDotProduct(
        queries: q, keys: q, values: q, terms: ScoreTerms(sinks: [1, 2]))
    }
    #expect(throws: AttentionError.self) {
      try Attention.scaledDotProduct(
        queries: q, keys: q, values: q, terms: ScoreTerms(positionBiases: [.alibi(slopes: [1])]))
    }
    #expect(throws: AttentionError.self) {
      try Attention.scaledDotProduct(queries: q, keys: q, values: q, terms: ScoreTerms(softcap: 0))
    }
    #expect(throws: AttentionError.self) {
      try Attention.scaledDotProduct(
        queries: q, keys: q, values: q,
        terms: ScoreTerms(
          positionBiases: [
            .t5(
              table: try Tensor(shape: [32, 3]), maxDistance: 128, bidirectional: true)
          ]))
    }
  }
}
