import Foundation
import Tensors

/// Self-attention with learned relative positions: the notebook's `RelativePositionAttention`
/// (exercise 3), single head, no output projection.
///
/// Shapes: `x` is `[B, T, D]` with `D = d_model`; `M` is the largest relative distance told apart.
/// 1. `Q = x·W_qᵀ + b_q`, `K = x·W_kᵀ + b_k`, `V = x·W_vᵀ + b_v` (`nn.Linear` layout, `W` is
///    `[out, in]`), each one sgemm over all `B·T` rows: `[B, T, D]`.
/// 2. `score(i, j) = (q_i·k_j + q_i·E[clip(j − i, −M, M) + M]) / √D`, with `E` the `[2M + 1, D]`
///    embedding table. The relative position of key `j` seen from query `i` is `j − i`, as the
///    notebook's code computes it (its docstring says `i − j`; we follow the code, so weights
///    trained with it load unchanged).
/// 3. The mask (0 = masked), softmax over keys (a fully masked row gives zero weights and a zero
///    output row, where the notebook's code gives NaN), then `weights · V`: `[B, T, D]`.
///
/// The attention runs through `Attention.scaledDotProduct` with `RelativePositionBias`, which adds the position
/// term from `R = Q·Eᵀ` (`[T, 2M + 1]`) instead of the notebook's gathered `[T, T, D]` tensor.
/// `reference(_:mask:)` computes the notebook's way literally, in `Double`, for the tests.
///
/// Parameters are named as in the PyTorch module's `state_dict` (`parameterNames`), so weights move
/// between the two through safetensors.
public struct RelativePositionAttention: Sendable, Equatable {
  /// `W_q`: `[D, D]` weight, `[D]` bias.
  public let queryProjection: Linear
  /// `W_k`: `[D, D]` weight, `[D]` bias.
  public let keyProjection: Linear
  /// `W_v`: `[D, D]` weight, `[D]` bias.
  public let valueProjection: Linear
  /// `relative_embeddings`: `E`, `[2M + 1, D]`; row `r + M` is relative position `r ∈ [−M, M]`.
  public let relativeEmbeddings: Embedding
  /// `E` and `M` as the kernels take them.
  public let positionBias: RelativePositionBias

  /// `D`, `d_model`.
  public var modelDim: Int { queryProjection.inputFeatures }
  /// `M`, `max_relative_position`.
  public var maxDistance: Int { positionBias.maxDistance }
  /// `1/√D`, the notebook's scale of both score terms.
  public var scale: Float { 1 / Float(modelDim).squareRoot() }

  /// The `state_dict` names of the parameters, in the order of their random streams.
  public static let parameterNames = [
    "W_q.weight", "W_q.bias", "W_k.weight", "W_k.bias", "W_v.weight", "W_v.bias",
    "relative_embeddings.weight",
  ]

  /// A module from its layers: three `[D, D]` projections and a `[2M + 1, D]` table.
  public init(
    queryProjection: Linear, keyProjection: Linear, valueProjection: Linear,
    relativeEmbeddings: Embedding, maxDistance: Int
  ) throws {
    let d = queryProjection.inputFeatures
    for (name, layer) in [
      ("W_q", queryProjection), ("W_k", keyProjection),
      ("W_v", valueProjection),
    ] {
      guard layer.weight.shape == [d, d] else {
        throw AttentionError.shapeMismatch(
          "\(name).weight must be [d_model, d_model] = [\(d), \(d)], got \(shapeForMessage(layer.weight.shape))"
        )
      }
    }
    guard relativeEmbeddings.dimension == d else {
      throw AttentionError.shapeMismatch(
        "relative_embeddings.weight \(shapeForMessage(relativeEmbeddings.weight.shape)) has width "
          + "\(relativeEmbeddings.dimension), d_model is \(d)")
    }
    self.queryProjection = queryProjection
    self.keyProjection = keyProjection
    self.valueProjection = valueProjection
    self.relativeEmbeddings = relativeEmbeddings
    self.positionBias = try RelativePositionBias(
      embeddings: relativeEmbeddings.weight, maxDistance: maxDistance)
  }

  /// A module initialized as PyTorch initializes a fresh one (`Linear`: weights and biases uniform
  /// in `±1/√D`; `Embedding`: standard normal), from `seed`. Parameter `k` of `parameterNames`
  /// uses stream `RandomStream.parameters + k`.
  public init(modelDim: Int, maxDistance: Int, seed: UInt64) throws {
    guard modelDim > 0 else {
      throw AttentionError.invalidArgument("d_model must be positive, got \(modelDim)")
    }
    guard maxDistance >= 0 else {
      throw AttentionError.invalidArgument(
        "max relative position must be ≥ 0, got \(maxDistance)")
    }
    let (rows, overflow) = maxDistance.multipliedReportingOverflow(by: 2)
    guard !overflow else {
      throw AttentionError.invalidArgument(
        "max relative position \(maxDistance) is too large for a table of 2M + 1 rows")
    }
    let base = RandomStream.parameters
    func linear(_ k: UInt32) throws -> Linear {
      try Linear(inputFeatures: modelDim, outputFeatures: modelDim, seed: seed, stream: base + k)
    }
    try self.init(
      queryProjection: linear(0), keyProjection: linear(2), valueProjection: linear(4),
      relativeEmbeddings: Embedding(
        count: rows + 1, dimension: modelDim, seed: seed, stream: base + 6),
      maxDistance: maxDistance)
  }

  /// Equal parameters (`RelativePositionBias` is not itself `Equatable`; its table is `E`).
  public static func == (a: Self, b: Self) -> Bool {
    a.queryProjection == b.queryProjection && a.keyProjection == b.keyProjection
      && a.valueProjection == b.valueProjection && a.relativeEmbeddings == b.relativeEmbeddings
      && a.maxDistance == b.maxDistance
  }

  // MARK: - Weights in files

  /// The parameters by `state_dict` name. A projection without bias has no `.bias` entry.
  public var stateDict: StateDict {
    var tensors = ["relative_embeddings.weight": relativeEmbeddings.weight]
    for (name, layer) in [
      ("W_q", queryProjection), ("W_k", keyProjection), ("W_v", valueProjection),
    ] {
      tensors[name + ".weight"] = layer.weight
      tensors[name + ".bias"] = layer.bias
    }
    return StateDict(tensors)
  }

  /// `D` and `M` as named tensors give them: `D` from `W_q.weight` (`[D, D]`), `M` from
  /// `relative_embeddings.weight` (`[2M + 1, D]`). Throws `AttentionError.parameter` naming the
  /// tensor when either is missing or not of that form.
  public static func dimensions(
    in stateDict: StateDict
  ) throws -> (modelDim: Int, maxDistance: Int) {
    let query = try stateDict.tensor(named: "W_q.weight")
    guard query.rank == 2, query.shape[0] == query.shape[1], query.shape[0] > 0 else {
      throw AttentionError.parameter(
        name: "W_q.weight",
        message: "has shape \(shapeForMessage(query.shape)), expected [d_model, d_model]")
    }
    let d = query.shape[0]
    let table = try stateDict.tensor(named: "relative_embeddings.weight")
    guard table.rank == 2, table.shape[0] % 2 == 1, table.shape[1] == d else {
      throw AttentionError.parameter(
        name: "relative_embeddings.weight",
        message: "has shape \(shapeForMessage(table.shape)), expected [2M + 1, \(d)] (an odd "
          + "number of rows, d_model columns)")
    }
    return (d, (table.shape[0] - 1) / 2)
  }

  /// The module whose parameters `stateDict` holds under the `state_dict` names, with `D` and `M`
  /// inferred from their shapes (`dimensions(in:)`).
  ///
  /// Like PyTorch's `load_state_dict(strict=True)`, every parameter must be present with its
  /// exact shape and no other tensor may be there; each violation throws an
  /// `AttentionError.parameter` naming the tensor.
  public init(stateDict: StateDict) throws {
    let (d, m) = try Self.dimensions(in: stateDict)
    try stateDict.checkNoOthers(
      than: Self.parameterNames, module: "a relative-position attention module")
    func linear(_ name: String) throws -> Linear {
      try Linear(
        weight: stateDict.tensor(named: name + ".weight", shape: [d, d]),
        bias: stateDict.tensor(named: name + ".bias", shape: [d]))
    }
    try self.init(
      queryProjection: linear("W_q"), keyProjection: linear("W_k"),
      valueProjection: linear("W_v"),
      relativeEmbeddings: Embedding(
        weight: stateDict.tensor(named: "relative_embeddings.weight", shape: [2 * m + 1, d])),
      maxDistance: m)
  }

  // MARK: - Forward

  /// Step 1: `Q`, `K`, `V`, each `[B, T, D]`, from `x` `[B, T, D]`; one sgemm each.
  public func project(_ x: Tensor) throws -> (queries: Tensor, keys: Tensor, values: Tensor) {
    try checkInput(x)
    return (try queryProjection(x), try keyProjection(x), try valueProjection(x))
  }

  /// Steps 2–3 on projected `Q`, `K`, `V` (`[B, T, D]`) through `Attention.scaledDotProduct`
  /// with this module's position term and scale; the only place the module computes attention,
  /// so that every kernel sees the same inputs.
  ///
  /// `mask` broadcasts to `[B, T, T]` (0 = masked); `kernel`, `needWeights`, `threads` and
  /// `memoryBudget` are the entry point's.
  public func attention(
    queries: Tensor, keys: Tensor, values: Tensor, mask: AttentionMask = .none,
    kernel: Attention.Kernel = .materialized, needWeights: Bool = true, threads: Int? = nil,
    memoryBudget: Int? = nil
  ) throws -> AttentionResult {
    try Attention.scaledDotProduct(
      queries: queries, keys: keys, values: values, mask: mask, scale: scale,
      terms: ScoreTerms(relativePosition: positionBias), kernel: kernel, needWeights: needWeights,
      threads: threads,
      memoryBudget: memoryBudget)
  }

  /// The notebook's `forward(x, mask)`: output `[B, T, D]` and weights `[B, T, T]` (when the
  /// kernel holds them), with the projections kept for verification, and the bytes allocated on
  /// the way (`RelativePositionResult.workspaceBytes`: the kernel's workspace and the projections).
  public func callAsFunction(
    _ x: Tensor, mask: AttentionMask = .none, kernel: Attention.Kernel = .materialized,
    needWeights: Bool = true, threads: Int? = nil, memoryBudget: Int? = nil
  ) throws -> RelativePositionResult {
    let (q, k, v) = try project(x)
    let result = try attention(
      queries: q, keys: k, values: v, mask: mask, kernel: kernel, needWeights: needWeights,
      threads: threads, memoryBudget: memoryBudget)
    return RelativePositionResult(attention: result, queries: q, keys: k, values: v)
  }

  /// The position term alone, `q_i·E[clip(j − i) + M] / √D`, `[B, T, T]`, from `Q` `[B, T, D]`.
  ///
  /// Along each row it is a shifted copy of row `i` of `R = Q·Eᵀ/√D`: constant left of `i − M`
  /// and right of `i + M` (the clipped distances), so it shows the Toeplitz-like band of learned
  /// distances. Memory is `B·T·T` floats: meant for small `T` (display, tests).
  public func positionScores(queries: Tensor) throws -> Tensor {
    guard queries.rank == 3, queries.shape[2] == modelDim else {
      throw AttentionError.shapeMismatch(
        "queries must be [B, T, d_model] = [B, T, \(modelDim)], got \(shapeForMessage(queries.shape))"
      )
    }
    let (b, t) = (queries.shape[0], queries.shape[1])
    let width = positionBias.tableWidth
    // R = scale·Q·Eᵀ over all B·T rows at once: [B·T, 2M + 1].
    let table = try queries.reshaped([b * t, modelDim])
      .matmul(relativeEmbeddings.weight, transposeRight: true, alpha: scale)
    var scores = try Tensor(shape: [b, t, t])
    for row in 0..<(b * t) {
      let i = row % t
      for j in 0..<t {
        let r = positionBias.index(query: i, key: j)
        scores.scalars[row * t + j] = table.scalars[row * width + r]
      }
    }
    return scores
  }

  private func checkInput(_ x: Tensor) throws {
    guard x.rank == 3, x.shape[2] == modelDim else {
      throw AttentionError.shapeMismatch(
        "input must be [B, T, d_model] = [B, T, \(modelDim)], got \(shapeForMessage(x.shape))")
    }
  }

  // MARK: - Reference

  /// The largest `T·T·D` that `reference` accepts: its gathered embeddings are `T·T·D` doubles.
  public static let referenceElementLimit = 1 << 24

  /// The notebook's forward computed literally, in `Double`, for checking the fast path on small
  /// problems: projections with loops, the gathered `[T, T, D]` tensor
  /// `relative_emb[i, j] = E[clip(j − i) + M]`, the contractions `Σ_c q_ic·k_jc` and
  /// `Σ_c q_ic·relative_emb[i, j, c]` (the notebook's `einsum('bqd,qkd->bqk')`), then the mask,
  /// a softmax with `Foundation.exp`, and `weights·V`. No BLAS, no kernel, nothing shared with
  /// the fast path but the mask's broadcasting.
  ///
  /// Throws `AttentionError.memoryBudget` when `T·T·D` exceeds `referenceElementLimit`.
  public func reference(
    _ x: Tensor, mask: AttentionMask = .none
  ) throws -> RelativePositionReference {
    try checkInput(x)
    let (b, t, d) = (x.shape[0], x.shape[1], modelDim)
    let (gathered, overflow) = t.multipliedReportingOverflow(by: t * d)
    guard !overflow, gathered <= Self.referenceElementLimit else {
      let bytes = overflow ? nil : gathered.multipliedReportingOverflow(by: 8)
      throw AttentionError.memoryBudget(
        MemoryBudgetExceeded(
          what: "the reference path's gathered [T, T, D] = [\(t), \(t), \(d)] tensor",
          neededBytes: bytes.flatMap { $0.overflow ? nil : $0.partialValue },
          budgetBytes: Self.referenceElementLimit * 8,
          advice: .other("it is for small problems")))
    }
    let resolved = try ResolvedMask(mask, batchShape: [b], queries: t, keys: t)
    let input = x.scalars.map(Double.init)

    // Q, K, V = x·Wᵀ + b: [B, T, D].
    func project(_ layer: Linear) -> [Double] {
      var y = [Double](repeating: 0, count: b * t * d)
      for row in 0..<(b * t) {
        for o in 0..<d {
          var sum = layer.bias.map { Double($0.scalars[o]) } ?? 0
          for c in 0..<d { sum += input[row * d + c] * Double(layer.weight.scalars[o * d + c]) }
          y[row * d + o] = sum
        }
      }
      return y
    }
    let q = project(queryProjection)
    let k = project(keyProjection)
    let v = project(valueProjection)

    // relative_emb[i, j] = E[clip(j − i, −M, M) + M]: [T, T, D].
    let m = maxDistance
    var indices: [Int] = []
    indices.reserveCapacity(t * t)
    for i in 0..<t {
      for j in 0..<t { indices.append(min(max(j - i, -m), m) + m) }
    }
    let relative = try relativeEmbeddings(indices).scalars.map(Double.init)

    let scale = 1 / Double(d).squareRoot()
    var weights = [Double](repeating: 0, count: b * t * t)
    var output = [Double](repeating: 0, count: b * t * d)
    for batch in 0..<b {
      for i in 0..<t {
        let qi = (batch * t + i) * d
        var scores = [Double](repeating: -.infinity, count: t)
        for j in 0..<t {
          var content = 0.0
          var position = 0.0
          for c in 0..<d {
            content += q[qi + c] * k[(batch * t + j) * d + c]
            position += q[qi + c] * relative[(i * t + j) * d + c]
          }
          var s = (content + position) * scale
          if let bias = resolved.bias { s += Double(bias.value(batch: batch, row: i, column: j)) }
          if let keep = resolved.keep, keep.value(batch: batch, row: i, column: j) == 0 {
            s = -.infinity
          }
          if !resolved.visibleKeys(query: i).contains(j) { s = -.infinity }
          scores[j] = s
        }
        // Softmax; a row with every key masked stays all zero (PyTorch ≥ 2.5), not NaN.
        let peak = scores.max() ?? -.infinity
        guard peak != -.infinity else { continue }
        let exps = scores.map { exp($0 - peak) }
        let sum = exps.reduce(0, +)
        for j in 0..<t {
          let w = exps[j] / sum
          weights[(batch * t + i) * t + j] = w
          for c in 0..<d { output[qi + c] += w * v[(batch * t + j) * d + c] }
        }
      }
    }
    return RelativePositionReference(
      batch: b, length: t, modelDim: d, output: output, weights: weights)
  }
}

/// What `RelativePositionAttention` returns for `x` `[B, T, D]`.
public struct RelativePositionResult: Sendable {
  /// The kernel's result on the projections: output `[B, T, D]`, weights `[B, T, T]` (`nil`
  /// from a kernel that never holds the whole matrix), and the kernel's own workspace.
  public var attention: AttentionResult
  /// The projections `Q`, `K`, `V`, each `[B, T, D]`.
  public var queries: Tensor
  public var keys: Tensor
  public var values: Tensor

  /// `[B, T, D]`.
  public var output: Tensor { attention.output }
  /// `[B, T, T]`, or `nil`.
  public var weights: Tensor? { attention.weights }
  /// Bytes allocated beyond `x`, the parameters and the output: the kernel's workspace plus the
  /// three projection buffers (`3·B·T·D` floats).
  public var workspaceBytes: Int {
    let projections = queries.count + keys.count + values.count
    return attention.workspaceBytes + projections * MemoryLayout<Float>.stride
  }
}

/// The float64 result of `RelativePositionAttention.reference`.
public struct RelativePositionReference: Sendable {
  public var batch: Int
  public var length: Int
  public var modelDim: Int
  /// `[B, T, D]`, row-major.
  public var output: [Double]
  /// `[B, T, T]`, row-major.
  public var weights: [Double]
}
