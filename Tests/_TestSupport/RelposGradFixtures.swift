import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy references of `Scripts/fixtures/make_relpos_grad_fixtures.py` (its docstring is the
/// schema), in `Fixtures/relpos_grad`: `dx` and the parameter gradients of the notebook's
/// `RelativePositionAttention` for a given `dY`, with `M` smaller and larger than `T`, `M = 0`, a
/// keep mask with a fully masked row, causal masking and `B > 1`.
///
/// Shape legend: `B` batch, `T` sequence length, `D` = `d_model`, `M` largest relative distance.
/// x, dY `[B, T, D]` (`<f4`); parameters under their `state_dict` names (`<f4`); references
/// (`<f8`) shaped as x, the projections and the parameters.
package enum RelposGradFixtures: FixtureSet {
  /// `Tests/_TestSupport/Fixtures/relpos_grad`.
  package static let files = FixtureFolder<RelposGradManifest>(
    "relpos_grad", script: "Scripts/fixtures/make_relpos_grad_fixtures.py")
}

// MARK: - Manifest schema (see the script's docstring)

package typealias RelposGradManifest = CaseManifest<RelposGradCase>

package struct RelposGradCase: NamedFixtureCase {
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
    let files = RelposGradFixtures.files
    module = try RelativePositionAttention(
      stateDict: StateDict(spec.parameters.mapValues(files.tensor)))
    guard module.maxDistance == spec.maxRel, module.modelDim == spec.dModel else {
      throw FixtureError("\(spec.name): parameters do not match d_model and max_rel")
    }
    x = try files.tensor(spec.x)
    gradOutput = try files.tensor(spec.gradOutput)
    mask = AttentionMask(isCausal: spec.causal)
    if let keep = spec.keep { mask.keep = try files.tensor(keep) }
    expected = try spec.expected.mapValues(files.doubles)
  }
}
