import Dispatch

/// Wall-clock timing of repeated runs; medians and minima, never a single run.
enum Stopwatch {
  /// Seconds taken by `body`.
  static func time(_ body: () throws -> Void) rethrows -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    try body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
  }

  /// Seconds taken by `body`, and its result, which is returned rather than dropped so that
  /// freeing it happens after the clock stops.
  static func measure<Result>(_ body: () throws -> Result) rethrows -> (
    seconds: Double, result: Result
  ) {
    let start = DispatchTime.now().uptimeNanoseconds
    let result = try body()
    return (Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9, result)
  }

  /// Summary statistics of repeated timings, as hyperfine reports them.
  struct Statistics: Encodable, Equatable {
    var mean, standardDeviation, min, median, max: Double

    /// The statistics of `values` (the sample standard deviation; 0 for fewer than two).
    init(_ values: [Double]) {
      let count = Double(values.count)
      let mean = values.isEmpty ? 0 : values.reduce(0, +) / count
      self.mean = mean
      let squares = values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) }
      standardDeviation = values.count > 1 ? (squares / (count - 1)).squareRoot() : 0
      min = values.min() ?? 0
      median = Stopwatch.median(values)
      max = values.max() ?? 0
    }

    /// Every figure multiplied by `factor` (seconds to milliseconds).
    func scaled(by factor: Double) -> Statistics {
      var copy = self
      (copy.mean, copy.standardDeviation) = (mean * factor, standardDeviation * factor)
      (copy.min, copy.median, copy.max) = (min * factor, median * factor, max * factor)
      return copy
    }
  }

  /// The middle value; the mean of the two middle values for an even count; 0 for none.
  static func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    guard !sorted.isEmpty else { return 0 }
    let middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
  }
}
