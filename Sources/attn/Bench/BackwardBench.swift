import AttentionKit
import AttentionVerification
import Foundation

/// `attn bench --backward`: the tiled backward pass of a case, timed beside its forward pass.
extension BenchCase {
  /// The standard cases `--backward` runs by default.
  static let backwardOrder = ["attention", "causal", "dropout"]

  /// Whether `--backward` can time this case (bare attention, score terms included: no relative
  /// positions, no layer).
  var hasBackward: Bool { maxDistance == nil && embedDim == nil }

  /// Checks the tiled backward's gradients on the float64 reference (one head group when the
  /// problem is larger than the reference's limit; a score-term case always on one head group,
  /// `GradientChecks` with the terms), then times, interleaved, the forward pass and the backward pass
  /// alone, given the forward's output and log-sum-exp (`--repeats` each); a score-term case
  /// also the same without its terms, for the overhead over plain attention.
  func runBackward(threads: Int, repeats: Int, warmup: Int, seed: UInt64) throws
    -> BackwardBenchResult
  {
    let memoryBefore = ProcessMemory.status()?.resident
    let peakReset = ProcessMemory.resetPeak()
    let (q, k, v) = try randomInputs(seed: seed)
    let dO = try Tensor.randomNormal(
      shape: [batch, heads, queryCount, headDim], seed: seed, stream: RandomStream.gradOutput)
    let drop = dropout > 0 ? try Dropout(probability: dropout, seed: seed) : nil
    let mask = self.mask
    let terms = try term?.terms(heads: heads, causal: causal, seed: seed) ?? .none
    let kernel = Attention.Kernel.tiled(TiledBackward.defaultConfiguration)
    // The forward saves each row's log-sum-exp; the backward takes it and the output, as a
    // training step does (and as PyTorch's backward reuses its saved forward).
    func step(_ terms: ScoreTerms) throws -> TrainingPass {
      let forward = {
        try Attention.scaledDotProduct(
          queries: q, keys: k, values: v, mask: mask, dropout: drop, terms: terms,
          kernel: kernel, threads: threads, needLogSumExp: true)
      }
      let saved = try forward()
      let backward = {
        try Attention.backward(
          queries: q, keys: k, values: v, gradOutput: dO, mask: mask, dropout: drop,
          terms: terms, output: saved.output, logSumExp: saved.logSumExp, kernel: kernel,
          threads: threads)
      }
      return TrainingPass(forward: forward, backward: backward)
    }
    let work = try step(terms)
    let first = try work.backward()
    // One head group is checked; a group beyond the float64 reference's limit (the
    // 65,536-token case) is timed unchecked, and says so (`checks` empty).
    let group = (heads / (keyValueHeads ?? heads)) * queryCount * length
    var checks: [Check] = []
    if group <= GradientChecks.referenceScoreLimit {
      // With score terms, the checked heads' parameters too (one batch element).
      checks = try GradientChecks(
        queries: q, keys: k, values: v, gradOutput: dO, mask: mask, dropout: drop,
        needBiasGradient: false, seed: seed, terms: terms
      ).run(first, seed: seed, finiteDifferences: false)
      if terms.softcap != nil {
        checks.append(
          try Self.bentSoftcap(
            terms: terms, heads: heads, causal: causal, kernel: kernel, threads: threads,
            seed: seed))
      }
    }
    guard checks.allPassed else {
      throw AttentionError.invalidArgument(
        "\(name): the tiled backward disagrees with the float64 reference "
          + "(\(checks.filter { !$0.passed }.map(\.detail).joined(separator: "; "))); "
          + "not reporting its time")
    }
    // A score-term case: plain attention on the same inputs, interleaved with it.
    let plain = term == nil ? nil : try step(.none)
    for _ in 0..<warmup {
      for pass in [work] + (plain.map { [$0] } ?? []) {
        _ = try pass.forward()
        _ = try pass.backward()
      }
    }
    var times = (
      forward: [Double](), backward: [Double](), plain: [Double](), plainStep: [Double]()
    )
    for run in 0..<(self.repeats ?? repeats) {
      // With plain attention beside it, the order alternates run by run.
      let plainFirst = run % 2 == 1
      let before = plainFirst ? try plain?.time() : nil
      let own = try work.time()
      let after = plainFirst ? nil : try plain?.time()
      times.forward.append(own.forward)
      times.backward.append(own.backward)
      if let other = before ?? after {
        times.plain.append(other.backward)
        times.plainStep.append(other.forward + other.backward)
      }
    }
    let status = ProcessMemory.status()
    let ms = { (values: [Double]) in Stopwatch.Statistics(values).scaled(by: 1e3) }
    let stepTimes = zip(times.forward, times.backward).map { $0 + $1 }
    let (forwardStats, backwardStats, stepStats) = (
      ms(times.forward), ms(times.backward), ms(stepTimes)
    )
    let plainBackward = plain == nil ? nil : ms(times.plain)
    let plainStep = plain == nil ? nil : ms(times.plainStep)
    return BackwardBenchResult(
      name: name, shape: shapeText, forwardMs: forwardStats, backwardMs: backwardStats,
      forwardBackwardMs: stepStats, backwardTimesMs: times.backward.map { $0 * 1e3 },
      backwardOverForward: backwardStats.median / forwardStats.median,
      plainBackwardMs: plainBackward, plainForwardBackwardMs: plainStep,
      backwardOverPlain: plainBackward.map { backwardStats.median / $0.median },
      forwardBackwardOverPlain: plainStep.map { stepStats.median / $0.median },
      workspaceBytes: first.workspaceBytes, peakRssBytes: peakReset ? status?.peak : nil,
      rssBeforeBytes: memoryBefore, checks: checks.dictionary,
      checked: checks.isEmpty
        ? "nothing: one head group is over the float64 reference's limit"
        : checks.map { "\($0.name): \($0.detail)" }.joined(separator: "; "))
  }
}

/// One side of a backward bench: the forward (saving the log-sum-exp) and the backward given
/// its output and log-sum-exp.
struct TrainingPass {
  var forward: () throws -> AttentionResult
  var backward: () throws -> AttentionGradients

  /// The seconds of one forward, then of one backward.
  func time() throws -> (forward: Double, backward: Double) {
    (try Stopwatch.measure(forward).seconds, try Stopwatch.measure(backward).seconds)
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
  /// A score-term case: plain attention's backward and forward + backward on the same inputs,
  /// interleaved with the case's, and the case's medians over them.
  var plainBackwardMs: Stopwatch.Statistics?
  var plainForwardBackwardMs: Stopwatch.Statistics?
  var backwardOverPlain: Double?
  var forwardBackwardOverPlain: Double?
  var workspaceBytes: Int
  var peakRssBytes: Int?
  var rssBeforeBytes: Int?
  var checks: [String: Bool]
  /// Each check's figures and what the float64 reference covered, in words.
  var checked: String

  var line: String {
    let label = name.padding(toLength: 10, withPad: " ", startingAt: 0) + " " + shape
    return label.padding(toLength: 44, withPad: " ", startingAt: 0)
      + String(
        format: "forward %8.2f ms  backward %8.2f ms (mean %8.2f ± %6.2f)  forward+backward "
          + "%8.2f ms  backward/forward %4.2f (medians)",
        forwardMs.median, backwardMs.median, backwardMs.mean, backwardMs.standardDeviation,
        forwardBackwardMs.median, backwardOverForward)
      + (backwardOverPlain.map { String(format: "  ÷ plain: backward %.2f", $0) } ?? "")
      + (forwardBackwardOverPlain.map { String(format: ", forward+backward %.2f", $0) } ?? "")
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
