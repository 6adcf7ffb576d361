import Tensors

/// Dropout on attention weights: each weight is zeroed with probability `p`, and the kept ones are
/// scaled by `1/(1 − p)` so that the expected value of every weight is unchanged (inverted dropout,
/// as `torch.nn.functional.dropout`). `p = 0` changes nothing; `p = 1` zeroes every weight.
///
/// The decision for the weight of query row `r` (the flat index over `[…, Tq]`, i.e.
/// `batchIndex·Tq + i`) and key `j` is a pure function of the seed and `(r, j)`: 16 bits of word
/// `(j mod 128) / 32` of the Philox block with counter `(r, 16·⌊j/128⌋ + j mod 16, stream 0)`
/// (see `Philox4x32`) — its low half when `j mod 32 < 16`, its high half otherwise; the weight is
/// dropped when those 16 bits are below `t = round(p·2¹⁶)` (capped at `2¹⁶ − 1` for `p < 1`). So
/// the same seed drops the same weights whatever the threads, tile sizes or kernel. (Sixteen
/// blocks computed side by side cover 128 consecutive keys. Two decisions per 32-bit word halve
/// the Philox work, which dominated the cost of dropout.)
///
/// A weight is therefore dropped with probability `t/2¹⁶` — `p` on a grid of `2⁻¹⁶`
/// (`effectiveProbability`) — and the kept ones are scaled by `2¹⁶/(2¹⁶ − t)`, one over the
/// probability they are kept, so that dropout stays unbiased for every `p`: scaling by the
/// requested `1/(1 − p)` instead would inflate the expected weight near `p = 1` (by half at
/// `p = 0.99999`), and a `p` below `2⁻¹⁷`, which drops nothing, would still scale. For `p = 0.1`
/// the two factors differ by `6·10⁻⁶` of their value.
public struct Dropout: Sendable, Equatable {
  public let probability: Float
  public let seed: UInt64
  /// Dropped when the 16 random bits are below this (`2¹⁶` for `p = 1`).
  let threshold: UInt32
  /// `1/(1 − p')` with `p'` the `effectiveProbability`: the factor for kept weights (0 when
  /// `p = 1`).
  public let keptScale: Float

  public init(probability: Float, seed: UInt64) throws {
    guard probability >= 0, probability <= 1 else {
      throw AttentionError.invalidArgument(
        "dropout probability must be in [0, 1], got \(probability)")
    }
    self.probability = probability
    self.seed = seed
    let scaled = (Double(probability) * 0x1p16).rounded()
    threshold = probability >= 1 ? 0x1_0000 : UInt32(min(scaled, 0xFFFF))
    keptScale = threshold < 0x1_0000 ? Float(0x1p16 / Double(0x1_0000 - threshold)) : 0
  }

  /// The probability that a weight is dropped: `p` rounded to a multiple of `2⁻¹⁶` (see the
  /// type's comment), 0 for `p < 2⁻¹⁷`.
  public var effectiveProbability: Double { Double(threshold) / 0x1p16 }
  public var dropsAll: Bool { threshold >= 0x1_0000 }
  /// True for `p = 0` and for every `p` below `2⁻¹⁷`, which rounds to 0.
  public var dropsNone: Bool { threshold == 0 }

  /// Whether the weight at flat query row `row` and key `key` survives.
  @inline(__always)
  public func keeps(row: Int, key: Int) -> Bool {
    if dropsAll { return false }
    if dropsNone { return true }
    let (group, within) = key.quotientAndRemainder(dividingBy: 128)
    let w = Philox4x32(seed: seed).block(
      major: UInt64(row), minor: UInt32(truncatingIfNeeded: group * 16 + within % 16),
      stream: RandomStream.dropout)
    let word: UInt32
    switch within / 32 {
    case 0: word = w.0
    case 1: word = w.1
    case 2: word = w.2
    default: word = w.3
    }
    let bits = within % 32 < 16 ? word & 0xFFFF : word >> 16
    return bits >= threshold
  }

  /// Applies dropout in place to `weights[0..<count]`, the weights of row `row` for keys
  /// `firstKey ..< firstKey + count`: dropped ones become 0, kept ones are multiplied by
  /// `1/(1 − p)`. Sixteen Philox blocks at a time give the decisions of 128 keys.
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
    func applyWhole(_ bits: SIMD16<UInt32>, at raw: UnsafeMutableRawPointer) {
      // Sixteen weights at `raw`, all in the range.
      let kept = raw.loadUnaligned(as: SIMD16<Float>.self) * scale
      raw.storeBytes(of: kept.replacing(with: 0, where: bits .< limit), as: SIMD16<Float>.self)
    }
    @inline(__always)
    func applyChunk(_ bits: SIMD16<UInt32>, startingAt chunkStart: Int) {
      // Keys chunkStart ..< chunkStart + 16.
      guard chunkStart + 16 > firstKey && chunkStart < lastKey else { return }
      let dropped = bits .< limit
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
    var group = firstKey / 128
    while group * 128 < lastKey {
      let words = rng.blocks16(
        major: major, minorBase: UInt32(truncatingIfNeeded: group * 16),
        stream: RandomStream.dropout)
      let start = group * 128
      if start >= firstKey && start + 128 <= lastKey {
        // A whole group inside the range (all but a tile's first and last): no range checks.
        let base = UnsafeMutableRawPointer(weights + (start - firstKey))
        forEachSixteenKeys(of: words) { bits, offset in applyWhole(bits, at: base + 4 * offset) }
      } else {
        forEachSixteenKeys(of: words) { bits, offset in
          applyChunk(bits, startingAt: start + offset)
        }
      }
      group += 1
    }
  }
}

/// The decisions' 16-bit values for the 128 keys of one group of sixteen Philox blocks, sixteen
/// keys at a time: `body(bits, offset)` for keys `offset ..< offset + 16` of the group. Each word
/// gives its low halves for 16 keys, then its high halves for the next 16.
@inline(__always)
private func forEachSixteenKeys(
  of words: (SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>),
  _ body: (SIMD16<UInt32>, Int) -> Void
) {
  body(words.0 & 0xFFFF, 0)
  body(words.0 &>> 16, 16)
  body(words.1 & 0xFFFF, 32)
  body(words.1 &>> 16, 48)
  body(words.2 & 0xFFFF, 64)
  body(words.2 &>> 16, 80)
  body(words.3 & 0xFFFF, 96)
  body(words.3 &>> 16, 112)
}
