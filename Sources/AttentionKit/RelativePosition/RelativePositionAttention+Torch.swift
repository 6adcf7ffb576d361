import Tensors

/// The notebook's layers initialized exactly as PyTorch initializes them, from a `TorchGenerator`:
/// after `torch.manual_seed(s)`, `RelativePositionAttention(d, M)` in Python and
/// `RelativePositionAttention.torchInitialized(modelDim: d, maxDistance: M,
/// generator: &g)` with `g = TorchGenerator(seed: s)` hold the same float32 parameters, bit for
/// bit, and leave the generators in the same state (so a following `torch.randn` and
/// `g.randn` agree too).

extension Linear {
  /// `nn.Linear(inputFeatures, outputFeatures, bias)` as its constructor draws it
  /// (`reset_parameters`): first `W` `[out, in]` by `kaiming_uniform_(W, a=√5)`, then `b` `[out]`
  /// by `uniform_(−1/√in, 1/√in)`.
  ///
  /// Kaiming's bound is computed as `torch.nn.init` computes it, in double:
  /// `gain = √(2/(1 + a²))`, `bound = √3·gain/√in` (mathematically `1/√in`, the bias bound, but
  /// the two roundings can differ in the last bit, which `uniform` then sees).
  public static func torchInitialized(
    inputFeatures: Int, outputFeatures: Int, bias: Bool = true,
    generator: inout TorchGenerator
  ) throws -> Linear {
    guard inputFeatures > 0, outputFeatures > 0 else {
      throw AttentionError.invalidArgument(
        "a linear layer needs positive widths, got in \(inputFeatures), out \(outputFeatures)")
    }
    let fanIn = Double(inputFeatures)
    let slope = 5.0.squareRoot()
    let gain = (2 / (1 + slope * slope)).squareRoot()
    let weightBound = 3.0.squareRoot() * (gain / fanIn.squareRoot())
    let weight = try generator.uniform(
      shape: [outputFeatures, inputFeatures], low: -weightBound, high: weightBound)
    let biasBound = 1 / fanIn.squareRoot()
    let biasTensor =
      bias
      ? try generator.uniform(shape: [outputFeatures], low: -biasBound, high: biasBound) : nil
    return try Linear(weight: weight, bias: biasTensor)
  }
}

extension Embedding {
  /// `nn.Embedding(count, dimension)` as its constructor draws it: `normal_(W)` on the `[N, D]`
  /// table, mean 0 and std 1 (`TorchGenerator.normal`, the ≥ 16-element path when `N·D ≥ 16`).
  public static func torchInitialized(
    count: Int, dimension: Int, generator: inout TorchGenerator
  ) throws -> Embedding {
    guard count > 0, dimension > 0 else {
      throw AttentionError.invalidArgument(
        "an embedding table needs positive sizes, got \(count) entries of width \(dimension)")
    }
    return try Embedding(weight: generator.randn(shape: [count, dimension]))
  }
}

extension RelativePositionAttention {
  /// The notebook's `RelativePositionAttention(d_model, max_relative_position)` as its
  /// constructor draws it from the generator: `W_q`, `W_k`, `W_v` (`nn.Linear(d, d)`: weight,
  /// then bias, each), then `relative_embeddings` (`nn.Embedding(2M + 1, d)`), in that order.
  ///
  /// Throws `AttentionError.invalidArgument` for `d_model ≤ 0`, `M < 0` or a `2M + 1` that
  /// overflows.
  public static func torchInitialized(
    modelDim: Int, maxDistance: Int, generator: inout TorchGenerator
  ) throws -> RelativePositionAttention {
    guard maxDistance >= 0 else {
      throw AttentionError.invalidArgument(
        "max relative position must be ≥ 0, got \(maxDistance)")
    }
    let (doubled, overflow) = maxDistance.multipliedReportingOverflow(by: 2)
    guard !overflow, doubled < Int.max else {
      throw AttentionError.invalidArgument(
        "max relative position \(maxDistance) is too large for a table of 2M + 1 rows")
    }
    func projection() throws -> Linear {
      try Linear.torchInitialized(
        inputFeatures: modelDim, outputFeatures: modelDim, generator: &generator)
    }
    let query = try projection()
    let key = try projection()
    let value = try projection()
    let table = try Embedding.torchInitialized(
      count: doubled + 1, dimension: modelDim, generator: &generator)
    return try RelativePositionAttention(
      queryProjection: query, keyProjection: key, valueProjection: value,
      relativeEmbeddings: table, maxDistance: maxDistance)
  }
}
