import AttentionKit
import AttentionVerification
import Foundation

/// What `attn mha` reports: the text (the layer, its masks, the decode latency) and the JSON
/// document.
extension MhaCommand {
  /// Why the layer runs causal: llama always does; `--decode` makes the full pass causal too,
  /// since a token decoded through a KV cache cannot see the tokens after it.
  var causalNote: String {
    if isCausal || layout == .llama || modelOptions.model != nil { return "causal" }
    return "causal (as --decode: a token cannot see later ones)"
  }

  func printText(
    layer: MultiHeadAttention, plan: ModelLayerPlan?, x: Tensor, result: MultiHeadResult,
    mask: AttentionMask, padding: Tensor?, decoded: DecodedSequence?,
    latency: Stopwatch.Statistics?, cacheEffect: KVCacheEffect?
  ) {
    let rotary = layer.rotary.map {
      "rotary θ \(ExplainStep.decimal($0.theta)) (\($0.layout.rawValue)), offset \(positionOffset)"
    }
    if let plan, let model = modelOptions.model {
      print("attn mha: \(plan.summary)")
      print("from \(model), tensors \(plan.prefix)*")
    } else {
      print("attn mha: \(layerName) from \(weights ?? "")")
    }
    let grouping =
      layer.keyValueHeads == layer.heads
      ? "H \(layer.heads)" : "H \(layer.heads) on Hkv \(layer.keyValueHeads)"
    print(
      "E \(layer.embedDim), \(grouping), D \(layer.headDim)"
        + (rotary.map { "; " + $0 } ?? "")
        + (layer.residualNorm.map { "; LayerNorm(· + x), eps \($0.epsilon)" } ?? ""))
    let masks =
      [
        mask.isCausal ? causalNote : nil, mask.window.map { "window \($0)" },
        padding == nil ? nil : "key padding",
        attnMask == nil ? nil : (mask.keep != nil ? "boolean attn mask" : "float attn mask"),
      ].compactMap { $0 }
    print(
      "input \(shapeForMessage(x.shape)) → output \(shapeForMessage(result.output.shape)); "
        + "kernel \(result.attention.kernel.flagName); "
        + (masks.isEmpty ? "no mask" : masks.joined(separator: ", ")))
    if let latency, let decoded {
      print(
        "decode: \(decoded.stepSeconds.count) tokens through a KV cache, per token "
          + String(
            format: "median %.3f ms, mean %.3f ± %.3f ms, min %.3f, max %.3f", latency.median,
            latency.mean, latency.standardDeviation, latency.min, latency.max)
          + " (\(kvStorage.rawValue) cache)")
    }
    if let cacheEffect {
      print(
        "kv cache effect (\(kvStorage.rawValue) against the float32 full pass): "
          + String(
            format: "max %.3g, RMS %.3g (outputs' RMS %.3g)", cacheEffect.max, cacheEffect.rms,
            cacheEffect.outputRMS))
    }
  }
}

/// `attn mha --format json`.
struct MhaReport: Encodable {
  /// `nil` with `--model`, whose `model` says what was read.
  var layout: String?
  var prefix: String
  var model: String?
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
  /// `--kv-cache` (with `--decode`).
  var kvCache: String?
  /// With a float16, bfloat16 or q8 cache: the decoded outputs against the full float32 pass.
  var kvCacheEffect: KVCacheEffect?
  var checks: [String: Bool]
  var verified: Bool
}
