import Foundation
import Testing
import _TestSupport

@testable import AttentionVerification

/// `BinomialBound.interval(n:p:failureProbability:)`: the narrowest `[low, high]` with
/// `P(X < low) ≤ α/2` and `P(X > high) ≤ α/2` for `X ~ Binomial(n, p)`.
@Suite("BinomialBound")
struct BinomialBoundTests {
  /// The pmf of Binomial(n, p), computed without lgamma (the implementation's method): terms
  /// relative to the mode by the ratio recurrence `P(k+1)/P(k) = (n−k)/(k+1)·p/(1−p)`, then
  /// normalized by their sum. Terms below 10⁻³⁰⁰ of the mode underflow to 0, which is far below
  /// any tail these tests compare.
  static func pmf(n: Int, p: Double) -> [Double] {
    let mode = min(n, Int((Double(n + 1) * p).rounded(.down)))
    var terms = [Double](repeating: 0, count: n + 1)
    terms[mode] = 1
    let odds = p / (1 - p)
    if mode < n {
      for k in mode..<n { terms[k + 1] = terms[k] * Double(n - k) / Double(k + 1) * odds }
    }
    if mode > 0 {
      for k in stride(from: mode, to: 0, by: -1) {
        terms[k - 1] = terms[k] * Double(k) / Double(n - k + 1) / odds
      }
    }
    // Sum the smallest first, for accuracy.
    let total = terms.sorted().reduce(0, +)
    return terms.map { $0 / total }
  }

  static let grid: [(n: Int, p: Double, alpha: Double)] = {
    var cases: [(Int, Double, Double)] = []
    for n in [1, 2, 5, 10, 37, 100, 500, 1000] {
      for p in [0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999] {
        for alpha in [0.3, 0.05, 1e-4, 1e-6] { cases.append((n, p, alpha)) }
      }
    }
    return cases
  }()

  /// The defining property, checked with the independent pmf: `low` is the largest value whose
  /// lower tail `P(X < low)` is at most α/2, `high` the smallest (≥ low) whose upper tail
  /// `P(X > high)` is. A relative slack of 10⁻⁹ absorbs rounding in either computation.
  @Test("The interval's tails are at most α/2 and cannot be narrowed (exact tails)")
  func exactTails() {
    var failures: [String] = []
    for (n, p, alpha) in Self.grid {
      let interval = BinomialBound.interval(n: n, p: p, failureProbability: alpha)
      let (low, high) = (interval.lowerBound, interval.upperBound)
      let pmf = Self.pmf(n: n, p: p)
      let tail = alpha / 2
      let below = pmf[0..<low].reduce(0, +)  // P(X < low)
      let belowNext = below + pmf[low]  // P(X < low + 1)
      let above = high < n ? pmf[(high + 1)...].reduce(0, +) : 0  // P(X > high)
      let aboveNext = above + pmf[high]  // P(X > high − 1)
      let ok =
        low >= 0 && high <= n && low <= high
        && below <= tail * (1 + 1e-9)
        && (low == n || belowNext > tail * (1 - 1e-9))
        && above <= tail * (1 + 1e-9)
        && (high == low || aboveNext > tail * (1 - 1e-9))
      if !ok {
        failures.append(
          "n \(n) p \(p) α \(alpha): \(interval), P(X<low) \(below), P(X≤low) \(belowNext), "
            + "P(X>high) \(above), P(X≥high) \(aboveNext)")
      }
    }
    #expect(failures.isEmpty, "\(failures.count) of \(Self.grid.count): \(failures.prefix(3))")
  }

  /// Values from scipy 1.17.1 (`scipy.stats.binom`), computed as
  ///   low  = max{k : binom.cdf(k − 1, n, p) ≤ α/2},
  ///   high = min{k ≥ low : binom.sf(k, n, p) ≤ α/2}
  /// over k = 0…n with numpy arrays (`/tmp/binom.py` in the session that wrote this test).
  /// 0.10000000149011612 is Float(0.1), the p the CLI passes for `--p 0.1`. The tails at these
  /// bounds are at least 0.5 % away from α/2, so rounding cannot flip them.
  @Test(
    "Large n agrees with scipy.stats.binom",
    arguments: [
      (10, 0.5, 0.05, 2, 8),
      (100, 0.1, 1e-4, 1, 23),
      (1000, 0.25, 1e-6, 185, 319),
      (16, 0.10000000149011612, 1e-4, 0, 8),
      (262_144, 0.5, 1e-6, 129_820, 132_324),
      (262_144, 0.10000000149011612, 1e-6, 25_466, 26_969),
      (262_144, 0.9, 1e-6, 235_175, 236_678),
      (1_000_000, 0.001, 1e-6, 849, 1_158),
      (50, 0.02, 0.5, 0, 2),
      (1, 0.5, 1e-6, 0, 1),
      (20_000, 0.999, 1e-4, 19_960, 19_995),
    ] as [(Int, Double, Double, Int, Int)])
  func scipyValues(n: Int, p: Double, alpha: Double, low: Int, high: Int) {
    let interval = BinomialBound.interval(n: n, p: p, failureProbability: alpha)
    #expect(interval == low...high, "n \(n) p \(p) α \(alpha): \(interval), scipy \(low)...\(high)")
  }

  @Test("Edge cases: p = 0, p = 1, n = 0")
  func edges() {
    for n in [0, 1, 10, 1_000_000] {
      #expect(BinomialBound.interval(n: n, p: 0, failureProbability: 1e-6) == 0...0, "n \(n) p 0")
      #expect(BinomialBound.interval(n: n, p: 1, failureProbability: 1e-6) == n...n, "n \(n) p 1")
    }
    for p in [0.0, 0.1, 0.5, 1.0] {
      #expect(BinomialBound.interval(n: 0, p: p, failureProbability: 1e-4) == 0...0, "n 0 p \(p)")
    }
  }

  @Test("A smaller α never narrows the interval")
  func monotoneInAlpha() {
    for (n, p) in [(100, 0.3), (262_144, 0.5), (5_000, 0.01)] {
      let wide = BinomialBound.interval(n: n, p: p, failureProbability: 1e-9)
      let narrow = BinomialBound.interval(n: n, p: p, failureProbability: 1e-2)
      #expect(
        wide.lowerBound <= narrow.lowerBound && wide.upperBound >= narrow.upperBound,
        "n \(n) p \(p): α 1e-9 \(wide), α 1e-2 \(narrow)")
    }
  }
}
