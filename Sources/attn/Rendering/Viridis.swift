/// Viridis, matplotlib's perceptually uniform colour map: equal steps in value look like equal
/// steps in colour, and it stays readable in grey and for colour-blind readers.
enum Viridis {
  /// Nine samples of the map at t = 0, 1/8, …, 1 (sRGB, 0–255); between them, linear.
  private static let stops: [(Double, Double, Double)] = [
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
  ]

  /// The colour at `t ∈ [0, 1]` (clamped; NaN gives the lowest colour).
  static func rgb(_ t: Double) -> (red: Int, green: Int, blue: Int) {
    let clamped = t.isNaN ? 0 : min(max(t, 0), 1)
    let position = clamped * Double(stops.count - 1)
    let index = min(Int(position), stops.count - 2)
    let f = position - Double(index)
    let (a, b) = (stops[index], stops[index + 1])
    func mix(_ x: Double, _ y: Double) -> Int { Int((x + (y - x) * f).rounded()) }
    return (mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
  }

  /// `#rrggbb`, for SVG.
  static func hex(_ t: Double) -> String {
    let c = rgb(t)
    return "#"
      + [c.red, c.green, c.blue].map { value in
        let s = String(value, radix: 16)
        return s.count == 1 ? "0" + s : s
      }.joined()
  }

  /// The nearest colour of the xterm 256-colour 6×6×6 cube.
  static func xterm256(_ t: Double) -> Int {
    let c = rgb(t)
    func level(_ v: Int) -> Int {
      // The cube's levels are 0, 95, 135, 175, 215, 255.
      let levels = [0, 95, 135, 175, 215, 255]
      return levels.indices.min(by: { abs(levels[$0] - v) < abs(levels[$1] - v) }) ?? 0
    }
    return 16 + 36 * level(c.red) + 6 * level(c.green) + level(c.blue)
  }
}
