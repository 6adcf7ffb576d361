/// Exact conversions from the 16-bit float formats found in weight files to `Float`.
///
/// Both conversions widen, so every 16-bit value has an exact `Float` image: no rounding happens.
/// They work on bit patterns rather than through `Float16`, because `Float16` is not available on
/// every platform Swift targets and because the bit layout is what the files specify.
public enum HalfPrecision {
  /// The `Float` equal to an IEEE 754 binary16 value (safetensors `F16`, numpy `float16`).
  ///
  /// Layout: 1 sign bit, 5 exponent bits (bias 15), 10 fraction bits. Zeros keep their sign,
  /// subnormals (exponent 0) become normal `Float`s, infinities stay infinite, and NaNs stay NaN
  /// with their payload shifted into the top of the `Float` fraction (as numpy and hardware do).
  @inline(__always)
  public static func float(fromF16Bits bits: UInt16) -> Float {
    let sign = UInt32(bits & 0x8000) << 16
    let exponent = UInt32(bits >> 10) & 0x1F
    let fraction = UInt32(bits & 0x03FF)
    switch exponent {
    case 0:
      // Zero or subnormal: fraction · 2⁻²⁴. The product is exact (fraction < 2¹⁰).
      let magnitude = Float(fraction) * 0x1p-24
      return sign == 0 ? magnitude : -magnitude
    case 0x1F:
      // Infinity (fraction 0) or NaN: all-ones Float exponent, fraction moved up 13 bits.
      return Float(bitPattern: sign | 0x7F80_0000 | (fraction << 13))
    default:
      // Normal: rebias the exponent from 15 to 127.
      return Float(bitPattern: sign | ((exponent + 112) << 23) | (fraction << 13))
    }
  }

  /// The binary16 value nearest to `value`, ties to even (numpy's `astype(np.float16)`):
  /// beyond 65504 (after rounding) ±inf, below the smallest subnormal ±0, NaN stays NaN.
  public static func f16Bits(from value: Float) -> UInt16 {
    let bits = value.bitPattern
    let sign = UInt16((bits >> 16) & 0x8000)
    let exponent = Int((bits >> 23) & 0xFF)
    let fraction = bits & 0x7F_FFFF
    if exponent == 0xFF {
      return sign | 0x7C00 | (fraction == 0 ? 0 : 0x0200 | UInt16(fraction >> 13))
    }
    let unbiased = exponent - 127
    if unbiased > 15 { return sign | 0x7C00 }
    if unbiased >= -14 {
      // Normal: keep 10 fraction bits, round the 13 dropped ones to nearest even; a carry may
      // run into the exponent (and up to infinity), which is the right result.
      let half = UInt32(unbiased + 15) << 10 | (fraction >> 13)
      let rest = fraction & 0x1FFF
      let roundUp = rest > 0x1000 || (rest == 0x1000 && half & 1 == 1)
      return sign | UInt16(half + (roundUp ? 1 : 0))
    }
    // Subnormal or zero: the significand with its implicit bit, shifted to units of 2⁻²⁴.
    let shift = -unbiased - 14 + 13
    guard shift < 25, exponent != 0 else { return sign }
    let significand = fraction | 0x80_0000
    let kept = significand >> UInt32(shift)
    let rest = significand & ((1 << UInt32(shift)) - 1)
    let halfway = UInt32(1) << UInt32(shift - 1)
    let roundUp = rest > halfway || (rest == halfway && kept & 1 == 1)
    return sign | UInt16(kept + (roundUp ? 1 : 0))
  }

  /// The bfloat16 value nearest to `value`, ties to even (the upper 16 bits of the rounded
  /// binary32); NaN stays a quiet NaN.
  public static func bf16Bits(from value: Float) -> UInt16 {
    let bits = value.bitPattern
    if value.isNaN { return UInt16(bits >> 16) | 0x0040 }
    let rounding = 0x7FFF + ((bits >> 16) & 1)
    return UInt16((bits &+ rounding) >> 16)
  }

  /// The two 16-bit formats a `Float` is rounded to when written.
  public enum Format: String, Sendable, CaseIterable {
    case float16, bfloat16

    /// The largest finite value of the format: 65504, and `(2 − 2⁻⁷)·2¹²⁷ ≈ 3.39·10³⁸`.
    public var greatestFiniteMagnitude: Float {
      switch self {
      case .float16: return 65504
      case .bfloat16: return Float(bitPattern: 0x7F7F_0000)
      }
    }

    /// The format's bits nearest to `value` (`f16Bits(from:)`, `bf16Bits(from:)`).
    public func bits(from value: Float) -> UInt16 {
      self == .float16 ? HalfPrecision.f16Bits(from: value) : HalfPrecision.bf16Bits(from: value)
    }

    /// The `Float` equal to the format's `bits`.
    public func float(fromBits bits: UInt16) -> Float {
      self == .float16
        ? HalfPrecision.float(fromF16Bits: bits) : HalfPrecision.float(fromBF16Bits: bits)
    }
  }

  /// The row-major position of the first element of `scalars` that is finite but that rounding
  /// to `format` turns into `±∞` — beyond 65519.99… for float16 (65504 plus half its last
  /// step), beyond about 3.39·10³⁸ for bfloat16 — or `nil` when every finite element stays
  /// finite. NaN and `±∞` already in `scalars` are not counted: the conversion did not make them.
  public static func firstOverflow(in scalars: [Float], to format: Format) -> Int? {
    let largest = format.greatestFiniteMagnitude
    return scalars.firstIndex { value in
      // Below the largest finite value nothing can round up to ∞: skip the conversion there.
      value.isFinite && value.magnitude > largest
        && format.float(fromBits: format.bits(from: value)).isInfinite
    }
  }

  /// The `Float` equal to a bfloat16 value (safetensors `BF16`).
  ///
  /// bfloat16 is the upper half of a binary32 `Float` (1 sign, 8 exponent, 7 fraction bits), so
  /// widening only appends 16 zero bits; zeros, subnormals, infinities and NaNs carry over.
  @inline(__always)
  public static func float(fromBF16Bits bits: UInt16) -> Float {
    Float(bitPattern: UInt32(bits) << 16)
  }
}
