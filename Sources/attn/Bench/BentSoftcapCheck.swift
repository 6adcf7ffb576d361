import AttentionKit
import AttentionVerification
import Foundation

extension BenchCase {
  /// Soft-capping on a problem where it bends the scores: at the bench's inputs the scores stay
  /// within about ±6, where `50·tanh(x/50)` differs from `x` by under 0.3 %, and its gradient
  /// factor from 1 by under 1.5 % — below what the float64 bounds resolve on sums over 2,048 keys
  /// (a backward without the soft-cap passes the check above). Here B 1, the case's heads,
  /// T 512, D 64, queries of standard deviation 16 (scores of tens), the same kernel and terms,
  /// every head and gradient against `ReferenceGradients`.
  static func bentSoftcap(
    terms: ScoreTerms, heads: Int, causal: Bool, kernel: Attention.Kernel, threads: Int,
    seed: UInt64
  ) throws -> Check {
    let shape = [1, heads, 512, 64]
    let q = try Tensor.randomNormal(
      shape: shape, std: 16, seed: seed, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
    let dO = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.gradOutput)
    let mask = AttentionMask(isCausal: causal)
    let forward = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: mask, terms: terms, kernel: kernel, threads: threads,
      needLogSumExp: true)
    let gradients = try Attention.backward(
      queries: q, keys: k, values: v, gradOutput: dO, mask: mask, terms: terms,
      output: forward.output, logSumExp: forward.logSumExp, kernel: kernel, threads: threads)
    let checks = try GradientChecks(
      queries: q, keys: k, values: v, gradOutput: dO, mask: mask, dropout: nil,
      needBiasGradient: false, seed: seed, terms: terms)
    let measurements = checks.measure(gradients)
    return Check(
      name: "softcap_bent_matches_reference",
      title: "gradients match the float64 reference where the soft-cap bends the scores",
      passed: measurements.allSatisfy(\.passed),
      detail: measurements.map { "\($0.tensor) \(scientific($0.worstRatio))" }
        .joined(separator: ", ")
        + " (error / bound; B 1 H \(heads) T 512 D 64, queries ×16, \(checks.coverage))",
      measurement: measurements.max { $0.worstRatio < $1.worstRatio })
  }
}
