import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// `attn sdpa --grad-out dO`: the backward pass on PyTorch's conventions — what
/// `torch.autograd.grad(sdpa(...), (q, k, v, attn_mask, sinks, table), dO)` gives — checked like
/// `attn backward` (the float64 reference on the problem or one key/value group with finite
/// differences, else sampled rows and keys through the tiled forward's log-sum-exp).
struct SdpaGradientOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "Upstream gradient dO [B, H, Tq, Dv] (.npy or FILE.safetensors:NAME): also runs the "
        + "backward pass, checked.", valueName: "dO.npy"))
  var gradOut: String?

  @Option(help: "Write dQ [B, H, Tq, D] (needs --grad-out).")
  var dqOut: String?

  @Option(help: "Write dK [B, Hkv, Tk, D], summed over the query heads of each K/V head.")
  var dkOut: String?

  @Option(help: "Write dV [B, Hkv, Tk, Dv], summed as dK.")
  var dvOut: String?

  @Option(help: "Write d(sinks) [H] (needs --sinks).")
  var dsinksOut: String?

  @Option(help: "Write d(T5 table) [buckets, H] (needs --t5-bias).")
  var dt5Out: String?

  @Option(help: "Write d(attn_mask), shaped as the float --attn-mask (needs one).")
  var dmaskOut: String?

  var outputs: [String?] { [dqOut, dkOut, dvOut, dsinksOut, dt5Out, dmaskOut] }

  /// The flags' own consistency, and their agreement with the problem's (`inputs`).
  func validate(with inputs: SdpaInputOptions) throws {
    if gradOut == nil, let given = outputs.compactMap({ $0 }).first {
      throw ValidationError("\(given) is a gradient: it needs --grad-out dO")
    }
    if dsinksOut != nil && inputs.scoreTerms.sinks == nil {
      throw ValidationError("--dsinks-out needs --sinks")
    }
    if dt5Out != nil && inputs.scoreTerms.t5Bias == nil {
      throw ValidationError("--dt5-out needs --t5-bias")
    }
    if dmaskOut != nil && inputs.attnMask == nil {
      throw ValidationError("--dmask-out needs a float --attn-mask")
    }
  }

  /// `dO`, which must have the output's shape.
  func gradOutput(_ files: InputFiles, shape: AttentionShape, safety: InputSafetyOptions) throws
    -> Tensor?
  {
    guard let gradOut else { return nil }
    let tensor = try files.input(gradOut).tensor
    try safety.check(tensor, from: gradOut)
    guard tensor.shape == shape.outputShape else {
      throw AttentionError.file(
        path: gradOut,
        message: "holds \(shapeForMessage(tensor.shape)); dO must have the output's shape "
          + shapeForMessage(shape.outputShape))
    }
    return tensor
  }
}

/// The backward pass of one `attn sdpa` run, checked.
struct SdpaBackward {
  var gradients: AttentionGradients
  var checks: [Check]

  /// Runs `Attention.backward` on the forward's problem with `kernel` (given the forward's
  /// output and log-sum-exp when it has them), then checks the gradients.
  init(
    problem: AttentionProblem, gradOutput: Tensor, forward: AttentionResult,
    needMaskGradient: Bool, kernel: KernelOptions, seed: UInt64
  ) throws {
    let shape = try AttentionShape(
      queries: problem.queries, keys: problem.keys, values: problem.values)
    let saved = forward.logSumExp.map { (output: forward.output, logSumExp: $0) }
    let sampled = try GradientVerification.needsSampling(shape, kernel: forward.kernel)
    guard !needMaskGradient || problem.mask.bias != nil else {
      throw ValidationError("--dmask-out needs a float --attn-mask; this one is boolean")
    }
    let needBias = needMaskGradient
    gradients = try explainingMemoryBudget {
      try Progress().during("running the \(forward.kernel.flagName) backward") {
        try Attention.backward(
          queries: problem.queries, keys: problem.keys, values: problem.values,
          gradOutput: gradOutput, mask: problem.mask, scale: problem.scale,
          dropout: problem.dropout, terms: problem.terms, output: saved?.output,
          logSumExp: saved?.logSumExp,
          kernel: forward.kernel.isTiled
            ? .tiled(TiledBackward.defaultConfiguration) : forward.kernel,
          needBiasGradient: needBias, threads: kernel.threads,
          memoryBudget: kernel.memoryBudget)
      }
    }
    let sources = [problem.queries, problem.keys, problem.values, gradOutput]
    for (tensor, name) in [(gradients.dQ, "dQ"), (gradients.dK, "dK"), (gradients.dV, "dV")] {
      try checkFiniteResult(tensor, name: name, inputs: sources, biases: [problem.mask.bias])
    }
    checks = try GradientVerification.check(
      gradients, problem: problem, gradOutput: gradOutput, forward: sampled ? saved : nil,
      needBiasGradient: needBias, seed: seed
    ).checks
  }

  /// The gradient files asked for, by name.
  func outputs(_ options: SdpaGradientOptions) -> [(path: String?, tensor: Tensor?, name: String)] {
    [
      (options.dqOut, gradients.dQ, "dq"), (options.dkOut, gradients.dK, "dk"),
      (options.dvOut, gradients.dV, "dv"), (options.dsinksOut, gradients.dSinks, "dsinks"),
      (options.dt5Out, gradients.dT5Tables.first, "dt5"),
      (options.dmaskOut, gradients.dBias, "dmask"),
    ]
  }
}
