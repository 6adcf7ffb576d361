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
      Masks as PyTorch: a boolean --attn-mask is True = attend; a float one is added to the \
      scores (-inf masks). --is-causal aligns the diagonal at the top left (PyTorch's is_causal) \
      or, with --causal-align bottom-right, at the bottom right (causal_lower_right: the last \
      query sees every key, as new tokens against a KV cache). --window W (Mistral's sliding \
      window) keeps the W most recent keys the causal alignment allows. K and V may have fewer \
      heads than Q with --enable-gqa (query head h uses key/value head h / (H / Hkv)).
      A query whose keys are all masked gets a zero output row (PyTorch ≥ 2.5).
      """)

  @Option(help: "Query Q [B, H, Tq, D]: PATH.npy or FILE.safetensors:NAME.")
  var query: String

  @Option(help: "Key K [B, Hkv, Tk, D].")
  var key: String

  @Option(help: "Value V [B, Hkv, Tk, Dv].")
  var value: String

  @Option(
    help: "Mask broadcastable to [B, H, Tq, Tk]: boolean (True = attend) or float (added).")
  var attnMask: String?

  @Option(help: "Dropout probability on the weights, in [0, 1] (seeded by --seed).")
  var dropoutP: Float = 0

  @Option(help: "Seed of the dropout decisions (Philox4x32-10).")
  var seed: UInt64 = 42

  @Flag(help: "Causal mask (query i sees keys j ≤ i, or j ≤ i + Tk − Tq bottom-right).")
  var isCausal = false

  @Option(help: "Causal alignment: top-left (PyTorch's is_causal) or bottom-right.")
  var causalAlign: CausalAlignment = .topLeft

  @Option(help: "Scale of Q·Kᵀ (default 1/√D).")
  var scale: Float?

  @Flag(help: "Allow K and V with fewer heads than Q (H % Hkv == 0).")
  var enableGqa = false

  @Option(help: "Sliding window: each query sees at most the W most recent allowed keys.")
  var window: Int?

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

  @Option(help: "Output format: text or json.")
  var format: OutputFormat = .text

  @OptionGroup var kernelOptions: KernelOptions
  @OptionGroup var inputSafety: InputSafetyOptions

  enum OutputDtype: String, ExpressibleByArgument, CaseIterable {
    case float32, float16, input
  }

  func validate() throws {
    guard dropoutP >= 0, dropoutP <= 1 else {
      throw ValidationError("--dropout-p must be in [0, 1], got \(dropoutP)")
    }
    if let window, window < 1 { throw ValidationError("--window must be ≥ 1, got \(window)") }
    if causalAlign != .topLeft && !isCausal && window == nil {
      throw ValidationError("--causal-align goes with --is-causal or --window")
    }
    if window != nil && attnMask != nil {
      // As --is-causal: a window is a causal mask, which PyTorch does not combine with attn_mask.
      throw ValidationError(
        "--attn-mask and --window cannot both be given (the window is a causal mask); put the "
          + "window into the mask")
    }
    if let scale, !scale.isFinite { throw ValidationError("--scale must be finite, got \(scale)") }
    if isCausal && attnMask != nil {
      // PyTorch's own rule for scaled_dot_product_attention.
      throw ValidationError(
        "--attn-mask and --is-causal cannot both be given (PyTorch: explicit attn_mask should "
          + "not be set when is_causal=True); put the causal part into the mask")
    }
    if kernelOptions.kernel == .tiled && weightsOut != nil {
      throw ValidationError(
        "--weights-out needs --kernel materialized or auto: the tiled kernel never holds them")
    }
    try checkOutputs([out, weightsOut], against: [query, key, value, attnMask])
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let q = try files.input(query)
    let k = try files.input(key)
    let v = try files.input(value)
    for (tensor, name) in [(q.tensor, query), (k.tensor, key), (v.tensor, value)] {
      try inputSafety.check(tensor, from: name)
    }
    let mask = try attentionMask(files: files)
    try checkHeads(q.tensor, k.tensor, v.tensor)
    let dropout = dropoutP > 0 ? try Dropout(probability: dropoutP, seed: seed) : nil

    let result = try explainingMemoryBudget {
      try Progress().during("running the \(kernelOptions.kernel.rawValue) kernel") {
        try Attention.scaledDotProduct(
          queries: q.tensor, keys: k.tensor, values: v.tensor, mask: mask, scale: scale,
          dropout: dropout, kernel: kernelOptions.attentionKernel,
          needWeights: weightsOut != nil, threads: kernelOptions.threads,
          memoryBudget: kernelOptions.memoryBudget)
      }
    }
    if let weightsOut, result.weights == nil {
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the weights for \(weightsOut)", neededBytes: nil,
          budgetBytes: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource,
          advice: .other("raise --max-memory, or drop --weights-out")))
    }
    try checkFiniteResult(
      result.output, name: "the output", inputs: [q.tensor, k.tensor, v.tensor],
      biases: [mask.bias])

    let reference = try ReferenceAttention(
      queries: q.tensor, keys: k.tensor, values: v.tensor, mask: mask, scale: scale,
      dropout: dropout)
    let checker = ForwardChecks(
      reference: reference, dropout: dropout,
      sampledRows: RowSample.rows(shape: reference.shape, seed: seed))
    let checks = Progress().during("checking against the float64 reference") {
      checker.run(result: result, preDropout: dropout == nil ? result.weights : nil)
    }
    if checks.allPassed {
      let dtype = outDtype == .input ? q.storage : (outDtype == .float16 ? .float16 : .float32)
      try writeOutputs([
        (out, { try Self.encode(result.output, named: "output", as: dtype, path: out ?? "") }),
        (
          result.weights == nil ? nil : weightsOut,
          { try Self.encode(result.weights!, named: "weights", as: dtype, path: weightsOut ?? "") }
        ),
      ])
    }
    report(result: result, shape: reference.shape, checks: checks, mask: mask)
    if !checks.allPassed { throw ChecksFailed(names: checks.filter { !$0.passed }.map(\.name)) }
  }

  /// `--attn-mask` as PyTorch reads it: booleans keep (True = attend), floats are added.
  private func attentionMask(files: InputFiles) throws -> AttentionMask {
    var mask = AttentionMask(
      isCausal: isCausal, causalAlignment: causalAlign, window: window)
    guard let attnMask else { return mask }
    let (tensor, storage) = try files.input(attnMask)
    switch storage {
    case .bool: mask.keep = tensor
    case .float16, .bfloat16, .float32, .float64:
      try inputSafety.check(tensor, from: attnMask, allowingNegativeInfinity: true)
      mask.bias = tensor
    case .integer:
      throw AttentionError.file(
        path: attnMask,
        message: "an attn_mask must be boolean (True = attend) or floating point (added to the "
          + "scores), as in PyTorch; this one holds integers")
    }
    return mask
  }

  /// PyTorch's rule: K and V with fewer heads than Q only with enable_gqa.
  private func checkHeads(_ q: Tensor, _ k: Tensor, _ v: Tensor) throws {
    guard q.rank >= 3, k.rank >= 3, v.rank >= 3 else { return }
    let (heads, keyHeads, valueHeads) = (
      q.shape[q.rank - 3], k.shape[k.rank - 3], v.shape[v.rank - 3]
    )
    guard heads != keyHeads || heads != valueHeads else { return }
    guard enableGqa else {
      throw AttentionError.shapeMismatch(
        "query has \(heads) heads but key and value have \(keyHeads) and \(valueHeads); pass "
          + "--enable-gqa for grouped-query attention (PyTorch's enable_gqa=True)")
    }
    guard keyHeads == valueHeads, keyHeads > 0, heads % keyHeads == 0 else {
      throw AttentionError.shapeMismatch(
        "with --enable-gqa the query heads (\(heads)) must be a multiple of the key/value heads "
          + "(\(keyHeads), \(valueHeads)), which must be equal")
    }
  }

  /// The bytes of `tensor` for `path`: `.safetensors` (one tensor, `name`) or `.npy`.
  static func encode(
    _ tensor: Tensor, named name: String, as storage: InputFiles.Storage, path: String
  ) throws -> [UInt8] {
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

  private func report(
    result: AttentionResult, shape: AttentionShape, checks: [Check], mask: AttentionMask
  ) {
    let maskText =
      mask.keep != nil ? "boolean mask" : mask.bias != nil ? "float mask (added)" : "no mask"
    let causalText =
      mask.isCausal || mask.window != nil
      ? "causal \(mask.causalAlignment.rawValue)" + (mask.window.map { ", window \($0)" } ?? "")
      : "not causal"
    let heads = shape.batchShape.last ?? 1
    let groupText =
      shape.isGrouped
      ? "\(heads) query heads on \(shape.keyValueBatchShape.last ?? 1) K/V heads"
      : "heads \(heads)"
    switch format {
    case .json:
      try? printJSON(
        SdpaReport(
          outputShape: result.output.shape,
          weightsShape: weightsOut == nil ? nil : shape.weightsShape,
          kernel: result.kernel.rawValue, tilesComputed: result.tilesComputed,
          groupSize: shape.groupSize, isCausal: mask.isCausal || mask.window != nil,
          causalAlign: mask.causalAlignment.rawValue, window: mask.window,
          scale: Double(shape.resolvedScale(scale)), dropoutP: Double(dropoutP),
          checks: checks.dictionary, verified: checks.allPassed))
    case .text:
      print(
        "attn sdpa: query \(shapeForMessage(shape.batchShape + [shape.queries, shape.headDim])), "
          + "output \(shapeForMessage(result.output.shape))")
      print(
        "kernel \(result.kernel.rawValue); \(groupText); \(causalText); \(maskText); "
          + "scale \(shape.resolvedScale(scale)); dropout p = \(dropoutP == 0 ? 0 : dropoutP)")
      print("\nChecks:")
      print(checks.report())
      print(checks.allPassed ? "\nVerified." : "\nNOT verified.")
    }
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
  var scale: Double
  var dropoutP: Double
  var checks: [String: Bool]
  var verified: Bool
}
