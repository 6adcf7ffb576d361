import AttentionKit
import AttentionVerification
import Foundation

/// What `--explain` and `--heatmap` (`VisualizationOptions`) show for `attn dropout` and
/// `attn relpos`: the steps of one batch element from `AttentionSteps` and
/// `RelativePositionSteps`, and the heatmap figures (`HeatmapSVG`) of the kernel's weights, with
/// the masked and dropped cells found from the same steps.
extension VisualizationOptions {
  // MARK: What each command shows

  /// `attn dropout`'s steps and heatmap, from its inputs; checks the shapes first (`prepare`).
  func dropout(
    queries: Tensor, keys: Tensor, values: Tensor, mask: AttentionMask, dropout: Dropout?,
    maskName: String, seed: UInt64, rng: String, memoryBudget: Int
  ) throws -> Visuals {
    let shape = try AttentionShape(queries: queries, keys: keys, values: values)
    try prepare(batchCount: shape.batchCount, queries: shape.queries, keys: shape.keys)
    func steps(_ b: Int) throws -> AttentionSteps {
      try AttentionSteps.compute(
        queries: queries, keys: keys, values: values, batch: b, mask: mask, dropout: dropout,
        memoryBudget: memoryBudget)
    }
    var visuals = Visuals(options: self)
    if explain {
      visuals.steps = ExplainPrinter.dropoutSteps(
        try steps(batch), headDim: shape.headDim, dropout: dropout, mask: maskName,
        hasBias: mask.bias != nil)
      visuals.heading =
        Self.heading(batch, shape)
        + "Q [\(shape.queries), \(shape.headDim)], K [\(shape.keys), \(shape.headDim)], "
        + "V [\(shape.keys), \(shape.valueDim)]:"
    }
    let mode = dropout.map { "p = \(ExplainStep.decimal(Double($0.probability)))" } ?? "eval"
    let generator = rng == "philox" ? "" : " (\(rng) rng)"
    let parameters = "\(mode), seed \(seed)\(generator), mask \(maskName)"
    visuals.figures = { weights, path in
      let panels = try (0..<min(shape.batchCount, Self.maxPanels)).map { b in
        let s = try steps(b)
        let marks: [HeatmapSVG.Mark] = s.maskedScores.scalars.indices.map { k in
          if s.maskedScores.scalars[k] == -.infinity { return .masked }
          if let keep = s.keep, keep.scalars[k] == 0 { return .dropped }
          return .none
        }
        return Self.panel(weights, b, shape: shape, marks: marks)
      }
      let what = dropout == nil ? "attention weights" : "attention weights after dropout"
      let note = dropout.map {
        "kept weights × 1/(1−p) = \(ExplainStep.decimal(Double($0.keptScale)))"
      }
      let figure = Self.weightsFigure(
        title: "attn dropout: \(what) (\(parameters))", panels: panels, shape: shape, note: note)
      return [(path, figure)]
    }
    return visuals
  }

  /// `attn relpos`'s steps and heatmaps (weights, and the position term), from the module and
  /// the kernel's result; the shapes were checked by `prepare` before the kernel ran.
  func relpos(
    module: RelativePositionAttention, result: RelativePositionResult, mask: AttentionMask,
    maskName: String, weightsPath: String?, seed: UInt64, memoryBudget: Int
  ) throws -> Visuals {
    let (q, k, v) = (result.queries, result.keys, result.values)
    let shape = try AttentionShape(queries: q, keys: k, values: v)
    let m = module.maxDistance
    var visuals = Visuals(options: self)
    if explain {
      let steps = try module.steps(
        queries: q, keys: k, values: v, batch: batch, mask: mask, memoryBudget: memoryBudget)
      visuals.steps = ExplainPrinter.relposSteps(steps, modelDim: module.modelDim, mask: maskName)
      visuals.heading =
        Self.heading(batch, shape)
        + "Q, K, V [\(shape.queries), \(module.modelDim)] each (x·Wᵀ + b), "
        + "E [\(2 * m + 1), \(module.modelDim)], M = \(m):"
    }
    let source = weightsPath.map { "weights \($0)" } ?? "weights from seed \(seed)"
    let parameters = "d_model \(module.modelDim), M \(m), \(source), mask \(maskName)"
    visuals.figures = { weights, path in
      let count = min(shape.batchCount, Self.maxPanels)
      let panels = try (0..<count).map { b in
        let s = try module.steps(
          queries: q, keys: k, values: v, batch: b, mask: mask, memoryBudget: memoryBudget)
        let marks: [HeatmapSVG.Mark] = s.maskedScores.scalars.map {
          $0 == -.infinity ? .masked : .none
        }
        return Self.panel(weights, b, shape: shape, marks: marks)
      }
      // The position term of the shown batch elements only: [count, T, T].
      let shown = try Tensor(
        shape: [count, shape.queries, shape.headDim],
        scalars: Array(q.scalars.prefix(count * shape.queries * shape.headDim)))
      let position = try module.positionScores(queries: shown)
      let positionPanels = (0..<count).map { b in Self.panel(position, b, shape: shape, marks: []) }
      let finite = position.scalars.filter(\.isFinite)
      let positionFigure = HeatmapSVG(
        title: "attn relpos: relative-position term q_i·E[clip(j − i) + M]/√d_model "
          + "(\(parameters))",
        subtitle: Self.subtitle(shape: shape, shown: count)
          + " · each row is row i of Q·Eᵀ/√d_model slid along the diagonal, flat beyond ±M",
        valueLabel: "position term", low: Double(finite.min() ?? 0),
        high: Double(finite.max() ?? 1), panels: positionPanels, band: m)
      let figure = Self.weightsFigure(
        title: "attn relpos: attention weights (\(parameters))", panels: panels, shape: shape,
        note: nil)
      return [(path, figure), (Self.positionFigurePath(path), positionFigure)]
    }
    return visuals
  }

  // MARK: Figures

  private static func panel(
    _ matrices: Tensor, _ b: Int, shape: AttentionShape, marks: [HeatmapSVG.Mark]
  ) -> HeatmapSVG.Panel {
    let size = shape.queries * shape.keys
    return HeatmapSVG.Panel(
      title: elementName(b, shape.batchShape), rows: shape.queries, columns: shape.keys,
      values: Array(matrices.scalars[(b * size)..<(b * size + size)]), marks: marks)
  }

  /// Weights on a scale from 0 to the largest shown (above 1 after dropout's rescaling).
  private static func weightsFigure(
    title: String, panels: [HeatmapSVG.Panel], shape: AttentionShape, note: String?
  ) -> HeatmapSVG {
    let top = panels.flatMap(\.values).filter(\.isFinite).max() ?? 0
    return HeatmapSVG(
      title: title,
      subtitle: subtitle(shape: shape, shown: panels.count) + (note.map { " · " + $0 } ?? ""),
      valueLabel: "attention weight", low: 0, high: top > 0 ? Double(top) : 1, panels: panels)
  }

  private static func subtitle(shape: AttentionShape, shown: Int) -> String {
    let elements =
      shape.batchCount == 1
      ? "one matrix"
      : shown < shape.batchCount
        ? "the first \(shown) of \(shape.batchCount) batch elements"
        : "\(shape.batchCount) batch elements"
    return "\(shape.queries) queries × \(shape.keys) keys, \(elements)"
  }

  /// "Step by step, batch element 1 of 4 (batch 0, head 1), as the materialized kernel computes
  /// it.", a line break (the name only when the leading dimensions are not just `[B]`).
  private static func heading(_ b: Int, _ shape: AttentionShape) -> String {
    let name = shape.batchShape.count == 1 ? "" : " (\(elementName(b, shape.batchShape)))"
    return "Step by step, batch element \(b) of \(shape.batchCount)\(name), as the materialized "
      + "kernel computes it.\n"
  }

  /// `batch 2`, `batch 1, head 3`, or `element [1, 0, 2]` for a flat batch index.
  static func elementName(_ flat: Int, _ batchShape: [Int]) -> String {
    var index = [Int](repeating: 0, count: batchShape.count)
    var rest = flat
    for axis in stride(from: batchShape.count - 1, through: 0, by: -1) where batchShape[axis] > 0 {
      index[axis] = rest % batchShape[axis]
      rest /= batchShape[axis]
    }
    switch index.count {
    case 0: return "the matrix"
    case 1: return "batch \(index[0])"
    case 2: return "batch \(index[0]), head \(index[1])"
    default: return "element \(index)"
    }
  }
}

/// What `--explain` and `--heatmap` show for one run: the steps (for text and JSON) and the
/// figures, drawn from the kernel's weights once the checks have passed.
struct Visuals {
  let options: VisualizationOptions
  /// `--explain`'s steps, `nil` without it (so that JSON leaves `steps` out).
  var steps: [ExplainStep]?
  var heading = ""
  /// Each file and its figure, from the kernel's weights and the `--heatmap` path.
  fileprivate var figures: (Tensor, String) throws -> [(path: String, figure: HeatmapSVG)] = {
    _, _ in []
  }

  fileprivate init(options: VisualizationOptions) { self.options = options }

  /// `--explain`'s text, `nil` without it.
  var explanation: String? {
    steps.map { ExplainPrinter.text($0, heading: heading, precision: options.precision) }
  }

  /// `--explain`'s batch element, for JSON; `nil` without `--explain`.
  var batch: Int? { options.explain ? options.batch : nil }

  /// The heatmap files of `--heatmap` (none without it), for `CheckedRun`'s outputs. The
  /// figures are drawn here (at most `maxPanels` panels of `maxHeatmapSide`² cells); their SVG
  /// text only when they are written.
  func heatmapOutputs(weights: Tensor?) throws -> [(path: String?, bytes: () throws -> [UInt8])] {
    guard let path = options.heatmap else { return [] }
    guard let weights else {
      throw AttentionError.invalidArgument("the kernel returned no weights to draw")
    }
    return try figures(weights, path).map { file in
      (path: file.path, bytes: { file.figure.document().bytes() })
    }
  }
}
