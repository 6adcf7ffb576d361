import Foundation
import Testing
import _TestSupport

@testable import AttentionKit

/// `fastExp` against `Foundation.exp` in Double, and its special values.
@Suite("fastExp")
struct FastExpTests {
  /// The bound of `fastExp`'s doc comment: relative error below 2·10⁻⁷ on [−87, 88].
  static let documentedBound = 2e-7

  /// Evaluates `fastExp` on `inputs` sixteen at a time (the vector form the kernels use) and
  /// returns the worst relative error against `Foundation.exp(Double(x))`.
  static func worstError(_ inputs: [Float]) -> (error: Double, x: Float, observed: Float) {
    var worst = (error: 0.0, x: Float(0), observed: Float(0))
    var start = 0
    while start < inputs.count {
      var v = SIMD16<Float>(repeating: 0)
      let lanes = min(16, inputs.count - start)
      for lane in 0..<lanes { v[lane] = inputs[start + lane] }
      let e = fastExp(v)
      for lane in 0..<lanes {
        let x = v[lane]
        let error = relativeError(e[lane], Foundation.exp(Double(x)))
        if !(error <= worst.error) { worst = (error, x, e[lane]) }
      }
      start += 16
    }
    return worst
  }

  @Test("Relative error ≤ 2·10⁻⁷ on a dense sweep of [−87, 88]")
  func denseSweep() {
    // 2¹⁸ + 1 points, a step of 175/2¹⁸ ≈ 6.7·10⁻⁴: every range-reduction interval
    // (width ln 2) gets about 1000 points, at irregular offsets within it.
    let count = 1 << 18
    let inputs = (0...count).map { Float(-87 + 175 * Double($0) / Double(count)) }
    let worst = Self.worstError(inputs)
    #expect(
      worst.error <= Self.documentedBound,
      """
      x = \(worst.x): fastExp \(worst.observed), exp \(Foundation.exp(Double(worst.x))), \
      relative error \(sci(worst.error)) > \(sci(Self.documentedBound))
      """)
  }

  /// The range reduction picks `n = round(x·log₂e)`; its error is largest where `n` switches,
  /// at `x = (k + ½)·ln 2`. Every such point in range, and 8 floats on each side of it.
  @Test("Relative error ≤ 2·10⁻⁷ around every switch of the range reduction")
  func reductionBoundaries() {
    var inputs: [Float] = []
    for k in -126...126 {
      let center = Float((Double(k) + 0.5) * M_LN2)
      guard center > -87, center < 88 else { continue }
      var x = center
      for _ in 0..<8 { x = x.nextDown }
      for _ in 0..<17 {
        inputs.append(x)
        x = x.nextUp
      }
    }
    #expect(inputs.count > 4000)
    let worst = Self.worstError(inputs)
    #expect(
      worst.error <= Self.documentedBound,
      "x = \(worst.x): fastExp \(worst.observed), relative error \(sci(worst.error))")
  }

  @Test("Every float in [−1, 1] spaced 2⁻¹⁶, and small magnitudes down to 2⁻⁴⁰")
  func nearZero() {
    var inputs = (-65536...65536).map { Float($0) * 0x1p-16 }
    for e in 17...40 {
      let x = Float(sign: .plus, exponent: -e, significand: 1)
      inputs += [x, -x, x.nextUp, -x.nextUp]
    }
    let worst = Self.worstError(inputs)
    #expect(
      worst.error <= Self.documentedBound,
      "x = \(worst.x): fastExp \(worst.observed), relative error \(sci(worst.error))")
  }

  @Test("Special values: exp(−∞) = 0, exp(0) = 1, NaN stays NaN")
  func specialValues() {
    #expect(fastExp(-Float.infinity) == 0)
    #expect(fastExp(-Float.infinity).sign == .plus)
    #expect(fastExp(0) == 1, "fastExp(0) = \(fastExp(0))")
    #expect(fastExp(-0.0) == 1)
    #expect(fastExp(Float.nan).isNaN, "fastExp(nan) = \(fastExp(Float.nan))")
    #expect(fastExp(-Float.nan).isNaN)
    #expect(fastExp(Float.signalingNaN).isNaN)
  }

  @Test(
    "Below −87.34 the result is exactly 0",
    arguments: [-87.34, -87.5, -88, -100, -1e4, -1e30, -Float.greatestFiniteMagnitude] as [Float])
  func underflow(x: Float) {
    #expect(fastExp(x) == 0, "fastExp(\(x)) = \(fastExp(x))")
  }

  /// The doc comment: above 88 the result saturates at exp(88) (finite; exp(88.73) is the
  /// largest float).
  @Test(
    "Above 88 the result saturates at exp(88)",
    arguments: [88.5, 89, 100, 1e30, .infinity] as [Float])
  func saturation(x: Float) {
    #expect(fastExp(x) == fastExp(88), "fastExp(\(x)) = \(fastExp(x))")
    #expect(fastExp(x).isFinite)
  }

  /// The softmax passes call `fastExpUnclamped`, which leaves out the clamp at 88 that their
  /// arguments (`≤ 0`) never reach: bit for bit `fastExp` below 88, at the special values, and
  /// on the sweep's points.
  @Test("fastExpUnclamped equals fastExp for arguments ≤ 88")
  func unclamped() {
    var inputs: [Float] = [-.infinity, .nan, -0.0, 0, 88, -87.34, -87.336_54, -1e30, 1e-30, -1e-30]
    inputs += (0...(1 << 14)).map { Float(-100 + 188 * Double($0) / Double(1 << 14)) }
    var start = 0
    var differ: [Float] = []
    while start < inputs.count {
      var v = SIMD16<Float>(repeating: 0)
      let lanes = min(16, inputs.count - start)
      for lane in 0..<lanes { v[lane] = inputs[start + lane] }
      let (a, b) = (fastExp(v), fastExpUnclamped(v))
      for lane in 0..<lanes where a[lane].bitPattern != b[lane].bitPattern {
        differ.append(v[lane])
      }
      start += 16
    }
    #expect(differ.isEmpty, "fastExpUnclamped differs from fastExp at \(differ.prefix(5))")
  }

  @Test("Every lane is computed independently of its neighbours")
  func lanesIndependent() {
    let values: [Float] = [
      -.infinity, .nan, 0, 1, -1, 88, 100, -87.34, -87, -50.5, 3.25, -0.001, 42, -10, 7, -200,
    ]
    var v = SIMD16<Float>()
    for lane in 0..<16 { v[lane] = values[lane] }
    let e = fastExp(v)
    for lane in 0..<16 {
      let scalar = fastExp(values[lane])
      #expect(
        e[lane].bitPattern == scalar.bitPattern || (e[lane].isNaN && scalar.isNaN),
        "lane \(lane), x = \(values[lane]): vector \(e[lane]), scalar \(scalar)")
    }
  }
}
