import Tensors

extension ScoreTerms {
  /// The terms of query heads `range` of `heads`, for a problem cut down to those heads (as
  /// `AttentionMask.slice` cuts the mask): the sinks, ALiBi slopes and T5 table columns of those
  /// heads; the soft-cap and the relative-position term as they are.
  package func slice(heads range: Range<Int>, of heads: Int) throws -> ScoreTerms {
    guard range.lowerBound >= 0, range.upperBound <= heads else {
      throw AttentionError.invalidArgument("heads \(range) are not within the \(heads) heads")
    }
    var sliced = self
    sliced.sinks = sinks.map { Array($0[range]) }
    sliced.positionBiases = positionBiases.map { bias in
      switch bias {
      case .alibi(let slopes): return .alibi(slopes: Array(slopes[range]))
      case .t5(let table, let maxDistance, let bidirectional):
        let buckets = table.shape[0]
        var columns: [Float] = []
        columns.reserveCapacity(buckets * range.count)
        for bucket in 0..<buckets {
          columns +=
            table.scalars[(bucket * heads + range.lowerBound)..<(bucket * heads + range.upperBound)]
        }
        return .t5(
          table: Tensor(validShape: [buckets, range.count], scalars: columns),
          maxDistance: maxDistance, bidirectional: bidirectional)
      }
    }
    return sliced
  }
}
