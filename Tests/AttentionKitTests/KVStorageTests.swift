import AttentionKit
import AttentionVerification
import Foundation
import Testing
import _TestSupport

/// `KVCache` in float16, bfloat16 and q8: what is stored reads back as the format says, and
/// attention over a compact cache (the tiled kernel converting tile by tile) equals the float64
/// reference on the stored values within the float32 bounds, identically on any thread count.
@Suite("KV cache storage types")
struct KVStorageTests {
  /// A `[1, 1, rows, width]` cache holding `scalars` as keys and their negations as values.
  static func cache(_ scalars: [Float], width: Int, storage: KVStorage) throws -> KVCache {
    let rows = scalars.count / width
    var cache = try KVCache(
      batch: 1, keyValueHeads: 1, headDim: width, capacity: rows, storage: storage)
    let keys = try Tensor(shape: [1, 1, rows, width], scalars: scalars)
    let values = try Tensor(shape: [1, 1, rows, width], scalars: scalars.map { -$0 })
    try cache.append(keys: keys, values: values)
    return cache
  }

  @Test("float16 reads back HalfPrecision's value for each of the 65,536 bit patterns")
  func float16EveryPattern() throws {
    let scalars = (0...UInt16.max).map { HalfPrecision.float(fromF16Bits: $0) }
    let cache = try Self.cache(scalars, width: 32, storage: .float16)
    let keys = try cache.storedKeys().scalars
    #expect(keys.count == scalars.count)
    var mismatches = 0
    for (bits, (stored, original)) in zip(0...UInt16.max, zip(keys, scalars)) {
      // Representable values come back exactly (NaNs: as f16Bits quiets them, then widened).
      let expected = HalfPrecision.float(fromF16Bits: HalfPrecision.f16Bits(from: original))
      if stored.bitPattern != expected.bitPattern { mismatches += 1 }
      if !original.isNaN, stored.bitPattern != original.bitPattern {
        Issue.record("pattern \(String(bits, radix: 16)): \(original) came back as \(stored)")
      }
    }
    #expect(mismatches == 0)
    #expect(
      try cache.storedValues().scalars.elementsEqual(keys.map { -$0 }) { a, b in
        a.bitPattern == b.bitPattern || (a.isNaN && b.isNaN)
      })
  }

  // Width 24: sixteen values widened at a time and eight one by one.
  @Test(
    "float16 and bfloat16 round to nearest even; representable values are exact",
    arguments: [48, 24])
  func halfRounding(width: Int) throws {
    let random = try Tensor.randomNormal(shape: [64, 48], seed: 5, stream: 1).scalars
      .enumerated().map { $0.element * Float(1 << ($0.offset % 9)) }
    for storage in [KVStorage.float16, .bfloat16] {
      let format: HalfPrecision.Format = storage == .float16 ? .float16 : .bfloat16
      let rounded = random.map { format.float(fromBits: format.bits(from: $0)) }
      let fromRandom = try Self.cache(random, width: width, storage: storage).storedKeys().scalars
      #expect(fromRandom == rounded, "\(storage): stored ≠ HalfPrecision's rounding")
      let again = try Self.cache(rounded, width: width, storage: storage).storedKeys().scalars
      #expect(again == rounded, "\(storage): representable values are not exact")
    }
  }

  @Test(
    "q8: each value within half its block's step; blocks of zeros stay zero",
    arguments: [64, 80, 40])
  func q8WithinHalfAStep(width: Int) throws {
    var x = try Tensor.randomNormal(shape: [40, width], seed: 9, stream: 2).scalars
    // Rows of very different magnitudes, and one block of zeros.
    for r in 0..<40 { for c in 0..<width { x[r * width + c] *= Float(1 << (r % 12)) / 64 } }
    for c in 0..<32 { x[3 * width + c] = 0 }
    let stored = try Self.cache(x, width: width, storage: .q8).storedKeys().scalars
    var worst = 0.0
    for r in 0..<40 {
      for start in stride(from: 0, to: width, by: 32) {
        let block = (r * width + start)..<(r * width + min(width, start + 32))
        let largest = x[block].map(\.magnitude).max()!
        let step = HalfPrecision.float(fromF16Bits: HalfPrecision.f16Bits(from: largest / 127))
        for i in block {
          let q = stored[i] / step
          if step == 0 {
            #expect(stored[i] == 0)
            continue
          }
          #expect(q == q.rounded() && abs(q) <= 127, "not a multiple of the step: \(q)")
          worst = max(worst, Double(abs(x[i] - stored[i])) / Double(step))
        }
      }
    }
    #expect(worst <= 0.5, "worst |x − s·q| / s = \(worst)")
    #expect(worst > 0.45, "the test's data should reach near half a step, got \(worst)")
  }

  @Test("a value the storage cannot hold is refused, the cache unchanged")
  func overflowRefused() throws {
    for (storage, value) in [(KVStorage.float16, Float(65520)), (.q8, Float(1e7))] {
      var cache = try KVCache(
        batch: 1, keyValueHeads: 1, headDim: 32, capacity: 2, storage: storage)
      var scalars = [Float](repeating: 1, count: 32)
      try cache.append(
        keys: Tensor(shape: [1, 1, 1, 32], scalars: scalars),
        values: Tensor(shape: [1, 1, 1, 32], scalars: scalars))
      scalars[5] = value
      #expect(throws: AttentionError.self) {
        try cache.append(
          keys: Tensor(shape: [1, 1, 1, 32], scalars: scalars),
          values: Tensor(shape: [1, 1, 1, 32], repeating: 0))
      }
      #expect(cache.count == 1)
    }
    // 65504 itself fits float16.
    _ = try Self.cache([Float](repeating: 65504, count: 32), width: 32, storage: .float16)
  }

  /// `[B, H, Tq, D]` queries against a cache of `keys` tokens (GQA `H / Hkv`), with random keys
  /// and values of spread-out magnitudes.
  static func problem(storage: KVStorage, queries: Int, keys: Int, headDim: Int) throws
    -> (q: Tensor, cache: KVCache)
  {
    let (b, h, hkv) = (2, 8, 2)
    let q = try Tensor.randomNormal(shape: [b, h, queries, headDim], seed: 21, stream: 0)
    var k = try Tensor.randomNormal(shape: [b, hkv, keys, headDim], seed: 21, stream: 1)
    let v = try Tensor.randomNormal(shape: [b, hkv, keys, headDim], seed: 21, stream: 2)
    for i in k.scalars.indices where i % 7 == 0 { k.scalars[i] *= 3 }
    var cache = try KVCache(
      batch: b, keyValueHeads: hkv, headDim: headDim, capacity: keys + 5, storage: storage)
    try cache.append(keys: k, values: v)
    return (q, cache)
  }

  @Test(
    "attention over each storage equals the float64 reference on the stored values, identically on 1–8 threads",
    // One query (4 heads to a group: the small-row products, widening in registers; D 80 also
    // takes their sixteen-column pass and a q8 block of 16), three (sgemm on converted tiles).
    arguments: KVStorage.allCases, [(1, 3000, 64), (1, 700, 80), (3, 700, 64)])
  func matchesStoredReference(
    storage: KVStorage, size: (queries: Int, keys: Int, headDim: Int)
  ) throws {
    let (q, cache) = try Self.problem(
      storage: storage, queries: size.queries, keys: size.keys, headDim: size.headDim)
    var mask = AttentionMask.causal
    mask.causalAlignment = .bottomRight
    var outputs: [Tensor] = []
    for threads in [1, 2, 3, 8] {
      outputs.append(
        try Attention.scaledDotProduct(
          queries: q, cache: cache, mask: mask, kernel: .tiled(.default), threads: threads
        ).output)
    }
    #expect(outputs.allSatisfy { $0 == outputs[0] }, "depends on the thread count")
    let reference = try ReferenceAttention(
      queries: q, keys: cache.storedKeys(), values: cache.storedValues(), mask: mask)
    let shape = reference.shape
    var worst = 0.0
    for b in 0..<shape.batchCount {
      for i in 0..<shape.queries {
        let row = (b * shape.queries + i) * shape.valueDim
        worst = max(
          worst,
          reference.row(batch: b, query: i)
            .outputErrorRatio(outputs[0].scalars[row..<(row + shape.valueDim)]))
      }
    }
    #expect(worst <= 1, "\(storage): worst error / bound = \(worst)")
    // The other kernels read a float32 copy of the stored rows: the same values.
    let materialized = try Attention.scaledDotProduct(
      queries: q, cache: cache, mask: mask, kernel: .materialized, threads: 2
    ).output
    let tolerance = outputs[0].scalars.map(\.magnitude).max()! * 1e-4
    #expect(zip(materialized.scalars, outputs[0].scalars).allSatisfy { abs($0 - $1) <= tolerance })
  }

  @Test(
    "a layer decoded through each storage equals the float64 layer on the stored keys and values, identically on 1–8 threads",
    arguments: KVStorage.allCases)
  func decodeMatchesStoredLayer(storage: KVStorage) throws {
    let layer = try KVCacheTests.layer(headDim: 40)
    let (batch, length) = (2, 40)
    let x = try Tensor.randomNormal(shape: [batch, length, layer.embedDim], seed: 4, stream: 0)
    var decodes: [DecodedSequence] = []
    for threads in [1, 2, 3, 8] {
      decodes.append(
        try layer.decode(x, kernel: .tiled(.default), threads: threads, storage: storage))
    }
    let output = decodes[0].output
    #expect(decodes.allSatisfy { $0.output == output }, "\(storage): depends on the threads")
    #expect(decodes[0].cache.count == length && decodes[0].cache.storage == storage)
    let reference = try MultiHeadReference(
      layer: layer, input: x, attentionMask: .causal,
      storedKeys: decodes[0].cache.storedKeys(), storedValues: decodes[0].cache.storedValues())
    let rows = (0..<batch).flatMap { b in (0..<length).map { (batch: b, token: $0) } }
    let worst = LayerChecks(reference: reference, rows: rows).outputRatio(output)
    #expect(worst <= 1, "\(storage): worst error / bound = \(worst)")
    // The storage's effect against the float32 full pass: none for float32 beyond rounding,
    // some for the others (q8 the most), never NaN.
    let full = try layer(x, attentionMask: .causal, kernel: .tiled(.default)).output
    let effect = KVCacheEffect(decoded: output, full: full)
    #expect(effect.rms.isFinite && effect.rms <= 0.05 * effect.outputRMS)
    if storage != .float32 { #expect(effect.max > 1e-5 * effect.outputRMS) }
  }
}
