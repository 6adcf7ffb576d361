import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy references of `Scripts/make_backward_fixtures.py` (its docstring is the schema), in
/// `Fixtures/backward`: the gradients dQ, dK, dV and d(bias) of scaled dot-product attention for
/// a given dO, with grouped-query heads, both causal alignments, windows, keep masks with fully
/// masked rows, full and broadcast biases, and dropout whose keep decisions Z are an input.
///
/// Shape legend: `B` batch, `H` query heads, `Hkv` key/value heads (`G = H / Hkv`), `Tq` queries,
/// `Tk` keys, `D` head dimension, `Dv` value dimension. Q `[B, H, Tq, D]`, K `[B, Hkv, Tk, D]`,
/// V `[B, Hkv, Tk, Dv]`, dO `[B, H, Tq, Dv]`; references (`<f8`) shaped as Q, K, V, the bias and
/// the output.
package enum BackwardFixtures {
  /// `Tests/_TestSupport/Fixtures/backward`.
  package static let folder = Fixtures.folder("backward")

  /// The decoded manifest, read once.
  package static func manifest() throws -> BackwardManifest { try cachedManifest.get() }

  private static let cachedManifest: Result<BackwardManifest, any Error> = Result {
    try Fixtures.manifest(
      in: folder, as: BackwardManifest.self, schemaVersion: \.schemaVersion,
      script: "Scripts/make_backward_fixtures.py")
  }

  /// Every case, in the manifest's order.
  package static func cases() throws -> [BackwardCase] { try manifest().cases }

  /// The case called `name`.
  package static func backwardCase(named name: String) throws -> BackwardCase {
    guard let found = try cases().first(where: { $0.name == name }) else {
      throw FixtureError("no case named \(name) in \(folder.path)/manifest.json")
    }
    return found
  }

  /// A float32, float64 or bool array as a `Float` tensor, shape and dtype checked.
  package static func tensor(_ ref: FileRef) throws -> Tensor { try loadTensor(ref, in: folder) }

  /// A `<f8` array at full float64 precision.
  package static func doubles(_ ref: FileRef) throws -> [Double] {
    try loadDoubles(ref, in: folder)
  }
}

// MARK: - Manifest schema (see the script's docstring)

package struct BackwardManifest: Decodable, Sendable {
  package var schemaVersion: Int
  package var generator: String
  package var cases: [BackwardCase]

  package enum CodingKeys: String, CodingKey {
    case schemaVersion = "schema_version"
    case generator, cases
  }
}

package struct BackwardCase: Decodable, Sendable, CustomTestStringConvertible {
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

  package var testDescription: String { name }

  package var queries: Int { q.shape[2] }
  package var keys: Int { k.shape[2] }
  package var headDim: Int { q.shape[3] }
  package var valueDim: Int { v.shape[3] }
  /// `B·H`, the flat query batch.
  package var batchCount: Int { q.shape[0] * heads }

  /// The scale to pass to the kernels: `nil` for the default, else `Float(scale)`.
  package var scaleArgument: Float? { scale.map { Float($0) } }
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
    guard let alignment = CausalAlignment(rawValue: spec.alignment) else {
      throw FixtureError("\(spec.name): unknown alignment \(spec.alignment)")
    }
    var mask = AttentionMask(
      isCausal: spec.causal, causalAlignment: alignment, window: spec.window)
    for ref in spec.masks {
      let tensor = try BackwardFixtures.tensor(ref.fileRef)
      switch ref.kind {
      case "keep" where mask.keep == nil && ref.dtype == "|b1":
        mask.keep = tensor
      case "bias" where mask.bias == nil && ref.dtype == "<f4":
        mask.bias = tensor
      default:
        throw FixtureError("\(spec.name): mask \(ref.kind) \(ref.dtype) unsupported or repeated")
      }
    }
    self.mask = mask
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
