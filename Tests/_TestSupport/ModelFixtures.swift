import AttentionKit
import Foundation
import TensorIO
import Testing

/// The checkpoints of `Scripts/fixtures/make_model_fixtures.py` (its docstring is the schema), in
/// `Fixtures/models`: tiny random models of every family `attn mha --model` reads, saved by
/// transformers (one sharded), two `nn.MultiheadAttention` state dicts, and per case the input
/// entering a layer's attention module with that module's float64 output (and PyTorch's own
/// float32 output, for comparison).
package enum ModelFixtures: FixtureSet {
  /// `Tests/_TestSupport/Fixtures/models`.
  package static let files = FixtureFolder<CaseManifest<ModelCase>>(
    "models", script: "Scripts/fixtures/make_model_fixtures.py")
}

package struct ModelCase: NamedFixtureCase {
  /// What the config says of the layer (the manifest's `attention`), as `ModelLayerPlan` should
  /// work it out.
  package struct Attention: Decodable, Sendable {
    package var heads: Int
    package var kvHeads: Int
    package var headDim: Int
    package var scale: Double
    package var softcap: Double?
    package var window: Int?
    package var causal: Bool

    package enum CodingKeys: String, CodingKey {
      case heads, scale, softcap, window, causal
      case kvHeads = "kv_heads"
      case headDim = "head_dim"
    }
  }
  package struct TorchFloat32: Decodable, Sendable {
    package var output: FileRef
    package var maxAbsError: Double
    package enum CodingKeys: String, CodingKey {
      case output
      case maxAbsError = "max_abs_error"
    }
  }

  package var name: String
  package var family: String
  package var modelDir: String
  /// T5's `encoder` or `decoder`, else `nil`.
  package var stack: String?
  /// `nil` for the `nn.MultiheadAttention` state dicts.
  package var layer: Int?
  package var x: FileRef
  package var keyPaddingMask: FileRef?
  package var expected: FileRef
  package var torchFloat32: TorchFloat32
  package var attention: Attention
  package struct Decode: Decodable, Sendable {
    package var output: FileRef
  }
  /// A token-by-token decode reference (transformers' cache), when the case has one.
  package var decode: Decode?

  package enum CodingKeys: String, CodingKey {
    case name, family, stack, layer, x, expected, attention, decode
    case modelDir = "model_dir"
    case keyPaddingMask = "key_padding_mask"
    case torchFloat32 = "torch_float32"
  }

  /// `--layer`'s value: the index, or T5's `stack.index`.
  package var layerArgument: String? {
    layer.map { l in stack.map { "\($0).\(l)" } ?? "\(l)" }
  }

  /// Whether the model is an `nn.MultiheadAttention` state dict (not a Hugging Face folder).
  package var isTorchModule: Bool { layer == nil }
}
