/// Finding the values that are not ordinary numbers (NaN, ±∞) in a tensor.
///
/// The scan is the library's part of the non-finite policy: it only reports where such a value
/// is; whether that is an error (an input file), allowed (`−∞` in an additive mask, which masks),
/// or expected (an output computed from non-finite inputs) is for the caller to decide.
extension Tensor {
  /// The multi-index (one entry per dimension, row-major order) of the first element that is NaN
  /// or infinite, or `nil` when every element is finite. With `allowingNegativeInfinity`, `−∞`
  /// counts as acceptable (an additive mask uses it to mask) and only NaN and `+∞` are reported.
  public func firstNonFiniteIndex(allowingNegativeInfinity: Bool = false) -> [Int]? {
    firstNonFiniteFlatIndex(allowingNegativeInfinity: allowingNegativeInfinity)
      .map(multiIndex(ofFlat:))
  }

  /// The row-major position of the first element `firstNonFiniteIndex` would report.
  public func firstNonFiniteFlatIndex(allowingNegativeInfinity: Bool = false) -> Int? {
    scalars.withUnsafeBufferPointer { buffer -> Int? in
      let count = buffer.count
      guard let base = buffer.baseAddress else { return nil }
      func firstInRange(_ range: Range<Int>) -> Int? {
        range.first { i in
          !base[i].isFinite && !(allowingNegativeInfinity && base[i] == -.infinity)
        }
      }
      // x − x is 0 for every finite x and NaN for NaN and ±∞: sixteen lanes at a time find the
      // blocks worth a closer look, and the scalar test decides inside them.
      var start = 0
      while start + 16 <= count {
        let v = UnsafeRawPointer(base + start).loadUnaligned(as: SIMD16<Float>.self)
        if any((v - v) .!= 0), let found = firstInRange(start..<(start + 16)) { return found }
        start += 16
      }
      return firstInRange(start..<count)
    }
  }

  /// The multi-index of the element at row-major position `flat` (`[]` for a scalar).
  public func multiIndex(ofFlat flat: Int) -> [Int] {
    Self.multiIndex(ofFlat: flat, shape: shape)
  }

  /// The multi-index of row-major position `flat` in a tensor of `shape`.
  public static func multiIndex(ofFlat flat: Int, shape: [Int]) -> [Int] {
    var index = [Int](repeating: 0, count: shape.count)
    var rest = flat
    for axis in stride(from: shape.count - 1, through: 0, by: -1) where shape[axis] > 0 {
      index[axis] = rest % shape[axis]
      rest /= shape[axis]
    }
    return index
  }
}
