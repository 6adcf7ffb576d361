import Foundation
import Testing
import _TestSupport

@testable import AttentionKit
@testable import AttentionVerification

/// `check(output:weights:against:rows:rounding:)` is sound: it never refuses a forward result
/// within float32 rounding of the exact one, on a randomized corpus of 260 problems
/// (`Corpus.forward`: negative, tiny and large scales, rows peaked enough that true weights fall
/// below float32's smallest normal number, `D = 1`, `Dv ≠ D`, grouped-query heads, keep and
/// bias masks with `−∞`, fully masked rows, both causal alignments with `Tq < Tk` and `Tq > Tk`,
/// windows, `Tk = 1`, `Tq = 1`, dropout).
///
/// Tolerances: none of the test's own. Each element is held to the library's bound
/// (`ReferenceAttention.row`: the score error `δ_j = γ_{D+2}·|scale|·Σ|q·k| + γ₂·|s_j|` through the
/// softmax, `ρ = 2·max δ + γ_{Tk+8}`, weights within `w·ρ + λ`, outputs within
/// `Σ_j (w_j·(ρ + γ_Tk) + λ)·|v_j|`, the floor `λ = 2⁻¹²⁶` only where `w_j > 0`), and the test
/// asserts the worst `|error| / bound ≤ 1` over every row of every problem. The candidates are
/// AttentionKit's materialized kernel (output and weights), its tiled kernel with the default
/// blocks and with 4 × 16 blocks (so rows of more than 16 keys go through the online softmax's
/// rescaling), the textbook algorithm in plain float32 loops (`exp` then a division, subnormals
/// kept — not AttentionKit's arithmetic, as a result computed elsewhere is not), and the float64
/// reference itself rounded once to float32 — a result as close to exact as float32 can hold,
/// which any sound bound must accept.
@Suite("Forward checks are sound")
struct ForwardSoundnessTests {
  enum Candidate: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case materialized, tiledDefault, tiledSmall, naiveFloat32, roundedReference

    var testDescription: String {
      switch self {
      case .materialized: return "materialized kernel"
      case .tiledDefault: return "tiled kernel, default blocks"
      case .tiledSmall: return "tiled kernel, 4 × 16 blocks"
      case .naiveFloat32: return "plain float32 loops, exp and divide, gradual underflow"
      case .roundedReference: return "float64 reference rounded to float32"
      }
    }

    /// The candidate's output and, when it has them, weights (after dropout).
    func compute(_ problem: AttentionProblem) throws -> (output: Tensor, weights: Tensor?) {
      let kernel: Attention.Kernel
      switch self {
      case .materialized: kernel = .materialized
      case .tiledDefault: kernel = .tiled(.default)
      case .tiledSmall: kernel = .tiled(TiledAttention.Configuration(queryBlock: 4, keyBlock: 16))
      case .naiveFloat32: return try ForwardSoundnessTests.naiveFloat32(problem)
      case .roundedReference: return try ForwardSoundnessTests.roundedReference(problem)
      }
      let result = try Attention.scaledDotProduct(
        queries: problem.queries, keys: problem.keys, values: problem.values, mask: problem.mask,
        scale: problem.scale, dropout: problem.dropout, kernel: kernel,
        needWeights: kernel == .materialized)
      return (result.output, result.weights)
    }
  }

  /// The textbook algorithm in plain float32 loops, as PyTorch's math backend computes it: scores
  /// `scale·Σ_c q_c·k_jc`, the mask applied (bias added, `−∞` where masked), `e_j = exp(s_j − m)`
  /// with `Foundation.exp` (results below float32's smallest normal number kept as subnormals,
  /// not flushed), `w_j = e_j / Σ_j e_j`, dropout's `w_j·1/(1 − p)`, `o_c = Σ_j w_j·v_jc`.
  static func naiveFloat32(_ problem: AttentionProblem) throws -> (Tensor, Tensor) {
    let shape = try problem.shape()
    let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
    let mask = try ResolvedMask(
      problem.mask, batchShape: shape.batchShape, queries: tq, keys: tk)
    let scale = shape.resolvedScale(problem.scale)
    let (q, k, v) = (problem.queries.scalars, problem.keys.scalars, problem.values.scalars)
    var output = [Float](repeating: 0, count: shape.batchCount * tq * dv)
    var weights = [Float](repeating: 0, count: shape.batchCount * tq * tk)
    for b in 0..<shape.batchCount {
      let kv = shape.keyRowOffset(b)
      for i in 0..<tq {
        let row = b * tq + i
        var s = [Float](repeating: 0, count: tk)
        for j in 0..<tk {
          var dot: Float = 0
          for c in 0..<d { dot += q[row * d + c] * k[(kv + j) * d + c] }
          s[j] = d == 0 ? 0 : scale * dot
        }
        s.withUnsafeMutableBufferPointer {
          mask.apply(to: $0.baseAddress!, batch: b, query: i, firstKey: 0, count: tk)
        }
        let m = s.max() ?? -.infinity
        guard m > -.infinity else { continue }
        let e = s.map { Foundation.exp($0 - m) }
        let sum = e.reduce(0, +)
        for j in 0..<tk {
          var w = e[j] / sum
          if let dropout = problem.dropout {
            w = dropout.keeps(row: row, key: j) ? w * dropout.keptScale : 0
          }
          weights[row * tk + j] = w
          for c in 0..<dv { output[row * dv + c] += w * v[(kv + j) * dv + c] }
        }
      }
    }
    return (
      try Tensor(shape: shape.outputShape, scalars: output),
      try Tensor(shape: shape.weightsShape, scalars: weights)
    )
  }

  /// Every row of `ReferenceAttention`, each value rounded once to float32.
  static func roundedReference(_ problem: AttentionProblem) throws -> (Tensor, Tensor) {
    let reference = try problem.reference()
    let shape = reference.shape
    var output: [Float] = []
    var weights: [Float] = []
    for b in 0..<shape.batchCount {
      for i in 0..<shape.queries {
        let row = reference.row(batch: b, query: i)
        output += row.output.map { Float($0) }
        weights += row.weights.map { Float($0) }
      }
    }
    return (
      try Tensor(shape: shape.outputShape, scalars: output),
      try Tensor(shape: shape.weightsShape, scalars: weights)
    )
  }

  @Test("Every correct result of the corpus passes, on every row", arguments: Candidate.allCases)
  func corpusPasses(candidate: Candidate) throws {
    var worst = (ratio: 0.0, place: "")
    var failures: [String] = []
    for spec in Corpus.forward {
      let problem = try spec.problem()
      let (output, weights) = try candidate.compute(problem)
      let checks = try check(output: output, weights: weights, against: problem, rows: .all)
      for check in checks {
        if let m = check.measurement, m.worstRatio > worst.ratio {
          worst = (m.worstRatio, "\(m.tensor)\(m.worstAt ?? []) of \(spec)")
        }
        if !check.passed { failures.append("\(spec): \(check.name) \(check.detail)") }
      }
    }
    #expect(
      failures.isEmpty && worst.ratio <= 1,
      """
      \(candidate.testDescription): worst error / bound \(worst.ratio) at \(worst.place) over \
      \(Corpus.forward.count) problems; \(failures.count) refused: \(failures.prefix(4))
      """)
    // The candidates are not bit-identical to the reference: the bounds were measured against.
    #expect(worst.ratio > 0, "\(candidate.testDescription): every element matched exactly")
  }

  /// What the corpus claims to cover, counted on the problems themselves: true weights below
  /// float32's smallest normal number (which a kernel may flush to 0), fully masked rows (by the
  /// keep mask, the bias or the causal alignment), and the scales and shapes of the categories.
  @Test("The corpus exercises what it claims to")
  func coverage() throws {
    var tinyWeights = 0
    var maskedRows = 0
    var shapes = Set<String>()
    for spec in Corpus.forward {
      let reference = try spec.problem().reference()
      for b in 0..<reference.shape.batchCount {
        for i in 0..<spec.tq {
          if reference.isFullyMasked(batch: b, query: i) { maskedRows += 1 }
          let row = reference.row(batch: b, query: i)
          tinyWeights +=
            row.weights.filter { $0 > 0 && $0 < Double(Float.leastNormalMagnitude) }
            .count
        }
      }
      if let scale = spec.scale, scale < 0 { shapes.insert("negative scale") }
      if let scale = spec.scale, abs(scale) <= 1e-6 { shapes.insert("tiny scale") }
      if spec.d == 1 { shapes.insert("D = 1") }
      if spec.dv != spec.d { shapes.insert("Dv ≠ D") }
      if spec.kvHeads < spec.heads { shapes.insert("GQA \(spec.heads):\(spec.kvHeads)") }
      if spec.tk == 1 { shapes.insert("Tk = 1") }
      if spec.window != nil { shapes.insert("window") }
      if let causal = spec.causal, spec.tq != spec.tk {
        shapes.insert("\(causal.rawValue) Tq \(spec.tq < spec.tk ? "<" : ">") Tk")
      }
    }
    #expect(Corpus.forward.count >= 200)
    #expect(tinyWeights > 0, "no true weight below float32's smallest normal number")
    #expect(maskedRows > 0, "no fully masked row")
    let expected: Set = [
      "negative scale", "tiny scale", "D = 1", "Dv ≠ D", "GQA 4:2", "GQA 4:1", "Tk = 1", "window",
      "top-left Tq < Tk", "top-left Tq > Tk", "bottom-right Tq < Tk", "bottom-right Tq > Tk",
    ]
    #expect(shapes == expected, "missing \(expected.subtracting(shapes).sorted())")
  }
}
