import ArgumentParser
import AttentionKit
import AttentionVerification

/// `attn mha --decode --kv-cache float16|bfloat16|q8`: the decode through a compact cache is
/// checked against the float64 layer on the keys and values the cache stored (the float32 error,
/// within the usual bounds), and the storage's own effect is reported beside it.
extension MhaCommand {
  /// `--kv-cache`, float32 when not given.
  var kvStorage: KVStorage { kvCache ?? .float32 }

  func validateKVCache() throws {
    if kvCache != nil && !decode {
      throw ValidationError("--kv-cache sets the cache of --decode: add --decode, or drop it")
    }
  }

  /// With a compact cache, `decode_matches_reference` against the float64 layer whose keys and
  /// values are the cache's stored ones; nothing otherwise (the float32 checks run as before).
  func compactCacheChecks(
    _ decoded: DecodedSequence?, layer: MultiHeadAttention, x: Tensor, padding: Tensor?,
    mask: AttentionMask,
    rows: [(batch: Int, token: Int)]
  ) throws -> [Check] {
    guard kvStorage != .float32, let decoded else { return [] }
    let reference = try MultiHeadReference(
      layer: layer, input: x, keyPaddingMask: padding, attentionMask: mask,
      positionOffset: positionOffset, storedKeys: decoded.cache.storedKeys(),
      storedValues: decoded.cache.storedValues())
    return [
      LayerChecks(reference: reference, rows: rows).storedDecodeCheck(
        decoded: decoded.output, storage: kvStorage.rawValue)
    ]
  }
}

extension KVStorage: ExpressibleByArgument {}
