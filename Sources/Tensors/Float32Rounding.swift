/// float32 rounding: the unit roundoff `u = 2⁻²⁴` and Higham's `γₙ = n·u / (1 − n·u)`, the bound
/// on the relative error of `n` successive float32 operations (Accuracy and Stability of
/// Numerical Algorithms, §3.1).
public enum Float32Rounding {
  public static let unit = 0x1p-24

  public static func gamma(_ n: Int) -> Double { Double(n) * unit / (1 - Double(n) * unit) }
}
