import AttentionKit
import AttentionVerification
import Foundation
import Testing
import _TestSupport

/// `RelativePositionAttention.backward` against the numpy references of
/// `Scripts/fixtures/make_relpos_grad_fixtures.py` (`Fixtures/relpos_grad`), and what the kernels
/// promise beyond the values: zero `dQ` (so no `W_q` share of `dx`) from fully masked rows,
/// bit-identical results for any thread count, and a refused memory budget. The module's
/// attention runs through `Attention.backward`'s kernels (reference, materialized, tiled).
///
/// Shape legend: `B` batch, `T` sequence length, `D` = d_model, `M` largest relative distance.
///
/// Tolerances: per-element first-order bounds from `RelativePosition64.gradients(unit:)`, built
/// from the float64 reference's own magnitudes with `u = 2⁻²⁴` (float32) or `2⁻⁵³` (the float64
/// reference against numpy), `γₙ = n·u/(1 − n·u)`:
/// 1. `Q`, `K`, `V` off by `γ_{D+1}·(|b| + Σ|x·w|)`; a score by
///    `δ = scale·Σ_c (γ_{D+2}|q_c| + e_{q,c})(|k_c| + |E_c|) + |q_c|·e_{k,c} + 4u·max|s|`;
/// 2. a probability by `ρ·P`, `ρ = 2δ(1 + 2δ) + γ_{T+6}` (the score error through the softmax,
///    the exponentials and their sum);
/// 3. `dP_ij` by `γ_D·M_ij + Σ_c|dO_ic|·e_{v,jc}` (`M_ij = Σ_c |dO_ic·v_jc|`), `Δ_i` and
///    `dS_ij = P_ij(dP_ij − Δ_i)` accordingly;
/// 4. each gradient by the sum of its terms' errors plus `γₙ` of its length times the sum of
///    `|terms|`: `dQ` (`n = 2T + W + 4`, the `G` sums and two products), `dK` (`T + 4`), `dE`
///    (`B·T + T + 4`), `dV` (`T + 2`), `dW`, `db` (`B·T`), `dx` (`3D`);
/// 5. plus `10⁶·λ` for probabilities that `fastExp` flushes to zero.
/// Observed errors stay below a few percent of these bounds; the bounds are below 1% of each
/// tensor's largest element, and the opposite relative direction (`i − j`) fails them
/// (`oppositeDirectionFails`).
@Suite("Relative-position attention backward")
struct RelativePositionBackwardTests {
  /// The expected key of each returned tensor.
  static let keys = ["x", "dq", "dk", "dv"] + RelativePositionAttention.parameterNames

  static func observed(_ g: RelativePositionGradients, _ key: String) throws -> Tensor {
    switch key {
    case "dq": return g.dQ
    case "dk": return g.dK
    case "dv": return g.dV
    default: return try g.tensor(named: key)
    }
  }

  /// The bound key of a fixture key.
  static func boundKey(_ key: String) -> String {
    ["dq": "dQ", "dk": "dK", "dv": "dV"][key] ?? key
  }

  static func float64(_ c: LoadedRelposGradCase) throws -> RelativePosition64 {
    try RelativePosition64(module: c.module, x: c.x, mask: c.mask)
  }

  @Test(
    "The fast kernels match numpy's float64 gradients", arguments: try RelposGradFixtures.cases())
  func fastMatchesNumpy(spec: RelposGradCase) throws {
    let c = try LoadedRelposGradCase(spec)
    let bounds = try Self.float64(c).gradients(
      gradOutput: c.gradOutput.scalars.map(Double.init), unit: 0x1p-24
    ).bounds
    for kernel in [GradientKernel.materialized, .tiled] {
      let g = try c.module.backward(
        c.x, mask: c.mask, gradOutput: c.gradOutput, kernel: kernel.kernel, threads: 3)
      var worst = 0.0
      for key in Self.keys {
        let tensor = try Self.observed(g, key)
        let expected = try #require(c.expected[key])
        let bound = try #require(bounds[Self.boundKey(key)])
        // The float64 reference is exact to ~10⁻¹⁵ of these magnitudes: 10⁻¹²·|expected| covers it.
        let report = expectClose(
          tensor.scalars, expected, shape: tensor.shape,
          tolerance: { bound[$0] + 1e-12 * abs(expected[$0]) }, "\(spec.name) \(key)")
        worst = max(worst, report.ratio)
        // Tight enough to matter: below 1% of the tensor's largest element (about 0.4% at worst
        // here, observed errors 10⁻² of the bounds). Gradients that are 0 in exact arithmetic
        // (numpy's are below 10⁻¹⁵) are skipped: `W_k.bias` always (it adds q_i·b_k to a whole row
        // of scores, which the softmax ignores), `E` when M = 0 (one embedding for every key).
        let largest = expected.map(abs).max() ?? 0
        if largest > 1e-12 {
          #expect(
            (bound.max() ?? 0) < 1e-2 * largest,
            "\(spec.name) \(key): bound \(sci(bound.max() ?? 0)) vs largest \(sci(largest))")
        }
      }
      print("OK \(spec.name) \(kernel): worst error / bound = \(String(format: "%.3g", worst))")
    }
  }

  /// The bounds are tight enough to catch the notebook docstring's `i − j` instead of its code's
  /// `j − i` (the table read backwards): the fast gradients then fall outside them.
  @Test(
    "The opposite relative direction fails the bounds", arguments: try RelposGradFixtures.cases())
  func oppositeDirectionFails(spec: RelposGradCase) throws {
    let c = try LoadedRelposGradCase(spec)
    guard spec.maxRel > 0 else { return }  // M = 0: one embedding, no direction
    let g = try c.module.backward(c.x, mask: c.mask, gradOutput: c.gradOutput)
    var reversed = try Self.float64(c)
    let (rows, d) = (2 * spec.maxRel + 1, spec.dModel)
    let table = reversed.e
    for r in 0..<rows {
      for ch in 0..<d { reversed.e[r * d + ch] = table[(rows - 1 - r) * d + ch] }
    }
    let wrong = reversed.gradients(
      gradOutput: c.gradOutput.scalars.map(Double.init), unit: 0x1p-24)
    var outside = 0
    for key in ["x", "dQ", "W_q.weight"] {
      let observed = try Self.observed(g, key == "dQ" ? "dq" : key).scalars
      for (e, value) in observed.enumerated()
      where abs(Double(value) - wrong.values[key]![e]) > wrong.bounds[key]![e] {
        outside += 1
      }
    }
    #expect(outside > 0, "\(spec.name): the fast gradients fit the reversed table's bounds")
  }

  @Test("The reference kernel matches numpy", arguments: try RelposGradFixtures.cases())
  func referenceMatchesNumpy(spec: RelposGradCase) throws {
    let c = try LoadedRelposGradCase(spec)
    let problem = try Self.float64(c)
    let dY = c.gradOutput.scalars.map(Double.init)
    let result = problem.gradients(gradOutput: dY, unit: 0x1p-53)
    let float32 = problem.gradients(gradOutput: dY, unit: 0x1p-24).bounds
    let g = try c.module.backward(c.x, mask: c.mask, gradOutput: c.gradOutput, kernel: .reference)
    #expect(g.kernel == .reference)
    for key in Self.keys {
      let expected = try #require(c.expected[key])
      let ours = try #require(result.values[Self.boundKey(key)])
      let bound = try #require(result.bounds[Self.boundKey(key)])
      // Two float64 computations of the same sums in different orders: within the float64
      // version of the bounds.
      expectClose(
        ours, expected, shape: [expected.count], tolerance: { bound[$0] }, "\(spec.name) \(key)")
      // The public Float tensors: the attention's gradients in float64 rounded once, the
      // projections' products in float32 — within the float32 bounds.
      let tensor = try Self.observed(g, key)
      let loose = try #require(float32[Self.boundKey(key)])
      expectClose(
        tensor.scalars, expected, shape: tensor.shape,
        tolerance: { loose[$0] + 1e-12 * abs(expected[$0]) + Double(Float.leastNonzeroMagnitude) },
        "\(spec.name) \(key) (Float)")
    }
    let forward = problem.forward()
    expectClose(
      forward, try #require(c.expected["output"]), shape: [forward.count],
      tolerance: { _ in 1e-12 }, "\(spec.name) output")
  }

  @Test(
    "Fully masked rows: dQ is exactly 0, so dx is dK·W_k + dV·W_v there",
    arguments: GradientKernel.allCases)
  func fullyMaskedRows(kernel: GradientKernel) throws {
    let spec = try #require(
      try RelposGradFixtures.cases().first { $0.fullyMaskedRows > 0 && $0.keep != nil })
    let c = try LoadedRelposGradCase(spec)
    let g = try c.module.backward(
      c.x, mask: c.mask, gradOutput: c.gradOutput, kernel: kernel.kernel)
    let (t, d) = (spec.length, spec.dModel)
    let keep = try #require(c.mask.keep).scalars
    var dead: [Int] = []
    for row in 0..<(spec.batch * t) where (0..<t).allSatisfy({ keep[row * t + $0] == 0 }) {
      dead.append(row)
    }
    #expect(dead.count == spec.fullyMaskedRows)
    let wk = c.module.keyProjection.weight.scalars
    let wv = c.module.valueProjection.weight.scalars
    for row in dead {
      let dQ = Array(g.dQ.scalars[(row * d)..<((row + 1) * d)])
      #expect(dQ.allSatisfy { $0 == 0 }, "row \(row): dQ \(dQ)")
      // dx_row = Σ_o dK_o·W_k[o] + dV_o·W_v[o]: 2D float32 products, accumulated.
      var expected = [Double](repeating: 0, count: d)
      var magnitude = [Double](repeating: 0, count: d)
      for o in 0..<d {
        for ch in 0..<d {
          let a = Double(g.dK.scalars[row * d + o]) * Double(wk[o * d + ch])
          let b = Double(g.dV.scalars[row * d + o]) * Double(wv[o * d + ch])
          expected[ch] += a + b
          magnitude[ch] += abs(a) + abs(b)
        }
      }
      let gamma = Double(3 * d) * 0x1p-24 / (1 - Double(3 * d) * 0x1p-24)
      expectClose(
        g.dx.scalars[(row * d)..<((row + 1) * d)], expected, shape: [d],
        tolerance: { gamma * magnitude[$0] + 1e-30 }, "row \(row) dx")
    }
  }

  @Test("The fast kernel's results are bit-identical for any thread count")
  func threadCountIndependence() throws {
    let module = try RelativePositionAttention(modelDim: 24, maxDistance: 5, seed: 7)
    let x = try Tensor.randomNormal(shape: [5, 33, 24], seed: 8, stream: 1)
    let dY = try Tensor.randomNormal(shape: [5, 33, 24], seed: 9, stream: 2)
    for kernel in GradientKernel.allCases where kernel != .reference {
      let first = try module.backward(
        x, mask: .causal, gradOutput: dY, kernel: kernel.kernel, threads: 1)
      for threads in [2, 3, 8, nil] as [Int?] {
        let other = try module.backward(
          x, mask: .causal, gradOutput: dY, kernel: kernel.kernel, threads: threads)
        #expect(
          other.dx.scalars == first.dx.scalars,
          "dx differs with \(threads.map(String.init) ?? "all") threads")
        for name in RelativePositionAttention.parameterNames {
          #expect(
            try other.parameters.tensor(named: name).scalars
              == first.parameters.tensor(named: name).scalars,
            "\(name) differs with \(threads.map(String.init) ?? "all") threads")
        }
      }
    }
  }

  @Test("A memory budget below the attention kernel's workspace is refused")
  func budgetRefusal() throws {
    let module = try RelativePositionAttention(modelDim: 16, maxDistance: 4, seed: 1)
    let x = try Tensor.randomNormal(shape: [2, 50, 16], seed: 2, stream: 1)
    for kernel in [Attention.Kernel.materialized, .automatic] {
      let needed = try module.backward(x, gradOutput: x, kernel: kernel, threads: 2)
        .workspaceBytes
      #expect(needed > 0)
      #expect {
        try module.backward(x, gradOutput: x, kernel: kernel, threads: 2, memoryBudget: needed - 1)
      } throws: { error in
        guard case AttentionError.memoryBudget(let exceeded) = error else { return false }
        return exceeded.neededBytes == needed && exceeded.budgetBytes == needed - 1
      }
      let g = try module.backward(
        x, gradOutput: x, kernel: kernel, threads: 2, memoryBudget: needed)
      #expect(g.workspaceBytes == needed)
    }
  }

  @Test("Shapes that do not fit are refused")
  func badShapes() throws {
    let module = try RelativePositionAttention(modelDim: 8, maxDistance: 2, seed: 1)
    let x = try Tensor.randomNormal(shape: [1, 4, 8], seed: 2, stream: 1)
    let wrong = try Tensor.randomNormal(shape: [1, 5, 8], seed: 2, stream: 1)
    #expect(throws: AttentionError.self) { try module.backward(x, gradOutput: wrong) }
    #expect(throws: AttentionError.self) { try module.backward(wrong, gradOutput: x) }
    #expect(throws: AttentionError.self) { try module.backward(x, gradOutput: x, threads: 0) }
  }

  enum GradientKernel: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case reference, materialized, tiled
    var kernel: Attention.Kernel {
      switch self {
      case .reference: return .reference
      case .materialized: return .materialized
      case .tiled: return .tiled(TiledAttention.Configuration(queryBlock: 8, keyBlock: 16))
      }
    }
    var testDescription: String { rawValue }
  }
}
