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
      --seed, or loaded from .npy files of shapes […, Tq, D], […, Tk, D], […, Tk, Dv].
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

  @Option(help: "Head dimension d_k of the random inputs.")
  var dK: Int = 8

  @Option(help: "Batch size of the random inputs.")
  var batch: Int = 1

  @Option(help: "Seed for the inputs and the dropout mask (Philox4x32-10).")
  var seed: UInt64 = 42

  @Flag(help: "Evaluation mode: no dropout (as training=False).")
  var eval = false

  @Option(help: "Mask: none, causal, or a .npy of 0/1 or booleans broadcastable to […, Tq, Tk] (0 = masked).")
  var mask: MaskChoice = .none

  @Option(help: "Additive float mask (.npy) broadcastable to […, Tq, Tk], added to the scaled scores.")
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

  func validate() throws {
    guard p >= 0, p <= 1 else { throw ValidationError("--p must be in [0, 1], got \(p)") }
    guard seqLen > 0 else { throw ValidationError("--seq-len must be positive, got \(seqLen)") }
    guard dK > 0 else { throw ValidationError("--d-k must be positive, got \(dK)") }
    guard batch > 0 else { throw ValidationError("--batch must be positive, got \(batch)") }
    let given = [q, k, v].compactMap { $0 }.count
    guard given == 0 || given == 3 else {
      throw ValidationError("give --q, --k and --v together (or none, for random inputs)")
    }
    if kernelOptions.kernel == .tiled && weightsOut != nil {
      throw ValidationError("--weights-out needs --kernel materialized: the tiled kernel never holds the weights")
    }
    try checkOutputs([out, weightsOut], against: [q, k, v, bias, mask.path])
  }

  func run() throws {
    let (queries, keys, values) = try loadInputs()
    let biasTensor = try bias.map(loadTensor)
    let attentionMask = try mask.resolve(bias: biasTensor)
    let dropout = eval ? nil : try Dropout(probability: p, seed: seed)

    // The kernel's own weights without dropout, for the checks (the materialized kernel only).
    let preDropout: AttentionResult? =
      kernelOptions.kernel == .materialized && dropout != nil
      ? try kernelOptions.attention(
        queries: queries, keys: keys, values: values, mask: attentionMask, dropout: nil)
      : nil
    let result = try kernelOptions.attention(
      queries: queries, keys: keys, values: values, mask: attentionMask, dropout: dropout)

    let reference = try ReferenceAttention(
      queries: queries, keys: keys, values: values, mask: attentionMask, dropout: dropout)
    let checker = AttentionChecks(
      reference: reference, dropout: dropout,
      sampledRows: AttentionChecks.sampleRows(shape: reference.shape, seed: seed))
    let checks = checker.run(result: result, preDropout: (preDropout ?? result).weights)

    if let out { try saveTensor(result.output, to: out) }
    if let weightsOut, let weights = result.weights { try saveTensor(weights, to: weightsOut) }

    let droppedFraction = checker.droppedFraction(result: result, preDropout: preDropout?.weights)
    switch format {
    case .json:
      try printJSON(DropoutReport(
        output_shape: result.output.shape, weights_shape: reference.shape.weightsShape,
        p: Double(p.description) ?? Double(p), seed: seed, training: !eval,
        kernel: kernelOptions.kernel.rawValue,
        mask: mask.description, dropped_fraction: droppedFraction,
        checks: checks.dictionary, verified: checks.allPassed))
    case .text:
      printText(result: result, shape: reference.shape, checks: checks, dropped: droppedFraction)
    }
    if !checks.allPassed { throw ChecksFailed(names: checks.filter { !$0.passed }.map(\.name)) }
  }

  private func loadInputs() throws -> (Tensor, Tensor, Tensor) {
    if let q, let k, let v {
      return (try loadTensor(q), try loadTensor(k), try loadTensor(v))
    }
    let shape = [batch, seqLen, dK]
    return (
      try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.queries),
      try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys),
      try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
    )
  }

  private func printText(result: AttentionResult, shape: AttentionShape, checks: [Check], dropped: Double) {
    let mode = eval ? "eval, no dropout" : "training, p = \(p)"
    print("Exercise 1: scaled dot-product attention with dropout "
      + "(\(mode), seed \(seed), mask \(mask), \(kernelOptions.kernel) kernel)")
    print("Output shape: \(torchSizeDescription(result.output.shape))")
    print("Attention shape: \(torchSizeDescription(shape.weightsShape))")
    if !eval {
      print(String(format: "Dropped: %.1f%% of the non-zero weights", dropped * 100))
    }
    print("\nChecks:")
    print(checks.report())
    if let weights = result.weights, shape.queries <= 64, shape.keys <= 64 {
      let title = shape.batchCount > 1 ? " (first of \(shape.batchCount) matrices)" : ""
      print("\nAttention weights after dropout\(title):")
      print(TerminalHeatmap.render(
        Array(weights.scalars[0..<(shape.queries * shape.keys)]),
        rows: shape.queries, columns: shape.keys))
    }
    print(checks.allPassed ? "\nSolution verified!" : "\nSolution NOT verified.")
  }
}

/// `attn dropout --format json`.
private struct DropoutReport: Encodable {
  var output_shape: [Int]
  var weights_shape: [Int]
  var p: Double
  var seed: UInt64
  var training: Bool
  var kernel: String
  var mask: String
  var dropped_fraction: Double
  var checks: [String: Bool]
  var verified: Bool
}
