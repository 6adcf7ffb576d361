import AttentionKit
import Foundation

/// One case's figures (`attn bench --format json`).
struct BenchResult: Encodable {
  var name: String
  var batch, heads, seqLen, dK: Int
  var p: Double
  var causal: Bool
  var maxRel: Int?
  var tq, kvHeads: Int
  var window: Int?
  var causalAlign: String
  var medianMs, minMs: Double
  /// Untimed runs before the timed ones (after the checking run).
  var warmup: Int
  /// Mean ± standard deviation, min, median and max of the timed runs, and every run's time.
  var timeMs: Stopwatch.Statistics
  var timesMs: [Double]
  /// The kernel's tile, on which the sgemm ceiling is measured.
  var tileRows, tileKeys: Int
  var gflops, sgemmGflops, ratioToSgemm: Double
  /// relpos, the score terms and a compact KV cache: plain attention of the same shape (relpos:
  /// with the same projections; a KV cache: on the float32 keys and values), and the case's time
  /// over it.
  var plainMedianMs: Double?
  var overPlain: Double?
  var workspaceBytes: Int
  /// The process's peak resident memory during this case (inputs included).
  var peakRssBytes: Int?
  var rssBeforeBytes: Int?
  var referenceErrorRatio: Double
  /// The KV cache's storage (`--kv-dtype`) when it is not float32.
  var kvDtype: String?
  /// `gflops` over the run's FMA peak (`MachineLimits`, `held(against:)`).
  var peakFraction: Double? = nil
  /// Memory-bound cases (decode): the bytes a run must read (`BenchCase.bytesRead`) per second,
  /// in billions, and over the run's read bandwidth; `nil` for the others.
  var gbPerSecond: Double?
  var bandwidthFraction: Double? = nil

  /// The result with its shares of `limits` (the run's, measured around its cases).
  func held(against limits: MachineLimits) -> BenchResult {
    var result = self
    result.peakFraction = gflops / limits.peakGflops
    result.bandwidthFraction = gbPerSecond.map { $0 / limits.bandwidthGBPerSecond }
    return result
  }

  var line: String {
    let peak = peakRssBytes.map { formatBytes($0) } ?? "n/a"
    var label = name.padding(toLength: 10, withPad: " ", startingAt: 0)
    label += " B\(batch) H\(heads)" + (kvHeads != heads ? "/\(kvHeads)" : "")
    label += tq != seqLen ? " Tq\(tq) Tk\(seqLen)" : " T\(seqLen)"
    label += " D\(dK)"
    if causal { label += causalAlign == "bottom-right" ? " causal-br" : " causal" }
    if let window { label += " W\(window)" }
    if p > 0 { label += " p\(Float(p))" }
    if let maxRel { label += " M\(maxRel)" }
    if let kvDtype { label += " kv \(kvDtype)" }
    var text = label.padding(toLength: max(44, label.count + 1), withPad: " ", startingAt: 0)
    text += String(
      format: "median %8.2f ms  (mean %8.2f ± %6.2f, min %8.2f, max %8.2f)  %6.1f GFLOP/s  "
        + "sgemm %6.1f  ratio %4.2f",
      medianMs, timeMs.mean, timeMs.standardDeviation, minMs, timeMs.max, gflops, sgemmGflops,
      ratioToSgemm)
    if let plainMedianMs, let overPlain {
      text += String(format: "  plain %7.2f ms (÷ plain %.2f)", plainMedianMs, overPlain)
    }
    if let peakFraction { text += String(format: "  %.0f%% of FMA peak", 100 * peakFraction) }
    if let gbPerSecond, let bandwidthFraction {
      text += String(
        format: "  %.1f GB/s = %.0f%% of read bandwidth", gbPerSecond, 100 * bandwidthFraction)
    }
    return text + "  workspace \(formatBytes(workspaceBytes))  peak RSS \(peak)"
  }
}
