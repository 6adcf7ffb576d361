import ArgumentParser
import AttentionKit
import Foundation
import TensorIO

/// How `attn mha` reads its inputs: the layer from `--weights` (only its tensors), the key
/// padding mask and PyTorch's `attn_mask`.
extension MhaCommand {
  func validate() throws {
    try validateKVCache()
    if modelOptions.model != nil {
      if weights != nil || layout != nil || !prefix.isEmpty {
        throw ValidationError(
          "--model reads the layer's layout and names from config.json: drop --weights, "
            + "--layout and --prefix")
      }
      _ = try modelOptions.parsedLayer()
    } else {
      if modelOptions.layer != nil { throw ValidationError("--layer goes with --model") }
      guard weights != nil, layout != nil, heads != nil else {
        throw ValidationError(
          "give --model DIR --layer L, or --weights FILE --layout LAYOUT --heads H")
      }
    }
    if let heads { try FlagLimits.check("--heads", heads, in: 1...FlagLimits.heads) }
    if let kvHeads {
      try FlagLimits.check("--kv-heads", kvHeads, in: 1...FlagLimits.heads)
      if let heads, heads % kvHeads != 0 {
        throw ValidationError(
          "--heads \(heads) must be a multiple of --kv-heads \(kvHeads) (each K/V head serves "
            + "H / Hkv query heads)")
      }
    }
    if let ropeTheta, !(ropeTheta.isFinite && ropeTheta > 0) {
      throw ValidationError("--rope-theta must be a positive number, got \(ropeTheta)")
    }
    try FlagLimits.check("--position-offset", positionOffset, in: 0...FlagLimits.position)
    if let layerNormEps, !(layerNormEps.isFinite && layerNormEps >= 0) {
      throw ValidationError("--layer-norm-eps must be ≥ 0, got \(layerNormEps)")
    }
    if layerNormEps != nil && layout != .bert && modelOptions.model == nil {
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
    if kernelOptions.kernel.isTiled && (weightsOut != nil || heatmap != nil) {
      throw ValidationError(
        "--weights-out and --heatmap need --kernel materialized or auto: the tiled kernel never "
          + "holds the weights")
    }
    try checkOutputs(
      [out, weightsOut, heatmap],
      against: [weights, modelOptions.model, input, keyPaddingMask, attnMask])
  }

  /// "llama layer model.layers.0.self_attn." for the title of a figure.
  var layerName: String {
    "\(layout?.rawValue ?? "") layer" + (prefix.isEmpty ? "" : " \(prefix)")
  }

  /// The layer from `--weights`, its errors naming the file.
  func loadLayer(files: InputFiles) throws -> MultiHeadAttention {
    guard let weights, let layout, let heads else {
      throw ValidationError("give --weights FILE --layout LAYOUT --heads H")
    }
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
    try Self.checkOneLayer(
      Array(file.tensors.keys), prefix: options.normalizedPrefix, path: weights)
    try inputSafety.check(file)
    do {
      return try file.naming {
        try MultiHeadAttention(stateDict: file.stateDict, layout: layout, options: options)
      }
    } catch AttentionError.invalidArgument(let message) {
      throw AttentionError.file(path: weights, message: message)
    }
  }

  /// Refuses a prefix under which several layers' tensors lie (`model.layers.` before `0.`,
  /// `1.`, …): the layout would look for its names right under the prefix and report one
  /// missing, where the prefix is what is wrong.
  static func checkOneLayer(_ names: [String], prefix: String, path: String) throws {
    let relative = names.map { $0.dropFirst(prefix.count).split(separator: ".") }
    let layers = Set(relative.compactMap { $0.count > 1 ? $0.first.flatMap { Int($0) } : nil })
    guard layers.count > 1, relative.allSatisfy({ $0.first.flatMap { Int($0) } != nil }) else {
      return
    }
    // The first layer's module that holds the most tensors, an attention-named one first
    // (`self_attn`, `attention`), as a suggestion.
    let first = layers.min() ?? 0
    let modules = Dictionary(
      grouping: relative.filter { $0.count > 2 && Int($0[0]) == first }.map { String($0[1]) },
      by: { $0 }
    ).mapValues(\.count)
    let module =
      modules.keys.filter { $0.contains("att") }.min()
      ?? modules.max { ($0.value, $1.key) < ($1.value, $0.key) }?.key
    let suggestion = "\(first)." + (module.map { "\($0)." } ?? "")
    throw AttentionError.file(
      path: path,
      message: "the prefix \(quotedForMessage(prefix)) holds \(layers.count) layers' tensors "
        + "(\(prefix)\(layers.min() ?? 0)., …, \(prefix)\(layers.max() ?? 0).); name one layer's "
        + "attention module, e.g. --prefix \(prefix)\(suggestion)")
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
      + (appendedKeyValue.map { [$0.key, $0.value] } ?? [])
  }
}
