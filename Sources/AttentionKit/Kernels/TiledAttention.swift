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
/// For each (batch, query block of `Bq` rows), with `Q_blkᵀ` (`[D, Bq]`) transposed once, walking
/// key blocks of `Bk` keys:
/// 1. `S = scale·Q_blk·K_blkᵀ` with one sgemm (`[Bq, Bk]`), from `Q_blkᵀ` and `K_blk` in place,
///    both marked transposed; with relative positions, plus
///    `R[i, clip(j − i) + M]` gathered from `R = scale·Q_blk·Eᵀ` (one sgemm per query block);
/// 2. the mask; each row's running shift `m` (its running max, up to a headroom) grows to
///    `m' ≥ max_j S_ij` only where the tile's scores rise more than 8 above `m`;
/// 3. `P = exp(S − m')`, the running sum `ℓ = ℓ·exp(m − m') + Σ_j P_ij` (before dropout, since
///    dropout acts on the normalized weights), and the running output is rescaled by `exp(m − m')`;
/// 4. dropout on `P` (kept ×1/(1−p)), then `O += P·V_blk` with one sgemm;
/// and at the end `O /= ℓ` (0 where `ℓ = 0`: every key masked).
/// Softmax is shift-invariant, so keeping a stale `m` changes nothing but rounding (`P` stays
/// below about `e⁸`), and passes 2 and 3 then read each tile's row about once, group by group of
/// 128 keys (`RowSoftmax.exponentiate(_:count:runningShift:)`: each group's max just before its
/// exp, from L1; `m` raised at most once a tile, to the max of the rest of the row).
/// With a causal mask, key blocks entirely above the (top-left or bottom-right) diagonal are
/// skipped, not computed and masked; with a window, so are the blocks entirely before it, so a
/// windowed call costs `O(Tq·W)`, not `O(Tq·Tk)`. Grouped-query keys and values are read in
/// place (`AttentionShape.keyValueBatch`).
///
/// Work is split over batch × query blocks on `threads` threads, which take the next task as they
/// finish one, OpenBLAS single-threaded inside each. When there are fewer than
/// `keySplitThreshold` such tasks (decoding: one query against a long cache), each task's keys
/// are split into up to `maxKeySplits` chunks of whole key blocks, computed as separate tasks,
/// and merged by log-sum-exp in a fixed order (flash-decoding). Both splits depend on the shape
/// alone, and every row is computed the same way whatever the thread count, so results are
/// identical for any `threads`. Workspace: per thread `R·Bk + R·Dv + 2·R + D·R (+ R·(2M + 1))`
/// with `R = Bq` rows (`G·Bq` when `G` heads are stacked for decoding)
/// floats, allocated once per thread — independent of `Tk` and linear in `Bq` — plus, with a key
/// split, `Bq·(Dv + 2)` floats per split task for the partial results.
///
/// The layout and the default blocks are OpenBLAS's: 0.3.21 (its SkylakeX kernels) runs a
/// product without packing its operands when `M·N·K ≤ 10⁶` and the transposition flags allow
/// it — every form but `Q·Kᵀ` as stored ("NT" row-major), which it refuses for outputs over
/// 1,200 entries. With `Q_blkᵀ` ("TT") and `P·V_blk` ("NN"), `Bq 16 × Bk 960` at `D = Dv = 64`,
/// both products run unpacked, faster than packed tiles (107–115 GFLOP/s a core against 85–95
/// on our machine); the score tile is not zeroed first either (`beta = 0`).
///
/// For the backward pass (`TiledBackward`), `compute` can also return each row's log-sum-exp
/// `L = m + log ℓ` (`AttentionResult.logSumExp`, `[…, Tq]`; `−∞` for a row that sees no key, NaN
/// for a poisoned one), written where it normalizes or merges the row, at the cost of
/// `4·B·H·Tq` bytes: the backward then recomputes `P = exp(S − L)` tile by tile.
public enum TiledAttention {
  /// Block sizes. The defaults, `Bq = 16` and `Bk` up to 960 fitted to the head dimensions,
  /// keep both tile products within `M·N·K ≤ 10⁶`, where OpenBLAS 0.3.21 runs its unpacked
  /// small-matrix kernels, faster than the packed ones (docs/performance.md has the
  /// measurements); short blocks of queries also waste little of a causal diagonal tile, and
  /// long blocks of keys keep the per-row cost of the online softmax low. Every query block reads
  /// all the keys and values it sees, so for long sequences the defaults switch to 256 × 512
  /// (see `fitsBlocks`).
  public struct Configuration: Sendable, Hashable {
    /// `Bq`, queries per block. Setting it keeps it as set (`fitsBlocks` becomes false).
    public var queryBlock: Int { didSet { fitsBlocks = false } }
    /// `Bk`, keys per block (the most, when `fitsBlocks`). Setting it keeps it as set
    /// (`fitsBlocks` becomes false).
    public var keyBlock: Int { didSet { fitsBlocks = false } }
    /// Whether the kernel fits the blocks to a problem: `Bk` lowered to the largest multiple of
    /// 16 (at least 16) with `R·Bk·max(D, Dv) ≤ 10⁶`, `R` the rows of a block, so that both tile
    /// products run unpacked (960 at `D = Dv = 64`, 480 at 128); but `Bq 256 × Bk 512`, packed,
    /// when the keys and values one query block reads, `Tk·(D + Dv)·4` bytes (over a window's
    /// span when there is one), pass `TiledAttention.streamedKeyValueLimit`. On when neither
    /// block is given (`.default`); blocks given explicitly are kept as given.
    public var fitsBlocks: Bool

    /// `Bq` and `Bk` as given; when neither is given, 16 and 960 fitted to each problem.
    public init(queryBlock: Int? = nil, keyBlock: Int? = nil) {
      self.queryBlock = queryBlock ?? 16
      self.keyBlock = keyBlock ?? 960
      fitsBlocks = queryBlock == nil && keyBlock == nil
    }

    public static let `default` = Configuration()
  }

  /// The most bytes of keys and values (`Tk·(D + Dv)·4`) for which the fitted blocks keep 16
  /// queries: each query block streams all of them, and past what the caches hold 16-row blocks
  /// wait on memory (at T 32,768, D 64, they run at 0.78× the speed of 256 × 512 blocks).
  public static let streamedKeyValueLimit = 8 << 20
  /// The blocks past `streamedKeyValueLimit`: `Bq 256 × Bk 512`.
  static let longSequenceBlocks = (queryBlock: 256, keyBlock: 512)

  /// The largest `M·N·K` for which OpenBLAS 0.3.21 (SkylakeX kernels) multiplies without
  /// packing (`sgemm_small_kernel_permit`).
  static let smallProductLimit = 1_000_000

  /// Fewer (batch, query block) tasks than this split their keys (see the type's comment).
  public static let keySplitThreshold = 16
  /// The most chunks one task's keys are split into.
  public static let maxKeySplits = 16

  /// How a call is cut into tasks: `rowTasks` (batch, query block) pairs, each with its keys in
  /// `splits` chunks of `blocksPerSplit` key blocks.
  ///
  /// With grouped-query heads and every query in one block (decoding), the `G` query heads that
  /// share a key/value head are stacked into one block of `G·Tq` rows (`stackedHeads`): their
  /// rows are contiguous, and each tile of K and V is then read once for the group.
  struct Partition {
    let queryBlock: Int
    let keyBlock: Int
    let queryBlocks: Int
    let stackedHeads: Int
    let rowTasks: Int
    let splits: Int
    let blocksPerSplit: Int

    init(
      queries: Int, keys: Int, headDim: Int, valueDim: Int, batchCount: Int, groupSize: Int = 1,
      relativePosition: Bool = false, window: Int? = nil, configuration: Configuration
    ) {
      // A tall block over a narrow window's band computes mostly masked pairs: with a window
      // of W keys, Bq is capped at max(64, W / 8) (for W 512, Bq 64 runs 1.35× as fast as 256).
      var (requestedQueries, requestedKeys) = (configuration.queryBlock, configuration.keyBlock)
      var fitsKeyBlock = configuration.fitsBlocks
      if fitsKeyBlock {
        // (The window is clamped first: it may be any positive Int, up to .max.)
        let span = window.map { min(keys, min(keys, $0) + requestedQueries) } ?? keys
        if span * (headDim + valueDim) * MemoryLayout<Float>.stride
          > TiledAttention.streamedKeyValueLimit
        {
          (requestedQueries, requestedKeys) = TiledAttention.longSequenceBlocks
          fitsKeyBlock = false
        }
      }
      let tallest = window.map { max(64, $0 / 8) } ?? requestedQueries
      queryBlock = min(requestedQueries, tallest, max(queries, 1))
      queryBlocks = (queries + queryBlock - 1) / queryBlock
      stackedHeads = groupSize > 1 && queryBlocks == 1 && !relativePosition ? groupSize : 1
      let width = max(headDim, valueDim)
      if fitsKeyBlock, width > 0 {
        let fitting = TiledAttention.smallProductLimit / (queryBlock * stackedHeads * width)
        requestedKeys = min(requestedKeys, max(16, fitting / 16 * 16))
      }
      keyBlock = min(requestedKeys, max(keys, 1))
      rowTasks = batchCount / stackedHeads * queryBlocks
      let keyBlocks = max(1, (keys + keyBlock - 1) / keyBlock)
      let wanted = rowTasks < keySplitThreshold ? min(keyBlocks, maxKeySplits) : 1
      blocksPerSplit = (keyBlocks + wanted - 1) / wanted
      splits = (keyBlocks + blocksPerSplit - 1) / blocksPerSplit
    }

    var tasks: Int { rowTasks * splits }
  }

  /// The tile the kernel computes for a problem: `rows` query rows (`Bq`, capped at `Tq` and by a
  /// window, times the stacked heads of a decode step) by `keys` keys (`Bk`, fitted to `D` and
  /// `Dv` when `fitsBlocks`, capped at `Tk`) — the shapes of its two products, for measuring
  /// OpenBLAS alone on them. `valueDim` is `Dv` (`headDim` when `nil`).
  public static func tile(
    queries: Int, keys: Int, headDim: Int, valueDim: Int? = nil, batchCount: Int,
    groupSize: Int = 1, window: Int? = nil, configuration: Configuration = .default
  ) -> (rows: Int, keys: Int) {
    let partition = Partition(
      queries: queries, keys: keys, headDim: headDim, valueDim: valueDim ?? headDim,
      batchCount: batchCount, groupSize: groupSize, window: window, configuration: configuration)
    return (partition.queryBlock * partition.stackedHeads, partition.keyBlock)
  }

  /// The bytes of workspace `compute` allocates: per thread a `[Bq, Bk]` tile, a `[Bq, Dv]`
  /// accumulator, the row max and sum, the `[D, Bq]` transposed query block and `[Bq, ≤ 2M + 1]`
  /// for relative positions, with the blocks capped at `Tq` and `Tk`; with a key split,
  /// `[Bq, Dv + 2]` per split task. `headDim` is `D` (`valueDim` when `nil`).
  public static func workspaceBytes(
    queries: Int, keys: Int, headDim: Int? = nil, valueDim: Int, batchCount: Int,
    groupSize: Int = 1,
    relativeWidth: Int = 0, window: Int? = nil, configuration: Configuration = .default,
    threads: Int
  ) -> Int {
    let partition = Partition(
      queries: queries, keys: keys, headDim: headDim ?? valueDim, valueDim: valueDim,
      batchCount: batchCount, groupSize: groupSize, relativePosition: relativeWidth > 0,
      window: window, configuration: configuration)
    let (bq, bk) = (partition.queryBlock * partition.stackedHeads, partition.keyBlock)
    let workers = min(max(threads, 1), max(partition.tasks, 1))
    let perThread =
      bq * bk + bq * valueDim + 2 * bq + bq * relativeWidth + bq * (headDim ?? valueDim)
    let partials = partition.splits > 1 ? partition.tasks * bq * (valueDim + 2) : 0
    return (workers * perThread + partials) * MemoryLayout<Float>.stride
  }

  /// The bytes of the per-thread `[Bk, D]` and `[Bk, Dv]` tiles that compact keys and values
  /// (a `KVCache` in float16, bfloat16 or q8) are converted into.
  static func convertedTileBytes(_ partition: Partition, floats: Int, threads: Int) -> Int {
    let workers = min(max(threads, 1), max(partition.tasks, 1))
    return workers * floats * MemoryLayout<Float>.stride
  }

  /// Called through `Attention.scaledDotProduct`, which holds OpenBLAS at one thread meanwhile.
  static func compute(
    queries: Tensor, keys: Tensor, values: Tensor,
    mask: AttentionMask, scale: Float?, dropout: Dropout?,
    relativePosition: RelativePositionBias?, terms: ScoreTerms = .none,
    configuration: Configuration, threads: Int, keyCount: Int? = nil,
    needLogSumExp: Bool = false
  ) throws -> AttentionResult {
    let shape = try AttentionShape(
      queries: queries, keys: keys, values: values, keyCount: keyCount)
    return try compute(
      queries: queries, shape: shape,
      rows: { body in
        keys.scalars.withUnsafeBufferPointer { k in
          values.scalars.withUnsafeBufferPointer { v in
            body(.float32(k.baseAddress!), .float32(v.baseAddress!))
          }
        }
      }, mask: mask, scale: scale, dropout: dropout, relativePosition: relativePosition,
      terms: terms, configuration: configuration, threads: threads, needLogSumExp: needLogSumExp)
  }

  /// The kernel on keys and values that `rows` hands over (float32 in place, or a `KVCache`'s
  /// compact rows, widened as they are read), of the shape `shape`.
  static func compute(
    queries: Tensor, shape: AttentionShape,
    rows: ((KeyValueRows, KeyValueRows) -> Void) -> Void,
    mask: AttentionMask, scale: Float?, dropout: Dropout?,
    relativePosition: RelativePositionBias?, terms: ScoreTerms = .none,
    configuration: Configuration, threads: Int, needLogSumExp: Bool = false
  ) throws -> AttentionResult {
    let resolvedTerms = try ResolvedScoreTerms(terms, shape: shape, mask: mask)
    guard configuration.queryBlock > 0, configuration.keyBlock > 0 else {
      throw AttentionError.invalidArgument(
        "block sizes must be positive, got \(configuration.queryBlock)×\(configuration.keyBlock)")
    }
    try relativePosition?.checkHeadDim(shape.headDim)
    let resolved = try ResolvedMask(
      mask, batchShape: shape.batchShape, queries: shape.queries, keys: shape.keys)
    let partition = Partition(
      queries: shape.queries, keys: shape.keys, headDim: shape.headDim, valueDim: shape.valueDim,
      batchCount: shape.batchCount, groupSize: shape.groupSize,
      relativePosition: relativePosition != nil, window: mask.window, configuration: configuration)
    let width = relativePosition?.columns(queries: shape.queries, keys: shape.keys).count ?? 0
    // Scratch per thread for compact rows: sgemm's widened tiles, or, where every tile takes the
    // small-row products, only q8's widened scales.
    let small = SmallRowProducts.applies(
      rows: partition.queryBlock * partition.stackedHeads, d: shape.headDim, dv: shape.valueDim)
    var tileFloats = (key: 0, value: 0)
    rows { k, v in
      tileFloats = (
        k.tileFloats(keys: partition.keyBlock, width: shape.headDim, small: small),
        v.tileFloats(keys: partition.keyBlock, width: shape.valueDim, small: small)
      )
    }
    let workspace =
      workspaceBytes(
        queries: shape.queries, keys: shape.keys, headDim: shape.headDim, valueDim: shape.valueDim,
        batchCount: shape.batchCount, groupSize: shape.groupSize, relativeWidth: width,
        window: mask.window, configuration: configuration, threads: threads)
      + convertedTileBytes(partition, floats: tileFloats.key + tileFloats.value, threads: threads)
    // The rows' log-sum-exp, `−∞` until a row is normalized (and for a row that sees no key).
    var logSumExp = [Float](
      repeating: -.infinity, count: needLogSumExp ? shape.batchCount * shape.queries : 0)
    let lseShape = shape.batchShape + [shape.queries]
    if partition.rowTasks == 0 || shape.keys == 0 {
      return AttentionResult(
        output: try Tensor(shape: shape.outputShape), weights: nil, workspaceBytes: 0,
        kernel: .tiled(configuration), tilesComputed: 0,
        logSumExp: needLogSumExp ? try Tensor(shape: lseShape, scalars: logSumExp) : nil)
    }
    let plan = TilePlan(
      shape: shape, scale: shape.resolvedScale(scale), queryBlock: partition.queryBlock,
      keyBlock: partition.keyBlock, stackedHeads: partition.stackedHeads, mask: resolved,
      dropout: dropout, relativePosition: relativePosition, terms: resolvedTerms,
      keyTileFloats: tileFloats.key, valueTileFloats: tileFloats.value)
    let tiles = Atomic<Int>(0)
    // Every output row is written (normalized, or merged from its key chunks), so the output is
    // not zeroed first.
    let output = try Tensor(shape: shape.outputShape) { o in
      queries.scalars.withUnsafeBufferPointer { q in
        rows { k, v in
          let embeddings = relativePosition?.embeddings.scalars ?? []
          embeddings.withUnsafeBufferPointer { e in
            logSumExp.withUnsafeMutableBufferPointer { l in
              let buffers = TileBuffers(
                q: q.baseAddress!, k: k, v: v, o: o,
                e: e.baseAddress, l: needLogSumExp ? l.baseAddress : nil)
              let count =
                partition.splits == 1
                ? runWhole(plan, partition, buffers, threads: threads)
                : runSplit(plan, partition, buffers, threads: threads)
              tiles.store(count, ordering: .relaxed)
            }
          }
        }
      }
    }
    return AttentionResult(
      output: output, weights: nil, workspaceBytes: workspace, kernel: .tiled(configuration),
      tilesComputed: tiles.load(ordering: .relaxed),
      logSumExp: needLogSumExp ? try Tensor(shape: lseShape, scalars: logSumExp) : nil)
  }

  /// One task per (batch, query block), each normalized into the output; returns the tiles
  /// computed.
  private static func runWhole(
    _ plan: TilePlan, _ partition: Partition, _ buffers: TileBuffers, threads: Int
  ) -> Int {
    let queryBlocks = partition.queryBlocks
    let queue = TaskQueue()
    let tiles = Atomic<Int>(0)
    DispatchQueue.concurrentPerform(iterations: min(threads, partition.tasks)) { _ in
      var scratch = TileScratch(plan: plan)
      var count = 0
      // Each worker takes the next task until none is left; which worker runs a task does not
      // change how it is computed. Tasks of one head follow each other, so that its keys and
      // values are still in cache for the next; with a causal mask a head's last query blocks
      // see the most keys, so they go first and the short ones fill in at the end.
      while case let next = queue.take(), next < partition.tasks {
        let (group, index) = next.quotientAndRemainder(dividingBy: queryBlocks)
        let block = plan.mask.isCausal ? queryBlocks - 1 - index : index
        let (batch, i0) = (group * plan.stackedHeads, block * plan.queryBlock)
        count += plan.accumulate(
          batch: batch, firstQuery: i0, keys: 0..<plan.shape.keys, buffers: buffers,
          scratch: &scratch)
        plan.normalize(
          batch: batch, firstQuery: i0, scratch: scratch, into: buffers.o,
          logSumExp: buffers.l)
      }
      tiles.add(count, ordering: .relaxed)
    }
    return tiles.load(ordering: .relaxed)
  }

  /// One task per (batch, query block, key chunk), each leaving its unnormalized partial result
  /// (`O`, `m`, `ℓ`); then, per (batch, query block), the chunks merged in order:
  /// `m = max_c m_c`, `ℓ = Σ_c ℓ_c·e^(m_c − m)`, `O = Σ_c O_c·e^(m_c − m) / ℓ`.
  private static func runSplit(
    _ plan: TilePlan, _ partition: Partition, _ buffers: TileBuffers, threads: Int
  ) -> Int {
    let (bq, dv) = (plan.blockRows, plan.shape.valueDim)
    let stride = bq * (dv + 2)
    let partials = UnsafeMutablePointer<Float>.allocate(capacity: partition.tasks * stride)
    defer { partials.deallocate() }
    let shared = SharedPointer(partials)
    let chunkKeys = partition.blocksPerSplit * plan.keyBlock
    let queue = TaskQueue()
    let tiles = Atomic<Int>(0)
    DispatchQueue.concurrentPerform(iterations: min(threads, partition.tasks)) { _ in
      var scratch = TileScratch(plan: plan)
      while case let next = queue.take(), next < partition.tasks {
        let (rowTask, split) = next.quotientAndRemainder(dividingBy: partition.splits)
        let (group, block) = rowTask.quotientAndRemainder(dividingBy: partition.queryBlocks)
        let start = split * chunkKeys
        let count = plan.accumulate(
          batch: group * plan.stackedHeads, firstQuery: block * plan.queryBlock,
          keys: start..<min(plan.shape.keys, start + chunkKeys), buffers: buffers,
          scratch: &scratch)
        tiles.add(count, ordering: .relaxed)
        let slot = shared.pointer + next * stride
        slot.update(from: scratch.accumulator, count: bq * dv)
        (slot + bq * dv).update(from: scratch.rowMax, count: bq)
        (slot + bq * dv + bq).update(from: scratch.rowSum, count: bq)
      }
    }
    let mergeQueue = TaskQueue()
    DispatchQueue.concurrentPerform(iterations: min(threads, partition.rowTasks)) { _ in
      while case let rowTask = mergeQueue.take(), rowTask < partition.rowTasks {
        let (group, block) = rowTask.quotientAndRemainder(dividingBy: partition.queryBlocks)
        plan.merge(
          batch: group * plan.stackedHeads, firstQuery: block * plan.queryBlock,
          partials: shared.pointer + rowTask * partition.splits * stride,
          splits: partition.splits, into: buffers.o, logSumExp: buffers.l)
      }
    }
    return tiles.load(ordering: .relaxed)
  }
}

/// Raw pointers to a call's tensors, shared read-only (inputs) or by disjoint rows (output).
struct TileBuffers: @unchecked Sendable {
  let q: UnsafePointer<Float>
  /// Keys and values: float32 rows read in place, or compact rows widened as they are read.
  let k: KeyValueRows
  let v: KeyValueRows
  let o: UnsafeMutablePointer<Float>
  let e: UnsafePointer<Float>?
  /// `[…, Tq]`: the rows' log-sum-exp, written when not `nil` (for the backward pass).
  var l: UnsafeMutablePointer<Float>? = nil
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
  /// `[D, Bq]`: the query block transposed, `Q_blkᵀ`.
  let transposedQueries: UnsafeMutablePointer<Float>
  /// A tile of compact keys and values widened to `Float` for sgemm (`[Bk, D]`, `[Bk, Dv]`), or
  /// q8's widened scales for the small-row products; one float each when neither is needed.
  let keyTile: UnsafeMutablePointer<Float>
  let valueTile: UnsafeMutablePointer<Float>

  init(plan: TilePlan) {
    let bq = plan.blockRows
    scores = .allocate(capacity: bq * plan.keyBlock)
    accumulator = .allocate(capacity: bq * plan.shape.valueDim)
    rowMax = .allocate(capacity: bq)
    rowSum = .allocate(capacity: bq)
    positions = .allocate(capacity: max(bq * plan.relativeWidth, 1))
    transposedQueries = .allocate(capacity: max(bq * plan.shape.headDim, 1))
    keyTile = .allocate(capacity: max(plan.keyTileFloats, 1))
    valueTile = .allocate(capacity: max(plan.valueTileFloats, 1))
  }

  deinit {
    scores.deallocate()
    accumulator.deallocate()
    rowMax.deallocate()
    rowSum.deallocate()
    positions.deallocate()
    transposedQueries.deallocate()
    keyTile.deallocate()
    valueTile.deallocate()
  }
}

/// Everything about a tiled call that is the same for every tile.
struct TilePlan: Sendable {
  let shape: AttentionShape
  let scale: Float
  /// Queries per block, per head.
  let queryBlock: Int
  let keyBlock: Int
  /// Query heads stacked into one block (see `TiledAttention.Partition`).
  let stackedHeads: Int
  let mask: ResolvedMask
  let dropout: Dropout?
  let relativePosition: RelativePositionBias?
  let terms: ResolvedScoreTerms
  /// Floats of each thread's scratch for compact keys and values (`KeyValueRows.tileFloats`).
  var keyTileFloats = 0
  var valueTileFloats = 0

  /// The columns of `R` this problem can read (see `RelativePositionBias.columns`).
  var relativeColumns: ClosedRange<Int> {
    relativePosition?.columns(queries: shape.queries, keys: shape.keys) ?? 0...0
  }
  var relativeWidth: Int { relativePosition == nil ? 0 : relativeColumns.count }
  /// Rows of one block: `Bq` per stacked head.
  var blockRows: Int { queryBlock * stackedHeads }

  /// The rows of the block of flat batch `b` starting at query `i0`: per head, and in all.
  func rowCounts(firstQuery i0: Int) -> (perHead: Int, total: Int) {
    let perHead = min(queryBlock, shape.queries - i0)
    return (perHead, perHead * stackedHeads)
  }

  /// Passes 1–4 for rows `firstQuery ..< firstQuery + Bq` of flat batch `batch` over the keys
  /// `keys` that the mask lets any of the rows see, leaving the unnormalized output, the row
  /// max and the row sum in `scratch`; returns the number of key blocks (tiles) computed.
  func accumulate(
    batch b: Int, firstQuery i0: Int, keys: Range<Int>, buffers: TileBuffers,
    scratch: inout TileScratch
  ) -> Int {
    let (tq, d, dv) = (shape.queries, shape.headDim, shape.valueDim)
    let kv = shape.keyRowOffset(b)
    // Stacked heads: rows of heads b, b + 1, … follow each other (every query in one block).
    let (perHead, rows) = rowCounts(firstQuery: i0)
    let bk = keyBlock
    let q = buffers.q + (b * tq + i0) * d
    let s = scratch.scores
    let acc = scratch.accumulator
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

    // Causal and windowed: only keys some row of the block may see; the first row sees the
    // earliest (the window's start; 0 when it sees none), the last row the latest.
    let keyStart = max(keys.lowerBound, mask.visibleKeys(query: i0).lowerBound)
    let keyEnd = min(keys.upperBound, mask.visibleKeys(query: i0 + perHead - 1).upperBound)
    // S is computed as (Q_blkᵀ)ᵀ·K_blkᵀ from Q_blkᵀ, transposed once per block here: for
    // OpenBLAS 0.3.21 (SkylakeX kernels) that is its "TT" form, which it runs with an unpacked
    // small-matrix kernel when M·N·K ≤ 10⁶; the plain Q·Kᵀ ("NT" row-major, "TN" to OpenBLAS)
    // gets that kernel only for outputs of at most 1,200 entries, so it packs both operands on
    // every tile.
    let qt = scratch.transposedQueries
    // A tile of at most four rows (a decode step) streams K and V itself instead (see
    // `SmallRowProducts`).
    let small = SmallRowProducts.applies(rows: rows, d: d, dv: dv)
    if d > 0, keyStart < keyEnd, !small {
      BLAS.transpose(rows: rows, cols: d, q, lda: d, into: qt, ldb: rows)
    }
    var j0 = keyStart
    var tiles = 0
    while j0 < keyEnd {
      let cols = min(bk, keyEnd - j0)
      tiles += 1
      // Pass 1: S = scale·Q_blk·K_blkᵀ.
      if small {
        SmallRowProducts.scores(
          queries: q, rows: rows, d: d, keys: buffers.k, first: kv + j0, cols: cols,
          scale: scale, into: s, ld: bk, scratch: scratch.keyTile)
      } else if d > 0 {
        BLAS.sgemm(
          transposeA: true, transposeB: true, m: rows, n: cols, k: d, alpha: scale,
          a: qt, lda: rows,
          b: buffers.k.rows(kv + j0, count: cols, width: d, scratch: scratch.keyTile), ldb: d,
          c: s, ldc: bk)
      } else {
        for r in 0..<rows { (s + r * bk).update(repeating: 0, count: cols) }
      }
      for r in 0..<rows {
        let (qb, i) = (b + r / perHead, i0 + r % perHead)
        let row = s + r * bk
        // Pass 2: soft-cap, position terms and mask.
        terms.capScores(row, count: cols)
        relativePosition?.add(
          table: positionRows + r * width, to: row, query: i, firstKey: j0, count: cols)
        terms.addPositionBias(to: row, batch: qb, query: i, firstKey: j0, count: cols)
        mask.apply(to: row, batch: qb, query: i, firstKey: j0, count: cols)
        let previous = scratch.rowMax[r]
        if previous.isNaN {
          row.update(repeating: .nan, count: cols)
          continue
        }
        // Passes 2–3, reading the tile about once: P = exp(S − m') and its sum, the running
        // shift m' = m unless this tile rises more than the headroom above it (see
        // `RowSoftmax.exponentiate(_:count:runningShift:)`).
        var shift = previous
        let sum = RowSoftmax.exponentiate(row, count: cols, runningShift: &shift)
        if sum.isNaN {
          // NaN in the scores poisons the whole row, as it does in PyTorch's softmax.
          row.update(repeating: .nan, count: cols)
          scratch.rowMax[r] = .nan
          scratch.rowSum[r] = .nan
          continue
        }
        // Nothing visible yet in this row: P = 0 for this tile, written as such.
        if shift == -.infinity { continue }
        // ℓ and the running output rescaled by exp(m − m') (1 while the shift stays).
        let correction =
          previous == -.infinity ? 0 : previous == shift ? 1 : fastExp(previous - shift)
        scratch.rowSum[r] = scratch.rowSum[r] * correction + sum
        scratch.rowMax[r] = shift
        // (On the first tile the accumulator is not yet written: the product below sets it.)
        if correction != 1, tiles > 1 {
          RowSoftmax.scale(acc + r * dv, count: dv, by: correction)
        }
        // Pass 4a: dropout on the probabilities (the normalizer ℓ stays the pre-dropout sum).
        dropout?.apply(to: row, row: qb * tq + i, firstKey: j0, count: cols)
      }
      // Pass 4b: O += P·V_blk (O = P·V_blk on the first tile, so that O is never zeroed first).
      if small {
        SmallRowProducts.accumulate(
          probabilities: s, ld: bk, rows: rows, cols: cols, values: buffers.v, first: kv + j0,
          dv: dv, into: acc, overwrite: tiles == 1, scratch: scratch.valueTile)
      } else if dv > 0 {
        BLAS.sgemm(
          m: rows, n: dv, k: cols, a: s, lda: bk,
          b: buffers.v.rows(kv + j0, count: cols, width: dv, scratch: scratch.valueTile), ldb: dv,
          beta: tiles == 1 ? 0 : 1, c: acc, ldc: dv)
      }
      j0 += cols
    }
    if tiles == 0 { acc.update(repeating: 0, count: rows * dv) }
    return tiles
  }

  /// `O = acc / ℓ` into the output rows; a row that saw no key gets zeros. With `logSumExp`,
  /// also `L = m + log ℓ` of each row (`−∞` when `ℓ = 0`), `m` its final shift. A sink `σ`
  /// joins `ℓ` here, once: `m' = max(m, σ)`, `ℓ' = ℓ·e^(m − m') + e^(σ − m')`,
  /// `O = acc·e^(m − m') / ℓ'`.
  func normalize(
    batch b: Int, firstQuery i0: Int, scratch: borrowing TileScratch,
    into output: UnsafeMutablePointer<Float>, logSumExp: UnsafeMutablePointer<Float>? = nil
  ) {
    let (tq, dv) = (shape.queries, shape.valueDim)
    let (perHead, rows) = rowCounts(firstQuery: i0)
    let out = output + (b * tq + i0) * dv
    for r in 0..<rows {
      var (sum, shift) = (scratch.rowSum[r], scratch.rowMax[r])
      var carried: Float = 1
      if sum > 0, let sink = terms.sink(batch: b + r / perHead) {
        (sum, shift, carried) = Self.withSink(sink, sum: sum, shift: shift)
      }
      logSumExp?[b * tq + i0 + r] =
        sum > 0 ? shift + log(sum) : (sum.isNaN ? .nan : -.infinity)
      let factor: Float = sum > 0 ? carried / sum : (sum.isNaN ? .nan : 0)
      RowSoftmax.scale(
        scratch.accumulator + r * dv, into: out + r * dv, count: dv, by: factor)
    }
  }

  /// A row's sum `ℓ` and shift `m` with a sink `σ` added as one more key: `m' = max(m, σ)`,
  /// `ℓ' = ℓ·e^(m − m') + e^(σ − m')`, and the factor `e^(m − m')` the running output carries.
  @inline(__always)
  static func withSink(_ sink: Float, sum: Float, shift: Float) -> (
    sum: Float, shift: Float, carried: Float
  ) {
    let top = max(shift, sink)
    let carried = shift == top ? 1 : fastExp(shift - top)
    return (sum * carried + fastExp(sink - top), top, carried)
  }

  /// Merges `splits` partial results (each `[Bq, Dv]` output, `[Bq]` max, `[Bq]` sum, in key
  /// order) by log-sum-exp into the output rows.
  func merge(
    batch b: Int, firstQuery i0: Int, partials: UnsafeMutablePointer<Float>, splits: Int,
    into output: UnsafeMutablePointer<Float>, logSumExp: UnsafeMutablePointer<Float>? = nil
  ) {
    let (tq, dv, bq) = (shape.queries, shape.valueDim, blockRows)
    let rows = rowCounts(firstQuery: i0).total
    let stride = bq * (dv + 2)
    let out = output + (b * tq + i0) * dv
    for r in 0..<rows {
      var peak = -Float.infinity
      var poisoned = false
      for c in 0..<splits {
        let m = partials[c * stride + bq * dv + r]
        if m.isNaN { poisoned = true }
        peak = max(peak, m)
      }
      let row = out + r * dv
      row.update(repeating: 0, count: dv)
      logSumExp?[b * tq + i0 + r] = poisoned ? .nan : -.infinity
      if poisoned {
        row.update(repeating: .nan, count: dv)
        continue
      }
      guard peak > -.infinity else { continue }
      var sum: Float = 0
      for c in 0..<splits {
        let base = partials + c * stride
        let m = base[bq * dv + r]
        guard m > -.infinity else { continue }
        let factor = fastExp(m - peak)
        sum += base[bq * dv + bq + r] * factor
        for k in 0..<dv { row[k] += base[r * dv + k] * factor }
      }
      var (shift, carried) = (peak, Float(1))
      if sum > 0, let sink = terms.sink(batch: b + r / rowCounts(firstQuery: i0).perHead) {
        (sum, shift, carried) = Self.withSink(sink, sum: sum, shift: peak)
      }
      let factor: Float = sum > 0 ? carried / sum : 0
      for k in 0..<dv { row[k] *= factor }
      if sum > 0 { logSumExp?[b * tq + i0 + r] = shift + log(sum) }
    }
  }
}
