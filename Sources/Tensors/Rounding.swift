/// The rounding of a floating-point format: its unit roundoff `u` and Higham's
/// `γₙ = n·u / (1 − n·u)`, the bound on the relative error of `n` successive operations
/// (*Accuracy and Stability of Numerical Algorithms*, §3.1). The one definition of `γₙ` that every
/// error bound of the package uses.
///
/// `underflowFloor` is the absolute error a value may take near zero: a kernel may flush a
/// result below the format's smallest normal number to zero (AttentionKit's `fastExp` does, and
/// float16 hardware often does), so a true value below it may come out anywhere in `[0, floor]`.
public struct Rounding: Sendable, Equatable {
  /// `u`: half the distance from 1 to the next number (`2⁻²⁴` for float32).
  public let unit: Double
  /// The smallest positive normal number of the format.
  public let underflowFloor: Double

  public init(unit: Double, underflowFloor: Double) {
    self.unit = unit
    self.underflowFloor = underflowFloor
  }

  /// float32: `u = 2⁻²⁴`, smallest normal `2⁻¹²⁶`.
  public static let float32 = Rounding(unit: 0x1p-24, underflowFloor: 0x1p-126)
  /// IEEE half precision: `u = 2⁻¹¹`, smallest normal `2⁻¹⁴`.
  public static let float16 = Rounding(unit: 0x1p-11, underflowFloor: 0x1p-14)
  /// bfloat16: float32's exponent range with 8 significant bits, `u = 2⁻⁸`.
  public static let bfloat16 = Rounding(unit: 0x1p-8, underflowFloor: 0x1p-126)
  /// float64, for the float64 reference's own rounding: `u = 2⁻⁵³`.
  public static let float64 = Rounding(unit: 0x1p-53, underflowFloor: 0x1p-1022)

  /// `γₙ = n·u / (1 − n·u)` (∞ once `n·u ≥ 1`: no bound is left).
  public func gamma(_ n: Int) -> Double {
    let nu = Double(n) * unit
    return nu < 1 ? nu / (1 - nu) : .infinity
  }
}

/// float32's rounding, as the kernels' bounds use it.
public enum Float32Rounding {
  public static let unit = Rounding.float32.unit

  public static func gamma(_ n: Int) -> Double { Rounding.float32.gamma(n) }
}
