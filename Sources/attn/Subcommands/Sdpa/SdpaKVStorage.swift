import ArgumentParser
import AttentionKit
import AttentionVerification

/// `attn sdpa --kv-dtype float16|bfloat16|q8`: K and V are stored so — as a KV cache holds them —
/// before the call, and the kernel reads them in that form. The output is checked against the
/// float64 reference on the stored (rounded or quantized) K and V, within float32 bounds; the
/// storage's own effect, against the same call on the full-precision K and V, is reported beside
/// it (max and RMS).
struct SdpaKVStorageOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "Store K and V as float16, bfloat16 or q8 (a KV cache's storage) before the call; checked "
        + "on the stored values, the storage's effect reported.", valueName: "dtype"))
  var kvDtype: KVStorage?

  /// Whether K and V are stored compactly.
  var isCompact: Bool { (kvDtype ?? .float32) != .float32 }

  func validate(dropout: Double, gradient: SdpaGradientOptions) throws {
    guard isCompact else { return }
    if dropout > 0 { throw ValidationError("--kv-dtype runs without dropout: drop --dropout-p") }
    if gradient.gradOut != nil {
      throw ValidationError("--kv-dtype has no backward pass: drop --grad-out")
    }
  }

  /// K and V `[B, Hkv, Tk, D]` as the storage holds them, in a cache.
  func store(keys: Tensor, values: Tensor) throws -> KVCache? {
    guard isCompact, let storage = kvDtype else { return nil }
    guard keys.rank == 4, values.rank == 4 else {
      throw ValidationError("--kv-dtype takes K and V as [B, Hkv, Tk, D] (rank 4)")
    }
    var cache = try KVCache(
      batch: keys.shape[0], keyValueHeads: keys.shape[1], headDim: keys.shape[3],
      valueDim: values.shape[3], capacity: keys.shape[2], storage: storage)
    try cache.append(keys: keys, values: values)
    return cache
  }
}

/// The storage's effect on the output, for the report.
struct SdpaKVStorageReport: Encodable {
  var kvDtype: String
  /// The output on the stored K, V against the output on the given ones.
  var effect: KVCacheEffect

  var line: String {
    "K, V stored as \(kvDtype): against full-precision K, V the output moves by max "
      + "\(scientific(effect.max)), RMS \(scientific(effect.rms)) (output RMS "
      + "\(scientific(effect.outputRMS)))"
  }
}
