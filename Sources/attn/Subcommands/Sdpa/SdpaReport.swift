import AttentionKit
import Foundation
import TensorIO

extension SdpaCommand {
  /// The bytes of `tensor` for `path`: `.safetensors` (one tensor, `name`) or `.npy`.
  static func encode(
    _ tensor: Tensor, named name: String, as storage: InputFiles.Storage, path: String
  ) throws -> [UInt8] {
    try storage.checkRepresentable(tensor, named: "the \(name)", path: path)
    if path.hasSuffix(".safetensors") {
      let dtype: SafeTensorsDType =
        storage == .float16
        ? .f16 : storage == .bfloat16 ? .bf16 : storage == .float64 ? .f64 : .f32
      return try SafeTensors.encode([name: tensor], dtype: dtype)
    }
    switch storage {
    case .float16: return NPY.encode(tensor, dtype: .float16)
    case .float64: return NPY.encode(tensor, dtype: .float64)
    case .bfloat16:
      throw AttentionError.file(
        path: path,
        message: "numpy has no bfloat16: write a .safetensors file, or pass --out-dtype float32")
    default: return NPY.encode(tensor)
    }
  }
}

/// `attn sdpa --format json`.
struct SdpaReport: Encodable {
  var outputShape: [Int]
  var weightsShape: [Int]?
  var kernel: String
  var tilesComputed: Int?
  var groupSize: Int
  var isCausal: Bool
  var causalAlign: String
  var window: Int?
  /// `null` for D = 0 (see `SdpaInputOptions.reportedScale`).
  var scale: NullableNumber
  var dropoutP: Double
  /// "soft-cap 30, ALiBi (BLOOM's slopes), sinks"; absent without score terms.
  var scoreTerms: String?
  /// With `--kv-dtype`: the storage and its effect on the output.
  var kvStorage: SdpaKVStorageReport?
  var checks: [String: Bool]
  /// The backward pass's, with `--grad-out`: the gradients' shapes and checks.
  var gradients: SdpaGradientReport?
  var verified: Bool
}

/// `attn sdpa --grad-out … --format json`: what the backward pass gave.
struct SdpaGradientReport: Encodable {
  var kernel: String
  /// Shapes by name: dq, dk, dv, and dsinks, dt5, dmask when computed.
  var shapes: [String: [Int]]
  var workspaceBytes: Int
  var checks: [String: Bool]

  init(_ backward: SdpaBackward) {
    let g = backward.gradients
    kernel = g.kernel.flagName
    var shapes = ["dq": g.dQ.shape, "dk": g.dK.shape, "dv": g.dV.shape]
    if let dSinks = g.dSinks { shapes["dsinks"] = dSinks.shape }
    if let table = g.dT5Tables.first { shapes["dt5"] = table.shape }
    if let dBias = g.dBias { shapes["dmask"] = dBias.shape }
    self.shapes = shapes
    workspaceBytes = g.workspaceBytes
    checks = backward.checks.dictionary
  }
}
