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
    var k0 = key.0
    var k1 = key.1
    for round in 0..<10 {
      if round > 0 {
        k0 &+= 0x9E37_79B9  // golden ratio
        k1 &+= 0xBB67_AE85  // sqrt(3) - 1
      }
      let p0 = UInt64(0xD251_1F53) &* UInt64(x.0)
      let p1 = UInt64(0xCD9E_8D57) &* UInt64(x.2)
      x = (
        UInt32(truncatingIfNeeded: p1 >> 32) ^ x.1 ^ k0,
        UInt32(truncatingIfNeeded: p1),
        UInt32(truncatingIfNeeded: p0 >> 32) ^ x.3 ^ k1,
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
  /// The same arithmetic as `block`, on `SIMD16<UInt32>` lanes: sixteen blocks for about the
  /// price of two scalar ones. Dropout uses it to draw 64 keys' words at once.
  @inline(__always)
  public func blocks16(major: UInt64, minorBase: UInt32, stream: UInt32)
    -> (SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>, SIMD16<UInt32>)
  {
    var x0 = SIMD16<UInt32>(repeating: UInt32(truncatingIfNeeded: major))
    var x1 = SIMD16<UInt32>(repeating: UInt32(truncatingIfNeeded: major >> 32))
    var x2 =
      SIMD16<UInt32>(repeating: minorBase)
      &+ SIMD16<UInt32>(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    var x3 = SIMD16<UInt32>(repeating: stream)
    var k0 = key.0
    var k1 = key.1
    for round in 0..<10 {
      if round > 0 {
        k0 &+= 0x9E37_79B9
        k1 &+= 0xBB67_AE85
      }
      let (hi2, lo2) = mulhilo(x2, 0xCD9E_8D57)
      let (hi0, lo0) = mulhilo(x0, 0xD251_1F53)
      x0 = hi2 ^ x1 ^ k0
      x2 = hi0 ^ x3 ^ k1
      x1 = lo2
      x3 = lo0
    }
    return (x0, x1, x2, x3)
  }
}

/// The high and low 32 bits of each lane's 64-bit product `x·m`.
///
/// The sixteen 32-bit lanes are read as eight 64-bit lanes: masking keeps the even lanes, shifting
/// brings down the odd ones, so each half is one 32×32→64-bit multiply per lane (`pmuludq`), and
/// the products' halves are put back in their lanes the same way. (Widening `SIMD16<UInt32>`
/// to `SIMD16<UInt64>` with the generic conversions compiles to a slow lane-by-lane loop.)
@inline(__always)
func mulhilo(_ x: SIMD16<UInt32>, _ m: UInt32) -> (hi: SIMD16<UInt32>, lo: SIMD16<UInt32>) {
  let wide = unsafeBitCast(x, to: SIMD8<UInt64>.self)
  let low32 = SIMD8<UInt64>(repeating: 0xFFFF_FFFF)
  let multiplier = SIMD8<UInt64>(repeating: UInt64(m))
  let even = (wide & low32) &* multiplier  // products of lanes 0, 2, 4, …
  let odd = (wide &>> 32) &* multiplier  // products of lanes 1, 3, 5, …
  let hi = (even &>> 32) | (odd & ~low32)
  // The low halves are a plain 32-bit multiply (assembling them from the products above let the
  // compiler fold the shift into a slower 64-bit multiply).
  return (unsafeBitCast(hi, to: SIMD16<UInt32>.self), x &* m)
}
