import ArgumentParser
import AttentionKit
import Foundation
import TensorIO

/// `attn mha --model DIR --layer L`: the layer of a Hugging Face checkpoint folder, worked out from
/// its `config.json` (`ModelLayerPlan`) and read from its shards (only that layer's tensors).
struct MhaModelOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "A Hugging Face model folder (config.json + model.safetensors or its shards).",
      valueName: "DIR"))
  var model: String?

  @Option(
    help: ArgumentHelp(
      "The layer of --model: its index, or encoder.L / decoder.L for T5's two stacks.",
      valueName: "L"))
  var layer: String?

  /// `--layer`'s stack and index.
  func parsedLayer() throws -> (stack: ModelLayerPlan.Stack?, index: Int) {
    guard let layer else { throw ValidationError("--model needs --layer L") }
    let parts = layer.split(separator: ".", omittingEmptySubsequences: false)
    let stack = parts.count == 2 ? ModelLayerPlan.Stack(rawValue: String(parts[0])) : nil
    guard parts.count <= 2, parts.count == 1 || stack != nil,
      let index = Int(parts[parts.count - 1]), index >= 0
    else {
      throw ValidationError(
        "--layer takes a layer index (3) or a T5 stack and index (encoder.3, decoder.3), got "
          + "\(layer)")
    }
    return (stack, index)
  }
}

extension MhaCommand {
  /// The layer of `--model`, with its plan; `--heads`, `--kv-heads` and `--rope-theta`, when
  /// given, override the config.
  func loadModelLayer(_ folderPath: String) throws -> (MultiHeadAttention, ModelLayerPlan) {
    let (stack, index) = try modelOptions.parsedLayer()
    let folder = try ModelFolder(path: folderPath)
    let configPath = (folderPath as NSString).appendingPathComponent("config.json")
    var plan: ModelLayerPlan
    do {
      plan = try ModelLayerPlan(
        config: try ModelConfig(json: folder.config), layer: index, stack: stack,
        names: folder.names)
      try plan.override(heads: heads, keyValueHeads: kvHeads, ropeTheta: ropeTheta)
    } catch AttentionError.invalidArgument(let message) {
      throw AttentionError.file(path: configPath, message: message)
    }
    let file = try folder.read(
      names: plan.tensorNames(in: folder.names), maxBytes: kernelOptions.memoryBudget)
    try inputSafety.check(file)
    do {
      return (try file.naming { try plan.build(file.stateDict) }, plan)
    } catch AttentionError.invalidArgument(let message) {
      throw AttentionError.file(path: folderPath, message: message)
    }
  }
}

extension ModelLayerPlan {
  /// What was read, for the report: "gemma2 layer 1 (sliding window 4096), scale 0.0625, …".
  var summary: String {
    let kind = window.map { "sliding window \($0)" } ?? (layerType == nil ? nil : "full")
    var parts = [
      "\(family.rawValue) \(family == .t5 ? "\(stack.rawValue) " : "")layer \(layer)"
        + (kind.map { " (\($0))" } ?? "")
    ]
    parts.append("scale \(String(format: "%.6g", exactScale))")
    if let rotary {
      switch rotary.scaling {
      case .none: break
      case .linear(let factor): parts.append("rope linear ×\(factor)")
      case .llama3(let factor, _, _, _): parts.append("rope llama3 ×\(factor)")
      case .yarn(let factor, _, _, _, _, let attention):
        parts.append("rope yarn ×\(factor) (cos, sin ×\(String(format: "%.6g", attention)))")
      }
      if rotary.dimension < headDim {
        parts.append("rope on \(rotary.dimension) of \(headDim) features")
      }
    }
    if let softcap { parts.append("soft-cap \(String(format: "%g", softcap))") }
    switch family {
    case .gptOss: parts.append("sinks")
    case .bloom: parts.append("ALiBi")
    case .t5: parts.append("T5 relative bias" + (stack == .encoder ? " (bidirectional)" : ""))
    case .qwen3, .gemma3: parts.append("q/k RMS norm")
    default: break
    }
    parts.append(isCausal ? "causal" : "not causal")
    return parts.joined(separator: ", ")
  }
}
