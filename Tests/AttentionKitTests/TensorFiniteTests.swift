import AttentionKit
import Testing
import _TestSupport

/// `Tensor.firstNonFiniteIndex`: the first NaN or ±∞ in row-major order, as a multi-index, found
/// in the vector blocks and in the scalar tail alike.
@Suite("Finding non-finite values")
struct TensorFiniteTests {
  @Test("an all-finite tensor has none, extremes included")
  func allFinite() throws {
    let t = try Tensor(
      shape: [3, 7],
      scalars: (0..<21).map { i in
        [
          Float.greatestFiniteMagnitude, -.greatestFiniteMagnitude, .leastNonzeroMagnitude,
          -0.0, 1,
        ][i % 5]
      })
    #expect(t.firstNonFiniteIndex() == nil)
    #expect(try Tensor(shape: [0, 4]).firstNonFiniteIndex() == nil)
    #expect(try Tensor(shape: [], scalars: [2]).firstNonFiniteIndex() == nil)
  }

  /// Positions in the first 16-lane block, a later block and the tail (37 = 2·16 + 5).
  @Test(
    "reports the first one, wherever it lies",
    arguments: zip(
      [0, 5, 15, 16, 31, 33, 36],
      [
        Float.nan, .infinity, -.infinity, .nan, .nan,
        .infinity, .nan,
      ]))
  func position(flat: Int, value: Float) throws {
    var scalars = [Float](repeating: 1, count: 37)
    scalars[flat] = value
    if flat + 1 < 37 { scalars[36] = .nan }  // a later one must not win
    let t = try Tensor(shape: [37], scalars: scalars)
    #expect(t.firstNonFiniteFlatIndex() == flat)
    #expect(t.firstNonFiniteIndex() == [flat])
  }

  @Test("the multi-index is row-major: [0, 3, 5] of a [1, 4, 8] tensor is element 29")
  func multiIndex() throws {
    var t = try Tensor(shape: [1, 4, 8])
    t[0, 3, 5] = .nan
    #expect(t.firstNonFiniteIndex() == [0, 3, 5])
    #expect(t.multiIndex(ofFlat: 29) == [0, 3, 5])
    var scalar = try Tensor(shape: [], scalars: [1])
    scalar.scalars[0] = .infinity
    #expect(scalar.firstNonFiniteIndex() == [])
  }

  @Test("allowing −∞ (an additive mask) still reports NaN and +∞")
  func negativeInfinityAllowed() throws {
    var t = try Tensor(shape: [2, 20])
    for j in 0..<20 { t[0, j] = -.infinity }
    #expect(t.firstNonFiniteIndex(allowingNegativeInfinity: true) == nil)
    #expect(t.firstNonFiniteIndex() == [0, 0])
    t[1, 19] = .infinity
    #expect(t.firstNonFiniteIndex(allowingNegativeInfinity: true) == [1, 19])
    t[1, 3] = .nan
    #expect(t.firstNonFiniteIndex(allowingNegativeInfinity: true) == [1, 3])
  }

  @Test("names: NaN, inf, -inf")
  func names() {
    #expect(nonFiniteName(.nan) == "NaN")
    #expect(nonFiniteName(.infinity) == "inf")
    #expect(nonFiniteName(-.infinity) == "-inf")
  }
}
