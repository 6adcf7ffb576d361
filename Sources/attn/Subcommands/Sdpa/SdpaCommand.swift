import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// `attn sdpa`: PyTorch's `F.scaled_dot_product_attention` as a command, with PyTorch's
/// conventions (not the notebook's): a boolean `--attn-mask` is True = attend, a float one is
/// added to the scores.
struct SdpaCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "sdpa",
    abstract: "PyTorch's scaled_dot_product_attention on your tensors, checked.",
    discussion: """
      F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, \
      enable_gqa) on .npy files (<f4, <f8, <f2) or tensors of safetensors files \
      (FILE.safetensors:NAME; F32, F16, BF16, F64), computed in float32 on the chosen kernel and \
      verified against a float64 reference on sampled rows.
      Score terms PyTorch's SDPA has no argument for: --softcap C (Gemma 2), --alibi or \
      --alibi-slopes S (BLOOM, MPT), --t5-bias T (T5), --sinks S (gpt-oss); docs/conventions.md \
      defines them.
      Masks as PyTorch: a boolean --attn-mask (|b1, or BOOL in safetensors) is True = attend; \
      a float one is added to the scores (-inf masks). --is-causal aligns the diagonal at the top left (PyTorch's is_causal) \
      or, with --causal-align bottom-right, at the bottom right (causal_lower_right: the last \
      query sees every key, as new tokens against a KV cache). --window W (Mistral's sliding \
      window) keeps the W most recent keys the causal alignment allows. K and V may have fewer \
      heads than Q with --enable-gqa (query head h uses key/value head h / (H / Hkv)).
      A query whose keys are all masked gets a zero output row (PyTorch ≥ 2.5).
      --grad-out dO also runs the backward pass (--dq-out, --dk-out, --dv-out, --dmask-out, \
      --dsinks-out, --dt5-out), checked as attn backward checks; --kv-dtype float16|bfloat16|q8 \
      stores K and V compactly first, as a KV cache would.
      """)

  @OptionGroup var problem: SdpaInputOptions

  @Option(help: "Dropout probability on the weights, in [0, 1] (seeded by --seed).")
  var dropoutP: Double = 0

  @Option(help: "Seed of the dropout decisions (Philox4x32-10).")
  var seed: UInt64 = 42

  @Option(help: "Write the output [B, H, Tq, Dv] (.npy, or .safetensors as tensor \"output\").")
  var out: String?

  @Option(help: "Write the attention weights [B, H, Tq, Tk] (needs the materialized kernel).")
  var weightsOut: String?

  @Option(
    help: """
      Element type of the written tensors: float32, float16, or input (the query's: float16, \
      bfloat16 (safetensors only), float32 or float64).
      """)
  var outDtype: OutputDtype = .float32

  @OptionGroup var gradient: SdpaGradientOptions

  @OptionGroup var kvStorage: SdpaKVStorageOptions

  @OptionGroup var report: ReportFormatOptions

  @OptionGroup var kernelOptions: KernelOptions
  @OptionGroup var inputSafety: InputSafetyOptions

  enum OutputDtype: String, ExpressibleByArgument, CaseIterable {
    case float32, float16, input
  }

  func validate() throws {
    guard dropoutP >= 0, dropoutP <= 1 else {
      throw ValidationError("--dropout-p must be in [0, 1], got \(dropoutP)")
    }
    if kernelOptions.kernel.isTiled && weightsOut != nil {
      throw ValidationError(
        "--weights-out needs --kernel materialized or auto: the tiled kernel never holds them")
    }
    try gradient.validate(with: problem)
    try kvStorage.validate(dropout: dropoutP, gradient: gradient)
    try checkOutputs(
      [out, weightsOut] + gradient.outputs, against: problem.paths + [gradient.gradOut])
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let (queries, keys, values, mask, terms, storage) = try problem.load(
      files, safety: inputSafety)
    let scale = problem.scale
    let dropout = dropoutP > 0 ? try Dropout(probability: dropoutP, seed: seed) : nil
    let shape = try AttentionShape(queries: queries, keys: keys, values: values)
    let gradOutput = try gradient.gradOutput(files, shape: shape, safety: inputSafety)
    if gradOutput != nil {
      // How the gradients can be checked is settled before any work.
      _ = try GradientVerification.needsSampling(
        shape,
        kernel: Attention.resolve(
          kernelOptions.kernel, shape: shape, needWeights: weightsOut != nil,
          memoryBudget: kernelOptions.memoryBudget))
    }

    let stored = try kvStorage.store(keys: keys, values: values)
    let result = try explainingMemoryBudget {
      try Progress().during("running the \(kernelOptions.kernel.flagName) kernel") {
        try stored.map {
          try Attention.scaledDotProduct(
            queries: queries, cache: $0, mask: mask, scale: scale, terms: terms,
            kernel: kernelOptions.kernel, needWeights: weightsOut != nil,
            threads: kernelOptions.threads, memoryBudget: kernelOptions.memoryBudget)
        }
          ?? Attention.scaledDotProduct(
            queries: queries, keys: keys, values: values, mask: mask, scale: scale,
            dropout: dropout, terms: terms, kernel: kernelOptions.kernel,
            needWeights: weightsOut != nil, threads: kernelOptions.threads,
            memoryBudget: kernelOptions.memoryBudget,
            // The backward reuses the tiled forward's output and log-sum-exp.
            needLogSumExp: gradOutput != nil && kernelOptions.kernel != .materialized
              && kernelOptions.kernel != .reference && weightsOut == nil)
      }
    }
    // The storage's effect: the same call on the given K and V.
    let storageReport = try stored.map { _ in
      SdpaKVStorageReport(
        kvDtype: kvStorage.kvDtype!.rawValue,
        effect: KVCacheEffect(
          decoded: result.output,
          full: try Attention.scaledDotProduct(
            queries: queries, keys: keys, values: values, mask: mask, scale: scale, terms: terms,
            kernel: kernelOptions.kernel, threads: kernelOptions.threads,
            memoryBudget: kernelOptions.memoryBudget
          ).output))
    }

    if let weightsOut, result.weights == nil {
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the weights for \(weightsOut)",
          neededBytes: MemoryGuard.floatBytes([shape.weightsShape]),
          budgetBytes: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource,
          advice: .other("raise --max-memory, or drop --weights-out")))
    }
    try checkFiniteResult(
      result.output, name: "the output", inputs: [queries, keys, values],
      biases: [mask.bias])

    // With --kv-dtype, the reference of the stored K and V (exact in float32).
    let reference = try ReferenceAttention(
      queries: queries, keys: stored?.storedKeys() ?? keys,
      values: stored?.storedValues() ?? values, mask: mask, scale: scale, dropout: dropout,
      terms: terms)
    let checker = ForwardChecks(
      reference: reference, dropout: dropout,
      sampledRows: RowSample.rows(shape: reference.shape, seed: seed))
    let checks = Progress().during("checking against the float64 reference") {
      checker.run(result: result, preDropout: dropout == nil ? result.weights : nil)
    }
    let backward = try gradOutput.map {
      try SdpaBackward(
        problem: AttentionProblem(
          queries: queries, keys: keys, values: values, mask: mask, scale: scale,
          dropout: dropout, terms: terms),
        gradOutput: $0, forward: result, needMaskGradient: gradient.dmaskOut != nil,
        kernel: kernelOptions, seed: seed)
    }
    let dtype = outDtype == .input ? storage : (outDtype == .float16 ? .float16 : .float32)
    var outputs: [(path: String?, bytes: () throws -> [UInt8])] = [
      (out, { try Self.encode(result.output, named: "output", as: dtype, path: out ?? "") })
    ]
    if let weights = result.weights {
      outputs.append(
        (
          weightsOut,
          { try Self.encode(weights, named: "weights", as: dtype, path: weightsOut ?? "") }
        )
      )
    }
    for file in backward?.outputs(gradient) ?? [] {
      guard let path = file.path, let tensor = file.tensor else { continue }
      outputs.append((path, { try Self.encode(tensor, named: file.name, as: dtype, path: path) }))
    }
    let run = CheckedRun(
      groups: [("Checks", checks), ("Gradient checks", backward?.checks ?? [])], outputs: outputs)
    try run.finish(
      format: report.format,
      json: {
        SdpaReport(
          outputShape: result.output.shape,
          weightsShape: weightsOut == nil ? nil : shape.weightsShape,
          kernel: result.kernel.flagName, tilesComputed: result.tilesComputed,
          groupSize: shape.groupSize, isCausal: mask.isCausal || mask.window != nil,
          causalAlign: mask.causalAlignment.rawValue, window: mask.window,
          scale: NullableNumber(SdpaInputOptions.reportedScale(shape, problem.scale)),
          dropoutP: Double(dropoutP), scoreTerms: problem.scoreTerms.description(terms),
          kvStorage: storageReport,
          checks: checks.dictionary, gradients: backward.map(SdpaGradientReport.init),
          verified: run.verified)
      },
      text: {
        printText(result: result, shape: shape, mask: mask, terms: terms)
        if let storageReport { print(storageReport.line) }
        if let g = backward?.gradients {
          print(
            "backward (\(g.kernel.flagName)): dQ \(shapeForMessage(g.dQ.shape)), dK "
              + "\(shapeForMessage(g.dK.shape)), dV \(shapeForMessage(g.dV.shape))"
              + (g.dSinks.map { ", d(sinks) \(shapeForMessage($0.shape))" } ?? "")
              + (g.dT5Tables.first.map { ", d(T5 table) \(shapeForMessage($0.shape))" } ?? "")
              + (g.dBias.map { ", d(attn_mask) \(shapeForMessage($0.shape))" } ?? ""))
        }
      })
  }

  private func printText(
    result: AttentionResult, shape: AttentionShape, mask: AttentionMask, terms: ScoreTerms
  ) {
    let maskText =
      mask.keep != nil ? "boolean mask" : mask.bias != nil ? "float mask (added)" : "no mask"
    let causalText = SdpaInputOptions.causalDescription(mask)
    let heads = shape.batchShape.last ?? 1
    let groupText =
      shape.isGrouped
      ? "\(heads) query heads on \(shape.keyValueBatchShape.last ?? 1) K/V heads"
      : "heads \(heads)"
    print(
      "attn sdpa: query \(shapeForMessage(shape.batchShape + [shape.queries, shape.headDim])), "
        + "output \(shapeForMessage(result.output.shape))")
    print(
      "kernel \(result.kernel.flagName); \(groupText); \(causalText); \(maskText); "
        + "scale \(shape.resolvedScale(problem.scale)); dropout p = \(dropoutP == 0 ? 0 : dropoutP)"
    )
    if let described = problem.scoreTerms.description(terms) { print("score terms: \(described)") }
  }
}

extension CausalAlignment: ExpressibleByArgument {}
