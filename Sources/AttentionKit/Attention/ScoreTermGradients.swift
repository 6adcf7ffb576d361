import Tensors

/// The backward pass's share of the score terms (`ScoreTerms`), with `dS = ∂L/∂s` the gradient
/// of the final scores:
/// - soft-capping: `s = c·tanh(x/c) + …` of `x = scale·q·k`, so `∂L/∂x = dS·(1 − (t/c)²)` with
///   `t = c·tanh(x/c)` the capped score; `dQ` and `dK` take `∂L/∂x`, the mask's and the
///   position terms' gradients `dS` itself;
/// - T5: `d(table)[bucket(d), h] = Σ dS_ij` over the scores of head `h` at distance
///   `d = j − i_abs`, summed first by distance (`[H, 2R + 1]`, the ends collecting every
///   distance beyond `±R`, where every bucket is constant) and then by bucket;
/// - sinks: `p_sink,i = exp(σ_h − L_i)` takes part in the softmax as a key with no value, so
///   `dσ_h = −Σ_i p_sink,i·Δ_i` over the rows of head `h` (`Δ_i = Σ_c dO_ic·O_ic`); a row that
///   sees no key contributes nothing.
/// ALiBi's slopes are fixed by the model, not learned: they have no gradient here.
extension ResolvedScoreTerms {
  /// The distances a head's T5 gradient is summed over, `2R + 1`; 0 without T5.
  var distanceBins: Int { t5 == nil ? 0 : 2 * t5Reach + 1 }

  /// `factors[j] = 1 − (t_j/c)²` for the capped scores `capped[0..<count]`: `∂t/∂x` of the
  /// soft-cap, sixteen at a time.
  @inline(__always)
  func capFactors(
    _ capped: UnsafePointer<Float>, into factors: UnsafeMutablePointer<Float>, count: Int
  ) {
    guard let c = softcap else { return }
    let inverse = 1 / c
    var j = 0
    while j + 16 <= count {
      let y = UnsafeRawPointer(capped + j).loadUnaligned(as: SIMD16<Float>.self) * inverse
      UnsafeMutableRawPointer(factors + j).storeBytes(of: 1 - y * y, as: SIMD16<Float>.self)
      j += 16
    }
    while j < count {
      let y = capped[j] * inverse
      factors[j] = 1 - y * y
      j += 1
    }
  }

  /// Adds the score gradients `row[0..<count]` of query `i` (keys `firstKey …`) to its head's
  /// bins by distance, `bins[clip(j − i_abs, −R, R) + R]`, in `Double`.
  @inline(__always)
  func binByDistance(
    _ row: UnsafePointer<Float>, into bins: UnsafeMutablePointer<Double>, query i: Int,
    firstKey: Int, count: Int
  ) {
    let reach = t5Reach
    let first = firstKey - (i + alignment)
    // Keys with d < −R add to bins[0]; with d > R, to bins[2R]; between, to bins[d + R].
    let leftEnd = min(max(-reach - first, 0), count)
    let rightStart = min(max(reach + 1 - first, leftEnd), count)
    var low = 0.0
    for j in 0..<leftEnd { low += Double(row[j]) }
    bins[0] += low
    let target = bins + first + reach
    var j = leftEnd
    while j + 8 <= rightStart {
      let x = SIMD8<Double>(UnsafeRawPointer(row + j).loadUnaligned(as: SIMD8<Float>.self))
      let raw = UnsafeMutableRawPointer(target + j)
      raw.storeBytes(of: raw.loadUnaligned(as: SIMD8<Double>.self) + x, as: SIMD8<Double>.self)
      j += 8
    }
    while j < rightStart {
      target[j] += Double(row[j])
      j += 1
    }
    var high = 0.0
    for j in rightStart..<count { high += Double(row[j]) }
    bins[2 * reach] += high
  }

  /// Each T5 term's table gradient, `[buckets, H]` in `positionBiases` order, from the summed
  /// bins of each head: `binsOfHead(h)` points at head `h`'s `2R + 1` sums.
  func t5TableGradients(binsOfHead: (Int) -> [Double]) -> [Tensor] {
    guard t5 != nil else { return [] }
    let width = distanceBins
    let perHead = (0..<heads).map(binsOfHead)
    return t5Rules.map { rule in
      var sums = [Double](repeating: 0, count: rule.buckets * heads)
      for k in 0..<width {
        let bucket = PositionBias.t5Bucket(
          relativePosition: k - t5Reach, bidirectional: rule.bidirectional,
          buckets: rule.buckets, maxDistance: rule.maxDistance)
        for h in 0..<heads { sums[bucket * heads + h] += perHead[h][k] }
      }
      return Tensor(validShape: [rule.buckets, heads], scalars: sums.map { Float($0) })
    }
  }

  /// `dσ_h`, `[H]`, from each row's `p_sink,i·Δ_i` (`[B·H·Tq]`, flat batch major), summed per head
  /// in increasing (batch, query) order; `nil` without sinks.
  func sinkGradients(sinkTerms: [Double], queries tq: Int) -> Tensor? {
    guard sinks != nil else { return nil }
    var sums = [Double](repeating: 0, count: heads)
    for (row, term) in sinkTerms.enumerated() { sums[head(row / max(tq, 1))] -= term }
    return Tensor(validShape: [heads], scalars: sums.map { Float($0) })
  }
}
