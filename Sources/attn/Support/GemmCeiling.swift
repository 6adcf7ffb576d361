import AttentionKit
import Dispatch

/// What OpenBLAS alone reaches on the tiled kernel's own tile products, with the kernel's threads:
/// the ceiling an attention kernel built on those products cannot pass.
///
/// Each thread repeats the two products of one tile, `S = Q_blk·K_blkᵀ` (`[Bq, D]·[D, Bk]`) and
/// `O += S·V_blk` (`[Bq, Bk]·[Bk, Dv]`), OpenBLAS single-threaded inside, as the kernel runs them;
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
    let previous = BLAS.threadCount
    BLAS.threadCount = 1
    defer { BLAS.threadCount = previous }
    let (bq, bk, d, dv) = (queryBlock, keyBlock, headDim, valueDim)
    let perThread = max(1, tiles / threads)
    let seconds = Stopwatch.time {
      DispatchQueue.concurrentPerform(iterations: threads) { _ in
        let q = [Float](repeating: 0.01, count: bq * d)
        let k = [Float](repeating: 0.02, count: bk * d)
        let v = [Float](repeating: 0.03, count: bk * dv)
        var s = [Float](repeating: 0, count: bq * bk)
        var o = [Float](repeating: 0, count: bq * dv)
        q.withUnsafeBufferPointer { q in
          k.withUnsafeBufferPointer { k in
            v.withUnsafeBufferPointer { v in
              s.withUnsafeMutableBufferPointer { s in
                o.withUnsafeMutableBufferPointer { o in
                  for _ in 0..<perThread {
                    BLAS.sgemm(
                      transposeB: true, m: bq, n: bk, k: d, a: q.baseAddress!, lda: d,
                      b: k.baseAddress!, ldb: d, c: s.baseAddress!, ldc: bk)
                    BLAS.sgemm(
                      m: bq, n: dv, k: bk, a: s.baseAddress!, lda: bk, b: v.baseAddress!, ldb: dv,
                      beta: 1, c: o.baseAddress!, ldc: dv)
                  }
                }
              }
            }
          }
        }
      }
    }
    return flopsPerTile * Double(perThread * threads) / seconds * 1e-9
  }
}
