import Foundation
import Testing

@testable import AttentionKit

/// `ModelLayerPlan` from `config.json` fields: what it works out for each family's rules
/// (windows by layer type or alternation, rope parameters in both styles, scales) and the
/// one-line errors for what it does not implement. The numerics against transformers are
/// `ModelFixtureTests`' (attnTests), on models transformers saved.
@Suite("Model configs: the layer plan")
struct ModelLayerPlanTests {
  static func plan(
    _ json: String, layer: Int = 0, stack: ModelLayerPlan.Stack? = nil,
    names: [String] = [
      "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
    ]
  ) throws -> ModelLayerPlan {
    try ModelLayerPlan(
      config: ModelConfig(json: Data(json.utf8)), layer: layer, stack: stack, names: names)
  }

  static let base = """
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2
    """

  @Test("Gemma 2: alternating windows, query_pre_attn_scalar and the soft-cap")
  func gemma2() throws {
    let json = """
      {"model_type": "gemma2", \(Self.base), "head_dim": 16, "sliding_window": 4096,
       "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "rope_theta": 10000}
      """
    let sliding = try Self.plan(json, layer: 0)
    let full = try Self.plan(json, layer: 1)
    #expect(sliding.window == 4096 && full.window == nil)
    #expect(sliding.exactScale == 1.0 / 16 && sliding.softcap == 50)
    #expect(sliding.isCausal && sliding.prefix == "model.layers.0.self_attn.")
  }

  @Test("layer_types and per-layer-type rope parameters (Gemma 3's newer style)")
  func gemma3() throws {
    let json = """
      {"model_type": "gemma3_text", \(Self.base), "head_dim": 16, "sliding_window": 512,
       "layer_types": ["full_attention", "sliding_attention"],
       "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}
      """
    let full = try Self.plan(json, layer: 0)
    let sliding = try Self.plan(json, layer: 1)
    #expect(full.window == nil && full.rotary?.theta == 1_000_000)
    #expect(sliding.window == 512 && sliding.rotary?.theta == 10_000)
  }

  @Test("llama3 and YaRN rope scaling, from rope_scaling or rope_parameters")
  func ropeScaling() throws {
    let llama = try Self.plan(
      """
      {"model_type": "llama", \(Self.base), "rope_theta": 500000.0, "max_position_embeddings": 131072,
       "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
      """)
    #expect(
      llama.rotary?.scaling
        == .llama3(
          factor: 8, lowFrequencyFactor: 1, highFrequencyFactor: 4, originalContext: 8192))
    let yarn = try Self.plan(
      """
      {"model_type": "gpt_oss", \(Self.base), "head_dim": 16, "sliding_window": 128,
       "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
         "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096,
         "rope_theta": 150000.0}}
      """)
    // attention_factor absent: 0.1·ln(32) + 1.
    #expect(abs((yarn.rotary?.attentionFactor ?? 0) - (0.1 * log(32.0) + 1)) < 1e-15)
    #expect(yarn.window == 128)  // gpt-oss without layer_types: layer 0 slides.
  }

  @Test("Unknown families and fields that change the attention are one-line errors naming them")
  func errors() throws {
    func message(_ json: String, layer: Int = 0) -> String {
      do {
        _ = try Self.plan(
          json, layer: layer,
          names: [
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.qkv_proj.weight",
          ])
        return "no error"
      } catch AttentionError.invalidArgument(let text) {
        return text
      } catch {
        return "\(error)"
      }
    }
    #expect(message(#"{"model_type": "mamba", "hidden_size": 8}"#).contains("model_type \"mamba\""))
    #expect(
      message(
        """
        {"model_type": "llama", \(Self.base), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
        """
      ).contains("rope_type = \"dynamic\""))
    #expect(
      message(
        """
        {"model_type": "phi3", \(Self.base), "partial_rotary_factor": 0.01}
        """
      ).contains("partial_rotary_factor"))
    #expect(
      message(
        """
        {"model_type": "llama", \(Self.base), "layer_types": ["chunked_attention", "full_attention"]}
        """
      ).contains("layer_types[0]"))
    #expect(message(#"{"model_type": "llama", \#(Self.base)}"#, layer: 2).contains("0…1"))
    #expect(
      message(
        #"{"model_type": "llama", "hidden_size": "64", "num_attention_heads": 4, "num_hidden_layers": 1}"#
      )
      .contains("hidden_size"))
    #expect(message("not json").contains("not valid JSON"))
  }
}
