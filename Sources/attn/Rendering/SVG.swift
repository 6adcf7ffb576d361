import Foundation

/// A tiny SVG 1.1 document builder: shapes, text and groups, written as text in the order they are
/// added (later elements paint over earlier ones).
///
/// It knows nothing about charts; `LineChartSVG` and `HeatmapSVG` build on it. Everything it writes
/// is well-formed XML: text and attribute values are escaped, characters XML 1.0 forbids are
/// dropped, and numbers are written in plain decimal (never `1e-05`, never `nan`), so any browser
/// or XML parser reads the result.
///
///     var svg = SVGDocument(width: 200, height: 100)
///     svg.rect(x: 0, y: 0, width: 200, height: 100, ["fill": "white"])
///     svg.group(["id": "label"], title: "a label") { g in
///       g.text("n² < 2ⁿ", x: 10, y: 50, ["font-size": "12"])
///     }
///     let text = svg.render()
struct SVGDocument {
  let width: Double
  let height: Double
  /// Attributes of the root `<svg>` element (beyond size and namespace), e.g. a default font.
  var rootAttributes: SVGAttributes
  private var lines: [String] = []
  private var depth = 1

  init(width: Double, height: Double, _ rootAttributes: SVGAttributes = [:]) {
    self.width = width
    self.height = height
    self.rootAttributes = rootAttributes
  }

  // MARK: Elements

  mutating func rect(
    x: Double, y: Double, width: Double, height: Double, _ attributes: SVGAttributes = [:]
  ) {
    element(
      "rect",
      [
        ("x", SVG.number(x)), ("y", SVG.number(y)),
        ("width", SVG.number(max(width, 0))), ("height", SVG.number(max(height, 0))),
      ], attributes)
  }

  mutating func line(
    x1: Double, y1: Double, x2: Double, y2: Double, _ attributes: SVGAttributes = [:]
  ) {
    element(
      "line",
      [
        ("x1", SVG.number(x1)), ("y1", SVG.number(y1)),
        ("x2", SVG.number(x2)), ("y2", SVG.number(y2)),
      ],
      attributes)
  }

  mutating func circle(cx: Double, cy: Double, r: Double, _ attributes: SVGAttributes = [:]) {
    element(
      "circle", [("cx", SVG.number(cx)), ("cy", SVG.number(cy)), ("r", SVG.number(max(r, 0)))],
      attributes)
  }

  /// An open path through `points`; `fill="none"` unless the attributes say otherwise (a filled
  /// polyline is rarely what a chart wants).
  mutating func polyline(points: [(x: Double, y: Double)], _ attributes: SVGAttributes = [:]) {
    let list = points.map { SVG.number($0.x) + "," + SVG.number($0.y) }.joined(separator: " ")
    var own: [(String, String)] = [("points", list)]
    if attributes["fill"] == nil { own.append(("fill", "none")) }
    element("polyline", own, attributes)
  }

  /// Text with its baseline at `y`; `text` is escaped, so any string is safe.
  mutating func text(_ text: String, x: Double, y: Double, _ attributes: SVGAttributes = [:]) {
    let all = SVGAttributes(pairs: [("x", SVG.number(x)), ("y", SVG.number(y))]).merging(attributes)
    append("<text" + SVG.attributeList(all.pairs) + ">" + SVG.escape(text) + "</text>")
  }

  /// A `<g>` holding whatever `body` adds; `title` becomes its `<title>` child (a tooltip in
  /// browsers, and a name tools and tests can find).
  mutating func group(
    _ attributes: SVGAttributes = [:], title: String? = nil, _ body: (inout SVGDocument) -> Void
  ) {
    container("g", attributes, title: title, body)
  }

  /// Any element with children, e.g. `defs`, `linearGradient`, `pattern`; `title` as for
  /// `group`. `name` must be an SVG element name (it is written as given).
  mutating func container(
    _ name: String, _ attributes: SVGAttributes = [:], title: String? = nil,
    _ body: (inout SVGDocument) -> Void
  ) {
    append("<" + name + SVG.attributeList(attributes.pairs) + ">")
    depth += 1
    if let title { append("<title>" + SVG.escape(title) + "</title>") }
    body(&self)
    depth -= 1
    append("</" + name + ">")
  }

  /// Any element without children, e.g. `stop` or `path`, with its attributes as given.
  mutating func element(_ name: String, _ attributes: SVGAttributes) {
    element(name, [], attributes)
  }

  /// An XML comment; `--` (not allowed inside one) is broken up.
  mutating func comment(_ text: String) {
    let safe = SVG.escape(text).replacingOccurrences(of: "--", with: "- -")
    append("<!-- " + safe + " -->")
  }

  // MARK: Output

  /// The whole document, XML declaration first, ending in a newline.
  func render() -> String {
    let root: [(String, String)] = [
      ("xmlns", "http://www.w3.org/2000/svg"), ("version", "1.1"),
      ("width", SVG.number(width)), ("height", SVG.number(height)),
      ("viewBox", "0 0 \(SVG.number(width)) \(SVG.number(height))"),
    ]
    var text = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    let all = SVGAttributes(pairs: root).merging(rootAttributes)
    text += "<svg" + SVG.attributeList(all.pairs) + ">\n"
    for line in lines { text += line + "\n" }
    return text + "</svg>\n"
  }

  /// `render()` as UTF-8 bytes, ready for `writeAtomically`.
  func bytes() -> [UInt8] { Array(render().utf8) }

  private mutating func element(
    _ name: String, _ geometry: [(String, String)], _ attributes: SVGAttributes
  ) {
    // Geometry first; an attribute given again by the caller replaces it rather than repeating it.
    let all = SVGAttributes(pairs: geometry).merging(attributes)
    append("<" + name + SVG.attributeList(all.pairs) + "/>")
  }

  private mutating func append(_ line: String) {
    lines.append(String(repeating: "  ", count: depth) + line)
  }
}

/// Attributes in the order written: `["stroke": "black", "stroke-width": "2"]`. A later duplicate
/// key replaces the earlier value (an element may not repeat an attribute).
struct SVGAttributes: ExpressibleByDictionaryLiteral {
  private(set) var pairs: [(String, String)] = []

  init(dictionaryLiteral elements: (String, String)...) {
    self.init(pairs: elements)
  }

  init(pairs: [(String, String)]) {
    for (key, value) in pairs { self[key] = value }
  }

  subscript(key: String) -> String? {
    get { pairs.first { $0.0 == key }?.1 }
    set {
      if let index = pairs.firstIndex(where: { $0.0 == key }) {
        if let newValue { pairs[index].1 = newValue } else { pairs.remove(at: index) }
      } else if let newValue {
        pairs.append((key, newValue))
      }
    }
  }

  /// These attributes, then `other`'s (which win on a shared key).
  func merging(_ other: SVGAttributes) -> SVGAttributes {
    var result = self
    for (key, value) in other.pairs { result[key] = value }
    return result
  }
}

/// Escaping and number formatting shared by everything that writes SVG.
enum SVG {
  /// `value` with at most `decimals` decimals, trailing zeros dropped: `12`, `0.5`, `-3.25`.
  /// Never exponent notation, never `-0`; a non-finite value (which SVG cannot hold) becomes `0`.
  static func number(_ value: Double, decimals: Int = 2) -> String {
    guard value.isFinite else { return "0" }
    let scale = pow10(decimals)
    let rounded = (value * scale).rounded() / scale
    if rounded == 0 { return "0" }
    var text = String(format: "%.\(decimals)f", rounded)
    if text.contains(".") {
      while text.hasSuffix("0") { text.removeLast() }
      if text.hasSuffix(".") { text.removeLast() }
    }
    return text
  }

  /// Text safe inside an element or a double-quoted attribute: `& < > " '` become entities, and
  /// characters XML 1.0 forbids (controls other than tab, newline, carriage return) are dropped.
  static func escape(_ text: String) -> String {
    var result = ""
    result.reserveCapacity(text.utf8.count)
    for scalar in text.unicodeScalars {
      switch scalar {
      case "&": result += "&amp;"
      case "<": result += "&lt;"
      case ">": result += "&gt;"
      case "\"": result += "&quot;"
      case "'": result += "&apos;"
      case "\t", "\n", "\r": result.unicodeScalars.append(scalar)
      default:
        let v = scalar.value
        let allowed = v >= 0x20 && !(0xFFFE...0xFFFF).contains(v)
        if allowed { result.unicodeScalars.append(scalar) }
      }
    }
    return result
  }

  /// ` a="1" b="2"` (leading space included, empty for no attributes).
  static func attributeList(_ pairs: [(String, String)]) -> String {
    pairs.map { " \($0.0)=\"\(escape($0.1))\"" }.joined()
  }

  private static func pow10(_ n: Int) -> Double {
    var result = 1.0
    for _ in 0..<max(n, 0) { result *= 10 }
    return result
  }
}
