import Dispatch
import Foundation

/// Whether the machine's threads really run in parallel right now: a short fused-multiply-add
/// loop timed on one thread, then on `threads` threads at once. On `threads` free cores the
/// second reaches `threads` times the first's rate; when the vCPUs share a physical core (or
/// another process holds one), the ratio drops towards 1. Benchmarks run the probe before each
/// slot and discard the slots where it fell short (`Scripts/compare/compare_pytorch.py`).
enum CoreProbe {
  struct Result: Encodable {
    /// Multiply-adds per second on one thread, in billions.
    var singleGflops: Double
    /// The same on `threads` threads at once, in total.
    var parallelGflops: Double
    var threads: Int
    /// `parallel / single`: `threads` on free cores.
    var scaling: Double

    /// The text report: the FMA rate (twice the multiply-add rate) on 1 and N threads.
    var line: String {
      String(
        format: "FMA rate: %.1f GFLOP/s on 1 thread, %.1f on %d (%.2f×)", 2 * singleGflops,
        2 * parallelGflops, threads, scaling)
    }
  }

  /// Runs the probe: about `seconds` of work per measurement.
  static func run(threads: Int, seconds: Double = 0.05) -> Result {
    let iterations = calibrate(seconds: seconds)
    let single = rate(threads: 1, iterations: iterations)
    let parallel = rate(threads: threads, iterations: iterations)
    return Result(
      singleGflops: single, parallelGflops: parallel, threads: threads, scaling: parallel / single)
  }

  /// Iterations of `kernel` that take about `seconds` on one thread.
  private static func calibrate(seconds: Double) -> Int {
    var iterations = 1 << 16
    while true {
      let elapsed = Stopwatch.time { blackHole(kernel(iterations)) }
      if elapsed >= seconds / 4 || iterations >= 1 << 30 {
        return max(1, Int(Double(iterations) * seconds / max(elapsed, 1e-9)))
      }
      iterations *= 4
    }
  }

  /// Billions of multiply-adds per second on `threads` threads, each running `iterations`.
  private static func rate(threads: Int, iterations: Int) -> Double {
    let elapsed = Stopwatch.time {
      DispatchQueue.concurrentPerform(iterations: threads) { _ in blackHole(kernel(iterations)) }
    }
    // Eight independent chains of 16 lanes: 128 multiply-adds per iteration and thread.
    return Double(threads * iterations * 128) / elapsed * 1e-9
  }

  /// Eight independent FMA chains, so the loop is bound by FMA throughput, not latency.
  @inline(never)
  private static func kernel(_ iterations: Int) -> Float {
    let m = SIMD16<Float>(repeating: 0.999_999)
    let c = SIMD16<Float>(repeating: 1e-7)
    var a = (
      SIMD16<Float>(repeating: 1), SIMD16<Float>(repeating: 2), SIMD16<Float>(repeating: 3),
      SIMD16<Float>(repeating: 4), SIMD16<Float>(repeating: 5), SIMD16<Float>(repeating: 6),
      SIMD16<Float>(repeating: 7), SIMD16<Float>(repeating: 8)
    )
    for _ in 0..<iterations {
      a.0 = a.0.addingProduct(a.0, m) - c
      a.1 = a.1.addingProduct(a.1, m) - c
      a.2 = a.2.addingProduct(a.2, m) - c
      a.3 = a.3.addingProduct(a.3, m) - c
      a.4 = a.4.addingProduct(a.4, m) - c
      a.5 = a.5.addingProduct(a.5, m) - c
      a.6 = a.6.addingProduct(a.6, m) - c
      a.7 = a.7.addingProduct(a.7, m) - c
    }
    return (a.0 + a.1 + a.2 + a.3 + a.4 + a.5 + a.6 + a.7).sum()
  }

  /// Keeps `value` alive, so that the work computing it cannot be elided.
  @inline(never)
  static func blackHole(_ value: Float) {
    if value == .infinity { print("", terminator: "") }
  }
}
