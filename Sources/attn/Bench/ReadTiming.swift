import AttentionKit
import Foundation
import TensorIO

/// `attn bench --read PATH`: how fast the subcommands' readers bring a file into tensors.
extension BenchCommand {
  /// `--read`: the file read `--repeats` times as the subcommands read it (straight into the
  /// tensors), after one untimed read that warms the page cache.
  func timeReading(_ path: String) throws {
    func readOnce() throws -> Int {
      path.hasSuffix(".safetensors")
        ? try SafeTensors.read(contentsOf: path).tensors.values.reduce(0) { $0 + $1.count }
        : try NPY.read(contentsOf: path).tensor.count
    }
    _ = try readOnce()
    let peakReset = ProcessMemory.resetPeak()
    let before = ProcessMemory.status()?.resident
    var times: [Double] = []
    for _ in 0..<repeats { times.append(try Stopwatch.measure(readOnce).seconds) }
    let peak = peakReset ? ProcessMemory.status()?.peak : nil
    let size =
      (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?
      .intValue ?? 0
    let stats = Stopwatch.Statistics(times)
    let reading = ReadReport(
      path: path, bytes: size, timeMs: stats.scaled(by: 1e3), timesMs: times.map { $0 * 1e3 },
      gbPerSecond: Double(size) / stats.median * 1e-9,
      peakRssGrowthBytes: peak.flatMap { peak in before.map { peak - $0 } })
    switch self.report.format {
    case .json: try printJSON(reading)
    case .text:
      let growth = reading.peakRssGrowthBytes.map { formatBytes($0) } ?? "n/a"
      print(
        String(
          format: "read %@ (%@): median %.1f ms (mean %.1f ± %.1f), %.2f GB/s, peak RSS +%@",
          path, formatBytes(size), stats.median * 1e3, stats.mean * 1e3,
          stats.standardDeviation * 1e3, reading.gbPerSecond, growth))
    }
  }
}

/// `attn bench --read PATH --format json`.
struct ReadReport: Encodable {
  var path: String
  var bytes: Int
  var timeMs: Stopwatch.Statistics
  var timesMs: [Double]
  var gbPerSecond: Double
  /// Growth of the peak resident memory over the timed reads (one tensor held at a time).
  var peakRssGrowthBytes: Int?
}
