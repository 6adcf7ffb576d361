import AttentionKit
import Foundation
import TensorIO
import Testing

/// Where the committed fixtures live: `Tests/_TestSupport/Fixtures`, one folder for every test
/// target, found from this file's own path (they are read from the source tree, not bundled).
///
/// - `reference/`: float64 references from numpy (`Scripts/fixtures/make_reference_fixtures.py`);
/// - `torch/`: PyTorch's generator and the notebook's cells
///   (`Scripts/fixtures/make_torch_fixtures.py`);
/// - `io/`: `.npy` and safetensors files, good and malformed
///   (`Scripts/fixtures/make_io_fixtures.py`);
/// - `sdpa_gqa/`: float64 references of PyTorch's SDPA semantics — grouped-query heads, causal
///   alignments, windows, masks, half precision, decode (`Scripts/fixtures/make_sdpa_fixtures.py`);
/// - `backward/`: float64 gradients of attention — dQ, dK, dV, d(bias), with masks, grouped
///   heads and given dropout decisions (`Scripts/fixtures/make_backward_fixtures.py`);
/// - `mha/`: whole multi-head layers in the torch, bert and llama layouts, and rotary embeddings
///   (`Scripts/fixtures/make_mha_fixtures.py`).
/// - `relpos_grad/`: float64 gradients of `RelativePositionAttention` — dx and every parameter
///   (`Scripts/fixtures/make_relpos_grad_fixtures.py`).
/// - `score_terms/`: float64 references of attention with score terms — soft-capping, ALiBi, T5
///   buckets, sinks — alone and combined (`Scripts/fixtures/make_score_terms_fixtures.py`).
package enum Fixtures {
  package static let root: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent()
    .appendingPathComponent("Fixtures", isDirectory: true)

  /// The folder `name` (`"reference"`, `"torch"`, `"io"`).
  package static func folder(_ name: String) -> URL {
    root.appendingPathComponent(name, isDirectory: true)
  }

  /// `folder/manifest.json` decoded as `Manifest`, whose `schemaVersion` must be 1; `script`
  /// names the script that writes it, for the message when it is missing.
  package static func manifest<Manifest: Decodable>(
    in folder: URL, as _: Manifest.Type, schemaVersion: KeyPath<Manifest, Int>, script: String
  ) throws -> Manifest {
    let url = folder.appendingPathComponent("manifest.json")
    let data: Data
    do {
      data = try Data(contentsOf: url)
    } catch {
      throw FixtureError("cannot read \(url.path): \(error) (\(script))")
    }
    let manifest = try JSONDecoder().decode(Manifest.self, from: data)
    guard manifest[keyPath: schemaVersion] == 1 else {
      throw FixtureError(
        "manifest schema_version \(manifest[keyPath: schemaVersion]), these tests read 1")
    }
    return manifest
  }
}

// MARK: - A fixture folder and its manifest

/// The decoded `manifest.json` of a fixture folder: every manifest starts with
/// `"schema_version": 1`.
package protocol FixtureManifest: Decodable, Sendable {
  var schemaVersion: Int { get }
}

/// A manifest whose cases are a list (`"cases": [Case]`), each with a unique `name`.
package protocol CaseListManifest: FixtureManifest {
  associatedtype Case: NamedFixtureCase
  var cases: [Case] { get }
}

/// A case of a manifest, found by its `name`, which is also its name in test results.
package protocol NamedFixtureCase: Decodable, Sendable, CustomTestStringConvertible {
  var name: String { get }
}

extension NamedFixtureCase {
  package var testDescription: String { name }
}

/// The manifest of the scripts that write `{"schema_version": 1, "generator": str,
/// "conventions": [str], "cases": [Case]}` (`make_sdpa_fixtures.py`, `make_backward_fixtures.py`,
/// `make_relpos_grad_fixtures.py`, `make_score_terms_fixtures.py`; the conventions are prose and
/// are not read).
package struct CaseManifest<Case: NamedFixtureCase>: CaseListManifest {
  package var schemaVersion: Int
  package var generator: String
  package var cases: [Case]

  package enum CodingKeys: String, CodingKey {
    case schemaVersion = "schema_version"
    case generator, cases
  }
}

/// One folder of `Fixtures` and the script that writes it: its manifest, decoded once (an error
/// is kept and thrown by every `manifest()`), and the files the manifest names.
package struct FixtureFolder<Manifest: FixtureManifest>: Sendable {
  /// `Tests/_TestSupport/Fixtures/<name>`.
  package let url: URL
  private let decoded: Result<Manifest, any Error>

  /// The folder `name`, written by `script` (named in the message when the manifest is missing).
  package init(_ name: String, script: String) {
    let url = Fixtures.folder(name)
    self.url = url
    decoded = Result {
      try Fixtures.manifest(
        in: url, as: Manifest.self, schemaVersion: \.schemaVersion, script: script)
    }
  }

  /// The decoded manifest.
  package func manifest() throws -> Manifest { try decoded.get() }

  /// The absolute path of a file named in the manifest.
  package func path(_ file: String) -> String { url.appendingPathComponent(file).path }

  /// A float32, float16, float64, bool or uint16 array as a `Float` tensor, shape and dtype
  /// checked against the manifest (`loadTensor`).
  package func tensor(_ ref: FileRef) throws -> Tensor { try loadTensor(ref, in: url) }

  /// A `<f8` array at full float64 precision (`loadDoubles`).
  package func doubles(_ ref: FileRef) throws -> [Double] { try loadDoubles(ref, in: url) }

  /// A `|b1` array as booleans (`true` = the file's `True`).
  package func bools(_ ref: FileRef) throws -> [Bool] {
    guard ref.dtype == "|b1" else { throw FixtureError("\(ref.file) is \(ref.dtype), not |b1") }
    return try tensor(ref).scalars.map { $0 != 0 }
  }

  /// Every tensor of a safetensors file of the folder.
  package func stateDict(_ file: String) throws -> StateDict {
    try SafeTensors.read(contentsOf: path(file)).stateDict
  }
}

extension FixtureFolder where Manifest: CaseListManifest {
  /// Every case, in the manifest's order.
  package func cases() throws -> [Manifest.Case] { try manifest().cases }

  /// The case called `name`.
  package func caseNamed(_ name: String) throws -> Manifest.Case {
    guard let found = try cases().first(where: { $0.name == name }) else {
      throw FixtureError("no case named \(name) in \(url.path)/manifest.json")
    }
    return found
  }
}

/// The loader of one fixture folder (`SDPAFixtures`, `BackwardFixtures`, …): an enum that names
/// its `FixtureFolder`, and gets from here the static accessors the tests call
/// (`XFixtures.tensor(ref)`, `XFixtures.cases()`, …).
package protocol FixtureSet {
  associatedtype Manifest: FixtureManifest
  static var files: FixtureFolder<Manifest> { get }
}

extension FixtureSet {
  /// `Tests/_TestSupport/Fixtures/<name>`.
  package static var folder: URL { files.url }

  /// The decoded manifest, read once.
  package static func manifest() throws -> Manifest { try files.manifest() }

  /// The absolute path of a file named in the manifest.
  package static func path(_ file: String) -> String { files.path(file) }

  /// An array of the folder as a `Float` tensor, shape and dtype checked against the manifest.
  package static func tensor(_ ref: FileRef) throws -> Tensor { try files.tensor(ref) }

  /// A `<f8` array at full float64 precision.
  package static func doubles(_ ref: FileRef) throws -> [Double] { try files.doubles(ref) }

  /// A `|b1` array as booleans.
  package static func bools(_ ref: FileRef) throws -> [Bool] { try files.bools(ref) }

  /// Every tensor of a safetensors file of the folder.
  package static func stateDict(_ file: String) throws -> StateDict { try files.stateDict(file) }
}

extension FixtureSet where Manifest: CaseListManifest {
  /// Every case, in the manifest's order.
  package static func cases() throws -> [Manifest.Case] { try files.cases() }

  /// The case called `name`.
  package static func caseNamed(_ name: String) throws -> Manifest.Case {
    try files.caseNamed(name)
  }
}

// MARK: - Attention cases

/// A case of scaled dot-product attention with grouped-query heads (`SDPACase`,
/// `BackwardCase`): Q `[B, H, Tq, D]`, K `[B, Hkv, Tk, D]`, V `[B, Hkv, Tk, Dv]`.
package protocol AttentionFixtureCase: NamedFixtureCase {
  var q: FileRef { get }
  var k: FileRef { get }
  var v: FileRef { get }
  /// `H`, the query heads.
  var heads: Int { get }
  /// The requested scale; `nil` for the default `1/√D`.
  var scale: Double? { get }
}

extension AttentionFixtureCase {
  package var batch: Int { q.shape[0] }
  package var queries: Int { q.shape[2] }
  package var keys: Int { k.shape[2] }
  package var headDim: Int { q.shape[3] }
  package var valueDim: Int { v.shape[3] }
  /// `B·H`, the flat query batch.
  package var batchCount: Int { batch * heads }

  /// The scale to pass to the kernels: `nil` for the default, else `Float(scale)`.
  package var scaleArgument: Float? { scale.map { Float($0) } }
}

extension CausalAlignment {
  /// A case's `"alignment"` (`"top-left"` or `"bottom-right"`, the raw values).
  package init(fixture alignment: String, case name: String) throws {
    guard let value = CausalAlignment(rawValue: alignment) else {
      throw FixtureError("\(name): unknown alignment \(alignment)")
    }
    self = value
  }
}

extension FixtureSet {
  /// The `AttentionMask` of an attention case of the folder (`make_sdpa_fixtures.py`,
  /// `make_backward_fixtures.py`): causality, alignment and window, and its `masks` — at most one
  /// `keep` (`|b1`) and one `bias` (`<f4`), loaded from the folder.
  package static func attentionMask(
    case name: String, causal: Bool, alignment: String, window: Int?, masks: [MaskRef]
  ) throws -> AttentionMask {
    var mask = AttentionMask(
      isCausal: causal, causalAlignment: try CausalAlignment(fixture: alignment, case: name),
      window: window)
    for ref in masks {
      let tensor = try tensor(ref.fileRef)
      switch ref.kind {
      case "keep" where mask.keep == nil && ref.dtype == "|b1":
        mask.keep = tensor
      case "bias" where mask.bias == nil && ref.dtype == "<f4":
        mask.bias = tensor
      default:
        throw FixtureError("\(name): mask \(ref.kind) \(ref.dtype) unsupported or repeated")
      }
    }
    return mask
  }
}
