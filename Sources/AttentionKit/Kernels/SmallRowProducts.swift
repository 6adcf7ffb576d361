/// The tiled kernel's two products for a tile of at most four rows — a decode step: one query
/// per head of a group, the heads stacked — by streaming each key's and each value's row once,
/// sixteen lanes at a time, instead of through sgemm, which packs the tile's keys and values into
/// a buffer first (reading them twice and writing them once, where a decode step is bound by
/// reading them at all); compact rows (`KVCache`'s float16, bfloat16, q8) are widened in the
/// registers as they are read. The same sums as the sgemm path (each over `D` products, or over the
/// tile's keys), in another order: within the same float32 bounds.
///
/// Shapes: `Q` `[rows, D]`, `K` `[cols, D]`, `V` `[cols, Dv]` (rows contiguous), `S` and `P`
/// `[rows, cols]` with leading dimension `ld`, the accumulator `[rows, Dv]`; `D` and `Dv`
/// multiples of 16. `scratch` holds q8 rows' widened scales, `cols·⌈D/32⌉` floats
/// (`KeyValueRows.tileFloats`); other storages leave it untouched.
enum SmallRowProducts {
  private typealias Sixteens = (SIMD16<Float>, SIMD16<Float>, SIMD16<Float>, SIMD16<Float>)

  /// The most rows a call takes.
  static let maxRows = 4

  /// Whether a tile of `rows` rows and widths `d`, `dv` takes this path.
  @inline(__always)
  static func applies(rows: Int, d: Int, dv: Int) -> Bool {
    rows >= 1 && rows <= maxRows && d > 0 && d % 16 == 0 && dv % 16 == 0
  }

  /// `S[r, j] = scale·Σ_c Q[r, c]·K[first + j, c]`, the keys read in their storage type.
  static func scores(
    queries q: UnsafePointer<Float>, rows: Int, d: Int, keys: KeyValueRows, first: Int,
    cols: Int, scale: Float, into s: UnsafeMutablePointer<Float>, ld: Int,
    scratch: UnsafeMutablePointer<Float>
  ) {
    switch keys {
    case .float32(let p):
      scores(q, rows: rows, keys: Float32Rows(p + first * d, width: d), cols, scale, s, ld)
    case .float16(let p):
      scores(q, rows: rows, keys: Float16Rows(p + first * d, width: d), cols, scale, s, ld)
    case .bfloat16(let p):
      scores(q, rows: rows, keys: BFloat16Rows(p + first * d, width: d), cols, scale, s, ld)
    case .q8(let quants, let scales):
      let k = Q8Rows(quants, scales, first: first, count: cols, width: d, widenedInto: scratch)
      scores(q, rows: rows, keys: k, cols, scale, s, ld)
    }
  }

  @inline(__always)
  private static func scores<Keys: SixteenLaneRows>(
    _ q: UnsafePointer<Float>, rows: Int, keys k: Keys, _ cols: Int, _ scale: Float,
    _ s: UnsafeMutablePointer<Float>, _ ld: Int
  ) {
    let d = k.width
    // Rows past `rows` repeat the last one; their sums are not stored.
    let q0 = UnsafeRawPointer(q)
    let q1 = UnsafeRawPointer(q + min(1, rows - 1) * d)
    let q2 = UnsafeRawPointer(q + min(2, rows - 1) * d)
    let q3 = UnsafeRawPointer(q + min(3, rows - 1) * d)
    var j = 0
    #if ATTN_AVX512 && arch(x86_64)
      // Compact keys four at a time: sixteen dot products, reduced together (`LaneSums`, the
      // same order of additions as `RowSoftmax.total`, so every score is the one the loop below
      // gives). Float32 keys, bound by reading them, stay one at a time, which streams them
      // faster.
      while Keys.widens, j + 4 <= cols {
        var a = (SIMD16<Float>.zero, SIMD16<Float>.zero, SIMD16<Float>.zero, SIMD16<Float>.zero)
        var b = a
        var e = a
        var f = a
        var c = 0
        while c < d {
          let (k0, k1) = (k.sixteen(row: j, column: c), k.sixteen(row: j + 1, column: c))
          let (k2, k3) = (k.sixteen(row: j + 2, column: c), k.sixteen(row: j + 3, column: c))
          let offset = 4 * c
          let x0 = q0.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self)
          let x1 = q1.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self)
          let x2 = q2.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self)
          let x3 = q3.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self)
          a.0 = a.0.addingProduct(x0, k0)
          a.1 = a.1.addingProduct(x0, k1)
          a.2 = a.2.addingProduct(x0, k2)
          a.3 = a.3.addingProduct(x0, k3)
          b.0 = b.0.addingProduct(x1, k0)
          b.1 = b.1.addingProduct(x1, k1)
          b.2 = b.2.addingProduct(x1, k2)
          b.3 = b.3.addingProduct(x1, k3)
          e.0 = e.0.addingProduct(x2, k0)
          e.1 = e.1.addingProduct(x2, k1)
          e.2 = e.2.addingProduct(x2, k2)
          e.3 = e.3.addingProduct(x2, k3)
          f.0 = f.0.addingProduct(x3, k0)
          f.1 = f.1.addingProduct(x3, k1)
          f.2 = f.2.addingProduct(x3, k2)
          f.3 = f.3.addingProduct(x3, k3)
          c += 16
        }
        // Lane 4r + t: row r, key j + t.
        let sums =
          LaneSums.sixteen(
            a.0, a.1, a.2, a.3, b.0, b.1, b.2, b.3, e.0, e.1, e.2, e.3, f.0, f.1, f.2, f.3)
          * scale
        @inline(__always)
        func store(_ quarter: SIMD4<Float>, row r: Int) {
          guard r < rows else { return }
          UnsafeMutableRawPointer(s + r * ld + j).storeBytes(of: quarter, as: SIMD4<Float>.self)
        }
        store(sums.lowHalf.lowHalf, row: 0)
        store(sums.lowHalf.highHalf, row: 1)
        store(sums.highHalf.lowHalf, row: 2)
        store(sums.highHalf.highHalf, row: 3)
        j += 4
      }
    #endif
    while j < cols {
      defer { j += 1 }
      var (a0, a1, a2, a3) = (SIMD16<Float>(), SIMD16<Float>(), SIMD16<Float>(), SIMD16<Float>())
      var c = 0
      while c < d {
        let kv = k.sixteen(row: j, column: c)
        let offset = 4 * c
        a0 = a0.addingProduct(q0.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self), kv)
        a1 = a1.addingProduct(q1.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self), kv)
        a2 = a2.addingProduct(q2.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self), kv)
        a3 = a3.addingProduct(q3.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self), kv)
        c += 16
      }
      s[j] = scale * RowSoftmax.total(a0)
      if rows > 1 { s[ld + j] = scale * RowSoftmax.total(a1) }
      if rows > 2 { s[2 * ld + j] = scale * RowSoftmax.total(a2) }
      if rows > 3 { s[3 * ld + j] = scale * RowSoftmax.total(a3) }
    }
  }

  /// `acc[r, c] = Σ_j P[r, j]·V[j, c]` (`overwrite`), or `+=` it.
  ///
  /// Sixty-four columns of every row's output at a time (sixteen vector accumulators), over the
  /// tile's keys: each pass reads sixty-four values of each value row — four contiguous cache
  /// lines in float32, two in float16 or bfloat16, one in q8 — key after key, which the
  /// prefetchers follow.
  static func accumulate(
    probabilities p: UnsafePointer<Float>, ld: Int, rows: Int, cols: Int,
    values: KeyValueRows, first: Int, dv: Int, into acc: UnsafeMutablePointer<Float>,
    overwrite: Bool, scratch: UnsafeMutablePointer<Float>
  ) {
    switch values {
    case .float32(let v):
      accumulate(p, ld, rows, cols, values: Float32Rows(v + first * dv, width: dv), acc, overwrite)
    case .float16(let v):
      accumulate(p, ld, rows, cols, values: Float16Rows(v + first * dv, width: dv), acc, overwrite)
    case .bfloat16(let v):
      let rows16 = BFloat16Rows(v + first * dv, width: dv)
      accumulate(p, ld, rows, cols, values: rows16, acc, overwrite)
    case .q8(let quants, let scales):
      let v = Q8Rows(quants, scales, first: first, count: cols, width: dv, widenedInto: scratch)
      accumulate(p, ld, rows, cols, values: v, acc, overwrite)
    }
  }

  @inline(__always)
  private static func accumulate<Values: SixteenLaneRows>(
    _ p: UnsafePointer<Float>, _ ld: Int, _ rows: Int, _ cols: Int, values v: Values,
    _ acc: UnsafeMutablePointer<Float>, _ overwrite: Bool
  ) {
    let dv = v.width
    let p0 = p
    let p1 = p + min(1, rows - 1) * ld
    let p2 = p + min(2, rows - 1) * ld
    let p3 = p + min(3, rows - 1) * ld
    @inline(__always)
    func store(_ sum: SIMD16<Float>, row r: Int, column c: Int) {
      guard r < rows else { return }
      let target = UnsafeMutableRawPointer(acc + r * dv + c)
      let total = overwrite ? sum : target.loadUnaligned(as: SIMD16<Float>.self) + sum
      target.storeBytes(of: total, as: SIMD16<Float>.self)
    }
    var c = 0
    while c + 64 <= dv {
      var a: Sixteens = (.zero, .zero, .zero, .zero)
      var b = a
      var e = a
      var f = a
      for j in 0..<cols {
        let x0 = v.sixteen(row: j, column: c)
        let x1 = v.sixteen(row: j, column: c + 16)
        let x2 = v.sixteen(row: j, column: c + 32)
        let x3 = v.sixteen(row: j, column: c + 48)
        let (w0, w1, w2, w3) = (p0[j], p1[j], p2[j], p3[j])
        a.0 = a.0.addingProduct(x0, w0)
        a.1 = a.1.addingProduct(x1, w0)
        a.2 = a.2.addingProduct(x2, w0)
        a.3 = a.3.addingProduct(x3, w0)
        b.0 = b.0.addingProduct(x0, w1)
        b.1 = b.1.addingProduct(x1, w1)
        b.2 = b.2.addingProduct(x2, w1)
        b.3 = b.3.addingProduct(x3, w1)
        e.0 = e.0.addingProduct(x0, w2)
        e.1 = e.1.addingProduct(x1, w2)
        e.2 = e.2.addingProduct(x2, w2)
        e.3 = e.3.addingProduct(x3, w2)
        f.0 = f.0.addingProduct(x0, w3)
        f.1 = f.1.addingProduct(x1, w3)
        f.2 = f.2.addingProduct(x2, w3)
        f.3 = f.3.addingProduct(x3, w3)
      }
      @inline(__always)
      func storeAll(_ sums: Sixteens, row r: Int) {
        store(sums.0, row: r, column: c)
        store(sums.1, row: r, column: c + 16)
        store(sums.2, row: r, column: c + 32)
        store(sums.3, row: r, column: c + 48)
      }
      storeAll(a, row: 0)
      storeAll(b, row: 1)
      storeAll(e, row: 2)
      storeAll(f, row: 3)
      c += 64
    }
    while c < dv {
      var (a0, a1, a2, a3) = (SIMD16<Float>(), SIMD16<Float>(), SIMD16<Float>(), SIMD16<Float>())
      for j in 0..<cols {
        let value = v.sixteen(row: j, column: c)
        a0 = a0.addingProduct(value, p0[j])
        a1 = a1.addingProduct(value, p1[j])
        a2 = a2.addingProduct(value, p2[j])
        a3 = a3.addingProduct(value, p3[j])
      }
      store(a0, row: 0, column: c)
      store(a1, row: 1, column: c)
      store(a2, row: 2, column: c)
      store(a3, row: 3, column: c)
      c += 16
    }
  }
}
