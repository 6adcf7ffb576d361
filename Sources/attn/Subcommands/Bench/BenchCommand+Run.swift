import AttentionKit

/// `attn bench`'s runs: the forward cases against the machine's limits, or the backward beside
/// the forward.
extension BenchCommand {
  /// Each case checked, then timed beside OpenBLAS's ceiling on its tiles.
  func runForward(_ selected: [BenchCase]) throws {
    let configuration = TiledAttention.Configuration(queryBlock: queryBlock, keyBlock: keyBlock)
    let threadCount = execution.resolvedThreads
    for benchCase in selected {
      try benchCase.checkMemory(
        configuration: configuration, threads: threadCount, execution: execution)
    }
    var results: [BenchResult] = []
    // The machine's limits with the cases' threads, before each case and after the last: the
    // highest of each holds (a probe that ran while the two vCPUs shared a core reads low).
    var limits = MachineLimits.measure(threads: threadCount)
    let progress = Progress()
    defer { progress.clear() }
    for benchCase in selected {
      progress.show("bench: \(benchCase.name) \(benchCase.shapeText)…")
      if !results.isEmpty {
        limits = limits.raised(to: MachineLimits.measure(threads: threadCount))
      }
      do {
        results.append(
          try benchCase.run(
            configuration: configuration, threads: threadCount, repeats: repeats,
            warmup: warmup, seed: seed))
      } catch {
        // The cases timed before the one that failed still print, against the limits so far.
        printText(results.map { $0.held(against: limits) }, limits, configuration, threadCount)
        throw error
      }
    }
    limits = limits.raised(to: MachineLimits.measure(threads: threadCount))
    results = results.map { $0.held(against: limits) }
    printText(results, limits, configuration, threadCount)
    if report.format == .json {
      try printJSON(
        BenchReport(
          openblasCore: BLAS.coreName, threads: threadCount,
          queryBlock: configuration.queryBlock, keyBlock: configuration.keyBlock, limits: limits,
          cases: results))
    }
  }

  /// The text report (nothing for `--format json`).
  private func printText(
    _ results: [BenchResult], _ limits: MachineLimits,
    _ configuration: TiledAttention.Configuration, _ threadCount: Int
  ) {
    guard report.format == .text else { return }
    print(
      "OpenBLAS core \(BLAS.coreName), \(threadCount) threads, tiles "
        + (configuration.fitsBlocks
          ? "fitted to each case (the ceiling's tile is the case's)"
          : "Bq \(configuration.queryBlock) × Bk \(configuration.keyBlock)"))
    print(limits.line + " (the highest measured around the cases)")
    for result in results { print(result.line) }
  }

  /// `--backward`: each case's tiled backward beside its forward.
  func runBackward(_ selected: [BenchCase]) throws {
    let threadCount = execution.resolvedThreads
    if report.format == .text { print("OpenBLAS core \(BLAS.coreName), \(threadCount) threads") }
    let progress = Progress()
    defer { progress.clear() }
    var results: [BackwardBenchResult] = []
    for benchCase in selected {
      progress.show("bench: backward \(benchCase.name) \(benchCase.shapeText)…")
      let result = try benchCase.runBackward(
        threads: threadCount, repeats: repeats, warmup: warmup, seed: seed)
      results.append(result)
      if report.format == .text { print(result.line) }
    }
    if report.format == .json {
      try printJSON(
        BackwardBenchReport(openblasCore: BLAS.coreName, threads: threadCount, cases: results))
    }
  }
}
