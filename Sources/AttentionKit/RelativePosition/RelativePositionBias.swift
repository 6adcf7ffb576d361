import Tensors

/// The position term of relative-position attention (Shaw et al., 2018, as the notebook builds it):
/// `score(i, j) = (q_i·k_j + q_i·E[clip(j − i, −M, M) + M]) · scale`.
///
/// The relative position of key `j` seen from query `i` is `j − i` — what the notebook's code
/// computes (`positions.unsqueeze(0) − positions.unsqueeze(1)`), although its docstring writes
/// `r_(i−j)`. We follow the code, so weights trained with it load unchanged.
///
/// The notebook gathers a `[Tq, Tk, D]` tensor of embeddings and contracts it with Q. The same
/// numbers come from `R = Q·Eᵀ`, one sgemm of shape `[Tq, 2M + 1]`, since `q_i·E[r] = R[i, r]`:
/// the kernels compute `R` (scaled) and add `R[i, clip(j − i) + M]` to the scores, which needs
/// `O(Tq·(2M + 1))` memory instead of `O(Tq·Tk·D)`.
public struct RelativePositionBias: Sendable {
  /// `E`, `[2M + 1, D]`: row `r + M` is the embedding of relative position `r ∈ [−M, M]`.
  public let embeddings: Tensor
  /// `M`, the largest distance told apart; farther keys share the embedding of `±M`.
  public let maxDistance: Int

  public init(embeddings: Tensor, maxDistance: Int) throws {
    guard maxDistance >= 0 else {
      throw AttentionError.invalidArgument("max relative distance must be ≥ 0, got \(maxDistance)")
    }
    guard embeddings.rank == 2, embeddings.shape[0] == 2 * maxDistance + 1 else {
      throw AttentionError.shapeMismatch(
        "relative embeddings must be [2M + 1, D] = [\(2 * maxDistance + 1), D], "
          + "got \(shapeForMessage(embeddings.shape))")
    }
    self.embeddings = embeddings
    self.maxDistance = maxDistance
  }

  /// `2M + 1`, the rows of `E` and the columns of `R`.
  public var tableWidth: Int { 2 * maxDistance + 1 }

  /// The embedding row for key `j` seen from query `i`: `clip(j − i, −M, M) + M`.
  @inline(__always)
  public func index(query i: Int, key j: Int) -> Int {
    min(max(j - i, -maxDistance), maxDistance) + maxDistance
  }

  /// The columns of `R` that queries `0..<Tq` and keys `0..<Tk` can read:
  /// `clip(j − i) + M` for `j − i ∈ [−(Tq − 1), Tk − 1]`. The kernels compute only these, so a
  /// table far wider than the sequence (M ≫ T) costs nothing.
  public func columns(queries: Int, keys: Int) -> ClosedRange<Int> {
    columns(firstQuery: 0, queries: queries, firstKey: 0, keys: keys)
  }

  /// The columns of `R` that queries `firstQuery ..< firstQuery + queries` and keys
  /// `firstKey ..< firstKey + keys` can read (a tile's).
  public func columns(firstQuery i0: Int, queries: Int, firstKey j0: Int, keys: Int)
    -> ClosedRange<Int>
  {
    let m = maxDistance
    let low = min(max(j0 - (i0 + max(queries - 1, 0)), -m), m) + m
    let high = min(max(j0 + max(keys - 1, 0) - i0, -m), m) + m
    return low...max(low, high)
  }

  func checkHeadDim(_ headDim: Int) throws {
    guard embeddings.shape[1] == headDim else {
      throw AttentionError.shapeMismatch(
        "relative embeddings \(shapeForMessage(embeddings.shape)) have width \(embeddings.shape[1]), "
          + "queries have D = \(headDim)")
    }
  }

  /// Adds `table[clip(j − i) + M]` to `row[0..<count]`, the scores of query `i` for keys
  /// `firstKey ..< firstKey + count`; `table` is row `i` of `R = scale·Q·Eᵀ`, indexed by the full
  /// column number (only `columns(queries:keys:)` of it are read).
  @inline(__always)
  func add(
    table: UnsafePointer<Float>, to row: UnsafeMutablePointer<Float>,
    query i: Int, firstKey: Int, count: Int
  ) {
    let m = maxDistance
    // Keys left of i − M all use table[0]; right of i + M, table[2M]; between, table[j − i + M].
    let leftEnd = min(max(i - m - firstKey, 0), count)
    let rightStart = min(max(i + m + 1 - firstKey, leftEnd), count)
    let far = table[0]
    for j in 0..<leftEnd { row[j] += far }
    let offset = firstKey - i + m
    for j in leftEnd..<rightStart { row[j] += table[j + offset] }
    let farRight = table[2 * m]
    for j in rightStart..<count { row[j] += farRight }
  }

  /// The adjoint of `add`: `table[clip(j − i) + M] += row[j]` for keys
  /// `firstKey ..< firstKey + count` of query `i`, so that `table` (indexed by full column
  /// number) gets `G_i`, the sums of `dS_ij` over the keys that read each embedding. Keys beyond
  /// `±M` all land in the end columns; each column is summed in increasing `j`.
  @inline(__always)
  func accumulate(
    row: UnsafePointer<Float>, into table: UnsafeMutablePointer<Float>, query i: Int,
    firstKey: Int, count: Int
  ) {
    let m = maxDistance
    let leftEnd = min(max(i - m - firstKey, 0), count)
    let rightStart = min(max(i + m + 1 - firstKey, leftEnd), count)
    var far: Float = 0
    for j in 0..<leftEnd { far += row[j] }
    if leftEnd > 0 { table[0] += far }
    let offset = firstKey - i + m
    for j in leftEnd..<rightStart { table[j + offset] += row[j] }
    var farRight: Float = 0
    for j in rightStart..<count { farRight += row[j] }
    if rightStart < count { table[2 * m] += farRight }
  }
}
