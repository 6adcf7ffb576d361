import Foundation
import Tensors

/// One attention layer of a Hugging Face checkpoint, worked out from its `config.json` and its
/// tensors' names: where its tensors are, its heads, scale, rotary embedding, window, score terms
/// and norms — everything `build(_:)` needs to make the `MultiHeadAttention` the model runs.
///
/// What each family's layer is (the attention module's output after its output projection, no
/// residual, except BERT's `LayerNorm(dense(ctx) + x)`):
/// - llama, mistral, qwen2, qwen3, gemma2, gemma3, gpt_oss: `q_proj`, `k_proj`, `v_proj`,
///   `o_proj` (biases where the file has them: qwen2's q/k/v, gpt-oss's four); per-head RMS
///   norms of q and k (qwen3, gemma3: `(1 + w)`); scale `head_dim^(−1/2)` or Gemma's
///   `query_pre_attn_scalar^(−1/2)`; Gemma's `attn_logit_softcapping`; gpt-oss's `sinks`;
///   causal, with the layer's sliding window (`layer_types`, or the family's rule: mistral's every
///   layer, qwen2's from `max_window_layers`, Gemma 2's and gpt-oss's every other, Gemma 3's
///   `sliding_window_pattern`);
/// - phi3: the same with a fused `qkv_proj` (rows q, k, v);
/// - bloom: the fused per-head `query_key_value` (`[H, 3, D]` rows), `dense`, ALiBi with BLOOM's
///   slopes, causal;
/// - t5: `q`, `k`, `v`, `o` without biases, scale 1, the relative bias of the stack's block 0
///   (`relative_attention_bias`, shared by every layer), bidirectional buckets in the encoder,
///   causal and one-directional in the decoder;
/// - bert: `BertAttention` (the `bert` layout).
public struct ModelLayerPlan: Sendable {
  /// T5's two stacks; the others have one (`decoder` for decoder-only models, `encoder` for BERT).
  public enum Stack: String, Sendable {
    case encoder, decoder
  }

  public let family: ModelFamily
  public let layer: Int
  public let stack: Stack
  /// The names of the layer's tensors start with this (`model.layers.3.self_attn.`).
  public let prefix: String
  public let hidden: Int
  public private(set) var heads: Int
  public private(set) var keyValueHeads: Int
  public let headDim: Int
  /// The factor on `q·k`, as the model states it.
  public let exactScale: Double
  public private(set) var rotary: RotaryEmbedding?
  /// `layer_types[L]` (`sliding_attention`, `full_attention`), when the model has kinds.
  public let layerType: String?
  /// The sliding window `W` (the `W` most recent keys, the query's own included), or `nil`.
  public let window: Int?
  public let isCausal: Bool
  public let softcap: Float?
  let normEpsilon: Float
  /// T5: the shared relative-bias table's name, max distance and direction.
  let t5Table: (name: String, maxDistance: Int, bidirectional: Bool)?

  /// Layer `layer` of `stack` (T5; the others' own stack when `nil`) of the model `config`
  /// describes, whose files hold the tensors `names`.
  public init(config file: ModelConfig, layer: Int, stack: Stack? = nil, names: [String]) throws {
    let family = try ModelFamily(modelType: file.modelType)
    // A multimodal Gemma 3 config keeps the text model's fields in text_config.
    let config = file.modelType == "gemma3" ? try file.nested("text_config") ?? file : file
    self.family = family
    self.layer = layer
    guard stack == nil || family == .t5 || stack == (family == .bert ? .encoder : .decoder) else {
      throw AttentionError.invalidArgument(
        "\(family.rawValue) has one stack; the encoder/decoder choice is T5's")
    }
    self.stack = stack ?? (family == .bert || family == .t5 ? .encoder : .decoder)
    let layers = try config.required(
      family == .t5 && self.stack == .decoder ? "num_decoder_layers" : "num_hidden_layers",
      family == .t5 ? "num_layers" : (family == .bloom ? "n_layer" : nil))
    guard layer >= 0, layer < layers else {
      throw AttentionError.invalidArgument(
        "the model has layers 0…\(layers - 1), not \(layer)")
    }
    prefix = try Self.prefix(family.locator(layer: layer, stack: self.stack), in: names)
    // Sizes.
    switch family {
    case .t5:
      hidden = try config.required("d_model")
      heads = try config.required("num_heads")
      headDim = try config.required("d_kv")
    case .bloom:
      hidden = try config.required("hidden_size", "n_embed")
      heads = try config.required("n_head", "num_attention_heads")
      headDim = hidden / heads
    default:
      hidden = try config.required("hidden_size")
      heads = try config.required("num_attention_heads")
      headDim = try config.int("head_dim") ?? hidden / heads
    }
    keyValueHeads = try config.int("num_key_value_heads") ?? heads
    guard heads % keyValueHeads == 0 else {
      throw AttentionError.invalidArgument(
        "config.json: num_key_value_heads (\(keyValueHeads)) must divide num_attention_heads "
          + "(\(heads))")
    }
    // Scale and soft-cap.
    switch family {
    case .t5: exactScale = 1
    case .gemma2, .gemma3:
      let scalar = try config.double("query_pre_attn_scalar") ?? Double(headDim)
      exactScale = 1 / scalar.squareRoot()
    default: exactScale = 1 / Double(headDim).squareRoot()
    }
    softcap =
      family == .gemma2 || family == .gemma3
      ? try config.double("attn_logit_softcapping").map(Float.init) : nil
    // Which kind of layer, and its window.
    let types = try config.strings("layer_types")
    layerType = types.flatMap { layer < $0.count ? $0[layer] : nil }
    window = try Self.window(config, family: family, layer: layer, type: layerType)
    isCausal = family.isDecoder || self.stack == .decoder
    rotary =
      family.isLlamaLike || family == .phi3
      ? try config.rotary(layerType: layerType, headDim: headDim, defaultTheta: 10_000) : nil
    normEpsilon = Float(try config.double("rms_norm_eps") ?? 1e-6)
    if family == .t5 {
      // Block 0 of the same stack holds the table every layer shares.
      let marker = "\(self.stack.rawValue).block."
      let layerPrefix = prefix
      let root = layerPrefix.range(of: marker).map { String(layerPrefix[..<$0.lowerBound]) } ?? ""
      let name = marker + "0.layer.0.SelfAttention.relative_attention_bias.weight"
      t5Table = (
        root + name, try config.int("relative_attention_max_distance") ?? 128,
        self.stack == .encoder
      )
    } else {
      t5Table = nil
    }
    if family == .bert, let type = try config.string("position_embedding_type"), type != "absolute"
    {
      throw config.unsupported("position_embedding_type", "\"\(type)\"")
    }
    layerNormEpsilon = Float(try config.double("layer_norm_eps") ?? 1e-12)
  }

  /// BERT's LayerNorm epsilon.
  let layerNormEpsilon: Float

  /// Overrides of the config's heads, key/value heads and rotary theta (`attn mha`'s flags).
  public mutating func override(heads: Int?, keyValueHeads: Int?, ropeTheta: Double?) throws {
    if let heads { self.heads = heads }
    if let keyValueHeads { self.keyValueHeads = keyValueHeads }
    if let ropeTheta {
      guard let rotary else {
        throw AttentionError.invalidArgument(
          "\(family.rawValue) has no rotary embeddings to give a theta")
      }
      self.rotary = try RotaryEmbedding(
        theta: ropeTheta, dimension: rotary.dimension, layout: rotary.layout,
        scaling: rotary.scaling)
    }
  }

  /// The causal mask and window the model runs the layer with.
  public var mask: AttentionMask { AttentionMask(isCausal: isCausal, window: window) }

  /// The names to read: the layer's (under `prefix`) and T5's shared table.
  public func tensorNames(in names: [String]) -> [String] {
    names.filter { $0.hasPrefix(prefix) } + (t5Table.map { [$0.name] } ?? [])
  }

  /// The prefix of the name ending in `marker + suffix`: the shortest, outside a vision tower.
  private static func prefix(_ locator: (marker: String, suffix: String), in names: [String])
    throws -> String
  {
    let tail = locator.marker + locator.suffix
    let found = names.filter {
      $0.hasSuffix(tail) && ($0.count == tail.count || $0.dropLast(tail.count).hasSuffix("."))
        && !$0.contains("vision")
    }
    guard let name = found.min(by: { $0.count < $1.count }) else {
      throw AttentionError.invalidArgument(
        "the model's files hold no tensor named …\(tail)")
    }
    return String(name.dropLast(locator.suffix.count))
  }

  /// The layer's window from `layer_types` or the family's rule.
  private static func window(
    _ config: ModelConfig, family: ModelFamily, layer: Int, type: String?
  ) throws -> Int? {
    let size = try config.int("sliding_window")
    func sliding() throws -> Int {
      guard let size, size >= 1 else {
        throw AttentionError.invalidArgument(
          "config.json: layer \(layer) is a sliding-window layer but sliding_window is not set")
      }
      return size
    }
    if let type {
      switch type {
      case "sliding_attention": return try sliding()
      case "full_attention": return nil
      default: throw config.unsupported("layer_types[\(layer)]", "\"\(type)\"")
      }
    }
    switch family {
    case .mistral, .phi3: return size
    case .qwen2:
      guard try config.bool("use_sliding_window") == true else { return nil }
      let first = try config.int("max_window_layers") ?? 0
      return layer >= first ? try sliding() : nil
    case .gemma2, .gptOss: return (layer + 1) % 2 != 0 ? try sliding() : nil
    case .gemma3:
      let pattern = try config.int("sliding_window_pattern") ?? 6
      return (layer + 1) % pattern != 0 ? try sliding() : nil
    default: return nil
    }
  }
}
