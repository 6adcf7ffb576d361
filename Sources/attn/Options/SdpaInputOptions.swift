import ArgumentParser
import AttentionKit
import Foundation

/// The arguments of PyTorch's `F.scaled_dot_product_attention` that describe the problem
/// (everything but dropout): shared by `attn sdpa`, which computes it, and `attn check`, which
/// checks a result computed elsewhere. PyTorch's conventions: a boolean `--attn-mask` is
/// True = attend, a float one is added to the scores.
struct SdpaInputOptions: ParsableArguments {
  @Option(help: "Query Q [B, H, Tq, D]: PATH.npy or FILE.safetensors:NAME.")
  var query: String

  @Option(help: "Key K [B, Hkv, Tk, D].")
  var key: String

  @Option(help: "Value V [B, Hkv, Tk, Dv].")
  var value: String

  @Option(
    help: "Mask broadcastable to [B, H, Tq, Tk]: boolean (True = attend) or float (added).")
  var attnMask: String?

  @Flag(help: "Causal mask (query i sees keys j ≤ i, or j ≤ i + Tk − Tq bottom-right).")
  var isCausal = false

  @Option(help: "Causal alignment: top-left (PyTorch's is_causal) or bottom-right.")
  var causalAlign: CausalAlignment = .topLeft

  @Option(
    parsing: .unconditional,
    help: ArgumentHelp(
      "Scale of Q·Kᵀ (default 1/√D; negative values are allowed).", valueName: "scale"),
    transform: { try parseFloat($0, flag: "--scale") })
  var scale: Float?

  @Flag(help: "Allow K and V with fewer heads than Q (H % Hkv == 0).")
  var enableGqa = false

  @Option(help: "Sliding window: each query sees at most the W most recent allowed keys.")
  var window: Int?

  @OptionGroup var scoreTerms: ScoreTermOptions

  /// The input paths, for `checkOutputs`.
  var paths: [String?] { [query, key, value, attnMask] + scoreTerms.paths }

  func validate() throws {
    // A window at least as long as the keys is the causal mask alone; beyond FlagLimits'
    // longest sequence it can only be a typo.
    try FlagLimits.check("--window", window, in: 1...FlagLimits.sequenceLength)
    if causalAlign != .topLeft && !isCausal && window == nil {
      throw ValidationError("--causal-align goes with --is-causal or --window")
    }
    if window != nil && attnMask != nil {
      // As --is-causal: a window is a causal mask, which PyTorch does not combine with attn_mask.
      throw ValidationError(
        "--attn-mask and --window cannot both be given (the window is a causal mask); put the "
          + "window into the mask")
    }
    if let scale, !scale.isFinite { throw ValidationError("--scale must be finite, got \(scale)") }
    if isCausal && attnMask != nil {
      // PyTorch's own rule for scaled_dot_product_attention.
      throw ValidationError(
        "--attn-mask and --is-causal cannot both be given (PyTorch: explicit attn_mask should "
          + "not be set when is_causal=True); put the causal part into the mask")
    }
  }

  /// Q, K, V (with the query's storage type) and the mask, read and checked: finite inputs
  /// (unless `--allow-nonfinite`), PyTorch's head rule.
  func load(_ files: InputFiles, safety: InputSafetyOptions) throws -> (
    queries: Tensor, keys: Tensor, values: Tensor, mask: AttentionMask, terms: ScoreTerms,
    storage: InputFiles.Storage
  ) {
    let q = try files.input(query)
    let k = try files.input(key)
    let v = try files.input(value)
    for (tensor, name) in [(q.tensor, query), (k.tensor, key), (v.tensor, value)] {
      try safety.check(tensor, from: name)
    }
    let mask = try attentionMask(files: files, safety: safety)
    try checkHeads(q.tensor, k.tensor, v.tensor)
    let heads = q.tensor.rank >= 4 ? q.tensor.shape[q.tensor.rank - 3] : 1
    let terms = try scoreTerms.load(files, heads: heads)
    return (q.tensor, k.tensor, v.tensor, mask, terms, q.storage)
  }

  /// `--attn-mask` as PyTorch reads it: booleans keep (True = attend), floats are added.
  private func attentionMask(files: InputFiles, safety: InputSafetyOptions) throws
    -> AttentionMask
  {
    var mask = AttentionMask(isCausal: isCausal, causalAlignment: causalAlign, window: window)
    guard let attnMask else { return mask }
    let (tensor, storage) = try files.mask(attnMask)
    switch storage {
    case .bool: mask.keep = tensor
    case .float16, .bfloat16, .float32, .float64:
      try safety.check(tensor, from: attnMask, allowingNegativeInfinity: true)
      mask.bias = tensor
    case .integer:
      throw AttentionError.file(
        path: attnMask,
        message: "an attn_mask must be boolean (True = attend) or floating point (added to the "
          + "scores), as in PyTorch; this one holds integers")
    }
    return mask
  }

  /// PyTorch's rule: K and V with fewer heads than Q only with enable_gqa.
  private func checkHeads(_ q: Tensor, _ k: Tensor, _ v: Tensor) throws {
    guard q.rank >= 3, k.rank >= 3, v.rank >= 3 else { return }
    let (heads, keyHeads, valueHeads) = (
      q.shape[q.rank - 3], k.shape[k.rank - 3], v.shape[v.rank - 3]
    )
    guard heads != keyHeads || heads != valueHeads else { return }
    guard enableGqa else {
      throw AttentionError.shapeMismatch(
        "query has \(heads) heads but key and value have \(keyHeads) and \(valueHeads); pass "
          + "--enable-gqa for grouped-query attention (PyTorch's enable_gqa=True)")
    }
    guard keyHeads == valueHeads, keyHeads > 0, heads % keyHeads == 0 else {
      throw AttentionError.shapeMismatch(
        "with --enable-gqa the query heads (\(heads)) must be a multiple of the key/value heads "
          + "(\(keyHeads), \(valueHeads)), which must be equal")
    }
  }

  /// The scale the scores were multiplied by, for JSON reports: `nil` (JSON `null`) when it is
  /// not a number, as with D = 0, where `1/√D` is infinite and every score is 0 (no products).
  static func reportedScale(_ shape: AttentionShape, _ scale: Float?) -> Double? {
    let resolved = Double(shape.resolvedScale(scale))
    return resolved.isFinite ? resolved : nil
  }

  /// "causal top-left, window 4" or "not causal".
  static func causalDescription(_ mask: AttentionMask) -> String {
    mask.isCausal || mask.window != nil
      ? "causal \(mask.causalAlignment.rawValue)" + (mask.window.map { ", window \($0)" } ?? "")
      : "not causal"
  }
}

/// A float flag's value, negative numbers included (`--scale -1` as well as `--scale=-1`).
func parseFloat(_ text: String, flag: String) throws -> Float {
  guard let value = Float(text) else {
    throw ValidationError("\(flag) takes a number, got '\(text)'")
  }
  return value
}
