import ArgumentParser
import AttentionKit
import Foundation

/// Reads a `.npy` file as a Float tensor (float32, float64 or bool).
func loadTensor(_ path: String) throws -> Tensor {
  try NPY.read(contentsOf: path).tensor
}

/// Writes a tensor as float32 `.npy`, through a temporary file renamed into place.
func saveTensor(_ tensor: Tensor, to path: String) throws {
  try NPY.write(tensor, to: path)
}

/// Refuses an output path that is also an input path (a usage error, exit 64): a run must never
/// overwrite what it reads.
func checkOutputs(_ outputs: [String?], against inputs: [String?]) throws {
  let inputPaths = Set(inputs.compactMap { $0 }.map(canonicalPath))
  var seen = Set<String>()
  for path in outputs.compactMap({ $0 }) {
    let canonical = canonicalPath(path)
    if inputPaths.contains(canonical) {
      throw ValidationError("output \(path) is also an input; choose another path")
    }
    if !seen.insert(canonical).inserted {
      throw ValidationError("\(path) is named as two outputs")
    }
  }
}

private func canonicalPath(_ path: String) -> String {
  URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path
}
