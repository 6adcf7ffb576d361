import AttentionKit
import AttentionVerification
import Foundation

/// `--explain`: the steps of one batch element as text (aligned columns, fixed decimals, large
/// matrices cut to their top-left corner) or as `ExplainStep`s for JSON; and the wording of each
/// step for `attn dropout` and `attn relpos`.
enum ExplainPrinter {
  /// Matrices larger than this (in either dimension) are shown by their top-left corner.
  static let maxShown = 16

  // MARK: The steps of each command

  /// The notebook's six steps of `attn dropout` (seven matrices: step 5 shows the decisions,
  /// then the weights after them); without dropout (`--eval`) step 5 is left out.
  static func dropoutSteps(
    _ s: AttentionSteps, headDim: Int, dropout: Dropout?, mask: String, hasBias: Bool
  ) -> [ExplainStep] {
    let root = "√\(headDim) = \(ExplainStep.decimal(Double(headDim).squareRoot()))"
    var steps = [
      ExplainStep(
        name: "scores", title: "Q·Kᵀ", axes: "query × key",
        description: "How well each query matches each key: the dot products q_i·k_j (one sgemm).",
        matrix: s.scores),
      ExplainStep(
        name: "scaled", title: "÷ √d_k", axes: "query × key",
        description: "÷ √d_k = \(root) (the sgemm's alpha), so that a large d_k does not "
          + "saturate softmax.",
        matrix: s.scaledScores),
      ExplainStep(
        name: "masked", title: "mask", axes: "query × key",
        description: maskWording(mask: mask, hasBias: hasBias), matrix: s.maskedScores),
      softmaxStep(s.weights),
    ]
    if let dropout, let keep = s.keep {
      let p = ExplainStep.decimal(Double(dropout.probability))
      steps.append(
        ExplainStep(
          name: "dropout_mask", title: "dropout mask", axes: "query × key",
          description: "Each weight kept (1) or dropped (0) with p = \(p) by Philox4x32-10, seed "
            + "\(dropout.seed) (training only).",
          matrix: keep, kind: .integer))
      steps.append(
        ExplainStep(
          name: "dropout", title: "after dropout", axes: "query × key",
          description: "Dropped weights set to 0, kept ones × 1/(1−p) = "
            + "\(ExplainStep.decimal(Double(dropout.keptScale))) to keep their expected value.",
          matrix: s.weightsAfterDropout, showsRowSums: true))
    }
    steps.append(outputStep(s.output))
    return steps
  }

  /// The steps of `attn relpos`: the relative index, the two score terms, their scaled sum, the
  /// mask (only when there is one), softmax and the output.
  static func relposSteps(_ s: RelativePositionSteps, modelDim: Int, mask: String)
    -> [ExplainStep]
  {
    let m = s.maxDistance
    let root = "√\(modelDim) = \(ExplainStep.decimal(Double(modelDim).squareRoot()))"
    var steps = [
      ExplainStep(
        name: "relative_index", title: "relative position index", axes: "query × key",
        description: "The embedding row of each pair: clip(j − i, −\(m), \(m)) + \(m); constant "
          + "along diagonals (Toeplitz).",
        matrix: s.relativeIndex, kind: .integer),
      ExplainStep(
        name: "content", title: "Q·Kᵀ, the content term", axes: "query × key",
        description: "How well query i's content matches key j's: q_i·k_j (one sgemm).",
        matrix: s.content),
      ExplainStep(
        name: "position_table", title: "R = Q·Eᵀ", axes: "query × distance r + M",
        description: "Each query against the 2M + 1 = \(2 * m + 1) distance embeddings, "
          + "r = −\(m)…\(m) (one sgemm, no gather).",
        matrix: s.positionTable),
      ExplainStep(
        name: "position", title: "the position term", axes: "query × key",
        description: "R read at the index above: q_i·E[clip(j − i) + M], how much query i favours "
          + "distance j − i.",
        matrix: s.position),
      ExplainStep(
        name: "scores", title: "(content + position) ÷ √d_model", axes: "query × key",
        description: "÷ \(root) (the sgemms' alpha), so that a large d_model does not saturate "
          + "softmax.",
        matrix: s.scores),
    ]
    if mask != "none" {
      steps.append(
        ExplainStep(
          name: "masked", title: "mask", axes: "query × key",
          description: maskWording(mask: mask, hasBias: false), matrix: s.maskedScores))
    }
    steps.append(softmaxStep(s.weights))
    steps.append(outputStep(s.output))
    return steps
  }

  private static func softmaxStep(_ weights: Tensor) -> ExplainStep {
    ExplainStep(
      name: "softmax", title: "softmax", axes: "query × key",
      description: "Each row: exp(s − max) / Σ exp, weights ≥ 0 summing to 1; − max only "
        + "avoids overflow.",
      matrix: weights, showsRowSums: true)
  }

  private static func outputStep(_ output: Tensor) -> ExplainStep {
    ExplainStep(
      name: "output", title: "output = weights·V", axes: "query × value dimension",
      description: "Each query's output is its weights' mix of the value rows (one sgemm).",
      matrix: output)
  }

  private static func maskWording(mask: String, hasBias: Bool) -> String {
    let bias = hasBias ? " (after adding --bias)" : ""
    switch mask {
    case "none":
      return hasBias
        ? "No mask, the --bias added; a masked pair would be −∞, which softmax makes 0."
        : "No mask here, so unchanged; a masked pair would be −∞, which softmax makes 0."
    case "causal":
      return "Causal: keys j > i set to −∞\(bias), which softmax turns into exactly 0."
    default:
      return "Where the mask is 0 the score is set to −∞\(bias), which softmax makes exactly 0."
    }
  }

  // MARK: Text

  /// The steps under `heading`, each as its number, title, shape, description and matrix.
  static func text(_ steps: [ExplainStep], heading: String, precision: Int) -> String {
    var lines = [heading]
    for (number, step) in steps.enumerated() {
      lines.append("")
      lines.append(
        "\(number + 1). \(step.title)  \(shapeForMessage(step.matrix.shape)), \(step.axes)")
      lines.append("   " + step.description)
      lines += matrixLines(step, precision: precision).map { "   " + $0 }
    }
    return lines.joined(separator: "\n")
  }

  /// The matrix with a header of column indices and a column of row indices, every column right
  /// aligned to its widest entry; the top-left `maxShown × maxShown` corner of a larger one.
  static func matrixLines(_ step: ExplainStep, precision: Int) -> [String] {
    let (rows, columns) = (step.matrix.shape[0], step.matrix.shape[1])
    let (shownRows, shownColumns) = (min(rows, maxShown), min(columns, maxShown))
    let cells = (0..<shownRows).map { i in
      (0..<shownColumns).map { j in
        format(step.matrix.scalars[i * columns + j], kind: step.kind, precision: precision)
      }
    }
    let sums =
      step.showsRowSums
      ? step.rowSums.prefix(shownRows).map { format(Float($0), kind: .real, precision: precision) }
      : []
    let labelWidth = String(max(shownRows - 1, 0)).count
    let widths = (0..<shownColumns).map { j in
      max(String(j).count, cells.map { $0[j].count }.max() ?? 0)
    }
    func pad(_ text: String, _ width: Int) -> String {
      String(repeating: " ", count: max(width - text.count, 0)) + text
    }
    var lines: [String] = []
    var header = pad("", labelWidth) + "  "
    header += (0..<shownColumns).map { pad(String($0), widths[$0]) }.joined(separator: "  ")
    if !sums.isEmpty {
      header += "  │ " + pad("Σ", sums.map(\.count).max() ?? 1)
    }
    lines.append(header)
    for i in 0..<shownRows {
      var line = pad(String(i), labelWidth) + "  "
      line += (0..<shownColumns).map { pad(cells[i][$0], widths[$0]) }.joined(separator: "  ")
      if !sums.isEmpty { line += "  │ " + pad(sums[i], sums.map(\.count).max() ?? 1) }
      lines.append(line)
    }
    if shownRows < rows || shownColumns < columns {
      var hidden: [String] = []
      if shownRows < rows { hidden.append("\(rows - shownRows) more rows") }
      if shownColumns < columns { hidden.append("\(columns - shownColumns) more columns") }
      let sumNote = step.showsRowSums && shownColumns < columns ? "; Σ is over whole rows" : ""
      lines.append(
        "… top-left \(shownRows) × \(shownColumns) of \(rows) × \(columns) shown: "
          + hidden.joined(separator: " and ") + " elided\(sumNote)")
    }
    return lines
  }

  /// `-1.2346`, `−∞` (masked), `∞`, `nan`; `0`/`1` for integers.
  static func format(_ value: Float, kind: ExplainStep.Kind, precision: Int) -> String {
    if value.isNaN { return "nan" }
    if value.isInfinite { return value < 0 ? "−∞" : "∞" }
    switch kind {
    case .integer:
      return String(Int(value))
    case .real:
      // Numbers keep an ASCII minus, as numpy prints them (so they paste into Python); −0
      // prints as 0: a sign on zero is an artefact of rounding, not information here.
      let text = String(format: "%.\(precision)f", Double(value == 0 ? 0 : value))
      // A value that rounds to zero prints as 0 too, without the sign ("-0.000").
      return text.hasPrefix("-") && text.dropFirst().allSatisfy({ $0 == "0" || $0 == "." })
        ? String(text.dropFirst()) : text
    }
  }
}
