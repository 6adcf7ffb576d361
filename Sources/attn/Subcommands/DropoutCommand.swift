import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// `attn dropout`: exercise 1, scaled dot-product attention with a mask and dropout on the weights.
struct DropoutCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "dropout",
    abstract: "Exercise 1: scaled dot-product attention with a mask and dropout on the weights.",
    discussion: """
      Computes softmax(Q·Kᵀ/√d_k + mask), drops each weight with probability p (kept weights are \
      scaled by 1/(1−p)), and multiplies by V. Q, K, V are drawn from a standard normal with \
      --seed, or loaded from .npy files of shapes […, Tq, D], […, Tk, D], […, Tk, Dv]. With \
      --rng torch they are drawn as the notebook draws them, after torch.manual_seed(--seed): \
      torch.randn(batch, seqLen, d_k) three times, the same numbers as PyTorch on the CPU; the \
      dropout mask still comes from Philox4x32-10.
      Mask convention: 0 = masked (the notebook's `mask == 0`); --bias adds a float mask; \
      a query whose keys are all masked gets zero weights and a zero output (PyTorch ≥ 2.5).
      Then it verifies the result: rows sum to 1, the dropped share is consistent with p, kept \
      weights are rescaled, the output equals weights·V, and rows match a float64 reference.
      """
  )

  @OptionGroup var inputs: AttentionInputOptions

  @Option(help: "Write the output […, Tq, Dv] as float32 .npy.")
  var out: String?

  @Option(help: "Write the attention weights after dropout […, Tq, Tk] as float32 .npy.")
  var weightsOut: String?

  @OptionGroup var report: ReportFormatOptions

  @OptionGroup var kernelOptions: KernelOptions

  @OptionGroup var inputSafety: InputSafetyOptions

  @OptionGroup var visualization: VisualizationOptions

  func validate() throws {
    if kernelOptions.kernel.isTiled && weightsOut != nil {
      throw ValidationError(
        "--weights-out needs --kernel materialized: the tiled kernel never holds the weights")
    }
    try visualization.check(
      kernel: kernelOptions.kernel, batchCount: inputs.fromFiles ? nil : inputs.batch,
      queries: inputs.seqLen, keys: inputs.seqLen)
    try checkOutputs(
      [out, weightsOut] + visualization.heatmapPaths(positionFigure: false),
      against: inputs.paths)
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let (queries, keys, values) = try inputs.load(files, execution: kernelOptions.execution)
    let (attentionMask, biasTensor) = try inputs.attentionMask(files)
    try inputSafety.check(
      [
        (queries, inputs.q), (keys, inputs.k), (values, inputs.v),
        (attentionMask.keep, inputs.mask.path),
      ],
      biases: [(biasTensor, inputs.bias)])
    let dropout = try inputs.dropout()
    // --explain and --heatmap: checks the shapes now, computes the steps from the same inputs.
    let visuals = try visualization.dropout(
      queries: queries, keys: keys, values: values, mask: attentionMask, dropout: dropout,
      maskName: inputs.mask.description, seed: inputs.seed, rng: inputs.rng.rawValue,
      memoryBudget: kernelOptions.memoryBudget)

    // The kernel's own weights without dropout, for the checks (the materialized kernel only).
    if kernelOptions.kernel == .materialized && dropout != nil {
      // The checks hold the weights before and after dropout at once: two matrices.
      let shape = try AttentionShape(queries: queries, keys: keys, values: values)
      try MemoryGuard.check(
        [[2] + shape.weightsShape],
        for:
          "the weights before and after dropout \(shapeForMessage(shape.weightsShape)), which the checks compare",
        budget: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource,
        advice: "use --kernel tiled (its checks recompute sampled rows) or raise --max-memory")
    }
    let preDropout: AttentionResult? =
      kernelOptions.kernel == .materialized && dropout != nil
      ? try kernelOptions.attention(
        queries: queries, keys: keys, values: values, mask: attentionMask, dropout: nil)
      : nil
    let result = try kernelOptions.attention(
      queries: queries, keys: keys, values: values, mask: attentionMask, dropout: dropout)
    let sources = [queries, keys, values] + [attentionMask.keep].compactMap { $0 }
    try checkFiniteResult(result.output, name: "the output", inputs: sources, biases: [biasTensor])

    let reference = try ReferenceAttention(
      queries: queries, keys: keys, values: values, mask: attentionMask, dropout: dropout)
    let checker = ForwardChecks(
      reference: reference, dropout: dropout,
      sampledRows: RowSample.rows(shape: reference.shape, seed: inputs.seed))
    let checks = Progress().during("checking against the float64 reference") {
      checker.run(result: result, preDropout: (preDropout ?? result).weights)
    }

    let droppedFraction = checker.droppedFraction(result: result, preDropout: preDropout?.weights)
    let run = CheckedRun(
      checks: checks,
      outputs: npyOutputs([(out, result.output), (weightsOut, result.weights)])
        + (try visuals.heatmapOutputs(weights: result.weights)),
      verdict: .init(passed: "Solution verified!", failed: "Solution NOT verified."))
    try run.finish(
      format: report.format,
      json: {
        DropoutReport(
          outputShape: result.output.shape, weightsShape: reference.shape.weightsShape,
          p: Double(inputs.probability.description) ?? Double(inputs.probability),
          seed: inputs.seed, rng: inputs.rng.rawValue,
          training: !inputs.eval,
          kernel: kernelOptions.kernel.flagName,
          mask: inputs.mask.description, droppedFraction: droppedFraction,
          checks: checks.dictionary, verified: run.verified,
          explainBatch: visuals.batch, steps: visuals.steps)
      },
      text: {
        printText(
          result: result, shape: reference.shape, dropped: droppedFraction,
          explanation: visuals.explanation)
      })
  }

  private func printText(
    result: AttentionResult, shape: AttentionShape, dropped: Double, explanation: String?
  ) {
    let mode = inputs.eval ? "eval, no dropout" : "training, p = \(inputs.probability)"
    let generator = inputs.rng == .philox ? "" : ", \(inputs.rng) rng"
    print(
      "Exercise 1: scaled dot-product attention with dropout "
        + "(\(mode), seed \(inputs.seed)\(generator), mask \(inputs.mask), \(kernelOptions.kernel) kernel)"
    )
    if let note = inputs.rng.note(training: !inputs.eval) { print(note) }
    print("Output shape: \(torchSizeDescription(result.output.shape))")
    print("Attention shape: \(torchSizeDescription(shape.weightsShape))")
    if !inputs.eval {
      print(String(format: "Dropped: %.1f%% of the non-zero weights", dropped * 100))
    }
    if let weights = result.weights, shape.batchCount > 0, shape.queries <= 64, shape.keys <= 64 {
      let title = shape.batchCount > 1 ? " (first of \(shape.batchCount) matrices)" : ""
      print("\nAttention weights after dropout\(title):")
      print(
        TerminalHeatmap.render(
          Array(weights.scalars[0..<(shape.queries * shape.keys)]),
          rows: shape.queries, columns: shape.keys))
    }
    if let explanation { print("\n" + explanation) }
  }
}

/// `attn dropout --format json`.
private struct DropoutReport: Encodable {
  var outputShape: [Int]
  var weightsShape: [Int]
  var p: Double
  var seed: UInt64
  var rng: String
  var training: Bool
  var kernel: String
  var mask: String
  var droppedFraction: Double
  var checks: [String: Bool]
  var verified: Bool
  /// With --explain: its batch element and the step matrices (`ExplainStep`).
  var explainBatch: Int?
  var steps: [ExplainStep]?
}
