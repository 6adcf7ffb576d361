import ArgumentParser
import AttentionKit
import Foundation
import TensorIO

/// How `attn mha` reads its inputs: the layer from `--weights` (only its tensors), the key
/// padding mask and PyTorch's `attn_mask`.
extension MhaCommand {
  /// The layer from `--weights`, its errors naming the file.
  func loadLayer(files: InputFiles) throws -> MultiHeadAttention {
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
  func paddingMask(_ path: String, files: InputFiles, batch: Int, length: Int) throws
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
  func attentionMask(files: InputFiles) throws -> AttentionMask {
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

  func checkHeatmap(batch: Int, length: Int, heads: Int) throws {
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
}

extension MultiHeadAttention {
  /// Every parameter tensor, for the CLI's check that a non-finite output was not propagated.
  var parameters: [Tensor] {
    [queryProjection, keyProjection, valueProjection, outputProjection].flatMap {
      [$0.weight] + ($0.bias.map { [$0] } ?? [])
    } + (residualNorm.map { [$0.weight, $0.bias] } ?? [])
  }
}
