import CBLAS
import CLAPACKE
import Foundation
import Tensors

/// A power law `y ≈ c·xᵉ` fitted by least squares on the log–log scale.
///
/// Taking logarithms turns the law into a line, `log y = log c + e·log x`, so the fit is the
/// linear least-squares problem
///
///     minimize ‖A·[log c, e]ᵀ − log y‖₂   with   A = [1, log xᵢ]  (one row per point),
///
/// solved with LAPACK's `dgels` (a QR factorization of `A`, better conditioned than the normal
/// equations). Fitting on the log scale weighs every point by its relative error, which is what a
/// sweep over sizes 128 … 2048 needs: on the linear scale the largest size would decide alone.
///
/// `rSquared` is the coefficient of determination of the log-scale fit,
/// `R² = 1 − Σ(log yᵢ − ŷᵢ)² / Σ(log yᵢ − mean log y)²`; it is 1 when every point lies on the line
/// (and, by convention, when all `y` are equal: the exponent 0 then fits exactly).
public struct PowerLawFit: Sendable, Equatable {
  /// `e` in `y ≈ c·xᵉ`: 2 for a cost that quadruples when `x` doubles.
  public var exponent: Double
  /// `c` in `y ≈ c·xᵉ`, in the units of `y`.
  public var coefficient: Double
  /// `R²` of the fit of `log y` against `log x`, at most 1.
  public var rSquared: Double

  public init(exponent: Double, coefficient: Double, rSquared: Double) {
    self.exponent = exponent
    self.coefficient = coefficient
    self.rSquared = rSquared
  }

  /// The fitted law at `x`: `c·xᵉ`.
  public func callAsFunction(_ x: Double) -> Double { coefficient * pow(x, exponent) }

  /// Fits `y ≈ c·xᵉ` to the points `(xᵢ, yᵢ)`.
  ///
  /// Throws `AttentionError.invalidArgument` when the arrays differ in length, hold fewer than two
  /// points, hold a value that is not finite and positive (a logarithm is needed), or when every
  /// `x` is the same (the exponent is then undetermined).
  public static func fit(x: [Double], y: [Double]) throws -> PowerLawFit {
    guard x.count == y.count else {
      throw AttentionError.invalidArgument(
        "power-law fit: \(x.count) x values but \(y.count) y values")
    }
    guard x.count >= 2 else {
      throw AttentionError.invalidArgument(
        "power-law fit: needs at least 2 points, got \(x.count)")
    }
    for (name, values) in [("x", x), ("y", y)] {
      if let bad = values.first(where: { !($0 > 0 && $0.isFinite) }) {
        throw AttentionError.invalidArgument(
          "power-law fit: every \(name) must be finite and positive (logarithms), got \(bad)")
      }
    }
    let logX = x.map { log($0) }
    let logY = y.map { log($0) }
    // Distinct x values, judged after the logarithm (what the matrix A actually holds).
    guard let first = logX.first, logX.contains(where: { $0 != first }) else {
      throw AttentionError.invalidArgument(
        "power-law fit: needs at least 2 distinct x values, all are \(x[0])")
    }

    let m = logX.count
    // A is m×2 in column-major order: a column of ones, then the column of log x.
    var a = [Double](repeating: 1, count: m) + logX
    // b holds log y on entry and the solution [log c, e] in its first two entries on exit.
    var b = logY
    let info = a.withUnsafeMutableBufferPointer { aPointer in
      b.withUnsafeMutableBufferPointer { bPointer in
        LAPACKE_dgels(
          LAPACK_COL_MAJOR, CChar(UInt8(ascii: "N")), numericCast(m), 2, 1,
          aPointer.baseAddress, numericCast(m), bPointer.baseAddress, numericCast(m))
      }
    }
    guard info == 0 else {
      // info > 0: A is rank-deficient; info < 0: an argument was rejected. Neither should
      // happen after the checks above.
      throw AttentionError.invalidArgument("power-law fit: LAPACKE_dgels failed with info \(info)")
    }
    let (logC, exponent) = (b[0], b[1])

    let mean = logY.reduce(0, +) / Double(m)
    var residual = 0.0
    var total = 0.0
    for (lx, ly) in zip(logX, logY) {
      let predicted = logC + exponent * lx
      residual += (ly - predicted) * (ly - predicted)
      total += (ly - mean) * (ly - mean)
    }
    // All y equal (so the spread is only the rounding of the mean, a few ulps of log y): the
    // horizontal line, exponent 0, fits them, and 1 − residual/total would be noise over noise.
    let ulps = 16 * Double.ulpOfOne * max(logY.map(abs).max() ?? 0, 1)
    let roundingSpread = Double(m) * ulps * ulps
    let rSquared = total > roundingSpread ? 1 - residual / total : 1
    return PowerLawFit(exponent: exponent, coefficient: exp(logC), rSquared: rSquared)
  }
}
