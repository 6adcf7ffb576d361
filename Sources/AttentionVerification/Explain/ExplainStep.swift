import AttentionKit
import Foundation

/// One step of `--explain`: a matrix, its name, and one line on what the step does and why.
///
/// In JSON (`--format json`, under `steps`) a step is `name`, `title`, `description`, `shape`
/// and `values`, the matrix as nested arrays at full float32 precision (`"-inf"` where masked),
/// plus `rowSums` for the steps whose rows are weights.
public struct ExplainStep: Encodable, Sendable {
  /// How values are written in text.
  public enum Kind: Sendable {
    /// With `--precision` decimals.
    case real
    /// Whole numbers: an index, or 0/1 decisions.
    case integer
  }

  /// A stable identifier for scripts: `scores`, `softmax`, `output`, …
  public var name: String
  /// What a reader calls it: `Q·Kᵀ`, `÷ √d_k`, …
  public var title: String
  /// What the rows and the columns are: `query × key`.
  public var axes: String
  public var description: String
  /// A 2-D tensor, `[rows, columns]`.
  public var matrix: Tensor
  public var kind = Kind.real
  /// Whether text shows each row's sum (the weights' rows sum to 1).
  public var showsRowSums = false

  /// The sum of each row, in Double (so a float32 rounding of the sum cannot hide a bad row).
  public var rowSums: [Double] {
    let (rows, columns) = (matrix.shape[0], matrix.shape[1])
    return (0..<rows).map { i in
      matrix.scalars[(i * columns)..<(i * columns + columns)].reduce(0.0) { $0 + Double($1) }
    }
  }

  public init(
    name: String, title: String, axes: String, description: String, matrix: Tensor,
    kind: Kind = .real, showsRowSums: Bool = false
  ) {
    self.name = name
    self.title = title
    self.axes = axes
    self.description = description
    self.matrix = matrix
    self.kind = kind
    self.showsRowSums = showsRowSums
  }

  private enum CodingKeys: String, CodingKey {
    case name, title, axes, description, shape, values, rowSums
  }

  public func encode(to encoder: Encoder) throws {
    var container = encoder.container(keyedBy: CodingKeys.self)
    try container.encode(name, forKey: .name)
    try container.encode(title, forKey: .title)
    try container.encode(axes, forKey: .axes)
    try container.encode(description, forKey: .description)
    try container.encode(matrix.shape, forKey: .shape)
    let columns = matrix.shape[1]
    let rows = (0..<matrix.shape[0]).map { i in
      Array(matrix.scalars[(i * columns)..<(i * columns + columns)])
    }
    try container.encode(rows, forKey: .values)
    if showsRowSums { try container.encode(rowSums, forKey: .rowSums) }
  }

  /// A short decimal for descriptions: `2.8284`, `0.1`, `1.1111`.
  public static func decimal(_ value: Double) -> String {
    var text = String(format: "%.4f", value)
    while text.hasSuffix("0") { text.removeLast() }
    if text.hasSuffix(".") { text.removeLast() }
    return text
  }
}
