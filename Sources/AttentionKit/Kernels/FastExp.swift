import Tensors

/// A vectorized `exp` for the softmax passes, where `Foundation.exp` would cost more than both
/// matrix products together.
///
/// Cephes `expf`: `x = n·ln2 + r` with `|r| ≤ ln2/2`, `exp(r)` by a degree-6 polynomial, then
/// `2ⁿ` built directly in the exponent bits. The maximum relative error against `Foundation.exp` is
/// below 2·10⁻⁷ (about 2 ulp) on `[−87, 88]`, checked by the tests.
///
/// Domain, chosen for softmax (whose arguments are `≤ 0`): below `−87.33` (where `exp` leaves the
/// normal floats) the result is exactly 0, so `exp(−∞) = 0` for masked scores; above 88 it
/// saturates at `exp(88)`; NaN stays NaN. Rounding `x·log₂e` to an integer adds `1.5·2²³` and reads
/// the low mantissa bits, which avoids a slow vector `rounded()` and never converts NaN to an integer.
@inline(__always)
public func fastExp(_ input: SIMD16<Float>) -> SIMD16<Float> {
  fastExpSaturating(input)
}

/// `fastExp` as the kernels call it. Always inlined (`@_transparent`): `@inline(__always)` is
/// only a hint, which the optimizer may drop in large callers, and the call then passes the
/// vector in four pieces and makes the pass several times slower.
@_transparent
func fastExpSaturating(_ input: SIMD16<Float>) -> SIMD16<Float> {
  fastExpUnclamped(input.replacing(with: 88, where: input .> 88))
}

/// `fastExp` without the saturation at 88, for arguments `≤ 88`, `−∞` or NaN: the same values.
/// The softmax passes use it: the arguments whose results they keep, `s − shift`, are at most 8
/// (`RowSoftmax.shiftHeadroom`), far from the clamp (two instructions of about twenty-four per
/// sixteen values).
@inline(__always)
func fastExpUnclamped(_ input: SIMD16<Float>) -> SIMD16<Float> {
  let underflow = input .< -87.336_54
  // So that −∞ and large negative values do not become NaN on the way to the zero below.
  let x = input.replacing(with: -87.336_54, where: underflow)

  let magic = SIMD16<Float>(repeating: 12_582_912)  // 1.5·2²³
  let shifted = multiplyAdd(x, 1.442_695_04, magic)
  let n = shifted - magic
  var r = multiplyAdd(n, -0.693_359_375, x)  // ln 2, high part (exact in float)
  r = multiplyAdd(n, 2.121_944_4e-4, r)  // ln 2, low part

  var p = SIMD16<Float>(repeating: 1.987_569_15e-4)
  p = multiplyAdd(p, r, 1.398_199_95e-3)
  p = multiplyAdd(p, r, 8.333_451_9e-3)
  p = multiplyAdd(p, r, 4.166_579_59e-2)
  p = multiplyAdd(p, r, 1.666_666_55e-1)
  p = multiplyAdd(p, r, 5.000_000_12e-1)
  // 1 + r + r²·p as (p·r + 1)·r + 1: two fused multiply-adds.
  let y = multiplyAdd(multiplyAdd(p, r, 1), r, 1)

  // The low bits of `shifted` hold n + 0x40_0000 above the magic's own pattern 0x4B40_0000.
  let exponent = unsafeBitCast(shifted, to: SIMD16<Int32>.self) &- 0x4B40_0000
  let twoToN = unsafeBitCast((exponent &+ 127) &<< 23, to: SIMD16<Float>.self)
  return (y * twoToN).replacing(with: 0, where: underflow)
}

/// `fastExp` for one value, through the same vector code so that a value gets the same result
/// wherever it sits in a row.
@inline(__always)
public func fastExp(_ x: Float) -> Float {
  fastExp(SIMD16<Float>(repeating: x))[0]
}

/// `a·b + c`: one fused multiply-add where the build says the CPU has them (`-DATTN_FMA`, which
/// `Scripts/build-flags.sh` passes with `-target-cpu native` on CPUs with FMA), else a multiply and an
/// add. Without the flag `addingProduct` would call the C library's `fmaf` lane by lane.
@inline(__always)
func multiplyAdd(_ a: SIMD16<Float>, _ b: SIMD16<Float>, _ c: SIMD16<Float>) -> SIMD16<Float> {
  #if ATTN_FMA
    return c.addingProduct(a, b)
  #else
    return a * b + c
  #endif
}

@inline(__always)
func multiplyAdd(_ a: SIMD16<Float>, _ b: SIMD16<Float>, _ c: Float) -> SIMD16<Float> {
  multiplyAdd(a, b, SIMD16<Float>(repeating: c))
}

@inline(__always)
func multiplyAdd(_ a: SIMD16<Float>, _ b: Float, _ c: SIMD16<Float>) -> SIMD16<Float> {
  multiplyAdd(a, SIMD16<Float>(repeating: b), c)
}
