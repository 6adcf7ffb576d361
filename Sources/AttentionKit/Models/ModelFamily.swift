import Tensors

/// The model families whose attention layers `ModelLayerPlan` reads from a Hugging Face folder,
/// by `config.json`'s `model_type`.
public enum ModelFamily: String, Sendable, CaseIterable {
  case llama, mistral, qwen2, qwen3, gemma2
  /// Gemma 3's text model (`gemma3_text`, or a `gemma3` config's `text_config`).
  case gemma3 = "gemma3_text"
  case gptOss = "gpt_oss"
  case phi3, bloom, t5, bert

  /// The family of `model_type`, or an error naming it and the families known.
  public init(modelType: String) throws {
    if modelType == "gemma3" {
      self = .gemma3
      return
    }
    guard let family = ModelFamily(rawValue: modelType) else {
      throw AttentionError.invalidArgument(
        "config.json: model_type \"\(modelType)\" is not a family attn reads (known: "
          + ModelFamily.allCases.map(\.rawValue).joined(separator: ", ") + ")")
    }
    self = family
  }

  /// Llama's descendants: `q_proj`, `k_proj`, `v_proj`, `o_proj` and rotary embeddings.
  var isLlamaLike: Bool {
    switch self {
    case .llama, .mistral, .qwen2, .qwen3, .gemma2, .gemma3, .gptOss: return true
    case .phi3, .bloom, .t5, .bert: return false
    }
  }

  /// Families whose layers run causal (the decoder stacks; T5's decoder too).
  var isDecoder: Bool { self != .bert && self != .t5 }

  /// The tensor whose name locates layer `l` (the prefix is what precedes `suffix`).
  func locator(layer l: Int, stack: ModelLayerPlan.Stack) -> (marker: String, suffix: String) {
    switch self {
    case .llama, .mistral, .qwen2, .qwen3, .gemma2, .gemma3, .gptOss:
      return ("layers.\(l).self_attn.", "q_proj.weight")
    case .phi3: return ("layers.\(l).self_attn.", "qkv_proj.weight")
    case .bloom: return ("h.\(l).self_attention.", "query_key_value.weight")
    case .t5: return ("\(stack.rawValue).block.\(l).layer.0.SelfAttention.", "q.weight")
    case .bert: return ("encoder.layer.\(l).attention.", "self.query.weight")
    }
  }
}
