import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy reference fixtures of `Scripts/fixtures/make_reference_fixtures.py` (its docstring is
/// the schema): `manifest.json` decoded into the types below, and the `.npy` files it names.
///
/// Shape legend: `B` batch, `H` heads, `Tq` queries, `Tk` keys, `D` head dimension, `Dv` value
/// dimension. Inputs are float32 (`<f4`), booleans (`|b1`); references are float64 (`<f8`).
package enum ReferenceFixtures: FixtureSet {
  /// `Tests/_TestSupport/Fixtures/reference`.
  package static let files = FixtureFolder<ReferenceManifest>(
    "reference", script: "Scripts/fixtures/make_reference_fixtures.py")
}

package struct FixtureError: Error, CustomStringConvertible {
  package var description: String
  package init(_ description: String) { self.description = description }
}

// MARK: - Manifest schema (see the script's docstring)

package typealias ReferenceManifest = Manifest

/// `{"file", "dtype", "shape"}`.
package struct FileRef: Decodable, Sendable {
  package var file: String
  package var dtype: String
  package var shape: [Int]
}

/// A mask of an SDPA case: `kind` is `"keep"` (0/False = masked) or `"bias"` (added).
package struct MaskRef: Decodable, Sendable {
  package var kind: String
  package var file: String
  package var dtype: String
  package var shape: [Int]

  package var fileRef: FileRef { FileRef(file: file, dtype: dtype, shape: shape) }
}

/// The manifest of `reference/` (its `relative_position` section is read by the tests that use
/// it, not here).
package struct Manifest: FixtureManifest {
  package var schemaVersion: Int
  package var sdpa: [SdpaCase]
  package var sdpaDropout: [SdpaCase]
  package var philox: PhiloxRef
  package var randomUniform: [RandomCase]
  package var randomNormal: [RandomCase]
  package var dropoutMasks: [DropoutMaskCase]

  package enum CodingKeys: String, CodingKey {
    case schemaVersion = "schema_version"
    case sdpa
    case sdpaDropout = "sdpa_dropout"
    case philox
    case randomUniform = "random_uniform"
    case randomNormal = "random_normal"
    case dropoutMasks = "dropout_masks"
  }
}

package struct SdpaCase: NamedFixtureCase {
  package struct DropoutSpec: Decodable, Sendable {
    package var p: Double
    package var seed: UInt64
    package var stream: Int
    package var threshold: UInt64
    /// `float32(1 / float32(1 − p))`, PyTorch's factor for kept weights.
    package var scale: Double
    package var keep: FileRef
  }
  package struct Expected: Decodable, Sendable {
    package var output: FileRef
    package var weights: FileRef
  }

  package var name: String
  package var description: String
  package var q: FileRef
  package var k: FileRef
  package var v: FileRef
  package var masks: [MaskRef]
  package var causal: Bool
  package var scale: Double
  package var scaleIsDefault: Bool
  package var fullyMaskedRows: Int
  package var maxAbsScore: Double
  package var dropout: DropoutSpec?
  package var expected: Expected

  package enum CodingKeys: String, CodingKey {
    case name, description, q, k, v, masks, causal, scale, dropout, expected
    case scaleIsDefault = "scale_is_default"
    case fullyMaskedRows = "fully_masked_rows"
    case maxAbsScore = "max_abs_score"
  }

  /// `Tq`, `Tk`, `D`, `Dv` and the flat batch count `B·H·…`.
  package var queries: Int { q.shape[q.shape.count - 2] }
  package var keys: Int { k.shape[k.shape.count - 2] }
  package var headDim: Int { q.shape[q.shape.count - 1] }
  package var valueDim: Int { v.shape[v.shape.count - 1] }
  package var batchCount: Int { q.shape.dropLast(2).reduce(1, *) }

  /// The scale to pass to the kernels: `nil` for the default `1/√D`, else the case's value
  /// rounded to `Float` (0.3 in `scale_override`; the tolerances allow for that rounding).
  package var scaleArgument: Float? { scaleIsDefault ? nil : Float(scale) }
}

/// An SDPA case with its arrays loaded.
package struct LoadedSdpaCase {
  package var spec: SdpaCase
  package var queries: Tensor
  package var keys: Tensor
  package var values: Tensor
  package var mask: AttentionMask
  /// The largest |finite bias| (0 without a bias).
  package var maxAbsBias: Double
  /// float64, `[…, Tq, Dv]` and `[…, Tq, Tk]` flattened.
  package var expectedOutput: [Double]
  package var expectedWeights: [Double]

  package init(_ spec: SdpaCase) throws {
    self.spec = spec
    queries = try ReferenceFixtures.tensor(spec.q)
    keys = try ReferenceFixtures.tensor(spec.k)
    values = try ReferenceFixtures.tensor(spec.v)
    var mask = AttentionMask(isCausal: spec.causal)
    var maxAbsBias = 0.0
    for ref in spec.masks {
      let tensor = try ReferenceFixtures.tensor(ref.fileRef)
      switch ref.kind {
      case "keep" where mask.keep == nil:
        mask.keep = tensor
      case "bias" where mask.bias == nil:
        mask.bias = tensor
        maxAbsBias = tensor.scalars.filter(\.isFinite).map { Double(abs($0)) }.max() ?? 0
      default:
        throw FixtureError("\(spec.name): mask kind \(ref.kind) unsupported or given twice")
      }
    }
    self.mask = mask
    self.maxAbsBias = maxAbsBias
    expectedOutput = try ReferenceFixtures.doubles(spec.expected.output)
    expectedWeights = try ReferenceFixtures.doubles(spec.expected.weights)
  }

  /// The dropout of the case (`nil` for the `sdpa` section).
  package func dropout() throws -> Dropout? {
    guard let d = spec.dropout else { return nil }
    return try Dropout(probability: d.p, seed: d.seed)
  }
}

/// `{"file": str, "count": int}`; the file is `PhiloxFile`.
package struct PhiloxRef: Decodable, Sendable {
  package var file: String
  package var count: Int
}

package struct PhiloxFile: Decodable, Sendable {
  package var algorithm: String
  package var vectors: [PhiloxVector]
}

package struct PhiloxVector: Decodable, Sendable, CustomTestStringConvertible {
  package var source: String
  package var counter: [UInt32]
  package var key: [UInt32]
  package var output: [UInt32]

  package var testDescription: String {
    "\(source) counter \(counter.map(hex)) key \(key.map(hex))"
  }
}

private func hex(_ word: UInt32) -> String { "0x" + String(word, radix: 16) }

package struct RandomCase: NamedFixtureCase {
  package var name: String
  package var seed: UInt64
  package var stream: UInt32
  package var count: Int
  package var expected: FileRef
}

package struct DropoutMaskCase: NamedFixtureCase {
  package var name: String
  package var seed: UInt64
  package var stream: Int
  package var p: Double
  package var threshold: UInt64
  package var scale: Double?
  package var shape: [Int]
  package var keep: FileRef
}

extension ReferenceFixtures {
  package static func sdpaCases() throws -> [SdpaCase] { try manifest().sdpa }
  package static func sdpaDropoutCases() throws -> [SdpaCase] { try manifest().sdpaDropout }
  package static func dropoutMaskCases() throws -> [DropoutMaskCase] { try manifest().dropoutMasks }
  package static func randomUniformCases() throws -> [RandomCase] { try manifest().randomUniform }
  package static func randomNormalCases() throws -> [RandomCase] { try manifest().randomNormal }

  package static func philoxVectors() throws -> [PhiloxVector] {
    let ref = try manifest().philox
    let data = try Data(contentsOf: URL(fileURLWithPath: path(ref.file)))
    let file = try JSONDecoder().decode(PhiloxFile.self, from: data)
    guard file.algorithm == "philox4x32-10", file.vectors.count == ref.count else {
      throw FixtureError(
        "\(ref.file): algorithm \(file.algorithm), \(file.vectors.count) vectors; "
          + "the manifest says philox4x32-10, \(ref.count)")
    }
    return file.vectors
  }

  /// The SDPA case called `name` in either section.
  package static func sdpaCase(named name: String) throws -> SdpaCase {
    let m = try manifest()
    guard let found = (m.sdpa + m.sdpaDropout).first(where: { $0.name == name }) else {
      throw FixtureError("no SDPA case named \(name) in the manifest")
    }
    return found
  }
}

/// A float32, float64 or bool array of a fixture folder as a `Float` tensor, read with
/// `NPY.read(contentsOf:)`; its shape and dtype must be those the manifest states.
package func loadTensor(_ ref: FileRef, in folder: URL) throws -> Tensor {
  let array = try NPY.read(contentsOf: folder.appendingPathComponent(ref.file).path)
  guard array.tensor.shape == ref.shape, array.dtype.descr == ref.dtype else {
    throw FixtureError(
      "\(ref.file): read shape \(array.tensor.shape) dtype \(array.dtype.descr), "
        + "manifest says \(ref.shape) \(ref.dtype)")
  }
  return array.tensor
}

/// A `<f8` array of a fixture folder at full float64 precision (`NPY.readDoubles`; `NPY.read`
/// would round to `Float` and spend half an ulp of every tolerance on the reference itself). The
/// rounded read must agree: `Float(double) == float` for every element.
package func loadDoubles(_ ref: FileRef, in folder: URL) throws -> [Double] {
  guard ref.dtype == "<f8" else { throw FixtureError("\(ref.file) is \(ref.dtype), not <f8") }
  let rounded = try loadTensor(ref, in: folder)
  let values = try NPY.readDoubles(contentsOf: folder.appendingPathComponent(ref.file).path).values
  for e in values.indices where Float(values[e]).bitPattern != rounded.scalars[e].bitPattern {
    throw FixtureError(
      "\(ref.file)[\(e)]: NPY.read gives \(rounded.scalars[e]), Float(\(values[e])) expected")
  }
  return values
}
