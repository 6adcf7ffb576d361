import AttentionKit
import AttentionVerification
import Foundation

/// `attn bench --backward`: the tiled backward pass of a case, timed beside its forward pass.
extension BenchCase {
  /// The standard cases `--backward` runs by default.
  static let backwardOrder = ["attention", "causal", "dropout"]

  /// Whether `--backward` can time this case (plain attention: no relative positions, no layer).
  var hasBackward: Bool { maxDistance == nil && embedDim == nil }

  /// Checks the tiled backward's gradients on the float64 reference (one head group when the
  /// problem is larger than the reference's limit), then times, interleaved, the forward pass
  /// and the backward pass alone, given the forward's output and log-sum-exp (`--repeats` each).
  func runBackward(threads: Int, repeats: Int, warmup: Int, seed: UInt64) throws
    -> BackwardBenchResult
  {
    let memoryBefore = ProcessMemory.status()?.resident
    let peakReset = ProcessMemory.resetPeak()
    let keyShape = [batch, keyValueHeads ?? heads, length, headDim]
    let q = try Tensor.randomNormal(
      shape: [batch, heads, queryCount, headDim], seed: seed, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: keyShape, seed: seed, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: keyShape, seed: seed, stream: RandomStream.values)
    let dO = try Tensor.randomNormal(
      shape: [batch, heads, queryCount, headDim], seed: seed, stream: RandomStream.gradOutput)
    let drop = dropout > 0 ? try Dropout(probability: dropout, seed: seed) : nil
    let mask = self.mask
    let kernel = Attention.Kernel.tiled(TiledBackward.defaultConfiguration)
    // The forward saves each row's log-sum-exp; the backward takes it and the output, as a
    // training step does (and as PyTorch's backward reuses its saved forward).
    let forward = {
      try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, mask: mask, dropout: drop, kernel: kernel,
        threads: threads, needLogSumExp: true)
    }
    let saved = try forward()
    let backward = {
      try Attention.backward(
        queries: q, keys: k, values: v, gradOutput: dO, mask: mask, dropout: drop,
        output: saved.output, logSumExp: saved.logSumExp, kernel: kernel, threads: threads)
    }
    let first = try backward()
    // One head group is checked; a head beyond the float64 reference's limit (the 65,536-token
    // case) is timed unchecked, and says so (`checks` empty).
    let group = (heads / (keyValueHeads ?? heads)) * queryCount * length
    let checks =
      group <= GradientChecks.referenceScoreLimit
      ? try GradientChecks(
        queries: q, keys: k, values: v, gradOutput: dO, mask: mask, dropout: drop,
        needBiasGradient: false, seed: seed
      ).run(first, seed: seed, finiteDifferences: false) : []
    guard checks.allPassed else {
      throw AttentionError.invalidArgument(
        "\(name): the tiled backward disagrees with the float64 reference "
          + "(\(checks.filter { !$0.passed }.map(\.detail).joined(separator: "; "))); "
          + "not reporting its time")
    }
    for _ in 0..<warmup {
      _ = try forward()
      _ = try backward()
    }
    var forwardTimes: [Double] = []
    var backwardTimes: [Double] = []
    for _ in 0..<(self.repeats ?? repeats) {
      forwardTimes.append(try Stopwatch.measure(forward).seconds)
      backwardTimes.append(try Stopwatch.measure(backward).seconds)
    }
    let stepTimes = zip(forwardTimes, backwardTimes).map { $0 + $1 }
    let status = ProcessMemory.status()
    let forwardStats = Stopwatch.Statistics(forwardTimes).scaled(by: 1e3)
    let backwardStats = Stopwatch.Statistics(backwardTimes).scaled(by: 1e3)
    return BackwardBenchResult(
      name: name, shape: shapeText, forwardMs: forwardStats, backwardMs: backwardStats,
      forwardBackwardMs: Stopwatch.Statistics(stepTimes).scaled(by: 1e3),
      backwardTimesMs: backwardTimes.map { $0 * 1e3 },
      backwardOverForward: backwardStats.median / forwardStats.median,
      workspaceBytes: first.workspaceBytes, peakRssBytes: peakReset ? status?.peak : nil,
      rssBeforeBytes: memoryBefore, checks: checks.dictionary)
  }
}

/// One case's backward figures (`attn bench --backward --format json`).
struct BackwardBenchResult: Encodable {
  var name: String
  var shape: String
  /// The tiled forward (saving the log-sum-exp) and the backward alone (given the forward's
  /// output and log-sum-exp), interleaved; and their sum run by run, a training step's attention.
  var forwardMs: Stopwatch.Statistics
  var backwardMs: Stopwatch.Statistics
  var forwardBackwardMs: Stopwatch.Statistics
  var backwardTimesMs: [Double]
  var backwardOverForward: Double
  var workspaceBytes: Int
  var peakRssBytes: Int?
  var rssBeforeBytes: Int?
  var checks: [String: Bool]

  var line: String {
    let label = name.padding(toLength: 10, withPad: " ", startingAt: 0) + " " + shape
    return label.padding(toLength: 44, withPad: " ", startingAt: 0)
      + String(
        format: "forward %8.2f ms  backward %8.2f ms (mean %8.2f ± %6.2f)  forward+backward "
          + "%8.2f ms  backward/forward %4.2f (medians)",
        forwardMs.median, backwardMs.median, backwardMs.mean, backwardMs.standardDeviation,
        forwardBackwardMs.median, backwardOverForward)
      + "  workspace \(formatBytes(workspaceBytes))  peak RSS "
      + (peakRssBytes.map { formatBytes($0) } ?? "n/a")
      + (checks.isEmpty ? "  (unchecked: over the float64 reference's limit)" : "")
  }
}

struct BackwardBenchReport: Encodable {
  var openblasCore: String
  var threads: Int
  var cases: [BackwardBenchResult]
}
