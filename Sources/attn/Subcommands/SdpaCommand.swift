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
    try checkOutputs([out, weightsOut], against: problem.paths)
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let (queries, keys, values, mask, terms, storage) = try problem.load(
      files, safety: inputSafety)
    let scale = problem.scale
    let dropout = dropoutP > 0 ? try Dropout(probability: dropoutP, seed: seed) : nil

    let result = try explainingMemoryBudget {
      try Progress().during("running the \(kernelOptions.kernel.flagName) kernel") {
        try Attention.scaledDotProduct(
          queries: queries, keys: keys, values: values, mask: mask, scale: scale,
          dropout: dropout, terms: terms, kernel: kernelOptions.kernel,
          needWeights: weightsOut != nil, threads: kernelOptions.threads,
          memoryBudget: kernelOptions.memoryBudget)
      }
    }
    if let weightsOut, result.weights == nil {
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the weights for \(weightsOut)",
          neededBytes: MemoryGuard.floatBytes([
            try AttentionShape(queries: queries, keys: keys, values: values).weightsShape
          ]),
          budgetBytes: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource,
          advice: .other("raise --max-memory, or drop --weights-out")))
    }
    try checkFiniteResult(
      result.output, name: "the output", inputs: [queries, keys, values],
      biases: [mask.bias])

    let reference = try ReferenceAttention(
      queries: queries, keys: keys, values: values, mask: mask, scale: scale,
      dropout: dropout, terms: terms)
    let checker = ForwardChecks(
      reference: reference, dropout: dropout,
      sampledRows: RowSample.rows(shape: reference.shape, seed: seed))
    let checks = Progress().during("checking against the float64 reference") {
      checker.run(result: result, preDropout: dropout == nil ? result.weights : nil)
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
    let run = CheckedRun(checks: checks, outputs: outputs)
    let shape = reference.shape
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
          checks: checks.dictionary, verified: run.verified)
      },
      text: { printText(result: result, shape: shape, mask: mask, terms: terms) })
  }

  /// The bytes of `tensor` for `path`: `.safetensors` (one tensor, `name`) or `.npy`.
  static func encode(
    _ tensor: Tensor, named name: String, as storage: InputFiles.Storage, path: String
  ) throws -> [UInt8] {
    try storage.checkRepresentable(tensor, named: "the \(name)", path: path)
    if path.hasSuffix(".safetensors") {
      let dtype: SafeTensorsDType =
        storage == .float16
        ? .f16 : storage == .bfloat16 ? .bf16 : storage == .float64 ? .f64 : .f32
      return try SafeTensors.encode([name: tensor], dtype: dtype)
    }
    switch storage {
    case .float16: return NPY.encode(tensor, dtype: .float16)
    case .float64: return NPY.encode(tensor, dtype: .float64)
    case .bfloat16:
      throw AttentionError.file(
        path: path,
        message: "numpy has no bfloat16: write a .safetensors file, or pass --out-dtype float32")
    default: return NPY.encode(tensor)
    }
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

/// `attn sdpa --format json`.
private struct SdpaReport: Encodable {
  var outputShape: [Int]
  var weightsShape: [Int]?
  var kernel: String
  var tilesComputed: Int?
  var groupSize: Int
  var isCausal: Bool
  var causalAlign: String
  var window: Int?
  /// `null` for D = 0 (see `SdpaInputOptions.reportedScale`).
  var scale: NullableNumber
  var dropoutP: Double
  /// "soft-cap 30, ALiBi (BLOOM's slopes), sinks"; absent without score terms.
  var scoreTerms: String?
  var checks: [String: Bool]
  var verified: Bool
}
