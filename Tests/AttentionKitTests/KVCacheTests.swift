import AttentionKit
import AttentionVerification
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

  /// Runs `x` token by token (`MultiHeadAttention.decode`); returns the outputs `[B, T, E]`.
  static func decode(
    _ layer: MultiHeadAttention, _ x: Tensor, threads: Int, offset: Int = 0,
    padding: Tensor? = nil, mask: AttentionMask = .none
  ) throws -> Tensor {
    let decoded = try layer.decode(
      x, keyPaddingMask: padding, attentionMask: mask, positionOffset: offset,
      kernel: .tiled(.default), threads: threads)
    #expect(decoded.stepSeconds.count == x.shape[1])
    return decoded.output
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

  @Test("a float mask's row t and keys 0…t reach step t; a boolean mask broadcast over heads too")
  func decodeWithMasks() throws {
    let layer = try Self.layer(heads: 4, kvHeads: 2)
    let t = 7
    let x = try Tensor.randomNormal(shape: [2, t, layer.embedDim], seed: 9, stream: 0)
    // A bias [T, T] with distinct rows, and a keep mask [B, 1, T, T] (broadcast over heads).
    let bias = try Tensor.randomNormal(shape: [t, t], seed: 9, stream: 1)
    var keep = try Tensor(shape: [2, 1, t, t])
    for k in keep.scalars.indices { keep.scalars[k] = k % 5 == 3 ? 0 : 1 }
    for mask in [AttentionMask(bias: bias), AttentionMask(keep: keep)] {
      var causal = mask
      causal.isCausal = true
      let full = try layer(x, attentionMask: causal).output
      let decoded = try Self.decode(layer, x, threads: 2, mask: mask)
      let reference = try MultiHeadReference(layer: layer, input: x, attentionMask: causal)
      let rows = reference.rows((0..<2).flatMap { b in (0..<t).map { (batch: b, token: $0) } })
      for (index, row) in rows.enumerated() {
        for c in 0..<layer.embedDim {
          let k = index * layer.embedDim + c
          #expect(
            abs(Double(decoded.scalars[k]) - Double(full.scalars[k])) <= 2 * row.bound[c],
            "\(mask.bias == nil ? "keep" : "bias") mask, element \(k)")
        }
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
