/// A log–log line chart in plain characters, for a terminal or a log file.
///
/// Each series is drawn with its own symbol at its points, joined by dots; where two series share
/// a cell the cell shows `*`. Axes use `|`, `-` and `+` (at ticks), tick labels sit left of the y
/// axis and under the x axis, and a legend line closes the chart. No colour and no escape codes:
/// the output reads the same piped into a file. Positions share `LogAxis` with the SVG charts, so
/// a power law `c·xᵉ` is a straight line here too.
struct TerminalChart {
  struct Series {
    var name: String
    var symbol: Character
    var points: [(x: Double, y: Double)]
  }

  var series: [Series]
  var xLabel: String
  var yLabel: String
  var xBase = 2.0
  var yBase = 10.0
  /// The plot area in characters (columns × rows), axes and labels excluded.
  var width = 60
  var height = 16

  func render() -> String {
    let usable = series.map { s in
      Series(
        name: s.name, symbol: s.symbol,
        points: s.points.filter { $0.x > 0 && $0.y > 0 && $0.x.isFinite && $0.y.isFinite })
    }
    let xAxis = LogAxis(covering: usable.flatMap { $0.points.map(\.x) }, base: xBase, padding: 0.03)
    let yAxis = LogAxis(covering: usable.flatMap { $0.points.map(\.y) }, base: yBase, padding: 0.03)
    let columns = max(width, 10)
    let rows = max(height, 4)
    func column(_ x: Double) -> Int {
      min(max(Int((xAxis.fraction(x) * Double(columns - 1)).rounded()), 0), columns - 1)
    }
    func row(_ y: Double) -> Int {
      min(max(Int(((1 - yAxis.fraction(y)) * Double(rows - 1)).rounded()), 0), rows - 1)
    }

    var grid = [[Character]](repeating: [Character](repeating: " ", count: columns), count: rows)
    // Pass 1: the lines between points, as dots, stepping one cell at a time.
    for s in usable {
      for (a, b) in zip(s.points, s.points.dropFirst()) {
        let (c0, r0, c1, r1) = (column(a.x), row(a.y), column(b.x), row(b.y))
        let steps = max(abs(c1 - c0), abs(r1 - r0), 1)
        for step in 0...steps {
          let t = Double(step) / Double(steps)
          let c = Int((Double(c0) + t * Double(c1 - c0)).rounded())
          let r = Int((Double(r0) + t * Double(r1 - r0)).rounded())
          if grid[r][c] == " " { grid[r][c] = "." }
        }
      }
    }
    // Pass 2: the points themselves, over the dots; a cell claimed by two series shows `*`.
    var owner = [[Int?]](repeating: [Int?](repeating: nil, count: columns), count: rows)
    for (index, s) in usable.enumerated() {
      for point in s.points {
        let (r, c) = (row(point.y), column(point.x))
        if let other = owner[r][c], other != index {
          grid[r][c] = "*"
        } else {
          grid[r][c] = s.symbol
          owner[r][c] = index
        }
      }
    }

    // The y axis: a label at each tick's row.
    var tickLabels: [Int: String] = [:]
    for tick in yAxis.ticks() { tickLabels[row(tick)] = yAxis.label(tick) }
    let labelWidth = max(tickLabels.values.map(\.count).max() ?? 1, 1)
    func pad(_ text: String, to count: Int) -> String {
      String(repeating: " ", count: max(count - text.count, 0)) + text
    }
    var lines = [yLabel]
    for r in 0..<rows {
      let label =
        tickLabels[r].map { pad($0, to: labelWidth) + " +" }
        ?? String(repeating: " ", count: labelWidth) + " |"
      lines.append(label + String(grid[r]))
    }

    // The x axis: `+` at each tick, its label centred under it when there is room.
    var axis = [Character](repeating: "-", count: columns)
    var labels = [Character](repeating: " ", count: columns + 8)
    var nextFree = 0
    for tick in xAxis.ticks() {
      let c = column(tick)
      axis[c] = "+"
      let text = Array(xAxis.label(tick))
      let start = max(c - text.count / 2, 0)
      guard start >= nextFree, start + text.count <= labels.count else { continue }
      labels.replaceSubrange(start..<(start + text.count), with: text)
      nextFree = start + text.count + 1
    }
    let indent = String(repeating: " ", count: labelWidth + 1)
    lines.append(indent + "+" + String(axis))
    lines.append(indent + " " + String(labels).trimmingTrailingSpaces())
    lines.append(indent + " " + pad(xLabel, to: (columns + xLabel.count) / 2))
    lines.append(
      indent + " " + usable.map { "\($0.symbol) \($0.name)" }.joined(separator: "   ")
        + (usable.count > 1 ? "   * both" : ""))
    return lines.joined(separator: "\n")
  }
}

extension String {
  fileprivate func trimmingTrailingSpaces() -> String {
    var text = self
    while text.hasSuffix(" ") { text.removeLast() }
    return text
  }
}
