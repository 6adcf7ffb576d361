/// Dropout on attention weights: each weight is zeroed with probability `p`, and the kept ones are
/// scaled by `1/(1 − p)` so that the expected value of every weight is unchanged (inverted dropout,
/// as `torch.nn.functional.dropout`). `p = 0` changes nothing; `p = 1` zeroes every weight.
///
/// The decision for the weight of query row `r` (the flat index over `[…, Tq]`, i.e.
/// `batchIndex·Tq + i`) and key `j` is a pure function of the seed and `(r, j)`: word `j % 4` of the
/// Philox block with counter `(r, j / 4, stream 0)` (see `Philox4x32`); the weight is dropped when
/// that word is below `round(p·2³²)`. So the same seed drops the same weights whatever the
/// threads, tile sizes or kernel.
public struct Dropout: Sendable, Equatable {
  public let probability: Float
  public let seed: UInt64
  /// Dropped when the random word is below this.
  let threshold: UInt32
  /// `1/(1 − p)`, the factor for kept weights (0 when `p = 1`).
  public let keptScale: Float

  public init(probability: Float, seed: UInt64) throws {
    guard probability >= 0, probability <= 1 else {
      throw AttentionError.invalidArgument(
        "dropout probability must be in [0, 1], got \(probability)")
    }
    self.probability = probability
    self.seed = seed
    let scaled = (Double(probability) * 0x1p32).rounded()
    threshold = scaled >= 0x1p32 ? UInt32.max : UInt32(scaled)
    keptScale = probability < 1 ? 1 / (1 - probability) : 0
  }

  public var dropsAll: Bool { probability >= 1 }
  public var dropsNone: Bool { probability == 0 }

  /// Whether the weight at flat query row `row` and key `key` survives.
  @inline(__always)
  public func keeps(row: Int, key: Int) -> Bool {
    if dropsAll { return false }
    if dropsNone { return true }
    let w = Philox4x32(seed: seed).block(
      major: UInt64(row), minor: UInt32(truncatingIfNeeded: key / 4), stream: RandomStream.dropout)
    let word: UInt32
    switch key % 4 {
    case 0: word = w.0
    case 1: word = w.1
    case 2: word = w.2
    default: word = w.3
    }
    return word >= threshold
  }

  /// Applies dropout in place to `weights[0..<count]`, the weights of row `row` for keys
  /// `firstKey ..< firstKey + count`. Draws one Philox block per four keys.
  @inline(__always)
  func apply(to weights: UnsafeMutablePointer<Float>, row: Int, firstKey: Int, count: Int) {
    if dropsNone { return }
    if dropsAll {
      weights.update(repeating: 0, count: count)
      return
    }
    let rng = Philox4x32(seed: seed)
    let major = UInt64(row)
    let scale = keptScale
    var j = 0
    while j < count {
      let key = firstKey + j
      let group = key / 4
      let w = rng.block(major: major, minor: UInt32(truncatingIfNeeded: group), stream: RandomStream.dropout)
      let words = (w.0, w.1, w.2, w.3)
      let end = min(count, (group + 1) * 4 - firstKey)
      while j < end {
        let word: UInt32
        switch (firstKey + j) & 3 {
        case 0: word = words.0
        case 1: word = words.1
        case 2: word = words.2
        default: word = words.3
        }
        weights[j] = word < threshold ? 0 : weights[j] * scale
        j += 1
      }
    }
  }
}
