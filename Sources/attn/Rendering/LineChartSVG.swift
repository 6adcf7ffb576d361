import Foundation

/// Line charts on log–log axes as SVG: one or more panels side by side under a title, each with
/// labelled axes, tick labels, a grid, its series (lines with markers, or dashed reference lines)
/// and a legend.
///
/// On log axes a power law `y = c·xᵉ` is a straight line of slope `e`, which is why the complexity
/// sweep is drawn this way: n² and n differ in slope, not in curvature. Points that a log axis
/// cannot place (zero, negative, non-finite) are left out.
struct LineChartSVG {
  /// One line of a panel.
  struct Series {
    enum Marker { case none, circle, square }

    var name: String
    var points: [(x: Double, y: Double)]
    /// Any SVG colour, e.g. `#1f77b4`.
    var color: String
    var dashed = false
    var marker: Marker = .circle
    var lineWidth = 2.0
  }

  /// One chart: its own axes, series and legend.
  struct Panel {
    /// The `id` of the panel's `<g>`, for styling and for tests.
    var id: String
    var title: String
    var xLabel: String
    var yLabel: String
    /// Where ticks go: powers of `xBase` on x (2 for sizes), of `yBase` on y (10 for measures).
    var xBase = 2.0
    var yBase = 10.0
    var series: [Series]
  }

  var title: String
  var panels: [Panel]
  var panelWidth = 470.0
  var panelHeight = 370.0

  /// The chart as a document; `render()` or `bytes()` it.
  func document() -> SVGDocument {
    let titleHeight = 44.0
    var svg = SVGDocument(
      width: panelWidth * Double(max(panels.count, 1)), height: titleHeight + panelHeight,
      ["font-family": "DejaVu Sans, Helvetica, Arial, sans-serif", "font-size": "12"])
    svg.rect(x: 0, y: 0, width: svg.width, height: svg.height, ["fill": "white"])
    svg.text(
      title, x: svg.width / 2, y: 28,
      ["text-anchor": "middle", "font-size": "16", "font-weight": "bold"])
    for (index, panel) in panels.enumerated() {
      let frame = Frame(
        x: Double(index) * panelWidth, y: titleHeight, width: panelWidth, height: panelHeight)
      draw(panel, in: frame, on: &svg)
    }
    return svg
  }

  private struct Frame {
    var x, y, width, height: Double
  }

  private func draw(_ panel: Panel, in frame: Frame, on svg: inout SVGDocument) {
    // The plot area inside the panel: room on the left for y tick labels and the rotated label,
    // at the bottom for x tick labels and the label, at the top for the panel title.
    let left = frame.x + 74
    let right = frame.x + frame.width - 18
    let top = frame.y + 30
    let bottom = frame.y + frame.height - 48
    let series = panel.series.map { s in
      var copy = s
      copy.points = s.points.filter { $0.x > 0 && $0.y > 0 && $0.x.isFinite && $0.y.isFinite }
      return copy
    }
    let xAxis = LogAxis(covering: series.flatMap { $0.points.map(\.x) }, base: panel.xBase)
    let yAxis = LogAxis(covering: series.flatMap { $0.points.map(\.y) }, base: panel.yBase)
    func px(_ x: Double) -> Double { left + xAxis.fraction(x) * (right - left) }
    func py(_ y: Double) -> Double { bottom - yAxis.fraction(y) * (bottom - top) }

    svg.group(["id": panel.id], title: panel.title) { g in
      g.text(
        panel.title, x: (left + right) / 2, y: frame.y + 18,
        ["text-anchor": "middle", "font-size": "14", "font-weight": "bold"])
      g.rect(
        x: left, y: top, width: right - left, height: bottom - top,
        ["fill": "#fbfbfb", "stroke": "none"])

      // Grid and ticks.
      g.group(["class": "x-axis"]) { a in
        for tick in xAxis.ticks() {
          let x = px(tick)
          a.line(x1: x, y1: top, x2: x, y2: bottom, ["stroke": "#dddddd", "stroke-width": "1"])
          a.line(x1: x, y1: bottom, x2: x, y2: bottom + 5, ["stroke": "#333333"])
          a.text(xAxis.label(tick), x: x, y: bottom + 18, ["text-anchor": "middle"])
        }
        a.text(
          panel.xLabel, x: (left + right) / 2, y: bottom + 38,
          ["text-anchor": "middle", "font-size": "13"])
      }
      g.group(["class": "y-axis"]) { a in
        for tick in yAxis.ticks() {
          let y = py(tick)
          a.line(x1: left, y1: y, x2: right, y2: y, ["stroke": "#dddddd", "stroke-width": "1"])
          a.line(x1: left - 5, y1: y, x2: left, y2: y, ["stroke": "#333333"])
          a.text(
            yAxis.label(tick), x: left - 8, y: y + 4, ["text-anchor": "end", "font-size": "11"])
        }
        let midY = (top + bottom) / 2
        a.text(
          panel.yLabel, x: frame.x + 16, y: midY,
          [
            "text-anchor": "middle", "font-size": "13",
            "transform": "rotate(-90 \(SVG.number(frame.x + 16)) \(SVG.number(midY)))",
          ])
      }
      g.rect(
        x: left, y: top, width: right - left, height: bottom - top,
        ["fill": "none", "stroke": "#333333", "stroke-width": "1"])

      // Series: reference lines (dashed) first, so measured lines paint over them.
      let ordered = series.filter(\.dashed) + series.filter { !$0.dashed }
      for s in ordered where !s.points.isEmpty {
        g.group(["class": "series"], title: s.name) { sg in
          var style: SVGAttributes = [
            "stroke": s.color, "stroke-width": SVG.number(s.lineWidth),
            "stroke-linejoin": "round",
          ]
          if s.dashed { style["stroke-dasharray"] = "6 4" }
          sg.polyline(points: s.points.map { (px($0.x), py($0.y)) }, style)
          for point in s.points {
            Self.marker(s.marker, x: px(point.x), y: py(point.y), color: s.color, on: &sg)
          }
        }
      }

      legend(series.filter { !$0.points.isEmpty }, x: left + 10, y: top + 10, on: &g)
    }
  }

  /// A framed legend whose top-left corner is at (x, y): a line sample, the marker, the name.
  private func legend(_ series: [Series], x: Double, y: Double, on svg: inout SVGDocument) {
    guard !series.isEmpty else { return }
    let rowHeight = 18.0
    // No text metrics in SVG without a renderer: about 6.6 px per character at 12 px.
    let longest = series.map(\.name.count).max() ?? 0
    let width = 44 + Double(longest) * 6.6
    svg.group(["class": "legend"]) { g in
      g.rect(
        x: x, y: y, width: width, height: Double(series.count) * rowHeight + 8,
        ["fill": "white", "fill-opacity": "0.9", "stroke": "#999999", "stroke-width": "0.8"])
      for (index, s) in series.enumerated() {
        let rowY = y + 4 + (Double(index) + 0.5) * rowHeight
        var style: SVGAttributes = ["stroke": s.color, "stroke-width": SVG.number(s.lineWidth)]
        if s.dashed { style["stroke-dasharray"] = "6 4" }
        g.line(x1: x + 6, y1: rowY, x2: x + 32, y2: rowY, style)
        Self.marker(s.marker, x: x + 19, y: rowY, color: s.color, on: &g)
        g.text(s.name, x: x + 38, y: rowY + 4)
      }
    }
  }

  private static func marker(
    _ marker: Series.Marker, x: Double, y: Double, color: String, on svg: inout SVGDocument
  ) {
    switch marker {
    case .none: break
    case .circle: svg.circle(cx: x, cy: y, r: 3.5, ["fill": color])
    case .square: svg.rect(x: x - 3.5, y: y - 3.5, width: 7, height: 7, ["fill": color])
    }
  }
}

/// A logarithmic axis: positions are linear in `log v` between `low` and `high`, and ticks sit on
/// powers of `base` (with 2× and 5× steps in between when a base-10 axis spans under 2 decades).
struct LogAxis {
  let base: Double
  let low: Double
  let high: Double

  /// The smallest range holding every positive finite value, widened by `padding` of its log
  /// span on each side so that no point sits on the frame (and by a factor `base` each way
  /// when all values are equal).
  init(covering values: [Double], base: Double, padding: Double = 0.06) {
    self.base = base
    let usable = values.filter { $0 > 0 && $0.isFinite }
    var lo = usable.min() ?? 1
    var hi = usable.max() ?? base
    if lo == hi {
      lo /= base
      hi *= base
    }
    let span = log(hi / lo)
    low = lo * exp(-padding * span)
    high = hi * exp(padding * span)
  }

  /// Where `value` falls, 0 at `low` and 1 at `high`.
  func fraction(_ value: Double) -> Double { log(value / low) / log(high / low) }

  /// Tick values inside the range, at most about 10.
  func ticks() -> [Double] {
    let first = Int(floor(log(low) / log(base)))
    let last = Int(ceil(log(high) / log(base)))
    let powers = (first...last).map { pow(base, Double($0)) }.filter(contains)
    if base == 10 && powers.count < 3 {
      let steps = powers.count < 2 ? [1.0, 2, 3, 5] : [1.0, 2, 5]
      let dense = (first...last).flatMap { k in steps.map { $0 * pow(10, Double(k)) } }
        .filter(contains)
      if dense.count >= 2 { return dense }
    }
    guard powers.count > 10 else { return powers }
    let stride = (powers.count + 9) / 10
    return powers.enumerated().filter { $0.offset % stride == 0 }.map(\.element)
  }

  private func contains(_ value: Double) -> Bool {
    // A hair of tolerance: pow(10, -2) is not exactly 0.01.
    value >= low * (1 - 1e-9) && value <= high * (1 + 1e-9)
  }

  /// A short label: `128`, `0.5`, `0.002`, `20000`, and `1e6`, `2e-5` beyond that range; on a
  /// base-2 axis whole numbers are written out (`131072`), as sizes are read that way.
  func label(_ value: Double) -> String {
    if base == 2, value >= 1, value < 1e12, value == value.rounded() { return String(Int(value)) }
    let magnitude = abs(value)
    if magnitude != 0 && (magnitude >= 1e5 || magnitude < 1e-3) {
      let exponent = Int(floor(log10(magnitude)))
      let mantissa = value / pow(10, Double(exponent))
      let rounded = (mantissa * 100).rounded() / 100
      return SVG.number(rounded) + "e\(exponent)"
    }
    return String(format: "%g", value)
  }
}
