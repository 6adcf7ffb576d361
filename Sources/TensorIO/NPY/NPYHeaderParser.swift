import Tensors

struct NPYHeader {
  var descr: String
  var fortranOrder: Bool
  var shape: [Int]
}

struct NPYHeaderError: Error {
  var message: String
}

/// Parses the header dict: `{` key `:` value (`,` key `:` value)* `,`? `}` then only whitespace,
/// where keys are strings and values are strings, `True`/`False` or tuples of integers. This is
/// the subset of Python literal syntax numpy writes; anything else is refused rather than guessed.
struct NPYHeaderParser {
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
