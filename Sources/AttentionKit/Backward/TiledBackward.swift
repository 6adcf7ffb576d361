import Foundation
import Synchronization
import Tensors

/// The backward pass of attention in the manner of FlashAttention-2: never holds a `[Tq, Tk]`
/// matrix, recomputes the probabilities tile by tile from each row's log-sum-exp.
///
/// The same formulas and semantics as `Attention.backward`'s other kernels (the dropout decisions
/// are regenerated from `Dropout`'s counters, never stored):
/// 0. The rows' log-sum-exp `L_i = m_i + log ℓ_i` (`−∞` for a row that sees no key) and output
///    `O`: the forward's, when `Attention.backward` is handed them (`output:`, `logSumExp:`),
///    otherwise from a rerun of the forward pass (`TiledAttention`, same blocks), whose output
///    is released once `Δ_i = Σ_c dO_ic·O_ic` is computed.
/// 1. Tasks per (key/value batch `g`, key chunk `c`): the chunk's key blocks of `Bk` keys are
///    those whose index is `c` modulo `C` (interleaved, so that with a causal mask every chunk
///    has about the same work), walked in increasing order. For each, for each query head of the
///    group and each block of `Bq` queries that can see the keys (causal and windowed blocks that
///    cannot are skipped), five sgemms:
///    `P = exp(scale·Q_blk·K_blkᵀ + terms + mask − L)` (sgemm, then the score terms, the mask
///    and `fastExp`),
///    `Pd = P∘Z/(1 − p)`, `dV_blk += Pdᵀ·dO_blk` (sgemm), `dP = (dO_blk·V_blkᵀ)∘Z/(1 − p)`
///    (sgemm), `dS = P∘(dP − Δ)`, `dK_blk += scale·dXᵀ·Q_blk` (sgemm) and
///    `dQ_c,blk += scale·dX·K_blk` (sgemm) into the chunk's own `dQ` buffer, `dX = dS` or, with
///    a soft-cap, `dS∘(1 − (t/c)²)` (the factors kept in a third tile).
/// The score terms' gradients (`ScoreTermGradients`): `dσ_h = −Σ_i exp(σ_h − L_i)·Δ_i` from
/// pass 0's rows; T5's `dS` by distance summed per (query batch, key chunk) — per (query batch,
/// query block) in the bias gradient's scheme — by the task that owns it, then over those in
/// increasing order.
/// 2. `dQ = dQ_0 + dQ_1 + … + dQ_{C−1}`, added in that order (chunk 0's buffer is `dQ` itself).
///
/// Determinism: a task owns the `dK` and `dV` rows of its key blocks and its chunk's `dQ` buffer
/// for its heads, and sums into them in an order fixed by the shape and the block sizes; every
/// task computes the same floats whichever worker runs it (OpenBLAS on one thread); the chunk
/// count `C` depends on the shape alone (`Partition.dQChunks`), never on the thread count. So
/// the results are bit-identical for any thread count.
///
/// `C = min(⌈Tk/Bk⌉, 8, ⌈16 / (B·Hkv)⌉, ⌊2²⁶ / (B·H·Tq·D)⌋)`, at least 1: enough tasks (16)
/// for the workers when there are few key/value heads, at most 8 buffers, and at most 2²⁶ floats
/// (256 MiB) in all, `dQ` included (a shape with more than 2²⁵ `dQ` elements gets `C = 1`, no
/// extra memory). The extra memory, `(C − 1)·B·H·Tq·D` floats, is thus below
/// `min(7·|dQ|, 256 MiB)`: 112 MiB for one 65,536-token head of `D = 64`, 4 MiB for
/// B1 H8 T2048 D64 (`C = 2`). Nothing is zeroed beforehand, neither the chunk buffers nor `dQ`,
/// `dK`, `dV`: each block of them is written first with `β = 0`, only the `dQ` blocks a chunk
/// wrote are summed, and the blocks that no query sees are set to zero.
///
/// The bias gradient: when asked for, several scores may add into one gradient element from
/// different key chunks or key/value heads, so those calls keep a two-pass scheme (9 sgemms a
/// tile): key-block tasks as above without `dQ` (`dK`, `dV`), then query-block tasks that
/// recompute `P` and `dS`, own their `dQ` rows (`dQ_blk += scale·dS·K_blk`) and add `dS` into
/// the bias gradient. Query-block tasks are then grouped so that no two touch the same element:
/// the query batches that read the same bias slab go into one task (in increasing order), and
/// with a bias broadcast over queries (`[…, 1, Tk]`) one task takes all the query blocks of its
/// batches.
///
/// Workspace (`workspaceBytes`): `L` and `Δ` (`2·B·H·Tq` floats), per worker two `[Bq, Bk]`
/// tiles, the `C − 1` extra `dQ` buffers (`(C − 1)·B·H·Tq·D` floats, bounded as above), and,
/// when the forward is rerun, its workspace and output (`B·H·Tq·Dv` floats): linear in `Tq` and
/// `Tk`, never `Tq·Tk`.
public enum TiledBackward {
  /// The blocks `.automatic` uses, `Bq = Bk = 256`: no other block shape was faster (the
  /// measurements are in docs/performance.md, "The backward pass").
  public static let defaultConfiguration = TiledAttention.Configuration(
    queryBlock: 256, keyBlock: 256)

  /// The most `dQ` buffers (`C`) a call uses.
  static let maxGradientChunks = 8
  /// The most floats the `C` `dQ` buffers may take together (256 MiB), `dQ` included.
  static let maxGradientChunkFloats = 1 << 26
  /// Fewer (key/value batch, key chunk) tasks than this split the keys into more chunks.
  static let chunkTaskTarget = 16

  /// How a call is cut into tasks: `keyTasks` key-side tasks (of the five-sgemm pass, or of the
  /// bias-gradient scheme's first pass) and the second pass's `rowUnits`; the chunk count `C`.
  struct Partition {
    let queryBlock: Int
    let keyBlock: Int
    let queryBlocks: Int
    let keyBlocks: Int
    /// `C`, the `dQ` buffers of the five-sgemm pass (1 with the bias gradient).
    let dQChunks: Int
    /// Key-side tasks: (key/value batch, chunk) pairs, or (key/value batch, key block) pairs
    /// with the bias gradient.
    let keyTasks: Int
    /// Query-block tasks of the bias-gradient scheme, before its grouping: `B·H·queryBlocks`;
    /// 0 without the bias gradient.
    let rowUnits: Int

    init(
      queries: Int, keys: Int, headDim: Int, batchCount: Int, groupSize: Int,
      biasGradient: Bool, configuration: TiledAttention.Configuration
    ) {
      queryBlock = min(configuration.queryBlock, max(queries, 1))
      keyBlock = min(configuration.keyBlock, max(keys, 1))
      queryBlocks = (queries + queryBlock - 1) / queryBlock
      keyBlocks = (keys + keyBlock - 1) / keyBlock
      let kvBatches = batchCount / max(groupSize, 1)
      if biasGradient {
        dQChunks = 1
        keyTasks = kvBatches * keyBlocks
        rowUnits = batchCount * queryBlocks
      } else {
        let elements = batchCount.multipliedReportingOverflow(by: queries)
        let gradient = elements.partialValue.multipliedReportingOverflow(by: max(headDim, 1))
        let byMemory =
          elements.overflow || gradient.overflow
          ? 1 : TiledBackward.maxGradientChunkFloats / max(gradient.partialValue, 1)
        let byTasks = (TiledBackward.chunkTaskTarget + max(kvBatches, 1) - 1) / max(kvBatches, 1)
        dQChunks = max(1, min(keyBlocks, TiledBackward.maxGradientChunks, byTasks, byMemory))
        keyTasks = kvBatches * dQChunks
        rowUnits = 0
      }
    }

    /// The workers a call starts: one per task, at most `threads`.
    func workers(threads: Int) -> Int { min(max(threads, 1), max(keyTasks + rowUnits, 1)) }
  }

  /// The bytes of workspace `Attention.backward` allocates with the tiled kernel, beyond its
  /// inputs and gradients:
  /// ```
  /// 4·(2·B·H·Tq + workers·2·Bq·Bk + (C − 1)·B·H·Tq·D) + C·B·H·⌈Tq/Bq⌉
  ///   (+ forward + 4·B·H·Tq·Dv when the forward is rerun)
  /// ```
  /// with `L` and `Δ`, per worker two `[Bq, Bk]` tiles (`Bq`, `Bk` capped at `Tq`, `Tk`;
  /// `workers = min(threads, tasks)`), the extra `dQ` buffers and a flag per (buffer, query
  /// block) (`C = 1` with the bias gradient; see the type's comment), and, unless the forward's
  /// `output` and `logSumExp` are given (`forwardGiven`), `forward =
  /// TiledAttention.workspaceBytes(…)` for the same blocks and the rerun's output. `headDim`
  /// is `D` (`valueDim` when `nil`). No term grows with `Tq·Tk`: a 16,384-token head of
  /// `D = Dv = 64` (causal, window 256) on 2 threads needs 34.9 MB with the forward rerun, 29.4 MB
  /// of it the seven extra `dQ` buffers (`C = 8`), where one `[Tq, Tk]` matrix of floats would
  /// take 1 GiB.
  public static func workspaceBytes(
    queries: Int, keys: Int, headDim: Int? = nil, valueDim: Int, batchCount: Int,
    groupSize: Int = 1, window: Int? = nil,
    configuration: TiledAttention.Configuration = defaultConfiguration,
    needBiasGradient: Bool = false, forwardGiven: Bool = false, terms: ScoreTerms = .none,
    threads: Int
  ) -> Int {
    let d = headDim ?? valueDim
    let partition = Partition(
      queries: queries, keys: keys, headDim: d, batchCount: batchCount, groupSize: groupSize,
      biasGradient: needBiasGradient, configuration: configuration)
    let forward =
      forwardGiven
      ? 0
      : TiledAttention.workspaceBytes(
        queries: queries, keys: keys, headDim: headDim, valueDim: valueDim,
        batchCount: batchCount, groupSize: groupSize, window: window,
        configuration: configuration, threads: threads)
        + batchCount * queries * valueDim * MemoryLayout<Float>.stride
    let rows = 2 * batchCount * queries
    let tiles = partition.workers(threads: threads) * 2 * partition.queryBlock * partition.keyBlock
    let chunks = (partition.dQChunks - 1) * batchCount * queries * d
    let flags = partition.dQChunks * batchCount * partition.queryBlocks
    // Score terms: a tile of soft-cap factors per worker; p_sink·Δ per row; T5's bins per slot.
    let factors =
      terms.softcap == nil
      ? 0 : partition.workers(threads: threads) * partition.queryBlock * partition.keyBlock
    let reach = terms.positionBiases.compactMap { bias -> Int? in
      if case .t5(_, let distance, _) = bias { return distance }
      return nil
    }.max()
    let units = needBiasGradient ? partition.queryBlocks : partition.dQChunks
    let termDoubles =
      (terms.sinks == nil ? 0 : batchCount * queries)
      + (reach.map { batchCount * units * (2 * $0 + 1) } ?? 0)
    // The relative-position term: R and G per worker, dE per slot.
    let relative =
      terms.relativePosition.map { bias in
        let width = min(bias.tableWidth, partition.queryBlock + partition.keyBlock - 1)
        return partition.workers(threads: threads) * 2 * partition.queryBlock * width
          + batchCount * units * bias.columns(queries: queries, keys: keys).count * d
      } ?? 0
    return forward + (rows + tiles + chunks + factors + relative) * MemoryLayout<Float>.stride
      + flags + termDoubles * MemoryLayout<Double>.stride
  }

  /// Called through `Attention.backward`, which holds OpenBLAS at one thread meanwhile.
  /// `forward`: the forward's output and log-sum-exp, already checked against the shapes.
  static func compute(
    _ problem: BackwardProblem, dropout: Dropout?, configuration: TiledAttention.Configuration,
    threads: Int, memoryBudget: Int?, forward given: (output: Tensor, logSumExp: Tensor)? = nil
  ) throws -> AttentionGradients {
    guard configuration.queryBlock > 0, configuration.keyBlock > 0 else {
      throw AttentionError.invalidArgument(
        "block sizes must be positive, got \(configuration.queryBlock)×\(configuration.keyBlock)")
    }
    let shape = problem.shape
    let (tq, tk, d, dv) = problem.sizes
    let bh = shape.batchCount
    let biasGradient = problem.biasGradient != nil
    let bytes = workspaceBytes(
      queries: tq, keys: tk, headDim: d, valueDim: dv, batchCount: bh,
      groupSize: shape.groupSize, window: problem.mask.window, configuration: configuration,
      needBiasGradient: biasGradient, forwardGiven: given != nil, terms: problem.scoreTerms,
      threads: threads)
    try checkBackwardBudget(
      bytes, memoryBudget, what: "the tiled backward's workspace",
      advice: .other("use smaller blocks or fewer threads"))
    // The five-sgemm pass writes every element of the gradients (see `reduce`): no zeroing.
    var (dQ, dK, dV, dBias): (Tensor, Tensor, Tensor, Tensor?)
    if biasGradient || bh == 0 || tq == 0 || tk == 0 {
      (dQ, dK, dV, dBias) = try problem.zeroGradients()
    } else {
      (dQ, dK, dV) = try problem.unfilledGradients()
      dBias = nil
    }
    let terms = problem.terms
    guard bh > 0, tq > 0, tk > 0 else {
      return AttentionGradients(
        dQ: dQ, dK: dK, dV: dV, dBias: dBias,
        dSinks: terms.sinkGradients(sinkTerms: [], queries: tq),
        dT5Tables: terms.t5TableGradients { _ in
          [Double](repeating: 0, count: terms.distanceBins)
        },
        dRelativeEmbeddings: try problem.scoreTerms.relativePosition.map {
          try Tensor(shape: $0.embeddings.shape)
        }, workspaceBytes: 0, kernel: .tiled(configuration), tilesComputed: 0)
    }
    // Pass 0: L, and Δ = rowsum(dO∘O), from the forward's results or a rerun.
    let logSumExp = UnsafeMutablePointer<Float>.allocate(capacity: bh * tq)
    let delta = UnsafeMutablePointer<Float>.allocate(capacity: bh * tq)
    defer {
      logSumExp.deallocate()
      delta.deallocate()
    }
    do {
      let output: Tensor
      let lse: Tensor
      if let given {
        (output, lse) = given
      } else {
        let forward = try TiledAttention.compute(
          queries: problem.queries, keys: problem.keys, values: problem.values,
          mask: problem.mask, scale: problem.requestedScale, dropout: dropout,
          relativePosition: problem.scoreTerms.relativePosition, terms: problem.scoreTerms,
          configuration: configuration,
          threads: threads,
          needLogSumExp: true)
        (output, lse) = (forward.output, forward.logSumExp!)
      }
      lse.scalars.withUnsafeBufferPointer { l in
        logSumExp.initialize(from: l.baseAddress!, count: bh * tq)
      }
      output.scalars.withUnsafeBufferPointer { o in
        problem.gradOutput.scalars.withUnsafeBufferPointer { dO in
          for r in 0..<(bh * tq) {
            delta[r] = BackwardRows.dot(
              dO.baseAddress! + r * dv, o.baseAddress! + r * dv, count: dv)
          }
        }
      }
    }
    let partition = Partition(
      queries: tq, keys: tk, headDim: d, batchCount: bh, groupSize: shape.groupSize,
      biasGradient: biasGradient, configuration: configuration)
    // Each row's p_sink·Δ = exp(σ − L)·Δ, from pass 0; T5's bins per (query batch, unit).
    let sums = TermSums(
      rows: terms.sinks == nil ? 0 : bh * tq, batches: bh,
      unitsPerBatch: biasGradient ? partition.queryBlocks : partition.dQChunks,
      width: terms.distanceBins)
    defer { sums.deallocate() }
    let relative = RelativePositionPass(problem, slots: bh * sums.unitsPerBatch)
    if let sinks = terms.sinks {
      for r in 0..<(bh * tq) where logSumExp[r] > -.infinity {
        let sink = Double(sinks[terms.head(r / tq)])
        sums.rows[r] = exp(sink - Double(logSumExp[r])) * Double(delta[r])
      }
    }
    let plan = BackwardTilePlan(
      problem: problem, dropout: dropout, queryBlock: partition.queryBlock,
      keyBlock: partition.keyBlock, queryBlocks: partition.queryBlocks,
      keyBlocks: partition.keyBlocks, chunks: partition.dQChunks, sums: sums,
      relative: relative)
    let rows = RowStatistics(logSumExp: logSumExp, delta: delta)
    let tiles = Atomic<Int>(0)
    let kvCount = problem.keyValueBatchCount
    let workers = partition.workers(threads: threads)
    if !biasGradient {
      // The C − 1 extra dQ buffers (chunk 0 adds into dQ itself) and which query blocks of
      // each chunk's buffer were written.
      let extra = (partition.dQChunks - 1) * bh * tq * d
      let chunkBuffers = UnsafeMutablePointer<Float>.allocate(capacity: max(extra, 1))
      let written = UnsafeMutablePointer<Bool>.allocate(
        capacity: partition.dQChunks * bh * partition.queryBlocks)
      written.initialize(repeating: false, count: partition.dQChunks * bh * partition.queryBlocks)
      defer {
        chunkBuffers.deallocate()
        written.deallocate()
      }
      var none: [Float] = []
      BackwardBuffers.with(problem, dQ: &dQ, dK: &dK, dV: &dV, extra: &none) { buffers in
        let chunks = ChunkBuffers(buffers: chunkBuffers, written: written)
        let queue = TaskQueue()
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
          let scratch = BackwardScratch(plan: plan)
          var count = 0
          while case let next = queue.take(), next < partition.keyTasks {
            let (chunk, g) = next.quotientAndRemainder(dividingBy: kvCount)
            count += plan.chunkTask(
              keyValueBatch: g, chunk: chunk, buffers: buffers, chunks: chunks, rows: rows,
              scratch: scratch)
          }
          tiles.add(count, ordering: .relaxed)
        }
        // dQ = dQ_0 + dQ_1 + … + dQ_{C−1}, in that order, per (query batch, query block).
        let units = bh * partition.queryBlocks
        let reduceQueue = TaskQueue()
        DispatchQueue.concurrentPerform(iterations: min(max(threads, 1), units)) { _ in
          while case let unit = reduceQueue.take(), unit < units {
            plan.reduce(unit: unit, dQ: buffers.dQ, chunks: chunks)
          }
        }
      }
    } else {
      // The bias gradient's scheme: key-block tasks (dK, dV), then query-block tasks (dQ, dBias).
      let rowTasks = plan.rowTasks()
      let tasks = partition.keyTasks + rowTasks.count
      var biasScalars = dBias?.scalars ?? []
      BackwardBuffers.with(problem, dQ: &dQ, dK: &dK, dV: &dV, extra: &biasScalars) { buffers in
        let queue = TaskQueue()
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
          let scratch = BackwardScratch(plan: plan)
          var count = 0
          while case let next = queue.take(), next < tasks {
            if next < partition.keyTasks {
              // Key block major: with a causal mask the first key blocks are seen by the most
              // queries, so they go first.
              let (block, g) = next.quotientAndRemainder(dividingBy: kvCount)
              count += plan.keyTask(
                keyValueBatch: g, keyBlock: block, buffers: buffers, rows: rows,
                scratch: scratch)
            } else {
              count += plan.queryTask(
                rowTasks[next - partition.keyTasks], buffers: buffers, rows: rows,
                scratch: scratch)
            }
          }
          tiles.add(count, ordering: .relaxed)
        }
      }
      dBias!.scalars = biasScalars
    }
    return AttentionGradients(
      dQ: dQ, dK: dK, dV: dV, dBias: dBias,
      dSinks: terms.sinkGradients(sinkTerms: sums.rowArray, queries: tq),
      dT5Tables: terms.t5TableGradients { h in sums.binsOfHead(h, terms: terms) },
      dRelativeEmbeddings: relative?.embeddingGradient(), workspaceBytes: bytes,
      kernel: .tiled(configuration),
      tilesComputed: tiles.load(ordering: .relaxed))
  }
}

/// The `C − 1` extra `dQ` buffers of the five-sgemm pass (`[C − 1, B·H, Tq, D]`) and, per
/// (chunk, query batch, query block), whether the chunk wrote it; shared by tasks that own
/// disjoint parts.
struct ChunkBuffers: @unchecked Sendable {
  let buffers: UnsafeMutablePointer<Float>
  let written: UnsafeMutablePointer<Bool>
}

/// Each row's log-sum-exp `L` and `Δ = Σ_c dO_ic·O_ic`, `[B·H·Tq]`, shared read-only.
struct RowStatistics: @unchecked Sendable {
  let logSumExp: UnsafeMutablePointer<Float>
  let delta: UnsafeMutablePointer<Float>
}

/// One worker's `[Bq, Bk]` tiles: `P`, and `Pd`, then `dP`, then `dS` (then `dX`); with a
/// soft-cap, its factors `1 − (t/c)²`.
final class BackwardScratch {
  let probabilities: UnsafeMutablePointer<Float>
  let gradient: UnsafeMutablePointer<Float>
  let factors: UnsafeMutablePointer<Float>
  /// With the relative-position term, its table `R` and `G`, `[Bq, W]` each (row stride
  /// `relativeStride`).
  let table: UnsafeMutablePointer<Float>
  let g: UnsafeMutablePointer<Float>
  let relativeStride: Int

  init(plan: BackwardTilePlan) {
    probabilities = .allocate(capacity: plan.queryBlock * plan.keyBlock)
    gradient = .allocate(capacity: plan.queryBlock * plan.keyBlock)
    factors = .allocate(
      capacity: plan.problem.terms.softcap == nil ? 1 : plan.queryBlock * plan.keyBlock)
    relativeStride =
      plan.relative?.tableWidth(queries: plan.queryBlock, keys: plan.keyBlock) ?? 0
    table = .allocate(capacity: max(plan.queryBlock * relativeStride, 1))
    g = .allocate(capacity: max(plan.queryBlock * relativeStride, 1))
  }

  deinit {
    probabilities.deallocate()
    gradient.deallocate()
    factors.deallocate()
    table.deallocate()
    g.deallocate()
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
  let keyBlocks: Int
  /// `C`, the `dQ` buffers of the five-sgemm pass.
  let chunks: Int
  /// The score terms' sums (`p_sink·Δ` by row, T5's `dS` by distance per slot).
  let sums: TermSums
  /// The relative-position term's table, `G` and `dE` slots (per slot as `sums`); `nil`
  /// without it.
  let relative: RelativePositionPass?

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

  /// `P = exp(S − L)` in place of the scaled scores `row` of query `i` of batch `b` for keys
  /// `j0 ..< j0 + count`, after the score terms (the soft-cap's factors into `factors`) and the
  /// mask; zeros for a row that sees no key.
  @inline(__always)
  private func probabilities(
    _ row: UnsafeMutablePointer<Float>, factors: UnsafeMutablePointer<Float>,
    positions: UnsafePointer<Float>?, batch b: Int, query i: Int, firstKey j0: Int, count: Int,
    rows: RowStatistics
  ) {
    let terms = problem.terms
    terms.capScores(row, count: count)
    terms.capFactors(row, into: factors, count: count)
    if let positions, let relative {
      relative.bias.add(table: positions, to: row, query: i, firstKey: j0, count: count)
    }
    terms.addPositionBias(to: row, batch: b, query: i, firstKey: j0, count: count)
    mask.apply(to: row, batch: b, query: i, firstKey: j0, count: count)
    let l = rows.logSumExp[b * problem.shape.queries + i]
    if l == -.infinity {
      row.update(repeating: 0, count: count)
    } else if l.isNaN {
      row.update(repeating: .nan, count: count)
    } else {
      BackwardRows.exponentiate(row, count: count, shift: l)
    }
  }

  /// `P` (in `scratch.probabilities`) and `dX` (in `scratch.gradient`: `dS`, times the
  /// soft-cap's factors) of the tile of query rows `i0 ..< i0 + rowCount` of batch `b` and keys
  /// `j0 ..< j0 + cols`; with `valueGradient`, also `dV_blk += Pdᵀ·dO_blk` on the way. `dS`
  /// itself goes to T5's `bins` and, with `biasGradient`, into the bias gradient.
  @inline(__always)
  private func tile(
    batch b: Int, keyValueBatch g: Int, firstQuery i0: Int, rowCount: Int, firstKey j0: Int,
    cols: Int, buffers: BackwardBuffers, rows: RowStatistics, scratch: BackwardScratch,
    valueGradient: Bool, valueBeta: Float = 1, bins: UnsafeMutablePointer<Double>? = nil,
    biasGradient: Bool = false, relativeGradient: Bool = false
  ) -> ClosedRange<Int> {
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
    let capped = problem.terms.softcap != nil
    // The relative-position term's table for the tile's columns.
    let columns =
      relative?.columns(firstQuery: i0, queries: rowCount, firstKey: j0, keys: cols) ?? 0...0
    let stride = scratch.relativeStride
    relative?.table(
      queries: q, rows: rowCount, columns: columns, into: scratch.table, stride: stride)
    for r in 0..<rowCount {
      probabilities(
        p + r * bk, factors: scratch.factors + (capped ? r * bk : 0),
        positions: relative == nil ? nil : scratch.table + r * stride - columns.lowerBound,
        batch: b, query: i0 + r, firstKey: j0, count: cols, rows: rows)
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
        transposeA: true, m: cols, n: dv, k: rowCount, a: pd, lda: bk, b: dO, ldb: dv,
        beta: valueBeta, c: buffers.dV + (g * tk + j0) * dv, ldc: dv)
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
      let row = s + r * bk
      dropout?.apply(to: row, row: b * tq + i0 + r, firstKey: j0, count: cols)
      BackwardRows.softmaxGradient(
        probabilities: p + r * bk, gradient: row, count: cols, delta: rows.delta[b * tq + i0 + r])
      if let bins {
        problem.terms.binByDistance(row, into: bins, query: i0 + r, firstKey: j0, count: cols)
      }
      if biasGradient, let bias = problem.biasGradient, let out = buffers.kept {
        for j in 0..<cols { out[bias.index(batch: b, row: i0 + r, column: j0 + j)] += row[j] }
      }
      if relativeGradient, let relative {
        let gRow = scratch.g + r * stride
        gRow.update(repeating: 0, count: columns.count)
        relative.bias.accumulate(
          row: row, into: gRow - columns.lowerBound, query: i0 + r, firstKey: j0, count: cols)
      }
      if capped { BackwardRows.multiply(row, by: scratch.factors + r * bk, into: row, count: cols) }
    }
    return columns
  }

  /// The five-sgemm pass for key chunk `chunk` of key/value batch `g`: for its key blocks
  /// (`chunk`, `chunk + C`, …), `dK` and `dV` of their keys and their share of `dQ` (into the
  /// chunk's buffer), over every query head of the group and every query block that can see
  /// them. Returns the tiles computed.
  func chunkTask(
    keyValueBatch g: Int, chunk: Int, buffers: BackwardBuffers, chunks: ChunkBuffers,
    rows: RowStatistics, scratch: BackwardScratch
  ) -> Int {
    let (tq, tk, d, dv) = problem.sizes
    let bh = problem.shape.batchCount
    var tiles = 0
    for block in stride(from: chunk, to: keyBlocks, by: self.chunks) {
      let j0 = block * keyBlock
      let cols = min(keyBlock, tk - j0)
      // The block's dK and dV rows are written (β = 0) by its first tile.
      var first = true
      for (b, qb, i0, rowCount) in visibleQueryBlocks(keyValueBatch: g, firstKey: j0, cols: cols) {
        tiles += 1
        let keyBeta: Float = first ? 0 : 1
        first = false
        let columns = tile(
          batch: b, keyValueBatch: g, firstQuery: i0, rowCount: rowCount, firstKey: j0,
          cols: cols, buffers: buffers, rows: rows, scratch: scratch, valueGradient: true,
          valueBeta: keyBeta,
          bins: sums.width == 0 ? nil : sums.bins(batch: b, unit: chunk),
          relativeGradient: relative != nil)
        guard d > 0 else { continue }
        // dK_blk += scale·dSᵀ·Q_blk.
        let q = buffers.q + (b * tq + i0) * d
        BLAS.sgemm(
          transposeA: true, m: cols, n: d, k: rowCount, alpha: problem.scale,
          a: scratch.gradient, lda: keyBlock, b: q, ldb: d, beta: keyBeta,
          c: buffers.dK + (g * tk + j0) * d, ldc: d)
        // dQ_c,blk += scale·dS·K_blk: chunk 0 into dQ, the others into their buffers; each
        // block written (β = 0) the first time.
        let target =
          chunk == 0
          ? buffers.dQ + (b * tq + i0) * d
          : chunks.buffers + ((chunk - 1) * bh * tq + b * tq + i0) * d
        let flag = chunks.written + (chunk * bh + b) * queryBlocks + qb
        let beta: Float = flag.pointee ? 1 : 0
        flag.pointee = true
        BLAS.sgemm(
          m: rowCount, n: d, k: cols, alpha: problem.scale, a: scratch.gradient,
          lda: keyBlock, b: buffers.k + (g * tk + j0) * d, ldb: d, beta: beta, c: target,
          ldc: d)
        if let relative {
          relative.addQueryGradient(
            scratch.g, rows: rowCount, columns: columns, stride: scratch.relativeStride,
            into: target)
          relative.addEmbeddingGradient(
            scratch.g, rows: rowCount, columns: columns, stride: scratch.relativeStride,
            queries: q, slot: b * sums.unitsPerBatch + chunk)
        }
      }
      if first {
        // No query sees these keys: their gradients are zero.
        (buffers.dK + (g * tk + j0) * d).update(repeating: 0, count: cols * d)
        (buffers.dV + (g * tk + j0) * dv).update(repeating: 0, count: cols * dv)
      }
    }
    return tiles
  }

  /// `dQ = dQ_0 + dQ_1 + … + dQ_{C−1}` over the rows of `unit` (query batch
  /// `unit / queryBlocks`, query block `unit % queryBlocks`), adding the chunks that wrote them
  /// in increasing order (`dQ_0` is `dQ` itself); zeros where no chunk wrote.
  func reduce(unit: Int, dQ: UnsafeMutablePointer<Float>, chunks buffers: ChunkBuffers) {
    let (tq, _, d, _) = problem.sizes
    let bh = problem.shape.batchCount
    let (b, qb) = unit.quotientAndRemainder(dividingBy: queryBlocks)
    let i0 = qb * queryBlock
    let count = min(queryBlock, tq - i0) * d
    let out = dQ + (b * tq + i0) * d
    var started = buffers.written[b * queryBlocks + qb]
    for chunk in 1..<max(chunks, 1) where buffers.written[(chunk * bh + b) * queryBlocks + qb] {
      let source = buffers.buffers + ((chunk - 1) * bh * tq + b * tq + i0) * d
      guard started else {
        out.update(from: source, count: count)
        started = true
        continue
      }
      var j = 0
      while j + 16 <= count {
        let raw = UnsafeMutableRawPointer(out + j)
        let sum =
          raw.loadUnaligned(as: SIMD16<Float>.self)
          + UnsafeRawPointer(source + j).loadUnaligned(as: SIMD16<Float>.self)
        raw.storeBytes(of: sum, as: SIMD16<Float>.self)
        j += 16
      }
      while j < count {
        out[j] += source[j]
        j += 1
      }
    }
    if !started { out.update(repeating: 0, count: count) }
  }

  /// Pass 1 of the bias-gradient scheme for key block `block` of key/value batch `g`: `dK` and
  /// `dV` of its keys, over every query head of the group and every query block that can see
  /// them. Returns the tiles computed.
  func keyTask(
    keyValueBatch g: Int, keyBlock block: Int, buffers: BackwardBuffers, rows: RowStatistics,
    scratch: BackwardScratch
  ) -> Int {
    let (tq, tk, d, _) = problem.sizes
    let j0 = block * keyBlock
    let cols = min(keyBlock, tk - j0)
    var tiles = 0
    for (b, _, i0, rowCount) in visibleQueryBlocks(keyValueBatch: g, firstKey: j0, cols: cols) {
      tiles += 1
      _ = tile(
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
    return tiles
  }

  /// The query blocks, over the query heads of key/value batch `g`, whose rows can see a key of
  /// `j0 ..< j0 + cols` — the keys a block's rows can see lie in [its first row's lower bound,
  /// its last row's upper bound) — each as its query batch, block index, first row and rows.
  func visibleQueryBlocks(keyValueBatch g: Int, firstKey j0: Int, cols: Int)
    -> [(batch: Int, block: Int, firstQuery: Int, rowCount: Int)]
  {
    let tq = problem.sizes.0
    var blocks: [(batch: Int, block: Int, firstQuery: Int, rowCount: Int)] = []
    for b in problem.queryBatches(ofKeyValueBatch: g) {
      for qb in 0..<queryBlocks {
        let i0 = qb * queryBlock
        let rowCount = min(queryBlock, tq - i0)
        let lower = mask.visibleKeys(query: i0).lowerBound
        let upper = mask.visibleKeys(query: i0 + rowCount - 1).upperBound
        if lower < j0 + cols, upper > j0 { blocks.append((b, qb, i0, rowCount)) }
      }
    }
    return blocks
  }

  /// Pass 2 of the bias-gradient scheme for the (batch, query block) pairs of one task: their
  /// `dQ` rows, and their `dS` added into the bias gradient. Returns the tiles computed.
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
        let columns = tile(
          batch: b, keyValueBatch: g, firstQuery: i0, rowCount: rowCount, firstKey: j0,
          cols: cols, buffers: buffers, rows: rows, scratch: scratch, valueGradient: false,
          bins: sums.width == 0 ? nil : sums.bins(batch: b, unit: unit.block),
          biasGradient: true, relativeGradient: relative != nil)
        let s = scratch.gradient
        // dQ_blk += scale·dS·K_blk.
        if d > 0 {
          BLAS.sgemm(
            m: rowCount, n: d, k: cols, alpha: problem.scale, a: s, lda: keyBlock,
            b: buffers.k + (g * tk + j0) * d, ldb: d, beta: 1,
            c: buffers.dQ + (b * tq + i0) * d, ldc: d)
        }
        if let relative {
          relative.addQueryGradient(
            scratch.g, rows: rowCount, columns: columns, stride: scratch.relativeStride,
            into: buffers.dQ + (b * tq + i0) * d)
          relative.addEmbeddingGradient(
            scratch.g, rows: rowCount, columns: columns, stride: scratch.relativeStride,
            queries: buffers.q + (b * tq + i0) * d, slot: b * sums.unitsPerBatch + unit.block)
        }
        j0 += cols
      }
    }
    return tiles
  }
}
