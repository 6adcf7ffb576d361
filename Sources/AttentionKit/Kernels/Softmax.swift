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
    scanMaximum(row, count: count, detectingNaN: true)
  }

  /// The largest non-NaN value of `row[0..<count]`; `−∞` for an empty or fully masked row.
  @_transparent
  static func largest(_ row: UnsafePointer<Float>, count: Int) -> Float {
    scanMaximum(row, count: count, detectingNaN: false)
  }

  @_transparent
  static func scanMaximum(
    _ row: UnsafePointer<Float>, count: Int, detectingNaN: Bool
  ) -> Float {
    var best = SIMD16<Float>(repeating: -.infinity)
    var nanLanes = SIMDMask<SIMD16<Int32>>()
    var j = 0
    while j + 16 <= count {
      let v = UnsafeRawPointer(row + j).loadUnaligned(as: SIMD16<Float>.self)
      // `replacing(where:)` compiles to a select (`pointwiseMax` to a slower sequence).
      best.replace(with: v, where: v .> best)
      // Reduced once at the end: `any` on every vector would cost as much as the comparisons.
      if detectingNaN { nanLanes .|= v .!= v }
      j += 16
    }
    var nan = detectingNaN && any(nanLanes)
    var result = largest(best)
    while j < count {
      let v = row[j]
      if v > result { result = v }
      if detectingNaN && v.isNaN { nan = true }
      j += 1
    }
    return nan ? .nan : result
  }

  /// Replaces `row[j]` by `exp(row[j] − shift)` and returns the sum of the new values. `shift`
  /// is at least every value of the row (its max), or the row holds NaN.
  @inline(__always)
  static func exponentiate(_ row: UnsafeMutablePointer<Float>, count: Int, shift: Float) -> Float {
    var sums = SIMD16<Float>()
    accumulateExp(row, count: count, shift: shift, into: &sums)
    return total(sums)
  }

  /// `row[j] = exp(row[j] − shift)`, each new value added into `sums`' lanes; `saturating`, the
  /// exp of arguments above 88 is `exp(88)` (`fastExp`), else they must not occur
  /// (`fastExpUnclamped`). Always inlined (`@_transparent`): it is called once a group, and a
  /// call would reload its sixteen constants and the sums each time (about a fifth of the pass).
  @_transparent
  static func accumulateExp(
    _ row: UnsafeMutablePointer<Float>, count: Int, shift: Float, into sums: inout SIMD16<Float>,
    saturating: Bool = false
  ) {
    @_transparent
    func exp(_ x: SIMD16<Float>) -> SIMD16<Float> {
      saturating ? fastExpSaturating(x) : fastExpUnclamped(x)
    }
    var j = 0
    while j + 16 <= count {
      let raw = UnsafeMutableRawPointer(row + j)
      let e = exp(raw.loadUnaligned(as: SIMD16<Float>.self) - shift)
      raw.storeBytes(of: e, as: SIMD16<Float>.self)
      sums += e
      j += 16
    }
    if j < count {
      // The tail goes through the same vector code, padded with −∞ (whose exp is 0).
      var tail = SIMD16<Float>(repeating: -.infinity)
      for lane in 0..<(count - j) { tail[lane] = row[j + lane] }
      let e = exp(tail - shift)
      for lane in 0..<(count - j) { row[j + lane] = e[lane] }
      sums += e
    }
  }

  /// How far scores may rise above a row's running shift `m` and still be used as `exp(s − m)`
  /// (see `exponentiate(_:count:runningShift:)`): the probabilities then stay below about
  /// `e⁸ ≈ 2981`, and the running sum and output gain that factor, which loses nothing in
  /// relative precision. The price is range: an output accumulated from values `V` near
  /// `Float.greatestFiniteMagnitude / e⁸` (about 10³⁵) can overflow where an exact max would
  /// have left it finite.
  static let shiftHeadroom: Float = 8

  /// Keys per group of `exponentiate(_:count:runningShift:)`: 512 bytes, read twice from L1.
  static let shiftGroup = 128

  /// The online softmax's pass over one tile's row, reading it about once: replaces `row[j]` by
  /// `exp(row[j] − m)` and returns their sum, where `m` is the row's running shift — the max of
  /// earlier tiles' scores, kept while this tile's scores stay within `shiftHeadroom` of it —
  /// updated in place. Softmax is shift-invariant, so `m` need not be the exact max: results
  /// differ only in rounding.
  ///
  /// Group by group of `shiftGroup` keys, the group's max is taken first (from L1, just before
  /// its exp). While `m = −∞` (no visible key yet) a group of `−∞` is written as zeros, and the
  /// first visible group sets `m` to its max. A group more than the headroom above `m` raises `m`
  /// to the largest score of the rest of the row — so no later group rises past it — and
  /// multiplies what was already written, and the sum, by `exp(m_old − m)`: a row costs at most
  /// about two passes however its scores rise. NaN scores do not move `m`; their exp, and so the
  /// sum, is NaN. A row of `−∞` leaves `m = −∞`, zeros and a sum of 0.
  @inline(__always)
  static func exponentiate(
    _ row: UnsafeMutablePointer<Float>, count: Int, runningShift shift: inout Float
  ) -> Float {
    var sums = SIMD16<Float>()
    var start = 0
    while start < count {
      let end = min(start + shiftGroup, count)
      let peak = largest(row + start, count: end - start)
      if shift == -.infinity && peak == -.infinity {
        (row + start).update(repeating: 0, count: end - start)
        start = end
        continue
      }
      if shift == -.infinity {
        // The first visible group: what came before it is zeros, nothing to rescale.
        shift = peak
      } else if peak > shift + shiftHeadroom {
        let raised = Swift.max(peak, largest(row + end, count: count - end))
        let factor = fastExp(shift - raised)
        scale(row, count: start, by: factor)
        sums *= factor
        shift = raised
      }
      accumulateExp(row + start, count: end - start, shift: shift, into: &sums)
      start = end
    }
    return total(sums)
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
  /// additions).
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

  /// Softmax of `row[0..<count]` in place; a fully masked row becomes zeros. A `sink` logit
  /// joins the denominator (`ScoreTerms.sinks`), so the row then sums to less than 1; returns
  /// the sink's own weight (0 without a sink or when every key is masked).
  @inline(__always)
  @discardableResult
  static func normalize(_ row: UnsafeMutablePointer<Float>, count: Int, sink: Float? = nil)
    -> Float
  {
    let visible = maximum(row, count: count)
    if visible == -.infinity {
      row.update(repeating: 0, count: count)
      return 0
    }
    // A sink σ is one more key with no value: it shares the shift and the denominator.
    let peak = sink.map { max(visible, $0) } ?? visible
    var sum = exponentiate(row, count: count, shift: peak)
    let sinkTerm = sink.map { fastExp($0 - peak) } ?? 0
    sum += sinkTerm
    scale(row, count: count, by: 1 / sum)
    return sinkTerm / sum
  }
}
