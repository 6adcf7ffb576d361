import ArgumentParser

/// The ranges that size flags accept, one place for every subcommand: far above any real model's
/// sizes, they keep a typo from allocating the machine away or overflowing a size computation
/// (the memory budget then refuses what is in range but too large).
enum FlagLimits {
  /// `M`, the largest relative distance (`--max-rel`): the table has `2M + 1` rows.
  static let maxDistance = 1 << 20
  /// `D` or `d_model` (`--d-k`, `--d-model`).
  static let dimension = 1 << 16
  /// A sequence length (`--seq-len`, `--max-len`).
  static let sequenceLength = 1 << 20
  /// Heads (`--heads`, `--kv-heads`).
  static let heads = 1 << 16
  /// A batch size (`--batch`).
  static let batch = 1 << 20
  /// A token position (`--position-offset`): position ids are 32-bit in every model, and
  /// `offset + T` then stays far from overflowing.
  static let position = Int(Int32.max)
  /// `--repeats`.
  static let repeats = 10_000

  /// Throws a usage error unless `value` of `flag` is in `range`.
  static func check(_ flag: String, _ value: Int?, in range: ClosedRange<Int>) throws {
    guard let value, !range.contains(value) else { return }
    throw ValidationError(
      "\(flag) must be in \(range.lowerBound)…\(range.upperBound), got \(value)")
  }
}
