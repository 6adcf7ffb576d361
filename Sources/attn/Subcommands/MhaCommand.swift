import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// `attn mha`: a real model's attention layer — `nn.MultiheadAttention`, Hugging Face's
/// `BertAttention` or `LlamaAttention` — loaded from the model's safetensors file and run on
/// your input, checked against the same layer in float64; with `--decode`, token by token
/// through a KV cache.
struct MhaCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "mha",
    abstract: "Run a model's multi-head attention layer from its weights file, checked.",
    discussion: """
      Loads one layer from a safetensors file (a whole model's file: --prefix names the layer, \
      e.g. encoder.layer.3.attention. or model.layers.0.self_attn.) in one of three layouts:
        torch  nn.MultiheadAttention (in_proj_weight, in_proj_bias, out_proj.*), batch_first
        bert   Hugging Face BertAttention (self.query/key/value.*, output.dense.*, \
      output.LayerNorm.*); the output is LayerNorm(dense(ctx) + x)
        llama  Hugging Face LlamaAttention (q_proj, k_proj, v_proj, o_proj; grouped-query heads, \
      rotary embeddings with --rope-theta, causal)
      and runs it on --input [B, T, E]. Masks: --key-padding-mask [B, T] (True = padding, as \
      PyTorch's key_padding_mask), --attn-mask as PyTorch's SDPA (boolean True = attend, float \
      added; nn.MultiheadAttention's own boolean attn_mask is the opposite), --is-causal. A query \
      that sees no key gets a zero attention output (PyTorch's nn.MultiheadAttention gives NaN).
      --decode runs the sequence token by token through a KV cache (causal), times each token, \
      and checks the outputs against the full pass.
      """)

  @Option(help: "The model's weights (.safetensors).")
  var weights: String

  @Option(help: "Weight layout: torch (nn.MultiheadAttention), bert (BertAttention) or llama.")
  var layout: WeightLayout

  @Option(help: "The layer's name prefix in the file (a '.' is added if missing).")
  var prefix = ""

  @Option(help: "Query heads H.")
  var heads: Int

  @Option(help: "Key/value heads Hkv (llama: inferred from k_proj; torch and bert: H).")
  var kvHeads: Int?

  @Option(help: "Rotary embeddings' theta (llama: 10000 by default; torch/bert: none by default).")
  var ropeTheta: Double?

  @Option(help: "Rotary layout: half (GPT-NeoX, HF Llama) or interleaved (GPT-J).")
  var ropeLayout: RotaryEmbedding.Layout = .half

  @Option(help: "Position of the first token, for rotary embeddings.")
  var positionOffset = 0

  @Option(help: "BERT's LayerNorm epsilon (default 1e-12).")
  var layerNormEps: Float?

  @Option(help: "Input x [B, T, E]: PATH.npy or FILE.safetensors:NAME.")
  var input: String

  @Option(help: "Key padding mask [B, T]: booleans or 0/1, True = padding (hidden).")
  var keyPaddingMask: String?

  @Option(help: "Attention mask broadcastable to [B, H, T, T]: boolean (True = attend) or float.")
  var attnMask: String?

  @Flag(help: "Causal: query i sees keys j ≤ i (always on for llama and with --decode).")
  var isCausal = false

  @Option(help: "Write the output [B, T, E] (.npy).")
  var out: String?

  @Option(help: "Write the attention weights [B, H, T, T] (.npy; [B, T, T] with --average-heads).")
  var weightsOut: String?

  @Flag(help: "Average the written weights over the heads (average_attn_weights=True).")
  var averageHeads = false

  @Option(
    help: ArgumentHelp(
      "Write an SVG heatmap of every head's weights for one batch element (--heatmap-batch).",
      valueName: "path.svg"))
  var heatmap: String?

  @Option(help: "The batch element --heatmap draws (default 0).")
  var heatmapBatch = 0

  @Option(help: "Comma-separated tokens that label the heatmap's axes (one per position).")
  var tokens: String?

  @Flag(help: "Also run the sequence token by token through a KV cache; time and check it.")
  var decode = false

  @Option(help: "Seed of the sampled rows the checks compare.")
  var seed: UInt64 = 42

  @Option(help: "Output format: text or json.")
  var format: OutputFormat = .text

  @OptionGroup var kernelOptions: KernelOptions
  @OptionGroup var inputSafety: InputSafetyOptions

  /// Heads drawn in one figure.
  static let maxHeatmapPanels = 32

  var tokenList: [String]? {
    tokens.map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
  }

  func validate() throws {
    try FlagLimits.check("--heads", heads, in: 1...FlagLimits.heads)
    if let kvHeads { try FlagLimits.check("--kv-heads", kvHeads, in: 1...FlagLimits.heads) }
    if let ropeTheta, !(ropeTheta.isFinite && ropeTheta > 0) {
      throw ValidationError("--rope-theta must be a positive number, got \(ropeTheta)")
    }
    guard positionOffset >= 0 else {
      throw ValidationError("--position-offset must be ≥ 0, got \(positionOffset)")
    }
    if let layerNormEps, !(layerNormEps.isFinite && layerNormEps >= 0) {
      throw ValidationError("--layer-norm-eps must be ≥ 0, got \(layerNormEps)")
    }
    if layerNormEps != nil && layout != .bert {
      throw ValidationError("--layer-norm-eps goes with --layout bert")
    }
    if averageHeads && weightsOut == nil {
      throw ValidationError("--average-heads goes with --weights-out")
    }
    if tokens != nil && heatmap == nil { throw ValidationError("--tokens goes with --heatmap") }
    if heatmapBatch < 0 {
      throw ValidationError("--heatmap-batch must be ≥ 0, got \(heatmapBatch)")
    }
    if let heatmap, heatmap.isEmpty { throw ValidationError("--heatmap needs a file path") }
    if kernelOptions.kernel == .tiled && (weightsOut != nil || heatmap != nil) {
      throw ValidationError(
        "--weights-out and --heatmap need --kernel materialized or auto: the tiled kernel never "
          + "holds the weights")
    }
    try checkOutputs(
      [out, weightsOut, heatmap], against: [weights, input, keyPaddingMask, attnMask])
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let layer = try loadLayer(files: files)
    let x = try files.input(input).tensor
    try inputSafety.check(x, from: input)
    guard x.rank == 3, x.shape[2] == layer.embedDim else {
      throw AttentionError.file(
        path: input,
        message: "holds \(shapeForMessage(x.shape)); the layer takes [B, T, E] with E = "
          + "\(layer.embedDim)")
    }
    let (batch, length) = (x.shape[0], x.shape[1])
    try checkHeatmap(batch: batch, length: length, heads: layer.heads)
    let padding = try keyPaddingMask.map {
      try paddingMask($0, files: files, batch: batch, length: length)
    }
    var mask = try attentionMask(files: files)
    mask.isCausal = isCausal || decode || layout == .llama

    let needWeights = weightsOut != nil || heatmap != nil
    let result = try explainingMemoryBudget {
      try Progress().during("running the layer") {
        try layer(
          x, keyPaddingMask: padding, attentionMask: mask, positionOffset: positionOffset,
          kernel: kernelOptions.attentionKernel, needWeights: needWeights,
          threads: kernelOptions.threads, memoryBudget: kernelOptions.memoryBudget)
      }
    }
    if needWeights && result.weights == nil {
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the [B, H, T, T] weights for --weights-out or --heatmap", neededBytes: nil,
          budgetBytes: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource,
          advice: .other("raise --max-memory, or drop --weights-out and --heatmap")))
    }
    try checkFiniteResult(
      result.output, name: "the output", inputs: [x] + Array(layer.parameters),
      biases: [mask.bias])
    let decoded = try decode ? runDecode(layer, x: x, padding: padding, mask: mask) : nil

    let reference = try MultiHeadReference(
      layer: layer, input: x, keyPaddingMask: padding, attentionMask: mask,
      positionOffset: positionOffset)
    let rows = RowSample.rows(batchCount: batch, queries: length, seed: seed)
      .map { (batch: $0.batch, token: $0.query) }
    let heads = try layer.project(x, positionOffset: positionOffset)
    let combined = try MultiHeadAttention.combinedMask(
      mask, keyPaddingMask: padding, batch: batch, keys: length)
    let checks = try Progress().during("checking against the float64 layer") { () -> [Check] in
      try LayerStageChecks(reference: reference, rows: rows).run(
        heads: heads, mask: combined, attention: result.attention, output: result.output)
        + LayerChecks(reference: reference, rows: rows).run(
          output: result.output, weights: result.weights, decoded: decoded?.output)
    }
    if checks.allPassed {
      let written = averageHeads ? result.averagedWeights : result.weights
      var outputs: [(path: String?, bytes: () throws -> [UInt8])] = [
        (out, { NPY.encode(result.output) }),
        (weightsOut, { NPY.encode(written!) }),
      ]
      if let heatmap, let weights = result.weights {
        let figure = HeadsFigure.make(
          weights: weights, reference: reference, batch: heatmapBatch, tokens: tokenList,
          title: "attn mha: \(layout.rawValue) layer\(prefix.isEmpty ? "" : " \(prefix)")")
        outputs.append((heatmap, { figure.document().bytes() }))
      }
      try writeOutputs(outputs)
    }
    report(
      layer: layer, x: x, result: result, mask: mask, padding: padding, decoded: decoded,
      checks: checks)
    if !checks.allPassed { throw ChecksFailed(names: checks.filter { !$0.passed }.map(\.name)) }
  }

  /// The layer from `--weights`, its errors naming the file.
  private func loadLayer(files: InputFiles) throws -> MultiHeadAttention {
    let options = MultiHeadAttention.LoadOptions(
      prefix: prefix, heads: heads, keyValueHeads: kvHeads, ropeTheta: ropeTheta,
      ropeLayout: ropeLayout, layerNormEpsilon: layerNormEps)
    // Only the layer's tensors are read: a whole model's other tensors (integer buffers, other
    // layers) are skipped, and cost neither memory nor a dtype error.
    let file = try files.safetensors(weights, prefix: options.normalizedPrefix)
    if file.tensors.isEmpty {
      let some = file.skippedNames.prefix(4).map { quotedForMessage($0) }.joined(separator: ", ")
      throw AttentionError.file(
        path: weights,
        message:
          "no tensor name starts with the prefix \(quotedForMessage(options.normalizedPrefix))"
          + (some.isEmpty ? " (the file holds no tensors)" : " (names look like \(some))"))
    }
    try inputSafety.check(file)
    do {
      return try file.naming {
        try MultiHeadAttention(stateDict: file.stateDict, layout: layout, options: options)
      }
    } catch AttentionError.invalidArgument(let message) {
      throw AttentionError.file(path: weights, message: message)
    }
  }

  /// `--key-padding-mask`: booleans or 0/1 of shape `[B, T]`.
  private func paddingMask(_ path: String, files: InputFiles, batch: Int, length: Int) throws
    -> Tensor
  {
    let mask = try files.keepMask(path, additiveFlag: "--attn-mask")
    guard mask.shape == [batch, length] else {
      throw AttentionError.file(
        path: path,
        message: "holds \(shapeForMessage(mask.shape)); a key padding mask is [B, T] = "
          + "[\(batch), \(length)]")
    }
    return mask
  }

  /// `--attn-mask` as PyTorch's SDPA reads it: booleans keep (True = attend), floats are added.
  private func attentionMask(files: InputFiles) throws -> AttentionMask {
    guard let attnMask else { return AttentionMask() }
    let (tensor, storage) = try files.mask(attnMask)
    switch storage {
    case .bool: return AttentionMask(keep: tensor)
    case .float16, .bfloat16, .float32, .float64:
      try inputSafety.check(tensor, from: attnMask, allowingNegativeInfinity: true)
      return AttentionMask(bias: tensor)
    case .integer:
      throw AttentionError.file(
        path: attnMask,
        message: "an attn_mask must be boolean (True = attend) or floating point (added to the "
          + "scores), as in PyTorch's SDPA; this one holds integers")
    }
  }

  private func checkHeatmap(batch: Int, length: Int, heads: Int) throws {
    guard heatmap != nil else { return }
    if heatmapBatch >= batch {
      throw ValidationError(
        "--heatmap-batch \(heatmapBatch) is out of range: the input holds \(batch) batch "
          + "element\(batch == 1 ? "" : "s")")
    }
    if length > VisualizationOptions.maxHeatmapSide {
      throw ValidationError(
        "--heatmap draws one cell per weight, for at most \(VisualizationOptions.maxHeatmapSide) "
          + "tokens; the input has \(length)")
    }
    if let tokenList, tokenList.count != length {
      throw ValidationError(
        "--tokens gives \(tokenList.count) token\(tokenList.count == 1 ? "" : "s"), the input has "
          + "\(length) positions")
    }
  }

  /// The token-by-token run: outputs `[B, T, E]` and each step's seconds.
  struct Decoded {
    var output: Tensor
    var seconds: [Double]
  }

  /// Runs `x` one token at a time through a KV cache of capacity `T`: step `t` appends token
  /// `t`'s keys and values and attends its query to keys `0…t`, with the masks' rows and keys of
  /// that step.
  private func runDecode(
    _ layer: MultiHeadAttention, x: Tensor, padding: Tensor?, mask: AttentionMask
  ) throws -> Decoded {
    let (batch, length, e) = (x.shape[0], x.shape[1], x.shape[2])
    var cache = try KVCache(
      batch: batch, keyValueHeads: layer.keyValueHeads, headDim: layer.headDim, capacity: length,
      positionOffset: positionOffset)
    var output = try Tensor(shape: [batch, length, e])
    var seconds: [Double] = []
    try Progress().during("decoding token by token") {
      for t in 0..<length {
        let token = try x.slice(axis: 1, t..<(t + 1))
        var stepMask = mask
        if let keep = mask.keep { stepMask.keep = try Self.rows(keep, t, keys: t + 1) }
        if let bias = mask.bias { stepMask.bias = try Self.rows(bias, t, keys: t + 1) }
        let stepPadding = try padding.map { try $0.slice(axis: 1, 0..<(t + 1)) }
        let (time, result) = try Stopwatch.measure {
          try layer.step(
            token, cache: &cache, keyPaddingMask: stepPadding, attentionMask: stepMask,
            kernel: kernelOptions.attentionKernel, threads: kernelOptions.threads,
            memoryBudget: kernelOptions.memoryBudget)
        }
        seconds.append(time)
        for b in 0..<batch {
          for c in 0..<e {
            output.scalars[(b * length + t) * e + c] = result.output.scalars[b * e + c]
          }
        }
      }
    }
    return Decoded(output: output, seconds: seconds)
  }

  /// Row `t` and keys `0 ..< keys` of a mask broadcast over `[…, T, T]` (extent-1 axes stay).
  static func rows(_ mask: Tensor, _ t: Int, keys: Int) throws -> Tensor {
    guard mask.rank >= 2 else { return try mask.rank == 1 ? mask.slice(axis: 0, 0..<keys) : mask }
    return try mask.slice(axis: mask.rank - 2, t..<(t + 1)).slice(axis: mask.rank - 1, 0..<keys)
  }

  private func report(
    layer: MultiHeadAttention, x: Tensor, result: MultiHeadResult, mask: AttentionMask,
    padding: Tensor?, decoded: Decoded?, checks: [Check]
  ) {
    let latency = decoded.map { Stopwatch.Statistics($0.seconds).scaled(by: 1000) }
    let rotary = layer.rotary.map {
      "rotary θ \(ExplainStep.decimal($0.theta)) (\($0.layout.rawValue)), offset \(positionOffset)"
    }
    switch format {
    case .json:
      try? printJSON(
        MhaReport(
          layout: layout.rawValue, prefix: prefix, embedDim: layer.embedDim, heads: layer.heads,
          kvHeads: layer.keyValueHeads, headDim: layer.headDim, ropeTheta: layer.rotary?.theta,
          ropeLayout: layer.rotary?.layout.rawValue, positionOffset: positionOffset,
          inputShape: x.shape, outputShape: result.output.shape,
          weightsShape: weightsOut == nil
            ? nil : (averageHeads ? result.averagedWeights : result.weights)?.shape,
          kernel: result.attention.kernel.rawValue, isCausal: mask.isCausal,
          keyPaddingMask: padding != nil, attnMask: attnMask != nil,
          decodeMilliseconds: latency, checks: checks.dictionary, verified: checks.allPassed))
    case .text:
      print(
        "attn mha: \(layout.rawValue) layer\(prefix.isEmpty ? "" : " \(prefix)") from \(weights)")
      let grouping =
        layer.keyValueHeads == layer.heads
        ? "H \(layer.heads)" : "H \(layer.heads) on Hkv \(layer.keyValueHeads)"
      print(
        "E \(layer.embedDim), \(grouping), D \(layer.headDim)"
          + (rotary.map { "; " + $0 } ?? "")
          + (layer.residualNorm.map { "; LayerNorm(· + x), eps \($0.epsilon)" } ?? ""))
      let masks =
        [
          mask.isCausal ? "causal" : nil, padding == nil ? nil : "key padding",
          attnMask == nil ? nil : (mask.keep != nil ? "boolean attn mask" : "float attn mask"),
        ].compactMap { $0 }
      print(
        "input \(shapeForMessage(x.shape)) → output \(shapeForMessage(result.output.shape)); "
          + "kernel \(result.attention.kernel.rawValue); "
          + (masks.isEmpty ? "no mask" : masks.joined(separator: ", ")))
      if let latency, let decoded {
        print(
          "decode: \(decoded.seconds.count) tokens through a KV cache, per token "
            + String(
              format: "median %.3f ms, mean %.3f ± %.3f ms, min %.3f, max %.3f", latency.median,
              latency.mean, latency.standardDeviation, latency.min, latency.max))
      }
      print("\nChecks:")
      print(checks.report())
      print(checks.allPassed ? "\nVerified." : "\nNOT verified.")
    }
  }
}

extension WeightLayout: ExpressibleByArgument {}
extension RotaryEmbedding.Layout: ExpressibleByArgument {}

extension MultiHeadAttention {
  /// Every parameter tensor, for the CLI's check that a non-finite output was not propagated.
  var parameters: [Tensor] {
    [queryProjection, keyProjection, valueProjection, outputProjection].flatMap {
      [$0.weight] + ($0.bias.map { [$0] } ?? [])
    } + (residualNorm.map { [$0.weight, $0.bias] } ?? [])
  }
}

/// `attn mha --format json`.
private struct MhaReport: Encodable {
  var layout: String
  var prefix: String
  var embedDim: Int
  var heads: Int
  var kvHeads: Int
  var headDim: Int
  var ropeTheta: Double?
  var ropeLayout: String?
  var positionOffset: Int
  var inputShape: [Int]
  var outputShape: [Int]
  var weightsShape: [Int]?
  var kernel: String
  var isCausal: Bool
  var keyPaddingMask: Bool
  var attnMask: Bool
  var decodeMilliseconds: Stopwatch.Statistics?
  var checks: [String: Bool]
  var verified: Bool
}
