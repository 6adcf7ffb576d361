import AttentionKit
import AttentionVerification

/// `attn mha --heatmap`: one panel per head of one batch element, on one colour scale, the
/// cells the masks hide crossed out, the axes labelled with the tokens when given.
enum HeadsFigure {
  static func make(
    weights: Tensor, reference: MultiHeadReference, batch b: Int, tokens: [String]?,
    title: String
  ) -> HeatmapSVG {
    let (heads, tq, tk) = (weights.shape[1], weights.shape[2], weights.shape[3])
    let shown = min(heads, MhaCommand.maxHeatmapPanels)
    let panels = (0..<shown).map { h in
      let base = (b * heads + h) * tq * tk
      var marks: [HeatmapSVG.Mark] = []
      for i in 0..<tq {
        for j in 0..<tk {
          marks.append(reference.isHidden(batch: b, head: h, query: i, key: j) ? .masked : .none)
        }
      }
      return HeatmapSVG.Panel(
        title: "head \(h)", rows: tq, columns: tk,
        values: Array(weights.scalars[base..<(base + tq * tk)]), marks: marks)
    }
    let top = panels.flatMap(\.values).filter(\.isFinite).max() ?? 0
    let heads_ = shown < heads ? "the first \(shown) of \(heads) heads" : "\(heads) heads"
    var figure = HeatmapSVG(
      title: title,
      subtitle: "batch element \(b): \(tq) queries × \(tk) keys, \(heads_)",
      valueLabel: "attention weight", low: 0, high: top > 0 ? Double(top) : 1, panels: panels)
    if let tokens {
      figure.tokens = tokens
      figure.rowLabel = "query token"
      figure.columnLabel = "key token"
    }
    return figure
  }
}
