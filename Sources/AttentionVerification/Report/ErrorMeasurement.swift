import Foundation

/// The worst `|actual − expected| / bound` over the elements of one tensor that were compared with
/// a float64 reference, and where it is: what every element-wise check reports.
///
/// The one comparison rule of the library (`ratio(actual:expected:bound:)`): an exact match is 0;
/// a non-finite value agrees only with the same non-finite value (NaN with NaN, ∞ with the same
/// ∞), since no bound measures it; otherwise the error over the bound, ∞ for a bound of 0. Bounds
/// carry their own floors (see `ErrorBounds`), so an exact-zero bound demands an exact zero.
public struct ErrorMeasurement: Sendable, Equatable {
  /// The tensor's name in reports: `output`, `weights`, `dQ`, …
  public var tensor: String
  /// The tensor's shape, for `worstAt`.
  public var shape: [Int]
  /// How many rows (of the last dimension) were compared.
  public var rowsChecked = 0
  /// The largest ratio seen; a result passes when it is at most 1.
  public private(set) var worstRatio = 0.0
  /// The index of the worst element in `shape` (`nil` while every element matched exactly).
  public private(set) var worstAt: [Int]?
  /// The candidate's value, the reference's and the bound at `worstAt`.
  public private(set) var actual: Double?
  public private(set) var expected: Double?
  public private(set) var bound: Double?

  public init(tensor: String, shape: [Int]) {
    self.tensor = tensor
    self.shape = shape
  }

  public var passed: Bool { worstRatio <= 1 }

  /// `|actual − expected| / bound` under the rule above.
  public static func ratio(actual: Double, expected: Double, bound: Double) -> Double {
    if !actual.isFinite || !expected.isFinite {
      return sameNonFinite(actual, expected) ? 0 : .infinity
    }
    let error = abs(actual - expected)
    if error == 0 { return 0 }
    return bound > 0 ? error / bound : .infinity
  }

  /// Compares one element, at flat index `flatIndex` of `shape`.
  public mutating func record(actual: Double, expected: Double, bound: Double, at flatIndex: Int) {
    let r = Self.ratio(actual: actual, expected: expected, bound: bound)
    guard r > worstRatio || (worstAt == nil && r > 0) else { return }
    worstRatio = r
    worstAt = Self.multiIndex(flatIndex, in: shape)
    self.actual = actual
    self.expected = expected
    self.bound = bound
  }

  /// The worse of two measurements of the same tensor (rows added up).
  public mutating func merge(_ other: ErrorMeasurement) {
    rowsChecked += other.rowsChecked
    if other.worstRatio > worstRatio || (worstAt == nil && other.worstAt != nil) {
      worstRatio = other.worstRatio
      worstAt = other.worstAt
      actual = other.actual
      expected = other.expected
      bound = other.bound
    }
  }

  /// "16 rows, worst error / bound = 0.056 at [0, 1, 3, 2]".
  public var summary: String {
    let figure = worstRatio.isFinite ? String(format: "%.3g", worstRatio) : "\(worstRatio)"
    let place = worstAt.map { " at [\($0.map(String.init).joined(separator: ", "))]" } ?? ""
    return
      "\(rowsChecked) row\(rowsChecked == 1 ? "" : "s"), worst error / bound = \(figure)\(place)"
  }

  /// A failed element in words: "output[0, 1, 3, 2] = 0.51 where the reference has 0.49 ± 1.2e-7".
  public var worstDescription: String? {
    guard let worstAt, let actual, let expected, let bound else { return nil }
    let index = worstAt.map(String.init).joined(separator: ", ")
    return "\(tensor)[\(index)] = \(actual) where the float64 reference has \(expected) "
      + "± \(scientific(bound))"
  }

  /// Reports `stored` as the worst element's value when that element is the one at row-major
  /// `flat`: a candidate's value as its file holds it where reading it as a `Float` saturated it
  /// to `±Float.greatestFiniteMagnitude` (the ratio, computed on the saturated value, stands).
  public mutating func showStoredValue(_ stored: Double, atFlat flat: Int) {
    guard let worstAt, worstAt == Self.multiIndex(flat, in: shape) else { return }
    actual = stored
  }

  static func multiIndex(_ flat: Int, in shape: [Int]) -> [Int] {
    var rest = flat
    var index = [Int](repeating: 0, count: shape.count)
    for axis in shape.indices.reversed() where shape[axis] > 0 {
      index[axis] = rest % shape[axis]
      rest /= shape[axis]
    }
    return index
  }
}

/// Whether `a` and `b` are the same non-finite value (both NaN, or equal infinities): all that can
/// be checked of a result computed from non-finite inputs.
public func sameNonFinite(_ a: Double, _ b: Double) -> Bool {
  (a.isNaN && b.isNaN) || (a.isInfinite && a == b)
}
