import AttentionKit

extension ExplainStep {
  /// The backward pass of one batch element (flat query batch `b` of the reference's region),
  /// from the float64 reference: the forward's weights, the dropout decisions, dO, then dV, dP,
  /// Δ, dS, dQ and dK in the order they are computed.
  public static func backwardSteps(
    reference r: ReferenceGradients, queries: Tensor, keys: Tensor, values: Tensor,
    gradOutput: Tensor, batch b: Int, shape: AttentionShape, dropout: Dropout?
  ) -> [ExplainStep] {
    let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
    let kv = shape.keyValueBatch(b)
    let scale = Double(shape.resolvedScale(nil))
    func matrix(_ rows: Int, _ columns: Int, _ value: (Int, Int) -> Double) -> Tensor {
      var scalars = [Float](repeating: 0, count: rows * columns)
      for i in 0..<rows { for j in 0..<columns { scalars[i * columns + j] = Float(value(i, j)) } }
      return Tensor(validShape: [rows, columns], scalars: scalars)
    }
    func p(_ i: Int, _ j: Int) -> Double { r.probabilities[(b * tq + i) * tk + j] }
    let keptScale = dropout.map { Double($0.keptScale) } ?? 1
    func z(_ i: Int, _ j: Int) -> Double {
      guard let kept = r.dropoutKept else { return 1 }
      return kept[(b * tq + i) * tk + j] ? keptScale : 0
    }
    func dO(_ i: Int, _ c: Int) -> Double { Double(gradOutput.scalars[(b * tq + i) * dv + c]) }
    func v(_ j: Int, _ c: Int) -> Double { Double(values.scalars[(kv * tk + j) * dv + c]) }
    func dP(_ i: Int, _ j: Int) -> Double {
      (0..<dv).reduce(0.0) { $0 + dO(i, $1) * v(j, $1) } * z(i, j)
    }
    let delta = (0..<tq).map { i in (0..<tk).reduce(0.0) { $0 + p(i, $1) * dP(i, $1) } }
    func dS(_ i: Int, _ j: Int) -> Double { r.dS[(b * tq + i) * tk + j] }
    var steps = [
      ExplainStep(
        name: "weights", title: "P = softmax(S)", axes: "query × key",
        description: "The forward's weights, recomputed: the backward needs them (the tiled "
          + "kernel recomputes them tile by tile from the row's log-sum-exp L).",
        matrix: matrix(tq, tk, p), showsRowSums: true)
    ]
    if let dropout, r.dropoutKept != nil {
      steps.append(
        ExplainStep(
          name: "dropout_mask", title: "dropout mask Z", axes: "query × key",
          description: "The forward's decisions (p = \(decimal(Double(dropout.probability))), "
            + "seed \(dropout.seed)), regenerated from Philox's counters: never stored.",
          matrix: matrix(tq, tk) { i, j in z(i, j) == 0 ? 0 : 1 }, kind: .integer))
    }
    steps += [
      ExplainStep(
        name: "grad_output", title: "dO", axes: "query × value dimension",
        description: "The upstream gradient ∂loss/∂O: where the loss wants each output to move.",
        matrix: matrix(tq, dv, dO)),
      ExplainStep(
        name: "grad_values", title: "dV = Pdᵀ·dO", axes: "key × value dimension",
        description: "Each value row moves by the dO of the queries that used it, weighted by "
          + "their (dropped-out) weights; with grouped heads, the group's heads add up.",
        matrix: matrix(tk, dv) { j, c in
          (0..<tq).reduce(0.0) { $0 + p($1, j) * z($1, j) * dO($1, c) }
        }),
      ExplainStep(
        name: "grad_weights", title: "dP = dO·Vᵀ" + (dropout == nil ? "" : " ∘ Z/(1−p)"),
        axes: "query × key",
        description: "How the loss changes with each weight: dO_i·v_j"
          + (dropout == nil ? "." : ", zero where dropped, × 1/(1−p) where kept."),
        matrix: matrix(tq, tk, dP)),
      ExplainStep(
        name: "delta", title: "Δ = rowsum(dO∘O)", axes: "query × 1",
        description: "Σ_j P_ij·dP_ij, computed as dO_i·O_i: the weighted mean of the row's dP.",
        matrix: matrix(tq, 1) { i, _ in delta[i] }),
      ExplainStep(
        name: "grad_scores", title: "dS = P∘(dP − Δ)", axes: "query × key",
        description: "Softmax's Jacobian collapses to this: each row sums to 0, since shifting "
          + "every score of a row changes nothing.",
        matrix: matrix(tq, tk, dS), showsRowSums: true),
      ExplainStep(
        name: "grad_queries", title: "dQ = scale·dS·K", axes: "query × head dimension",
        description: "scale = 1/√\(d) = \(decimal(scale)); each query moves toward the keys "
          + "whose scores should rise.",
        matrix: matrix(tq, d) { i, c in
          scale
            * (0..<tk).reduce(0.0) { $0 + dS(i, $1) * Double(keys.scalars[(kv * tk + $1) * d + c]) }
        }),
      ExplainStep(
        name: "grad_keys", title: "dK = scale·dSᵀ·Q", axes: "key × head dimension",
        description: "The same for the keys, from the queries that saw them.",
        matrix: matrix(tk, d) { j, c in
          scale
            * (0..<tq).reduce(0.0) {
              $0 + dS($1, j) * Double(queries.scalars[(b * tq + $1) * d + c])
            }
        }),
    ]
    return steps
  }
}
