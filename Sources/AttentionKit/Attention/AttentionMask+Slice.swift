import Tensors

extension AttentionMask {
  /// The mask of the flat query batches `batches` alone (for example the query heads that share
  /// one key/value head): keep and bias laid out over `[1, n, Tq, Tk]` (n = `batches.count`),
  /// causal alignment and window unchanged — so that a slice of a problem can be checked on its
  /// own with the masks it had in the whole.
  public func slice(queryBatches batches: Range<Int>, shape: AttentionShape) throws
    -> AttentionMask
  {
    let resolved = try ResolvedMask(
      self, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    let (tq, tk) = (shape.queries, shape.keys)
    func laidOut(_ matrix: BroadcastMatrix?) -> Tensor? {
      guard let matrix else { return nil }
      var scalars = [Float](repeating: 0, count: batches.count * tq * tk)
      for (n, b) in batches.enumerated() {
        for i in 0..<tq {
          for j in 0..<tk {
            scalars[(n * tq + i) * tk + j] = matrix.value(batch: b, row: i, column: j)
          }
        }
      }
      return Tensor(validShape: [1, batches.count, tq, tk], scalars: scalars)
    }
    var sliced = self
    sliced.keep = laidOut(resolved.keep)
    sliced.bias = laidOut(resolved.bias)
    return sliced
  }
}
