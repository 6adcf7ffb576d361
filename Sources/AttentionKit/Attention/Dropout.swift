import Tensors

/// Dropout on attention weights: each weight is zeroed with probability `p`, and the kept ones are
/// multiplied by `1/(1 − p)` so that the expected value of every weight is unchanged (inverted
/// dropout, as `torch.nn.functional.dropout`). `p = 0` changes nothing; `p = 1` zeroes every weight.
///
/// **Scale.** The factor for kept weights is PyTorch's: on the CPU `F.dropout` computes
/// `noise = bernoulli(1 − p)` then `noise.div_(1 − p)` in float32, so a kept weight is
/// `w·keptScale` with `keptScale = fl32(1 / fl32(1 − p))` (`1 − p` taken in `Double`, rounded to
/// float32, divided into one in float32): with the rounding of the product, a kept weight is
/// within about `3u` of `w·(1/(1 − p))` (`u = 2⁻²⁴`, one rounding each).
///
/// **Decisions.** The decision for the weight of query row `r` (the flat index over `[…, Tq]`,
/// i.e. `batchIndex·Tq + i`) and key `j` is a pure function of the seed and `(r, j)`: word
/// `(j mod 64) / 16` of the Philox block with counter `(r, 16·⌊j/64⌋ + j mod 16, stream 0)` (see
/// `Philox4x32`); the weight is dropped when that 32-bit word is below
/// `t = min(round(p·2³²), 2³² − 1)` (for `p < 1`). So the same seed drops the same weights whatever
/// the threads, tile sizes or kernel, and a weight is dropped with probability `t/2³²`
/// (`effectiveProbability`), within `2⁻³²` of `p` for every `p`: with the scale above, the
/// expected weight after dropout is the weight to within `2⁻³²/(1 − p)` relative and the scale's
/// rounding. (Sixteen blocks computed side by side cover 64 consecutive keys, one word of each
/// block per 16 keys. A `p` below `2⁻³³` gives `t = 0` and drops nothing; its `keptScale` is
/// exactly 1.)
public struct Dropout: Sendable, Equatable {
  /// `p`, as given (a `Float` given is widened exactly).
  public let probability: Double
  public let seed: UInt64
  /// Dropped when the random word is below this (unused when `dropsAll`).
  let threshold: UInt32
  /// True for `p = 1`.
  public let dropsAll: Bool
  /// `fl32(1 / fl32(1 − p))`, the factor for kept weights, as PyTorch's CPU dropout computes it
  /// (0 when `p = 1`).
  public let keptScale: Float

  /// Dropout with probability `probability` in `[0, 1]` and decisions drawn from `seed`.
  public init(probability: Double, seed: UInt64) throws {
    guard probability >= 0, probability <= 1 else {
      throw AttentionError.invalidArgument(
        "dropout probability must be in [0, 1], got \(probability)")
    }
    self.probability = probability
    self.seed = seed
    dropsAll = probability == 1
    // p·2³² is exact in Double; for p < 1 the cap keeps one word value (2⁻³²) on the kept side.
    threshold = dropsAll ? 0 : UInt32(min((probability * 0x1p32).rounded(), 0xFFFF_FFFF))
    // 1 − p ≥ 2⁻⁵³ for p < 1, so neither rounding underflows and the quotient is finite.
    keptScale = dropsAll ? 0 : 1 / Float(1 - probability)
  }

  /// `init(probability:seed:)` with `probability` widened exactly to `Double`. (A literal such as
  /// `1` or `0.1` picks the `Double` initializer: `Float(0.1)` is another probability.)
  @_disfavoredOverload
  public init(probability: Float, seed: UInt64) throws {
    try self.init(probability: Double(probability), seed: seed)
  }

  /// The probability that a weight is dropped: `t/2³²` (see the type's comment), within `2⁻³²` of
  /// `p`; 1 for `p = 1`, 0 for `p < 2⁻³³`.
  public var effectiveProbability: Double { dropsAll ? 1 : Double(threshold) * 0x1p-32 }
  /// True for `p = 0` and for every `p` below `2⁻³³`, which rounds to no drop (and a scale of 1).
  public var dropsNone: Bool { !dropsAll && threshold == 0 }

  /// Whether the weight at flat query row `row` and key `key` survives.
  @inline(__always)
  public func keeps(row: Int, key: Int) -> Bool {
    if dropsAll { return false }
    if dropsNone { return true }
    let (group, within) = key.quotientAndRemainder(dividingBy: 64)
    let w = Philox4x32(seed: seed).block(
      major: UInt64(row), minor: UInt32(truncatingIfNeeded: group * 16 + within % 16),
      stream: RandomStream.dropout)
    let word: UInt32
    switch within / 16 {
    case 0: word = w.0
    case 1: word = w.1
    case 2: word = w.2
    default: word = w.3
    }
    return word >= threshold
  }

  /// Applies dropout in place to `weights[0..<count]`, the weights of row `row` for keys
  /// `firstKey ..< firstKey + count`: dropped ones become 0, kept ones are multiplied by
  /// `keptScale`. Sixteen Philox blocks at a time give the decisions of 64 keys.
  @inline(__always)
  func apply(to weights: UnsafeMutablePointer<Float>, row: Int, firstKey: Int, count: Int) {
    if dropsNone || count <= 0 { return }
    if dropsAll {
      weights.update(repeating: 0, count: count)
      return
    }
    let rng = Philox4x32(seed: seed)
    let major = UInt64(row)
    let limit = SIMD16<UInt32>(repeating: threshold)
    let scale = keptScale
    let lastKey = firstKey + count
    @inline(__always)
    func applyWhole(_ word: SIMD16<UInt32>, at raw: UnsafeMutableRawPointer) {
      // Sixteen weights at `raw`, all in the range.
      let kept = raw.loadUnaligned(as: SIMD16<Float>.self) * scale
      raw.storeBytes(of: kept.replacing(with: 0, where: word .< limit), as: SIMD16<Float>.self)
    }
    @inline(__always)
    func applyChunk(_ word: SIMD16<UInt32>, startingAt chunkStart: Int) {
      // Keys chunkStart ..< chunkStart + 16.
      guard chunkStart + 16 > firstKey && chunkStart < lastKey else { return }
      let dropped = word .< limit
      if chunkStart >= firstKey && chunkStart + 16 <= lastKey {
        let raw = UnsafeMutableRawPointer(weights + (chunkStart - firstKey))
        let kept = raw.loadUnaligned(as: SIMD16<Float>.self) * scale
        raw.storeBytes(of: kept.replacing(with: 0, where: dropped), as: SIMD16<Float>.self)
      } else {
        for lane in 0..<16 {
          let key = chunkStart + lane
          guard key >= firstKey && key < lastKey else { continue }
          weights[key - firstKey] = dropped[lane] ? 0 : weights[key - firstKey] * scale
        }
      }
    }
    var group = firstKey / 64
    while group * 64 < lastKey {
      // Word w of the sixteen blocks decides keys start + 16·w ..< start + 16·w + 16.
      let words = rng.blocks16(
        major: major, minorBase: UInt32(truncatingIfNeeded: group * 16),
        stream: RandomStream.dropout)
      let start = group * 64
      if start >= firstKey && start + 64 <= lastKey {
        // A whole group inside the range (all but a tile's first and last): no range checks.
        let base = UnsafeMutableRawPointer(weights + (start - firstKey))
        applyWhole(words.0, at: base)
        applyWhole(words.1, at: base + 64)
        applyWhole(words.2, at: base + 128)
        applyWhole(words.3, at: base + 192)
      } else {
        applyChunk(words.0, startingAt: start)
        applyChunk(words.1, startingAt: start + 16)
        applyChunk(words.2, startingAt: start + 32)
        applyChunk(words.3, startingAt: start + 48)
      }
      group += 1
    }
  }
}
