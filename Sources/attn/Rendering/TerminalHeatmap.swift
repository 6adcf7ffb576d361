import Foundation

/// A heatmap of a small matrix in the terminal: two characters a cell, one line a row.
///
/// On a terminal it paints cells in viridis (true colour when `COLORTERM` says so, else the
/// 256-colour palette); otherwise (a pipe, a file, `NO_COLOR`) it uses a ramp of plain characters,
/// so logs stay readable.
struct TerminalHeatmap {
  enum Style { case trueColor, palette256, plain }

  static func detectStyle() -> Style {
    let environment = ProcessInfo.processInfo.environment
    guard isatty(STDOUT_FILENO) == 1, environment["NO_COLOR"] == nil,
      environment["TERM"] != "dumb"
    else { return .plain }
    let colorTerm = environment["COLORTERM"] ?? ""
    return colorTerm.contains("truecolor") || colorTerm.contains("24bit") ? .trueColor : .palette256
  }

  private static let ramp = Array(" .:-=+*#%@")

  /// `values` is `rows × columns`, row-major; colours run from `low` to `high`.
  static func render(
    _ values: [Float], rows: Int, columns: Int, low: Float = 0, high: Float? = nil,
    rowLabel: String = "query", columnLabel: String = "key", style: Style = detectStyle()
  ) -> String {
    let top = high ?? values.filter(\.isFinite).max() ?? 1
    let span = top > low ? Double(top - low) : 1
    let labelWidth = max(String(max(rows - 1, 0)).count, rowLabel.count)
    var lines: [String] = []
    let header = (0..<columns).map { String(format: "%2d", $0 % 100) }.joined()
    lines.append(
      String(repeating: " ", count: labelWidth + 1) + header + "  ← \(columnLabel)")
    for i in 0..<rows {
      var line = String(repeating: " ", count: labelWidth - String(i).count) + "\(i) "
      for j in 0..<columns {
        let t = Double(values[i * columns + j] - low) / span
        switch style {
        case .plain:
          // Clamped before converting: Int(±∞) traps, and non-finite inputs can make t infinite.
          let index = t.isNaN ? 0 : Int(min(max(t, 0), 1) * Double(ramp.count - 1) + 0.5)
          line += String(repeating: String(ramp[index]), count: 2)
        case .palette256:
          line += "\u{1B}[48;5;\(Viridis.xterm256(t))m  "
        case .trueColor:
          let c = Viridis.rgb(t)
          line += "\u{1B}[48;2;\(c.red);\(c.green);\(c.blue)m  "
        }
      }
      if style != .plain { line += "\u{1B}[0m" }
      lines.append(line)
    }
    lines.append(
      String(repeating: " ", count: labelWidth) + "↑ \(rowLabel);  scale: "
        + legend(style: style) + String(format: "  %.3g … %.3g", Double(low), Double(top)))
    return lines.joined(separator: "\n")
  }

  private static func legend(style: Style) -> String {
    switch style {
    case .plain: return "'" + String(ramp) + "'"
    case .palette256:
      return (0...8).map { "\u{1B}[48;5;\(Viridis.xterm256(Double($0) / 8))m " }.joined()
        + "\u{1B}[0m"
    case .trueColor:
      return (0...8).map {
        let c = Viridis.rgb(Double($0) / 8)
        return "\u{1B}[48;2;\(c.red);\(c.green);\(c.blue)m "
      }.joined() + "\u{1B}[0m"
    }
  }
}
