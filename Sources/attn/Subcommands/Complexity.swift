import ArgumentParser
import AttentionKit
import TensorIO
import Foundation

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

    var list: [KernelChoice] {
      switch self {
      case .materialized: return [.materialized]
      case .tiled: return [.tiled]
      case .both: return [.materialized, .tiled]
      }
    }
  }

  enum Format: String, ExpressibleByArgument, CaseIterable {
    case text, json, csv
  }

  /// The largest --max-len accepted: beyond it n² no longer fits comfortably in memory or time,
  /// and the sizes stay far from integer overflow.
  static let lengthLimit = 1 << 20

  @Option(help: "Largest sequence length n.")
  var maxLen: Int = 2048

  @Option(help: "First sequence length n; the sweep doubles it until it passes --max-len.")
  var minLen: Int = 128

  @Option(name: .customLong("d-model"), help: "Head dimension D of Q, K and V ([1, n, D]).")
  var modelDim: Int = 64

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
    guard maxLen <= Self.lengthLimit else {
      throw ValidationError("--max-len must be ≤ \(Self.lengthLimit), got \(maxLen)")
    }
    guard modelDim >= 1, modelDim <= 65536 else {
      throw ValidationError("--d-model must be in 1…65536, got \(modelDim)")
    }
    guard repeats >= 1 else { throw ValidationError("--repeats must be ≥ 1, got \(repeats)") }
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

  // MARK: Text

  private func printText(rows: [ComplexityRow], fits: ComplexityFits, notes: [String]) {
    let kernels = kernel.list.map(\.rawValue).joined(separator: " and ")
    print(
      "Exercise 2: attention complexity (d_model = \(modelDim); \(kernels); median of \(repeats) "
        + "run\(repeats == 1 ? "" : "s") after a warm-up; \(resolvedThreads) "
        + "thread\(resolvedThreads == 1 ? "" : "s"); memory budget \(formatBytes(memoryBudget)))")
    print("")
    let nameWidth = kernel.list.map(\.rawValue.count).max() ?? 0
    for row in rows {
      print(
        "Seq len \(row.n): Attention matrix size = \(row.n)x\(row.n) = "
          + "\(Self.grouped(row.elements)) elements")
      print("  Memory: \(String(format: "%.2f", row.theoreticalMB)) MB")
      for name in kernel.list {
        let label = name.rawValue.padding(toLength: nameWidth, withPad: " ", startingAt: 0)
        if let m = row.measurements[name] {
          let rss = m.rssGrowthBytes.map { "+" + formatBytes($0) } ?? "n/a"
          print(
            "    \(label)  "
              + String(format: "%10.3f ms  %7.2f GFLOP/s", m.timeMilliseconds, m.gflops)
              + "  workspace \(pad(formatBytes(m.workspaceBytes), 10))"
              + "  footprint \(pad(formatBytes(m.footprintBytes), 10))"
              + "  peak RSS \(rss)")
        } else if row.skipped.contains(name) {
          print("    \(label)  skipped: over the memory budget (see notes)")
        }
      }
    }
    print(
      "  (footprint = Q, K, V + output + workspace; peak RSS = growth of VmHWM in the warm-up run)")

    if !notes.isEmpty {
      print("\nNotes:")
      for note in notes { print("  - \(note)") }
    }

    if !fits.byKernel.isEmpty {
      print("\nPower-law fits y ≈ c·n^e (least squares of log y on log n, LAPACKE_dgels):")
      print(
        "  " + pad("kernel", nameWidth, left: true)
          + "   time        R²      footprint   R²      workspace   R²")
      for name in kernel.list {
        guard let fit = fits.byKernel[name] else { continue }
        func cell(_ f: PowerLawFit) -> String {
          pad("n^" + Self.twoDecimals(f.exponent), 9, left: true)
            + String(format: "   %.4f", f.rSquared)
        }
        print(
          "  \(pad(name.rawValue, nameWidth, left: true))   \(cell(fit.time))  "
            + "\(cell(fit.memory))  \(cell(fit.workspace))")
      }
    }

    let series = kernel.list.compactMap { name -> TerminalChart.Series? in
      let points = rows.compactMap { row in
        row.measurements[name].map { (x: Double(row.n), y: $0.timeMilliseconds) }
      }
      guard !points.isEmpty else { return nil }
      return TerminalChart.Series(
        name: name.rawValue, symbol: name == .materialized ? "M" : "T", points: points)
    }
    if !series.isEmpty {
      print("\nTime against sequence length (log–log):\n")
      print(
        TerminalChart(
          series: series, xLabel: "sequence length n (log2)", yLabel: "median time (ms, log10)"
        ).render())
    }

    print("\n=== Complexity Analysis ===")
    print("Time Complexity: O(n² × d) where n = sequence length, d = dimension")
    let timeParts = kernel.list.compactMap { name in
      fits.byKernel[name].map {
        "\(name.rawValue) time ∝ n^\(Self.twoDecimals($0.time.exponent)) "
          + "(R² \(String(format: "%.3f", $0.time.rSquared)))"
      }
    }
    if !timeParts.isEmpty { print("  measured: " + timeParts.joined(separator: "; ")) }
    print("Space Complexity: O(n²) for the attention matrix")
    let spaceParts = kernel.list.compactMap { name in
      fits.byKernel[name].map {
        "\(name.rawValue) memory ∝ n^\(Self.twoDecimals($0.memory.exponent)) "
          + "(R² \(String(format: "%.3f", $0.memory.rSquared))), "
          + "workspace ∝ n^\(Self.twoDecimals($0.workspace.exponent))"
      }
    }
    if !spaceParts.isEmpty { print("  measured: " + spaceParts.joined(separator: "; ")) }
    if let tail = fits.tailSlopes(rows: rows, kernels: kernel.list) {
      print("  " + tail)
      let blocks = TiledAttention.Configuration.default
      print(
        "  (the footprint also holds Q, K, V and the output, 4·n·d floats growing as n, and the "
          + "tiled kernel's\n   tiles, which stop growing at n = Bk = \(blocks.keyBlock): the "
          + "fitted exponents approach 2 and 1\n   as n grows past 4·d = \(4 * modelDim) and Bk)")
    }
    print("\nThis is why:")
    print("  - GPT-4 has a 128K context limit")
    print("  - Efficient attention variants exist (Flash Attention, Linear Attention)")
    print("  - Long sequences are expensive!")
  }

  private func pad(_ text: String, _ width: Int, left: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(width - text.count, 0))
    return left ? text + fill : fill + text
  }

  /// An exponent with two decimals, never `-0.00` (a constant's fitted slope is ±1e-17).
  static func twoDecimals(_ value: Double) -> String {
    let text = String(format: "%.2f", value)
    return text == "-0.00" ? "0.00" : text
  }

  /// `16384` → `16,384`, as Python's `{:,}`.
  static func grouped(_ value: Int) -> String {
    let digits = String(value.magnitude)
    var result = ""
    for (index, digit) in digits.enumerated() {
      if index > 0 && (digits.count - index) % 3 == 0 { result += "," }
      result.append(digit)
    }
    return value < 0 ? "-" + result : result
  }

  // MARK: JSON and CSV

  private func jsonReport(rows: [ComplexityRow], fits: ComplexityFits, notes: [String])
    -> ComplexityReport
  {
    ComplexityReport(
      settings: .init(
        minLen: minLen, maxLen: maxLen, dModel: modelDim, repeats: repeats, seed: seed,
        threads: resolvedThreads, memoryBudgetBytes: memoryBudget,
        kernels: kernel.list.map(\.rawValue)),
      rows: rows.map { row in
        ComplexityReport.Row(
          seqLen: row.n, elements: row.elements, theoreticalMb: row.theoreticalMB,
          kernels: Dictionary(
            uniqueKeysWithValues: row.measurements.map { name, m in
              (name.rawValue, ComplexityReport.KernelRow(m))
            }))
      },
      fit: Dictionary(
        uniqueKeysWithValues: fits.byKernel.map { name, fit in
          (name.rawValue, ComplexityReport.Fit(fit))
        }),
      notes: notes)
  }

  private func printCSV(rows: [ComplexityRow], notes: [String]) {
    print(
      "seq_len,kernel,elements,theoretical_mb,time_ms,gflops,workspace_bytes,footprint_bytes,"
        + "rss_growth_bytes")
    for row in rows {
      for name in kernel.list {
        guard let m = row.measurements[name] else { continue }
        let fields: [String] = [
          "\(row.n)", name.rawValue, "\(row.elements)", "\(row.theoreticalMB)",
          "\(m.timeMilliseconds)", "\(m.gflops)", "\(m.workspaceBytes)", "\(m.footprintBytes)",
          m.rssGrowthBytes.map(String.init) ?? "",
        ]
        print(fields.joined(separator: ","))
      }
    }
    // The table has no place for them, and a skipped kernel must not pass unnoticed.
    for note in notes { FileHandle.standardError.write(Data("attn: note: \(note)\n".utf8)) }
  }

  // MARK: Plot

  /// Two panels as the notebook's figure: memory against n, time against n; both log–log with an
  /// n² reference through the first measured point.
  private func chart(rows: [ComplexityRow]) -> LineChartSVG {
    let colors: [KernelChoice: String] = [.materialized: "#1f77b4", .tiled: "#d62728"]
    func panel(
      id: String, title: String, yLabel: String, value: (ComplexityMeasurement) -> Double
    ) -> LineChartSVG.Panel {
      var series: [LineChartSVG.Series] = []
      for name in kernel.list {
        let points = rows.compactMap { row in
          row.measurements[name].map { (x: Double(row.n), y: value($0)) }
        }
        guard !points.isEmpty else { continue }
        series.append(
          LineChartSVG.Series(
            name: name.rawValue, points: points, color: colors[name] ?? "black",
            marker: name == .materialized ? .circle : .square))
      }
      if let first = series.first?.points.first {
        // y = y₀·(n/n₀)², straight with slope 2 on log–log axes.
        let xs = rows.map { Double($0.n) }
        series.append(
          LineChartSVG.Series(
            name: "n² reference", points: xs.map { (x: $0, y: first.y * pow($0 / first.x, 2)) },
            color: "#555555", dashed: true, marker: .none, lineWidth: 1.5))
      }
      return LineChartSVG.Panel(
        id: id, title: title, xLabel: "sequence length n (log₂ scale)", yLabel: yLabel,
        series: series)
    }
    return LineChartSVG(
      title: "Attention complexity on the CPU (d_model = \(modelDim), "
        + "median of \(repeats) run\(repeats == 1 ? "" : "s"))",
      panels: [
        panel(
          id: "memory", title: "Memory footprint: O(n²) vs O(n)",
          yLabel: "Q, K, V + output + workspace (MiB)",
          value: { Double($0.footprintBytes) / 1_048_576 }),
        panel(
          id: "time", title: "Time: O(n² × d)", yLabel: "median time (ms)",
          value: { $0.timeMilliseconds }),
      ])
  }
}

// MARK: - The sweep
