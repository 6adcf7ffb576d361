import AttentionVerification
import Foundation
import Testing
import _TestSupport

@testable import AttentionKit

/// The backward pass (`Attention.backward`) against the numpy references of
/// `Scripts/fixtures/make_backward_fixtures.py` (`Fixtures/backward`), and what its kernels promise
/// beyond the values: bit-identical tiled results for any thread count, zero gradients from fully
/// masked rows, derivatives that finite differences confirm, rows of `dS` that sum to zero, and a
/// 16,384-token backward without any `Tq·Tk` allocation.
///
/// Tolerances (`GradientBounds`, in the library beside `ReferenceGradients`): worst-case bounds in the manner of `ReferenceAttention.row`,
/// per element, with `u` the unit roundoff (`2⁻²⁴` for the float32 kernels, `2⁻⁵³` for the float64
/// reference against numpy) and `γₙ = n·u/(1 − n·u)`, built from the float64 reference's own
/// `P`, `dS` and the inputs:
/// 1. scores are off by `δ = γ_{D+1}·A + 4u·(S + B)` (`A = scale·max Σ_c |q_c·k_c|`, `S` the
///    largest |visible score|, `B` the largest |finite bias|), as in `AttentionTolerance`;
/// 2. a probability `P_ij` is off by `ρ_ij·P_ij`, `ρ_ij = 2δ(1 + 2δ) + γ_{Tk+8}
///    + u·(|ln P_ij| + 2(S + B + ln Tk) + 8) (+ 2u with dropout)`: the score error through the
///    softmax, the sum of `Tk` exponentials, and — for the tiled kernel, which recomputes
///    `P = exp(S − L)` — the rounding of `L = m + log ℓ` and of the exponent `S − L = ln P`;
/// 3. with `M_ij = Σ_c |dO_ic|·|v_jc|` (what `dP_ij = dO_i·v_j` sums), `z_ij = Z_ij/(1 − p)` and
///    `N_i = Σ_j P_ij·z_ij·M_ij` (which bounds `|Δ_i|`), `Δ_i` is off by at most
///    `N'_i = Σ_j (ρ_ij + γ_{Tk+Dv+2})·P_ij·z_ij·M_ij` (from `O` in the tiled kernel, from
///    `Σ_j P·dP` in the materialized one), and `dS_ij = P_ij(dP_ij − Δ_i)` by
///    `E_ij = P_ij·((ρ_ij + γ_{Dv+4})·z_ij·M_ij + (ρ_ij + 4u)·N_i + N'_i)`;
/// 4. each gradient is a sum of such terms: `dQ_ic` within
///    `scale·Σ_j (E_ij + γ_{Tk+2}|dS_ij|)|k_jc|`, `dK_jc` within
///    `scale·Σ_i (E_ij + γ_{G·Tq+2}|dS_ij|)|q_ic|` (over the `G` heads of a group), `dV_jc`
///    within `Σ_i (ρ_ij + γ_{G·Tq+2})·P_ij·z_ij·|dO_ic|`, `dBias_e` within `Σ (E_ij + γₙ|dS_ij|)`
///    over its `n` contributions;
/// 5. plus `10⁶·λ` (λ = `Float.leastNormalMagnitude`): `fastExp` flushes probabilities below λ to
///    zero, and such a probability times inputs below 10 summed over fewer than 10⁵ terms stays
///    below that.
/// These bounds are about 10⁻⁵ of the sum of |terms| of each element (10⁻⁴…10⁻² of the element
/// itself, whose terms cancel); the kernels stay below 1% of them. They are tight enough that
/// `L` shifted by 2·10⁻⁵, dropout's `1/(1 − p)` left out of `dP`, or `0.999·Δ` fail them; a
/// dropped key, a missing `Δ`, a wrong scale or a misplaced mask fails them by far.
@Suite("Attention backward")
struct BackwardTests {
  enum KernelChoice: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case materialized, tiledSmall, tiledDefault

    var kernel: Attention.Kernel {
      switch self {
      case .materialized: return .materialized
      case .tiledSmall: return .tiled(TiledAttention.Configuration(queryBlock: 8, keyBlock: 16))
      case .tiledDefault: return .automatic
      }
    }

    var testDescription: String {
      switch self {
      case .materialized: return "materialized"
      case .tiledSmall: return "tiled 8×16"
      case .tiledDefault: return "tiled default (automatic)"
      }
    }
  }

  static let fixtureCases: [BackwardCase] = (try? BackwardFixtures.cases()) ?? []

  static func problem(
    _ c: LoadedBackwardCase, needBiasGradient: Bool? = nil
  ) throws -> BackwardProblem {
    try BackwardProblem(
      queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOutput,
      mask: c.mask, scale: c.spec.scaleArgument,
      needBiasGradient: needBiasGradient ?? (c.mask.bias != nil))
  }

  static func run(
    _ c: LoadedBackwardCase, _ kernel: Attention.Kernel, dropout: Dropout?, threads: Int? = nil
  ) throws -> AttentionGradients {
    try Attention.backward(
      queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOutput,
      mask: c.mask, scale: c.spec.scaleArgument, dropout: dropout, kernel: kernel,
      needBiasGradient: c.mask.bias != nil, threads: threads)
  }

  /// Compares every gradient with `expected` (float64, flat) within `bounds`.
  static func compare(
    _ g: AttentionGradients, dQ: [Double], dK: [Double], dV: [Double], dBias: [Double]?,
    bounds: GradientBounds, _ label: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) {
    expectClose(
      g.dQ.scalars, dQ, shape: g.dQ.shape, tolerance: { bounds.dQ[$0] }, "\(label) dQ",
      sourceLocation: sourceLocation)
    expectClose(
      g.dK.scalars, dK, shape: g.dK.shape, tolerance: { bounds.dK[$0] }, "\(label) dK",
      sourceLocation: sourceLocation)
    expectClose(
      g.dV.scalars, dV, shape: g.dV.shape, tolerance: { bounds.dV[$0] }, "\(label) dV",
      sourceLocation: sourceLocation)
    #expect((g.dBias == nil) == (dBias == nil), "\(label): dBias presence")
    if let observed = g.dBias, let dBias, let tolerance = bounds.dBias {
      expectClose(
        observed.scalars, dBias, shape: observed.shape, tolerance: { tolerance[$0] },
        "\(label) dBias", sourceLocation: sourceLocation)
    }
  }

  // MARK: - The fixtures and the reference

  @Test("The manifest's cases are consistent with their files", arguments: fixtureCases)
  func manifestConsistency(spec: BackwardCase) throws {
    let c = try LoadedBackwardCase(spec)
    let shape = try AttentionShape(queries: c.queries, keys: c.keys, values: c.values)
    #expect(shape.groupSize == spec.groupSize && spec.heads == spec.q.shape[1])
    #expect(spec.scaleUsed == Double(shape.resolvedScale(spec.scaleArgument)), "\(spec.name)")
    #expect(c.gradOutput.shape == shape.outputShape)
    // Rows with every key masked: the reference's P row is zero exactly there, and so is dQ.
    let r = try ReferenceBackward.expand(Self.problem(c), dropout: .none).evaluate()
    let (tq, tk, d) = (spec.queries, spec.keys, spec.headDim)
    let zeroRows = (0..<(spec.batchCount * tq)).filter { row in
      r.probabilities[(row * tk)..<(row * tk + tk)].allSatisfy { $0 == 0 }
    }
    #expect(zeroRows.count == spec.fullyMaskedRows, "\(spec.name): zero rows \(zeroRows)")
    for row in zeroRows {
      #expect(c.expectedDQ[(row * d)..<(row * d + d)].allSatisfy { $0 == 0 }, "row \(row)")
    }
  }

  /// The reference kernel works in Double from the same float32 inputs as numpy, with the
  /// fixture's own dropout decisions: the two differ by float64 rounding only, so the bounds
  /// with `u = 2⁻⁵³` hold.
  @Test("The reference backward (float64, the fixture's Z) matches numpy", arguments: fixtureCases)
  func referenceMatchesNumpy(spec: BackwardCase) throws {
    let c = try LoadedBackwardCase(spec)
    let decisions: DropoutDecisions =
      c.dropoutKeep.map { .explicit(keep: $0, keptScale: 1 / (1 - spec.dropout!.p)) } ?? .none
    let problem = try Self.problem(c)
    let g: AttentionGradients
    if let keep = c.dropoutKeep {
      g = try Attention.referenceBackward(
        queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOutput,
        mask: c.mask, scale: spec.scaleArgument, dropoutKeep: keep,
        dropoutProbability: spec.dropout!.p, needBiasGradient: c.mask.bias != nil)
    } else {
      g = try Self.run(c, .reference, dropout: nil)
    }
    #expect(g.kernel == .reference)
    let expanded = try ReferenceBackward.expand(problem, dropout: decisions)
    let result = expanded.evaluate()
    expectClose(
      result.output, c.expectedOutput, shape: spec.gradOutput.shape,
      tolerance: { 1e-12 * (1 + abs(c.expectedOutput[$0])) }, "\(spec.name) output")
    // The Float gradients of the entry point are the Double ones rounded: compare the Double
    // ones with numpy, and the entry point's with them (half an ulp).
    let bounds = GradientBounds(expanded, result, problem: problem, rounding: .float64)
    let dBias = c.mask.bias == nil ? nil : try Self.reducedBias(result.dS, problem: problem)
    expectClose(
      result.dQ, c.expectedDQ, shape: spec.q.shape, tolerance: { bounds.dQ[$0] }, "\(spec.name) dQ")
    expectClose(
      result.dK, c.expectedDK, shape: spec.k.shape, tolerance: { bounds.dK[$0] }, "\(spec.name) dK")
    expectClose(
      result.dV, c.expectedDV, shape: spec.v.shape, tolerance: { bounds.dV[$0] }, "\(spec.name) dV")
    if let expected = c.expectedDBias, let dBias, let tolerance = bounds.dBias {
      expectClose(
        dBias, expected, shape: c.mask.bias!.shape, tolerance: { tolerance[$0] },
        "\(spec.name) dBias")
    }
    #expect(g.dQ.scalars == result.dQ.map { Float($0) })
    #expect(g.dK.scalars == result.dK.map { Float($0) })
    #expect(g.dV.scalars == result.dV.map { Float($0) })
    #expect(g.dBias?.scalars == dBias?.map { Float($0) })
  }

  /// `dS` summed into the bias's shape, in Double.
  static func reducedBias(_ dS: [Double], problem: BackwardProblem) throws -> [Double] {
    let bias = try #require(problem.resolved.bias)
    let (tq, tk, _, _) = problem.sizes
    var out = [Double](repeating: 0, count: problem.mask.bias!.count)
    for b in 0..<problem.shape.batchCount {
      for i in 0..<tq {
        for j in 0..<tk {
          out[bias.index(batch: b, row: i, column: j)] += dS[(b * tq + i) * tk + j]
        }
      }
    }
    return out
  }

  // MARK: - The float32 kernels

  /// Without dropout (or with p = 0, through `Dropout`'s code path), the float32 kernels against
  /// numpy directly.
  @Test(
    "Materialized and tiled gradients match numpy (no dropout, or p = 0)",
    arguments: fixtureCases.filter { ($0.dropout?.p ?? 0) == 0 }, KernelChoice.allCases)
  func fastKernelsMatchNumpy(spec: BackwardCase, choice: KernelChoice) throws {
    let c = try LoadedBackwardCase(spec)
    let dropout = try spec.dropout.map { _ in try Dropout(probability: 0, seed: 11) }
    let problem = try Self.problem(c)
    let expanded = try ReferenceBackward.expand(problem, dropout: .none)
    let bounds = GradientBounds(expanded, expanded.evaluate(), problem: problem, rounding: .float32)
    let g = try Self.run(c, choice.kernel, dropout: dropout)
    #expect(g.kernel.name == (choice == .materialized ? "materialized" : "tiled"))
    Self.compare(
      g, dQ: c.expectedDQ, dK: c.expectedDK, dV: c.expectedDV, dBias: c.expectedDBias,
      bounds: bounds, "\(spec.name) \(choice)")
  }

  /// With dropout p = 0.3 from `Dropout`'s counters, which numpy cannot reproduce: the float32
  /// kernels against the float64 reference kernel with the same `Dropout` (checked against numpy
  /// above with the fixtures' own decisions).
  @Test(
    "Materialized and tiled gradients match the reference with Dropout(p: 0.3)",
    arguments: fixtureCases, KernelChoice.allCases)
  func fastKernelsMatchReferenceWithDropout(spec: BackwardCase, choice: KernelChoice) throws {
    let c = try LoadedBackwardCase(spec)
    let dropout = try Dropout(probability: 0.3, seed: 2024)
    let problem = try Self.problem(c)
    let expanded = try ReferenceBackward.expand(problem, dropout: .counter(dropout))
    let r = expanded.evaluate()
    let bounds = GradientBounds(expanded, r, problem: problem, rounding: .float32)
    let g = try Self.run(c, choice.kernel, dropout: dropout)
    let dBias = c.mask.bias == nil ? nil : try Self.reducedBias(r.dS, problem: problem)
    Self.compare(
      g, dQ: r.dQ, dK: r.dK, dV: r.dV, dBias: dBias, bounds: bounds,
      "\(spec.name) \(choice) p 0.3")
    // Some weights were dropped and some kept, in every case.
    let kept = expanded.dropoutKept!.filter { $0 }.count
    #expect(kept > 0 && kept < expanded.dropoutKept!.count)
  }

  // MARK: - Determinism, masked rows, derivatives, invariants

  struct Synthetic: Sendable, CustomTestStringConvertible {
    var name: String
    var batch: [Int]
    var kvHeads: Int
    var tq: Int
    var tk: Int
    var biasShape: [Int]?
    var causal: CausalAlignment?
    var window: Int?
    var testDescription: String { name }
  }

  static let synthetic: [Synthetic] = [
    Synthetic(
      name: "GQA 4:1, bias [Tq, Tk] shared, causal bottom-right", batch: [2, 4], kvHeads: 1,
      tq: 70, tk: 90, biasShape: [70, 90], causal: .bottomRight),
    Synthetic(
      name: "bias [B, H, Tq, Tk], no causal mask", batch: [1, 2], kvHeads: 2, tq: 65, tk: 47,
      biasShape: [1, 2, 65, 47]),
    Synthetic(
      name: "key-padding bias [B, 1, 1, Tk], window 20", batch: [2, 2], kvHeads: 2, tq: 60,
      tk: 60, biasShape: [2, 1, 1, 60], causal: .topLeft, window: 20),
  ]

  static func inputs(_ s: Synthetic, seed: UInt64 = 5) throws -> LoadedBackwardCaseLike {
    let (d, dv) = (16, 24)
    let kvBatch = Array(s.batch.dropLast()) + [s.kvHeads]
    let q = try Tensor.randomNormal(shape: s.batch + [s.tq, d], seed: seed, stream: 1)
    let k = try Tensor.randomNormal(shape: kvBatch + [s.tk, d], seed: seed, stream: 2)
    let v = try Tensor.randomNormal(shape: kvBatch + [s.tk, dv], seed: seed, stream: 3)
    let dO = try Tensor.randomNormal(shape: s.batch + [s.tq, dv], seed: seed, stream: 4)
    var mask = AttentionMask(
      isCausal: s.causal != nil, causalAlignment: s.causal ?? .topLeft, window: s.window)
    if let shape = s.biasShape {
      var bias = try Tensor.randomNormal(shape: shape, seed: seed, stream: 5)
      bias.scalars[1] = -.infinity
      mask.bias = bias
    }
    return LoadedBackwardCaseLike(q: q, k: k, v: v, dO: dO, mask: mask)
  }

  struct LoadedBackwardCaseLike {
    var q, k, v, dO: Tensor
    var mask: AttentionMask
  }

  @Test(
    "Tiled and materialized gradients are bit-identical for 1, 2 and 3 threads",
    arguments: synthetic)
  func identicalAcrossThreads(s: Synthetic) throws {
    let x = try Self.inputs(s)
    let dropout = try Dropout(probability: 0.3, seed: 99)
    for kernel in [
      Attention.Kernel.tiled(TiledAttention.Configuration(queryBlock: 16, keyBlock: 32)),
      .automatic, .materialized,
    ] {
      var results: [AttentionGradients] = []
      for threads in [1, 2, 3] {
        results.append(
          try Attention.backward(
            queries: x.q, keys: x.k, values: x.v, gradOutput: x.dO, mask: x.mask,
            dropout: dropout, kernel: kernel, needBiasGradient: true, threads: threads))
      }
      for (threads, g) in zip([2, 3], results.dropFirst()) {
        let first = results[0]
        for (name, a, b) in [
          ("dQ", first.dQ, g.dQ), ("dK", first.dK, g.dK), ("dV", first.dV, g.dV),
          ("dBias", first.dBias!, g.dBias!),
        ] {
          let same = a.scalars.map(\.bitPattern) == b.scalars.map(\.bitPattern)
          #expect(same, "\(s.name) \(kernel.name): \(name) with \(threads) threads differs from 1")
        }
      }
    }
  }

  /// Rows whose every key is masked have `P = 0`: their `dQ` and `dBias` rows are exactly zero,
  /// and their `dO` rows take no part in `dK` and `dV` (replacing them by large values changes
  /// nothing, bit for bit).
  @Test(
    "Fully masked rows give zero gradients",
    arguments: [KernelChoice?.none] + KernelChoice.allCases.map { $0 })
  func fullyMaskedRows(choice: KernelChoice?) throws {
    let (tq, tk, d, dv) = (21, 18, 8, 8)
    let q = try Tensor.randomNormal(shape: [2, 2, tq, d], seed: 3, stream: 1)
    let k = try Tensor.randomNormal(shape: [2, 1, tk, d], seed: 3, stream: 2)
    let v = try Tensor.randomNormal(shape: [2, 1, tk, dv], seed: 3, stream: 3)
    var dO = try Tensor.randomNormal(shape: [2, 2, tq, dv], seed: 3, stream: 4)
    var keep = try Tensor.randomUniform(shape: [2, 1, tq, tk], seed: 3, stream: 5)
    keep.scalars = keep.scalars.map { $0 < 0.3 ? 0 : 1 }
    let deadRows = [4, 17]  // of every head
    for b in 0..<2 {
      for i in deadRows { for j in 0..<tk { keep[b, 0, i, j] = 0 } }
    }
    let bias = try Tensor.randomNormal(shape: [2, 2, tq, tk], seed: 3, stream: 6)
    let mask = AttentionMask(keep: keep, bias: bias)
    let kernel = choice?.kernel ?? .reference
    let dropout = try Dropout(probability: 0.2, seed: 4)
    func run(_ dO: Tensor) throws -> AttentionGradients {
      try Attention.backward(
        queries: q, keys: k, values: v, gradOutput: dO, mask: mask, dropout: dropout,
        kernel: kernel, needBiasGradient: true, threads: 2)
    }
    let g = try run(dO)
    for flat in 0..<4 {
      for i in deadRows {
        let dq = g.dQ.scalars[((flat * tq) + i) * d..<((flat * tq) + i + 1) * d]
        let db = g.dBias!.scalars[((flat * tq) + i) * tk..<((flat * tq) + i + 1) * tk]
        #expect(dq.allSatisfy { $0 == 0 }, "\(kernel.name): dQ row \(i) of head \(flat): \(dq)")
        #expect(db.allSatisfy { $0 == 0 }, "\(kernel.name): dBias row \(i) of head \(flat)")
      }
    }
    // Other rows do have gradients (the test would pass vacuously on an all-zero result).
    #expect(g.dQ.scalars.contains { $0 != 0 } && g.dBias!.scalars.contains { $0 != 0 })
    for flat in 0..<4 {
      for i in deadRows { for c in 0..<dv { dO.scalars[(flat * tq + i) * dv + c] = 1e4 } }
    }
    let changed = try run(dO)
    #expect(
      changed.dK.scalars.map(\.bitPattern) == g.dK.scalars.map(\.bitPattern), "\(kernel.name) dK")
    #expect(
      changed.dV.scalars.map(\.bitPattern) == g.dV.scalars.map(\.bitPattern), "\(kernel.name) dV")
  }

  /// Central differences `(f(x + h) − f(x − h))/2h` of `f = Σ dO∘O`, the reference forward in
  /// float64 (dropout decisions fixed), at a few entries of Q, K, V and the (expanded) bias. The
  /// truncation error is `h²/6·|f'''|` ≈ 10⁻¹⁰ and the rounding error `2⁻⁵³·|f|/h` ≈ 10⁻¹⁰ with
  /// `h = 10⁻⁵`; 10⁻⁶·max(1, |g|) is far above both and far below a wrong formula's error.
  @Test(
    "Finite differences of the float64 forward confirm the gradients",
    arguments: [
      "gqa_4to1_keep_bias", "dropout_p0p3", "causal_br_tq33_tk20", "bias_key_padding",
      "window5_br_tq12_tk30",
    ])
  func finiteDifferences(name: String) throws {
    let c = try LoadedBackwardCase(BackwardFixtures.backwardCase(named: name))
    let dropout = try Dropout(probability: 0.3, seed: 8)
    let base = try ReferenceBackward.expand(Self.problem(c), dropout: .counter(dropout))
    let r = base.evaluate()
    func loss(_ p: Backward64) -> Double {
      zip(p.evaluate().output, p.dO).reduce(0) { $0 + $1.0 * $1.1 }
    }
    let h = 1e-5
    var checked = 0
    func check(_ label: String, _ analytic: [Double], _ path: WritableKeyPath<Backward64, [Double]>)
    {
      let count = base[keyPath: path].count
      for e in stride(from: 1, to: count, by: max(1, count / 5)) {
        guard base[keyPath: path][e].isFinite else { continue }
        var plus = base
        var minus = base
        plus[keyPath: path][e] += h
        minus[keyPath: path][e] -= h
        let numeric = (loss(plus) - loss(minus)) / (2 * h)
        let allowed = 1e-6 * max(1, abs(analytic[e]))
        #expect(
          abs(numeric - analytic[e]) <= allowed,
          "\(name) \(label)[\(e)]: analytic \(analytic[e]), finite difference \(numeric)")
        checked += 1
      }
    }
    check("dQ", r.dQ, \.q)
    check("dK", r.dK, \.k)
    check("dV", r.dV, \.v)
    if base.bias != nil {
      // The expanded bias has one entry per score: its gradient is dS itself.
      check("dS", r.dS, \.biasOrEmpty)
    }
    #expect(checked >= 15)
    // The gradients are not all zero (a vacuous match).
    #expect(r.dQ.contains { abs($0) > 1e-3 } && r.dK.contains { abs($0) > 1e-3 })
  }

  /// `Σ_j dS_ij = Σ_j P_ij(dP_ij − Δ_i) = Δ_i − Δ_i = 0`: with a zero bias of the scores' shape,
  /// `dBias = dS`, and each of its rows must sum to 0 within the sum of its elements' bounds.
  @Test(
    "Every row of dS sums to zero",
    arguments: [KernelChoice?.none] + KernelChoice.allCases.map { $0 })
  func rowsOfDSSumToZero(choice: KernelChoice?) throws {
    let (tq, tk) = (37, 45)
    let x = try Self.inputs(
      Synthetic(name: "", batch: [1, 2], kvHeads: 1, tq: tq, tk: tk, causal: .bottomRight))
    var mask = x.mask
    mask.bias = try Tensor(shape: [1, 2, tq, tk])
    let dropout = try Dropout(probability: 0.3, seed: 12)
    let g = try Attention.backward(
      queries: x.q, keys: x.k, values: x.v, gradOutput: x.dO, mask: mask, dropout: dropout,
      kernel: choice?.kernel ?? .reference, needBiasGradient: true, threads: 2)
    let problem = try BackwardProblem(
      queries: x.q, keys: x.k, values: x.v, gradOutput: x.dO, mask: mask, scale: nil,
      needBiasGradient: true)
    let expanded = try ReferenceBackward.expand(problem, dropout: .counter(dropout))
    let bounds = GradientBounds(
      expanded, expanded.evaluate(), problem: problem, rounding: choice == nil ? .float64 : .float32
    )
    let dS = try #require(g.dBias).scalars
    var worst = 0.0
    for row in 0..<(2 * tq) {
      let sum = (0..<tk).reduce(0.0) { $0 + Double(dS[row * tk + $1]) }
      let magnitude = (0..<tk).reduce(0.0) { $0 + abs(Double(dS[row * tk + $1])) }
      // Float32 elements are each within their bound of the exact dS, whose row sums to 0 (the
      // reference's Double dS rounded to Float: within 2⁻²⁴·|dS|); the Double sum of at most 45
      // floats adds γ₄₅(2⁻⁵³)·Σ|dS| < 10⁻¹⁴·Σ|dS|.
      let rounding = choice == nil ? 0x1p-24 : 0
      let allowed =
        (0..<tk).reduce(0.0) { $0 + bounds.dBias![row * tk + $1] }
        + (rounding + 1e-14) * magnitude
      #expect(abs(sum) <= allowed, "row \(row): Σ dS = \(sum), allowed \(allowed)")
      worst = max(worst, magnitude)
    }
    #expect(worst > 1e-2, "dS is not all (nearly) zero")
  }

  /// Shapes at the edges: no batch dimensions, one query and one key, no keys at all (every row
  /// fully masked), `D = 0` (every score 0) and `Dv = 0` (no gradient reaches the scores); every
  /// kernel against the reference, with a causal bias so that the mask paths run too.
  @Test(
    "Edge shapes: rank 2, Tq = Tk = 1, Tk = 0, D = 0, Dv = 0",
    arguments: [
      ([5, 3], [7, 3], [7, 2]), ([1, 1, 4], [1, 1, 4], [1, 1, 3]),
      ([2, 3, 4], [2, 0, 4], [2, 0, 3]),
      ([2, 6, 0], [2, 9, 0], [2, 9, 3]), ([2, 6, 4], [2, 9, 4], [2, 9, 0]),
    ])
  func edgeShapes(shapes: ([Int], [Int], [Int])) throws {
    let (qShape, kShape, vShape) = shapes
    let q = try Tensor.randomNormal(shape: qShape, seed: 9, stream: 1)
    let k = try Tensor.randomNormal(shape: kShape, seed: 9, stream: 2)
    let v = try Tensor.randomNormal(shape: vShape, seed: 9, stream: 3)
    let outputShape = Array(qShape.dropLast()) + [vShape.last!]
    let dO = try Tensor.randomNormal(shape: outputShape, seed: 9, stream: 4)
    let bias = try Tensor.randomNormal(
      shape: [qShape[qShape.count - 2], kShape[kShape.count - 2]], seed: 9, stream: 5)
    let mask = AttentionMask(bias: bias, isCausal: true, causalAlignment: .bottomRight)
    let dropout = try Dropout(probability: 0.25, seed: 3)
    let problem = try BackwardProblem(
      queries: q, keys: k, values: v, gradOutput: dO, mask: mask, scale: nil,
      needBiasGradient: true)
    let expanded = try ReferenceBackward.expand(problem, dropout: .counter(dropout))
    let r = expanded.evaluate()
    let bounds = GradientBounds(expanded, r, problem: problem, rounding: .float32)
    let dBias = try Self.reducedBias(r.dS, problem: problem)
    for kernel in [Attention.Kernel.reference, .materialized, .automatic] {
      let g = try Attention.backward(
        queries: q, keys: k, values: v, gradOutput: dO, mask: mask, dropout: dropout,
        kernel: kernel, needBiasGradient: true, threads: 2)
      #expect(g.dQ.shape == qShape && g.dK.shape == kShape && g.dV.shape == vShape)
      #expect(g.dBias?.shape == bias.shape)
      Self.compare(
        g, dQ: r.dQ, dK: r.dK, dV: r.dV, dBias: dBias, bounds: bounds, "\(shapes) \(kernel.name)")
    }
  }

  // MARK: - Memory

  /// A 16,384-token backward (B1 H1 D64, causal with a window of 256 keys, so that the debug
  /// build takes seconds) on the default tiles: the workspace is what
  /// `TiledBackward.workspaceBytes` states, below 40 MiB (one `[Tq, Tk]` float matrix would be
  /// 1 GiB; most of it is the seven extra `dQ` buffers, `7·Tq·D` floats), and at most linear in
  /// `T` (twice the tokens, at most twice the bytes); the pass computes exactly the tiles that
  /// meet the band (counted here from the window alone); sampled `dQ` rows match a float64
  /// computation of those rows alone.
  @Test("A 16,384-token tiled backward needs no Tq·Tk memory")
  func longSequence() throws {
    let (t, d, window) = (16_384, 64, 256)
    let q = try Tensor.randomNormal(shape: [1, 1, t, d], seed: 21, stream: 1)
    let k = try Tensor.randomNormal(shape: [1, 1, t, d], seed: 21, stream: 2)
    let v = try Tensor.randomNormal(shape: [1, 1, t, d], seed: 21, stream: 3)
    let dO = try Tensor.randomNormal(shape: [1, 1, t, d], seed: 21, stream: 4)
    let g = try Attention.backward(
      queries: q, keys: k, values: v, gradOutput: dO,
      mask: AttentionMask(isCausal: true, window: window), threads: 2)
    let stated = TiledBackward.workspaceBytes(
      queries: t, keys: t, valueDim: d, batchCount: 1, window: window, threads: 2)
    #expect(g.kernel.isTiled)
    #expect(g.workspaceBytes == stated)
    #expect(g.workspaceBytes < 40 << 20, "workspace \(g.workspaceBytes) bytes")
    let doubled = TiledBackward.workspaceBytes(
      queries: 2 * t, keys: 2 * t, valueDim: d, batchCount: 1, window: window, threads: 2)
    #expect(doubled <= 2 * stated, "workspace \(stated) → \(doubled) bytes for twice the tokens")
    // Query i sees keys max(0, i − 255)…i. The pass takes, for each key block, the query
    // blocks whose keys meet it.
    let (bq, bk) = (
      TiledBackward.defaultConfiguration.queryBlock, TiledBackward.defaultConfiguration.keyBlock
    )
    let seen = stride(from: 0, to: t, by: bq).map { i0 in max(0, i0 - window + 1)..<(i0 + bq) }
    let keyPass = stride(from: 0, to: t, by: bk).reduce(0) { sum, j0 in
      sum + seen.filter { $0.overlaps(j0..<(j0 + bk)) }.count
    }
    #expect(keyPass < 2 * t / min(bq, bk), "the band, not the triangle")
    #expect(g.tilesComputed == keyPass, "tiles \(String(describing: g.tilesComputed))")
    #expect(g.dK.scalars.allSatisfy(\.isFinite) && g.dV.scalars.allSatisfy(\.isFinite))
    let scale = 1 / Double(Float(d).squareRoot())
    for i in [0, 1, 777, 8191, t - 1] {
      let row = Self.causalRow(
        q: q, k: k, v: v, dO: dO, query: i, firstKey: max(0, i - window + 1), scale: scale)
      let observed = g.dQ.scalars[(i * d)..<(i * d + d)]
      expectClose(observed, row.dQ, shape: [d], tolerance: { row.bounds[$0] }, "dQ row \(i)")
    }
  }

  /// `dQ` of query `i` seeing keys `firstKey…i` (causal top-left with a window), from that row
  /// alone (`P_i`, `dP_i`, `Δ_i` need only row `i`), in Double, with the bounds of
  /// `GradientBounds` for float32 restricted to the row (one head, no bias, no dropout).
  static func causalRow(
    q: Tensor, k: Tensor, v: Tensor, dO: Tensor, query i: Int, firstKey: Int, scale: Double
  ) -> (dQ: [Double], bounds: [Double]) {
    let d = q.shape[3]
    let keys = Array(firstKey...i)
    let u = 0x1p-24
    func gamma(_ n: Int) -> Double { Double(n) * u / (1 - Double(n) * u) }
    var s: [Double] = []
    var m: [Double] = []
    var dp: [Double] = []
    var a = 0.0
    for j in keys {
      var dot = 0.0
      var magnitude = 0.0
      var dm = 0.0
      var dpj = 0.0
      for c in 0..<d {
        let x = Double(q.scalars[i * d + c]) * Double(k.scalars[j * d + c])
        dot += x
        magnitude += abs(x)
        dm += abs(Double(dO.scalars[i * d + c]) * Double(v.scalars[j * d + c]))
        dpj += Double(dO.scalars[i * d + c]) * Double(v.scalars[j * d + c])
      }
      s.append(dot * scale)
      a = max(a, magnitude * scale)
      m.append(dm)
      dp.append(dpj)
    }
    let tk = keys.count
    let peak = s.max()!
    let sum = s.reduce(0) { $0 + exp($1 - peak) }
    let p = s.map { exp($0 - peak) / sum }
    let delta = zip(p, dp).reduce(0) { $0 + $1.0 * $1.1 }
    let ds = p.indices.map { p[$0] * (dp[$0] - delta) }
    let bigS = s.map(abs).max()!
    let dlt = gamma(d + 1) * a + 4 * u * bigS
    let rho0 =
      2 * dlt * (1 + 2 * dlt) + gamma(tk + 8) + u * (2 * (bigS + log(Double(tk))) + 8)
    let rho = p.map { rho0 + ($0 > 0 ? u * abs(log($0)) : 0) }
    let n = p.indices.reduce(0.0) { $0 + p[$1] * m[$1] }
    let nPrime = p.indices.reduce(0.0) { $0 + (rho[$1] + gamma(tk + d + 2)) * p[$1] * m[$1] }
    var dQ = [Double](repeating: 0, count: d)
    var bounds = [Double](repeating: 1e6 * Double(Float.leastNormalMagnitude), count: d)
    for (index, j) in keys.enumerated() {
      let e =
        p[index] * ((rho[index] + gamma(d + 4)) * m[index] + (rho[index] + 4 * u) * n + nPrime)
      for c in 0..<d {
        let kc = Double(k.scalars[j * d + c])
        dQ[c] += scale * ds[index] * kc
        bounds[c] += scale * (e + gamma(tk + 2) * abs(ds[index])) * abs(kc)
      }
    }
    return (dQ, bounds)
  }

  // MARK: - Errors

  @Test("Bad arguments are refused with one clear message")
  func errors() throws {
    let q = try Tensor.randomNormal(shape: [1, 2, 4, 8], seed: 1, stream: 1)
    let k = try Tensor.randomNormal(shape: [1, 2, 5, 8], seed: 1, stream: 2)
    let v = try Tensor.randomNormal(shape: [1, 2, 5, 3], seed: 1, stream: 3)
    let dO = try Tensor.randomNormal(shape: [1, 2, 4, 3], seed: 1, stream: 4)
    #expect(throws: AttentionError.self) {
      try Attention.backward(queries: q, keys: k, values: v, gradOutput: q)
    }
    #expect(throws: AttentionError.self) {
      try Attention.backward(queries: q, keys: k, values: v, gradOutput: dO, needBiasGradient: true)
    }
    #expect(throws: AttentionError.self) {
      try Attention.backward(queries: q, keys: k, values: v, gradOutput: dO, threads: 0)
    }
    #expect(throws: AttentionError.self) {
      try Attention.backward(
        queries: q, keys: k, values: v, gradOutput: dO,
        kernel: .tiled(TiledAttention.Configuration(queryBlock: 0, keyBlock: 4)))
    }
    #expect(throws: AttentionError.self) {
      try Attention.backward(
        queries: q, keys: k, values: v, gradOutput: dO, kernel: .materialized, memoryBudget: 16)
    }
    do {
      _ = try Attention.backward(queries: q, keys: k, values: v, gradOutput: q)
    } catch let error as AttentionError {
      #expect("\(error)".contains("gradOutput"), "\(error)")
    }
  }
}

extension Backward64 {
  /// The expanded bias, or an empty array: a writable path for the finite differences.
  var biasOrEmpty: [Double] {
    get { bias ?? [] }
    set { bias = newValue }
  }
}
