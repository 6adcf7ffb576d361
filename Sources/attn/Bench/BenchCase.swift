import AttentionKit

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
  /// Each query's keys are the kernels' own (`ResolvedMask.visibleKeys`); it throws only for a
  /// window under one key.
  var pairs: Double {
    get throws {
      let resolved = try ResolvedMask(mask, batchShape: [], queries: queryCount, keys: length)
      var visible = 0.0
      for i in 0..<queryCount { visible += Double(resolved.visibleKeys(query: i).count) }
      return Double(batch * heads) * visible
    }
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

  /// The case's random queries `[B, H, Tq, D]`, keys and values `[B, Hkv, Tk, D]`, N(0, 1), each
  /// from its own stream of `seed`.
  func randomInputs(seed: UInt64) throws -> (q: Tensor, k: Tensor, v: Tensor) {
    let keyShape = [batch, keyValueHeads ?? heads, length, headDim]
    return (
      try Tensor.randomNormal(
        shape: [batch, heads, queryCount, headDim], seed: seed, stream: RandomStream.queries),
      try Tensor.randomNormal(shape: keyShape, seed: seed, stream: RandomStream.keys),
      try Tensor.randomNormal(shape: keyShape, seed: seed, stream: RandomStream.values)
    )
  }
}
