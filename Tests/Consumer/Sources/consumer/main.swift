// Computes attention through AttentionKit's one entry point, `Attention.scaledDotProduct`, with
// each kernel, and checks every output against softmax(Q·Kᵀ/√D)·V computed here in `Double`, with
// and without a causal mask, and a decode step over float16, bfloat16 and q8 KV caches. Prints "consumer: ok, max error X", or says what failed and exits 1.
import AttentionKit

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

// B = 1, H = 2, Tq = 3, Tk = 5, D = 4, Dv = 3: every dimension different, so a transposed or
// swapped axis cannot go unnoticed, and Tq ≠ Tk exercises the causal mask's top-left alignment.
let (batch, heads, queryCount, keyCount, headDim, valueDim) = (1, 2, 3, 5, 4, 3)

/// Known values in [-1, 1]: a different smooth sequence per tensor.
func values(_ count: Int, frequency: Double, phase: Double) -> [Float] {
  (0..<count).map { Float(sin(Double($0) * frequency + phase)) }
}

func fail(_ message: String) -> Never {
  let line = Array("consumer: FAILED: \(message)\n".utf8)
  _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
  exit(1)
}

let queries: Tensor
let keys: Tensor
let vals: Tensor
do {
  queries = try Tensor(
    shape: [batch, heads, queryCount, headDim],
    scalars: values(batch * heads * queryCount * headDim, frequency: 0.7, phase: 0.1))
  keys = try Tensor(
    shape: [batch, heads, keyCount, headDim],
    scalars: values(batch * heads * keyCount * headDim, frequency: 1.3, phase: 0.5))
  vals = try Tensor(
    shape: [batch, heads, keyCount, valueDim],
    scalars: values(batch * heads * keyCount * valueDim, frequency: 0.9, phase: 1.7))
} catch {
  fail("could not build the inputs: \(error)")
}

/// softmax(Q·Kᵀ/√D)·V in `Double`, query i seeing keys 0…i when `causal`.
func expected(causal: Bool) -> [Double] {
  let q = queries.scalars.map(Double.init)
  let k = keys.scalars.map(Double.init)
  let v = vals.scalars.map(Double.init)
  let scale = 1 / Double(headDim).squareRoot()
  var out = [Double](repeating: 0, count: batch * heads * queryCount * valueDim)
  for bh in 0..<(batch * heads) {
    for i in 0..<queryCount {
      let visible = causal ? min(i + 1, keyCount) : keyCount
      var scores = [Double](repeating: 0, count: visible)
      for j in 0..<visible {
        var dot = 0.0
        for d in 0..<headDim {
          dot += q[(bh * queryCount + i) * headDim + d] * k[(bh * keyCount + j) * headDim + d]
        }
        scores[j] = dot * scale
      }
      let top = scores.max()!
      let exps = scores.map { exp($0 - top) }
      let sum = exps.reduce(0, +)
      for e in 0..<valueDim {
        var acc = 0.0
        for j in 0..<visible { acc += exps[j] / sum * v[(bh * keyCount + j) * valueDim + e] }
        out[(bh * queryCount + i) * valueDim + e] = acc
      }
    }
  }
  return out
}

let kernels: [(name: String, kernel: Attention.Kernel)] = [
  ("materialized", .materialized),
  ("tiled(.default)", .tiled(.default)),
  // Blocks smaller than the problem, so the online softmax merges several tiles per row.
  ("tiled(2×2)", .tiled(TiledAttention.Configuration(queryBlock: 2, keyBlock: 2))),
  ("reference", .reference),
]

let tolerance = 1e-5
var maxError = 0.0
for (maskName, mask, causal) in [
  ("no mask", AttentionMask.none, false), ("causal", AttentionMask.causal, true),
] {
  let want = expected(causal: causal)
  for (name, kernel) in kernels {
    let result: AttentionResult
    do {
      result = try Attention.scaledDotProduct(
        queries: queries, keys: keys, values: vals, mask: mask, kernel: kernel)
    } catch {
      fail("\(name), \(maskName): threw \(error)")
    }
    let wantShape = [batch, heads, queryCount, valueDim]
    guard result.output.shape == wantShape else {
      fail("\(name), \(maskName): output shape \(result.output.shape), expected \(wantShape)")
    }
    var error = 0.0
    for (got, expected) in zip(result.output.scalars, want) {
      let difference = abs(Double(got) - expected)
      // A NaN compares false with everything: count it as an infinite error.
      error = max(error, difference.isNaN ? .infinity : difference)
    }
    if error > tolerance {
      fail("\(name), \(maskName): max error \(error) exceeds \(tolerance)")
    }
    maxError = max(maxError, error)
  }
}

// A decode step over a compact KV cache: one query per head, four heads on one K/V head, D 32
// (the small-row products that widen compact rows as they read them, built here without the
// repository's CPU flags), against the same attention in `Double` on the stored keys and values.
let (cacheHeads, cacheKeys, cacheDim) = (4, 40, 32)
for storage in [KVStorage.float16, .bfloat16, .q8] {
  do {
    let q = try Tensor(
      shape: [1, cacheHeads, 1, cacheDim],
      scalars: values(cacheHeads * cacheDim, frequency: 0.37, phase: 0.2))
    var cache = try KVCache(
      batch: 1, keyValueHeads: 1, headDim: cacheDim, capacity: cacheKeys, storage: storage)
    try cache.append(
      keys: Tensor(
        shape: [1, 1, cacheKeys, cacheDim],
        scalars: values(cacheKeys * cacheDim, frequency: 0.61, phase: 0.4)),
      values: Tensor(
        shape: [1, 1, cacheKeys, cacheDim],
        scalars: values(cacheKeys * cacheDim, frequency: 0.83, phase: 1.1)))
    let got = try Attention.scaledDotProduct(queries: q, cache: cache, kernel: .tiled(.default))
    let (k, v) = (try cache.storedKeys().scalars, try cache.storedValues().scalars)
    // The stored values as the storage defines them, computed here: float16 and bfloat16 round to
    // nearest even; q8 is within half its block's step s = f16(max|x| / 127), a multiple of it.
    let written = values(cacheKeys * cacheDim, frequency: 0.61, phase: 0.4)
    for block in stride(from: 0, to: written.count, by: 32) {
      let x = written[block..<(block + 32)]
      let step = Float(Float16(x.map(\.magnitude).max()! / 127))
      for i in x.indices {
        let bits = x[i].bitPattern
        let faithful: Bool
        switch storage {
        case .float16: faithful = k[i] == Float(Float16(x[i]))
        case .bfloat16:
          let rounded = (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) & 0xFFFF_0000
          faithful = k[i].bitPattern == rounded
        default:
          faithful = abs(x[i] - k[i]) <= step / 2 && (k[i] / step).rounded() == k[i] / step
        }
        if !faithful { fail("\(storage) KV cache: key \(i) \(x[i]) stored as \(k[i])") }
      }
    }
    var error = 0.0
    for h in 0..<cacheHeads {
      var scores = (0..<cacheKeys).map { j in
        (0..<cacheDim).reduce(0.0) { sum, d in
          sum + Double(q.scalars[h * cacheDim + d]) * Double(k[j * cacheDim + d])
        } / Double(cacheDim).squareRoot()
      }
      let top = scores.max()!
      scores = scores.map { exp($0 - top) }
      let total = scores.reduce(0, +)
      for e in 0..<cacheDim {
        var want = 0.0
        for j in 0..<cacheKeys { want += scores[j] / total * Double(v[j * cacheDim + e]) }
        let difference = abs(Double(got.output.scalars[h * cacheDim + e]) - want)
        error = max(error, difference.isNaN ? .infinity : difference)
      }
    }
    if error > tolerance { fail("\(storage) KV cache: max error \(error) exceeds \(tolerance)") }
    maxError = max(maxError, error)
  } catch {
    fail("\(storage) KV cache: threw \(error)")
  }
}

print("consumer: ok, max error \(maxError)")
