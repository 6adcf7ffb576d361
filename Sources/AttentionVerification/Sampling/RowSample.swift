import AttentionKit

/// Which query rows a check compares with the float64 reference.
///
/// Every reference row costs `O(Tk·(D + Dv))` in float64, independent of the others, so a check
/// of sampled rows needs memory linear in the sequence, whatever its length.
public enum RowSelection: Sendable, Equatable {
  /// Every row.
  case all
  /// `count` rows drawn with `seed` (every row when there are at most `count`).
  case sampled(count: Int, seed: UInt64)
  /// Every row while the reference's work stays under `workBudget` multiply-adds, else
  /// `count` rows drawn with `seed`.
  case automatic(seed: UInt64, count: Int = 64, workBudget: Int = 1 << 28)

  /// The flat `(batch, query)` rows of a problem of `batchCount·queries` rows whose rows each
  /// cost `rowWork` multiply-adds, in order.
  public func rows(batchCount: Int, queries: Int, rowWork: Int = 1) -> [(batch: Int, query: Int)] {
    let total = batchCount * queries
    switch self {
    case .all:
      return RowSample.rows(batchCount: batchCount, queries: queries, limit: total, count: total)
    case .sampled(let count, let seed):
      return RowSample.rows(
        batchCount: batchCount, queries: queries, seed: seed, limit: count, count: count)
    case .automatic(let seed, let count, let budget):
      let (work, overflow) = total.multipliedReportingOverflow(by: max(rowWork, 1))
      let limit = !overflow && work <= budget ? total : 0
      return RowSample.rows(
        batchCount: batchCount, queries: queries, seed: seed, limit: limit, count: count)
    }
  }
}

/// Rows drawn for a check, reproducibly: Philox4x32-10 on its own stream, so the rows a seed
/// picks never depend on the dropout decisions or the random inputs of the same seed.
public enum RowSample {
  /// All `batchCount·queries` rows when there are at most `limit`, else `count` of them drawn
  /// with the seed, in order.
  public static func rows(
    batchCount: Int, queries: Int, seed: UInt64 = 0, limit: Int = 64, count: Int = 32
  ) -> [(batch: Int, query: Int)] {
    indices(total: batchCount * queries, seed: seed, limit: limit, count: count).map {
      ($0 / max(queries, 1), $0 % max(queries, 1))
    }
  }

  /// The rows of `shape`'s problem, as `rows(batchCount:queries:seed:limit:count:)`.
  public static func rows(
    shape: AttentionShape, seed: UInt64, limit: Int = 64, count: Int = 32
  ) -> [(batch: Int, query: Int)] {
    rows(
      batchCount: shape.batchCount, queries: shape.queries, seed: seed, limit: limit, count: count)
  }

  /// `0..<total` when `total ≤ limit`, else `min(count, total)` distinct indices drawn with
  /// `seed`, sorted.
  public static func indices(total: Int, seed: UInt64, limit: Int, count: Int) -> [Int] {
    if total <= limit { return Array(0..<total) }
    let wanted = min(count, total)
    let rng = Philox4x32(seed: seed)
    var chosen = Set<Int>()
    var counter: UInt64 = 0
    while chosen.count < wanted {
      let w = rng.block(major: counter, minor: 0, stream: RandomStream.sampling)
      for word in [w.0, w.1, w.2, w.3] where chosen.count < wanted {
        chosen.insert(Int((UInt64(word) * UInt64(total)) >> 32))
      }
      counter += 1
    }
    return chosen.sorted()
  }
}
