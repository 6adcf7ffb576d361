import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// How `attn backward` and `attn sdpa --grad-out` check gradients, settled before any work: the
/// float64 reference on the whole problem or one key/value group (`GradientChecks`, with finite
/// differences), else sampled rows and keys through the tiled forward's log-sum-exp
/// (`SampledGradientChecks`), which only the tiled kernel provides.
enum GradientVerification {
  /// Whether the gradients of `shape` must be checked on samples; throws when they must but
  /// `kernel` cannot give the log-sum-exp those checks read.
  static func needsSampling(_ shape: AttentionShape, kernel: Attention.Kernel) throws -> Bool {
    let sampled = !GradientChecks.canCheck(shape)
    if sampled && !kernel.isTiled {
      throw ValidationError(
        "the float64 reference cannot hold \(shape.groupSize) × \(shape.queries) × "
          + "\(shape.keys) scores; run --kernel tiled, whose gradients are checked on sampled "
          + "rows and keys through the forward's log-sum-exp")
    }
    return sampled
  }

  /// The checks of `gradients` for `problem` and `gradOutput`: sampled when `forward` (the tiled
  /// forward's output and log-sum-exp) is given, else the float64 reference, whose checker is
  /// returned too (for `--explain`).
  static func check(
    _ gradients: AttentionGradients, problem: AttentionProblem, gradOutput: Tensor,
    forward: (output: Tensor, logSumExp: Tensor)?, needBiasGradient: Bool, seed: UInt64
  ) throws -> (checks: [Check], reference: GradientChecks?) {
    if let forward {
      let sampled = try SampledGradientChecks(
        problem: problem, gradOutput: gradOutput, output: forward.output,
        logSumExp: forward.logSumExp, seed: seed)
      let checks = Progress().during("checking sampled rows and keys of the gradients") {
        sampled.run(gradients)
      }
      return (checks, nil)
    }
    let whole = try Progress().during("computing the float64 reference backward") {
      try GradientChecks(
        queries: problem.queries, keys: problem.keys, values: problem.values,
        gradOutput: gradOutput, mask: problem.mask, dropout: problem.dropout,
        needBiasGradient: needBiasGradient, seed: seed, scale: problem.scale,
        terms: problem.terms)
    }
    let checks = Progress().during("checking the gradients") {
      whole.run(gradients, seed: seed, finiteDifferences: true)
    }
    return (checks, whole)
  }
}
