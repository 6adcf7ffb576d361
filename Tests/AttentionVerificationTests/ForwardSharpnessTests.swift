import AttentionKit
import Foundation
import Testing
import _TestSupport

@testable import AttentionVerification

/// `check(output:weights:against:rows:rounding:)` is sharp: results with planted bugs fail it, and
/// its report points at a place the bug changed.
///
/// Tolerances: none of the test's own; the verdicts are the library's (`|error| / bound ≤ 1`,
/// bounds of `ReferenceAttention.row`). Bugs that change the problem — the scale left out (1
/// instead of `1/√D`), the mask ignored, the keep mask transposed, the other causal alignment,
/// a negative scale's sign dropped — are computed by AttentionKit's materialized kernel on the
/// wrong problem and checked against the right one: the output and the weights must both fail,
/// and for the mask bugs the worst element must be where the two problems' masks differ. Bugs in
/// the numbers — one output or weight element moved by 8 bounds, two query rows swapped — are
/// planted in the tiled kernel's correct result: the element must be reported with a ratio of 8
/// (to the float32 rounding of the planted value), the swapped rows must be where the worst
/// element is. The same element moved by half its bound must pass: the bounds are not loose by
/// more than 2×, and a correct kernel's elements stay far below them.
@Suite("Forward checks are sharp")
struct ForwardSharpnessTests {
  /// Several shapes: plain, grouped-query with `Dv ≠ D`, long rows, `Tq > Tk`, decode.
  static let shapes: [ProblemSpec] = [
    ProblemSpec(category: "plain", seed: 11, tq: 8, tk: 8, d: 16, dv: 16),
    ProblemSpec(
      category: "GQA 4:2, Dv ≠ D", seed: 12, batch: 2, heads: 4, kvHeads: 2, tq: 12, tk: 12,
      d: 8, dv: 5),
    ProblemSpec(
      category: "GQA 2:1, Tq < Tk", seed: 13, heads: 2, kvHeads: 1, tq: 5, tk: 19, d: 32, dv: 32),
    ProblemSpec(category: "Tq > Tk", seed: 14, batch: 2, tq: 17, tk: 6, d: 4, dv: 4),
    ProblemSpec(
      category: "decode", seed: 15, heads: 2, kvHeads: 1, tq: 1, tk: 33, d: 64, dv: 16),
  ]

  /// Whether query `i` of flat batch `b` sees key `j` in the reference's problem (a finite score).
  static func visible(_ reference: ReferenceAttention, _ b: Int, _ i: Int, _ j: Int) -> Bool {
    reference.score(batch: b, query: i, key: j).score > -.infinity
  }

  /// The materialized kernel's output and weights for `wrong`, checked against `right` on every
  /// row: both must fail. Returns the two measurements.
  static func expectFails(
    _ wrong: AttentionProblem, against right: AttentionProblem, _ label: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws -> (output: ErrorMeasurement, weights: ErrorMeasurement) {
    let result = try Attention.scaledDotProduct(
      queries: wrong.queries, keys: wrong.keys, values: wrong.values, mask: wrong.mask,
      scale: wrong.scale, kernel: .materialized, needWeights: true)
    let checks = try check(
      output: result.output, weights: result.weights, against: right, rows: .all)
    let output = try #require(checks.first { $0.name == "output_matches_reference" }?.measurement)
    let weights = try #require(checks.first { $0.name == "weights_match_reference" }?.measurement)
    #expect(
      !output.passed && !weights.passed,
      "\(label): output \(output.summary); weights \(weights.summary)",
      sourceLocation: sourceLocation)
    return (output, weights)
  }

  /// The flat batch (`b·H + h`) and query of a multi-index `[b, h, i, …]`.
  static func row(_ index: [Int], heads: Int) -> (batch: Int, query: Int) {
    (index[0] * heads + index[1], index[2])
  }

  /// For a mask bug: the worst output element and the worst weight are in rows where the bug
  /// changed which keys are visible (within such a row, renormalization moves every weight).
  static func expectPointsAtMask(
    _ m: (output: ErrorMeasurement, weights: ErrorMeasurement), right: AttentionProblem,
    wrong: AttentionProblem, _ label: String, sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let (r, w) = (try right.reference(), try wrong.reference())
    let heads = right.queries.shape[1]
    let tk = right.keys.shape[2]
    for measurement in [m.output, m.weights] {
      let at = try #require(measurement.worstAt, sourceLocation: sourceLocation)
      let (b, i) = row(at, heads: heads)
      #expect(
        (0..<tk).contains { visible(r, b, i, $0) != visible(w, b, i, $0) },
        "\(label): worst \(measurement.tensor) at \(at), a row whose keys the bug did not move",
        sourceLocation: sourceLocation)
    }
  }

  @Test("The scale left out (1 instead of 1/√D) fails", arguments: shapes)
  func scaleMissing(spec: ProblemSpec) throws {
    let right = try spec.problem()
    var wrong = right
    wrong.scale = 1
    let m = try Self.expectFails(wrong, against: right, "\(spec)")
    #expect(m.output.worstRatio > 8, "\(spec): output \(m.output.summary)")
  }

  @Test("A negative scale's sign dropped fails", arguments: shapes)
  func signDropped(spec: ProblemSpec) throws {
    var negative = spec
    negative.scale = -1 / Float(spec.d).squareRoot()
    let right = try negative.problem()
    var wrong = right
    wrong.scale = -negative.scale!
    let m = try Self.expectFails(wrong, against: right, "\(negative)")
    #expect(m.output.worstRatio > 8, "\(negative): output \(m.output.summary)")
  }

  @Test("An ignored keep mask fails, reported in a row it changed", arguments: shapes)
  func maskIgnored(spec: ProblemSpec) throws {
    var masked = spec
    masked.keep = .random
    let right = try masked.problem()
    var wrong = right
    wrong.mask = .none
    let m = try Self.expectFails(wrong, against: right, "\(masked)")
    try Self.expectPointsAtMask(m, right: right, wrong: wrong, "\(masked)")
  }

  @Test(
    "A transposed keep mask (Tq = Tk) fails, reported where it differs",
    arguments: shapes.filter { $0.tq > 1 })
  func maskTransposed(spec: ProblemSpec) throws {
    var square = spec
    (square.tk, square.keep) = (spec.tq, .broadcast)
    let right = try square.problem()
    let keep = try #require(right.mask.keep)
    let t = square.tq
    var transposed = keep.scalars
    for i in 0..<t {
      for j in 0..<t { transposed[j * t + i] = keep.scalars[i * t + j] }
    }
    try #require(transposed != keep.scalars, "\(square): the keep mask is symmetric")
    var wrong = right
    wrong.mask.keep = try Tensor(shape: [t, t], scalars: transposed)
    let m = try Self.expectFails(wrong, against: right, "\(square)")
    try Self.expectPointsAtMask(m, right: right, wrong: wrong, "\(square)")
  }

  @Test(
    "The other causal alignment (Tq ≠ Tk) fails, reported where they differ",
    arguments: shapes.filter { $0.tq != $0.tk })
  func causalAlignment(spec: ProblemSpec) throws {
    for (alignment, other) in [
      (CausalAlignment.bottomRight, CausalAlignment.topLeft), (.topLeft, .bottomRight),
    ] {
      var causal = spec
      causal.causal = alignment
      let right = try causal.problem()
      var wrong = right
      wrong.mask.causalAlignment = other
      let m = try Self.expectFails(wrong, against: right, "\(causal)")
      try Self.expectPointsAtMask(m, right: right, wrong: wrong, "\(causal)")
    }
  }

  /// The tiled kernel's (correct) output.
  static func tiledOutput(_ problem: AttentionProblem) throws -> Tensor {
    try Attention.scaledDotProduct(
      queries: problem.queries, keys: problem.keys, values: problem.values, mask: problem.mask,
      scale: problem.scale, kernel: .tiled(.default)
    ).output
  }

  @Test(
    "One output element off by 8 bounds fails there; off by half a bound passes", arguments: shapes)
  func outputElement(spec: ProblemSpec) throws {
    let problem = try spec.problem()
    let correct = try Self.tiledOutput(problem)
    let reference = try problem.reference()
    let dv = spec.dv
    // An element two thirds of the way through, moved up for even seeds and down for odd ones.
    let e = correct.count * 2 / 3
    let (rowIndex, c) = (e / dv, e % dv)
    let expected = reference.row(batch: rowIndex / spec.tq, query: rowIndex % spec.tq)
    let sign: Double = spec.seed % 2 == 0 ? 1 : -1
    for (multiple, fails) in [(8.0, true), (0.5, false)] {
      var planted = correct
      planted.scalars[e] = Float(
        expected.output[c] + sign * multiple * expected.outputBounds[c])
      let m = try #require(
        try check(output: planted, against: problem, rows: .all).first?.measurement)
      #expect(m.passed != fails, "\(spec), \(multiple) bounds: \(m.summary)")
      if fails {
        #expect(
          m.worstAt == Tensor.multiIndex(ofFlat: e, shape: correct.shape)
            && abs(m.worstRatio - multiple) < 0.5,
          "\(spec), 8 bounds at \(Tensor.multiIndex(ofFlat: e, shape: correct.shape)): \(m.summary)"
        )
      }
    }
  }

  @Test("One weight off by 8 bounds fails there; off by half a bound passes", arguments: shapes)
  func weightElement(spec: ProblemSpec) throws {
    let problem = try spec.problem()
    let result = try Attention.scaledDotProduct(
      queries: problem.queries, keys: problem.keys, values: problem.values, mask: problem.mask,
      scale: problem.scale, kernel: .materialized, needWeights: true)
    let weights = try #require(result.weights)
    let reference = try problem.reference()
    let tk = spec.tk
    let e = weights.count / 3 + 1
    let (rowIndex, j) = (e / tk, e % tk)
    let expected = reference.row(batch: rowIndex / spec.tq, query: rowIndex % spec.tq)
    let sign: Double = spec.seed % 2 == 0 ? -1 : 1
    for (multiple, fails) in [(8.0, true), (0.5, false)] {
      var planted = weights
      planted.scalars[e] = Float(expected.weights[j] + sign * multiple * expected.weightBounds[j])
      let checks = try check(
        output: result.output, weights: planted, against: problem, rows: .all)
      let m = try #require(checks.first { $0.name == "weights_match_reference" }?.measurement)
      #expect(m.passed != fails, "\(spec), \(multiple) bounds: \(m.summary)")
      if fails {
        #expect(
          m.worstAt == Tensor.multiIndex(ofFlat: e, shape: weights.shape)
            && abs(m.worstRatio - multiple) < 0.5,
          "\(spec), 8 bounds at \(Tensor.multiIndex(ofFlat: e, shape: weights.shape)): \(m.summary)"
        )
      }
    }
  }

  @Test("Two query rows swapped fail, reported in one of them", arguments: shapes)
  func rowsSwapped(spec: ProblemSpec) throws {
    let problem = try spec.problem()
    var swapped = try Self.tiledOutput(problem)
    let dv = spec.dv
    let rows = swapped.count / dv
    let (first, last) = (0, rows - 1)
    for c in 0..<dv {
      swapped.scalars.swapAt(first * dv + c, last * dv + c)
    }
    let m = try #require(
      try check(output: swapped, against: problem, rows: .all).first?.measurement)
    #expect(!m.passed, "\(spec), rows \(first) and \(last) swapped: \(m.summary)")
    let at = try #require(m.worstAt)
    let flat = (at[0] * spec.heads + at[1]) * spec.tq + at[2]
    #expect(
      [first, last].contains(flat), "\(spec), rows \(first) and \(last) swapped: \(m.summary)")
  }
}
