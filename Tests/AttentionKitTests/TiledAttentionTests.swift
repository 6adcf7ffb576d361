import Testing
import _TestSupport

@testable import AttentionKit

/// The tiled kernel against the float64 reference kernel (whose row bounds state how far a correct
/// float32 kernel may be) and against the materialized kernel, over every code path: block sizes
/// that do and do not divide Tq and Tk, masks of each kind, causal in each alignment, fully masked
/// rows, dropout, relative positions, and 1 or several threads.
@Suite("Tiled attention")
struct TiledAttentionTests {
  struct Case: CustomTestStringConvertible, Sendable {
    var name: String
    var batch: [Int] = [2]
    var tq: Int
    var tk: Int
    var d: Int = 8
    var dv: Int = 8
    var mask: MaskKind = .none
    var dropout: Float? = nil
    var maxDistance: Int? = nil
    /// Scores that climb along the keys, by `risingSlope·√D` a key: with slope 2 (about 5.7 a
    /// key, over 100 in all) a later key block's max rises above the running shift by less
    /// than `RowSoftmax.shiftHeadroom` for one-key blocks (the shift is kept) and by more for
    /// longer ones (it is raised), and a shift kept too long would overflow `exp`; with a gentle
    /// slope over several groups of `RowSoftmax.shiftGroup` keys in one tile, the shift is raised
    /// inside a tile, and what the row already holds is rescaled.
    var risingSlope: Float? = nil
    var testDescription: String { name }
  }

  enum MaskKind: Sendable { case none, causal, keepWithFullRow, bias }

  static let blockSizes: [(Int, Int)] = [(1, 1), (3, 5), (4, 16), (16, 4), (7, 13), (128, 512)]

  static let cases: [Case] = [
    Case(name: "square, no mask", tq: 33, tk: 33),
    Case(name: "Tq < Tk", tq: 9, tk: 40, dv: 5),
    Case(name: "Tq > Tk", tq: 40, tk: 9, d: 4),
    Case(name: "causal square", tq: 37, tk: 37, mask: .causal),
    Case(name: "causal Tq < Tk", tq: 10, tk: 29, mask: .causal),
    Case(name: "causal Tq > Tk", tq: 29, tk: 10, mask: .causal),
    Case(
      name: "keep mask with a fully masked row", batch: [2, 2], tq: 21, tk: 18,
      mask: .keepWithFullRow),
    Case(name: "additive bias", tq: 19, tk: 23, mask: .bias),
    Case(name: "dropout", tq: 25, tk: 31, dropout: 0.3),
    Case(name: "causal and dropout", tq: 25, tk: 25, mask: .causal, dropout: 0.5),
    Case(name: "relative positions", batch: [2], tq: 30, tk: 30, d: 16, dv: 16, maxDistance: 4),
    Case(
      name: "relative positions, causal, dropout", batch: [1], tq: 20, tk: 20, mask: .causal,
      dropout: 0.2, maxDistance: 3),
    // M far beyond the sequence: only the columns of R that |j − i| < T reads are computed.
    Case(name: "relative positions, M ≫ T, Tq ≠ Tk", batch: [2], tq: 7, tk: 11, maxDistance: 40),
    Case(name: "scores rising along the keys", tq: 24, tk: 40, risingSlope: 2),
    Case(
      name: "scores rising gently over several key groups", batch: [1], tq: 8, tk: 300,
      risingSlope: 0.05),
    Case(
      name: "rising scores, additive bias", tq: 19, tk: 23, mask: .bias, risingSlope: 2),
    Case(
      name: "rising scores, relative positions, causal, dropout", batch: [1], tq: 20, tk: 20,
      mask: .causal, dropout: 0.2, maxDistance: 3, risingSlope: 2),
  ]

  struct Problem {
    var q, k, v: Tensor
    var mask: AttentionMask
    var dropout: Dropout?
    var relative: RelativePositionBias?
  }

  static func problem(_ c: Case, seed: UInt64 = 7) throws -> Problem {
    var q = try Tensor.randomNormal(shape: c.batch + [c.tq, c.d], seed: seed, stream: 1)
    var k = try Tensor.randomNormal(shape: c.batch + [c.tk, c.d], seed: seed, stream: 2)
    if let slope = c.risingSlope {
      // q ≈ u + noise and k_j ≈ slope·j·u + noise with u = (1, …, 1): q·k_j·scale ≈ slope·j·√D.
      q.scalars = q.scalars.map { $0 + 1 }
      for (index, value) in k.scalars.enumerated() {
        let key = index / c.d % c.tk
        k.scalars[index] = value + slope * Float(key)
      }
    }
    let v = try Tensor.randomNormal(shape: c.batch + [c.tk, c.dv], seed: seed, stream: 3)
    var mask = AttentionMask.none
    switch c.mask {
    case .none: break
    case .causal: mask = .causal
    case .keepWithFullRow:
      var keep = try Tensor.randomUniform(shape: [c.tq, c.tk], seed: seed, stream: 5)
      keep.scalars = keep.scalars.map { $0 < 0.3 ? 0 : 1 }
      for j in 0..<c.tk { keep[4, j] = 0 }  // query 4 sees nothing
      mask = .keep(keep)
    case .bias:
      var bias = try Tensor.randomNormal(shape: [c.tq, c.tk], seed: seed, stream: 6)
      bias[2, 3] = -.infinity
      mask = .bias(bias)
    }
    let dropout = try c.dropout.map { try Dropout(probability: $0, seed: seed) }
    let relative = try c.maxDistance.map {
      try RelativePositionBias(
        embeddings: Tensor.randomNormal(shape: [2 * $0 + 1, c.d], seed: seed, stream: 8),
        maxDistance: $0)
    }
    return Problem(q: q, k: k, v: v, mask: mask, dropout: dropout, relative: relative)
  }

  @Test(
    "tiled rows stay within the reference kernel's float32 error bounds",
    arguments: cases, blockSizes)
  func matchesReference(c: Case, blocks: (Int, Int)) throws {
    let p = try Self.problem(c)
    let tiled = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, mask: p.mask, dropout: p.dropout,
      terms: ScoreTerms(relativePosition: p.relative),
      kernel: .tiled(.init(queryBlock: blocks.0, keyBlock: blocks.1)),
      threads: 2)
    #expect(tiled.weights == nil)
    let reference = try ReferenceAttention(
      queries: p.q, keys: p.k, values: p.v, mask: p.mask, dropout: p.dropout,
      terms: ScoreTerms(relativePosition: p.relative))
    let shape = reference.shape
    var worst = 0.0
    for b in 0..<shape.batchCount {
      for i in 0..<shape.queries {
        let row = (b * shape.queries + i) * shape.valueDim
        let ratio = reference.row(batch: b, query: i)
          .outputErrorRatio(tiled.output.scalars[row..<(row + shape.valueDim)])
        worst = max(worst, ratio)
      }
    }
    #expect(worst <= 1, "worst error / bound = \(worst) for \(c.name), blocks \(blocks)")
  }

  @Test("tiled equals materialized within float32 rounding", arguments: cases)
  func matchesMaterialized(c: Case) throws {
    let p = try Self.problem(c)
    let materialized = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, mask: p.mask, dropout: p.dropout,
      terms: ScoreTerms(relativePosition: p.relative), kernel: .materialized)
    let tiled = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, mask: p.mask, dropout: p.dropout,
      terms: ScoreTerms(relativePosition: p.relative),
      kernel: .tiled(.init(queryBlock: 5, keyBlock: 8)))
    // Both are within the reference's bounds (tested above and in the materialized suite); here
    // the direct difference: |o_t − o_m| ≤ 1e-5·(1 + |o_m|) is ~80 float32 ulps, the rescaling
    // and summation-order differences of an online softmax over ≤ 10 key blocks at |scores| ≲ 10.
    for (a, b) in zip(tiled.output.scalars, materialized.output.scalars) {
      #expect(abs(a - b) <= 1e-5 * (1 + abs(b)), "tiled \(a) vs materialized \(b) in \(c.name)")
    }
  }

  @Test("fully masked rows are exactly zero, never NaN")
  func fullyMaskedRows() throws {
    let c = Self.cases[6]
    let p = try Self.problem(c)
    let tiled = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, mask: p.mask,
      kernel: .tiled(.init(queryBlock: 4, keyBlock: 5)))
    for b in 0..<4 {
      let row = (b * c.tq + 4) * c.dv
      #expect(tiled.output.scalars[row..<(row + c.dv)].allSatisfy { $0 == 0 })
    }
    let hasNaN = tiled.output.scalars.contains { $0.isNaN }
    #expect(!hasNaN)
  }

  /// A NaN score poisons its row (NaN output, as PyTorch's softmax gives), found by the first
  /// tile's max pass or by a later tile's one-pass exp, and leaves every other row as it was.
  @Test("a NaN score makes its row NaN in any tile, and only its row")
  func nanScorePoisonsItsRow() throws {
    let c = Case(name: "NaN", batch: [1], tq: 6, tk: 24)
    let p = try Self.problem(c)
    var bias = try Tensor(shape: [c.tq, c.tk])
    bias[1, 2] = .nan  // in the first key block (8 keys)
    bias[3, 13] = .nan  // in the second: the one-pass path
    bias[4, 23] = .nan  // in the last
    let tiled = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, mask: .bias(bias),
      kernel: .tiled(.init(queryBlock: 2, keyBlock: 8)))
    let clean = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, kernel: .tiled(.init(queryBlock: 2, keyBlock: 8)))
    for i in 0..<c.tq {
      let row = tiled.output.scalars[(i * c.dv)..<((i + 1) * c.dv)]
      if [1, 3, 4].contains(i) {
        #expect(row.allSatisfy { $0.isNaN }, "row \(i) should be NaN")
      } else {
        #expect(Array(row) == Array(clean.output.scalars[(i * c.dv)..<((i + 1) * c.dv)]))
      }
    }
  }

  @Test("results are bit-identical for any thread count", arguments: [1, 2, 3, 8])
  func threadIndependence(threads: Int) throws {
    let p = try Self.problem(Self.cases[9])
    let one = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, mask: p.mask, dropout: p.dropout,
      kernel: .tiled(.init(queryBlock: 4, keyBlock: 8)), threads: 1)
    let many = try Attention.scaledDotProduct(
      queries: p.q, keys: p.k, values: p.v, mask: p.mask, dropout: p.dropout,
      kernel: .tiled(.init(queryBlock: 4, keyBlock: 8)), threads: threads)
    #expect(one.output.scalars == many.output.scalars)
  }

  /// The default key block is fitted so that `R·Bk·max(D, Dv) ≤ 10⁶` (OpenBLAS's unpacked
  /// products), in multiples of 16; explicit blocks are kept.
  @Test("the default key block fits OpenBLAS's small products; explicit blocks are kept")
  func fittedKeyBlock() {
    func keys(
      _ d: Int, _ dv: Int? = nil, tk: Int = 4096, group: Int = 1, tq: Int = 2048,
      _ configuration: TiledAttention.Configuration = .default
    ) -> Int {
      TiledAttention.tile(
        queries: tq, keys: tk, headDim: d, valueDim: dv, batchCount: 8, groupSize: group,
        configuration: configuration
      ).keys
    }
    #expect(keys(64) == 960 && keys(32) == 960 && keys(128) == 480 && keys(256) == 240)
    #expect(keys(64, 128) == 480 && keys(64, tk: 300) == 300)
    // A decode step stacks the group's heads: 8 heads of 7 queries are 56 rows.
    #expect(keys(64, group: 8, tq: 7) == 272)
    #expect(keys(128, nil, TiledAttention.Configuration(queryBlock: 16, keyBlock: 960)) == 960)
    // Past 8 MiB of keys and values per query block, the former 256 × 512 (packed); a window
    // bounds what a block reads.
    #expect(keys(64, tk: 16_384) == 960 && keys(64, tk: 32_768) == 512)
    let long = TiledAttention.tile(queries: 32_768, keys: 32_768, headDim: 64, batchCount: 1)
    #expect(long.rows == 256)
    let windowed = TiledAttention.tile(
      queries: 32_768, keys: 32_768, headDim: 64, batchCount: 1, window: 512)
    #expect(windowed.rows == 16 && windowed.keys == 960)
    // Any window is valid, up to Int.max (as wide as no window): no overflow on the way.
    let unbounded = TiledAttention.tile(
      queries: 32_768, keys: 32_768, headDim: 64, batchCount: 1, window: .max)
    #expect(unbounded == long)
    // A block set on the default configuration is kept as set, long sequences too.
    var custom = TiledAttention.Configuration.default
    custom.queryBlock = 64
    #expect(!custom.fitsBlocks)
    let kept = TiledAttention.tile(
      queries: 32_768, keys: 32_768, headDim: 64, batchCount: 1, configuration: custom)
    #expect(kept.rows == 64 && kept.keys == 960)
    for d in [16, 64, 96, 128, 200] {
      let tile = TiledAttention.tile(queries: 2048, keys: 4096, headDim: d, batchCount: 8)
      #expect(tile.rows * tile.keys * d <= 1_000_000 && tile.keys % 16 == 0, "D \(d): \(tile)")
    }
  }

  /// Eight batch elements of 64 queries make at least 16 (batch, query block) tasks, so the keys
  /// are not split (a split adds `Bq·(Dv + 2)` floats per split task, see the decode tests).
  @Test("workspace is independent of Tk and linear in the query block")
  func workspaceAccounting() throws {
    func workspace(tk: Int, queryBlock: Int) throws -> Int {
      let q = try Tensor(shape: [8, 64, 8])
      let k = try Tensor(shape: [8, tk, 8])
      let v = try Tensor(shape: [8, tk, 8])
      return try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, kernel: .tiled(.init(queryBlock: queryBlock, keyBlock: 16)),
        threads: 1
      ).workspaceBytes
    }
    #expect(try workspace(tk: 32, queryBlock: 8) == workspace(tk: 4096, queryBlock: 8))
    let (w8, w16, w24) = (
      try workspace(tk: 64, queryBlock: 8), try workspace(tk: 64, queryBlock: 16),
      try workspace(tk: 64, queryBlock: 24)
    )
    #expect(w16 - w8 == w24 - w16, "workspace \(w8), \(w16), \(w24) is not linear in Bq")
    // Bq·Bk + Bq·Dv + 2·Bq + D·Bq floats for one thread.
    #expect(w8 == (8 * 16 + 8 * 8 + 2 * 8 + 8 * 8) * 4)
    let q = try Tensor(shape: [3, 50, 8])
    let materialized = try Attention.scaledDotProduct(
      queries: q, keys: q, values: q, kernel: .materialized)
    #expect(materialized.workspaceBytes == 3 * 50 * 50 * 4)
  }

  @Test("invalid configurations are errors")
  func invalidConfiguration() throws {
    let q = try Tensor(shape: [1, 4, 8])
    #expect(throws: AttentionError.self) {
      try Attention.scaledDotProduct(
        queries: q, keys: q, values: q, kernel: .tiled(.init(queryBlock: 0)))
    }
    #expect(throws: AttentionError.self) {
      try Attention.scaledDotProduct(
        queries: q, keys: q, values: q, kernel: .tiled(.default), threads: 0)
    }
  }
}

@Suite("Relative-position columns")
struct RelativeColumnsTests {
  @Test("only the columns clip(j − i) + M that the queries and keys reach")
  func columns() throws {
    let bias = try RelativePositionBias(
      embeddings: Tensor(shape: [2 * 40 + 1, 4]), maxDistance: 40)
    // j − i runs over −(Tq − 1) … Tk − 1 = −6 … 10: columns 34 … 50.
    #expect(bias.columns(queries: 7, keys: 11) == 34...50)
    let narrow = try RelativePositionBias(
      embeddings: Tensor(shape: [2 * 3 + 1, 4]), maxDistance: 3)
    // Longer than M on both sides: all 2M + 1 columns.
    #expect(narrow.columns(queries: 20, keys: 20) == 0...6)
  }

  /// With D = 0 there are no products: every score is 0, every weight 1/Tk, and the output the
  /// mean of V's rows, as PyTorch gives (not the NaN of 0·(1/√0)). The mean is computed here.
  @Test(
    "D = 0 gives the mean of V on every kernel", arguments: ["reference", "materialized", "tiled"])
  func emptyHeadDimension(kernel: String) throws {
    let q = try Tensor(shape: [2, 3, 0])
    let k = try Tensor(shape: [2, 5, 0])
    let v = try Tensor.randomNormal(shape: [2, 5, 4], seed: 9, stream: RandomStream.values)
    let chosen: Attention.Kernel =
      kernel == "reference"
      ? .reference : kernel == "materialized" ? .materialized : .tiled(.default)
    let result = try Attention.scaledDotProduct(queries: q, keys: k, values: v, kernel: chosen)
    for b in 0..<2 {
      for c in 0..<4 {
        var mean = 0.0
        for j in 0..<5 { mean += Double(v.scalars[(b * 5 + j) * 4 + c]) / 5 }
        for i in 0..<3 {
          let got = Double(result.output.scalars[(b * 3 + i) * 4 + c])
          #expect(abs(got - mean) <= 1e-6 * max(1, abs(mean)), "\(kernel) [\(b), \(i), \(c)]")
        }
      }
    }
  }
}
