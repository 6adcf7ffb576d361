import AttentionKit
import AttentionVerification
import Foundation

/// What `attn complexity` prints and draws from a sweep: the text report (one function per
/// section), the JSON report, the CSV table and the two-panel SVG.
extension ComplexityCommand {
  // MARK: Text

  func printText(rows: [ComplexityRow], fits: ComplexityFits, notes: [String]) {
    printHeader()
    printTable(rows)
    printNotes(notes)
    printFits(fits)
    printChart(rows)
    printAnalysis(rows: rows, fits: fits)
  }

  /// The settings in one line.
  private func printHeader() {
    let kernels = kernel.list.map(\.flagName).joined(separator: " and ")
    print(
      "Exercise 2: attention complexity (d_model = \(headDim); \(kernels); median of \(repeats) "
        + "run\(repeats == 1 ? "" : "s") after a warm-up; \(resolvedThreads) "
        + "thread\(resolvedThreads == 1 ? "" : "s"); memory budget \(formatBytes(memoryBudget)))")
    print("")
  }

  private var nameWidth: Int { kernel.list.map(\.flagName.count).max() ?? 0 }

  /// The notebook's two lines per n, then one line per kernel measured.
  private func printTable(_ rows: [ComplexityRow]) {
    for row in rows {
      print(
        "Seq len \(row.n): Attention matrix size = \(row.n)x\(row.n) = "
          + "\(Self.grouped(row.elements)) elements")
      print("  Memory: \(String(format: "%.2f", row.theoreticalMB)) MB")
      for name in kernel.list {
        let label = name.flagName.padding(toLength: nameWidth, withPad: " ", startingAt: 0)
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
  }

  private func printNotes(_ notes: [String]) {
    if !notes.isEmpty {
      print("\nNotes:")
      for note in notes { print("  - \(note)") }
    }
  }

  /// The fitted exponents and R² per kernel.
  private func printFits(_ fits: ComplexityFits) {
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
          "  \(pad(name.flagName, nameWidth, left: true))   \(cell(fit.time))  "
            + "\(cell(fit.memory))  \(cell(fit.workspace))")
      }
    }

  }

  /// Time against n on log–log axes, in the terminal.
  private func printChart(_ rows: [ComplexityRow]) {
    let series = kernel.list.compactMap { name -> TerminalChart.Series? in
      let points = rows.compactMap { row in
        row.measurements[name].map { (x: Double(row.n), y: $0.timeMilliseconds) }
      }
      guard !points.isEmpty else { return nil }
      return TerminalChart.Series(
        name: name.flagName, symbol: name == .materialized ? "M" : "T", points: points)
    }
    if !series.isEmpty {
      print("\nTime against sequence length (log–log):\n")
      print(
        TerminalChart(
          series: series, xLabel: "sequence length n (log2)", yLabel: "median time (ms, log10)"
        ).render())
    }

  }

  /// The notebook's closing analysis, with the measured exponents beside its O(·).
  private func printAnalysis(rows: [ComplexityRow], fits: ComplexityFits) {
    print("\n=== Complexity Analysis ===")
    print("Time Complexity: O(n² × d) where n = sequence length, d = dimension")
    let timeParts = kernel.list.compactMap { name in
      fits.byKernel[name].map {
        "\(name.flagName) time ∝ n^\(Self.twoDecimals($0.time.exponent)) "
          + "(R² \(String(format: "%.3f", $0.time.rSquared)))"
      }
    }
    if !timeParts.isEmpty { print("  measured: " + timeParts.joined(separator: "; ")) }
    print("Space Complexity: O(n²) for the attention matrix")
    let spaceParts = kernel.list.compactMap { name in
      fits.byKernel[name].map {
        "\(name.flagName) memory ∝ n^\(Self.twoDecimals($0.memory.exponent)) "
          + "(R² \(String(format: "%.3f", $0.memory.rSquared))), "
          + "workspace ∝ n^\(Self.twoDecimals($0.workspace.exponent))"
      }
    }
    if !spaceParts.isEmpty { print("  measured: " + spaceParts.joined(separator: "; ")) }
    if let tail = fits.tailSlopes(rows: rows, kernels: kernel.list) {
      print("  " + tail)
      // The key block the kernel fits to this head dimension (at the longest length).
      let keyBlock = TiledAttention.tile(
        queries: rows.last?.n ?? 1, keys: rows.last?.n ?? 1, headDim: headDim,
        batchCount: 1
      ).keys
      print(
        "  (the footprint also holds Q, K, V and the output, 4·n·d floats growing as n, and the "
          + "tiled kernel's\n   tiles, which stop growing at n = Bk = \(keyBlock): the "
          + "fitted exponents approach 2 and 1\n   as n grows past 4·d = \(4 * headDim) and Bk)")
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

  func jsonReport(rows: [ComplexityRow], fits: ComplexityFits, notes: [String])
    -> ComplexityReport
  {
    ComplexityReport(
      settings: .init(
        minLen: minLen, maxLen: maxLen, dModel: headDim, repeats: repeats, seed: seed,
        threads: resolvedThreads, memoryBudgetBytes: memoryBudget,
        kernels: kernel.list.map(\.flagName)),
      rows: rows.map { row in
        ComplexityReport.Row(
          seqLen: row.n, elements: row.elements, theoreticalMb: row.theoreticalMB,
          kernels: Dictionary(
            uniqueKeysWithValues: row.measurements.map { name, m in
              (name.flagName, ComplexityReport.KernelRow(m))
            }))
      },
      fit: Dictionary(
        uniqueKeysWithValues: fits.byKernel.map { name, fit in
          (name.flagName, ComplexityReport.Fit(fit))
        }),
      notes: notes)
  }

  func printCSV(rows: [ComplexityRow], notes: [String]) {
    print(
      "seq_len,kernel,elements,theoretical_mb,time_ms,gflops,workspace_bytes,footprint_bytes,"
        + "rss_growth_bytes")
    for row in rows {
      for name in kernel.list {
        guard let m = row.measurements[name] else { continue }
        let fields: [String] = [
          "\(row.n)", name.flagName, "\(row.elements)", "\(row.theoreticalMB)",
          "\(m.timeMilliseconds)", "\(m.gflops)", "\(m.workspaceBytes)", "\(m.footprintBytes)",
          m.rssGrowthBytes.map(String.init) ?? "",
        ]
        print(fields.joined(separator: ","))
      }
    }
    // The table has no place for them, and a skipped kernel must not pass unnoticed.
    for note in notes { StandardStreams.writeError("attn: note: \(note)") }
  }

  // MARK: Plot

  /// Two panels as the notebook's figure: memory against n, time against n; both log–log with an
  /// n² reference through the first measured point.
  func chart(rows: [ComplexityRow]) -> LineChartSVG {
    let colors: [Attention.Kernel: String] = [
      .materialized: "#1f77b4", .tiled(.default): "#d62728",
    ]
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
            name: name.flagName, points: points, color: colors[name] ?? "black",
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
      title: "Attention complexity on the CPU (d_model = \(headDim), "
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
