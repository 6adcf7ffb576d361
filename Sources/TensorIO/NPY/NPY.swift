import Tensors

/// The element types AttentionKit reads from `.npy` files; all become `Float` in the tensor.
public enum NPYDType: String, Sendable, Equatable, CaseIterable {
  /// `<f4`: little-endian binary32, read as is.
  case float32 = "<f4"
  /// `<f8`: little-endian binary64, rounded to the nearest `Float` (beyond `Float`'s range: ±inf).
  case float64 = "<f8"
  /// `|b1`: one byte per element, 0 or 1, read as 0.0 or 1.0.
  case bool = "|b1"

  /// The numpy type descriptor, as written in the header.
  public var descr: String { rawValue }

  var itemSize: Int {
    switch self {
    case .float32: return 4
    case .float64: return 8
    case .bool: return 1
    }
  }
}

/// An array read from a `.npy` file: its values as a `Float` tensor and the type they were
/// stored in.
public struct NPYArray: Equatable, Sendable {
  public var tensor: Tensor
  public var dtype: NPYDType

  public init(tensor: Tensor, dtype: NPYDType) {
    self.tensor = tensor
    self.dtype = dtype
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
/// and `shape`, quoted with `'` or `"`; `descr` `'<f4'`, `'<f8'` or `'|b1'`; `fortran_order`
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
  /// Reads the `.npy` file at `path`.
  public static func read(contentsOf path: String) throws -> NPYArray {
    try decode(readFileBytes(atPath: path), source: path)
  }

  /// Decodes the bytes of a `.npy` file; `source` names it in error messages.
  public static func decode(_ bytes: [UInt8], source: String) throws -> NPYArray {
    func fail(_ message: String) -> AttentionError { .file(path: source, message: message) }

    let magic: [UInt8] = [0x93] + Array("NUMPY".utf8)
    guard bytes.count >= 8, Array(bytes[0..<6]) == magic else {
      throw fail("not an .npy file (it does not start with \\x93NUMPY)")
    }
    let version = (bytes[6], bytes[7])
    let lengthSize: Int
    switch version {
    case (1, 0): lengthSize = 2
    case (2, 0), (3, 0): lengthSize = 4
    default:
      throw fail("unsupported .npy version \(version.0).\(version.1) (1.0, 2.0 and 3.0 are read)")
    }
    let headerStart = 8 + lengthSize
    guard bytes.count >= headerStart else {
      throw fail("file ends inside the header length (\(bytes.count) bytes)")
    }
    var headerLength = 0
    for i in 0..<lengthSize { headerLength |= Int(bytes[8 + i]) << (8 * i) }
    // headerLength < 2³², so the sum cannot overflow.
    let dataStart = headerStart + headerLength
    guard dataStart <= bytes.count else {
      throw fail(
        "header length \(headerLength) runs past the end of the file (\(bytes.count) bytes)")
    }

    let header: NPYHeader
    do {
      header = try NPYHeaderParser.parse(Array(bytes[headerStart..<dataStart]))
    } catch {
      throw fail("invalid header: \(error.message)")
    }
    guard !header.fortranOrder else {
      throw fail(
        "Fortran-order arrays are not supported (save a C-order array: np.ascontiguousarray)")
    }
    let dtype: NPYDType
    switch header.descr {
    case "<f4": dtype = .float32
    case "<f8": dtype = .float64
    case "|b1": dtype = .bool
    default:
      let kind = header.descr.hasPrefix(">") ? "big-endian dtype" : "unsupported dtype"
      throw fail("\(kind) \(quotedForMessage(header.descr)) (supported: \"<f4\", \"<f8\", \"|b1\")")
    }

    let shapeText = shapeForMessage(header.shape, python: true)
    guard let count = try? Tensor.elementCount(of: header.shape) else {
      throw fail("shape \(shapeText) has more elements than memory can index")
    }
    let (byteCount, overflow) = count.multipliedReportingOverflow(by: dtype.itemSize)
    guard !overflow else {
      throw fail("shape \(shapeText) of \(dtype.descr) needs more bytes than memory can index")
    }
    let available = bytes.count - dataStart
    guard byteCount == available else {
      let relation = available < byteCount ? "truncated" : "too long"
      throw fail(
        "data \(relation): shape \(shapeText) of \(dtype.descr) needs \(byteCount) bytes"
          + " but the file has \(available) after the header")
    }

    let scalars: [Float]
    switch dtype {
    case .float32, .float64:
      guard
        let decoded = decodeFloats(
          bytes, offset: dataStart, count: count, as: dtype == .float32 ? .f32 : .f64)
      else { throw fail("internal error: data range out of bounds") }
      scalars = decoded
    case .bool:
      var values = [Float](repeating: 0, count: count)
      for i in 0..<count {
        let byte = bytes[dataStart + i]
        guard byte <= 1 else {
          throw fail("bool element \(i) is stored as byte \(byte), not 0 or 1")
        }
        values[i] = Float(byte)
      }
      scalars = values
    }
    return NPYArray(tensor: Tensor(validShape: header.shape, scalars: scalars), dtype: dtype)
  }

  /// Reads the `.npy` file at `path` at full precision: `<f8` values exactly, `<f4` and `|b1`
  /// widened to `Double`. The same checks as `read`.
  public static func readDoubles(contentsOf path: String) throws -> (shape: [Int], values: [Double]) {
    try decodeDoubles(readFileBytes(atPath: path), source: path)
  }

  /// `decode`, keeping `<f8` data as `Double` (for float64 references, which `Float` would round).
  public static func decodeDoubles(
    _ bytes: [UInt8], source: String
  ) throws -> (shape: [Int], values: [Double]) {
    let array = try decode(bytes, source: source)
    let count = array.tensor.count
    guard array.dtype == .float64 else {
      return (array.tensor.shape, array.tensor.scalars.map(Double.init))
    }
    // `decode` checked that the data fills the file to its end.
    let start = bytes.count - 8 * count
    var values = [Double](repeating: 0, count: count)
    for e in 0..<count {
      var bits: UInt64 = 0
      for b in 0..<8 { bits |= UInt64(bytes[start + 8 * e + b]) << (8 * b) }
      values[e] = Double(bitPattern: bits)
    }
    return (array.tensor.shape, values)
  }

  /// Writes `tensor` to `path` as `<f4` (see `encode`), atomically (see `writeAtomically`).
  public static func write(_ tensor: Tensor, to path: String) throws {
    try writeAtomically(encode(tensor), to: path)
  }

  /// The bytes `np.save` writes for `tensor` as a C-order `float32` array.
  ///
  /// Version 1.0 (2.0 only if the header outgrows 65535 bytes, as numpy does), with numpy's
  /// header: keys sorted, the spare spaces it leaves for growing the first axis, and padding that
  /// makes the data start at a multiple of 64 bytes so it can be memory-mapped aligned.
  public static func encode(_ tensor: Tensor) -> [UInt8] {
    var dict = "{'descr': '<f4', 'fortran_order': False, 'shape': \(pythonTuple(tensor.shape)), }"
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
    appendLittleEndian(tensor.scalars, to: &out)
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

private struct NPYHeader {
  var descr: String
  var fortranOrder: Bool
  var shape: [Int]
}

private struct NPYHeaderError: Error {
  var message: String
}

/// Parses the header dict: `{` key `:` value (`,` key `:` value)* `,`? `}` then only whitespace,
/// where keys are strings and values are strings, `True`/`False` or tuples of integers. This is
/// the subset of Python literal syntax numpy writes; anything else is refused rather than guessed.
private struct NPYHeaderParser {
  enum Value {
    case string(String)
    case bool(Bool)
    case tuple([Int])
  }

  let bytes: [UInt8]
  var position = 0

  static func parse(_ bytes: [UInt8]) throws(NPYHeaderError) -> NPYHeader {
    var parser = NPYHeaderParser(bytes: bytes)
    let entries = try parser.parseDict()
    var descr: String?
    var fortranOrder: Bool?
    var shape: [Int]?
    for (key, value) in entries {
      switch (key, value) {
      case ("descr", .string(let text)): descr = text
      case ("descr", _): throw NPYHeaderError(message: "'descr' is not a simple dtype string")
      case ("fortran_order", .bool(let flag)): fortranOrder = flag
      case ("fortran_order", _):
        throw NPYHeaderError(message: "'fortran_order' is not True or False")
      case ("shape", .tuple(let dims)): shape = dims
      case ("shape", _): throw NPYHeaderError(message: "'shape' is not a tuple")
      default: throw NPYHeaderError(message: "unexpected key \(quotedForMessage(key))")
      }
    }
    guard let descr, let fortranOrder, let shape else {
      let missing = [
        ("descr", descr == nil), ("fortran_order", fortranOrder == nil),
        ("shape", shape == nil),
      ].filter(\.1).map { "'\($0.0)'" }
      throw NPYHeaderError(message: "missing key \(missing.joined(separator: ", "))")
    }
    return NPYHeader(descr: descr, fortranOrder: fortranOrder, shape: shape)
  }

  var current: UInt8? { position < bytes.count ? bytes[position] : nil }

  func error(_ what: String) -> NPYHeaderError {
    NPYHeaderError(message: "\(what) at byte \(position) of the header")
  }

  mutating func skipWhitespace() {
    // Space, tab, newline, carriage return, form feed: what Python allows between tokens here.
    while let byte = current, byte == 0x20 || (0x09...0x0D).contains(byte) && byte != 0x0B {
      position += 1
    }
  }

  mutating func expect(_ byte: UInt8) throws(NPYHeaderError) {
    guard current == byte else {
      throw error("expected '\(Character(Unicode.Scalar(byte)))'")
    }
    position += 1
  }

  mutating func parseDict() throws(NPYHeaderError) -> [(String, Value)] {
    skipWhitespace()
    try expect(UInt8(ascii: "{"))
    var entries: [(String, Value)] = []
    var seen: Set<String> = []
    while true {
      skipWhitespace()
      if current == UInt8(ascii: "}") { break }
      let key = try parseString()
      guard seen.insert(key).inserted else {
        throw NPYHeaderError(message: "key \(quotedForMessage(key)) appears twice")
      }
      skipWhitespace()
      try expect(UInt8(ascii: ":"))
      skipWhitespace()
      entries.append((key, try parseValue()))
      skipWhitespace()
      if current == UInt8(ascii: ",") {
        position += 1
        continue
      }
      guard current == UInt8(ascii: "}") else { throw error("expected ',' or '}'") }
    }
    position += 1  // '}'
    skipWhitespace()
    guard position == bytes.count else { throw error("unexpected text after the dict") }
    return entries
  }

  mutating func parseValue() throws(NPYHeaderError) -> Value {
    switch current {
    case UInt8(ascii: "'"), UInt8(ascii: "\""): return .string(try parseString())
    case UInt8(ascii: "("): return .tuple(try parseTuple())
    case UInt8(ascii: "T"):
      try parseWord("True")
      return .bool(true)
    case UInt8(ascii: "F"):
      try parseWord("False")
      return .bool(false)
    default: throw error("expected a string, True, False or a tuple")
    }
  }

  mutating func parseWord(_ word: String) throws(NPYHeaderError) {
    for expected in word.utf8 {
      guard current == expected else { throw error("expected \(word)") }
      position += 1
    }
    // `Truex` is a name, not `True`.
    if let next = current, isIdentifierByte(next) { throw error("expected \(word)") }
  }

  func isIdentifierByte(_ byte: UInt8) -> Bool {
    (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
      || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
      || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "_")
      || byte >= 0x80
  }

  /// A quoted string without escapes (numpy's keys and simple descrs never have any).
  mutating func parseString() throws(NPYHeaderError) -> String {
    guard let quote = current, quote == UInt8(ascii: "'") || quote == UInt8(ascii: "\"") else {
      throw error("expected a quoted string")
    }
    let start = position + 1
    position += 1
    while let byte = current, byte != quote {
      guard byte != UInt8(ascii: "\\"), byte != 0x0A, byte != 0x0D else {
        throw error("unsupported character in string")
      }
      position += 1
    }
    guard current == quote else { throw error("unterminated string") }
    // Only ASCII can match a supported descr or key; other bytes just make an unknown name.
    let text = String(decoding: bytes[start..<position], as: UTF8.self)
    position += 1
    return text
  }

  /// `()`, `(n,)`, `(n, m)`, `(n, m,)`; `(n)` is a parenthesized int in Python, not a tuple.
  mutating func parseTuple() throws(NPYHeaderError) -> [Int] {
    position += 1  // '('
    var dims: [Int] = []
    var sawComma = false
    while true {
      skipWhitespace()
      if current == UInt8(ascii: ")") { break }
      dims.append(try parseDimension())
      skipWhitespace()
      if current == UInt8(ascii: ",") {
        sawComma = true
        position += 1
        continue
      }
      guard current == UInt8(ascii: ")") else { throw error("expected ',' or ')' in shape") }
    }
    position += 1  // ')'
    guard dims.count != 1 || sawComma else {
      throw NPYHeaderError(message: "'shape' is not a tuple")
    }
    return dims
  }

  mutating func parseDimension() throws(NPYHeaderError) -> Int {
    var negative = false
    if current == UInt8(ascii: "-") || current == UInt8(ascii: "+") {
      negative = current == UInt8(ascii: "-")
      position += 1
      skipWhitespace()
    }
    let digitsStart = position
    while let byte = current, byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") {
      position += 1
    }
    guard position > digitsStart else { throw error("expected an integer in shape") }
    let digits = String(decoding: bytes[digitsStart..<position], as: UTF8.self)
    // Python 2 wrote longs with an `L` suffix; numpy still reads such files.
    if current == UInt8(ascii: "L") || current == UInt8(ascii: "l") { position += 1 }
    if let next = current, isIdentifierByte(next) || next == UInt8(ascii: ".") {
      throw error("expected an integer in shape")
    }
    guard !negative || digits.allSatisfy({ $0 == "0" }) else {
      // Cut short: a hostile header can hold a dimension millions of digits long.
      let shown = digits.count > 40 ? digits.prefix(40) + "…" : digits
      throw NPYHeaderError(message: "negative dimension -\(shown) in shape")
    }
    guard let value = Int(digits) else {
      throw NPYHeaderError(message: "dimension \(quotedForMessage(digits)) in shape is too large")
    }
    return value
  }
}
