import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy references of `Scripts/fixtures/make_mha_fixtures.py` (its docstring and the
/// manifest's `conventions` are the schema), in `Fixtures/mha`: whole multi-head layers in the
/// `torch`, `bert` and `llama` weight layouts — each stored in a safetensors file under a prefix
/// beside tensors of other layers — with key padding (fully padded rows too), float and boolean
/// masks, causal, grouped-query heads 4:1 and 1:1, rotary embeddings in both layouts at offsets 0
/// and 1000; and rotary embeddings alone (`ropeCases`).
package enum MHAFixtures: FixtureSet {
  /// `Tests/_TestSupport/Fixtures/mha`.
  package static let files = FixtureFolder<MHAManifest>(
    "mha", script: "Scripts/fixtures/make_mha_fixtures.py")

  package static func ropeCases() throws -> [RopeCase] { try manifest().ropeCases }
}

package struct MHAManifest: CaseListManifest {
  package var schemaVersion: Int
  package var cases: [MHACase]
  package var ropeCases: [RopeCase]

  package enum CodingKeys: String, CodingKey {
    case schemaVersion = "schema_version"
    case cases
    case ropeCases = "rope_cases"
  }
}

package struct MHACase: NamedFixtureCase {
  package struct Rope: Decodable, Sendable {
    package var theta: Double
    package var layout: String
    package var offset: Int
  }
  package struct Safetensors: Decodable, Sendable {
    package var file: String
    package var layerTensors: [String]
    package var otherTensors: [String]
    package enum CodingKeys: String, CodingKey {
      case file
      case layerTensors = "layer_tensors"
      case otherTensors = "other_tensors"
    }
  }
  package struct Files: Decodable, Sendable {
    package var safetensors: Safetensors
    package var input: FileRef
    package var expectedOutput: FileRef
    package var expectedWeights: FileRef?
    package var expectedAverageWeights: FileRef?
    package enum CodingKeys: String, CodingKey {
      case safetensors, input
      case expectedOutput = "expected_output"
      case expectedWeights = "expected_weights"
      case expectedAverageWeights = "expected_average_weights"
    }
  }

  package var name: String
  package var description: String
  package var layout: String
  package var prefix: String
  package var embedDim: Int
  package var heads: Int
  package var kvHeads: Int
  package var headDim: Int
  package var rope: Rope?
  package var batch: Int
  package var seq: Int
  package var isCausal: Bool
  package var keyPaddingMask: FileRef?
  package var attnMask: FileRef?
  package var layerNormEps: Double?
  package var files: Files

  package enum CodingKeys: String, CodingKey {
    case name, description, layout, prefix, heads, rope, batch, seq, files
    case embedDim = "embed_dim"
    case kvHeads = "kv_heads"
    case headDim = "head_dim"
    case isCausal = "is_causal"
    case keyPaddingMask = "key_padding_mask"
    case attnMask = "attn_mask"
    case layerNormEps = "layer_norm_eps"
  }

  /// The layer as the case's file holds it, loaded through `WeightLayout`.
  package func layer() throws -> MultiHeadAttention {
    let options = MultiHeadAttention.LoadOptions(
      prefix: prefix, heads: heads, keyValueHeads: kvHeads, ropeTheta: rope?.theta,
      ropeLayout: rope.flatMap { RotaryEmbedding.Layout(rawValue: $0.layout) } ?? .half,
      layerNormEpsilon: layerNormEps.map(Float.init))
    return try MultiHeadAttention(
      stateDict: MHAFixtures.stateDict(files.safetensors.file),
      layout: WeightLayout(rawValue: layout)!, options: options)
  }

  /// The key padding mask (nonzero = padding) and the SDPA mask, as the layer takes them.
  package func masks() throws -> (padding: Tensor?, mask: AttentionMask) {
    let padding = try keyPaddingMask.map(MHAFixtures.tensor)
    var mask = AttentionMask(isCausal: isCausal)
    if let attnMask {
      let tensor = try MHAFixtures.tensor(attnMask)
      if attnMask.dtype == "|b1" { mask.keep = tensor } else { mask.bias = tensor }
    }
    return (padding, mask)
  }
}

package struct RopeCase: NamedFixtureCase {
  package var name: String
  package var layout: String
  package var theta: Double
  package var offset: Int
  package var input: FileRef
  package var expected: FileRef
}
