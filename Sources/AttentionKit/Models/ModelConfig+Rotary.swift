import Foundation
import Tensors

extension ModelConfig {
  /// The rotary embedding of a layer of type `layerType` (`nil`: the model has one kind), for
  /// heads of dimension `headDim`, from either style of config: `rope_parameters` (one dict, or
  /// one per layer type as Gemma 3 writes it) or the older `rope_theta` + `rope_scaling` (with
  /// Gemma 3's `rope_local_base_freq` for its sliding layers). `rope_type` `default`, `linear`,
  /// `llama3` and `yarn` are implemented, another is an error naming the field; `partial_rotary_factor`
  /// rotates the first `int(D·factor)` features.
  func rotary(layerType: String?, headDim: Int, defaultTheta: Double) throws -> RotaryEmbedding {
    var parameters = try nested("rope_parameters") ?? nested("rope_scaling")
    if let all = parameters, let layerType, all.keys.contains(layerType) {
      parameters = try all.nested(layerType)
    } else if let all = parameters, let first = all.keys.first,
      case .object = all.fields[first]
    {
      throw AttentionError.invalidArgument(
        "config.json: \(all.path)\(layerType ?? "(a layer type)") is missing (the rope "
          + "parameters are given per layer type: \(all.keys.joined(separator: ", ")))")
    }
    var theta =
      try parameters?.double("rope_theta") ?? double("rope_theta") ?? defaultTheta
    if layerType == "sliding_attention", let local = try double("rope_local_base_freq"),
      try parameters?.double("rope_theta") == nil
    {
      theta = local
    }
    // A partial rotary factor rotates the first int(D·factor) features (as transformers
    // truncates), the others pass through.
    let partial = try parameters?.double("partial_rotary_factor") ?? double("partial_rotary_factor")
    let rotated = Int(Double(headDim) * (partial ?? 1))
    guard rotated >= 2, rotated <= headDim, rotated % 2 == 0 else {
      throw (parameters ?? self).unsupported("partial_rotary_factor", "\(partial ?? 1)")
    }
    let type = try parameters?.string("rope_type") ?? parameters?.string("type") ?? "default"
    let original = {
      try parameters?.double("original_max_position_embeddings")
        ?? self.double("original_max_position_embeddings")
        ?? self.double("max_position_embeddings")
    }
    let scaling: RotaryEmbedding.Scaling
    switch type {
    case "default":
      scaling = .none
    case "linear":
      guard let factor = try parameters?.double("factor") else {
        throw AttentionError.invalidArgument("config.json: linear rope scaling needs a factor")
      }
      scaling = .linear(factor: factor)
    case "llama3":
      guard let p = parameters, let factor = try p.double("factor"),
        let low = try p.double("low_freq_factor"), let high = try p.double("high_freq_factor"),
        let context = try original()
      else {
        throw AttentionError.invalidArgument(
          "config.json: llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and "
            + "original_max_position_embeddings")
      }
      scaling = .llama3(
        factor: factor, lowFrequencyFactor: low, highFrequencyFactor: high, originalContext: context
      )
    case "yarn":
      guard let p = parameters, let context = try original() else {
        throw AttentionError.invalidArgument(
          "config.json: yarn rope scaling needs original_max_position_embeddings")
      }
      guard
        let factor = try p.double("factor")
          ?? double("max_position_embeddings").map({ $0 / context })
      else {
        throw AttentionError.invalidArgument("config.json: yarn rope scaling needs a factor")
      }
      func mscale(_ scale: Double, _ m: Double) -> Double {
        scale <= 1 ? 1 : 0.1 * m * log(scale) + 1
      }
      var attention = try p.double("attention_factor")
      if attention == nil {
        if let m = try p.double("mscale"), let all = try p.double("mscale_all_dim"), m != 0,
          all != 0
        {
          attention = mscale(factor, m) / mscale(factor, all)
        } else {
          attention = mscale(factor, 1)
        }
      }
      scaling = .yarn(
        factor: factor, originalContext: context, betaFast: try p.double("beta_fast") ?? 32,
        betaSlow: try p.double("beta_slow") ?? 1, truncate: try p.bool("truncate") ?? true,
        attentionFactor: attention!)
    default:
      throw (parameters ?? self).unsupported("rope_type", "\"\(type)\"")
    }
    return try RotaryEmbedding(theta: theta, dimension: rotated, scaling: scaling)
  }
}
