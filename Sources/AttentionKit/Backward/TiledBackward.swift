import Foundation
import Synchronization
import Tensors

/// The backward pass of attention in the manner of FlashAttention-2: never holds a `[Tq, Tk]`
/// matrix, recomputes the probabilities tile by tile from each row's log-sum-exp.
///
/// The same formulas and semantics as `Attention.backward`'s other kernels (the dropout decisions
/// are regenerated from `Dropout`'s counters, never stored), in three passes:
/// 0. the forward pass (`TiledAttention`, same blocks), which also writes the log-sum-exp
///    `L_i = m_i + log ℓ_i` of every row (`−∞` for a row that sees no key); then
///    `Δ_i = Σ_c dO_ic·O_ic` and the output is released.
/// 1. Key-block tasks, one per (key/value batch `g`, block of `Bk` keys): for each query head of
///    the group and each block of `Bq` queries that can see the keys (causal and windowed
///    blocks that cannot are skipped),
///    `P = exp(scale·Q_blk·K_blkᵀ + mask − L)` (one sgemm, then the mask and `fastExp`),
///    `Pd = P∘Z/(1 − p)`, `dV_blk += Pdᵀ·dO_blk` (sgemm), `dP = (dO_blk·V_blkᵀ)∘Z/(1 − p)`
///    (sgemm), `dS = P∘(dP − Δ)`, `dK_blk += scale·dSᵀ·Q_blk` (sgemm). The task owns its
///    `dK` and `dV` rows and sums the group's heads and query blocks in increasing order.
/// 2. Query-block tasks, one per (query batch `b`, block of `Bq` queries): walking the key
///    blocks the rows can see, in increasing order, the same `P` and `dS` (two sgemms), then
///    `dQ_blk += scale·dS·K_blk` (sgemm); with `needBiasGradient`, `dS` is also added into the
///    bias gradient.
///
/// Why `dQ` has a pass of its own: a key-block task produces a `[Bq, D]` contribution to every
/// query block it meets, and summing those into `dQ` as tasks finish would add them in an order
/// that depends on the threads (and would need atomics or locks); keeping them per task would
/// take `Tq·D` floats per key block, `Tq·Tk·D/Bk` in all. Recomputing `P` and `dP` (two more
/// sgemms per tile) instead lets each query-block task own its `dQ` rows and sum the key blocks
/// in increasing order. Every sum in the kernel is then in an order fixed by the shape and the
/// block sizes, and every task computes the same floats whichever worker runs it (OpenBLAS on
/// one thread), so the results are bit-identical for any thread count. The two passes read only
/// `L`, `Δ` and the inputs, so they share one pool of workers.
///
/// The bias gradient: when a bias is broadcast, several scores add into one gradient element.
/// Query-block tasks are then grouped so that no two tasks touch the same element: the query
/// batches that read the same bias slab go into one task (in increasing order), and with a bias
/// broadcast over queries (`[…, 1, Tk]`) one task takes all the query blocks of its batches.
/// That costs parallelism (one task for a `[1, Tk]` bias shared by every head), never
/// determinism.
///
/// Workspace (`workspaceBytes`): the forward's (`TiledAttention.workspaceBytes`), its output,
/// `L` and `Δ` (`B·H·Tq·(Dv + 2)` floats), and per worker two `[Bq, Bk]` tiles: linear in
/// `Tq` and `Tk`, never `Tq·Tk`.
public enum TiledBackward {
  /// The blocks `.automatic` uses, `Bq = Bk = 256`. Measured on B1 H8 D64 with 2 threads
  /// (median of 7): 4–10% faster than 128 × 128 at T 2048 and 4096, causal or not, and within 5%
  /// of every shape from 64 × 128 to 256 × 256 tried at T 2048; 15% slower at T 512 causal, where
  /// the whole call takes 15 ms.
  public static let defaultConfiguration = TiledAttention.Configuration(
    queryBlock: 256, keyBlock: 256)

  /// How a call is cut into tasks: `keyTasks` (key/value batch, key block) pairs and, per query
  /// batch, `queryBlocks` query blocks.
  struct Partition {
    let queryBlock: Int
    let keyBlock: Int
    let queryBlocks: Int
    let keyBlocks: Int
    let keyTasks: Int
    /// Query-block tasks without the bias gradient's grouping: `B·H·queryBlocks`.
    let rowUnits: Int

    init(
      queries: Int, keys: Int, batchCount: Int, groupSize: Int,
      configuration: TiledAttention.Configuration
    ) {
      queryBlock = min(configuration.queryBlock, max(queries, 1))
      keyBlock = min(configuration.keyBlock, max(keys, 1))
      queryBlocks = (queries + queryBlock - 1) / queryBlock
      keyBlocks = (keys + keyBlock - 1) / keyBlock
      keyTasks = batchCount / max(groupSize, 1) * keyBlocks
      rowUnits = batchCount * queryBlocks
    }

    /// The workers a call starts: one per task, at most `threads`.
    func workers(threads: Int) -> Int { min(max(threads, 1), max(keyTasks + rowUnits, 1)) }
  }

  /// The bytes of workspace `Attention.backward` allocates with the tiled kernel, beyond its
  /// inputs and gradients:
  /// ```
  /// forward + 4·(B·H·Tq·(Dv + 2) + workers·2·Bq·Bk)
  /// ```
  /// with `forward = TiledAttention.workspaceBytes(…)` for the same blocks, the forward's output
  /// and the rows' `L` and `Δ`, and per worker two `[Bq, Bk]` tiles (`Bq`, `Bk` capped at `Tq`,
  /// `Tk`; `workers = min(threads, B·Hkv·⌈Tk/Bk⌉ + B·H·⌈Tq/Bq⌉)`, the tasks of the two passes
  /// before the bias gradient's grouping). No term grows with
  /// `Tq·Tk`: a 16,384-token head of `D = Dv = 64` on 2 threads needs 6.0 MB, where one
  /// `[Tq, Tk]` matrix of floats would take 1 GiB.
  public static func workspaceBytes(
    queries: Int, keys: Int, valueDim: Int, batchCount: Int, groupSize: Int = 1,
    window: Int? = nil, configuration: TiledAttention.Configuration = defaultConfiguration,
    threads: Int
  ) -> Int {
    let partition = Partition(
      queries: queries, keys: keys, batchCount: batchCount, groupSize: groupSize,
      configuration: configuration)
    let forward = TiledAttention.workspaceBytes(
      queries: queries, keys: keys, valueDim: valueDim, batchCount: batchCount,
      groupSize: groupSize, window: window, configuration: configuration, threads: threads)
    let rows = batchCount * queries * (valueDim + 2)
    let tiles = partition.workers(threads: threads) * 2 * partition.queryBlock * partition.keyBlock
    return forward + (rows + tiles) * MemoryLayout<Float>.stride
  }

  /// Called through `Attention.backward`, which holds OpenBLAS at one thread meanwhile.
  static func compute(
    _ problem: BackwardProblem, dropout: Dropout?, configuration: TiledAttention.Configuration,
    threads: Int, memoryBudget: Int?
  ) throws -> AttentionGradients {
    guard configuration.queryBlock > 0, configuration.keyBlock > 0 else {
      throw AttentionError.invalidArgument(
        "block sizes must be positive, got \(configuration.queryBlock)×\(configuration.keyBlock)")
    }
    let shape = problem.shape
    let (tq, tk, _, dv) = problem.sizes
    let bh = shape.batchCount
    let bytes = workspaceBytes(
      queries: tq, keys: tk, valueDim: dv, batchCount: bh, groupSize: shape.groupSize,
      window: problem.mask.window, configuration: configuration, threads: threads)
    try checkBackwardBudget(
      bytes, memoryBudget, what: "the tiled backward's workspace",
      advice: .other("use smaller blocks or fewer threads"))
    var (dQ, dK, dV, dBias) = try problem.zeroGradients()
    guard bh > 0, tq > 0, tk > 0 else {
      return AttentionGradients(
        dQ: dQ, dK: dK, dV: dV, dBias: dBias, workspaceBytes: 0, kernel: .tiled,
        tilesComputed: 0)
    }
    // Pass 0: the forward pass, for L; then Δ = rowsum(dO∘O), and the output goes.
    let logSumExp = UnsafeMutablePointer<Float>.allocate(capacity: bh * tq)
    let delta = UnsafeMutablePointer<Float>.allocate(capacity: bh * tq)
    defer {
      logSumExp.deallocate()
      delta.deallocate()
    }
    logSumExp.initialize(repeating: -.infinity, count: bh * tq)
    do {
      let forward = try TiledAttention.compute(
        queries: problem.queries, keys: problem.keys, values: problem.values,
        mask: problem.mask, scale: problem.requestedScale, dropout: dropout,
        relativePosition: nil, configuration: configuration, threads: threads,
        logSumExp: logSumExp)
      forward.output.scalars.withUnsafeBufferPointer { o in
        problem.gradOutput.scalars.withUnsafeBufferPointer { dO in
          for r in 0..<(bh * tq) {
            delta[r] = BackwardRows.dot(
              dO.baseAddress! + r * dv, o.baseAddress! + r * dv, count: dv)
          }
        }
      }
    }
    // Passes 1 and 2, in one pool of workers.
    let partition = Partition(
      queries: tq, keys: tk, batchCount: bh, groupSize: shape.groupSize,
      configuration: configuration)
    let plan = BackwardTilePlan(
      problem: problem, dropout: dropout, queryBlock: partition.queryBlock,
      keyBlock: partition.keyBlock, queryBlocks: partition.queryBlocks)
    let rowTasks = plan.rowTasks()
    let tasks = partition.keyTasks + rowTasks.count
    let kvCount = problem.keyValueBatchCount
    let rows = RowStatistics(logSumExp: logSumExp, delta: delta)
    let tiles = Atomic<Int>(0)
    var biasScalars = dBias?.scalars ?? []
    BackwardBuffers.with(problem, dQ: &dQ, dK: &dK, dV: &dV, extra: &biasScalars) { buffers in
      let queue = TaskQueue()
      DispatchQueue.concurrentPerform(iterations: partition.workers(threads: threads)) { _ in
        let scratch = BackwardScratch(plan: plan)
        var count = 0
        while case let next = queue.take(), next < tasks {
          if next < partition.keyTasks {
            // Key block major: with a causal mask the first key blocks are seen by the most
            // queries, so they go first.
            let (block, g) = next.quotientAndRemainder(dividingBy: kvCount)
            count += plan.keyTask(
              keyValueBatch: g, keyBlock: block, buffers: buffers, rows: rows, scratch: scratch)
          } else {
            count += plan.queryTask(
              rowTasks[next - partition.keyTasks], buffers: buffers, rows: rows,
              scratch: scratch)
          }
        }
        tiles.add(count, ordering: .relaxed)
      }
    }
    if dBias != nil { dBias!.scalars = biasScalars }
    return AttentionGradients(
      dQ: dQ, dK: dK, dV: dV, dBias: dBias, workspaceBytes: bytes, kernel: .tiled,
      tilesComputed: tiles.load(ordering: .relaxed))
  }
}

/// Each row's log-sum-exp `L` and `Δ = Σ_c dO_ic·O_ic`, `[B·H·Tq]`, shared read-only.
struct RowStatistics: @unchecked Sendable {
  let logSumExp: UnsafeMutablePointer<Float>
  let delta: UnsafeMutablePointer<Float>
}

/// One worker's two `[Bq, Bk]` tiles: `P`, and `Pd`, then `dP`, then `dS`.
final class BackwardScratch {
  let probabilities: UnsafeMutablePointer<Float>
  let gradient: UnsafeMutablePointer<Float>

  init(plan: BackwardTilePlan) {
    probabilities = .allocate(capacity: plan.queryBlock * plan.keyBlock)
    gradient = .allocate(capacity: plan.queryBlock * plan.keyBlock)
  }

  deinit {
    probabilities.deallocate()
    gradient.deallocate()
  }
}

/// A (query batch, query block) pair of a query-block task.
struct RowUnit: Sendable {
  let batch: Int
  let block: Int
}

/// Everything about a tiled backward call that is the same for every tile.
struct BackwardTilePlan: Sendable {
  let problem: BackwardProblem
  let dropout: Dropout?
  let queryBlock: Int
  let keyBlock: Int
  let queryBlocks: Int

  var mask: ResolvedMask { problem.resolved }

  /// The query-block tasks, each a list of (batch, block) done in order. Without the bias
  /// gradient, one pair per task; with it, grouped so that no two tasks add into the same
  /// gradient element (see `TiledBackward`). With a causal mask the last blocks, which see the
  /// most keys, come first.
  func rowTasks() -> [[RowUnit]] {
    let bh = problem.shape.batchCount
    let blocks = mask.isCausal ? Array((0..<queryBlocks).reversed()) : Array(0..<queryBlocks)
    guard let bias = problem.biasGradient else {
      return blocks.flatMap { block in (0..<bh).map { [RowUnit(batch: $0, block: block)] } }
    }
    // Query batches by the bias slab they read, in order of their first batch.
    var slabs: [Int: Int] = [:]
    var groups: [[Int]] = []
    for b in 0..<bh {
      if let index = slabs[bias.batchOffsets[b]] {
        groups[index].append(b)
      } else {
        slabs[bias.batchOffsets[b]] = groups.count
        groups.append([b])
      }
    }
    if bias.rowStride == 0 {
      return groups.map { group in
        blocks.flatMap { block in group.map { RowUnit(batch: $0, block: block) } }
      }
    }
    return blocks.flatMap { block in
      groups.map { group in group.map { RowUnit(batch: $0, block: block) } }
    }
  }

  /// `P = exp(S − L)` in place of the scores `row` of query `i` of batch `b` for keys
  /// `j0 ..< j0 + count`, after the mask; zeros for a row that sees no key.
  @inline(__always)
  private func probabilities(
    _ row: UnsafeMutablePointer<Float>, batch b: Int, query i: Int, firstKey j0: Int, count: Int,
    rows: RowStatistics
  ) {
    mask.apply(to: row, batch: b, query: i, firstKey: j0, count: count)
    let l = rows.logSumExp[b * problem.shape.queries + i]
    if l == -.infinity {
      row.update(repeating: 0, count: count)
    } else if l.isNaN {
      row.update(repeating: .nan, count: count)
    } else {
      _ = RowSoftmax.exponentiate(row, count: count, shift: l)
    }
  }

  /// `P` (in `scratch.probabilities`) and `dS` (in `scratch.gradient`) of the tile of query
  /// rows `i0 ..< i0 + rowCount` of batch `b` and keys `j0 ..< j0 + cols`; with `valueGradient`,
  /// also `dV_blk += Pdᵀ·dO_blk` on the way.
  @inline(__always)
  private func tile(
    batch b: Int, keyValueBatch g: Int, firstQuery i0: Int, rowCount: Int, firstKey j0: Int,
    cols: Int, buffers: BackwardBuffers, rows: RowStatistics, scratch: BackwardScratch,
    valueGradient: Bool
  ) {
    let (tq, tk, d, dv) = problem.sizes
    let bk = keyBlock
    let p = scratch.probabilities
    let s = scratch.gradient
    let q = buffers.q + (b * tq + i0) * d
    let dO = buffers.dO + (b * tq + i0) * dv
    // P = exp(scale·Q_blk·K_blkᵀ + mask − L).
    if d > 0 {
      BLAS.sgemm(
        transposeB: true, m: rowCount, n: cols, k: d, alpha: problem.scale, a: q, lda: d,
        b: buffers.k + (g * tk + j0) * d, ldb: d, c: p, ldc: bk)
    } else {
      for r in 0..<rowCount { (p + r * bk).update(repeating: 0, count: cols) }
    }
    for r in 0..<rowCount {
      probabilities(p + r * bk, batch: b, query: i0 + r, firstKey: j0, count: cols, rows: rows)
    }
    // dV_blk += Pdᵀ·dO_blk, Pd = P∘Z/(1 − p) (in the second tile, which dP then overwrites).
    if valueGradient && dv > 0 {
      var pd = UnsafePointer(p)
      if let dropout {
        for r in 0..<rowCount {
          (s + r * bk).update(from: p + r * bk, count: cols)
          dropout.apply(to: s + r * bk, row: b * tq + i0 + r, firstKey: j0, count: cols)
        }
        pd = UnsafePointer(s)
      }
      BLAS.sgemm(
        transposeA: true, m: cols, n: dv, k: rowCount, a: pd, lda: bk, b: dO, ldb: dv, beta: 1,
        c: buffers.dV + (g * tk + j0) * dv, ldc: dv)
    }
    // dP = (dO_blk·V_blkᵀ)∘Z/(1 − p); dS = P∘(dP − Δ).
    if dv > 0 {
      BLAS.sgemm(
        transposeB: true, m: rowCount, n: cols, k: dv, a: dO, lda: dv,
        b: buffers.v + (g * tk + j0) * dv, ldb: dv, c: s, ldc: bk)
    } else {
      for r in 0..<rowCount { (s + r * bk).update(repeating: 0, count: cols) }
    }
    for r in 0..<rowCount {
      dropout?.apply(to: s + r * bk, row: b * tq + i0 + r, firstKey: j0, count: cols)
      BackwardRows.softmaxGradient(
        probabilities: p + r * bk, gradient: s + r * bk, count: cols,
        delta: rows.delta[b * tq + i0 + r])
    }
  }

  /// Pass 1 for key block `block` of key/value batch `g`: `dK` and `dV` of its keys, over every
  /// query head of the group and every query block that can see them. Returns the tiles computed.
  func keyTask(
    keyValueBatch g: Int, keyBlock block: Int, buffers: BackwardBuffers, rows: RowStatistics,
    scratch: BackwardScratch
  ) -> Int {
    let (tq, tk, d, _) = problem.sizes
    let j0 = block * keyBlock
    let cols = min(keyBlock, tk - j0)
    var tiles = 0
    for b in problem.queryBatches(ofKeyValueBatch: g) {
      for qb in 0..<queryBlocks {
        let i0 = qb * queryBlock
        let rowCount = min(queryBlock, tq - i0)
        // The keys the block's rows can see lie in [first row's lower, last row's upper).
        let lower = mask.visibleKeys(query: i0).lowerBound
        let upper = mask.visibleKeys(query: i0 + rowCount - 1).upperBound
        guard lower < j0 + cols, upper > j0 else { continue }
        tiles += 1
        tile(
          batch: b, keyValueBatch: g, firstQuery: i0, rowCount: rowCount, firstKey: j0,
          cols: cols, buffers: buffers, rows: rows, scratch: scratch, valueGradient: true)
        // dK_blk += scale·dSᵀ·Q_blk.
        if d > 0 {
          BLAS.sgemm(
            transposeA: true, m: cols, n: d, k: rowCount, alpha: problem.scale,
            a: scratch.gradient, lda: keyBlock, b: buffers.q + (b * tq + i0) * d, ldb: d,
            beta: 1, c: buffers.dK + (g * tk + j0) * d, ldc: d)
        }
      }
    }
    return tiles
  }

  /// Pass 2 for the (batch, query block) pairs of one task: their `dQ` rows, and their `dS`
  /// added into the bias gradient when it is asked for. Returns the tiles computed.
  func queryTask(
    _ units: [RowUnit], buffers: BackwardBuffers, rows: RowStatistics, scratch: BackwardScratch
  ) -> Int {
    let (tq, tk, d, _) = problem.sizes
    var tiles = 0
    for unit in units {
      let b = unit.batch
      let g = problem.shape.keyValueBatch(b)
      let i0 = unit.block * queryBlock
      let rowCount = min(queryBlock, tq - i0)
      let keyStart = mask.visibleKeys(query: i0).lowerBound
      let keyEnd = mask.visibleKeys(query: i0 + rowCount - 1).upperBound
      var j0 = keyStart
      while j0 < keyEnd {
        let cols = min(keyBlock, keyEnd - j0)
        tiles += 1
        tile(
          batch: b, keyValueBatch: g, firstQuery: i0, rowCount: rowCount, firstKey: j0,
          cols: cols, buffers: buffers, rows: rows, scratch: scratch, valueGradient: false)
        let s = scratch.gradient
        // dQ_blk += scale·dS·K_blk.
        if d > 0 {
          BLAS.sgemm(
            m: rowCount, n: d, k: cols, alpha: problem.scale, a: s, lda: keyBlock,
            b: buffers.k + (g * tk + j0) * d, ldb: d, beta: 1,
            c: buffers.dQ + (b * tq + i0) * d, ldc: d)
        }
        if let bias = problem.biasGradient, let out = buffers.kept {
          for r in 0..<rowCount {
            for j in 0..<cols {
              out[bias.index(batch: b, row: i0 + r, column: j0 + j)] += s[r * keyBlock + j]
            }
          }
        }
        j0 += cols
      }
    }
    return tiles
  }
}
