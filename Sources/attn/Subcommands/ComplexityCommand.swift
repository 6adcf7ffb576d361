import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// `attn complexity`: exercise 2, the time and space complexity of self-attention, measured.
///
/// For n = min, 2·min, 4·min, … ≤ max it prints the notebook's two lines (the `n × n` matrix's
/// elements and its float32 megabytes), then times each kernel on random Q, K, V `[1, n, d]`:
/// the median of `--repeats` runs after a warm-up, GFLOP/s (`4·n²·d` flops: `2·n²·d` for Q·Kᵀ and
/// as many for weights·V), the kernel's workspace, the call's footprint (Q, K, V, output and
/// workspace) and the growth of the process's peak resident memory. It then fits `y ≈ c·nᵉ` to
/// time and memory per kernel (`PowerLawFit`, least squares on log–log) and sets the fitted
/// exponents beside the notebook's O(n²·d) time and O(n²) space.
struct ComplexityCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "complexity",
    abstract:
      "Exercise 2: attention's time and memory against sequence length, measured and fitted.",
    discussion: """
      For each n = --min-len, doubled until it passes --max-len, prints the n×n attention \
      matrix's size and float32 memory (as the notebook does), then runs each kernel on random \
      Q, K, V of shape [1, n, dModel]: the median time of --repeats runs after a warm-up, \
      GFLOP/s (4·n²·d flops), the workspace, the footprint (Q, K, V + output + workspace) and the \
      peak-RSS growth of the warm-up run. The materialized kernel's workspace is the n² matrix; \
      the tiled kernel's is a few tiles of at most Bq×Bk floats. A kernel the --max-memory budget cannot hold \
      at some n is skipped there, with a note.
      Then least-squares fits of log(time) and log(memory) against log(n) (LAPACKE dgels) give \
      each kernel's exponents: time ≈ n², materialized memory → n², tiled memory → n.
      --plot writes an SVG (memory and time against n, log–log, with n² reference lines). \
      --format csv prints one row per (seqLen, kernel); notes then go to stderr.
      """
  )

  /// Which kernels the sweep runs.
  enum Kernels: String, ExpressibleByArgument, CaseIterable {
    case materialized, tiled, both

    var list: [Attention.Kernel] {
      switch self {
      case .materialized: return [.materialized]
      case .tiled: return [.tiled(.default)]
      case .both: return [.materialized, .tiled(.default)]
      }
    }
  }

  enum Format: String, ExpressibleByArgument, CaseIterable {
    case text, json, csv
  }

  @Option(help: "Largest sequence length n.")
  var maxLen: Int = 2048

  @Option(help: "First sequence length n; the sweep doubles it until it passes --max-len.")
  var minLen: Int = 128

  @Option(name: .customLong("d-model"), help: "Head dimension D of Q, K and V ([1, n, D]).")
  var headDim: Int = 64

  @Option(help: "Kernels to measure: materialized, tiled or both.")
  var kernel: Kernels = .both

  @Option(help: "Timed runs per size and kernel (after one warm-up run); the median is reported.")
  var repeats: Int = 3

  @Option(help: "Seed for the random Q, K, V (Philox4x32-10).")
  var seed: UInt64 = 42

  @OptionGroup var execution: ExecutionOptions

  @Option(help: ArgumentHelp("Write the memory and time charts as SVG.", valueName: "path.svg"))
  var plot: String?

  @Option(help: "Output format: text, json or csv.")
  var format: Format = .text

  func validate() throws {
    guard minLen >= 1 else { throw ValidationError("--min-len must be ≥ 1, got \(minLen)") }
    guard maxLen >= 1 else { throw ValidationError("--max-len must be ≥ 1, got \(maxLen)") }
    guard minLen <= maxLen else {
      throw ValidationError("--min-len (\(minLen)) must not exceed --max-len (\(maxLen))")
    }
    try FlagLimits.check("--max-len", maxLen, in: 1...FlagLimits.sequenceLength)
    try FlagLimits.check("--d-model", headDim, in: 1...FlagLimits.dimension)
    try FlagLimits.check("--repeats", repeats, in: 1...FlagLimits.repeats)
    if let plot, plot.isEmpty { throw ValidationError("--plot needs a file path") }
  }

  /// n = min, 2·min, 4·min, … while n ≤ max.
  var sizes: [Int] {
    Array(sequence(first: minLen) { $0 <= maxLen / 2 ? $0 * 2 : nil })
  }

  var resolvedThreads: Int { execution.resolvedThreads }
  var memoryBudget: Int { execution.memoryBudget }

  func run() throws {
    // Fail on an unwritable --plot before a sweep that can take minutes, not after it.
    if let plot { try checkWritable(plot) }

    let sweep = try ComplexitySweep(command: self).run()
    let fits = ComplexityFits(rows: sweep.rows, kernels: kernel.list)
    let notes = sweep.notes + fits.notes

    switch format {
    case .text: printText(rows: sweep.rows, fits: fits, notes: notes)
    case .json: try printJSON(jsonReport(rows: sweep.rows, fits: fits, notes: notes))
    case .csv: printCSV(rows: sweep.rows, notes: notes)
    }
    if let plot {
      try writeAtomically(chart(rows: sweep.rows).document().bytes(), to: plot)
      if format == .text { print("\nPlot written to \(plot)") }
    }
  }
}
