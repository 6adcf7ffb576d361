import Tensors

/// How a `KVCache` stores each key and value: the element type of its rows.
///
/// - `float32`: IEEE binary32 as computed, 4 bytes a value.
/// - `float16`: IEEE binary16 (1 sign, 5 exponent, 10 fraction bits), rounded to nearest even
///   (`HalfPrecision.f16Bits(from:)`), 2 bytes a value; finite values beyond ±65504 do not fit.
/// - `bfloat16`: the upper half of a binary32 (1 sign, 8 exponent, 7 fraction bits), rounded to
///   nearest even (`HalfPrecision.bf16Bits(from:)`), 2 bytes a value.
/// - `q8`: as ggml's `q8_0`, each row cut into blocks of 32 values (the last one shorter when the
///   row's width is not a multiple of 32), each block stored as one float16 scale
///   `s = f16(max|x| / 127)` and 32 int8 `q = round(x / s)` (half away from zero, in `[−127, 127]`),
///   read back as `s·q` — 34 bytes per 32 values. The division is by the stored (rounded) scale,
///   so `|x − s·q| ≤ s/2` holds exactly; ggml's reference divides by the unrounded one (its `q`
///   may differ by one, its error reach `0.56·s`). A block of zeros has `s = 0`; a block whose
///   largest magnitude is below about `127·2⁻²⁵` gets `s = 0` too, and reads back as zeros.
///
/// Every stored value reads back exactly as a `Float` (the 16-bit formats widen exactly; `s·q` is a
/// product of 11 and 8 significant bits), so the kernels compute on exactly the stored values,
/// and a float64 reference on them is the right yardstick for the kernel's rounding; the
/// storage's own effect is what separates those values from the float32 ones.
public enum KVStorage: String, Sendable, CaseIterable {
  case float32, float16, bfloat16, q8

  /// Values per `q8` block.
  public static let q8BlockSize = 32

  /// The bytes one row of `width` values takes.
  public func rowBytes(width: Int) -> Int {
    switch self {
    case .float32: return 4 * width
    case .float16, .bfloat16: return 2 * width
    case .q8: return width + 2 * Self.q8Blocks(width: width)
    }
  }

  /// `q8` blocks in a row of `width` values, `⌈width / 32⌉`.
  static func q8Blocks(width: Int) -> Int { (width + q8BlockSize - 1) / q8BlockSize }

  /// The 16-bit format of `float16` and `bfloat16`.
  var halfFormat: HalfPrecision.Format? {
    switch self {
    case .float16: return .float16
    case .bfloat16: return .bfloat16
    case .float32, .q8: return nil
    }
  }
}

/// The rows of a cache's keys (or values) in one of the `KVStorage` types: `[B·Hkv·capacity]`
/// rows of `width` values, row `(g, j)` at `g·capacity + j`.
struct KVRows: Sendable {
  let storage: KVStorage
  let width: Int
  let capacity: Int
  let heads: Int
  /// `float32`: the values. `float16`, `bfloat16`: their bits. `q8`: the int8 values and, per
  /// block, the float16 scale's bits.
  private(set) var floats: [Float] = []
  private(set) var halves: [UInt16] = []
  private(set) var quants: [Int8] = []

  init(storage: KVStorage, heads: Int, capacity: Int, width: Int) throws {
    (self.storage, self.heads, self.capacity, self.width) = (storage, heads, capacity, width)
    let count = try Tensor.elementCount(of: [heads, capacity, width])
    switch storage {
    case .float32: floats = [Float](repeating: 0, count: count)
    case .float16, .bfloat16: halves = [UInt16](repeating: 0, count: count)
    case .q8:
      quants = [Int8](repeating: 0, count: count)
      halves = [UInt16](
        repeating: 0, count: heads * capacity * KVStorage.q8Blocks(width: width))
    }
  }

  /// Throws when a finite value of `rows` would not be finite once stored: beyond ±65504 in
  /// float16 (after rounding), beyond about 3.39·10³⁸ in bfloat16, in a q8 block whose scale
  /// `max|x| / 127` passes float16's 65504.
  func checkRepresentable(_ rows: Tensor, what: String) throws {
    let largest: Float
    switch storage {
    case .float32: return
    case .float16, .bfloat16:
      guard let format = storage.halfFormat,
        let at = HalfPrecision.firstOverflow(in: rows.scalars, to: format)
      else { return }
      largest = rows.scalars[at]
    case .q8:
      let limit = 127 * HalfPrecision.Format.float16.greatestFiniteMagnitude
      guard let at = rows.scalars.firstIndex(where: { $0.isFinite && $0.magnitude > limit })
      else { return }
      largest = rows.scalars[at]
    }
    throw AttentionError.invalidArgument(
      "a \(storage.rawValue) KV cache cannot hold the \(what) value \(largest): it would not be "
        + "finite once stored")
  }

  /// Writes `rows` `[B, Hkv, t, width]` at row `start` of each head.
  mutating func write(_ rows: Tensor, at start: Int, tokens t: Int) {
    guard t > 0, width > 0 else { return }
    let w = width
    rows.scalars.withUnsafeBufferPointer { source in
      for head in 0..<heads {
        let from = source.baseAddress! + head * t * w
        let row0 = head * capacity + start
        switch storage {
        case .float32:
          floats.withUnsafeMutableBufferPointer {
            ($0.baseAddress! + row0 * w).update(from: from, count: t * w)
          }
        case .float16, .bfloat16:
          let format = storage.halfFormat!
          for i in 0..<(t * w) { halves[row0 * w + i] = format.bits(from: from[i]) }
        case .q8:
          for r in 0..<t { quantizeRow(from + r * w, row: row0 + r) }
        }
      }
    }
  }

  /// One row in `q8`: per block, `s = f16(max|x| / 127)`, `q = round(x / s)`.
  private mutating func quantizeRow(_ x: UnsafePointer<Float>, row: Int) {
    let blocks = KVStorage.q8Blocks(width: width)
    for block in 0..<blocks {
      let start = block * KVStorage.q8BlockSize
      let end = min(width, start + KVStorage.q8BlockSize)
      var largest: Float = 0
      for i in start..<end { largest = max(largest, x[i].magnitude) }
      let bits = HalfPrecision.f16Bits(from: largest / 127)
      halves[row * blocks + block] = bits
      let scale = Double(HalfPrecision.float(fromF16Bits: bits))
      for i in start..<end {
        // In Double the quotient lands on the right side of every half (x has 24 significant
        // bits and s 11, so x/s is never within 2⁻⁵³ of a half without being one), so
        // |x − s·q| ≤ s/2 exactly.
        let q = scale > 0 ? (Double(x[i]) / scale).rounded(.toNearestOrAwayFromZero) : 0
        quants[row * width + i] = Int8(max(-127, min(127, q)))
      }
    }
  }

  /// `batchShape + [count, width]` (`batchShape` `[B, Hkv]`): the first `count` rows of each
  /// head as `Float`s, exactly the stored values (a copy, for checks and for the kernels that do
  /// not read compact rows).
  func floatRows(batchShape: [Int], count: Int) throws -> Tensor {
    let (w, heads, capacity) = (width, heads, capacity)
    return try Tensor(shape: batchShape + [count, w]) { out in
      withSource { source in
        for head in 0..<heads where count * w > 0 {
          _ = source.rows(
            head * capacity, count: count, width: w, scratch: out + head * count * w,
            forceCopy: true)
        }
      }
    }
  }

  /// `[B, Hkv, capacity, width]` float32 rows without a copy (`nil` for the other storages).
  func floatTensor(batchShape: [Int]) -> Tensor? {
    storage == .float32 ? Tensor(validShape: batchShape + [capacity, width], scalars: floats) : nil
  }

  /// The rows as the tiled kernel reads them.
  func withSource<R>(_ body: (KeyValueRows) throws -> R) rethrows -> R {
    switch storage {
    case .float32:
      return try floats.withUnsafeBufferPointer { try body(.float32($0.baseAddress!)) }
    case .float16, .bfloat16:
      return try halves.withUnsafeBufferPointer { h in
        try body(
          storage == .float16 ? .float16(h.baseAddress!) : .bfloat16(h.baseAddress!))
      }
    case .q8:
      return try quants.withUnsafeBufferPointer { q in
        try halves.withUnsafeBufferPointer { s in
          try body(.q8(quants: q.baseAddress!, scales: s.baseAddress!))
        }
      }
    }
  }
}
