import AttentionKit
import Foundation

/// The checks `attn relpos --grad-out` runs on the module's gradients (any kernel of
/// `Attention.backward`). Each recomputes what it checks in `Double`, from the inputs,
/// independently of the kernels: the module's own float64 forward and backward
/// (`RelativePosition64`), projections included.
///
/// Shape legend: `B` batch, `T` sequence length, `D` = d_model, `M` largest relative distance.
/// 1. `gradients_match_reference`: every element of `dx`, `dQ`, `dK`, `dV` and of each parameter
///    gradient against the float64 reference (all rows), within the first-order float32 bounds
///    of `RelativePosition64.gradients(unit: 2⁻²⁴)` (see `RelativePositionAttention.backward`).
/// 2. `finite_differences`: for `samplesPerTensor` sampled entries θ of `x`, of each weight and
///    bias and of the embedding table (rows the sequence reads, both ends included), the central
///    difference `(L(θ + h) − L(θ − h))/2h` of `L = Σ dY∘Y` on a float64 forward of the module
///    against the float64 reference gradient. `h = ε^{1/3}·max(1, |θ|)` (ε = 2⁻⁵²) balances the
///    truncation error `h²|L'''|/6` against the rounding error `≈ ε·|L|₁/h` of the two losses. The
///    allowed error is `|D_h − D_{2h}|` (the step-doubling difference, 3× the truncation error to
///    first order) `+ (D + T + 8)·ε·|L|₁/h` (the losses' rounding, `|L|₁ = Σ|dY∘Y|`) `+ 10⁻⁹·|g|`:
///    a few 10⁻⁶ for the default sizes (gradients of order 1), while a wrong formula errs by
///    10⁻³ of the gradient or more. Observed errors are below 1% of it.
public struct RelposGradientChecks {
  /// The largest `B·T·(T + D)·D` the checks take: the multiply-adds of one float64 forward,
  /// which the finite differences run `4·8·samplesPerTensor` times.
  public static let workLimit = 1 << 24
  public static let samplesPerTensor = 2

  public let module: RelativePositionAttention
  public let x: Tensor
  public let mask: AttentionMask
  public let gradOutput: Tensor

  public init(module: RelativePositionAttention, x: Tensor, mask: AttentionMask, gradOutput: Tensor)
  {
    self.module = module
    self.x = x
    self.mask = mask
    self.gradOutput = gradOutput
  }

  /// Refuses a problem over `workLimit`: the float64 reference and the finite differences
  /// would take minutes.
  public static func checkSize(batch b: Int, length t: Int, modelDim d: Int) throws {
    let work = b.multipliedReportingOverflow(by: t)
    let inner = (t + d).multipliedReportingOverflow(by: d)
    let total = work.partialValue.multipliedReportingOverflow(by: inner.partialValue)
    guard !work.overflow, !inner.overflow, !total.overflow, total.partialValue <= workLimit else {
      throw AttentionError.invalidArgument(
        "--grad-out checks the gradients in float64, which takes B·T·(T + d_model)·d_model ≤ "
          + "\(workLimit); here B \(b), T \(t), d_model \(d): use a shorter input")
    }
  }

  public func run(_ fast: RelativePositionGradients, seed: UInt64) throws -> [Check] {
    let problem = try RelativePosition64(module: module, x: x, mask: mask)
    let dY = gradOutput.scalars.map(Double.init)
    let reference = problem.gradients(gradOutput: dY, unit: Rounding.float32.unit)
    return [
      try referenceCheck(fast, reference),
      finiteDifferenceCheck(problem, reference, dY: dY, seed: seed),
    ]
  }

  /// The fast tensors by the reference's keys.
  private func observed(_ g: RelativePositionGradients, _ key: String) throws -> Tensor {
    switch key {
    case "dQ": return g.dQ
    case "dK": return g.dK
    case "dV": return g.dV
    default: return try g.tensor(named: key)
    }
  }

  private func referenceCheck(
    _ fast: RelativePositionGradients, _ reference: RelativePosition64.Gradients
  ) throws -> Check {
    var worst = (ratio: 0.0, name: "", error: 0.0)
    var count = 0
    for key in ["x", "dQ", "dK", "dV"] + RelativePositionAttention.parameterNames {
      guard let expected = reference.values[key], let bound = reference.bounds[key] else {
        continue
      }
      let tensor = try observed(fast, key)
      for (e, value) in tensor.scalars.enumerated() {
        let error = abs(Double(value) - expected[e])
        let ratio = error.isNaN ? .infinity : error / bound[e]
        if ratio > worst.ratio || (ratio.isInfinite && worst.name.isEmpty) {
          worst = (ratio, key, error)
        }
        count += 1
      }
    }
    let name = worst.name == "x" ? "dx" : worst.name
    return Check(
      name: "gradients_match_reference",
      title: "gradients equal the float64 reference (all rows)",
      passed: worst.ratio <= 1,
      detail: "\(count) elements, worst error / bound = \(String(format: "%.3g", worst.ratio))"
        + (name.isEmpty ? "" : " (\(name), error \(scientific(worst.error)))")
        + " (first-order float32 bounds)")
  }

  private func finiteDifferenceCheck(
    _ problem: RelativePosition64, _ reference: RelativePosition64.Gradients, dY: [Double],
    seed: UInt64
  ) -> Check {
    let epsilon = Double.ulpOfOne
    let base = problem.forward()
    let l1 = zip(base, dY).reduce(0) { $0 + abs($1.0 * $1.1) }
    let rounding = Double(problem.modelDim + problem.length + 8) * epsilon * l1
    var worst = (ratio: 0.0, label: "", relative: 0.0)
    var count = 0
    for (name, index) in sampledEntries(problem, seed: seed) {
      let theta = problem[tensor: name][index]
      let h = cbrt(epsilon) * max(1, abs(theta))
      func loss(_ step: Double) -> Double {
        var moved = problem
        moved[tensor: name][index] = theta + step
        return moved.loss(gradOutput: dY)
      }
      let d1 = (loss(h) - loss(-h)) / (2 * h)
      let d2 = (loss(2 * h) - loss(-2 * h)) / (4 * h)
      let g = reference.values[name]![index]
      let allowed = abs(d1 - d2) + rounding / h + 1e-9 * abs(g)
      let error = abs(d1 - g)
      let ratio = error.isNaN ? .infinity : error / allowed
      if ratio >= worst.ratio {
        let shape = problem.shape(of: name)
        let label =
          (name == "x" ? "dx" : name) + "\(Tensor.multiIndex(ofFlat: index, shape: shape))"
        worst = (ratio, label, error / max(abs(g), .leastNormalMagnitude))
      }
      count += 1
    }
    return Check(
      name: "finite_differences",
      title: "float64 central differences of Σ dY∘Y agree",
      passed: worst.ratio <= 1,
      detail: "\(count) entries (h = ε^⅓·max(1, |θ|)), worst error / allowed = "
        + "\(String(format: "%.3g", worst.ratio)) at \(worst.label), relative "
        + scientific(worst.relative))
  }

  /// `samplesPerTensor` flat entries of `x` and of each parameter, drawn with the seed;
  /// the table's from the rows the sequence reads, its two ends first.
  private func sampledEntries(
    _ problem: RelativePosition64, seed: UInt64
  ) -> [(name: String, index: Int)] {
    let rng = Philox4x32(seed: seed)
    var counter: UInt64 = 0
    func draw(_ n: Int) -> Int {
      defer { counter += 1 }
      let w = rng.block(major: counter, minor: 1, stream: RandomStream.sampling)
      return Int((UInt64(w.0) * UInt64(max(n, 1))) >> 32)
    }
    let d = problem.modelDim
    let t = problem.length
    let columns = module.positionBias.columns(queries: t, keys: t)
    var entries: [(String, Int)] = []
    for name in RelativePosition64.tensorNames {
      let count = problem[tensor: name].count
      for s in 0..<Self.samplesPerTensor {
        if name == "relative_embeddings.weight" {
          let row =
            s == 0
            ? columns.lowerBound
            : s == 1 ? columns.upperBound : columns.lowerBound + draw(columns.count)
          entries.append((name, row * d + draw(d)))
        } else {
          entries.append((name, draw(count)))
        }
      }
    }
    return entries
  }
}
