import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy references of `Scripts/fixtures/make_backward_fixtures.py` (its docstring is the
/// schema), in `Fixtures/backward`: the gradients dQ, dK, dV and d(bias) of scaled dot-product
/// attention for a given dO, with grouped-query heads, both causal alignments, windows, keep masks
/// with fully masked rows, full and broadcast biases, and dropout whose keep decisions Z are an
/// input.
///
/// Shape legend: `B` batch, `H` query heads, `Hkv` key/value heads (`G = H / Hkv`), `Tq` queries,
/// `Tk` keys, `D` head dimension, `Dv` value dimension. Q `[B, H, Tq, D]`, K `[B, Hkv, Tk, D]`,
/// V `[B, Hkv, Tk, Dv]`, dO `[B, H, Tq, Dv]`; references (`<f8`) shaped as Q, K, V, the bias and
/// the output.
package enum BackwardFixtures: FixtureSet {
  /// `Tests/_TestSupport/Fixtures/backward`.
  package static let files = FixtureFolder<BackwardManifest>(
    "backward", script: "Scripts/fixtures/make_backward_fixtures.py")

  /// The case called `name`.
  package static func backwardCase(named name: String) throws -> BackwardCase {
    try caseNamed(name)
  }
}

// MARK: - Manifest schema (see the script's docstring)

package typealias BackwardManifest = CaseManifest<BackwardCase>

package struct BackwardCase: AttentionFixtureCase {
  package struct DropoutSpec: Decodable, Sendable {
    /// The probability of dropping; kept weights are scaled by `1/(1 − p)`.
    package var p: Double
    /// `|b1 [B, H, Tq, Tk]`, True = kept.
    package var keep: FileRef
  }
  package struct Expected: Decodable, Sendable {
    package var output: FileRef
    package var dq: FileRef
    package var dk: FileRef
    package var dv: FileRef
    package var dbias: FileRef?
  }

  package var name: String
  package var description: String
  package var q: FileRef
  package var k: FileRef
  package var v: FileRef
  package var gradOutput: FileRef
  package var heads: Int
  package var kvHeads: Int
  package var groupSize: Int
  package var masks: [MaskRef]
  package var causal: Bool
  /// `"top-left"` or `"bottom-right"`, `CausalAlignment`'s raw values.
  package var alignment: String
  package var window: Int?
  /// The requested scale; `nil` for the default `1/√D`.
  package var scale: Double?
  package var scaleUsed: Double
  package var dropout: DropoutSpec?
  package var fullyMaskedRows: Int
  package var expected: Expected

  package enum CodingKeys: String, CodingKey {
    case name, description, q, k, v, heads, masks, causal, alignment, window, scale, dropout
    case expected
    case gradOutput = "grad_output"
    case kvHeads = "kv_heads"
    case groupSize = "group_size"
    case scaleUsed = "scale_used"
    case fullyMaskedRows = "fully_masked_rows"
  }
}

/// A case with its arrays loaded and its `AttentionMask` built.
package struct LoadedBackwardCase {
  package var spec: BackwardCase
  package var queries: Tensor
  package var keys: Tensor
  package var values: Tensor
  package var gradOutput: Tensor
  package var mask: AttentionMask
  /// The case's dropout decisions (`[B, H, Tq, Tk]`, 1 = kept) and probability; `nil` without.
  package var dropoutKeep: Tensor?
  /// float64 references, flat, shaped as the output, Q, K, V and the bias.
  package var expectedOutput: [Double]
  package var expectedDQ: [Double]
  package var expectedDK: [Double]
  package var expectedDV: [Double]
  package var expectedDBias: [Double]?

  package init(_ spec: BackwardCase) throws {
    self.spec = spec
    queries = try BackwardFixtures.tensor(spec.q)
    keys = try BackwardFixtures.tensor(spec.k)
    values = try BackwardFixtures.tensor(spec.v)
    gradOutput = try BackwardFixtures.tensor(spec.gradOutput)
    mask = try BackwardFixtures.attentionMask(
      case: spec.name, causal: spec.causal, alignment: spec.alignment, window: spec.window,
      masks: spec.masks)
    dropoutKeep = try spec.dropout.map { try BackwardFixtures.tensor($0.keep) }
    expectedOutput = try BackwardFixtures.doubles(spec.expected.output)
    expectedDQ = try BackwardFixtures.doubles(spec.expected.dq)
    expectedDK = try BackwardFixtures.doubles(spec.expected.dk)
    expectedDV = try BackwardFixtures.doubles(spec.expected.dv)
    expectedDBias = try spec.expected.dbias.map { try BackwardFixtures.doubles($0) }
    guard (expectedDBias == nil) == (mask.bias == nil) else {
      throw FixtureError("\(spec.name): a bias gradient without a bias, or the reverse")
    }
  }
}
