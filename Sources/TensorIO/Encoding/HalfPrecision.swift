import Tensors

/// How floating-point elements are stored in a file, all little-endian.
enum StoredFloat: Sendable {
  case f16, bf16, f32, f64

  var size: Int {
    switch self {
    case .f16, .bf16: return 2
    case .f32: return 4
    case .f64: return 8
    }
  }
}

/// Decodes the little-endian elements in `raw` into `out` (as many as `out` holds). `F64` is
/// rounded to nearest, except that finite values beyond `Float`'s range saturate to
/// `±Float.greatestFiniteMagnitude` (`saturatingFloat`); returns the position in `out` of the
/// first value that saturated, `nil` when none did.
@discardableResult
func decodeFloats(
  _ raw: UnsafeRawBufferPointer, as format: StoredFloat, into out: UnsafeMutableBufferPointer<Float>
) -> Int? {
  precondition(raw.count >= out.count * format.size, "decodeFloats: too few bytes")
  var firstSaturated: Int?
  for i in 0..<out.count {
    let at = i * format.size
    switch format {
    case .f16:
      let bits = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt16.self))
      out[i] = HalfPrecision.float(fromF16Bits: bits)
    case .bf16:
      let bits = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt16.self))
      out[i] = HalfPrecision.float(fromBF16Bits: bits)
    case .f32:
      let bits = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt32.self))
      out[i] = Float(bitPattern: bits)
    case .f64:
      let bits = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt64.self))
      let value = Double(bitPattern: bits)
      out[i] = saturatingFloat(value)
      if firstSaturated == nil, value.isFinite, abs(value) > Double(Float.greatestFiniteMagnitude) {
        firstSaturated = i
      }
    }
  }
  return firstSaturated
}

/// `value` rounded to the nearest `Float`, except that a finite `value` beyond `Float`'s range
/// becomes `±Float.greatestFiniteMagnitude`, never `±∞`: a float64 file's `finfo(float64).min`
/// in a mask must stay a very negative score (PyTorch, in float64, gives a row of them the mean
/// of V), not turn into `−∞`, which masks. NaN and `±∞` stay as they are.
func saturatingFloat(_ value: Double) -> Float {
  let rounded = Float(value)
  guard rounded.isInfinite && value.isFinite else { return rounded }
  return value < 0 ? -.greatestFiniteMagnitude : .greatestFiniteMagnitude
}

/// Appends `scalars` to `bytes` as little-endian elements of `format` (rounded to nearest even
/// for the 16-bit formats).
func appendLittleEndian(_ scalars: [Float], as format: StoredFloat, to bytes: inout [UInt8]) {
  switch format {
  case .f32: appendLittleEndian(scalars, to: &bytes)
  case .f64:
    bytes.reserveCapacity(bytes.count + scalars.count * 8)
    for value in scalars {
      let bits = Double(value).bitPattern
      for shift in stride(from: 0, to: 64, by: 8) {
        bytes.append(UInt8(truncatingIfNeeded: bits >> UInt64(shift)))
      }
    }
  case .f16, .bf16:
    bytes.reserveCapacity(bytes.count + scalars.count * 2)
    let half: HalfPrecision.Format = format == .f16 ? .float16 : .bfloat16
    for value in scalars {
      let bits = half.bits(from: value)
      bytes.append(UInt8(truncatingIfNeeded: bits))
      bytes.append(UInt8(truncatingIfNeeded: bits >> 8))
    }
  }
}

/// Appends the little-endian binary32 bytes of `scalars` to `bytes`.
func appendLittleEndian(_ scalars: [Float], to bytes: inout [UInt8]) {
  bytes.reserveCapacity(bytes.count + scalars.count * 4)
  for value in scalars {
    let bits = value.bitPattern
    bytes.append(UInt8(truncatingIfNeeded: bits))
    bytes.append(UInt8(truncatingIfNeeded: bits >> 8))
    bytes.append(UInt8(truncatingIfNeeded: bits >> 16))
    bytes.append(UInt8(truncatingIfNeeded: bits >> 24))
  }
}
