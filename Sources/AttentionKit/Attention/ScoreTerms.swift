import Foundation
import Tensors

/// The terms today's models put into the scores beside `scale·q·k` and the mask: logit
/// soft-capping (Gemma 2), a position bias by distance (ALiBi: BLOOM, MPT; T5's relative
/// buckets) and attention sinks (gpt-oss, StreamingLLM). Every kernel applies them the same way,
/// tile by tile, without a `[Tq, Tk]` tensor of them:
///
/// `s_ij = softcap(scale·q_i·k_j) + bias_h(j − i_abs) + mask_ij`,
/// `p_ij = exp(s_ij − m) / (exp(σ_h − m) + Σ_j exp(s_ij − m))`, `m = max(σ_h, max_j s_ij)`,
///
/// with `softcap(x) = c·tanh(x / c)`, `h` the query head (the last batch dimension of Q; 0 for
/// `[B, T, D]` inputs), `i_abs` the query's position under the mask's causal alignment (`i`
/// top-left, `i + Tk − Tq` bottom-right; `i` without a causal mask) and `σ_h` head `h`'s sink, a
/// logit that takes part in the denominator as one more key with no value. A row whose every key
/// is masked gets zero weights and a zero output, sink or not. The notebook's relative-position
/// term (`relativePosition`) is added after the soft-cap, with the position bias.
public struct ScoreTerms: Sendable {
  /// `c > 0` of `c·tanh(x / c)`, applied to `scale·q·k` before every other term; `nil`: none.
  public var softcap: Float?
  /// Per-head biases by the distance `j − i_abs`, summed (ALiBi and T5 may be combined); empty:
  /// none.
  public var positionBiases: [PositionBias]
  /// `σ_h` for each query head `h` (`[H]`); `nil`: no sink.
  public var sinks: [Float]?
  /// The notebook's relative-position term (Shaw et al.): `+ scale·q_i·E[clip(j − i, −M, M) + M]`,
  /// added after the soft-cap, with the position bias (`RelativePositionBias`); `nil`: none.
  public var relativePosition: RelativePositionBias?

  public init(
    softcap: Float? = nil, positionBiases: [PositionBias] = [], sinks: [Float]? = nil,
    relativePosition: RelativePositionBias? = nil
  ) {
    self.softcap = softcap
    self.positionBiases = positionBiases
    self.sinks = sinks
    self.relativePosition = relativePosition
  }

  /// No term: plain attention.
  public static let none = ScoreTerms()

  public var isEmpty: Bool {
    softcap == nil && positionBiases.isEmpty && sinks == nil && relativePosition == nil
  }

  /// The summed position biases of head `h` (of `heads`) at distance `d = j − i_abs`, in
  /// float64: ALiBi's `slope_h·d` exactly, T5's table entry as stored. What the references add.
  package func exactPositionBias(head h: Int, heads: Int, distance d: Int) -> Double {
    var total = 0.0
    for bias in positionBiases {
      switch bias {
      case .alibi(let slopes): total += Double(slopes[h]) * Double(d)
      case .t5(let table, let maxDistance, let bidirectional):
        let bucket = PositionBias.t5Bucket(
          relativePosition: d, bidirectional: bidirectional, buckets: table.shape[0],
          maxDistance: maxDistance)
        total += Double(table.scalars[bucket * heads + h])
      }
    }
    return total
  }
}

/// A bias added to score `(i, j)` of query head `h` that depends only on `h` and the distance
/// `d = j − i_abs` (see `ScoreTerms`).
public enum PositionBias: Sendable {
  /// ALiBi: `slope_h·d` (`[H]` slopes). Equal, up to a constant per row that softmax ignores, to
  /// BLOOM's `slope_h·j`; `bloomSlopes(heads:)` gives BLOOM's and MPT's slopes.
  case alibi(slopes: [Float])
  /// T5's learned bias: `table[bucket(d), h]`, `table` `[buckets, H]` (the layout of
  /// `relative_attention_bias.weight`), `bucket` = `t5Bucket(relativePosition:…)`.
  case t5(table: Tensor, maxDistance: Int, bidirectional: Bool)

  /// BLOOM's ALiBi slopes for `heads` heads (`build_alibi_tensor`): for the largest power of two
  /// `n ≤ heads`, `2^(−8k/n)` for `k = 1…n`; the remaining `heads − n` slopes are
  /// `2^(−4(2k − 1)/n)` for `k = 1…heads − n` (every other slope of `2n` heads).
  public static func bloomSlopes(heads: Int) -> [Float] {
    guard heads > 0 else { return [] }
    var n = 1
    while n * 2 <= heads { n *= 2 }
    let base = Float(pow(2, -pow(2, -(log2(Double(n)) - 3))))
    var slopes = (1...n).map { powf(base, Float($0)) }
    if n < heads {
      let extraBase = Float(pow(2, -pow(2, -(log2(Double(2 * n)) - 3))))
      let remaining = min(n, heads - n)
      slopes += stride(from: 1, through: 1 + 2 * (remaining - 1), by: 2).map {
        powf(extraBase, Float($0))
      }
    }
    return slopes
  }

  /// T5's bucket of a relative position `d = j − i` (transformers'
  /// `T5Attention._relative_position_bucket`, computed as it does, in float32): bidirectional,
  /// half the buckets for `d > 0`; then distances below half the (remaining) buckets are exact,
  /// larger ones log-spaced up to `maxDistance`, beyond it the last bucket.
  public static func t5Bucket(
    relativePosition d: Int, bidirectional: Bool, buckets: Int, maxDistance: Int
  ) -> Int {
    var buckets = buckets
    var bucket = 0
    var distance: Int
    if bidirectional {
      buckets /= 2
      if d > 0 { bucket += buckets }
      distance = abs(d)
    } else {
      distance = -min(d, 0)
    }
    let maxExact = buckets / 2
    if distance < maxExact { return bucket + distance }
    let ratio = logf(Float(distance) / Float(maxExact))
    let span = Float(log(Double(maxDistance) / Double(maxExact)))
    let large = maxExact + Int(ratio / span * Float(buckets - maxExact))
    return bucket + min(large, buckets - 1)
  }
}

/// `ScoreTerms` laid out for one call: ALiBi's slopes by head (several ALiBi terms summed), T5's
/// biases by head as a table over the distances `[−R, R]` (`R` the largest max distance: every
/// bucket is constant beyond it, so farther distances read the ends), the sinks by head. Built
/// once per call in `O(H·R)`, independent of the sequence length.
struct ResolvedScoreTerms: Sendable {
  let softcap: Float?
  /// `[H]`: the summed ALiBi slope of each head; `nil` without ALiBi.
  let slopes: [Float]?
  /// `[H, 2R + 1]`: T5's summed bias of head `h` at distance `d` is `t5[h·(2R + 1) + clip(d) + R]`;
  /// `nil` without T5.
  let t5: [Float]?
  let t5Reach: Int
  /// Each T5 term's bucket rule, in `positionBiases` order: what its table's gradient is summed
  /// by (`ScoreTermGradients`).
  let t5Rules: [(buckets: Int, maxDistance: Int, bidirectional: Bool)]
  let sinks: [Float]?
  let heads: Int
  /// `i_abs − i`: `Tk − Tq` for a bottom-right causal alignment, else 0.
  let alignment: Int

  init(_ terms: ScoreTerms, shape: AttentionShape, mask: AttentionMask) throws {
    let heads = shape.batchShape.count >= 2 ? shape.batchShape[shape.batchShape.count - 1] : 1
    self.heads = heads
    let aligned = mask.isCausal || mask.window != nil
    alignment = aligned && mask.causalAlignment == .bottomRight ? shape.keys - shape.queries : 0
    if let c = terms.softcap, !(c.isFinite && c > 0) {
      throw AttentionError.invalidArgument("the soft-cap must be a positive number, got \(c)")
    }
    softcap = terms.softcap
    if let sinks = terms.sinks, sinks.count != heads {
      throw AttentionError.shapeMismatch(
        "sinks hold \(sinks.count) values; the queries have \(heads) heads (one sink per head)")
    }
    sinks = terms.sinks
    var slopes: [Float]? = nil
    var tables: [(table: Tensor, maxDistance: Int, bidirectional: Bool)] = []
    for bias in terms.positionBiases {
      switch bias {
      case .alibi(let given):
        guard given.count == heads else {
          throw AttentionError.shapeMismatch(
            "ALiBi has \(given.count) slopes; the queries have \(heads) heads (one slope per head)")
        }
        slopes = slopes.map { zip($0, given).map { $0 + $1 } } ?? given
      case .t5(let table, let maxDistance, let bidirectional):
        guard table.rank == 2, table.shape[1] == heads, table.shape[0] >= 2 else {
          throw AttentionError.shapeMismatch(
            "a T5 bias table is [buckets, H] with H = \(heads) and at least 2 buckets, got "
              + shapeForMessage(table.shape))
        }
        let exact = table.shape[0] / (bidirectional ? 4 : 2)
        guard maxDistance > exact, maxDistance <= 1 << 24 else {
          throw AttentionError.invalidArgument(
            "the T5 max distance must exceed the exact buckets (\(exact)) and be at most 2²⁴, got "
              + "\(maxDistance)")
        }
        tables.append((table, maxDistance, bidirectional))
      }
    }
    self.slopes = slopes
    t5Rules = tables.map { ($0.table.shape[0], $0.maxDistance, $0.bidirectional) }
    let reach = tables.map(\.maxDistance).max() ?? 0
    t5Reach = reach
    if tables.isEmpty {
      t5 = nil
    } else {
      let width = 2 * reach + 1
      var t5 = [Float](repeating: 0, count: heads * width)
      for (table, maxDistance, bidirectional) in tables {
        for k in 0..<width {
          let bucket = PositionBias.t5Bucket(
            relativePosition: k - reach, bidirectional: bidirectional, buckets: table.shape[0],
            maxDistance: maxDistance)
          for h in 0..<heads { t5[h * width + k] += table.scalars[bucket * heads + h] }
        }
      }
      self.t5 = t5
    }
  }

  /// `0, 1, …, 15`: the distances of sixteen keys after the first of them.
  static let steps = SIMD16<Float>(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

  /// The query head of flat batch `b`.
  @inline(__always)
  func head(_ b: Int) -> Int { b % heads }

  /// The sink of flat batch `b`'s head, `nil` without sinks.
  @inline(__always)
  func sink(batch b: Int) -> Float? { sinks?[head(b)] }

  /// Soft-caps `row[0..<count]`, the scaled scores `scale·q·k` of one query (before any other
  /// term): `c·tanh(x/c)`, with `tanh(y) = sign(y)·(1 − e)/(1 + e)`, `e = exp(−2|y|)` by
  /// `fastExp`, sixteen at a time. Its absolute error is within `6u·c` (`e` within `2u`, the
  /// quotient and the products within `4u`), the bound `AttentionVerification` allows; NaN stays
  /// NaN and `±∞` becomes `±c`.
  @inline(__always)
  func capScores(_ row: UnsafeMutablePointer<Float>, count: Int) {
    guard let c = softcap else { return }
    let twoOverC = 2 / c
    var j = 0
    while j + 16 <= count {
      let x = UnsafeRawPointer(row + j).loadUnaligned(as: SIMD16<Float>.self)
      UnsafeMutableRawPointer(row + j).storeBytes(
        of: Self.softcap(x, c: c, twoOverC: twoOverC), as: SIMD16<Float>.self)
      j += 16
    }
    if j < count {
      var x = SIMD16<Float>(repeating: 0)
      for k in 0..<(count - j) { x[k] = row[j + k] }
      let y = Self.softcap(x, c: c, twoOverC: twoOverC)
      for k in 0..<(count - j) { row[j + k] = y[k] }
    }
  }

  @inline(__always)
  static func softcap(_ x: SIMD16<Float>, c: Float, twoOverC: Float) -> SIMD16<Float> {
    let negative = x .< 0
    let e = fastExp(x.replacing(with: -x, where: .!negative) * twoOverC)
    let magnitude = c * (1 - e) / (1 + e)
    // Sign from x; NaN propagates through e.
    return magnitude.replacing(with: -magnitude, where: negative)
  }

  /// Adds head `h`'s biases at `d = j − i_abs` to `row[0..<count]` (keys `firstKey …`): ALiBi's
  /// `slope_h·d` (one float32 product, as BLOOM computes it), T5's table entry.
  @inline(__always)
  func addPositionBias(
    to row: UnsafeMutablePointer<Float>, batch b: Int, query i: Int, firstKey: Int, count: Int
  ) {
    let h = head(b)
    let first = firstKey - (i + alignment)
    if let slopes {
      let slope = slopes[h]
      let steps = Self.steps
      var j = 0
      while j + 16 <= count {
        // slope·d as one float32 product, d exact below 2²⁴.
        let d = SIMD16<Float>(repeating: Float(first + j)) + steps
        let sum = UnsafeRawPointer(row + j).loadUnaligned(as: SIMD16<Float>.self) + slope * d
        UnsafeMutableRawPointer(row + j).storeBytes(of: sum, as: SIMD16<Float>.self)
        j += 16
      }
      while j < count {
        row[j] += slope * Float(first + j)
        j += 1
      }
    }
    guard let t5 else { return }
    let reach = t5Reach
    let width = 2 * reach + 1
    t5.withUnsafeBufferPointer { t in
      let table = t.baseAddress! + h * width
      // Keys with d < −R read table[0]; with d > R, table[2R]; between, table[d + R].
      let leftEnd = min(max(-reach - first, 0), count)
      let rightStart = min(max(reach + 1 - first, leftEnd), count)
      for j in 0..<leftEnd { row[j] += table[0] }
      let source = table + first + reach
      var j = leftEnd
      while j + 16 <= rightStart {
        let sum =
          UnsafeRawPointer(row + j).loadUnaligned(as: SIMD16<Float>.self)
          + UnsafeRawPointer(source + j).loadUnaligned(as: SIMD16<Float>.self)
        UnsafeMutableRawPointer(row + j).storeBytes(of: sum, as: SIMD16<Float>.self)
        j += 16
      }
      while j < rightStart {
        row[j] += source[j]
        j += 1
      }
      for j in rightStart..<count { row[j] += table[2 * reach] }
    }
  }
}
