import Tensors

/// A fully connected layer in PyTorch's `nn.Linear` layout: `y = x·Wᵀ + b`.
///
/// `W` is `[out, in]` (one row per output feature, as in a PyTorch `state_dict`), `b` is `[out]`.
/// Applied to `x` of shape `[…, in]` it gives `[…, out]`, with every leading dimension folded into
/// the rows of one sgemm (`[N, in] · [out, in]ᵀ`, `N` the product of the leading dimensions), so a
/// `[B, T, in]` input costs one BLAS call, not `B`.
public struct Linear: Sendable, Equatable {
  /// `W`, `[out, in]`.
  public let weight: Tensor
  /// `b`, `[out]`; `nil` for a layer without bias (`bias=False`).
  public let bias: Tensor?

  /// `in`, the width of the inputs.
  public var inputFeatures: Int { weight.shape[1] }
  /// `out`, the width of the outputs.
  public var outputFeatures: Int { weight.shape[0] }

  /// A layer with the given parameters: `weight` `[out, in]`, `bias` `[out]` or `nil`.
  public init(weight: Tensor, bias: Tensor?) throws {
    guard weight.rank == 2 else {
      throw AttentionError.shapeMismatch(
        "a linear layer's weight must be [out, in], got \(shapeForMessage(weight.shape))")
    }
    if let bias, bias.shape != [weight.shape[0]] {
      throw AttentionError.shapeMismatch(
        "a linear layer's bias must be [out] = [\(weight.shape[0])] for weight \(shapeForMessage(weight.shape)), "
          + "got \(shapeForMessage(bias.shape))")
    }
    self.weight = weight
    self.bias = bias
  }

  /// A layer initialized as PyTorch's `nn.Linear` is by default, from a seeded Philox generator.
  ///
  /// PyTorch draws `W` by Kaiming-uniform with `a = √5`, whose bound `gain·√(3/in)` with
  /// `gain = √(2/(1 + a²))` is exactly `1/√in`, and `b` uniformly in the same `±1/√in`. Here `W`
  /// is `Tensor.randomUniform` on stream `stream` and `b` on stream `stream + 1` (see
  /// `RandomStream.parameters`); the numbers are not PyTorch's, only their distribution is.
  public init(
    inputFeatures: Int, outputFeatures: Int, bias: Bool = true, seed: UInt64, stream: UInt32
  ) throws {
    guard inputFeatures > 0, outputFeatures > 0 else {
      throw AttentionError.invalidArgument(
        "a linear layer needs positive widths, got in \(inputFeatures), out \(outputFeatures)")
    }
    let bound = 1 / Float(inputFeatures).squareRoot()
    let weight = try Tensor.randomUniform(
      shape: [outputFeatures, inputFeatures], low: -bound, high: bound, seed: seed, stream: stream)
    let biasTensor =
      bias
      ? try Tensor.randomUniform(
        shape: [outputFeatures], low: -bound, high: bound, seed: seed, stream: stream &+ 1)
      : nil
    try self.init(weight: weight, bias: biasTensor)
  }

  /// `y = x·Wᵀ + b`: `x` `[…, in]` → `[…, out]`.
  ///
  /// The output is first filled with `b` on every row, then one sgemm adds `x·Wᵀ` to it
  /// (`beta = 1`), as PyTorch's `addmm` does: no second pass over the output for the bias. A
  /// single row (one token) takes sgemv instead, which streams `W` once without packing it.
  public func callAsFunction(_ x: Tensor) throws -> Tensor {
    try Self.sideBySide([self], x)
  }

  /// The outputs of `layers` (the same input width) on `x` `[…, in]`, side by side:
  /// `[…, Σ out]`, each layer's columns after the previous layer's — one output buffer written by
  /// each layer's own product (its leading dimension the total width), so that a layer's
  /// query, key and value projections come out as one tensor without their weights stacked in a
  /// second copy.
  public static func sideBySide(_ layers: [Linear], _ x: Tensor) throws -> Tensor {
    let inWidth = layers[0].inputFeatures
    let total = layers.map(\.outputFeatures).reduce(0, +)
    guard layers.allSatisfy({ $0.inputFeatures == inWidth }) else {
      throw AttentionError.shapeMismatch("layers side by side must take inputs of one width")
    }
    guard x.rank >= 1, x.shape[x.rank - 1] == inWidth else {
      throw AttentionError.shapeMismatch(
        "a linear layer with weight \(shapeForMessage(layers[0].weight.shape)) takes inputs [..., \(inWidth)], got \(shapeForMessage(x.shape))"
      )
    }
    let rows = inWidth == 0 ? x.shape.dropLast().reduce(1, *) : x.count / inWidth
    try BLAS.checkDimensions(rows, inWidth, total, context: "linear layer")
    var output = try Tensor(shape: Array(x.shape.dropLast()) + [total])
    guard rows > 0, total > 0 else { return output }
    var column = 0
    for layer in layers {
      let outWidth = layer.outputFeatures
      defer { column += outWidth }
      guard outWidth > 0 else { continue }
      if let bias = layer.bias {
        output.scalars.withUnsafeMutableBufferPointer { y in
          for row in 0..<rows {
            (y.baseAddress! + row * total + column).update(from: bias.scalars, count: outWidth)
          }
        }
      }
      guard inWidth > 0 else { continue }
      x.scalars.withUnsafeBufferPointer { a in
        layer.weight.scalars.withUnsafeBufferPointer { w in
          output.scalars.withUnsafeMutableBufferPointer { y in
            let target = y.baseAddress! + column
            if rows == 1 {
              BLAS.sgemv(
                m: outWidth, n: inWidth, a: w.baseAddress!, lda: inWidth, x: a.baseAddress!,
                beta: layer.bias == nil ? 0 : 1, y: target)
              return
            }
            BLAS.sgemm(
              transposeB: true, m: rows, n: outWidth, k: inWidth,
              a: a.baseAddress!, lda: inWidth, b: w.baseAddress!, ldb: inWidth,
              beta: layer.bias == nil ? 0 : 1, c: target, ldc: total)
          }
        }
      }
    }
    return output
  }
}
