import Tensors

/// Where the tiled kernel reads keys or values: float32 rows in place, or a `KVCache`'s compact
/// rows (see `KVStorage`), which it widens to `Float` as it reads them — in registers, sixteen
/// values at a time, for the small-row products of a decode step (`SmallRowProducts`), or one tile
/// at a time into its scratch for sgemm; never the whole cache.
enum KeyValueRows: @unchecked Sendable {
  case float32(UnsafePointer<Float>)
  case float16(UnsafePointer<UInt16>)
  case bfloat16(UnsafePointer<UInt16>)
  case q8(quants: UnsafePointer<Int8>, scales: UnsafePointer<UInt16>)

  /// The floats of scratch a tile of `keys` rows needs: for sgemm (`small` false) the widened
  /// rows of a compact storage; for the small-row products only q8's widened scales.
  func tileFloats(keys: Int, width: Int, small: Bool) -> Int {
    switch self {
    case .float32: return 0
    case .float16, .bfloat16: return small ? 0 : keys * width
    case .q8: return small ? keys * KVStorage.q8Blocks(width: width) : keys * width
    }
  }

  /// Rows `first ..< first + count` (of `width` values each) as `Float`s: a pointer into the
  /// float32 rows, or `scratch` (`count·width` floats) filled with the widened rows.
  @inline(__always)
  func rows(
    _ first: Int, count: Int, width: Int, scratch: UnsafeMutablePointer<Float>,
    forceCopy: Bool = false
  ) -> UnsafePointer<Float> {
    switch self {
    case .float32(let p):
      guard forceCopy else { return p + first * width }
      scratch.update(from: p + first * width, count: count * width)
    case .float16(let p):
      Float16Rows(p + first * width, width: width).widen(count: count, into: scratch)
    case .bfloat16(let p):
      BFloat16Rows(p + first * width, width: width).widen(count: count, into: scratch)
    case .q8(let quants, let scales):
      Q8Rows.with(quants, scales, first: first, count: count, width: width) {
        $0.widen(count: count, into: scratch)
      }
    }
    return UnsafePointer(scratch)
  }
}

/// Rows of `width` values in one storage type, read sixteen values at a time as `Float`s — exactly
/// the stored values (every storage widens exactly, see `KVStorage`).
protocol SixteenLaneRows {
  /// Whether reading widens stored values (every storage but float32): then the reads cost
  /// instructions besides the bytes, and the products take keys four at a time where the build
  /// has AVX-512 (`LaneSums`).
  static var widens: Bool { get }
  /// Values per row.
  var width: Int { get }
  /// Values `c ..< c + 16` of row `j` (`c` a multiple of 16, `c + 16 ≤ width`).
  func sixteen(row j: Int, column c: Int) -> SIMD16<Float>
  /// Value `c` of row `j`.
  func value(row j: Int, column c: Int) -> Float
}

extension SixteenLaneRows {
  /// Rows `0 ..< count` into `out` (`count·width` floats).
  @inline(__always)
  func widen(count: Int, into out: UnsafeMutablePointer<Float>) {
    let vectorWidth = width & ~15
    for j in 0..<count {
      let row = UnsafeMutableRawPointer(out + j * width)
      var c = 0
      while c < vectorWidth {
        row.storeBytes(of: sixteen(row: j, column: c), toByteOffset: 4 * c, as: SIMD16<Float>.self)
        c += 16
      }
      while c < width {
        out[j * width + c] = value(row: j, column: c)
        c += 1
      }
    }
  }
}

/// Rows of one element type, `width` to a row, widened as `Widening` says.
struct ElementRows<Widening: ElementWidening>: SixteenLaneRows {
  static var widens: Bool { Widening.widens }
  let base: UnsafePointer<Widening.Stored>
  let width: Int
  init(_ base: UnsafePointer<Widening.Stored>, width: Int) {
    (self.base, self.width) = (base, width)
  }
  @inline(__always)
  func sixteen(row j: Int, column c: Int) -> SIMD16<Float> {
    Widening.sixteen(base + j * width + c)
  }
  @inline(__always)
  func value(row j: Int, column c: Int) -> Float { Widening.value(base[j * width + c]) }
}

/// How a stored element type reads as `Float`: sixteen at a time, or one.
protocol ElementWidening {
  associatedtype Stored
  /// Whether reading converts (every type but `Float`).
  static var widens: Bool { get }
  static func sixteen(_ source: UnsafePointer<Stored>) -> SIMD16<Float>
  static func value(_ stored: Stored) -> Float
}

typealias Float32Rows = ElementRows<Float32Widening>
typealias Float16Rows = ElementRows<Float16Widening>
typealias BFloat16Rows = ElementRows<BFloat16Widening>

enum Float32Widening: ElementWidening {
  static var widens: Bool { false }
  @inline(__always)
  static func sixteen(_ source: UnsafePointer<Float>) -> SIMD16<Float> {
    UnsafeRawPointer(source).loadUnaligned(as: SIMD16<Float>.self)
  }
  @inline(__always)
  static func value(_ stored: Float) -> Float { stored }
}

/// IEEE binary16 bits: widened by F16C's conversion instruction where the build says the CPU has
/// it (`-DATTN_F16C`, `Scripts/build-flags.sh`), else by moving the bits (`fromBits`), which
/// vectorizes; `Float(Float16)` without F16C is a library call per value.
enum Float16Widening: ElementWidening {
  static var widens: Bool { true }
  @inline(__always)
  static func sixteen(_ source: UnsafePointer<UInt16>) -> SIMD16<Float> {
    // Lane by lane, which the compiler turns into one conversion instruction; the standard
    // library's `SIMD16<Float>(_: SIMD16<Float16>)` is a call in these loops.
    var x = SIMD16<Float>()
    #if ATTN_F16C
      let h = UnsafeRawPointer(source).loadUnaligned(as: SIMD16<Float16>.self)
      for i in 0..<16 { x[i] = Float(h[i]) }
    #else
      for i in 0..<16 { x[i] = fromBits(source[i]) }
    #endif
    return x
  }

  @inline(__always)
  static func value(_ bits: UInt16) -> Float {
    #if ATTN_F16C
      return Float(Float16(bitPattern: bits))
    #else
      return fromBits(bits)
    #endif
  }

  /// `HalfPrecision.float(fromF16Bits:)` without branches: the magnitude's bits moved up 13
  /// places read as a `Float` 2¹¹² too small (exactly, subnormals included), then scaled;
  /// exponent 31 (∞, NaN) becomes 255 with the fraction kept.
  @inline(__always)
  static func fromBits(_ bits: UInt16) -> Float {
    let h = UInt32(bits)
    let magnitude = (h & 0x7FFF) << 13
    let scaled = (Float(bitPattern: magnitude) * 0x1p112).bitPattern
    let special = (h & 0x7C00) == 0x7C00
    let widened = special ? (0x7F80_0000 | magnitude) : scaled
    return Float(bitPattern: widened | ((h & 0x8000) << 16))
  }
}

/// bfloat16 bits: the upper half of a binary32.
enum BFloat16Widening: ElementWidening {
  static var widens: Bool { true }
  @inline(__always)
  static func sixteen(_ source: UnsafePointer<UInt16>) -> SIMD16<Float> {
    let h = UnsafeRawPointer(source).loadUnaligned(as: SIMD16<UInt16>.self)
    var w = SIMD16<UInt32>()
    for i in 0..<16 { w[i] = UInt32(h[i]) &<< 16 }
    return unsafeBitCast(w, to: SIMD16<Float>.self)
  }
  @inline(__always)
  static func value(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }
}

/// `q8` rows: int8 values and one scale per block of 32 (`s·q`, see `KVStorage.q8`), the scales
/// widened to `Float` once for the rows read, so that each use is a load (a broadcast operand)
/// rather than a conversion. Sixteen values never straddle two
/// blocks (`c` is a multiple of 16).
struct Q8Rows: SixteenLaneRows {
  static var widens: Bool { true }
  let quants: UnsafePointer<Int8>
  let scales: UnsafePointer<Float>
  let width: Int
  let blocks: Int

  /// Rows `first ..< first + count` of the cache's `quants` and float16 `scales`, their scales
  /// widened into `widened` (`count·⌈width/32⌉` floats).
  @inline(__always)
  init(
    _ quants: UnsafePointer<Int8>, _ scales: UnsafePointer<UInt16>, first: Int, count: Int,
    width: Int, widenedInto widened: UnsafeMutablePointer<Float>
  ) {
    let blocks = KVStorage.q8Blocks(width: width)
    Float16Rows(scales + first * blocks, width: count * blocks).widen(count: 1, into: widened)
    (self.quants, self.scales) = (quants + first * width, UnsafePointer(widened))
    (self.width, self.blocks) = (width, blocks)
  }

  /// `body` given those rows, the scales widened into a temporary buffer (sgemm's tiles and
  /// whole-cache copies; the small-row products widen into their thread's scratch instead).
  @inline(__always)
  static func with<R>(
    _ quants: UnsafePointer<Int8>, _ scales: UnsafePointer<UInt16>, first: Int, count: Int,
    width: Int, _ body: (Q8Rows) -> R
  ) -> R {
    let floats = count * KVStorage.q8Blocks(width: width)
    return withUnsafeTemporaryAllocation(of: Float.self, capacity: max(floats, 1)) {
      body(
        Q8Rows(
          quants, scales, first: first, count: count, width: width, widenedInto: $0.baseAddress!))
    }
  }

  @inline(__always)
  func scale(row j: Int, column c: Int) -> Float {
    scales[j * blocks + c / KVStorage.q8BlockSize]
  }
  @inline(__always)
  func sixteen(row j: Int, column c: Int) -> SIMD16<Float> {
    let q = UnsafeRawPointer(quants + j * width + c).loadUnaligned(as: SIMD16<Int8>.self)
    var x = SIMD16<Float>()
    for i in 0..<16 { x[i] = Float(q[i]) }
    return x * scale(row: j, column: c)
  }
  @inline(__always)
  func value(row j: Int, column c: Int) -> Float {
    scale(row: j, column: c) * Float(quants[j * width + c])
  }
}
