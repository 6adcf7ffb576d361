import AttentionVerification
import Foundation
import Testing
import _TestSupport

@testable import AttentionKit

/// The score terms' gradients (`Attention.backward(terms:)`): every kernel against the float64
/// reference backward within `GradientBounds` (its comment derives them, the terms' share
/// included), the reference against finite differences of its own float64 forward — for `dQ`
/// through a soft-cap, for each sink and for T5 table entries — results bit-identical for any
/// thread count, and bounds that a wrong gradient fails.
///
/// Problems: B 2, H 4 on Hkv 2 (grouped), Tq 19, Tk 23, D 16, Dv 8, random normal inputs.
@Suite("Score terms: backward")
struct ScoreTermsBackwardTests {
  struct Case: Sendable, CustomTestStringConvertible {
    var name: String
    var terms: @Sendable (Tensor) -> ScoreTerms
    var mask: AttentionMask = .none
    var dropout: Double = 0
    var testDescription: String { name }
  }

  static let heads = 4
  static let sinks: [Float] = [0.5, -1, 2, 0]

  static func t5Table(buckets: Int, seed: UInt64) -> Tensor {
    try! Tensor.randomNormal(shape: [buckets, heads], seed: seed, stream: 9)
  }

  /// A float mask whose row 3 is fully masked (−∞), the others random finite shifts.
  static let fullyMaskedRow: AttentionMask = {
    var bias = (try? Tensor.randomNormal(shape: [1, heads, 19, 23], seed: 5, stream: 8))!
    for h in 0..<heads {
      for j in 0..<23 { bias.scalars[(h * 19 + 3) * 23 + j] = -.infinity }
    }
    return .bias(bias)
  }()

  static let cases: [Case] = [
    Case(name: "soft-cap 2", terms: { _ in ScoreTerms(softcap: 2) }),
    Case(
      name: "soft-cap 1.5 + window 5", terms: { _ in ScoreTerms(softcap: 1.5) },
      mask: AttentionMask(isCausal: true, window: 5)),
    Case(
      name: "ALiBi + causal bottom-right",
      terms: { _ in
        ScoreTerms(positionBiases: [.alibi(slopes: PositionBias.bloomSlopes(heads: heads))])
      }, mask: AttentionMask(isCausal: true, causalAlignment: .bottomRight)),
    Case(
      name: "T5 bidirectional",
      terms: { _ in
        ScoreTerms(positionBiases: [
          .t5(table: t5Table(buckets: 16, seed: 1), maxDistance: 12, bidirectional: true)
        ])
      }),
    Case(
      name: "T5 causal + ALiBi",
      terms: { _ in
        ScoreTerms(positionBiases: [
          .t5(table: t5Table(buckets: 8, seed: 2), maxDistance: 9, bidirectional: false),
          .alibi(slopes: [0.5, 0.25, 0.125, 1]),
        ])
      }, mask: .causal),
    Case(name: "sinks", terms: { _ in ScoreTerms(sinks: sinks) }),
    Case(
      name: "sinks + a fully masked row", terms: { _ in ScoreTerms(sinks: sinks) },
      mask: fullyMaskedRow),
    Case(
      name: "everything + dropout",
      terms: { _ in
        ScoreTerms(
          softcap: 3,
          positionBiases: [
            .t5(table: t5Table(buckets: 32, seed: 3), maxDistance: 20, bidirectional: true)
          ], sinks: sinks)
      }, mask: fullyMaskedRow, dropout: 0.2),
    Case(name: "relative positions M 4", terms: { _ in ScoreTerms(relativePosition: shaw(4)) }),
    Case(
      name: "relative positions M 30 (wider than the sequence) + soft-cap + causal",
      terms: { _ in ScoreTerms(softcap: 2, relativePosition: shaw(30)) }, mask: .causal),
    Case(
      name: "relative positions M 3 + sinks + T5 + dropout",
      terms: { _ in
        ScoreTerms(
          positionBiases: [
            .t5(table: t5Table(buckets: 8, seed: 4), maxDistance: 9, bidirectional: false)
          ], sinks: sinks, relativePosition: shaw(3))
      }, mask: fullyMaskedRow, dropout: 0.1),
  ]

  /// The notebook's relative-position term with `E` `[2M + 1, 16]`.
  static func shaw(_ m: Int) -> RelativePositionBias {
    try! RelativePositionBias(
      embeddings: Tensor.randomNormal(shape: [2 * m + 1, 16], seed: UInt64(m), stream: 10),
      maxDistance: m)
  }

  static let kernels: [Attention.Kernel] = [
    .materialized, .tiled(TiledAttention.Configuration(queryBlock: 8, keyBlock: 16)), .automatic,
  ]

  struct Inputs {
    var q, k, v, dO: Tensor
  }

  static func inputs(seed: UInt64 = 11) throws -> Inputs {
    Inputs(
      q: try Tensor.randomNormal(shape: [2, heads, 19, 16], seed: seed, stream: 1),
      k: try Tensor.randomNormal(shape: [2, 2, 23, 16], seed: seed, stream: 2),
      v: try Tensor.randomNormal(shape: [2, 2, 23, 8], seed: seed, stream: 3),
      dO: try Tensor.randomNormal(shape: [2, heads, 19, 8], seed: seed, stream: 4))
  }

  static func reference(_ c: Case, _ x: Inputs) throws -> ReferenceGradients {
    try ReferenceGradients(
      queries: x.q, keys: x.k, values: x.v, gradOutput: x.dO, mask: c.mask,
      dropout: c.dropout > 0 ? try Dropout(probability: c.dropout, seed: 7) : nil,
      terms: c.terms(x.q), needBiasGradient: c.mask.bias != nil)
  }

  static func run(_ c: Case, _ x: Inputs, kernel: Attention.Kernel, threads: Int = 2) throws
    -> AttentionGradients
  {
    try Attention.backward(
      queries: x.q, keys: x.k, values: x.v, gradOutput: x.dO, mask: c.mask,
      dropout: c.dropout > 0 ? try Dropout(probability: c.dropout, seed: 7) : nil,
      terms: c.terms(x.q), kernel: kernel, needBiasGradient: c.mask.bias != nil,
      threads: threads)
  }

  /// Every gradient of `g` against `r`'s values within its bounds.
  static func compare(_ g: AttentionGradients, _ r: ReferenceGradients, _ label: String) {
    let b = r.bounds
    expectClose(g.dQ.scalars, r.dQ, shape: g.dQ.shape, tolerance: { b.dQ[$0] }, "\(label) dQ")
    expectClose(g.dK.scalars, r.dK, shape: g.dK.shape, tolerance: { b.dK[$0] }, "\(label) dK")
    expectClose(g.dV.scalars, r.dV, shape: g.dV.shape, tolerance: { b.dV[$0] }, "\(label) dV")
    if let dBias = r.dBias, let bounds = b.dBias {
      #expect(g.dBias != nil, "\(label): dBias missing")
      if let observed = g.dBias {
        expectClose(
          observed.scalars, dBias, shape: observed.shape, tolerance: { bounds[$0] },
          "\(label) dBias")
      }
    }
    #expect((g.dSinks == nil) == (r.dSinks == nil), "\(label): dSinks presence")
    if let expected = r.dSinks, let observed = g.dSinks, let bounds = b.dSinks {
      expectClose(
        observed.scalars, expected, shape: observed.shape, tolerance: { bounds[$0] },
        "\(label) dSinks")
    }
    #expect(
      (g.dRelativeEmbeddings == nil) == (r.dRelativeEmbeddings == nil), "\(label): dE presence")
    if let expected = r.dRelativeEmbeddings, let observed = g.dRelativeEmbeddings,
      let bounds = b.dRelativeEmbeddings
    {
      expectClose(
        observed.scalars, expected, shape: observed.shape, tolerance: { bounds[$0] },
        "\(label) dE")
    }
    #expect(g.dT5Tables.count == r.dT5Tables.count, "\(label): T5 gradients")
    for (k, (observed, expected)) in zip(g.dT5Tables, r.dT5Tables).enumerated() {
      expectClose(
        observed.scalars, expected, shape: observed.shape,
        tolerance: { b.dT5Tables[k][$0] }, "\(label) dT5[\(k)]")
    }
  }

  @Test("Every kernel matches the float64 reference within its bounds", arguments: cases)
  func kernelsMatchReference(c: Case) throws {
    let x = try Self.inputs()
    let r = try Self.reference(c, x)
    for kernel in Self.kernels {
      Self.compare(try Self.run(c, x, kernel: kernel), r, "\(c.name), \(kernel.name)")
    }
    Self.compare(try Self.run(c, x, kernel: .reference), r, "\(c.name), reference")
  }

  @Test("The tiled kernel's gradients are bit-identical for 1 and 3 threads", arguments: cases)
  func threadIndependence(c: Case) throws {
    let x = try Self.inputs(seed: 12)
    for kernel in Self.kernels {
      let one = try Self.run(c, x, kernel: kernel, threads: 1)
      let three = try Self.run(c, x, kernel: kernel, threads: 3)
      #expect(one.dQ.scalars == three.dQ.scalars, "\(c.name) \(kernel.name) dQ")
      #expect(one.dK.scalars == three.dK.scalars, "\(c.name) \(kernel.name) dK")
      #expect(one.dSinks?.scalars == three.dSinks?.scalars, "\(c.name) \(kernel.name) dSinks")
      #expect(
        one.dRelativeEmbeddings?.scalars == three.dRelativeEmbeddings?.scalars,
        "\(c.name) \(kernel.name) dE")
      #expect(
        one.dT5Tables.map(\.scalars) == three.dT5Tables.map(\.scalars),
        "\(c.name) \(kernel.name) dT5")
    }
  }

  /// Central differences with `h = 10⁻⁶` agree with the float64 analytic gradients to
  /// `10⁻⁶·(1 + |g|)` (truncation `O(h²)`, cancellation `ε·|f|/h ≈ 10⁻¹⁰`).
  @Test("The reference's term gradients match finite differences", arguments: cases)
  func finiteDifferences(c: Case) throws {
    let x = try Self.inputs(seed: 13)
    let r = try Self.reference(c, x)
    func agree(_ analytic: Double, _ estimate: Double, _ what: String) {
      #expect(
        abs(analytic - estimate) <= 1e-6 * (1 + abs(estimate)),
        "\(c.name) \(what): analytic \(analytic), finite difference \(estimate)")
    }
    for index in [0, 37, 311, 1000] {
      agree(r.dQ[index], r.finiteDifference(.queries, index: index), "dQ[\(index)]")
      agree(r.dK[index], r.finiteDifference(.keys, index: index), "dK[\(index)]")
    }
    if let dSinks = r.dSinks {
      for h in 0..<Self.heads {
        agree(dSinks[h], r.finiteDifferenceOfSink(head: h), "dSinks[\(h)]")
      }
    }
    if let dE = r.dRelativeEmbeddings {
      for index in [0, 17, dE.count / 2, dE.count - 1] {
        agree(dE[index], r.finiteDifferenceOfRelativeEmbedding(index: index), "dE[\(index)]")
      }
    }
    for (term, table) in r.dT5Tables.enumerated() {
      // The entries every head reads most and least.
      for entry in [0, 1, 5, table.count - 1] {
        agree(table[entry], r.finiteDifferenceOfT5(term: term, entry: entry), "dT5[\(entry)]")
      }
    }
  }

  /// The bounds are tight enough to refuse near misses: the gradients of the same problem
  /// without the soft-cap's factor, with the sinks off by 1 %, or with T5's sums shifted by one
  /// distance.
  @Test("Wrong term gradients fail the bounds")
  func plantedBugsFail() throws {
    let x = try Self.inputs()
    let capped = try Self.reference(Self.cases[0], x)
    let uncapped = try Self.run(
      Case(name: "no cap", terms: { _ in ScoreTerms() }), x, kernel: .materialized)
    let ratio = zip(uncapped.dQ.scalars, zip(capped.dQ, capped.bounds.dQ)).map {
      abs(Double($0) - $1.0) / $1.1
    }.max()!
    #expect(ratio > 10, "dQ without the soft-cap's factor: worst error/bound \(ratio)")

    let withSinks = try Self.reference(Self.cases[5], x)
    let sinks = withSinks.dSinks!
    let sinkRatio = (0..<Self.heads).map {
      abs(0.01 * sinks[$0]) / withSinks.bounds.dSinks![$0]
    }.max()!
    #expect(sinkRatio > 10, "dSinks off by 1 %: worst error/bound \(sinkRatio)")

    let t5 = try Self.reference(Self.cases[3], x)
    let table = t5.dT5Tables[0]
    let shifted = (0..<table.count).map { table[($0 + Self.heads) % table.count] }
    let t5Ratio = zip(shifted, zip(table, t5.bounds.dT5Tables[0])).map {
      abs($0 - $1.0) / $1.1
    }.max()!
    #expect(t5Ratio > 10, "dT5 shifted by one bucket: worst error/bound \(t5Ratio)")
  }

  /// numpy's float64 gradients (`make_score_terms_fixtures.py`, cross-checked with torch's
  /// float64 autograd) against every kernel, within the bounds our float64 reference derives
  /// on the same inputs (numpy's rounding, ~10⁻¹⁵, is far below them); and our reference itself
  /// against numpy to `10⁻¹⁰` of each array's largest magnitude.
  @Test(
    "Every kernel matches numpy's float64 gradients on the fixtures",
    arguments: try ScoreTermsFixtures.cases())
  func fixtures(spec: ScoreTermsCase) throws {
    let c = try LoadedScoreTermsCase(spec)
    let terms = c.scoreTerms
    let needBias = c.mask.bias != nil
    let r = try ReferenceGradients(
      queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOut, mask: c.mask,
      scale: c.scale, terms: terms, needBiasGradient: needBias)
    func nearNumpy(_ ours: [Double], _ numpy: [Double], _ what: String) {
      let largest = numpy.map(abs).max() ?? 0
      let worst = zip(ours, numpy).map { abs($0 - $1) }.max() ?? 0
      #expect(
        ours.count == numpy.count && worst <= 1e-10 * max(largest, 1e-300),
        "\(c.name) reference \(what): worst |ours − numpy| \(worst), largest \(largest)")
    }
    nearNumpy(r.dQ, c.expectedDQ, "dQ")
    nearNumpy(r.dK, c.expectedDK, "dK")
    nearNumpy(r.dV, c.expectedDV, "dV")
    if let expected = c.expectedDSinks { nearNumpy(r.dSinks ?? [], expected, "dSinks") }
    if let expected = c.expectedDT5Table { nearNumpy(r.dT5Tables.first ?? [], expected, "dT5") }
    if let expected = c.expectedDBias { nearNumpy(r.dBias ?? [], expected, "dBias") }
    let b = r.bounds
    for kernel in Self.kernels {
      let g = try Attention.backward(
        queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOut, mask: c.mask,
        scale: c.scale, terms: terms, kernel: kernel, needBiasGradient: needBias, threads: 2)
      let label = "\(c.name), \(kernel.name)"
      expectClose(
        g.dQ.scalars, c.expectedDQ, shape: g.dQ.shape, tolerance: { b.dQ[$0] }, "\(label) dQ")
      expectClose(
        g.dK.scalars, c.expectedDK, shape: g.dK.shape, tolerance: { b.dK[$0] }, "\(label) dK")
      expectClose(
        g.dV.scalars, c.expectedDV, shape: g.dV.shape, tolerance: { b.dV[$0] }, "\(label) dV")
      if let expected = c.expectedDSinks, let bounds = b.dSinks {
        expectClose(
          g.dSinks?.scalars ?? [], expected, shape: [expected.count], tolerance: { bounds[$0] },
          "\(label) dSinks")
      }
      if let expected = c.expectedDT5Table, let bounds = b.dT5Tables.first {
        expectClose(
          g.dT5Tables.first?.scalars ?? [], expected, shape: [expected.count],
          tolerance: { bounds[$0] }, "\(label) dT5")
      }
      if let expected = c.expectedDBias, let bounds = b.dBias {
        expectClose(
          g.dBias?.scalars ?? [], expected, shape: [expected.count], tolerance: { bounds[$0] },
          "\(label) dBias")
      }
    }
  }

}
