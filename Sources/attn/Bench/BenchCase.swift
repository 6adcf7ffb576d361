import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// One shape to time.
struct BenchCase {
  var name: String
  var batch: Int
  var heads: Int
  var length: Int
  var headDim: Int
  var dropout: Float = 0
  var causal = false
  /// `Tq` when it differs from `Tk = length` (decoding: a few queries against a long cache).
  var queries: Int? = nil
  /// `Hkv` when K and V have fewer heads than Q (grouped-query attention).
  var keyValueHeads: Int? = nil
  /// A sliding window of `W` keys (causal).
  var window: Int? = nil
  var alignment: CausalAlignment = .topLeft
  /// `M`: run the relative-position module (projections, R = Q·Eᵀ, tiled attention) instead of
  /// bare attention, and time plain attention with the same projections beside it.
  var maxDistance: Int? = nil
  /// `E`: time a whole decoder layer's step (projections, rotary embeddings, attention against a
  /// KV cache of `length` tokens, output projection) for `queries` new tokens, not bare attention.
  var embedDim: Int? = nil
  /// The layer's rotary embeddings' theta (with `embedDim`).
  var ropeTheta: Double = 10_000
  /// A score term (`ScoreTerms`) on bare attention, timed beside the same attention without it.
  var term: Term? = nil
  var repeats: Int? = nil
  /// How a decode case's KV cache stores keys and values (`--kv-dtype`); a compact one is timed
  /// beside the float32 cache of the same keys and values (`over_plain`).
  var kvStorage: KVStorage = .float32

  /// The score terms `attn bench` times: BLOOM's ALiBi, a T5 table of 32 buckets (max distance
  /// 128, bidirectional unless causal), Gemma 2's soft-cap of 50, one sink per head.
  enum Term: String, CaseIterable {
    case alibi, t5, softcap, sinks

    func terms(heads: Int, causal: Bool, seed: UInt64) throws -> ScoreTerms {
      switch self {
      case .alibi:
        return ScoreTerms(positionBiases: [.alibi(slopes: PositionBias.bloomSlopes(heads: heads))])
      case .t5:
        let table = try Tensor.randomNormal(
          shape: [32, heads], seed: seed, stream: RandomStream.parameters)
        return ScoreTerms(positionBiases: [
          .t5(table: table, maxDistance: 128, bidirectional: !causal)
        ])
      case .softcap: return ScoreTerms(softcap: 50)
      case .sinks:
        return ScoreTerms(
          sinks: try Tensor.randomNormal(
            shape: [heads], seed: seed, stream: RandomStream.parameters
          )
          .scalars)
      }
    }
  }

  static let order =
    [
      "attention", "causal", "dropout", "relpos", "efficiency", "long", "decode", "gqa",
      "window16k", "causal16k", "decode-layer", "decode-llama8b",
    ] + Term.allCases.flatMap { [$0.rawValue, $0.rawValue + "-causal"] }
  static let standard: [String: BenchCase] = [
    "attention": BenchCase(name: "attention", batch: 1, heads: 8, length: 2048, headDim: 64),
    "causal": BenchCase(
      name: "causal", batch: 1, heads: 8, length: 2048, headDim: 64, causal: true),
    "dropout": BenchCase(
      name: "dropout", batch: 4, heads: 8, length: 1024, headDim: 64, dropout: 0.1),
    "relpos": BenchCase(
      name: "relpos", batch: 1, heads: 1, length: 2048, headDim: 64, maxDistance: 32),
    "efficiency": BenchCase(name: "efficiency", batch: 1, heads: 8, length: 4096, headDim: 64),
    "long": BenchCase(name: "long", batch: 1, heads: 1, length: 65536, headDim: 64, repeats: 1),
    // One new token of a Llama-sized layer against a 4,096-token KV cache.
    "decode": BenchCase(
      name: "decode", batch: 1, heads: 32, length: 4096, headDim: 128, causal: true,
      queries: 1, keyValueHeads: 8, alignment: .bottomRight),
    "gqa": BenchCase(
      name: "gqa", batch: 1, heads: 32, length: 2048, headDim: 128, keyValueHeads: 8),
    // A sliding window against full causal attention at the same length.
    "window16k": BenchCase(
      name: "window16k", batch: 1, heads: 4, length: 16384, headDim: 64, causal: true,
      window: 512, repeats: 3),
    "causal16k": BenchCase(
      name: "causal16k", batch: 1, heads: 4, length: 16384, headDim: 64, causal: true,
      repeats: 3),
    // A Llama-shaped layer (E 2048, H 32, Hkv 8, D 64) decoding one token against a cache of
    // 4,096: the new token attends to 4,097 keys.
    "decode-layer": BenchCase(
      name: "decode-layer", batch: 1, heads: 32, length: 4096, headDim: 64, causal: true,
      queries: 1, keyValueHeads: 8, alignment: .bottomRight, embedDim: 2048, repeats: 20),
    // A Llama-3-8B-shaped layer (E 4096, H 32, Hkv 8, D 128, RoPE theta 500,000) decoding one
    // token against a cache of 8,192: the new token attends to 8,193 keys (issue #25).
    "decode-llama8b": BenchCase(
      name: "decode-llama8b", batch: 1, heads: 32, length: 8192, headDim: 128, causal: true,
      queries: 1, keyValueHeads: 8, alignment: .bottomRight, embedDim: 4096,
      ropeTheta: 500_000, repeats: 20),
  ].merging(
    Term.allCases.flatMap { term in
      [false, true].map { causal in
        let name = term.rawValue + (causal ? "-causal" : "")
        return (
          name,
          BenchCase(
            name: name, batch: 1, heads: 8, length: 2048, headDim: 64, causal: causal, term: term)
        )
      }
    }, uniquingKeysWith: { first, _ in first })

  /// `Tq`.
  var queryCount: Int { queries ?? length }

  var mask: AttentionMask {
    AttentionMask(isCausal: causal, causalAlignment: alignment, window: window)
  }

  var shapeText: String {
    "B \(batch) H \(heads)" + (keyValueHeads.map { "/\($0)" } ?? "")
      + (queries.map { " Tq \($0) Tk \(length)" } ?? " T \(length)") + " D \(headDim)"
      + (causal ? " causal" : "") + (alignment == .bottomRight ? " bottom-right" : "")
      + (window.map { " W \($0)" } ?? "") + (dropout > 0 ? " p \(dropout)" : "")
      + (maxDistance.map { " relpos M \($0)" } ?? "")
      + (embedDim.map { " layer E \($0)" } ?? "")
      + (embedDim != nil && ropeTheta != 10_000 ? " rope theta \(Int(ropeTheta))" : "")
      + (term.map { " \($0.rawValue)" } ?? "")
  }

  /// Query–key pairs the mask lets through (all of them, the causal triangle, the window's band).
  var pairs: Double {
    guard causal || window != nil else {
      return Double(batch * heads) * Double(queryCount) * Double(length)
    }
    let offset = alignment == .bottomRight ? length - queryCount : 0
    var visible = 0.0
    for i in 0..<queryCount {
      let upper = min(length, max(0, i + offset + 1))
      let lower = window.map { min(upper, max(0, i + offset - $0 + 1)) } ?? 0
      visible += Double(upper - lower)
    }
    return Double(batch * heads) * visible
  }

  /// What one timed run computes, and how its rows are checked.
  private struct Workload {
    var reference: ReferenceAttention
    var run: () throws -> AttentionResult
    /// For relpos and the score terms: plain attention on the same inputs (relpos: the same
    /// projections), timed beside it.
    var plain: (() throws -> AttentionResult)?
  }

  private func workload(
    configuration: TiledAttention.Configuration, threads: Int, seed: UInt64
  ) throws -> Workload {
    let mask = self.mask
    let drop = dropout > 0 ? try Dropout(probability: dropout, seed: seed) : nil
    if let maxDistance {
      // The notebook's module: x [B, T, d] → Q, K, V projections → relative-position attention.
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
    let keyShape = [batch, keyValueHeads ?? heads, length, headDim]
    let q = try Tensor.randomNormal(
      shape: [batch, heads, queryCount, headDim], seed: seed, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: keyShape, seed: seed, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: keyShape, seed: seed, stream: RandomStream.values)
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
    seed: UInt64, limits: MachineLimits? = nil
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
    let tiles = max(threads, Int(4 * pairs * Double(headDim) / ceiling.flopsPerTile))
    for _ in 0..<warmup { _ = try work.run() }
    var times: [Double] = []
    var plainTimes: [Double] = []
    var ceilings: [Double] = []
    // Interleaved: kernel, plain attention (relpos only), sgemm ceiling, then again.
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
      kvDtype: kvStorage == .float32 ? nil : kvStorage.rawValue,
      peakFraction: limits.map { gflops / $0.peakGflops },
      gbPerSecond: bytes,
      bandwidthFraction: bytes.flatMap { b in limits.map { b / $0.bandwidthGBPerSecond } })
  }

  /// Whether the case is bound by memory rather than by arithmetic: a decode step (a few
  /// queries against a long cache) does two flops per byte of K and V it reads.
  var memoryBound: Bool { queryCount <= 16 && length >= 1024 }

  /// The bytes a run must read at least: K and V as stored (of every key/value head, the new
  /// tokens' included), the queries and, for a layer, its four projections' weights.
  var bytesRead: Int {
    let kvHeads = keyValueHeads ?? heads
    let float = MemoryLayout<Float>.stride
    let cacheRows = 2 * batch * kvHeads * (length + (embedDim == nil ? 0 : queryCount))
    let cache = cacheRows * kvStorage.rowBytes(width: headDim)
    let queries = batch * heads * queryCount * headDim
    let weights = embedDim.map { e in e * (heads + 2 * kvHeads) * headDim + heads * headDim * e }
    return cache + (queries + (weights ?? 0)) * float
  }
}

/// The KV cache a timed closure steps through, shared by its runs.
private final class CacheBox {
  var cache: KVCache
  init(_ cache: KVCache) { self.cache = cache }
}

/// One case's figures (`attn bench --format json`).
struct BenchResult: Encodable {
  var name: String
  var batch, heads, seqLen, dK: Int
  var p: Double
  var causal: Bool
  var maxRel: Int?
  var tq, kvHeads: Int
  var window: Int?
  var causalAlign: String
  var medianMs, minMs: Double
  /// Untimed runs before the timed ones (after the checking run).
  var warmup: Int
  /// Mean ± standard deviation, min, median and max of the timed runs, and every run's time.
  var timeMs: Stopwatch.Statistics
  var timesMs: [Double]
  /// The kernel's tile, on which the sgemm ceiling is measured.
  var tileRows, tileKeys: Int
  var gflops, sgemmGflops, ratioToSgemm: Double
  /// relpos and the score terms: plain attention of the same shape (relpos: with the same
  /// projections), and the case's time over it.
  var plainMedianMs: Double?
  var overPlain: Double?
  var workspaceBytes: Int
  /// The process's peak resident memory during this case (inputs included).
  var peakRssBytes: Int?
  var rssBeforeBytes: Int?
  var referenceErrorRatio: Double
  /// The KV cache's storage (`--kv-dtype`) when it is not float32.
  var kvDtype: String?
  /// `gflops` over the same run's FMA peak (`MachineLimits`).
  var peakFraction: Double?
  /// Memory-bound cases (decode): the bytes a run must read (`BenchCase.bytesRead`) per second,
  /// in billions, and over the same run's read bandwidth; `nil` for the others.
  var gbPerSecond: Double?
  var bandwidthFraction: Double?

  var line: String {
    let peak = peakRssBytes.map { formatBytes($0) } ?? "n/a"
    var label = name.padding(toLength: 10, withPad: " ", startingAt: 0)
    label += " B\(batch) H\(heads)" + (kvHeads != heads ? "/\(kvHeads)" : "")
    label += tq != seqLen ? " Tq\(tq) Tk\(seqLen)" : " T\(seqLen)"
    label += " D\(dK)"
    if causal { label += causalAlign == "bottom-right" ? " causal-br" : " causal" }
    if let window { label += " W\(window)" }
    if p > 0 { label += " p\(Float(p))" }
    if let maxRel { label += " M\(maxRel)" }
    if let kvDtype { label += " kv \(kvDtype)" }
    var text = label.padding(toLength: max(44, label.count + 1), withPad: " ", startingAt: 0)
    text += String(
      format: "median %8.2f ms  (mean %8.2f ± %6.2f, min %8.2f, max %8.2f)  %6.1f GFLOP/s  "
        + "sgemm %6.1f  ratio %4.2f",
      medianMs, timeMs.mean, timeMs.standardDeviation, minMs, timeMs.max, gflops, sgemmGflops,
      ratioToSgemm)
    if let plainMedianMs, let overPlain {
      text += String(format: "  plain %7.2f ms (÷ plain %.2f)", plainMedianMs, overPlain)
    }
    if let peakFraction { text += String(format: "  %.0f%% of FMA peak", 100 * peakFraction) }
    if let gbPerSecond, let bandwidthFraction {
      text += String(
        format: "  %.1f GB/s = %.0f%% of read bandwidth", gbPerSecond, 100 * bandwidthFraction)
    }
    return text + "  workspace \(formatBytes(workspaceBytes))  peak RSS \(peak)"
  }
}

struct BenchReport: Encodable {
  var openblasCore: String
  var threads: Int
  var queryBlock: Int
  var keyBlock: Int
  /// The FMA peak and the memory read bandwidth, measured in the same run.
  var limits: MachineLimits
  var cases: [BenchResult]
}
