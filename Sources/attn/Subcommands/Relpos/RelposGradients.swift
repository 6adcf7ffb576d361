import AttentionKit
import AttentionVerification

/// `attn relpos --grad-out`: the module's backward pass on `dY` and its float64 checks.
extension RelposCommand {
  /// The backward pass on `gradient` (`dY`) with `--kernel`'s kernel, then its checks.
  func runBackward(
    module: RelativePositionAttention, inputs: Tensor, mask: AttentionMask, gradient: Tensor
  ) throws -> (gradients: RelativePositionGradients, checks: [Check]) {
    let gradients: RelativePositionGradients
    do {
      gradients = try Progress().during("running the backward pass") {
        try module.backward(
          inputs, mask: mask, gradOutput: gradient, kernel: kernelOptions.kernel,
          threads: kernelOptions.threads, memoryBudget: kernelOptions.memoryBudget)
      }
    } catch AttentionError.memoryBudget(var exceeded) {
      exceeded.budgetSource = kernelOptions.memoryBudgetSource
      exceeded.advice = .other("use a shorter input or fewer --threads, or raise --max-memory")
      throw AttentionError.memoryBudget(exceeded)
    }
    try checkFiniteResult(
      gradients.dx, name: "the gradient dx",
      inputs: [inputs, gradient] + Array(module.stateDict.tensors.values))
    let checks = try Progress().during("checking the gradients in float64") {
      try RelposGradientChecks(module: module, x: inputs, mask: mask, gradOutput: gradient)
        .run(gradients, seed: seed)
    }
    return (gradients, checks)
  }
}
