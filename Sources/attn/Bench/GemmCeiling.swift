import AttentionKit
import AttentionVerification
import Dispatch

/// What OpenBLAS alone reaches on the tiled kernel's own tile products, with the kernel's threads:
/// the ceiling an attention kernel built on those products cannot pass.
///
/// Each thread repeats the two products of one tile, `S = Q_blk·K_blkᵀ` (`[Bq, D]·[D, Bk]`) and
/// `O += S·V_blk` (`[Bq, Bk]·[Bk, Dv]`), OpenBLAS single-threaded inside, as the kernel runs them:
/// the scores from the transposed query block `Q_blkᵀ` (`[D, Bq]`) and `K_blk` as stored, both
/// operands marked transposed, with `alpha = scale`, `beta = 0`; the output with `beta = 1`.
/// GFLOP/s counts `2·Bq·Bk·(D + Dv)` per tile.
struct GemmCeiling {
  let queryBlock: Int
  let keyBlock: Int
  let headDim: Int
  let valueDim: Int
  let threads: Int

  var flopsPerTile: Double { 2 * Double(queryBlock * keyBlock * (headDim + valueDim)) }

  /// GFLOP/s of `tiles` tile pairs spread over the threads.
  func measure(tiles: Int) -> Double {
    // One OpenBLAS thread per product, as the kernels run them, under the same lease.
    BLASThreads.withCount(1) { measureSingleThreadedProducts(tiles: tiles) }
  }

  private func measureSingleThreadedProducts(tiles: Int) -> Double {
    let (bq, bk, d, dv) = (queryBlock, keyBlock, headDim, valueDim)
    let perThread = max(1, tiles / threads)
    // Each thread's tiles, allocated and touched before the clock starts.
    let buffers = (0..<threads).map { _ in TileOperands(bq: bq, bk: bk, d: d, dv: dv) }
    let seconds = Stopwatch.time {
      DispatchQueue.concurrentPerform(iterations: threads) { thread in
        let t = buffers[thread]
        for _ in 0..<perThread {
          BLAS.sgemm(
            transposeA: true, transposeB: true, m: bq, n: bk, k: d, alpha: 0.125, a: t.qt,
            lda: bq, b: t.k, ldb: d, c: t.s, ldc: bk)
          BLAS.sgemm(
            m: bq, n: dv, k: bk, a: t.s, lda: bk, b: t.v, ldb: dv, beta: 1, c: t.o, ldc: dv)
        }
      }
    }
    for buffer in buffers { buffer.deallocate() }
    return flopsPerTile * Double(perThread * threads) / seconds * 1e-9
  }
}

/// One thread's operands of the two tile products.
private struct TileOperands: @unchecked Sendable {
  let qt, k, v, s, o: UnsafeMutablePointer<Float>

  init(bq: Int, bk: Int, d: Int, dv: Int) {
    func filled(_ count: Int, _ value: Float) -> UnsafeMutablePointer<Float> {
      let pointer = UnsafeMutablePointer<Float>.allocate(capacity: max(count, 1))
      pointer.initialize(repeating: value, count: max(count, 1))
      return pointer
    }
    qt = filled(d * bq, 0.01)
    k = filled(bk * d, 0.02)
    v = filled(bk * dv, 0.03)
    s = filled(bq * bk, 0)
    o = filled(bq * dv, 0)
  }

  func deallocate() {
    for pointer in [qt, k, v, s, o] { pointer.deallocate() }
  }
}
