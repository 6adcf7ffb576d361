import Foundation

/// A two-sided acceptance interval for a binomial count, used to check that dropout drops the
/// share of weights it should.
///
/// For `X ~ Binomial(n, p)`, `interval(n:p:failureProbability:)` returns the narrowest `[low, high]`
/// built from the two exact tails with `P(X < low) ≤ α/2` and `P(X > high) ≤ α/2`, so a correct
/// implementation falls outside it with probability at most `α` (the CLI uses `α = 10⁻⁴`).
public enum BinomialBound {
  public static func interval(n: Int, p: Double, failureProbability alpha: Double) -> ClosedRange<
    Int
  > {
    if n == 0 || p <= 0 { return 0...0 }
    if p >= 1 { return n...n }
    let tail = alpha / 2
    // log P(X = k) = lgamma(n+1) − lgamma(k+1) − lgamma(n−k+1) + k·log p + (n−k)·log(1−p)
    let logP = log(p)
    let logQ = log1p(-p)
    let logN = logGamma(Double(n) + 1)
    func pmf(_ k: Int) -> Double {
      exp(
        logN - logGamma(Double(k) + 1) - logGamma(Double(n - k) + 1)
          + Double(k) * logP + Double(n - k) * logQ)
    }
    var low = 0
    var below = 0.0  // P(X < low)
    while low < n {
      let next = below + pmf(low)
      if next > tail { break }
      below = next
      low += 1
    }
    var high = n
    var above = 0.0  // P(X > high)
    while high > low {
      let next = above + pmf(high)
      if next > tail { break }
      above = next
      high -= 1
    }
    return low...high
  }
}

/// `log Γ(x)`; the Glibc overlay also offers a `(Double, Int)` overload that makes `lgamma` ambiguous.
private func logGamma(_ x: Double) -> Double {
  let value: Double = Foundation.lgamma(x)
  return value
}
