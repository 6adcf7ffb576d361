import Tensors

/// The element types read from `.npy` files; all become `Float` in the tensor. Integers and
/// booleans are for masks (0/1) chiefly; integers beyond ±2²⁴ round to the nearest `Float`.
public enum NPYDType: String, Sendable, Equatable, CaseIterable {
  /// `<f2`: little-endian binary16, exact in `Float`.
  case float16 = "<f2"
  /// `<f4`: little-endian binary32, read as is.
  case float32 = "<f4"
  /// `<f8`: little-endian binary64, rounded to the nearest `Float`; finite values beyond
  /// `Float`'s range saturate to `±Float.greatestFiniteMagnitude`, never become ±inf.
  case float64 = "<f8"
  /// `|b1`: one byte per element, 0 or 1, read as 0.0 or 1.0.
  case bool = "|b1"
  case int8 = "|i1", uint8 = "|u1"
  case int16 = "<i2", uint16 = "<u2"
  case int32 = "<i4", uint32 = "<u4"
  case int64 = "<i8", uint64 = "<u8"

  /// The numpy type descriptor, as written in the header.
  public var descr: String { rawValue }

  /// Whether the values are integers or booleans (a mask's 0/1), not floating point.
  public var isIntegral: Bool {
    switch self {
    case .float16, .float32, .float64: return false
    default: return true
    }
  }

  var itemSize: Int {
    switch self {
    case .bool, .int8, .uint8: return 1
    case .float16, .int16, .uint16: return 2
    case .float32, .int32, .uint32: return 4
    case .float64, .int64, .uint64: return 8
    }
  }

  /// The dtype of a header's `descr`; numpy writes one-byte types with `|`, and also accepts
  /// `<` for them.
  init?(descr: String) {
    let aliases = ["<b1": "|b1", "<i1": "|i1", "<u1": "|u1"]
    self.init(rawValue: aliases[descr] ?? descr)
  }
}

/// An element whose stored value did not fit in a `Float` and was saturated when read: its
/// row-major position and the value as the file holds it.
public struct SaturatedElement: Equatable, Sendable {
  public var flatIndex: Int
  public var storedValue: Double

  public init(flatIndex: Int, storedValue: Double) {
    self.flatIndex = flatIndex
    self.storedValue = storedValue
  }
}

/// An array read from a `.npy` file: its values as a `Float` tensor and the type they were
/// stored in.
public struct NPYArray: Equatable, Sendable {
  public var tensor: Tensor
  public var dtype: NPYDType
  /// The first `<f8` element beyond `Float`'s range, which the tensor holds as
  /// `±Float.greatestFiniteMagnitude`; `nil` when there is none.
  public var firstSaturated: SaturatedElement?

  public init(tensor: Tensor, dtype: NPYDType, firstSaturated: SaturatedElement? = nil) {
    self.tensor = tensor
    self.dtype = dtype
    self.firstSaturated = firstSaturated
  }

  /// The element at row-major position `flat` as the file holds it, for messages: `1e+300` for
  /// a saturated `<f8` value (the first one, which is the first that any scan from the start
  /// reports), `NaN`, `inf` or `-inf`, else the `Float`'s own description.
  public func describeElement(atFlat flat: Int) -> String {
    if let firstSaturated, firstSaturated.flatIndex == flat {
      return "\(firstSaturated.storedValue)"
    }
    let value = tensor.scalars[flat]
    return value.isFinite ? "\(value)" : nonFiniteName(value)
  }
}

/// Reading and writing NumPy `.npy` files.
///
/// The format (numpy's `numpy.lib.format`): the magic `\x93NUMPY`, a major and a minor version
/// byte, the header length (2 bytes little-endian in version 1.0, 4 bytes in 2.0 and 3.0), the
/// header, then the raw elements. The header is a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`, padded with spaces and ending
/// in a newline; versions 1.0 and 2.0 encode it in Latin-1, 3.0 in UTF-8.
///
/// Accepted: versions 1.0, 2.0 and 3.0; a header with exactly the keys `descr`, `fortran_order`
/// and `shape`, quoted with `'` or `"`; `descr` one of `NPYDType` (little-endian float16, 32 and
/// 64, booleans, and 8- to 64-bit integers); `fortran_order`
/// `False`; `shape` a tuple of non-negative integers (`()` is a scalar, `(n,)` a vector; the `L`
/// suffix of files written under Python 2 is allowed); data of exactly the size the shape says.
///
/// Rejected, each with an `AttentionError.file` naming the file: a bad magic or version, a header
/// length past the end of the file, a header that is not such a dict (missing, unknown or repeated
/// keys, other values), big-endian or other dtypes, Fortran order, negative dimensions, shapes
/// whose byte size overflows, data shorter or longer than the shape needs (a longer file is as
/// likely a wrong header as harmless trailing bytes, so it is refused), and bool bytes other than
/// 0 and 1.
///
/// Nothing is allocated before the sizes in the header have been checked against the file's size.
public enum NPY {
  /// Reads the `.npy` file (or pipe) at `path`, straight into the tensor's buffer. `maxBytes`
  /// bounds the tensor's `Float` bytes, checked before anything is allocated (default: the
  /// machine's physical memory); a larger file is an `AttentionError.memoryBudget`.
  public static func read(contentsOf path: String, maxBytes: Int? = nil) throws -> NPYArray {
    try read(from: ByteSource(path: path), maxBytes: maxBytes)
  }

  /// Decodes the bytes of a `.npy` file; `source` names it in error messages.
  public static func decode(_ bytes: [UInt8], source: String) throws -> NPYArray {
    try read(from: ByteSource(bytes: bytes, name: source), maxBytes: nil)
  }

  static func read(from source: ByteSource, maxBytes: Int?) throws -> NPYArray {
    let layout = try NPYLayout(reading: source)
    try layout.checkBudget(elementSize: MemoryLayout<Float>.stride, maxBytes: maxBytes)
    let (scalars, firstSaturated) = try layout.readFloats(from: source)
    try layout.checkEnd(of: source)
    return NPYArray(
      tensor: Tensor(validShape: layout.shape, scalars: scalars), dtype: layout.dtype,
      firstSaturated: firstSaturated)
  }

  /// Reads the `.npy` file at `path` at full precision: `<f8` values exactly, the others widened
  /// to `Double`. The same checks as `read`.
  public static func readDoubles(contentsOf path: String) throws -> (shape: [Int], values: [Double])
  {
    try readDoubles(from: ByteSource(path: path))
  }

  /// `decode`, keeping `<f8` data as `Double` (for float64 references, which `Float` would round).
  public static func decodeDoubles(
    _ bytes: [UInt8], source: String
  ) throws -> (shape: [Int], values: [Double]) {
    try readDoubles(from: ByteSource(bytes: bytes, name: source))
  }

  static func readDoubles(from source: ByteSource) throws -> (shape: [Int], values: [Double]) {
    let layout = try NPYLayout(reading: source)
    try layout.checkBudget(elementSize: MemoryLayout<Double>.stride, maxBytes: nil)
    let values: [Double]
    if layout.dtype == .float64 {
      values = try readElements(
        layout.count, stride: 8, from: source, direct: isLittleEndianHost,
        truncated: layout.truncated
      ) { raw, out, _ in
        for i in 0..<out.count {
          out[i] = Double(
            bitPattern: UInt64(
              littleEndian: raw.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)))
        }
      }
    } else {
      values = try layout.readFloats(from: source).scalars.map(Double.init)
    }
    try layout.checkEnd(of: source)
    return (layout.shape, values)
  }

  /// Writes `tensor` to `path` as `<f4` (see `encode`), atomically (see `writeAtomically`).
  public static func write(_ tensor: Tensor, to path: String) throws {
    try writeAtomically(encode(tensor), to: path)
  }

  /// The bytes `np.save` writes for `tensor` as a C-order `float32` array (or `float16` /
  /// `float64` with `dtype`, rounded to nearest even).
  ///
  /// Version 1.0 (2.0 only if the header outgrows 65535 bytes, as numpy does), with numpy's
  /// header: keys sorted, the spare spaces it leaves for growing the first axis, and padding that
  /// makes the data start at a multiple of 64 bytes so it can be memory-mapped aligned.
  public static func encode(_ tensor: Tensor, dtype: NPYDType = .float32) -> [UInt8] {
    let stored: StoredFloat
    switch dtype {
    case .float16: stored = .f16
    case .float64: stored = .f64
    default: stored = .f32
    }
    let descr = stored == .f16 ? "<f2" : stored == .f64 ? "<f8" : "<f4"
    var dict =
      "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(pythonTuple(tensor.shape)), }"
    if let first = tensor.shape.first {
      // numpy's GROWTH_AXIS_MAX_DIGITS = 21: room to rewrite the first dimension in place.
      dict += String(repeating: " ", count: max(0, 21 - String(first).count))
    }
    let headerBytes = Array(dict.utf8)
    var out: [UInt8] = [0x93] + Array("NUMPY".utf8)
    // The header is ASCII, followed by padding spaces and one newline.
    let withNewline = headerBytes.count + 1
    let padding1 = 64 - (10 + withNewline) % 64
    if withNewline + padding1 <= Int(UInt16.max) {
      let length = withNewline + padding1
      out += [1, 0, UInt8(length & 0xFF), UInt8(length >> 8)]
      out += headerBytes + [UInt8](repeating: 0x20, count: padding1) + [0x0A]
    } else {
      let padding2 = 64 - (12 + withNewline) % 64
      let length = withNewline + padding2
      out += [2, 0] + (0..<4).map { UInt8(truncatingIfNeeded: length >> (8 * $0)) }
      out += headerBytes + [UInt8](repeating: 0x20, count: padding2) + [0x0A]
    }
    appendLittleEndian(tensor.scalars, as: stored, to: &out)
    return out
  }
}

/// A shape as Python prints a tuple: `()`, `(3,)`, `(2, 3)`.
private func pythonTuple(_ shape: [Int]) -> String {
  switch shape.count {
  case 0: return "()"
  case 1: return "(\(shape[0]),)"
  default: return "(" + shape.map(String.init).joined(separator: ", ") + ")"
  }
}
