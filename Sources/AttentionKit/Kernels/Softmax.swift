import Tensors

/// The row passes of softmax, shared by the kernels.
///
/// `softmax(s)_j = exp(s_j − max s) / Σ_k exp(s_k − max s)`. The max is subtracted only for
/// numerical stability (so no `exp` overflows); it does not change the result. A row whose scores
/// are all `−∞` (every key masked) has no defined softmax: PyTorch ≥ 2.5 returns zeros there, and so
/// do we, rather than the `0/0 = NaN` of the notebook's code.
enum RowSoftmax {
  /// The maximum of `row[0..<count]`; `−∞` for an empty or fully masked row. NaN propagates.
  @inline(__always)
  static func maximum(_ row: UnsafePointer<Float>, count: Int) -> Float {
    var best = SIMD16<Float>(repeating: -.infinity)
    var nanLanes = SIMDMask<SIMD16<Int32>>()
    var j = 0
    while j + 16 <= count {
      let v = UnsafeRawPointer(row + j).loadUnaligned(as: SIMD16<Float>.self)
      // `replacing(where:)` compiles to a select; `pointwiseMax` compiled to a slow sequence.
      best.replace(with: v, where: v .> best)
      // Reduced once at the end: `any` on every vector cost as much as the comparisons.
      nanLanes .|= v .!= v
      j += 16
    }
    var nan = any(nanLanes)
    var result = largest(best)
    while j < count {
      let v = row[j]
      if v > result { result = v }
      if v.isNaN { nan = true }
      j += 1
    }
    return nan ? .nan : result
  }

  /// Replaces `row[j]` by `exp(row[j] − shift)` and returns the sum of the new values. `shift`
  /// is at least every value of the row (its max), or the row holds NaN.
  @inline(__always)
  static func exponentiate(_ row: UnsafeMutablePointer<Float>, count: Int, shift: Float) -> Float {
    exponentiate(row, count: count, runningShift: shift).sum
  }

  /// How far a tile's scores may rise above a row's running shift `m` and still be used as
  /// `exp(s − m)` (see `exponentiate(_:count:runningShift:)`): the probabilities then stay below
  /// `e⁸ ≈ 2981`, so the running sum and output gain that factor in range and lose nothing in
  /// relative precision.
  static let shiftHeadroom: Float = 8

  /// One pass over a tile's row for the online softmax, given a finite shift `m` (the row's
  /// running max from earlier tiles, or an estimate of the tile's): replaces `row[j]` by
  /// `exp(row[j] − m)` and returns their sum and the row's largest score, read on the way.
  ///
  /// The values are the tile's probabilities relative to `m` only when the largest score is at
  /// most `m + shiftHeadroom` and the sum is a number; otherwise they may be garbage (NaN or
  /// infinite too), and the caller recomputes the row's scores and takes the two-pass path
  /// (`maximum`, which reports NaN, then `exponentiate`). A NaN score needs no check of its
  /// own here: its exp, and so the sum, is NaN. Past the first tile the max rarely grows that
  /// much, so most tiles are read once.
  @inline(__always)
  static func exponentiate(
    _ row: UnsafeMutablePointer<Float>, count: Int, runningShift shift: Float
  ) -> (sum: Float, maximum: Float) {
    var sums = SIMD16<Float>()
    var best = SIMD16<Float>(repeating: -.infinity)
    var j = 0
    while j + 16 <= count {
      let raw = UnsafeMutableRawPointer(row + j)
      let v = raw.loadUnaligned(as: SIMD16<Float>.self)
      best.replace(with: v, where: v .> best)
      // Unclamped: past 88 a lane's value is garbage (finite or not), and the caller discards
      // the pass, as the maximum then exceeds the headroom.
      let e = fastExpUnclamped(v - shift)
      raw.storeBytes(of: e, as: SIMD16<Float>.self)
      sums += e
      j += 16
    }
    if j < count {
      // The tail goes through the same vector code, padded with −∞ (whose exp is 0).
      var tail = SIMD16<Float>(repeating: -.infinity)
      for lane in 0..<(count - j) { tail[lane] = row[j + lane] }
      best.replace(with: tail, where: tail .> best)
      let e = fastExpUnclamped(tail - shift)
      for lane in 0..<(count - j) { row[j + lane] = e[lane] }
      sums += e
    }
    return (total(sums), largest(best))
  }

  /// The largest lane, halving the vector each step (`SIMD.max()` is sixteen dependent NaN-aware
  /// comparisons; NaN is tracked by the caller).
  @inline(__always)
  static func largest(_ v: SIMD16<Float>) -> Float {
    let eight = v.lowHalf.replacing(with: v.highHalf, where: v.highHalf .> v.lowHalf)
    let four = eight.lowHalf.replacing(with: eight.highHalf, where: eight.highHalf .> eight.lowHalf)
    let two = four.lowHalf.replacing(with: four.highHalf, where: four.highHalf .> four.lowHalf)
    return Swift.max(two[0], two[1])
  }

  /// The sum of the lanes, halving the vector each step (`SIMD.sum()` is sixteen dependent
  /// additions, and was not inlined).
  @inline(__always)
  static func total(_ v: SIMD16<Float>) -> Float {
    let eight = v.lowHalf + v.highHalf
    let four = eight.lowHalf + eight.highHalf
    let two = four.lowHalf + four.highHalf
    return two[0] + two[1]
  }

  /// Multiplies `row[0..<count]` by `factor`.
  @inline(__always)
  static func scale(_ row: UnsafeMutablePointer<Float>, count: Int, by factor: Float) {
    scale(row, into: row, count: count, by: factor)
  }

  /// `destination[j] = source[j]·factor` for `j < count`; the two may be the same row.
  @inline(__always)
  static func scale(
    _ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<Float>, count: Int,
    by factor: Float
  ) {
    var j = 0
    while j + 16 <= count {
      let v = UnsafeRawPointer(source + j).loadUnaligned(as: SIMD16<Float>.self)
      UnsafeMutableRawPointer(destination + j).storeBytes(of: v * factor, as: SIMD16<Float>.self)
      j += 16
    }
    while j < count {
      destination[j] = source[j] * factor
      j += 1
    }
  }

  /// Softmax of `row[0..<count]` in place; a fully masked row becomes zeros.
  @inline(__always)
  static func normalize(_ row: UnsafeMutablePointer<Float>, count: Int) {
    let peak = maximum(row, count: count)
    if peak == -.infinity {
      row.update(repeating: 0, count: count)
      return
    }
    let sum = exponentiate(row, count: count, shift: peak)
    scale(row, count: count, by: 1 / sum)
  }
}
