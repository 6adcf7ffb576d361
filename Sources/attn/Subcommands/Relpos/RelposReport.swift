import AttentionKit
import AttentionVerification
import Foundation

/// What `attn relpos` reports: the text (shapes, memory, the terminal heatmaps of the weights and
/// of the position term, the gradients' shapes) and the JSON document.
extension RelposCommand {
  func printText(
    module: RelativePositionAttention, inputs: Tensor, result: RelativePositionResult,
    gradients: RelativePositionGradients?, explanation: String?
  ) throws {
    let (b, t, d) = (inputs.shape[0], inputs.shape[1], module.modelDim)
    let source =
      weights.map { "weights \($0)" }
      ?? (rng == .torch ? "weights from torch.manual_seed(\(seed))" : "weights from seed \(seed)")
    print(
      "Exercise 3: relative position attention (d_model \(d), M \(module.maxDistance), "
        + "\(source), mask \(mask), \(kernelOptions.kernel) kernel)")
    print("Input shape: \(torchSizeDescription(inputs.shape))")
    print("Output shape: \(torchSizeDescription(result.output.shape))")
    print("Attention shape: \(torchSizeDescription([b, t, t]))")
    print(
      "Memory: \(formatBytes(result.workspaceBytes)) of workspace; the notebook's "
        + "[T, T, d_model] gather alone would take \(formatBytes(Self.gatherBytes(t: t, d: d)))")
    if t <= 64, b > 0 {
      let title = b > 1 ? " (batch 0 of \(b))" : ""
      if let weights = result.weights {
        print("\nAttention weights\(title):")
        print(TerminalHeatmap.render(Array(weights.scalars[0..<(t * t)]), rows: t, columns: t))
      }
      // The position term alone: each row is row i of R = Q·Eᵀ/√d shifted to the diagonal, so
      // bands parallel to the diagonal show the learned distances, flat beyond ±M.
      // Batch 0 only: the position term of the others is not shown.
      let firstQueries = try Tensor(
        shape: [1, t, d], scalars: Array(result.queries.scalars[0..<(t * d)]))
      let position = try module.positionScores(queries: firstQueries).scalars
      let low = position.min() ?? 0
      let high = position.max() ?? 0
      print("\nRelative-position term q_i·E[clip(j − i) + M]/√d_model\(title):")
      print(TerminalHeatmap.render(position, rows: t, columns: t, low: low, high: high))
    }
    if let explanation { print("\n" + explanation) }
    if let g = gradients, let gradOut {
      print("\nGradients (materialized kernel, dY from \(gradOut)):")
      print("  dx: \(torchSizeDescription(g.dx.shape))")
      for name in RelativePositionAttention.parameterNames {
        if let tensor = g.parameters.tensors[name] {
          print("  \(name): \(torchSizeDescription(tensor.shape))")
        }
      }
      print("Memory: \(formatBytes(g.workspaceBytes)) of workspace (P and dS per worker)")
    }
  }

  /// The shapes of `dx` and of every parameter gradient, by name (`x` for `dx`).
  static func gradientShapes(_ g: RelativePositionGradients) -> [String: [Int]] {
    var shapes = g.parameters.tensors.mapValues(\.shape)
    shapes["x"] = g.dx.shape
    return shapes
  }

  /// The bytes of the notebook's gathered `[T, T, d_model]` float32 embeddings.
  static func gatherBytes(t: Int, d: Int) -> Int {
    let (elements, overflow) = t.multipliedReportingOverflow(by: t * d)
    return overflow ? Int.max : elements * MemoryLayout<Float>.stride
  }
}

/// `attn relpos --format json`.
struct RelposReport: Encodable {
  var inputShape: [Int]
  var outputShape: [Int]
  var weightsShape: [Int]
  var dModel: Int
  var maxRel: Int
  var seed: UInt64
  var rng: String
  var weights: String
  var input: String
  var mask: String
  var kernel: String
  var workspaceBytes: Int
  var gatherBytes: Int
  var checks: [String: Bool]
  var verified: Bool
  /// With --grad-out: the gradient checks, the shapes of dx (`x`) and of each parameter
  /// gradient, and the backward kernel's workspace.
  var gradientChecks: [String: Bool]?
  var gradientShapes: [String: [Int]]?
  var gradientWorkspaceBytes: Int?
  /// With --explain: its batch element and the step matrices (`ExplainStep`).
  var explainBatch: Int?
  var steps: [ExplainStep]?
}
