import Foundation
import Tensors

/// Philox4x32-10, the counter-based generator of Salmon et al., "Parallel Random Numbers: As Easy as
/// 1, 2, 3" (SC 2011), as in Random123 and cuRAND.
///
/// A counter-based generator has no sequential state: `block(counter)` maps a 128-bit counter and a
/// 64-bit key to 128 random bits. That is what makes dropout reproducible whatever the threads or tile
/// sizes: the decision for a weight is a pure function of the seed and the weight's index.
///
/// Counter layout used throughout AttentionKit (four 32-bit words):
/// - words 0–1: a 64-bit *major* index (a block of four tensor elements, or an attention row);
/// - word 2: a *minor* index (for dropout `16·⌊j/64⌋ + j mod 16` of key `j`, see `Dropout`;
///   0 for tensors);
/// - word 3: the *stream*, which separates independent uses of one seed (see `RandomStream`).
public struct Philox4x32: Sendable {
  public let key: (UInt32, UInt32)

  /// The generator for `seed`: key word 0 is its low 32 bits, key word 1 its high 32 bits.
  public init(seed: UInt64) {
    key = (UInt32(truncatingIfNeeded: seed), UInt32(truncatingIfNeeded: seed >> 32))
  }

  /// 128 random bits for one counter value.
  @inline(__always)
  public func block(_ c0: UInt32, _ c1: UInt32, _ c2: UInt32, _ c3: UInt32)
    -> (UInt32, UInt32, UInt32, UInt32)
  {
    var x = (c0, c1, c2, c3)
    var k = key
    for round in 0..<10 {
      if round > 0 { k = Self.nextRoundKey(k) }
      let p0 = UInt64(0xD251_1F53) &* UInt64(x.0)
      let p1 = UInt64(0xCD9E_8D57) &* UInt64(x.2)
      x = (
        UInt32(truncatingIfNeeded: p1 >> 32) ^ x.1 ^ k.0,
        UInt32(truncatingIfNeeded: p1),
        UInt32(truncatingIfNeeded: p0 >> 32) ^ x.3 ^ k.1,
        UInt32(truncatingIfNeeded: p0)
      )
    }
    return x
  }

  /// The block at a 64-bit major index, a minor index and a stream (the layout above).
  @inline(__always)
  public func block(major: UInt64, minor: UInt32, stream: UInt32)
    -> (UInt32, UInt32, UInt32, UInt32)
  {
    block(UInt32(truncatingIfNeeded: major), UInt32(truncatingIfNeeded: major >> 32), minor, stream)
  }
}

extension Philox4x32 {
  /// Sixteen blocks side by side: lane `l` is `block(major, minorBase + l, stream)`.
  ///
  /// The same arithmetic as `block`, on vector lanes. Each word is kept in the low half of a
  /// 64-bit lane (the even blocks in one `SIMD8<UInt64>`, the odd ones in another), so that a
  /// round is one 32×32→64-bit multiply per word (`pmuludq`, which reads only the low halves:
  /// whatever the high halves hold is never seen), a shift for the high half of the product and
  /// a three-way xor; the low half of the product is already where the next round reads it. The
  /// two halves are independent chains that the CPU overlaps. Only at the end are the words
  /// packed into `SIMD16<UInt32>`. Dropout uses it to draw 64 keys' decisions at once.
  @inline(__always)
  public func blocks16(major: UInt64, minorBase: UInt32, stream: UInt32)
    -> (SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>)
  {
    var even = PhiloxLanes(
      afterTwoRoundsOf: major, minorBase: minorBase, firstLane: 0, stream: stream, key: key)
    var odd = PhiloxLanes(
      afterTwoRoundsOf: major, minorBase: minorBase, firstLane: 1, stream: stream, key: key)
    var k = Self.nextRoundKey(key)
    for _ in 2..<10 {
      k = Self.nextRoundKey(k)
      even.round(k.0, k.1)
      odd.round(k.0, k.1)
    }
    return PhiloxLanes.interleave(even, odd)
  }

  /// The key of the next round: the Weyl constants added to each word.
  @inline(__always)
  static func nextRoundKey(_ k: (UInt32, UInt32)) -> (UInt32, UInt32) {
    (k.0 &+ 0x9E37_79B9, k.1 &+ 0xBB67_AE85)  // golden ratio, sqrt(3) − 1
  }
}

/// Eight Philox blocks in the low halves of 64-bit lanes (see `Philox4x32.blocks16`). The high
/// halves hold leftovers (the products' high halves, xors of them) that no step reads.
struct PhiloxLanes {
  var x0: SIMD8<UInt64>
  var x1: SIMD8<UInt64>
  var x2: SIMD8<UInt64>
  var x3: SIMD8<UInt64>

  /// Blocks `minorBase + firstLane`, `+ 2`, `+ 4`, … (the even or the odd lanes of sixteen)
  /// after rounds 0 and 1 with `key`. Their counters differ only in word 2, so round 0's
  /// product of word 0, and round 1's of word 2, are the same in every lane: computed once, as
  /// scalars, so that the ten rounds take 18 vector multiplies, not 20.
  @inline(__always)
  init(
    afterTwoRoundsOf major: UInt64, minorBase: UInt32, firstLane: UInt64, stream: UInt32,
    key: (UInt32, UInt32)
  ) {
    let low32 = SIMD8<UInt64>(repeating: 0xFFFF_FFFF)
    // Only the low halves count, so the sum need not wrap at 2³² itself.
    let minor =
      SIMD8(repeating: UInt64(minorBase) &+ firstLane) &+ SIMD8(0, 2, 4, 6, 8, 10, 12, 14)
    // Round 0: words 0, 1, 3 are the same in every lane.
    let p0 = (major & 0xFFFF_FFFF) &* 0xD251_1F53
    let p2 = (minor & low32) &* SIMD8(repeating: 0xCD9E_8D57)
    let y0 = (p2 &>> 32) ^ SIMD8(repeating: (major >> 32) ^ UInt64(key.0))
    let y2 = (p0 >> 32) ^ UInt64(stream ^ key.1)  // the same in every lane
    let y3 = p0 & 0xFFFF_FFFF  // the same in every lane
    // Round 1: word 2 is the same in every lane.
    let k = Philox4x32.nextRoundKey(key)
    let q0 = (y0 & low32) &* SIMD8(repeating: 0xD251_1F53)
    let q2 = y2 &* 0xCD9E_8D57
    x0 = SIMD8(repeating: (q2 >> 32) ^ UInt64(k.0)) ^ p2
    x1 = SIMD8(repeating: q2)
    x2 = (q0 &>> 32) ^ SIMD8(repeating: y3 ^ UInt64(k.1))
    x3 = q0
  }

  /// One Philox round with round keys `k0`, `k1`.
  @inline(__always)
  mutating func round(_ k0: UInt32, _ k1: UInt32) {
    // Masking to the low halves makes each product a 32×32→64-bit multiply, which the
    // compiler emits as `pmuludq` (and then drops the mask, which `pmuludq` implies).
    let low32 = SIMD8<UInt64>(repeating: 0xFFFF_FFFF)
    let p0 = (x0 & low32) &* SIMD8(repeating: 0xD251_1F53)
    let p2 = (x2 & low32) &* SIMD8(repeating: 0xCD9E_8D57)
    x0 = (p2 &>> 32) ^ x1 ^ SIMD8(repeating: UInt64(k0))
    x2 = (p0 &>> 32) ^ x3 ^ SIMD8(repeating: UInt64(k1))
    x1 = p2
    x3 = p0
  }

  /// The four words of sixteen blocks: `even`'s in lanes 0, 2, 4, …, `odd`'s in lanes 1, 3, 5, ….
  @inline(__always)
  static func interleave(_ even: PhiloxLanes, _ odd: PhiloxLanes)
    -> (SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>)
  {
    @inline(__always)
    func pack(_ e: SIMD8<UInt64>, _ o: SIMD8<UInt64>) -> SIMD16<UInt32> {
      unsafeBitCast((e & 0xFFFF_FFFF) | (o &<< 32), to: SIMD16<UInt32>.self)
    }
    return (
      pack(even.x0, odd.x0), pack(even.x1, odd.x1), pack(even.x2, odd.x2), pack(even.x3, odd.x3)
    )
  }
}
