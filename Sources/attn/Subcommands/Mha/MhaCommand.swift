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
      --model DIR --layer L reads the layer of a Hugging Face folder instead (config.json and \
      its safetensors shards): llama, mistral, qwen2, qwen3, gemma2, gemma3, gpt_oss, phi3, bloom, \
      t5 (--layer encoder.L or decoder.L) and bert, with the config's heads, scale, rotary \
      scaling, sliding windows, soft-cap, sinks, ALiBi, T5 bias and q/k norms; --heads, \
      --kv-heads and --rope-theta override it.
      """)

  @Option(help: "The model's weights (.safetensors).")
  var weights: String?

  @Option(help: "Weight layout: torch (nn.MultiheadAttention), bert (BertAttention) or llama.")
  var layout: WeightLayout?

  @OptionGroup var modelOptions: MhaModelOptions

  @Option(help: "The layer's name prefix in the file (a '.' is added if missing).")
  var prefix = ""

  @Option(help: "Query heads H (with --model: from config.json).")
  var heads: Int?

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

  @Option(
    help: "With --decode, the KV cache's storage: float32, float16, bfloat16 or q8 (ggml q8_0).")
  var kvCache: KVStorage?

  @Option(help: "Seed of the sampled rows the checks compare.")
  var seed: UInt64 = 42

  @OptionGroup var report: ReportFormatOptions

  @OptionGroup var kernelOptions: KernelOptions
  @OptionGroup var inputSafety: InputSafetyOptions

  /// Heads drawn in one figure.
  static let maxHeatmapPanels = 32

  var tokenList: [String]? {
    tokens.map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let (layer, plan) =
      try modelOptions.model.map { try loadModelLayer($0) } ?? (loadLayer(files: files), nil)
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
    mask.isCausal = isCausal || decode || layout == .llama || plan?.isCausal == true
    mask.window = plan?.window

    let needWeights = weightsOut != nil || heatmap != nil
    let result = try explainingMemoryBudget {
      try Progress().during("running the layer") {
        try layer(
          x, keyPaddingMask: padding, attentionMask: mask, positionOffset: positionOffset,
          kernel: kernelOptions.kernel, needWeights: needWeights,
          threads: kernelOptions.threads, memoryBudget: kernelOptions.memoryBudget)
      }
    }
    if needWeights && result.weights == nil {
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the [B, H, T, T] weights for --weights-out or --heatmap",
          neededBytes: MemoryGuard.floatBytes([[batch, layer.heads, length, length]]),
          budgetBytes: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource,
          advice: .other("raise --max-memory, or drop --weights-out and --heatmap")))
    }
    try checkFiniteResult(
      result.output, name: "the output", inputs: [x] + Array(layer.parameters),
      biases: [mask.bias])
    let decoded =
      try decode
      ? Progress().during("decoding token by token") {
        try layer.decode(
          x, keyPaddingMask: padding, attentionMask: mask, positionOffset: positionOffset,
          kernel: kernelOptions.kernel, threads: kernelOptions.threads,
          memoryBudget: kernelOptions.memoryBudget, storage: kvStorage)
      } : nil

    let reference = try MultiHeadReference(
      layer: layer, input: x, keyPaddingMask: padding, attentionMask: mask,
      positionOffset: positionOffset)
    let rows = RowSample.rows(batchCount: batch, queries: length, seed: seed)
      .map { (batch: $0.batch, token: $0.query) }
    let heads = try layer.project(x, positionOffset: positionOffset)
    let combined = try layer.combinedMask(
      mask, keyPaddingMask: padding, batch: batch, length: length)
    let checks = try Progress().during("checking against the float64 layer") { () -> [Check] in
      try LayerStageChecks(reference: reference, rows: rows).run(
        heads: heads, mask: combined, attention: result.attention, output: result.output)
        + LayerChecks(reference: reference, rows: rows).run(
          output: result.output, weights: result.weights,
          decoded: kvStorage == .float32 ? decoded?.output : nil)
        + compactCacheChecks(decoded, layer: layer, x: x, padding: padding, mask: mask, rows: rows)
    }
    let cacheEffect =
      kvStorage == .float32
      ? nil
      : decoded.map {
        KVCacheEffect(decoded: $0.output, full: result.output)
      }
    let written = averageHeads ? result.averagedWeights : result.weights
    var outputs = npyOutputs([(out, result.output), (weightsOut, written)])
    if let heatmap, let weights = result.weights {
      let figure = HeadsFigure.make(
        weights: weights, reference: reference, batch: heatmapBatch, tokens: tokenList,
        title: "attn mha: " + (plan.map { "\($0.family.rawValue) layer \($0.layer)" } ?? layerName))
      outputs.append((heatmap, { figure.document().bytes() }))
    }
    let run = CheckedRun(checks: checks, outputs: outputs)
    let latency = decoded.map { Stopwatch.Statistics($0.stepSeconds).scaled(by: 1000) }
    try run.finish(
      format: report.format,
      json: {
        MhaReport(
          layout: layout?.rawValue, prefix: plan?.prefix ?? prefix, model: plan?.summary,
          embedDim: layer.embedDim, heads: layer.heads,
          kvHeads: layer.keyValueHeads, headDim: layer.headDim, ropeTheta: layer.rotary?.theta,
          ropeLayout: layer.rotary?.layout.rawValue, positionOffset: positionOffset,
          inputShape: x.shape, outputShape: result.output.shape,
          weightsShape: weightsOut == nil ? nil : written?.shape,
          kernel: result.attention.kernel.flagName, isCausal: mask.isCausal,
          keyPaddingMask: padding != nil, attnMask: attnMask != nil,
          decodeMilliseconds: latency, kvCache: decode ? kvStorage.rawValue : nil,
          kvCacheEffect: cacheEffect, checks: checks.dictionary, verified: run.verified)
      },
      text: {
        printText(
          layer: layer, plan: plan, x: x, result: result, mask: mask, padding: padding,
          decoded: decoded, latency: latency, cacheEffect: cacheEffect)
      })
  }

}

extension WeightLayout: ExpressibleByArgument {}
extension RotaryEmbedding.Layout: ExpressibleByArgument {}
