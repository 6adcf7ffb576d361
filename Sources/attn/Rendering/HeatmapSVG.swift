import Foundation

/// Heatmaps of attention matrices as SVG: a title and subtitle, a grid of panels (one per batch
/// element or head, four to a row), each with its query and key axes, and on the right a viridis
/// colour bar with ticks and a key to the marked cells.
///
/// Cells are drawn as `<rect class="cell …">`, row-major within each panel `<g class="panel">`:
/// - a value is painted `Viridis.hex((v − low)/(high − low))`, one shared scale for all panels
///   so that they compare;
/// - `masked` (score −∞: the pair never entered softmax) is light grey with a grey ×, outside the
///   colour scale, since its weight is 0 by construction rather than by computation;
/// - `dropped` (a weight dropout zeroed) keeps the colour of its value, 0, and gets a dashed white
///   inner border, so it stands apart from weights that are merely small.
/// Cells of 30 px or more also print their value. Built on `SVGDocument`.
struct HeatmapSVG {
  /// How a cell is marked beyond its colour.
  enum Mark: Hashable {
    case none, masked, dropped
  }

  /// One matrix.
  struct Panel {
    var title: String
    var rows: Int
    var columns: Int
    /// `rows × columns`, row-major.
    var values: [Float]
    /// One per value, or empty when no cell is marked.
    var marks: [Mark] = []

    func mark(_ index: Int) -> Mark { marks.isEmpty ? .none : marks[index] }
  }

  var title: String
  var subtitle: String
  /// The quantity the colours show, for the colour bar: "attention weight".
  var valueLabel: String
  /// The values at the two ends of the colour scale.
  var low: Double
  var high: Double
  var rowLabel = "query position"
  var columnLabel = "key position"
  var panels: [Panel]
  /// Words for the positions (`attn mha --tokens`): query `i` and key `j` are labelled
  /// `tokens[i]`, `tokens[j]` instead of their numbers, key labels slanted; `nil` for numbers.
  var tokens: [String]? = nil
  /// When set to `M`, dashed white staircases mark the edges of the band `|j − i| ≤ M` in every
  /// panel (for the relative-position term, which is flat beyond it).
  var band: Int? = nil

  static let panelsPerRow = 4
  static let maskedFill = "#e4e4e4"
  static let maskedStroke = "#a8a8a8"

  /// The colour of `value` on this figure's scale.
  func color(_ value: Float) -> String { Viridis.hex(position(value)) }

  /// Where `value` falls on the colour scale, 0 at `low`, 1 at `high`.
  func position(_ value: Float) -> Double {
    high > low ? (Double(value) - low) / (high - low) : 0
  }

  // MARK: Layout

  /// The side of a cell: a panel about 320 px across (240 when there are more than two), cells
  /// between 2 and 56 px.
  private var cell: Double {
    let largest = panels.map { max($0.rows, $0.columns) }.max() ?? 1
    let side = panels.count > 2 ? 240.0 : 320.0
    return min(56, max(2, side / Double(max(largest, 1))))
  }

  private struct Layout {
    var cell: Double
    var panelWidth: Double
    var panelHeight: Double
    var gridColumns: Int
    var gridRows: Int
    /// Left, top of the panel grid.
    var originX: Double
    var originY: Double
    var legendX: Double
    var width: Double
    var height: Double
  }

  /// Width taken by the longest token label (0.6 em of 10 px a character), or 0.
  private var tokenWidth: Double { Double(tokens?.map(\.count).max() ?? 0) * 6 }
  /// Room for the query labels, left of the cells.
  private var leftMargin: Double { max(58, tokenWidth + 36) }
  /// Room for the key labels (slanted 45°) and the axis title, below the cells.
  private var bottomMargin: Double { tokens == nil ? 44 : max(44, tokenWidth * 0.71 + 30) }

  /// Panel: 58 px on the left for the query labels, 28 on top for its title, 44 below for the
  /// key labels, 14 on the right; the legend takes 190 px; the whole is at least as wide as the
  /// titles (estimated at 0.6 em a character, as there are no text metrics without a renderer).
  private var layout: Layout {
    let cell = self.cell
    let maxRows = panels.map(\.rows).max() ?? 0
    let maxColumns = panels.map(\.columns).max() ?? 0
    let panelWidth = leftMargin + Double(maxColumns) * cell + 14
    let panelHeight = 28 + Double(maxRows) * cell + bottomMargin
    let gridColumns = max(min(panels.count, Self.panelsPerRow), 1)
    let gridRows = max((panels.count + gridColumns - 1) / gridColumns, 1)
    let legendWidth = 190.0
    let content = Double(gridColumns) * panelWidth + legendWidth
    let titles = max(Double(title.count) * 16 * 0.6, Double(subtitle.count) * 12 * 0.6) + 40
    let width = max(content + 20, titles).rounded(.up)
    let originX = ((width - content) / 2).rounded()
    let originY = 70.0
    let gridHeight = Double(gridRows) * panelHeight
    let height = originY + max(gridHeight, 300) + 12
    return Layout(
      cell: cell, panelWidth: panelWidth, panelHeight: panelHeight, gridColumns: gridColumns,
      gridRows: gridRows, originX: originX, originY: originY,
      legendX: originX + Double(gridColumns) * panelWidth + 16, width: width, height: height)
  }

  // MARK: Drawing

  /// The figure as a document; `render()` or `bytes()` it.
  func document() -> SVGDocument {
    let l = layout
    var svg = SVGDocument(
      width: l.width, height: l.height,
      ["font-family": "DejaVu Sans, Helvetica, Arial, sans-serif", "font-size": "12"])
    svg.rect(x: 0, y: 0, width: l.width, height: l.height, ["fill": "white"])
    svg.container("defs") { d in
      // Bottom (low) to top (high), sampled finely enough that the steps never show.
      d.container(
        "linearGradient", ["id": "colormap", "x1": "0", "y1": "1", "x2": "0", "y2": "0"]
      ) { g in
        for k in 0...32 {
          let t = Double(k) / 32
          g.element("stop", ["offset": SVG.number(t, decimals: 4), "stop-color": Viridis.hex(t)])
        }
      }
    }
    svg.text(
      title, x: l.width / 2, y: 28,
      ["text-anchor": "middle", "font-size": "16", "font-weight": "bold", "class": "title"])
    svg.text(
      subtitle, x: l.width / 2, y: 50,
      ["text-anchor": "middle", "fill": "#555555", "class": "subtitle"])
    for (index, panel) in panels.enumerated() {
      let x = l.originX + Double(index % l.gridColumns) * l.panelWidth
      let y = l.originY + Double(index / l.gridColumns) * l.panelHeight
      draw(panel, index: index, x: x, y: y, cell: l.cell, on: &svg)
    }
    legend(x: l.legendX, y: l.originY + 28, on: &svg)
    return svg
  }

  private func draw(
    _ panel: Panel, index: Int, x: Double, y: Double, cell: Double, on svg: inout SVGDocument
  ) {
    let left = x + leftMargin
    let top = y + 28
    let width = Double(panel.columns) * cell
    let height = Double(panel.rows) * cell
    svg.group(["class": "panel", "id": "panel-\(index)"], title: panel.title) { g in
      g.text(
        panel.title, x: left + width / 2, y: y + 18,
        ["text-anchor": "middle", "font-size": "13", "font-weight": "bold"])
      g.group(["class": "cells", "shape-rendering": "crispEdges"]) { cells in
        for i in 0..<panel.rows {
          for j in 0..<panel.columns {
            let k = i * panel.columns + j
            drawCell(
              panel.values[k], mark: panel.mark(k), x: left + Double(j) * cell,
              y: top + Double(i) * cell, size: cell, on: &cells)
          }
        }
      }
      if let band {
        bandEdges(
          band, rows: panel.rows, columns: panel.columns, left: left, top: top,
          cell: cell, on: &g)
      }
      g.rect(
        x: left, y: top, width: width, height: height,
        ["fill": "none", "stroke": "#444444", "stroke-width": "1"])
      axes(rows: panel.rows, columns: panel.columns, left: left, top: top, cell: cell, on: &g)
    }
  }

  private func drawCell(
    _ value: Float, mark: Mark, x: Double, y: Double, size: Double, on svg: inout SVGDocument
  ) {
    switch mark {
    case .masked:
      svg.rect(
        x: x, y: y, width: size, height: size,
        ["class": "cell masked", "fill": Self.maskedFill, "stroke": "white", "stroke-width": "0.5"])
      let inset = size * 0.25
      let cross: SVGAttributes = [
        "class": "cross", "stroke": Self.maskedStroke,
        "stroke-width": SVG.number(max(size / 24, 0.6)),
      ]
      svg.line(x1: x + inset, y1: y + inset, x2: x + size - inset, y2: y + size - inset, cross)
      svg.line(x1: x + size - inset, y1: y + inset, x2: x + inset, y2: y + size - inset, cross)
      return
    case .dropped:
      svg.rect(
        x: x, y: y, width: size, height: size, ["class": "cell dropped", "fill": color(value)])
      let inset = max(size * 0.14, 0.8)
      svg.rect(
        x: x + inset, y: y + inset, width: size - 2 * inset, height: size - 2 * inset,
        [
          "class": "drop-mark", "fill": "none", "stroke": "white",
          "stroke-width": SVG.number(max(size / 20, 0.5)),
          "stroke-dasharray": "\(SVG.number(max(size / 8, 1))) \(SVG.number(max(size / 12, 0.7)))",
        ])
    case .none:
      svg.rect(x: x, y: y, width: size, height: size, ["class": "cell", "fill": color(value)])
    }
    if size >= 30 {
      // White on the dark end of viridis, near-black on the light end; a dropped weight is
      // exactly 0, and a short label keeps clear of its border.
      let ink = position(value) < 0.6 ? "white" : "#1a1a1a"
      let label = mark == .dropped ? "0" : String(format: "%.2f", Double(value == 0 ? 0 : value))
      svg.text(
        label, x: x + size / 2,
        y: y + size / 2 + size * 0.1,
        [
          "class": "value", "text-anchor": "middle", "fill": ink,
          "font-size": SVG.number(size * 0.28),
        ])
    }
  }

  /// The edges of `|j − i| ≤ m` as staircases along cell borders: in row `i` the band spans keys
  /// `i − m … i + m`, so its left edge is at `x = i − m` and its right edge at `x = i + m + 1`
  /// (in cells), each drawn only where it falls inside the panel.
  private func bandEdges(
    _ m: Int, rows: Int, columns: Int, left: Double, top: Double, cell: Double,
    on svg: inout SVGDocument
  ) {
    for offset in [-m, m + 1] {
      var points: [(x: Double, y: Double)] = []
      for i in 0..<rows {
        let x = i + offset
        guard x > 0 && x < columns else { continue }
        points.append((left + Double(x) * cell, top + Double(i) * cell))
        points.append((left + Double(x) * cell, top + Double(i + 1) * cell))
      }
      guard points.count >= 2 else { continue }
      svg.polyline(
        points: points,
        [
          "class": "band-edge", "stroke": "white", "stroke-width": "1.5",
          "stroke-dasharray": "4 3", "stroke-opacity": "0.9",
        ])
    }
  }

  /// Tick labels every `step` positions (1, 2, 5, 10, …, so that labels never touch), and the
  /// axis titles: keys below, queries on the left.
  private func axes(
    rows: Int, columns: Int, left: Double, top: Double, cell: Double, on svg: inout SVGDocument
  ) {
    let bottom = top + Double(rows) * cell
    // Slanted token labels need only a line's height of spacing.
    let columnStep = Self.tickStep(
      cell: cell, labelWidth: tokens == nil ? 6.5 * Double(String(columns).count) + 6 : 13)
    let rowStep = Self.tickStep(cell: cell, labelWidth: 13)
    func label(_ position: Int) -> String {
      guard let tokens, position < tokens.count else { return String(position) }
      return tokens[position]
    }
    svg.group(["class": "x-axis", "font-size": "10", "fill": "#333333"]) { a in
      for j in stride(from: 0, to: columns, by: columnStep) {
        let x = left + (Double(j) + 0.5) * cell
        a.line(x1: x, y1: bottom, x2: x, y2: bottom + 3, ["stroke": "#444444"])
        if tokens == nil {
          a.text(label(j), x: x, y: bottom + 14, ["text-anchor": "middle"])
        } else {
          let y = bottom + 10
          a.text(
            label(j), x: x + 3, y: y,
            [
              "text-anchor": "end",
              "transform": "rotate(-45 \(SVG.number(x + 3)) \(SVG.number(y)))",
            ])
        }
      }
      a.text(
        columnLabel, x: left + Double(columns) * cell / 2, y: bottom + bottomMargin - 12,
        ["text-anchor": "middle", "font-size": "12", "fill": "#222222"])
    }
    svg.group(["class": "y-axis", "font-size": "10", "fill": "#333333"]) { a in
      for i in stride(from: 0, to: rows, by: rowStep) {
        let y = top + (Double(i) + 0.5) * cell
        a.line(x1: left - 3, y1: y, x2: left, y2: y, ["stroke": "#444444"])
        a.text(label(i), x: left - 6, y: y + 3.5, ["text-anchor": "end"])
      }
      let midY = top + Double(rows) * cell / 2
      let labelX = left - leftMargin + 18
      a.text(
        rowLabel, x: labelX, y: midY,
        [
          "text-anchor": "middle", "font-size": "12", "fill": "#222222",
          "transform": "rotate(-90 \(SVG.number(labelX)) \(SVG.number(midY)))",
        ])
    }
  }

  /// The smallest of 1, 2, 5, 10, 20, 50, … positions whose spacing fits a label.
  static func tickStep(cell: Double, labelWidth: Double) -> Int {
    var magnitude = 1
    while true {
      for factor in [1, 2, 5] where Double(factor * magnitude) * cell >= labelWidth {
        return factor * magnitude
      }
      magnitude *= 10
    }
  }

  /// The colour bar (low at the bottom) with its ticks and label, then a key to the marks
  /// present in any panel.
  private func legend(x: Double, y: Double, on svg: inout SVGDocument) {
    let barHeight = 200.0
    let barWidth = 16.0
    let marks = Set(panels.flatMap(\.marks))
    svg.group(["class": "legend"]) { g in
      g.text(valueLabel, x: x, y: y - 10, ["font-size": "12", "font-weight": "bold"])
      g.rect(
        x: x, y: y, width: barWidth, height: barHeight,
        ["class": "colorbar", "fill": "url(#colormap)", "stroke": "#444444", "stroke-width": "0.8"])
      for tick in Self.ticks(low: low, high: high) {
        let ty = y + barHeight * (1 - (high > low ? (tick - low) / (high - low) : 0))
        g.line(x1: x + barWidth, y1: ty, x2: x + barWidth + 4, y2: ty, ["stroke": "#444444"])
        g.text(
          Self.tickLabel(tick, low: low, high: high), x: x + barWidth + 7, y: ty + 4,
          ["font-size": "11", "class": "tick"])
      }
      var keyY = y + barHeight + 30
      if marks.contains(.masked) {
        drawCell(0, mark: .masked, x: x, y: keyY - 12, size: 16, on: &g)
        g.text("masked (score −∞)", x: x + 24, y: keyY)
        keyY += 24
      }
      if marks.contains(.dropped) {
        drawCell(0, mark: .dropped, x: x, y: keyY - 12, size: 16, on: &g)
        g.text("dropped by dropout", x: x + 24, y: keyY)
        keyY += 24
      }
      if let band {
        g.line(
          x1: x, y1: keyY - 4, x2: x + 16, y2: keyY - 4,
          ["stroke": "#555555", "stroke-width": "1.5", "stroke-dasharray": "4 3"])
        g.text("|j − i| = \(band) edge", x: x + 24, y: keyY)
      }
    }
  }

  /// Round values (steps of 1, 2 or 5 × 10ᵏ) from `low` to `high`, four to eight of them,
  /// always including both ends' neighbourhood.
  static func ticks(low: Double, high: Double) -> [Double] {
    guard high > low, (high - low).isFinite else { return [low] }
    let rough = (high - low) / 5
    let power = pow(10, floor(log10(rough)))
    let step = [1.0, 2, 5, 10].map { $0 * power }.first { $0 >= rough } ?? 10 * power
    var ticks: [Double] = []
    var k = ceil(low / step - 1e-9)
    while k * step <= high + step * 1e-9 {
      ticks.append(k * step)
      k += 1
    }
    return ticks
  }

  /// A tick label with as many decimals as the tick spacing needs: `0`, `0.25`, `-1.5`.
  static func tickLabel(_ value: Double, low: Double, high: Double) -> String {
    let spacing = (high - low) / 5
    let decimals = spacing > 0 ? max(0, min(6, Int(-floor(log10(spacing))) + 1)) : 2
    return SVG.number(value, decimals: decimals)
  }
}
