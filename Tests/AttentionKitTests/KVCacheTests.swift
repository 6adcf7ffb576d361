import AttentionKit
import Foundation
import Testing
import _TestSupport

/// Decoding through `KVCache`: token by token, the layer must give the full causal pass's
/// outputs. Both are float32 computations of the same float64 value, each within
/// `MultiHeadReference`'s bound of it, so they differ by at most twice that bound — the
/// tolerance here, element by element, on every row.
@Suite("KV cache decoding")
struct KVCacheTests {
  /// A Llama-shaped layer (no biases, GQA 4:1, rotary) with random weights.
  static func layer(heads: Int = 8, kvHeads: Int = 2, headDim: Int = 8, embed: Int = 48) throws
    -> MultiHeadAttention
  {
    func linear(_ inputs: Int, _ outputs: Int, _ stream: UInt32) throws -> Linear {
      try Linear(
        inputFeatures: inputs, outputFeatures: outputs, bias: false, seed: 7, stream: stream)
    }
    return try MultiHeadAttention(
      queryProjection: linear(embed, heads * headDim, 0),
      keyProjection: linear(embed, kvHeads * headDim, 2),
      valueProjection: linear(embed, kvHeads * headDim, 4),
      outputProjection: linear(heads * headDim, embed, 6), heads: heads, keyValueHeads: kvHeads,
      rotary: RotaryEmbedding(theta: 10_000, dimension: headDim))
  }

  /// Runs `x` token by token; returns the outputs `[B, T, E]`.
  static func decode(
    _ layer: MultiHeadAttention, _ x: Tensor, threads: Int, offset: Int = 0,
    padding: Tensor? = nil
  ) throws -> Tensor {
    let (b, t, e) = (x.shape[0], x.shape[1], x.shape[2])
    var cache = try KVCache(
      batch: b, keyValueHeads: layer.keyValueHeads, headDim: layer.headDim, capacity: t,
      positionOffset: offset)
    var output = try Tensor(shape: [b, t, e])
    for token in 0..<t {
      let step = try layer.step(
        x.slice(axis: 1, token..<(token + 1)), cache: &cache,
        keyPaddingMask: padding?.slice(axis: 1, 0..<(token + 1)), kernel: .tiled(.default),
        threads: threads)
      for batch in 0..<b {
        for c in 0..<e {
          output.scalars[(batch * t + token) * e + c] = step.output.scalars[batch * e + c]
        }
      }
    }
    #expect(cache.count == t)
    return output
  }

  @Test("token by token equals the full causal pass", arguments: [1, 17, 300])
  func decodeEqualsFull(length: Int) throws {
    let layer = try Self.layer()
    let x = try Tensor.randomNormal(shape: [2, length, layer.embedDim], seed: 3, stream: 0)
    let offset = length == 17 ? 1000 : 0
    let full = try layer(
      x, attentionMask: .causal, positionOffset: offset, kernel: .tiled(.default)
    )
    .output
    let reference = try MultiHeadReference(
      layer: layer, input: x, attentionMask: .causal, positionOffset: offset)
    let rows = reference.rows(
      (0..<2).flatMap { b in (0..<length).map { (batch: b, token: $0) } })
    var outputs: [Tensor] = []
    for threads in [1, 2, 3] {
      let decoded = try Self.decode(layer, x, threads: threads, offset: offset)
      var worst = 0.0
      for (index, row) in rows.enumerated() {
        let base = index * layer.embedDim
        for c in 0..<layer.embedDim {
          let difference = abs(Double(decoded.scalars[base + c]) - Double(full.scalars[base + c]))
          worst = max(worst, difference / (2 * row.bound[c]))
        }
      }
      #expect(worst <= 1, "threads \(threads): worst difference / (2·bound) = \(worst)")
      outputs.append(decoded)
    }
    // The decode path's results do not depend on the thread count.
    #expect(outputs[0] == outputs[1])
    #expect(outputs[0] == outputs[2])
  }

  @Test("padding hides the same keys when decoding")
  func decodeWithPadding() throws {
    let layer = try Self.layer(heads: 4, kvHeads: 4)
    let x = try Tensor.randomNormal(shape: [2, 9, layer.embedDim], seed: 5, stream: 0)
    var padding = try Tensor(shape: [2, 9])
    for j in [0, 1, 4] { padding[1, j] = 1 }
    let full = try layer(x, keyPaddingMask: padding, attentionMask: .causal).output
    let decoded = try Self.decode(layer, x, threads: 2, padding: padding)
    let reference = try MultiHeadReference(
      layer: layer, input: x, keyPaddingMask: padding, attentionMask: .causal)
    let rows = reference.rows((0..<2).flatMap { b in (0..<9).map { (batch: b, token: $0) } })
    for (index, row) in rows.enumerated() {
      for c in 0..<layer.embedDim {
        let k = index * layer.embedDim + c
        #expect(abs(Double(decoded.scalars[k]) - Double(full.scalars[k])) <= 2 * row.bound[c])
      }
    }
  }

  @Test("a cache refuses what does not fit and is unchanged by a failed step")
  func capacityAndShapes() throws {
    let layer = try Self.layer()
    var cache = try KVCache(batch: 1, keyValueHeads: 2, headDim: 8, capacity: 2)
    let x = try Tensor.randomNormal(shape: [1, 3, layer.embedDim], seed: 1, stream: 0)
    #expect(throws: AttentionError.self) { try layer.step(x, cache: &cache) }
    #expect(cache.count == 0)
    _ = try layer.step(x.slice(axis: 1, 0..<2), cache: &cache)
    #expect(cache.count == 2)
    #expect(throws: AttentionError.self) {
      try layer.step(x.slice(axis: 1, 2..<3), cache: &cache)
    }
    #expect(cache.count == 2)
    try cache.truncate(to: 1)
    #expect(cache.count == 1)
    #expect(throws: AttentionError.self) { try cache.truncate(to: 2) }
    var wrongHeads = try KVCache(batch: 1, keyValueHeads: 4, headDim: 8, capacity: 4)
    #expect(throws: AttentionError.self) {
      try layer.step(x.slice(axis: 1, 0..<1), cache: &wrongHeads)
    }
  }
}
