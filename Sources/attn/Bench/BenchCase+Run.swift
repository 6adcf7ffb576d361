import AttentionKit
import AttentionVerification
import Foundation

/// `attn bench`: one case run — checked on sampled rows against the float64 reference kernel,
/// then timed, interleaved with OpenBLAS alone on the kernel's tile products (the ceiling) and,
/// for relpos, the score terms and a compact KV cache, with plain attention beside it.
extension BenchCase {
  /// What one timed run computes, and how its rows are checked.
  private struct Workload {
    var reference: ReferenceAttention
    var run: () throws -> AttentionResult
    /// For relpos, the score terms and a compact KV cache: plain attention on the same inputs
    /// (relpos: the same projections; a KV cache: the float32 keys and values), timed beside it.
    var plain: (() throws -> AttentionResult)?
  }

  private func workload(
    configuration: TiledAttention.Configuration, threads: Int, seed: UInt64
  ) throws -> Workload {
    let mask = self.mask
    let drop = dropout > 0 ? try Dropout(probability: dropout, seed: seed) : nil
    if let maxDistance {
      // The notebook's module: x [B, T, D] → Q, K, V projections → relative-position attention.
      let module = try RelativePositionAttention(
        modelDim: headDim, maxDistance: maxDistance, seed: seed)
      let x = try Tensor.randomNormal(
        shape: [batch, length, headDim], seed: seed, stream: RandomStream.input)
      let projected = try module.project(x)
      let reference = try ReferenceAttention(
        queries: projected.queries, keys: projected.keys, values: projected.values, mask: mask,
        scale: module.scale, terms: ScoreTerms(relativePosition: module.positionBias))
      return Workload(
        reference: reference,
        run: {
          try module(x, mask: mask, kernel: .tiled(configuration), threads: threads).attention
        },
        plain: {
          let (q, k, v) = try module.project(x)
          return try Attention.scaledDotProduct(
            queries: q, keys: k, values: v, mask: mask, scale: module.scale,
            kernel: .tiled(configuration), threads: threads)
        })
    }
    if let embedDim { return try layerWorkload(embedDim: embedDim, threads: threads, seed: seed) }
    let (q, k, v) = try randomInputs(seed: seed)
    if kvStorage != .float32 {
      // The same keys and values stored compactly, widened by the kernel as it reads; checked on
      // the stored values, timed beside the float32 tensors.
      var cache = try KVCache(
        batch: batch, keyValueHeads: keyValueHeads ?? heads, headDim: headDim,
        capacity: length, storage: kvStorage)
      try cache.append(keys: k, values: v)
      let stored = cache
      return Workload(
        reference: try ReferenceAttention(
          queries: q, keys: stored.storedKeys(), values: stored.storedValues(), mask: mask),
        run: {
          try Attention.scaledDotProduct(
            queries: q, cache: stored, mask: mask, kernel: .tiled(configuration),
            threads: threads)
        },
        plain: {
          try Attention.scaledDotProduct(
            queries: q, keys: k, values: v, mask: mask, kernel: .tiled(configuration),
            threads: threads)
        })
    }
    if let term {
      let terms = try term.terms(heads: heads, causal: causal, seed: seed)
      return Workload(
        reference: try ReferenceAttention(
          queries: q, keys: k, values: v, mask: mask, dropout: drop, terms: terms),
        run: {
          try Attention.scaledDotProduct(
            queries: q, keys: k, values: v, mask: mask, dropout: drop, terms: terms,
            kernel: .tiled(configuration), threads: threads)
        },
        plain: {
          try Attention.scaledDotProduct(
            queries: q, keys: k, values: v, mask: mask, dropout: drop,
            kernel: .tiled(configuration), threads: threads)
        })
    }
    return Workload(
      reference: try ReferenceAttention(queries: q, keys: k, values: v, mask: mask, dropout: drop),
      run: {
        try Attention.scaledDotProduct(
          queries: q, keys: k, values: v, mask: mask, dropout: drop,
          kernel: .tiled(configuration), threads: threads)
      },
      plain: nil)
  }

  /// A decoder layer's step: the cache is filled with `length` random keys and values, and each
  /// run truncates it back before appending the new tokens, so every run does the same work.
  /// The check compares the step's attention output with the reference kernel on the step's
  /// projected queries and the cache's keys (the projections are tested against numpy).
  private func layerWorkload(embedDim e: Int, threads: Int, seed: UInt64) throws -> Workload {
    let (kvHeads, d, t) = (keyValueHeads ?? heads, headDim, queryCount)
    func linear(_ inputs: Int, _ outputs: Int, _ stream: UInt32) throws -> Linear {
      try Linear(
        inputFeatures: inputs, outputFeatures: outputs, bias: false, seed: seed,
        stream: RandomStream.parameters + stream)
    }
    let layer = try MultiHeadAttention(
      queryProjection: linear(e, heads * d, 0), keyProjection: linear(e, kvHeads * d, 2),
      valueProjection: linear(e, kvHeads * d, 4), outputProjection: linear(heads * d, e, 6),
      heads: heads, keyValueHeads: kvHeads, rotary: RotaryEmbedding(theta: ropeTheta, dimension: d))
    let box = CacheBox(
      try KVCache(
        batch: batch, keyValueHeads: kvHeads, headDim: d, capacity: length + t,
        storage: kvStorage))
    try box.cache.append(
      keys: Tensor.randomNormal(
        shape: [batch, kvHeads, length, d], seed: seed, stream: RandomStream.keys),
      values: Tensor.randomNormal(
        shape: [batch, kvHeads, length, d], seed: seed, stream: RandomStream.values))
    let x = try Tensor.randomNormal(shape: [batch, t, e], seed: seed, stream: RandomStream.input)
    var filled = box.cache
    let projected = try layer.project(x, positionOffset: length)
    try filled.append(keys: projected.keys, values: projected.values)
    let reference = try ReferenceAttention(
      queries: projected.queries, keys: filled.keys, values: filled.values,
      mask: AttentionMask(isCausal: true, causalAlignment: .bottomRight), scale: layer.scale,
      keyCount: filled.count)
    return Workload(
      reference: reference,
      run: {
        try box.cache.truncate(to: length)
        return try layer.step(x, cache: &box.cache, kernel: .tiled(.default), threads: threads)
          .attention
      },
      plain: nil)
  }

  func run(
    configuration: TiledAttention.Configuration, threads: Int, repeats: Int, warmup: Int,
    seed: UInt64
  ) throws -> BenchResult {
    let memoryBefore = ProcessMemory.status()?.resident
    let peakReset = ProcessMemory.resetPeak()
    let work = try workload(configuration: configuration, threads: threads, seed: seed)

    // Check before timing: sampled rows against the float64 reference kernel.
    let first = try work.run()
    let rows = RowSample.rows(shape: work.reference.shape, seed: seed, limit: 16, count: 16)
    let checks = try ForwardChecks(reference: work.reference, dropout: nil, sampledRows: rows)
      .check(output: first.output, weights: nil)
    if let failed = checks.first(where: { !$0.passed }) {
      throw AttentionError.invalidArgument(
        "\(name): the tiled kernel disagrees with the reference kernel "
          + "(\(failed.measurement?.summary ?? failed.detail)); not reporting its time")
    }

    // OpenBLAS alone on the products the kernel actually computes: its tile, as the kernel
    // shapes it for this problem (window, decode).
    let tile = TiledAttention.tile(
      queries: queryCount, keys: length, headDim: headDim, batchCount: batch * heads,
      groupSize: heads / (keyValueHeads ?? heads), window: window, configuration: configuration)
    let ceiling = GemmCeiling(
      queryBlock: tile.rows, keyBlock: tile.keys, headDim: headDim, valueDim: headDim,
      threads: threads)
    let pairs = try self.pairs
    let tiles = max(threads, Int(4 * pairs * Double(headDim) / ceiling.flopsPerTile))
    for _ in 0..<warmup { _ = try work.run() }
    var times: [Double] = []
    var plainTimes: [Double] = []
    var ceilings: [Double] = []
    // Interleaved: kernel, plain attention (when the workload has it), sgemm ceiling, then again.
    for _ in 0..<(self.repeats ?? repeats) {
      times.append(try Stopwatch.measure(work.run).seconds)
      if let plain = work.plain { plainTimes.append(try Stopwatch.measure(plain).seconds) }
      ceilings.append(ceiling.measure(tiles: tiles))
    }
    let status = ProcessMemory.status()
    let median = Stopwatch.median(times)
    let gflops = 4 * pairs * Double(headDim) / median * 1e-9
    let sgemm = Stopwatch.median(ceilings)
    let plainMedian = plainTimes.isEmpty ? nil : Stopwatch.median(plainTimes)
    let bytes = memoryBound ? Double(bytesRead) / median * 1e-9 : nil
    return BenchResult(
      name: name, batch: batch, heads: heads, seqLen: length, dK: headDim, p: Double(dropout),
      causal: causal, maxRel: maxDistance, tq: queryCount, kvHeads: keyValueHeads ?? heads,
      window: window, causalAlign: alignment.rawValue, medianMs: median * 1e3,
      minMs: (times.min() ?? .nan) * 1e3, warmup: warmup,
      timeMs: Stopwatch.Statistics(times).scaled(by: 1e3), timesMs: times.map { $0 * 1e3 },
      tileRows: tile.rows, tileKeys: tile.keys,
      gflops: gflops, sgemmGflops: sgemm, ratioToSgemm: gflops / sgemm,
      plainMedianMs: plainMedian.map { $0 * 1e3 },
      overPlain: plainMedian.map { median / $0 },
      workspaceBytes: first.workspaceBytes,
      peakRssBytes: peakReset ? status?.peak : nil,
      rssBeforeBytes: memoryBefore,
      referenceErrorRatio: checks.compactMap(\.measurement?.worstRatio).max() ?? 0,
      kvDtype: kvStorage == .float32 ? nil : kvStorage.rawValue, gbPerSecond: bytes)
  }
}

/// The KV cache a timed closure steps through, shared by its runs.
private final class CacheBox {
  var cache: KVCache
  init(_ cache: KVCache) { self.cache = cache }
}
