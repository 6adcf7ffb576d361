import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy references of `Scripts/make_relpos_grad_fixtures.py` (its docstring is the schema),
/// in `Fixtures/relpos_grad`: `dx` and the parameter gradients of the notebook's
/// `RelativePositionAttention` for a given `dY`, with `M` smaller and larger than `T`, `M = 0`, a
/// keep mask with a fully masked row, causal masking and `B > 1`.
///
/// Shape legend: `B` batch, `T` sequence length, `D` = `d_model`, `M` largest relative distance.
/// x, dY `[B, T, D]` (`<f4`); parameters under their `state_dict` names (`<f4`); references
/// (`<f8`) shaped as x, the projections and the parameters.
package enum RelposGradFixtures {
  /// `Tests/_TestSupport/Fixtures/relpos_grad`.
  package static let folder = Fixtures.folder("relpos_grad")

  /// The decoded manifest, read once.
  package static func manifest() throws -> RelposGradManifest { try cachedManifest.get() }

  private static let cachedManifest: Result<RelposGradManifest, any Error> = Result {
    try Fixtures.manifest(
      in: folder, as: RelposGradManifest.self, schemaVersion: \.schemaVersion,
      script: "Scripts/make_relpos_grad_fixtures.py")
  }

  /// Every case, in the manifest's order.
  package static func cases() throws -> [RelposGradCase] { try manifest().cases }

  /// The absolute path of a file named in the manifest.
  package static func path(_ file: String) -> String { folder.appendingPathComponent(file).path }
}

// MARK: - Manifest schema (see the script's docstring)

package struct RelposGradManifest: Decodable, Sendable {
  package var schemaVersion: Int
  package var generator: String
  package var cases: [RelposGradCase]

  package enum CodingKeys: String, CodingKey {
    case schemaVersion = "schema_version"
    case generator, cases
  }
}

package struct RelposGradCase: Decodable, Sendable, CustomTestStringConvertible {
  package var name: String
  package var description: String
  package var batch: Int
  package var length: Int
  package var dModel: Int
  package var maxRel: Int
  package var causal: Bool
  package var keep: FileRef?
  package var fullyMaskedRows: Int
  package var x: FileRef
  package var gradOutput: FileRef
  /// By `state_dict` name.
  package var parameters: [String: FileRef]
  /// `"output"`, `"x"` (dx), `"dq"`, `"dk"`, `"dv"` and the `state_dict` names.
  package var expected: [String: FileRef]

  package enum CodingKeys: String, CodingKey {
    case name, description, batch, length, causal, keep, x, parameters, expected
    case dModel = "d_model"
    case maxRel = "max_rel"
    case fullyMaskedRows = "fully_masked_rows"
    case gradOutput = "grad_output"
  }

  package var testDescription: String { name }
}

/// A case with its arrays loaded, its module built and its `AttentionMask`.
package struct LoadedRelposGradCase {
  package var spec: RelposGradCase
  package var module: RelativePositionAttention
  package var x: Tensor
  package var gradOutput: Tensor
  package var mask: AttentionMask
  /// float64 references, flat, by the manifest's `expected` keys.
  package var expected: [String: [Double]]

  package init(_ spec: RelposGradCase) throws {
    self.spec = spec
    let folder = RelposGradFixtures.folder
    var tensors: [String: Tensor] = [:]
    for (name, ref) in spec.parameters { tensors[name] = try loadTensor(ref, in: folder) }
    module = try RelativePositionAttention(stateDict: StateDict(tensors))
    guard module.maxDistance == spec.maxRel, module.modelDim == spec.dModel else {
      throw FixtureError("\(spec.name): parameters do not match d_model and max_rel")
    }
    x = try loadTensor(spec.x, in: folder)
    gradOutput = try loadTensor(spec.gradOutput, in: folder)
    mask = AttentionMask(isCausal: spec.causal)
    if let keep = spec.keep { mask.keep = try loadTensor(keep, in: folder) }
    expected = try spec.expected.mapValues { try loadDoubles($0, in: folder) }
  }
}
