import Foundation
import Tensors

/// The backward pass of attention with each head's `[Tq, Tk]` probabilities held whole: the
/// formulas of `Attention.backward` as a sequence of sgemm calls and row passes.
///
/// One task per key/value batch `g` (`B·Hkv` tasks), taken by `threads` workers; for each of the
/// `G` query heads `b` that read `g`, in increasing order:
/// 1. `P = softmax(scale·Q_b·K_gᵀ + mask)` (one sgemm, then the score terms, the mask and
///    softmax row by row, as `MaterializedAttention` does), `Pd = dropout(P)` in a second buffer;
/// 2. `dV_g += Pdᵀ·dO_b` (one sgemm);
/// 3. `dP = (dO_b·V_gᵀ)∘Z/(1 − p)` (one sgemm, then the regenerated dropout decisions),
///    `Δ_i = Σ_j P_ij·dP_ij`, `dS = P∘(dP − Δ)` in place;
/// 4. `dQ_b = scale·dX·K_g`, `dK_g += scale·dXᵀ·Q_b` (two sgemms), `dX = dS` or, with a
///    soft-cap, `dS∘(1 − (t/c)²)` (written over `P`, no longer needed).
/// The score terms' gradients (`ScoreTermGradients`) come from per-row sums kept by the task
/// that owns the row: each row's `p_sink·Δ`, each head's `dS` by distance for T5; they are
/// summed in (batch, query) order afterwards.
/// Each task owns its `dK_g`, `dV_g` and the `dQ_b` of its heads, and runs its products with
/// OpenBLAS on one thread, so no result depends on the thread count. With `needBiasGradient`,
/// `dS` of every head is kept (`[B·H, Tq, Tk]`) and summed into the bias's shape afterwards, in
/// increasing order of (head, query, key).
///
/// Workspace: `2·Tq·Tk` floats per worker (`P`, and `Pd` then `dS`); with the bias gradient,
/// `Tq·Tk` per worker and `B·H·Tq·Tk` for the kept `dS`; with a soft-cap, `Tq·Tk` more per worker
/// (the factors); with sinks or T5, `B·H·(Tq + 2R + 1)` doubles.
enum MaterializedBackward {
  /// The bytes `compute` allocates (see the type's comment), `nil` on overflow.
  static func workspaceBytes(
    queries tq: Int, keys tk: Int, batchCount: Int, groupSize: Int, biasGradient: Bool,
    threads: Int, softcap: Bool = false, termRows: Int = 0, relativeFloats: Int = 0
  ) -> Int? {
    let tasks = batchCount / max(groupSize, 1)
    let workers = min(max(threads, 1), max(tasks, 1))
    let (tile, overflow) = tq.multipliedReportingOverflow(by: tk)
    guard !overflow else { return nil }
    let float = MemoryLayout<Float>.stride
    let factors = softcap ? workers * float : 0
    let terms = (batchCount * termRows, MemoryLayout<Double>.stride)
    let relative = (relativeFloats, float)
    return biasGradient
      ? byteCount([(tile, workers * float + factors), (tile, batchCount * float), terms, relative])
      : byteCount([(tile, 2 * workers * float + factors), terms, relative])
  }

  static func compute(
    _ problem: BackwardProblem, dropout: Dropout?, threads: Int, memoryBudget: Int?
  ) throws -> AttentionGradients {
    let shape = problem.shape
    let (tq, tk, _, _) = problem.sizes
    let tasks = problem.keyValueBatchCount
    let workers = max(1, min(threads, tasks))
    let keepScores = problem.biasGradient != nil
    let terms = problem.terms
    let width = terms.distanceBins
    let termRows = (terms.sinks == nil ? 0 : tq) + width
    let relativeWidth =
      problem.scoreTerms.relativePosition?.columns(queries: tq, keys: tk).count ?? 0
    let bytes = workspaceBytes(
      queries: tq, keys: tk, batchCount: shape.batchCount, groupSize: shape.groupSize,
      biasGradient: keepScores, threads: threads, softcap: terms.softcap != nil,
      termRows: termRows,
      relativeFloats: RelativePositionPass.slotFloats(problem, slots: shape.batchCount)
        + 2 * min(threads, max(tasks, 1)) * tq * relativeWidth)
    try checkBackwardBudget(
      bytes, memoryBudget,
      what: "the materialized backward's \(shapeForMessage([tq, tk])) probabilities",
      advice: .useTiledKernel)
    var (dQ, dK, dV, dBias) = try problem.zeroGradients()
    guard tasks > 0, tq > 0, tk > 0 else {
      return AttentionGradients(
        dQ: dQ, dK: dK, dV: dV, dBias: dBias,
        dSinks: terms.sinkGradients(sinkTerms: [], queries: tq),
        dT5Tables: terms.t5TableGradients { _ in [Double](repeating: 0, count: width) },
        dRelativeEmbeddings: try problem.scoreTerms.relativePosition.map {
          try Tensor(shape: $0.embeddings.shape)
        }, workspaceBytes: bytes ?? 0, kernel: .materialized)
    }
    // The relative-position term: dE per flat batch.
    let relative = RelativePositionPass(problem, slots: shape.batchCount)
    // [B·H, Tq, Tk]: every head's dS, for the bias gradient.
    var kept = [Float](repeating: 0, count: keepScores ? shape.batchCount * tq * tk : 0)
    // Each row's p_sink·Δ ([B·H·Tq]) and each flat batch's dS by distance ([B·H, 2R + 1]).
    let sums = TermSums(
      rows: terms.sinks == nil ? 0 : shape.batchCount * tq, batches: shape.batchCount,
      unitsPerBatch: 1, width: width)
    defer { sums.deallocate() }
    BackwardBuffers.with(problem, dQ: &dQ, dK: &dK, dV: &dV, extra: &kept) { buffers in
      let queue = TaskQueue()
      DispatchQueue.concurrentPerform(iterations: workers) { _ in
        let first = UnsafeMutablePointer<Float>.allocate(capacity: tq * tk)
        let second = UnsafeMutablePointer<Float>.allocate(capacity: keepScores ? 1 : tq * tk)
        let factors = UnsafeMutablePointer<Float>.allocate(
          capacity: terms.softcap == nil ? 1 : tq * tk)
        // The position table R and G, [Tq, W] each.
        let table = UnsafeMutablePointer<Float>.allocate(capacity: max(2 * tq * relativeWidth, 1))
        defer {
          first.deallocate()
          second.deallocate()
          factors.deallocate()
          table.deallocate()
        }
        while case let g = queue.take(), g < tasks {
          for b in problem.queryBatches(ofKeyValueBatch: g) {
            run(
              problem, dropout: dropout, batch: b, keyValueBatch: g, buffers: buffers,
              probabilities: first, scores: keepScores ? buffers.kept! + b * tq * tk : second,
              factors: factors, sums: sums,
              relative: relative.map { ($0, table, table + tq * relativeWidth) })
          }
        }
      }
    }
    if let bias = problem.biasGradient, dBias != nil {
      dBias!.scalars.withUnsafeMutableBufferPointer { out in
        for b in 0..<shape.batchCount {
          for i in 0..<tq {
            for j in 0..<tk {
              out[bias.index(batch: b, row: i, column: j)] += kept[(b * tq + i) * tk + j]
            }
          }
        }
      }
    }
    return AttentionGradients(
      dQ: dQ, dK: dK, dV: dV, dBias: dBias,
      dSinks: terms.sinkGradients(sinkTerms: sums.rowArray, queries: tq),
      dT5Tables: terms.t5TableGradients { h in sums.binsOfHead(h, terms: terms) },
      dRelativeEmbeddings: relative?.embeddingGradient(), workspaceBytes: bytes ?? .max,
      kernel: .materialized)
  }

  /// Steps 1–4 for query head `b` of key/value batch `g`; `probabilities` and `scores` are
  /// `[Tq, Tk]` (`scores` holds `Pd`, then `dP`, then `dS`).
  private static func run(
    _ problem: BackwardProblem, dropout: Dropout?, batch b: Int, keyValueBatch g: Int,
    buffers: BackwardBuffers, probabilities p: UnsafeMutablePointer<Float>,
    scores s: UnsafeMutablePointer<Float>, factors f: UnsafeMutablePointer<Float>, sums: TermSums,
    relative: (
      pass: RelativePositionPass, table: UnsafeMutablePointer<Float>,
      g: UnsafeMutablePointer<Float>
    )?
  ) {
    let (tq, tk, d, dv) = problem.sizes
    let terms = problem.terms
    let scale = problem.scale
    let q = buffers.q + b * tq * d
    let dO = buffers.dO + b * tq * dv
    let k = buffers.k + g * tk * d
    let v = buffers.v + g * tk * dv
    // 1. P = softmax(scale·Q·Kᵀ + mask); Pd = dropout(P).
    if d > 0 {
      BLAS.sgemm(
        transposeB: true, m: tq, n: tk, k: d, alpha: scale, a: q, lda: d, b: k, ldb: d, c: p,
        ldc: tk)
    } else {
      p.update(repeating: 0, count: tq * tk)
    }
    var sinkWeights = [Float](repeating: 0, count: terms.sinks == nil ? 0 : tq)
    let columns = relative?.pass.columns ?? 0...0
    let width = columns.count
    if let relative {
      relative.pass.table(
        queries: q, rows: tq, columns: columns, into: relative.table, stride: width)
    }
    for i in 0..<tq {
      let row = p + i * tk
      terms.capScores(row, count: tk)
      terms.capFactors(row, into: f + i * tk, count: tk)
      if let relative {
        relative.pass.bias.add(
          table: relative.table + i * width - columns.lowerBound, to: row, query: i, firstKey: 0,
          count: tk)
      }
      terms.addPositionBias(to: row, batch: b, query: i, firstKey: 0, count: tk)
      problem.resolved.apply(to: row, batch: b, query: i, firstKey: 0, count: tk)
      let sinkWeight = RowSoftmax.normalize(row, count: tk, sink: terms.sink(batch: b))
      if !sinkWeights.isEmpty { sinkWeights[i] = sinkWeight }
    }
    var pd = UnsafePointer(p)
    if let dropout {
      s.update(from: p, count: tq * tk)
      for i in 0..<tq { dropout.apply(to: s + i * tk, row: b * tq + i, firstKey: 0, count: tk) }
      pd = UnsafePointer(s)
    }
    // 2. dV += Pdᵀ·dO.
    if dv > 0 {
      BLAS.sgemm(
        transposeA: true, m: tk, n: dv, k: tq, a: pd, lda: tk, b: dO, ldb: dv, beta: 1,
        c: buffers.dV + g * tk * dv, ldc: dv)
      // 3. dP = (dO·Vᵀ)∘Z/(1 − p).
      BLAS.sgemm(
        transposeB: true, m: tq, n: tk, k: dv, a: dO, lda: dv, b: v, ldb: dv, c: s, ldc: tk)
    } else {
      s.update(repeating: 0, count: tq * tk)
    }
    for i in 0..<tq {
      let row = s + i * tk
      dropout?.apply(to: row, row: b * tq + i, firstKey: 0, count: tk)
      let delta = BackwardRows.dot(p + i * tk, row, count: tk)
      BackwardRows.softmaxGradient(
        probabilities: p + i * tk, gradient: row, count: tk, delta: delta)
      if !sinkWeights.isEmpty { sums.rows[b * tq + i] = Double(sinkWeights[i]) * Double(delta) }
      if terms.distanceBins > 0 {
        terms.binByDistance(
          row, into: sums.bins(batch: b, unit: 0), query: i, firstKey: 0, count: tk)
      }
      if let relative {
        let gRow = relative.g + i * width
        gRow.update(repeating: 0, count: width)
        relative.pass.bias.accumulate(
          row: row, into: gRow - columns.lowerBound, query: i, firstKey: 0, count: tk)
      }
      // dX = dS∘(1 − (t/c)²) over P's row, which is no longer needed.
      if terms.softcap != nil {
        BackwardRows.multiply(row, by: f + i * tk, into: p + i * tk, count: tk)
      }
    }
    // 4. dQ = scale·dX·K; dK += scale·dXᵀ·Q.
    let dx = terms.softcap == nil ? s : p
    if d > 0 {
      BLAS.sgemm(
        m: tq, n: d, k: tk, alpha: scale, a: dx, lda: tk, b: k, ldb: d,
        c: buffers.dQ + b * tq * d, ldc: d)
      BLAS.sgemm(
        transposeA: true, m: tk, n: d, k: tq, alpha: scale, a: dx, lda: tk, b: q, ldb: d,
        beta: 1, c: buffers.dK + g * tk * d, ldc: d)
    }
    // The position term: dQ += scale·G·E, dE_b = scale·Gᵀ·Q.
    if let relative {
      relative.pass.addQueryGradient(
        relative.g, rows: tq, columns: columns, stride: width, into: buffers.dQ + b * tq * d)
      relative.pass.addEmbeddingGradient(
        relative.g, rows: tq, columns: columns, stride: width, queries: q, slot: b)
    }
  }
}

/// Raw pointers to a backward call's tensors: inputs shared read-only, gradients written by the
/// tasks that own their rows.
struct BackwardBuffers: @unchecked Sendable {
  let q, k, v, dO: UnsafePointer<Float>
  let dQ, dK, dV: UnsafeMutablePointer<Float>
  /// The materialized kernel's kept `dS`, `[B·H, Tq, Tk]`; the tiled kernel's bias gradient;
  /// `nil` when empty.
  let kept: UnsafeMutablePointer<Float>?

  /// Runs `body` with the pointers of `problem`'s inputs, of the gradients and of `extra`.
  static func with<Result>(
    _ problem: BackwardProblem, dQ: inout Tensor, dK: inout Tensor, dV: inout Tensor,
    extra: inout [Float], _ body: (BackwardBuffers) -> Result
  ) -> Result {
    problem.queries.scalars.withUnsafeBufferPointer { q in
      problem.keys.scalars.withUnsafeBufferPointer { k in
        problem.values.scalars.withUnsafeBufferPointer { v in
          problem.gradOutput.scalars.withUnsafeBufferPointer { dO in
            dQ.scalars.withUnsafeMutableBufferPointer { dq in
              dK.scalars.withUnsafeMutableBufferPointer { dk in
                dV.scalars.withUnsafeMutableBufferPointer { dv in
                  extra.withUnsafeMutableBufferPointer { e in
                    body(
                      BackwardBuffers(
                        q: q.baseAddress!, k: k.baseAddress!, v: v.baseAddress!,
                        dO: dO.baseAddress!, dQ: dq.baseAddress!, dK: dk.baseAddress!,
                        dV: dv.baseAddress!, kept: e.count == 0 ? nil : e.baseAddress))
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

/// The row passes of the backward kernels.
enum BackwardRows {
  /// `Σ_j a_j·b_j`, sixteen lanes at a time then the tail.
  @inline(__always)
  static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) -> Float {
    var sums = SIMD16<Float>()
    var j = 0
    while j + 16 <= count {
      let x = UnsafeRawPointer(a + j).loadUnaligned(as: SIMD16<Float>.self)
      let y = UnsafeRawPointer(b + j).loadUnaligned(as: SIMD16<Float>.self)
      sums += x * y
      j += 16
    }
    var result = sums.sum()
    while j < count {
      result += a[j] * b[j]
      j += 1
    }
    return result
  }

  /// `row_j = exp(row_j − shift)` (`fastExp`, saturating: `shift` may come from the caller, not
  /// the row's own max), the values `RowSoftmax.exponentiate` writes, without their sum.
  @inline(__always)
  static func exponentiate(_ row: UnsafeMutablePointer<Float>, count: Int, shift: Float) {
    var unused = SIMD16<Float>()
    RowSoftmax.accumulateExp(row, count: count, shift: shift, into: &unused, saturating: true)
  }

  /// `destination_j = a_j·b_j`; `destination` may be `a`.
  @inline(__always)
  static func multiply(
    _ a: UnsafePointer<Float>, by b: UnsafePointer<Float>,
    into destination: UnsafeMutablePointer<Float>, count: Int
  ) {
    var j = 0
    while j + 16 <= count {
      let x = UnsafeRawPointer(a + j).loadUnaligned(as: SIMD16<Float>.self)
      let y = UnsafeRawPointer(b + j).loadUnaligned(as: SIMD16<Float>.self)
      UnsafeMutableRawPointer(destination + j).storeBytes(of: x * y, as: SIMD16<Float>.self)
      j += 16
    }
    while j < count {
      destination[j] = a[j] * b[j]
      j += 1
    }
  }

  /// `dS_j = P_j·(dP_j − Δ)` in place of `gradient` (`dP`).
  @inline(__always)
  static func softmaxGradient(
    probabilities p: UnsafePointer<Float>, gradient g: UnsafeMutablePointer<Float>, count: Int,
    delta: Float
  ) {
    var j = 0
    while j + 16 <= count {
      let x = UnsafeRawPointer(p + j).loadUnaligned(as: SIMD16<Float>.self)
      let raw = UnsafeMutableRawPointer(g + j)
      let y = raw.loadUnaligned(as: SIMD16<Float>.self)
      raw.storeBytes(of: x * (y - delta), as: SIMD16<Float>.self)
      j += 16
    }
    while j < count {
      g[j] = p[j] * (g[j] - delta)
      j += 1
    }
  }
}

/// The per-row sums the backward kernels keep for the score terms' gradients, zeroed: `rows`,
/// each row's `p_sink·Δ` (`[B·H·Tq]`); `bins`, `dS` by distance per slot (`[B·H, U, 2R + 1]`),
/// a slot being a (flat batch, unit of work) pair, `U` units per flat batch. Each row and slot
/// is written by one task, so the sums do not depend on the thread count.
struct TermSums: @unchecked Sendable {
  let rows: UnsafeMutablePointer<Double>
  let rowCount: Int
  let bins: UnsafeMutablePointer<Double>
  let unitsPerBatch: Int
  let width: Int
  let slots: Int

  init(rows: Int, batches: Int, unitsPerBatch: Int, width: Int) {
    rowCount = rows
    self.unitsPerBatch = unitsPerBatch
    self.width = width
    slots = width == 0 ? 0 : batches * unitsPerBatch
    self.rows = .allocate(capacity: max(rows, 1))
    self.rows.initialize(repeating: 0, count: max(rows, 1))
    bins = .allocate(capacity: max(slots * width, 1))
    bins.initialize(repeating: 0, count: max(slots * width, 1))
  }

  func deallocate() {
    rows.deallocate()
    bins.deallocate()
  }

  /// The bins of unit `unit` of flat batch `b`.
  func bins(batch b: Int, unit: Int) -> UnsafeMutablePointer<Double> {
    bins + (b * unitsPerBatch + unit) * width
  }

  var rowArray: [Double] { Array(UnsafeBufferPointer(start: rows, count: rowCount)) }

  /// Head `h`'s bins summed over its slots in increasing order.
  func binsOfHead(_ h: Int, terms: ResolvedScoreTerms) -> [Double] {
    var sums = [Double](repeating: 0, count: width)
    for slot in 0..<slots where terms.head(slot / unitsPerBatch) == h {
      for k in 0..<width { sums[k] += bins[slot * width + k] }
    }
    return sums
  }
}
