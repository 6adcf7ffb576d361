import Foundation
import Synchronization
import Tensors

/// Scaled dot-product attention that never holds the `[Tq, Tk]` matrix: an online-softmax
/// ("flash") kernel, tiled over query and key blocks.
///
/// Same formula and semantics as `MaterializedAttention` — `dropout(softmax(Q·Kᵀ·scale + mask))·V`,
/// the same masks, zero rows for fully masked queries, the relative-position term, and the same
/// dropout decisions for the same seed (the decision for weight `(row, key)` depends on nothing
/// else) — so the two agree to float32 rounding. It cannot return the weights: they never exist
/// all at once. `AttentionResult.weights` is `nil`.
///
/// For each (batch, query block of `Bq` rows), walking key blocks of `Bk` keys:
/// 1. `S = scale·Q_blk·K_blkᵀ` with one sgemm (`[Bq, Bk]`); with relative positions, plus
///    `R[i, clip(j − i) + M]` gathered from `R = scale·Q_blk·Eᵀ` (one sgemm per query block);
/// 2. the mask; the running row max `m` grows to `m' = max(m, max_j S_ij)`;
/// 3. `P = exp(S − m')`, the running sum `ℓ = ℓ·exp(m − m') + Σ_j P_ij` (before dropout, since
///    dropout acts on the normalized weights), and the running output is rescaled by `exp(m − m')`;
/// 4. dropout on `P` (kept ×1/(1−p)), then `O += P·V_blk` with one sgemm;
/// and at the end `O /= ℓ` (0 where `ℓ = 0`: every key masked).
/// With `isCausal`, key blocks entirely above the diagonal are skipped, not computed and masked.
///
/// Work is split over batch × query blocks on `threads` threads, which take the next block as they
/// finish one, OpenBLAS single-threaded inside each; every row is computed the same way whatever
/// the thread count, so results are identical for any `threads`. Workspace: per thread `Bq·Bk + Bq·Dv + 2·Bq (+ Bq·(2M + 1))` floats, allocated
/// once per thread — independent of `Tk` and linear in `Bq`.
public enum TiledAttention {
  /// Block sizes. The defaults were chosen by measurement (see README, "Performance").
  public struct Configuration: Sendable, Equatable {
    /// `Bq`, queries per block.
    public var queryBlock: Int
    /// `Bk`, keys per block.
    public var keyBlock: Int

    public init(queryBlock: Int = 256, keyBlock: Int = 512) {
      self.queryBlock = queryBlock
      self.keyBlock = keyBlock
    }

    public static let `default` = Configuration()
  }

  /// The bytes of workspace `compute` allocates: per thread a `[Bq, Bk]` tile, a `[Bq, Dv]`
  /// accumulator, the row max and sum, and `[Bq, ≤ 2M + 1]` for relative positions, with the
  /// blocks capped at `Tq` and `Tk`.
  public static func workspaceBytes(
    queries: Int, keys: Int, valueDim: Int, tasks: Int, relativeWidth: Int = 0,
    configuration: Configuration = .default, threads: Int
  ) -> Int {
    let bq = min(configuration.queryBlock, max(queries, 1))
    let bk = min(configuration.keyBlock, max(keys, 1))
    let workers = min(max(threads, 1), max(tasks, 1))
    let perThread = bq * bk + bq * valueDim + 2 * bq + bq * relativeWidth
    return workers * perThread * MemoryLayout<Float>.stride
  }

  /// Called through `Attention.scaledDotProduct`, which holds OpenBLAS at one thread meanwhile.
  static func compute(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask, scale: Float?, dropout: Dropout?,
    relativePosition: RelativePositionBias?,
    configuration: Configuration, threads: Int
  ) throws -> AttentionResult {
    let shape = try AttentionShape(queries: queries, keys: keys, values: values)
    guard configuration.queryBlock > 0, configuration.keyBlock > 0 else {
      throw AttentionError.invalidArgument(
        "block sizes must be positive, got \(configuration.queryBlock)×\(configuration.keyBlock)")
    }
    try relativePosition?.checkHeadDim(shape.headDim)
    let resolved = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    var output = Tensor(
      validShape: shape.outputShape,
      scalars: [Float](repeating: 0, count: try Tensor.elementCount(of: shape.outputShape)))
    let bq = min(configuration.queryBlock, max(shape.queries, 1))
    let queryBlocks = (shape.queries + bq - 1) / bq
    let batchCount = shape.batchCount
    let tasks = batchCount * queryBlocks
    let width = relativePosition?.columns(queries: shape.queries, keys: shape.keys).count ?? 0
    let workspace = workspaceBytes(
      queries: shape.queries, keys: shape.keys, valueDim: shape.valueDim, tasks: tasks,
      relativeWidth: width,
      configuration: configuration, threads: threads)
    if tasks == 0 || shape.keys == 0 {
      return AttentionResult(output: output, weights: nil, workspaceBytes: 0, kernel: .tiled)
    }
    let workers = min(threads, tasks)
    let plan = TilePlan(
      shape: shape, scale: shape.resolvedScale(scale), queryBlock: bq,
      keyBlock: min(configuration.keyBlock, max(shape.keys, 1)), mask: resolved, dropout: dropout,
      relativePosition: relativePosition)

    queries.scalars.withUnsafeBufferPointer { q in
      keys.scalars.withUnsafeBufferPointer { k in
        values.scalars.withUnsafeBufferPointer { v in
          output.scalars.withUnsafeMutableBufferPointer { o in
            let embeddings = relativePosition?.embeddings.scalars ?? []
            embeddings.withUnsafeBufferPointer { e in
              let buffers = TileBuffers(
                q: q.baseAddress!, k: k.baseAddress!, v: v.baseAddress!, o: o.baseAddress!,
                e: e.baseAddress)
              let queue = TaskQueue()
              DispatchQueue.concurrentPerform(iterations: workers) { _ in
                var scratch = TileScratch(plan: plan)
                // Each worker takes the next task until none is left; which worker runs a task
                // does not change how it is computed. With a causal mask the last query blocks
                // see the most keys, so they go first and the short ones fill in at the end.
                while case let next = queue.take(), next < tasks {
                  let (batch, block) =
                    mask.isCausal
                    ? (next % batchCount, queryBlocks - 1 - next / batchCount)
                    : (next / queryBlocks, next % queryBlocks)
                  plan.run(
                    batch: batch, firstQuery: block * bq, buffers: buffers, scratch: &scratch)
                }
              }
            }
          }
        }
      }
    }
    return AttentionResult(output: output, weights: nil, workspaceBytes: workspace, kernel: .tiled)
  }
}

/// The next task index, shared by the workers.
final class TaskQueue: Sendable {
  private let next = Atomic<Int>(0)

  func take() -> Int { next.wrappingAdd(1, ordering: .relaxed).oldValue }
}

/// Raw pointers to a call's tensors, shared read-only (inputs) or by disjoint rows (output).
struct TileBuffers: @unchecked Sendable {
  let q: UnsafePointer<Float>
  let k: UnsafePointer<Float>
  let v: UnsafePointer<Float>
  let o: UnsafeMutablePointer<Float>
  let e: UnsafePointer<Float>?
}

/// One thread's scratch, allocated once and reused for every tile it computes.
struct TileScratch: ~Copyable {
  /// `[Bq, Bk]`: scores, then probabilities.
  let scores: UnsafeMutablePointer<Float>
  /// `[Bq, Dv]`: the running, unnormalized output.
  let accumulator: UnsafeMutablePointer<Float>
  /// `[Bq]`: the running row max `m` and sum `ℓ`.
  let rowMax: UnsafeMutablePointer<Float>
  let rowSum: UnsafeMutablePointer<Float>
  /// `[Bq, 2M + 1]`: `R = scale·Q_blk·Eᵀ`.
  let positions: UnsafeMutablePointer<Float>

  init(plan: TilePlan) {
    let bq = plan.queryBlock
    scores = .allocate(capacity: bq * plan.keyBlock)
    accumulator = .allocate(capacity: bq * plan.shape.valueDim)
    rowMax = .allocate(capacity: bq)
    rowSum = .allocate(capacity: bq)
    positions = .allocate(capacity: max(bq * plan.relativeWidth, 1))
  }

  deinit {
    scores.deallocate()
    accumulator.deallocate()
    rowMax.deallocate()
    rowSum.deallocate()
    positions.deallocate()
  }
}

/// Everything about a tiled call that is the same for every tile.
struct TilePlan: Sendable {
  let shape: AttentionShape
  let scale: Float
  let queryBlock: Int
  let keyBlock: Int
  let mask: ResolvedMask
  let dropout: Dropout?
  let relativePosition: RelativePositionBias?

  /// The columns of `R` this problem can read (see `RelativePositionBias.columns`).
  var relativeColumns: ClosedRange<Int> {
    relativePosition?.columns(queries: shape.queries, keys: shape.keys) ?? 0...0
  }
  var relativeWidth: Int { relativePosition == nil ? 0 : relativeColumns.count }

  /// Computes output rows `firstQuery ..< firstQuery + Bq` of flat batch `batch`.
  func run(batch b: Int, firstQuery i0: Int, buffers: TileBuffers, scratch: inout TileScratch) {
    let (tq, tk, d, dv) = (shape.queries, shape.keys, shape.headDim, shape.valueDim)
    let rows = min(queryBlock, tq - i0)
    let bk = keyBlock
    let q = buffers.q + (b * tq + i0) * d
    let s = scratch.scores
    let acc = scratch.accumulator
    acc.update(repeating: 0, count: rows * dv)
    scratch.rowMax.update(repeating: -.infinity, count: rows)
    scratch.rowSum.update(repeating: 0, count: rows)

    let width = relativeWidth
    let firstColumn = relativeColumns.lowerBound
    if let e = buffers.e, width > 0, d > 0 {
      BLAS.sgemm(
        transposeB: true, m: rows, n: width, k: d, alpha: scale, a: q, lda: d,
        b: e + firstColumn * d, ldb: d, c: scratch.positions, ldc: width)
    } else if width > 0 {
      scratch.positions.update(repeating: 0, count: rows * width)
    }
    // Indexed by full column numbers, as `RelativePositionBias.add` reads it.
    let positionRows = scratch.positions - firstColumn

    // Causal: keys past the block's last query are hidden from every row of the block.
    let keyEnd = mask.isCausal ? min(tk, i0 + rows) : tk
    var j0 = 0
    while j0 < keyEnd {
      let cols = min(bk, keyEnd - j0)
      // Pass 1: S = scale·Q_blk·K_blkᵀ.
      if d > 0 {
        BLAS.sgemm(
          transposeB: true, m: rows, n: cols, k: d, alpha: scale,
          a: q, lda: d, b: buffers.k + (b * tk + j0) * d, ldb: d, c: s, ldc: bk)
      } else {
        for r in 0..<rows { (s + r * bk).update(repeating: 0, count: cols) }
      }
      for r in 0..<rows {
        let i = i0 + r
        let row = s + r * bk
        // Pass 2: position term, mask, and the new running max.
        relativePosition?.add(
          table: positionRows + r * width, to: row, query: i, firstKey: j0, count: cols)
        mask.apply(to: row, batch: b, query: i, firstKey: j0, count: cols)
        let previous = scratch.rowMax[r]
        let tileMax = RowSoftmax.maximum(row, count: cols)
        if tileMax.isNaN || previous.isNaN {
          // NaN in the scores poisons the whole row, as it does in PyTorch's softmax.
          row.update(repeating: .nan, count: cols)
          scratch.rowMax[r] = .nan
          scratch.rowSum[r] = .nan
          continue
        }
        let peak = max(previous, tileMax)
        if peak == -.infinity {
          // Nothing visible yet in this row: P = 0 for this tile.
          row.update(repeating: 0, count: cols)
          continue
        }
        // Pass 3: P = exp(S − m'), ℓ and the running output rescaled by exp(m − m').
        let sum = RowSoftmax.exponentiate(row, count: cols, shift: peak)
        let correction = previous == -.infinity ? 0 : fastExp(previous - peak)
        scratch.rowSum[r] = scratch.rowSum[r] * correction + sum
        scratch.rowMax[r] = peak
        if correction != 1 { RowSoftmax.scale(acc + r * dv, count: dv, by: correction) }
        // Pass 4a: dropout on the probabilities (the normalizer ℓ stays the pre-dropout sum).
        dropout?.apply(to: row, row: b * tq + i, firstKey: j0, count: cols)
      }
      // Pass 4b: O += P·V_blk.
      if dv > 0 {
        BLAS.sgemm(
          m: rows, n: dv, k: cols, a: s, lda: bk, b: buffers.v + (b * tk + j0) * dv, ldb: dv,
          beta: 1, c: acc, ldc: dv)
      }
      j0 += cols
    }

    // Normalize: O = acc / ℓ; a row that saw no key keeps zeros.
    let out = buffers.o + (b * tq + i0) * dv
    for r in 0..<rows {
      let sum = scratch.rowSum[r]
      let factor: Float = sum > 0 ? 1 / sum : (sum.isNaN ? .nan : 0)
      for c in 0..<dv { out[r * dv + c] = acc[r * dv + c] * factor }
    }
  }
}
