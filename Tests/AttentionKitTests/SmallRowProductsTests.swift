import Tensors
import Testing

@testable import AttentionKit

/// The decode products on compact keys and values (widened in registers, keys four at a time
/// where the build has AVX-512) held to the same products on the widened float32 rows (one key
/// at a time), and both to a float64 sum. The widened rows come from `floatRows`, through the
/// same readers; `KVStorageTests` holds those to `HalfPrecision` and to q8's definition.
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

  /// Scratch for q8's widened scales, more than any call here needs.
  static let scratchFloats = 256

  @Test(
    "scores over compact keys equal, bit for bit, the float32 path's on the widened keys",
    arguments: [KVStorage.float16, .bfloat16, .q8], [1, 3, 4])
  func scoresMatchWidened(storage: KVStorage, queryRows: Int) throws {
    // 23 keys from row 5 on: five blocks of four and three keys one at a time.
    let (first, cols, d, ld) = (5, 23, 96, 32)
    let keys = try Self.rows(storage: storage, count: first + cols, width: d, seed: 3)
    let q = try Tensor.randomNormal(shape: [queryRows, d], seed: 4, stream: 0).scalars
    var compact = [Float](repeating: .nan, count: 4 * ld)
    var plain = compact
    var scratch = [Float](repeating: 0, count: Self.scratchFloats)
    q.withUnsafeBufferPointer { q in
      keys.stored.withSource { source in
        SmallRowProducts.scores(
          queries: q.baseAddress!, rows: queryRows, d: d, keys: source, first: first,
          cols: cols, scale: 0.125, into: &compact, ld: ld, scratch: &scratch)
      }
      keys.widened.withUnsafeBufferPointer { k in
        SmallRowProducts.scores(
          queries: q.baseAddress!, rows: queryRows, d: d, keys: .float32(k.baseAddress!),
          first: first, cols: cols, scale: 0.125, into: &plain, ld: ld, scratch: &scratch)
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
          let term = Double(q[r * d + c]) * Double(keys.widened[(first + j) * d + c])
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
    arguments: [KVStorage.float16, .bfloat16, .q8], [true, false])
  func accumulateMatchesWidened(storage: KVStorage, overwrite: Bool) throws {
    // Dv 80: one pass of sixty-four columns and one of sixteen (a q8 block of 16); 13 values
    // from row 3 on; three rows of a four-row accumulator, the fourth a NaN sentinel.
    let (first, cols, dv, ld, rows) = (3, 13, 80, 16, 3)
    let values = try Self.rows(storage: storage, count: first + cols, width: dv, seed: 5)
    let p = try Tensor.randomNormal(shape: [rows, ld], seed: 6, stream: 0).scalars
    let start = try Tensor.randomNormal(shape: [rows, dv], seed: 6, stream: 1).scalars
    var compact = start + [Float](repeating: .nan, count: dv)
    var plain = compact
    var scratch = [Float](repeating: 0, count: Self.scratchFloats)
    p.withUnsafeBufferPointer { p in
      values.stored.withSource { source in
        SmallRowProducts.accumulate(
          probabilities: p.baseAddress!, ld: ld, rows: rows, cols: cols, values: source,
          first: first, dv: dv, into: &compact, overwrite: overwrite, scratch: &scratch)
      }
      values.widened.withUnsafeBufferPointer { v in
        SmallRowProducts.accumulate(
          probabilities: p.baseAddress!, ld: ld, rows: rows, cols: cols,
          values: .float32(v.baseAddress!), first: first, dv: dv, into: &plain,
          overwrite: overwrite, scratch: &scratch)
      }
    }
    #expect(compact.map(\.bitPattern) == plain.map(\.bitPattern))
    #expect(compact[(rows * dv)...].allSatisfy { $0.isNaN }, "a row past the rows was written")
    // Every output against float64 (`start` added unless overwriting): within cols + 1
    // roundings of the magnitudes summed.
    for r in 0..<rows {
      for c in 0..<dv {
        var exact = overwrite ? 0 : Double(start[r * dv + c])
        var magnitude = abs(exact)
        for j in 0..<cols {
          let term = Double(p[r * ld + j]) * Double(values.widened[(first + j) * dv + c])
          exact += term
          magnitude += abs(term)
        }
        let bound = Double(cols + 1) * Double(Float.ulpOfOne) * magnitude
        #expect(abs(Double(compact[r * dv + c]) - exact) <= bound, "[\(r), \(c)]")
      }
    }
  }

  @Test("float16 widened by moving the bits equals HalfPrecision for all 65,536 patterns")
  func float16BitsMatchHalfPrecision() {
    var mismatches = 0
    for bits in 0...UInt16.max {
      let moved = Float16Widening.fromBits(bits)
      if moved.bitPattern != HalfPrecision.float(fromF16Bits: bits).bitPattern { mismatches += 1 }
    }
    #expect(mismatches == 0)
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
