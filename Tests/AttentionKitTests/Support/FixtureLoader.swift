import AttentionKit
import Foundation
import Testing

/// The numpy reference fixtures of `Scripts/make_reference_fixtures.py` (its docstring is the
/// schema): `manifest.json` decoded into the types below, and the `.npy` files it names.
///
/// Shape legend: `B` batch, `H` heads, `Tq` queries, `Tk` keys, `D` head dimension, `Dv` value
/// dimension. Inputs are float32 (`<f4`), booleans (`|b1`); references are float64 (`<f8`).
enum ReferenceFixtures {
  /// `Tests/AttentionKitTests/Fixtures/reference`, found from this file's own path.
  static let folder: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent()  // Support
    .deletingLastPathComponent()  // AttentionKitTests
    .appendingPathComponent("Fixtures/reference", isDirectory: true)

  /// The decoded manifest, read once.
  static func manifest() throws -> Manifest { try cachedManifest.get() }

  private static let cachedManifest: Result<Manifest, any Error> = Result {
    let url = folder.appendingPathComponent("manifest.json")
    let data: Data
    do {
      data = try Data(contentsOf: url)
    } catch {
      throw FixtureError("cannot read \(url.path): \(error)")
    }
    let manifest = try JSONDecoder().decode(Manifest.self, from: data)
    guard manifest.schemaVersion == 1 else {
      throw FixtureError("manifest schema_version \(manifest.schemaVersion), these tests read 1")
    }
    return manifest
  }

  /// The absolute path of a file named in the manifest.
  static func path(_ file: String) -> String { folder.appendingPathComponent(file).path }

  /// A float32, float64 or bool array as a `Float` tensor, with the manifest's shape and dtype.
  static func tensor(_ ref: FileRef) throws -> Tensor { try loadTensor(ref, in: folder) }

  /// A `<f8` array at full float64 precision.
  static func doubles(_ ref: FileRef) throws -> [Double] { try loadDoubles(ref, in: folder) }

  /// A `|b1` array as booleans (`true` = the file's `True`).
  static func bools(_ ref: FileRef) throws -> [Bool] {
    guard ref.dtype == "|b1" else { throw FixtureError("\(ref.file) is \(ref.dtype), not |b1") }
    return try tensor(ref).scalars.map { $0 != 0 }
  }
}

struct FixtureError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

// MARK: - Manifest schema (see the script's docstring)

/// `{"file", "dtype", "shape"}`.
struct FileRef: Decodable, Sendable {
  var file: String
  var dtype: String
  var shape: [Int]
}

/// A mask of an SDPA case: `kind` is `"keep"` (0/False = masked) or `"bias"` (added).
struct MaskRef: Decodable, Sendable {
  var kind: String
  var file: String
  var dtype: String
  var shape: [Int]

  var fileRef: FileRef { FileRef(file: file, dtype: dtype, shape: shape) }
}

struct Manifest: Decodable, Sendable {
  var schemaVersion: Int
  var sdpa: [SdpaCase]
  var sdpaDropout: [SdpaCase]
  var philox: PhiloxRef
  var randomUniform: [RandomCase]
  var randomNormal: [RandomCase]
  var dropoutMasks: [DropoutMaskCase]

  enum CodingKeys: String, CodingKey {
    case schemaVersion = "schema_version"
    case sdpa
    case sdpaDropout = "sdpa_dropout"
    case philox
    case randomUniform = "random_uniform"
    case randomNormal = "random_normal"
    case dropoutMasks = "dropout_masks"
  }
}

struct SdpaCase: Decodable, Sendable, CustomTestStringConvertible {
  struct DropoutSpec: Decodable, Sendable {
    var p: Double
    var seed: UInt64
    var stream: Int
    var threshold: UInt64
    var keep: FileRef
  }
  struct Expected: Decodable, Sendable {
    var output: FileRef
    var weights: FileRef
  }

  var name: String
  var description: String
  var q: FileRef
  var k: FileRef
  var v: FileRef
  var masks: [MaskRef]
  var causal: Bool
  var scale: Double
  var scaleIsDefault: Bool
  var fullyMaskedRows: Int
  var maxAbsScore: Double
  var dropout: DropoutSpec?
  var expected: Expected

  enum CodingKeys: String, CodingKey {
    case name, description, q, k, v, masks, causal, scale, dropout, expected
    case scaleIsDefault = "scale_is_default"
    case fullyMaskedRows = "fully_masked_rows"
    case maxAbsScore = "max_abs_score"
  }

  var testDescription: String { name }

  /// `Tq`, `Tk`, `D`, `Dv` and the flat batch count `B·H·…`.
  var queries: Int { q.shape[q.shape.count - 2] }
  var keys: Int { k.shape[k.shape.count - 2] }
  var headDim: Int { q.shape[q.shape.count - 1] }
  var valueDim: Int { v.shape[v.shape.count - 1] }
  var batchCount: Int { q.shape.dropLast(2).reduce(1, *) }

  /// The scale to pass to the kernels: `nil` for the default `1/√D`, else the case's value
  /// rounded to `Float` (0.3 in `scale_override`; the tolerances allow for that rounding).
  var scaleArgument: Float? { scaleIsDefault ? nil : Float(scale) }
}

/// An SDPA case with its arrays loaded.
struct LoadedSdpaCase {
  var spec: SdpaCase
  var queries: Tensor
  var keys: Tensor
  var values: Tensor
  var mask: AttentionMask
  /// The largest |finite bias| (0 without a bias).
  var maxAbsBias: Double
  /// float64, `[…, Tq, Dv]` and `[…, Tq, Tk]` flattened.
  var expectedOutput: [Double]
  var expectedWeights: [Double]

  init(_ spec: SdpaCase) throws {
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
  func dropout() throws -> Dropout? {
    guard let d = spec.dropout else { return nil }
    return try Dropout(probability: Float(d.p), seed: d.seed)
  }
}

/// `{"file": str, "count": int}`; the file is `PhiloxFile`.
struct PhiloxRef: Decodable, Sendable {
  var file: String
  var count: Int
}

struct PhiloxFile: Decodable, Sendable {
  var algorithm: String
  var vectors: [PhiloxVector]
}

struct PhiloxVector: Decodable, Sendable, CustomTestStringConvertible {
  var source: String
  var counter: [UInt32]
  var key: [UInt32]
  var output: [UInt32]

  var testDescription: String {
    "\(source) counter \(counter.map(hex)) key \(key.map(hex))"
  }
}

private func hex(_ word: UInt32) -> String { "0x" + String(word, radix: 16) }

struct RandomCase: Decodable, Sendable, CustomTestStringConvertible {
  var name: String
  var seed: UInt64
  var stream: UInt32
  var count: Int
  var expected: FileRef

  var testDescription: String { name }
}

struct DropoutMaskCase: Decodable, Sendable, CustomTestStringConvertible {
  var name: String
  var seed: UInt64
  var stream: Int
  var p: Double
  var threshold: UInt64
  var scale: Double?
  var shape: [Int]
  var keep: FileRef

  var testDescription: String { name }
}

extension ReferenceFixtures {
  static func sdpaCases() throws -> [SdpaCase] { try manifest().sdpa }
  static func sdpaDropoutCases() throws -> [SdpaCase] { try manifest().sdpaDropout }
  static func dropoutMaskCases() throws -> [DropoutMaskCase] { try manifest().dropoutMasks }
  static func randomUniformCases() throws -> [RandomCase] { try manifest().randomUniform }
  static func randomNormalCases() throws -> [RandomCase] { try manifest().randomNormal }

  static func philoxVectors() throws -> [PhiloxVector] {
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
  static func sdpaCase(named name: String) throws -> SdpaCase {
    let m = try manifest()
    guard let found = (m.sdpa + m.sdpaDropout).first(where: { $0.name == name }) else {
      throw FixtureError("no SDPA case named \(name) in the manifest")
    }
    return found
  }
}

/// A float32, float64 or bool array of a fixture folder as a `Float` tensor, read with
/// `NPY.read(contentsOf:)`; its shape and dtype must be those the manifest states.
func loadTensor(_ ref: FileRef, in folder: URL) throws -> Tensor {
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
func loadDoubles(_ ref: FileRef, in folder: URL) throws -> [Double] {
  guard ref.dtype == "<f8" else { throw FixtureError("\(ref.file) is \(ref.dtype), not <f8") }
  let rounded = try loadTensor(ref, in: folder)
  let values = try NPY.readDoubles(contentsOf: folder.appendingPathComponent(ref.file).path).values
  for e in values.indices where Float(values[e]).bitPattern != rounded.scalars[e].bitPattern {
    throw FixtureError(
      "\(ref.file)[\(e)]: NPY.read gives \(rounded.scalars[e]), Float(\(values[e])) expected")
  }
  return values
}
