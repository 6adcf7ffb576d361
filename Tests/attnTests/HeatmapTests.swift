import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

@testable import attn

#if canImport(FoundationXML)
  import FoundationXML
#endif

/// `--heatmap` on `attn dropout` and `attn relpos`: the SVG parses as XML, has one panel per batch
/// element (at most 8) and one cell per weight, marks exactly the masked and the dropped cells,
/// and its colours follow the weights (each fill read back to its place on viridis); `relpos`
/// also writes the position term's figure; bad uses are errors that leave no file; and, when
/// `rsvg-convert` (Debian: librsvg2-bin) is installed, the files render to PNG.
@Suite("--heatmap", .serialized)
struct HeatmapTests {
  // MARK: attn dropout

  @Test("dropout: panels, cells, masked and dropped cells, colours in the weights' order")
  func dropout() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let (batch, t) = (3, 6)
      let run = try AttnCLI.run(
        [
          "dropout", "--batch", "\(batch)", "--seq-len", "\(t)", "--p", "0.5", "--mask", "causal",
          "--heatmap", "weights.svg", "--weights-out", "weights.npy",
        ], in: folder)
      try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      #expect(try AttnCLI.contents(of: folder) == ["weights.npy", "weights.svg"])
      let svg = try HeatmapReader(folder.appendingPathComponent("weights.svg"))
      let weights = try NPY.read(contentsOf: folder.appendingPathComponent("weights.npy").path)
        .tensor.scalars

      #expect(svg.title.hasPrefix("attn dropout"), "title: \(svg.title)")
      for parameter in ["p = 0.5", "seed 42", "mask causal"] {
        #expect(svg.title.contains(parameter), "title \(svg.title) lacks \(parameter)")
      }
      for label in [
        "query position", "key position", "attention weight", "masked (score −∞)",
        "dropped by dropout",
      ] {
        #expect(svg.texts.contains(label), "no text \(label)")
      }
      #expect(svg.gradientStops == 33)
      try #require(svg.panels.count == batch, "panels: \(svg.panels.count)")
      var dropped = 0
      for (b, panel) in svg.panels.enumerated() {
        try #require(panel.count == t * t, "panel \(b): \(panel.count) cells")
        for (e, cell) in panel.enumerated() {
          let (i, j) = (e / t, e % t)
          let w = weights[b * t * t + e]
          // Masked exactly above the diagonal (causal); dropped exactly where a visible weight
          // came out 0 (softmax weights of 6 random scores never underflow to 0).
          #expect((cell.kind == .masked) == (j > i), "panel \(b) (\(i), \(j)): \(cell.kind)")
          if j <= i {
            #expect((cell.kind == .dropped) == (w == 0), "panel \(b) (\(i), \(j)): w = \(w)")
          }
          if cell.kind == .dropped { dropped += 1 }
        }
      }
      #expect(dropped > 0, "p = 0.5 and no dropped cell")
      let top = Double(weights.max() ?? 1)
      try Self.expectColors(svg, values: weights.map(Double.init), low: 0, high: top)
    }
  }

  @Test("dropout: at most 8 panels, the first batch elements, said in the subtitle")
  func eightPanels() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        ["dropout", "--batch", "10", "--seq-len", "3", "--eval", "--heatmap", "h.svg"],
        in: folder)
      try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      let svg = try HeatmapReader(folder.appendingPathComponent("h.svg"))
      #expect(svg.panels.count == 8 && svg.panels.allSatisfy { $0.count == 9 })
      #expect(svg.panelTitles == (0..<8).map { "batch \($0)" })
      #expect(svg.texts.contains { $0.contains("the first 8 of 10 batch elements") })
      #expect(svg.panels.joined().allSatisfy { $0.kind == .plain }, "no mask, no dropout")
    }
  }

  // MARK: attn relpos

  @Test("relpos: the weights and, beside them, the position term with its ±M band")
  func relpos() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let (batch, t, d, m) = (2, 9, 8, 2)
      let run = try AttnCLI.run(
        [
          "relpos", "--batch", "\(batch)", "--seq-len", "\(t)", "--d-model", "\(d)", "--max-rel",
          "\(m)", "--heatmap", "attention.svg", "--weights-out", "weights.npy",
        ], in: folder)
      try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      #expect(
        try AttnCLI.contents(of: folder)
          == ["attention-position.svg", "attention.svg", "weights.npy"])

      let weights = try NPY.read(contentsOf: folder.appendingPathComponent("weights.npy").path)
        .tensor.scalars.map(Double.init)
      let svg = try HeatmapReader(folder.appendingPathComponent("attention.svg"))
      #expect(svg.title.hasPrefix("attn relpos") && svg.title.contains("M \(m)"), "\(svg.title)")
      #expect(svg.panels.count == batch && svg.panels.allSatisfy { $0.count == t * t })
      #expect(svg.panels.joined().allSatisfy { $0.kind == .plain })
      try Self.expectColors(svg, values: weights, low: 0, high: weights.max() ?? 1)

      // The position term of the same module and input (seed 42), scaled by 1/√d_model.
      let module = try RelativePositionAttention(modelDim: d, maxDistance: m, seed: 42)
      let x = try Tensor.randomNormal(shape: [batch, t, d], seed: 42, stream: RandomStream.input)
      let (q, _, _) = try module.project(x)
      let position = try module.positionScores(queries: q).scalars.map(Double.init)
      let figure = try HeatmapReader(folder.appendingPathComponent("attention-position.svg"))
      #expect(figure.title.contains("relative-position term"), "\(figure.title)")
      #expect(figure.panels.count == batch && figure.panels.allSatisfy { $0.count == t * t })
      // Two staircases per panel: the edges of |j − i| ≤ M.
      #expect(figure.bandEdges == 2 * batch, "band edges: \(figure.bandEdges)")
      try Self.expectColors(
        figure, values: position, low: position.min() ?? 0, high: position.max() ?? 1)
    }
  }

  // MARK: Errors leave no file

  @Test(
    "bad --heatmap uses are usage errors (exit 64) and write nothing",
    arguments: [
      ["dropout", "--kernel", "tiled", "--heatmap", "h.svg"],
      ["relpos", "--kernel", "tiled", "--heatmap", "h.svg"],
      ["dropout", "--seq-len", "129", "--heatmap", "h.svg"],
      ["dropout", "--heatmap", ""],
      ["dropout", "--explain", "--explain-batch", "3", "--heatmap", "h.svg"],
    ])
  func usageErrors(arguments: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(arguments, in: folder)
      #expect(run.status == 64, "\(arguments): exit \(run.status), stderr: \(run.stderr)")
      #expect(run.stderrLines.count == 1 && run.stderr.hasPrefix("attn: "), "\(run.stderr)")
      #expect(try AttnCLI.contents(of: folder).isEmpty, "\(arguments) left files")
    }
  }

  @Test("a heatmap into a missing folder fails before the work (exit 1) and writes nothing")
  func missingFolder() throws {
    try AttnCLI.withTemporaryFolder { folder in
      for command in [["dropout"], ["relpos", "--seq-len", "4"]] {
        let run = try AttnCLI.run(
          command + ["--heatmap", "missing/h.svg", "--out", "out.npy"], in: folder)
        #expect(run.status == 1, "\(command): exit \(run.status), stderr: \(run.stderr)")
        #expect(run.stderr.contains("does not exist") && run.stderrLines.count == 1)
        #expect(run.stdout.isEmpty, "the run stopped before printing: \(run.stdout)")
        #expect(try AttnCLI.contents(of: folder).isEmpty, "\(command) left files")
      }
    }
  }

  // MARK: Rendering

  static let rsvgConvert = ["/usr/bin/rsvg-convert", "/usr/local/bin/rsvg-convert"]
    .first { FileManager.default.isExecutableFile(atPath: $0) }

  @Test(
    "the figures render to PNG with rsvg-convert",
    .enabled(if: rsvgConvert != nil, "rsvg-convert is not installed (apt-get install librsvg2-bin)")
  )
  func renders() throws {
    let converter = try #require(Self.rsvgConvert)
    try AttnCLI.withTemporaryFolder { folder in
      for command in [
        ["dropout", "--mask", "causal", "--p", "0.3", "--heatmap", "d.svg"],
        ["relpos", "--seq-len", "12", "--max-rel", "3", "--heatmap", "r.svg"],
      ] {
        let run = try AttnCLI.run(command, in: folder)
        try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      }
      for name in ["d", "r", "r-position"] {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: converter)
        process.arguments = [
          folder.appendingPathComponent("\(name).svg").path, "-o",
          folder.appendingPathComponent("\(name).png").path,
        ]
        try process.run()
        process.waitUntilExit()
        #expect(
          process.terminationStatus == 0, "rsvg-convert \(name).svg: \(process.terminationStatus)")
        let png = try Data(contentsOf: folder.appendingPathComponent("\(name).png"))
        #expect(png.starts(with: [0x89, 0x50, 0x4E, 0x47]) && png.count > 1000, "\(name).png")
      }
    }
  }

  // MARK: Pieces

  @Test("the position figure's path, ticks and tick steps")
  func pieces() {
    #expect(VisualizationOptions.positionFigurePath("a/attn.svg") == "a/attn-position.svg")
    #expect(VisualizationOptions.positionFigurePath("x.SVG") == "x-position.SVG")
    #expect(VisualizationOptions.positionFigurePath("plot") == "plot-position.svg")
    #expect(HeatmapSVG.ticks(low: 0, high: 0.918) == [0, 0.2, 0.4, 0.6000000000000001, 0.8])
    #expect(HeatmapSVG.ticks(low: -1.3, high: 2.1).map { ($0 * 2).rounded() / 2 } == [-1, 0, 1, 2])
    #expect(HeatmapSVG.ticks(low: 1, high: 1) == [1])
    #expect(HeatmapSVG.tickStep(cell: 40, labelWidth: 13) == 1)
    #expect(HeatmapSVG.tickStep(cell: 5, labelWidth: 13) == 5)
    #expect(HeatmapSVG.tickStep(cell: 2.5, labelWidth: 19) == 10)
  }

  @Test("SVGDocument's generic elements nest and close")
  func genericElements() throws {
    var svg = SVGDocument(width: 10, height: 10)
    svg.container("defs") { d in
      d.container("linearGradient", ["id": "g"]) { g in
        g.element("stop", ["offset": "0", "stop-color": "#000000"])
      }
    }
    svg.group(["id": "x"], title: "a < b") { $0.rect(x: 0, y: 0, width: 1, height: 1) }
    let text = svg.render()
    #expect(text.contains("  <defs>\n    <linearGradient id=\"g\">\n      <stop offset=\"0\""))
    #expect(text.contains("</linearGradient>\n  </defs>"))
    #expect(text.contains("<title>a &lt; b</title>"))
    let parser = XMLParser(data: Data(text.utf8))
    #expect(parser.parse(), "\(String(describing: parser.parserError))")
  }

  // MARK: Helpers

  /// Every plain or dropped cell's fill, read back to its place on viridis, is where its value
  /// puts it on the figure's scale, within 0.01 (the fills are whole sRGB steps, about 1/300 of
  /// the scale apart at the flattest part of the map); so the colours are monotone in the values.
  static func expectColors(
    _ svg: HeatmapReader, values: [Double], low: Double, high: Double,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    var pairs: [(value: Double, position: Double)] = []
    for (e, cell) in svg.panels.joined().enumerated() where cell.kind != .masked {
      let position = try #require(viridisPosition(cell.fill), "fill \(cell.fill)")
      let expected = (values[e] - low) / (high - low)
      #expect(
        abs(position - expected) <= 0.01,
        "cell \(e): value \(values[e]) at \(expected), fill \(cell.fill) at \(position)",
        sourceLocation: sourceLocation)
      pairs.append((values[e], position))
    }
    pairs.sort { $0.value < $1.value }
    for (a, b) in zip(pairs, pairs.dropFirst()) where a.value < b.value {
      #expect(
        a.position <= b.position + 0.005, "\(a) drawn above \(b)", sourceLocation: sourceLocation)
    }
  }

  /// The place `t ∈ [0, 1]` of `#rrggbb` on viridis (the nearest of 4,097 samples), or nil when
  /// the colour is not on the map.
  static func viridisPosition(_ hex: String) -> Double? {
    guard hex.count == 7, hex.first == "#", let value = Int(hex.dropFirst(), radix: 16) else {
      return nil
    }
    let (r, g, b) = (value >> 16, (value >> 8) & 0xFF, value & 0xFF)
    var best = (distance: Int.max, t: 0.0)
    for k in 0...4096 {
      let t = Double(k) / 4096
      let c = Viridis.rgb(t)
      let distance =
        (c.red - r) * (c.red - r) + (c.green - g) * (c.green - g)
        + (c.blue - b) * (c.blue - b)
      if distance < best.distance { best = (distance, t) }
    }
    return best.distance <= 3 ? best.t : nil
  }
}

/// What the heatmap tests read from an SVG: the title, texts, panels with their cells in order,
/// band edges and gradient stops.
final class HeatmapReader: NSObject, XMLParserDelegate {
  struct Cell {
    enum Kind { case plain, masked, dropped }
    var kind: Kind
    var fill: String
  }

  var title = ""
  var texts: [String] = []
  var panels: [[Cell]] = []
  var panelTitles: [String] = []
  var bandEdges = 0
  var gradientStops = 0
  private var text: String?
  private var open: [(name: String, isPanel: Bool)] = []
  private var inPanelTitle = false

  init(_ url: URL) throws {
    super.init()
    let parser = XMLParser(data: try Data(contentsOf: url))
    parser.delegate = self
    guard parser.parse() else {
      throw AttnCLIError("\(url.path): XML error \(String(describing: parser.parserError))")
    }
  }

  func parser(
    _ parser: XMLParser, didStartElement name: String, namespaceURI: String?,
    qualifiedName: String?, attributes: [String: String] = [:]
  ) {
    let classes = (attributes["class"] ?? "").split(separator: " ")
    let isPanel = name == "g" && classes.contains("panel")
    if isPanel { panels.append([]) }
    if name == "title", open.last?.isPanel == true { inPanelTitle = true }
    open.append((name, isPanel))
    switch name {
    case "rect" where classes.contains("cell") && open.contains(where: \.isPanel):
      let kind: Cell.Kind =
        classes.contains("masked") ? .masked : classes.contains("dropped") ? .dropped : .plain
      panels[panels.count - 1].append(Cell(kind: kind, fill: attributes["fill"] ?? ""))
    case "polyline" where classes.contains("band-edge"): bandEdges += 1
    case "stop": gradientStops += 1
    case "text", "title": text = ""
    default: break
    }
    if name == "text", classes.contains("title") { title = "" }
  }

  func parser(_ parser: XMLParser, foundCharacters string: String) { text? += string }

  func parser(
    _ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?
  ) {
    open.removeLast()
    if name == "text", let text {
      texts.append(text)
      if title.isEmpty { title = text }
    }
    if name == "title", inPanelTitle, let text {
      panelTitles.append(text)
      inPanelTitle = false
    }
    if name == "text" || name == "title" { text = nil }
  }
}
