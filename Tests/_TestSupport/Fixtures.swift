import Foundation

/// Where the committed fixtures live: `Tests/_TestSupport/Fixtures`, one folder for every test
/// target, found from this file's own path (they are read from the source tree, not bundled).
///
/// - `reference/`: float64 references from numpy (`Scripts/make_reference_fixtures.py`);
/// - `torch/`: PyTorch's generator and the notebook's cells (`Scripts/make_torch_fixtures.py`);
/// - `io/`: `.npy` and safetensors files, good and malformed (`Scripts/make_io_fixtures.py`);
/// - `sdpa_gqa/`: float64 references of PyTorch's SDPA semantics — grouped-query heads, causal
///   alignments, windows, masks, half precision, decode (`Scripts/make_sdpa_fixtures.py`);
/// - `backward/`: float64 gradients of attention — dQ, dK, dV, d(bias), with masks, grouped
///   heads and given dropout decisions (`Scripts/make_backward_fixtures.py`);
/// - `mha/`: whole multi-head layers in the torch, bert and llama layouts, and rotary embeddings
///   (`Scripts/make_mha_fixtures.py`).
/// - `relpos_grad/`: float64 gradients of `RelativePositionAttention` — dx and every parameter
///   (`Scripts/make_relpos_grad_fixtures.py`).
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
