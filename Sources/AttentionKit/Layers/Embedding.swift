import Tensors

/// A lookup table of learned vectors, PyTorch's `nn.Embedding`: row `n` of `weight` is the
/// embedding of index `n`.
///
/// `weight` is `[N, D]` (`N` entries of width `D`); looking up `n` indices gives `[n, D]`.
public struct Embedding: Sendable, Equatable {
  /// `[N, D]`.
  public let weight: Tensor

  /// `N`, the number of entries.
  public var count: Int { weight.shape[0] }
  /// `D`, the width of each embedding.
  public var dimension: Int { weight.shape[1] }

  /// A table with the given rows, `[N, D]`.
  public init(weight: Tensor) throws {
    guard weight.rank == 2 else {
      throw AttentionError.shapeMismatch(
        "an embedding table must be [N, D], got \(shapeForMessage(weight.shape))")
    }
    self.weight = weight
  }

  /// A table initialized as PyTorch's `nn.Embedding` is by default: every entry standard normal,
  /// `Tensor.randomNormal` on stream `stream` (see `RandomStream.parameters`).
  public init(count: Int, dimension: Int, seed: UInt64, stream: UInt32) throws {
    guard count > 0, dimension > 0 else {
      throw AttentionError.invalidArgument(
        "an embedding table needs positive sizes, got \(count) entries of width \(dimension)")
    }
    try self.init(
      weight: Tensor.randomNormal(shape: [count, dimension], seed: seed, stream: stream))
  }

  /// The rows of `indices`, in order: `[indices.count, D]` (the notebook's
  /// `self.relative_embeddings(relative_positions)` on flattened indices).
  public func callAsFunction(_ indices: [Int]) throws -> Tensor {
    let width = dimension
    var scalars: [Float] = []
    scalars.reserveCapacity(indices.count * width)
    for index in indices {
      guard index >= 0, index < count else {
        throw AttentionError.invalidArgument(
          "embedding index \(index) is outside the table of \(count) entries")
      }
      scalars += weight.scalars[(index * width)..<((index + 1) * width)]
    }
    return Tensor(validShape: [indices.count, width], scalars: scalars)
  }
}
