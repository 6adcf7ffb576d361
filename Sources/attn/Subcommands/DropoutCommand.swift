import ArgumentParser
import AttentionKit
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

  @Option(help: "Dropout probability on the attention weights, in [0, 1].")
  var p: Float = 0.1

  @Option(help: "Sequence length (Tq = Tk) of the random inputs.")
  var seqLen: Int = 4

  @Option(name: .customLong("d-k"), help: "Head dimension D (d_k) of the random inputs.")
  var headDim: Int = 8

  @Option(help: "Batch size of the random inputs.")
  var batch: Int = 1

  @Option(help: "Seed for the inputs and the dropout mask (with --rng torch: torch.manual_seed).")
  var seed: UInt64 = 42

  @Option(help: RandomSource.helpText)
  var rng: RandomSource = .philox

  @Flag(help: "Evaluation mode: no dropout (as training=False).")
  var eval = false

  @Option(
    help:
      "Mask: none, causal, or a .npy of 0/1 or booleans broadcastable to […, Tq, Tk] (0 = masked).")
  var mask: MaskChoice = .none

  @Option(
    help: "Additive float mask (.npy) broadcastable to […, Tq, Tk], added to the scaled scores.")
  var bias: String?

  @Option(help: "Queries Q […, Tq, D] (.npy); give --q, --k and --v together.")
  var q: String?

  @Option(help: "Keys K […, Tk, D] (.npy).")
  var k: String?

  @Option(help: "Values V […, Tk, Dv] (.npy).")
  var v: String?

  @Option(help: "Write the output […, Tq, Dv] as float32 .npy.")
  var out: String?

  @Option(help: "Write the attention weights after dropout […, Tq, Tk] as float32 .npy.")
  var weightsOut: String?

  @Option(help: "Output format: text or json.")
  var format: OutputFormat = .text

  @OptionGroup var kernelOptions: KernelOptions

  @OptionGroup var inputSafety: InputSafetyOptions

  @OptionGroup var visualization: VisualizationOptions

  /// `--p`, with `-0` read as 0 (the same probability, printed as such).
  var probability: Float { p == 0 ? 0 : p }

  func validate() throws {
    guard p >= 0, p <= 1 else { throw ValidationError("--p must be in [0, 1], got \(p)") }
    guard seqLen > 0 else { throw ValidationError("--seq-len must be positive, got \(seqLen)") }
    guard headDim > 0 else { throw ValidationError("--d-k must be positive, got \(headDim)") }
    guard batch > 0 else { throw ValidationError("--batch must be positive, got \(batch)") }
    let given = [q, k, v].compactMap { $0 }.count
    guard given == 0 || given == 3 else {
      throw ValidationError("give --q, --k and --v together (or none, for random inputs)")
    }
    if given == 3 && rng == .torch {
      throw ValidationError(
        "--rng torch draws Q, K and V; it cannot be combined with --q, --k, --v")
    }
    if kernelOptions.kernel == .tiled && weightsOut != nil {
      throw ValidationError(
        "--weights-out needs --kernel materialized: the tiled kernel never holds the weights")
    }
    try visualization.check(
      kernel: kernelOptions.kernel, batchCount: given == 0 ? batch : nil, queries: seqLen,
      keys: seqLen)
    try checkOutputs(
      [out, weightsOut] + visualization.heatmapPaths(positionFigure: false),
      against: [q, k, v, bias, mask.path])
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let (queries, keys, values) = try loadInputs(files)
    let biasTensor = try bias.map(files.tensor)
    let attentionMask = try mask.resolve(bias: biasTensor, inputs: files)
    try inputSafety.check(
      [(queries, q), (keys, k), (values, v), (attentionMask.keep, mask.path)],
      biases: [(biasTensor, bias)])
    let dropout = eval ? nil : try Dropout(probability: probability, seed: seed)
    // --explain and --heatmap: checks the shapes now, computes the steps from the same inputs.
    let visuals = try visualization.dropout(
      queries: queries, keys: keys, values: values, mask: attentionMask, dropout: dropout,
      maskName: mask.description, seed: seed, rng: rng.rawValue,
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
    let inputs = [queries, keys, values] + [attentionMask.keep].compactMap { $0 }
    try checkFiniteResult(result.output, name: "the output", inputs: inputs, biases: [biasTensor])

    let reference = try ReferenceAttention(
      queries: queries, keys: keys, values: values, mask: attentionMask, dropout: dropout)
    let checker = AttentionChecks(
      reference: reference, dropout: dropout,
      sampledRows: AttentionChecks.sampleRows(shape: reference.shape, seed: seed))
    let checks = Progress().during("checking against the float64 reference") {
      checker.run(result: result, preDropout: (preDropout ?? result).weights)
    }

    // Only a verified result is written, so a failed check leaves every file as it was.
    if checks.allPassed {
      try writeOutputs(npy: [(out, result.output), (weightsOut, result.weights)])
      try visuals.writeHeatmaps(weights: result.weights)
    }

    let droppedFraction = checker.droppedFraction(result: result, preDropout: preDropout?.weights)
    switch format {
    case .json:
      try printJSON(
        DropoutReport(
          outputShape: result.output.shape, weightsShape: reference.shape.weightsShape,
          p: Double(probability.description) ?? Double(probability), seed: seed, rng: rng.rawValue,
          training: !eval,
          kernel: kernelOptions.kernel.rawValue,
          mask: mask.description, droppedFraction: droppedFraction,
          checks: checks.dictionary, verified: checks.allPassed,
          explainBatch: visuals.batch, steps: visuals.steps))
    case .text:
      printText(
        result: result, shape: reference.shape, checks: checks, dropped: droppedFraction,
        explanation: visuals.explanation)
    }
    if !checks.allPassed { throw ChecksFailed(names: checks.filter { !$0.passed }.map(\.name)) }
  }

  private func loadInputs(_ files: InputFiles) throws -> (Tensor, Tensor, Tensor) {
    if let q, let k, let v {
      return (try files.tensor(q), try files.tensor(k), try files.tensor(v))
    }
    let shape = [batch, seqLen, headDim]
    try MemoryGuard.check(
      [[3, batch, seqLen, headDim], [batch, seqLen, headDim]],
      for: "the random Q, K, V and the output (--batch × --seq-len × --d-k)",
      budget: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource)
    switch rng {
    case .philox:
      return (
        try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.queries),
        try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys),
        try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
      )
    case .torch:
      // The notebook: torch.manual_seed(42); Q = torch.randn(1, 4, 8); K = …; V = … (in order).
      var generator = TorchGenerator(seed: seed)
      let queries = try generator.randn(shape: shape)
      let keys = try generator.randn(shape: shape)
      let values = try generator.randn(shape: shape)
      return (queries, keys, values)
    }
  }

  private func printText(
    result: AttentionResult, shape: AttentionShape, checks: [Check], dropped: Double,
    explanation: String?
  ) {
    let mode = eval ? "eval, no dropout" : "training, p = \(probability)"
    let generator = rng == .philox ? "" : ", \(rng) rng"
    print(
      "Exercise 1: scaled dot-product attention with dropout "
        + "(\(mode), seed \(seed)\(generator), mask \(mask), \(kernelOptions.kernel) kernel)")
    if let note = rng.note(training: !eval) { print(note) }
    print("Output shape: \(torchSizeDescription(result.output.shape))")
    print("Attention shape: \(torchSizeDescription(shape.weightsShape))")
    if !eval {
      print(String(format: "Dropped: %.1f%% of the non-zero weights", dropped * 100))
    }
    if let explanation { print("\n" + explanation) }
    print("\nChecks:")
    print(checks.report())
    if let weights = result.weights, shape.batchCount > 0, shape.queries <= 64, shape.keys <= 64 {
      let title = shape.batchCount > 1 ? " (first of \(shape.batchCount) matrices)" : ""
      print("\nAttention weights after dropout\(title):")
      print(
        TerminalHeatmap.render(
          Array(weights.scalars[0..<(shape.queries * shape.keys)]),
          rows: shape.queries, columns: shape.keys))
    }
    print(checks.allPassed ? "\nSolution verified!" : "\nSolution NOT verified.")
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
