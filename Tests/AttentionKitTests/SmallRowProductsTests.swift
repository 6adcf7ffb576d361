import Tensors
import Testing

@testable import AttentionKit

/// The decode products on compact keys and values (widened in registers, keys four at a time
/// where the build has AVX-512) held to the same products on the widened float32 rows (one key
/// at a time), and both to a float64 sum.
@Suite("Small-row products on compact rows")
struct SmallRowProductsTests {
  /// `[count, width]` rows stored as `storage`, and the same rows widened to float32.
  static func rows(storage: KVStorage, count: Int, width: Int, seed: UInt64) throws
    -> (stored: KVRows, widened: [Float])
  {
    var rows = try KVRows(storage: storage, heads: 1, capacity: count, width: width)
    let values = try Tensor.randomNormal(shape: [1, 1, count, width], seed: seed, stream: 0)
    rows.write(values, at: 0, tokens: count)
    let widened = try rows.floatRows(batchShape: [1, 1], count: count).scalars
    return (rows, widened)
  }

  @Test(
    "scores over compact keys equal, bit for bit, the float32 path's on the widened keys",
    arguments: [KVStorage.float16, .bfloat16, .q8], [1, 3, 4])
  func scoresMatchWidened(storage: KVStorage, queryRows: Int) throws {
    // 23 keys: five blocks of four and three keys one at a time.
    let (cols, d, ld) = (23, 96, 32)
    let keys = try Self.rows(storage: storage, count: cols, width: d, seed: 3)
    let q = try Tensor.randomNormal(shape: [queryRows, d], seed: 4, stream: 0).scalars
    var compact = [Float](repeating: .nan, count: 4 * ld)
    var plain = compact
    q.withUnsafeBufferPointer { q in
      keys.stored.withSource { source in
        SmallRowProducts.scores(
          queries: q.baseAddress!, rows: queryRows, d: d, keys: source, first: 0, cols: cols,
          scale: 0.125, into: &compact, ld: ld)
      }
      keys.widened.withUnsafeBufferPointer { k in
        SmallRowProducts.scores(
          queries: q.baseAddress!, rows: queryRows, d: d, keys: .float32(k.baseAddress!),
          first: 0, cols: cols, scale: 0.125, into: &plain, ld: ld)
      }
    }
    for r in 0..<4 {
      for j in 0..<cols {
        let (got, same) = (compact[r * ld + j], plain[r * ld + j])
        if r >= queryRows {
          #expect(got.isNaN, "row \(r) past the rows was written")
          continue
        }
        #expect(got.bitPattern == same.bitPattern, "\(storage) S[\(r), \(j)]: \(got) vs \(same)")
        // And both within the float32 bound of a dot product of 96 terms.
        var exact = 0.0
        var magnitude = 0.0
        for c in 0..<d {
          let term = Double(q[r * d + c]) * Double(keys.widened[j * d + c])
          exact += term
          magnitude += abs(term)
        }
        let bound = Double(d) * Double(Float.ulpOfOne) * magnitude * 0.125 + 1e-30
        #expect(abs(Double(got) - 0.125 * exact) <= bound)
      }
    }
  }

  @Test(
    "P·V over compact values equals, bit for bit, the float32 path's on the widened values",
    arguments: [KVStorage.float16, .bfloat16, .q8])
  func accumulateMatchesWidened(storage: KVStorage) throws {
    // Dv 80: one pass of sixty-four columns and one of sixteen (a q8 block of 16).
    let (cols, dv, ld, rows) = (13, 80, 16, 3)
    let values = try Self.rows(storage: storage, count: cols, width: dv, seed: 5)
    let p = try Tensor.randomNormal(shape: [rows, ld], seed: 6, stream: 0).scalars
    var compact = [Float](repeating: 0, count: rows * dv)
    var plain = compact
    p.withUnsafeBufferPointer { p in
      values.stored.withSource { source in
        SmallRowProducts.accumulate(
          probabilities: p.baseAddress!, ld: ld, rows: rows, cols: cols, values: source,
          first: 0, dv: dv, into: &compact, overwrite: true)
      }
      values.widened.withUnsafeBufferPointer { v in
        SmallRowProducts.accumulate(
          probabilities: p.baseAddress!, ld: ld, rows: rows, cols: cols,
          values: .float32(v.baseAddress!), first: 0, dv: dv, into: &plain, overwrite: true)
      }
    }
    #expect(compact.map(\.bitPattern) == plain.map(\.bitPattern))
    // Against float64: column 5 of row 2.
    var exact = 0.0
    var magnitude = 0.0
    for j in 0..<cols {
      let term = Double(p[2 * ld + j]) * Double(values.widened[j * dv + 5])
      exact += term
      magnitude += abs(term)
    }
    #expect(abs(Double(compact[2 * dv + 5]) - exact) <= Double(cols) * 1.2e-7 * magnitude)
  }

  #if ATTN_AVX512 && arch(x86_64)
    @Test("LaneSums gives each vector's total in RowSoftmax.total's order, bit for bit")
    func laneSumsMatchTotals() throws {
      let x = try Tensor.randomNormal(shape: [16, 16], seed: 7, stream: 0).scalars
        .enumerated().map { $0.element * Float(1 << ($0.offset % 23)) }
      let v = (0..<16).map { SIMD16<Float>(x[(16 * $0)..<(16 * $0 + 16)]) }
      let sums = LaneSums.sixteen(
        v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13],
        v[14], v[15])
      for i in 0..<16 {
        #expect(sums[i].bitPattern == RowSoftmax.total(v[i]).bitPattern, "lane \(i)")
      }
    }
  #endif
}
