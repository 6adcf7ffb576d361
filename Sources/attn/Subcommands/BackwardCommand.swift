import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// `attn backward`: exercise 4, beyond the notebook — the gradients of attention with a mask and
/// dropout, from scratch, checked.
struct BackwardCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "backward",
    abstract: "Exercise 4: the gradients of attention (dQ, dK, dV), from scratch, checked.",
    discussion: """
      The backward pass of attn dropout's computation: given the upstream gradient dO \
      (--grad-out, or drawn from --seed), computes
        dV = Pdᵀ·dO,  dP = dO·Vᵀ ∘ Z/(1−p),  dS = P∘(dP − Δ) with Δ = rowsum(dO∘O),
        dQ = scale·dS·K,  dK = scale·dSᵀ·Q  (and d(bias) = dS with --bias),
      where P is the softmax of the forward pass and Z its dropout decisions, regenerated from \
      the seed (never stored). --kernel materialized holds P per task; --kernel tiled is \
      FlashAttention-2's backward, recomputing P tile by tile from each row's log-sum-exp \
      (memory linear in the sequence). Inputs and masks as attn dropout.
      Checks: the gradients against a float64 reference backward within float32 error bounds, \
      finite differences of the float64 forward on sampled entries, and rows of dS summing to 0.
      """
  )

  @OptionGroup var inputs: AttentionInputOptions

  @Option(help: "Upstream gradient dO […, Tq, Dv] (.npy); drawn from --seed when absent.")
  var gradOut: String?

  @Option(help: "Write dQ […, Tq, D] as float32 .npy.")
  var dqOut: String?

  @Option(help: "Write dK […, Tk, D] as float32 .npy.")
  var dkOut: String?

  @Option(help: "Write dV […, Tk, Dv] as float32 .npy.")
  var dvOut: String?

  @Option(help: "Write d(bias), shaped as --bias, as float32 .npy (needs --bias).")
  var dbiasOut: String?

  @OptionGroup var explanation: ExplainOptions

  @OptionGroup var report: ReportFormatOptions

  @OptionGroup var kernelOptions: KernelOptions
  @OptionGroup var inputSafety: InputSafetyOptions

  func validate() throws {
    if dbiasOut != nil && inputs.bias == nil {
      throw ValidationError("--dbias-out needs --bias (the gradient of the additive mask)")
    }
    try checkOutputs([dqOut, dkOut, dvOut, dbiasOut], against: inputs.paths + [gradOut])
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let (queries, keys, values) = try inputs.load(files, execution: kernelOptions.execution)
    let (mask, biasTensor) = try inputs.attentionMask(files)
    try inputSafety.check(
      [
        (queries, inputs.q), (keys, inputs.k), (values, inputs.v), (mask.keep, inputs.mask.path),
      ],
      biases: [(biasTensor, inputs.bias)])
    let shape = try AttentionShape(queries: queries, keys: keys, values: values)
    let gradOutput = try loadGradOutput(files, shape: shape)
    try explanation.checkBatch(batchCount: shape.batchCount)
    let dropout = try inputs.dropout()
    // How the gradients will be checked is settled before any work.
    let sampled = try GradientVerification.needsSampling(shape, kernel: kernelOptions.kernel)
    if explanation.explain && sampled {
      throw ValidationError(
        "--explain shows the float64 reference of the whole problem, which is over its limit "
          + "here; use smaller inputs")
    }
    let kernel: Attention.Kernel =
      kernelOptions.kernel.isTiled
      ? .tiled(TiledBackward.defaultConfiguration) : kernelOptions.kernel
    let forward =
      sampled
      ? try explainingMemoryBudget {
        try Progress().during("running the tiled forward (for its log-sum-exp)") {
          try Attention.scaledDotProduct(
            queries: queries, keys: keys, values: values, mask: mask, dropout: dropout,
            kernel: .tiled(.default), threads: kernelOptions.threads,
            memoryBudget: kernelOptions.memoryBudget, needLogSumExp: true)
        }
      } : nil
    let gradients = try explainingMemoryBudget {
      try Progress().during("running the \(kernelOptions.kernel.flagName) backward") {
        try Attention.backward(
          queries: queries, keys: keys, values: values, gradOutput: gradOutput, mask: mask,
          dropout: dropout, output: forward?.output, logSumExp: forward?.logSumExp,
          kernel: kernel, needBiasGradient: biasTensor != nil,
          threads: kernelOptions.threads, memoryBudget: kernelOptions.memoryBudget)
      }
    }
    let sources = [queries, keys, values, gradOutput] + [mask.keep].compactMap { $0 }
    for (tensor, name) in [
      (gradients.dQ, "dQ"), (gradients.dK, "dK"), (gradients.dV, "dV"),
    ] {
      try checkFiniteResult(tensor, name: name, inputs: sources, biases: [biasTensor])
    }

    let problem = AttentionProblem(
      queries: queries, keys: keys, values: values, mask: mask, dropout: dropout)
    let (checks, checker) = try GradientVerification.check(
      gradients, problem: problem, gradOutput: gradOutput,
      forward: forward.flatMap { f in f.logSumExp.map { (f.output, $0) } },
      needBiasGradient: biasTensor != nil, seed: inputs.seed)
    let steps =
      explanation.explain
      ? checker.map {
        ExplainStep.backwardSteps(
          reference: $0.reference, queries: queries, keys: keys, values: values,
          gradOutput: gradOutput, batch: explanation.batch, shape: shape, dropout: dropout)
      } : nil
    let run = CheckedRun(
      checks: checks,
      outputs: npyOutputs([
        (dqOut, gradients.dQ), (dkOut, gradients.dK), (dvOut, gradients.dV),
        (dbiasOut, gradients.dBias),
      ]),
      verdict: .init(passed: "Gradients verified!", failed: "Gradients NOT verified."))
    try run.finish(
      format: report.format,
      json: {
        BackwardReport(
          dqShape: gradients.dQ.shape, dkShape: gradients.dK.shape, dvShape: gradients.dV.shape,
          dbiasShape: gradients.dBias?.shape, p: inputs.eval ? 0 : Double(inputs.probability),
          seed: inputs.seed, training: !inputs.eval, kernel: gradients.kernel.flagName,
          mask: inputs.mask.description, workspaceBytes: gradients.workspaceBytes,
          checks: checks.dictionary, verified: run.verified,
          explainBatch: explanation.reportedBatch, steps: steps)
      },
      text: { printText(shape: shape, gradients: gradients, steps: steps) })
  }

  /// `--grad-out`, which must have the output's shape, or dO drawn from `--seed`.
  private func loadGradOutput(_ files: InputFiles, shape: AttentionShape) throws -> Tensor {
    guard let gradOut else {
      try MemoryGuard.check(
        [shape.outputShape], for: "the random dO \(shapeForMessage(shape.outputShape))",
        budget: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource)
      return try Tensor.randomNormal(
        shape: shape.outputShape, seed: inputs.seed, stream: RandomStream.gradOutput)
    }
    let tensor = try files.tensor(gradOut)
    try inputSafety.check(tensor, from: gradOut)
    guard tensor.shape == shape.outputShape else {
      throw AttentionError.file(
        path: gradOut,
        message: "holds \(shapeForMessage(tensor.shape)); dO must have the output's shape "
          + "\(shapeForMessage(shape.outputShape))")
    }
    return tensor
  }

  private func printText(
    shape: AttentionShape, gradients: AttentionGradients, steps: [ExplainStep]?
  ) {
    let mode = inputs.eval ? "eval, no dropout" : "training, p = \(inputs.probability)"
    print(
      "Exercise 4: the gradients of attention (\(mode), seed \(inputs.seed), mask "
        + "\(inputs.mask), \(gradients.kernel.flagName) kernel)")
    print(
      "dO: \(torchSizeDescription(shape.outputShape))"
        + (gradOut.map { " from \($0)" } ?? ", drawn from the seed"))
    print(
      "dQ: \(torchSizeDescription(gradients.dQ.shape)), dK: "
        + "\(torchSizeDescription(gradients.dK.shape)), dV: "
        + "\(torchSizeDescription(gradients.dV.shape))"
        + (gradients.dBias.map { ", d(bias): \(torchSizeDescription($0.shape))" } ?? ""))
    print("Workspace: \(formatBytes(gradients.workspaceBytes))")
    if let steps {
      let name = shape.batchShape.count == 1 ? "" : " (flat index over \(shape.batchShape))"
      print(
        "\n"
          + ExplainPrinter.text(
            steps,
            heading: "Backward, step by step, batch element \(explanation.batch) of "
              + "\(shape.batchCount)\(name), from the float64 reference:",
            precision: explanation.precision))
    }
  }
}

/// `attn backward --format json`.
private struct BackwardReport: Encodable {
  var dqShape: [Int]
  var dkShape: [Int]
  var dvShape: [Int]
  var dbiasShape: [Int]?
  var p: Double
  var seed: UInt64
  var training: Bool
  var kernel: String
  var mask: String
  var workspaceBytes: Int
  var checks: [String: Bool]
  var verified: Bool
  var explainBatch: Int?
  var steps: [ExplainStep]?
}
