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

  /// The middle value; the mean of the two middle values for an even count; 0 for none.
  static func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    guard !sorted.isEmpty else { return 0 }
    let middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
  }
}
