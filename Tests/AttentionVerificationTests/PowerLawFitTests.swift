import AttentionKit
import Foundation
import Testing
import _TestSupport

@testable import AttentionVerification

/// `PowerLawFit` on synthetic data `y = c·xᵉ`: exact data must give back `c` and `e` to rounding
/// and `R² = 1`; data with small multiplicative noise must give them back to within what the noise
/// allows; bad input must be refused with a message, not fitted.
@Suite("Power-law fit")
struct PowerLawFitTests {
  /// Sizes as the complexity sweep uses them, and a non-power-of-two set.
  static let sizes: [Double] = [128, 256, 512, 1024, 2048]
  static let oddSizes: [Double] = [3, 10, 17, 100, 1000, 4321]

  /// (exponent, coefficient) pairs: quadratic time, linear memory, constant, a falling law.
  static let laws: [(Double, Double)] = [(2, 3.5e-6), (1, 1024), (0, 42), (-0.5, 7), (2.7, 1e-9)]

  @Test("exact data: exponent and coefficient recovered, R² = 1", arguments: laws)
  func exact(law: (Double, Double)) throws {
    let (e, c) = law
    for xs in [Self.sizes, Self.oddSizes] {
      let ys = xs.map { c * pow($0, e) }
      let fit = try PowerLawFit.fit(x: xs, y: ys)
      #expect(
        abs(fit.exponent - e) <= 1e-10,
        "exponent \(fit.exponent), expected \(e), error \(abs(fit.exponent - e))")
      #expect(
        abs(fit.coefficient - c) <= 1e-9 * c,
        "coefficient \(fit.coefficient), expected \(c), error \(abs(fit.coefficient / c - 1))")
      #expect(abs(fit.rSquared - 1) <= 1e-12, "R² = \(fit.rSquared), expected 1")
      // The fitted law reproduces the data.
      for (x, y) in zip(xs, ys) {
        #expect(abs(fit(x) - y) <= 1e-9 * y, "fit(\(x)) = \(fit(x)), data \(y)")
      }
    }
  }

  @Test("two points determine the law exactly")
  func twoPoints() throws {
    let fit = try PowerLawFit.fit(x: [4, 16], y: [2, 32])  // y = x²/8
    #expect(abs(fit.exponent - 2) <= 1e-12, "exponent \(fit.exponent)")
    #expect(abs(fit.coefficient - 0.125) <= 1e-12, "coefficient \(fit.coefficient)")
    #expect(abs(fit.rSquared - 1) <= 1e-12, "R² \(fit.rSquared)")
  }

  @Test("small multiplicative noise: close to the law, R² just below 1")
  func noisy() throws {
    // Deterministic noise factors in [0.95, 1.05] (a fixed pattern, no random source), on 11
    // sizes 2⁴ … 2¹⁴, so xᵢ = ln 2·(k + 9) for k = −5 … 5 on the log scale. With log noise |εᵢ| ≤
    // −ln 0.95 ≈ 0.0513, the slope moves by Σ kεᵢ / (ln 2·Σ k²) ≤ 0.0513·30 / (110·ln 2) ≈ 0.0202,
    // and log c by at most 0.0513 + 0.0202·9·ln 2 ≈ 0.177.
    let factors: [Double] = [1.03, 0.97, 1.05, 0.95, 1.01, 0.99, 1.04, 0.96, 1.02, 0.98, 1.0]
    let xs = (4...14).map { pow(2, Double($0)) }
    let (e, c) = (2.0, 2.5e-7)
    let ys = zip(xs, factors).map { c * pow($0, e) * $1 }
    let fit = try PowerLawFit.fit(x: xs, y: ys)
    #expect(abs(fit.exponent - e) <= 0.0203, "exponent \(fit.exponent), expected \(e) ± 0.0203")
    #expect(
      abs(log(fit.coefficient / c)) <= 0.178,
      "coefficient \(fit.coefficient), expected \(c) within a factor e^±0.178")
    #expect(
      fit.rSquared > 0.999 && fit.rSquared < 1, "R² = \(fit.rSquared), expected in (0.999, 1)")

    // And it is the least-squares line itself: the textbook closed form, in Double.
    let logX = xs.map { log($0) }
    let logY = ys.map { log($0) }
    let mx = logX.reduce(0, +) / Double(xs.count)
    let my = logY.reduce(0, +) / Double(ys.count)
    var covariance = 0.0
    var variance = 0.0
    for (lx, ly) in zip(logX, logY) {
      covariance += (lx - mx) * (ly - my)
      variance += (lx - mx) * (lx - mx)
    }
    let slope = covariance / variance
    let intercept = my - slope * mx
    #expect(abs(fit.exponent - slope) <= 1e-12, "dgels \(fit.exponent), closed form \(slope)")
    #expect(
      abs(log(fit.coefficient) - intercept) <= 1e-10,
      "dgels log c = \(log(fit.coefficient)), closed form \(intercept)")
  }

  @Test("R² on the log scale: a worse fit scores lower")
  func rSquaredOrders() throws {
    let xs: [Double] = [1, 2, 4, 8, 16, 32]
    let clean = try PowerLawFit.fit(x: xs, y: xs.map { 5 * $0 })
    // A kink: linear, then flat. No single power law fits it.
    let kinked = try PowerLawFit.fit(x: xs, y: [5, 10, 20, 20, 20, 20])
    #expect(kinked.rSquared < 0.95, "R² of a kinked series = \(kinked.rSquared)")
    #expect(kinked.rSquared < clean.rSquared)
    // Its value by the definition: 1 − SS_res/SS_tot of log y against the fitted line.
    let logX = xs.map { log($0) }
    let logY = [5.0, 10, 20, 20, 20, 20].map { log($0) }
    let mean = logY.reduce(0, +) / Double(logY.count)
    var residual = 0.0
    var total = 0.0
    for (lx, ly) in zip(logX, logY) {
      let predicted = log(kinked.coefficient) + kinked.exponent * lx
      residual += (ly - predicted) * (ly - predicted)
      total += (ly - mean) * (ly - mean)
    }
    #expect(abs(kinked.rSquared - (1 - residual / total)) <= 1e-12)
  }

  @Test("constant data: exponent 0, R² = 1")
  func constant() throws {
    let fit = try PowerLawFit.fit(x: [128, 256, 512], y: [593_920, 593_920, 593_920])
    #expect(abs(fit.exponent) <= 1e-12, "exponent \(fit.exponent)")
    #expect(abs(fit.coefficient - 593_920) <= 1e-6, "coefficient \(fit.coefficient)")
    #expect(fit.rSquared == 1)
  }

  @Test(
    "bad input is refused",
    arguments: [
      ([], []),
      ([128], [1]),
      ([1, 2, 3], [1, 2]),
      ([1, 2, 0], [1, 2, 3]),
      ([1, 2, 3], [1, -2, 3]),
      ([1, 2, 3], [1, 0, 3]),
      ([1, .infinity, 3], [1, 2, 3]),
      ([1, 2, 3], [1, .nan, 3]),
      ([8, 8, 8], [1, 2, 3]),
    ] as [([Double], [Double])])
  func badInput(x: [Double], y: [Double]) {
    #expect {
      _ = try PowerLawFit.fit(x: x, y: y)
    } throws: { error in
      guard case AttentionError.invalidArgument(let message) = error else { return false }
      return message.hasPrefix("power-law fit:")
    }
  }
}
