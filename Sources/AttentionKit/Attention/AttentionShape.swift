import Tensors

/// The validated shapes of one attention call.
///
/// Legend used everywhere: `B` batch, `H` heads, `Tq` queries, `Tk` keys, `D` head dimension,
/// `Dv` value dimension. Queries `[…, Tq, D]`, keys `[…, Tk, D]`, values `[…, Tk, Dv]`; the leading
/// dimensions `…` (for example `[B, H]`) are any number of equal batch dimensions.
public struct AttentionShape: Sendable, Equatable {
  public let batchShape: [Int]
  /// The product of `batchShape` (`B·H` for `[B, H, T, D]` inputs).
  public let batchCount: Int
  public let queries: Int
  public let keys: Int
  public let headDim: Int
  public let valueDim: Int

  public init(queries q: Tensor, keys k: Tensor, values v: Tensor) throws {
    guard q.rank >= 2, k.rank >= 2, v.rank >= 2 else {
      throw AttentionError.shapeMismatch(
        "queries \(shapeForMessage(q.shape)), keys \(shapeForMessage(k.shape)) and values \(shapeForMessage(v.shape)) need at least 2 dimensions"
      )
    }
    guard q.batchShape == k.batchShape, k.batchShape == v.batchShape else {
      throw AttentionError.shapeMismatch(
        "leading dimensions differ: queries \(shapeForMessage(q.shape)), keys \(shapeForMessage(k.shape)), values \(shapeForMessage(v.shape))"
      )
    }
    guard q.shape[q.rank - 1] == k.shape[k.rank - 1] else {
      throw AttentionError.shapeMismatch(
        "queries \(shapeForMessage(q.shape)) and keys \(shapeForMessage(k.shape)) have different head dimensions D"
      )
    }
    guard k.shape[k.rank - 2] == v.shape[v.rank - 2] else {
      throw AttentionError.shapeMismatch(
        "keys \(shapeForMessage(k.shape)) and values \(shapeForMessage(v.shape)) have different numbers of keys Tk"
      )
    }
    batchShape = q.batchShape
    batchCount = q.batchCount
    queries = q.shape[q.rank - 2]
    keys = k.shape[k.rank - 2]
    headDim = q.shape[q.rank - 1]
    valueDim = v.shape[v.rank - 1]
    try BLAS.checkDimensions(queries, keys, headDim, valueDim, context: "attention")
  }

  /// The output's shape, `[…, Tq, Dv]`.
  public var outputShape: [Int] { batchShape + [queries, valueDim] }
  /// The attention weights' shape, `[…, Tq, Tk]`.
  public var weightsShape: [Int] { batchShape + [queries, keys] }

  /// `1/√D`, the scale of "Attention Is All You Need", unless overridden.
  public func resolvedScale(_ scale: Float?) -> Float {
    scale ?? 1 / Float(headDim).squareRoot()
  }
}
