import Tensors

/// A small, strict JSON parser for file headers (safetensors), written for hostile input.
///
/// Why not Foundation's `JSONSerialization`: it keeps the last of two equal keys and drops the
/// other silently, and a safetensors header that names one tensor twice must be rejected. This
/// parser also keeps members in file order, bounds its recursion depth, and never trusts a length.
///
/// It accepts exactly RFC 8259 JSON: one value surrounded by optional whitespace. It rejects
/// duplicate keys in any object (keys are compared as Swift `String`s, that is under Unicode
/// canonical equivalence, because the parsed keys end up as `String` dictionary keys), raw control
/// characters in strings, lone UTF-16 surrogates in `\u` escapes, leading zeros, and nesting deeper
/// than `HeaderJSON.maxDepth`. Numbers are kept as their literal text so that integers of any size
/// are reported exactly rather than rounded through `Double`.
enum JSONValue: Equatable, Sendable {
  case null
  case bool(Bool)
  /// The literal text of a number, already checked against the JSON number grammar.
  case number(String)
  case string(String)
  case array([JSONValue])
  /// The members in file order; keys are unique.
  case object([JSONMember])

  /// The value as an `Int`, when it is an integer literal (no fraction, no exponent) that fits.
  var intValue: Int? {
    guard case .number(let text) = self else { return nil }
    guard !text.contains(where: { $0 == "." || $0 == "e" || $0 == "E" }) else { return nil }
    return Int(text)
  }

  /// A short name of the value's kind, for error messages.
  var kindName: String {
    switch self {
    case .null: return "null"
    case .bool: return "a boolean"
    case .number: return "a number"
    case .string: return "a string"
    case .array: return "an array"
    case .object: return "an object"
    }
  }
}

/// One `"key": value` pair of a JSON object.
struct JSONMember: Equatable, Sendable {
  var key: String
  var value: JSONValue
}

/// Why a header is not acceptable JSON; `offset` is a byte offset into the parsed text.
enum HeaderJSONError: Error, Equatable, CustomStringConvertible {
  case syntax(String, offset: Int)
  /// An object has the key twice; `depth` is 1 for the outermost object.
  case duplicateKey(String, depth: Int, offset: Int)
  case tooDeep(offset: Int)

  var description: String {
    switch self {
    case .syntax(let what, let offset):
      return "\(what) at byte \(offset)"
    case .duplicateKey(let key, _, let offset):
      return "duplicate key \(quotedForMessage(key)) at byte \(offset)"
    case .tooDeep(let offset):
      return "nested deeper than \(HeaderJSON.maxDepth) levels at byte \(offset)"
    }
  }
}

enum HeaderJSON {
  /// Arrays and objects nested deeper than this are rejected, which bounds the recursion (and so
  /// the stack) whatever the input. Real headers nest three levels.
  static let maxDepth = 64

  /// Parses `bytes` as one JSON value. Invalid UTF-8 inside strings is replaced (callers that
  /// care check UTF-8 validity first); nothing in the input can make this trap.
  static func parse(_ bytes: [UInt8]) throws(HeaderJSONError) -> JSONValue {
    var parser = Parser(bytes: bytes)
    parser.skipWhitespace()
    let value = try parser.parseValue(depth: 0)
    parser.skipWhitespace()
    guard parser.position == bytes.count else {
      throw .syntax(
        "unexpected \(parser.describeCurrent()) after the value", offset: parser.position)
    }
    return value
  }

  private struct Parser {
    let bytes: [UInt8]
    var position = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    var current: UInt8? { position < bytes.count ? bytes[position] : nil }

    func describeCurrent() -> String {
      guard let byte = current else { return "end of header" }
      if byte >= 0x21 && byte < 0x7F { return "'\(Character(Unicode.Scalar(byte)))'" }
      return "byte 0x\(String(byte, radix: 16))"
    }

    mutating func skipWhitespace() {
      while let byte = current, byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D {
        position += 1
      }
    }

    mutating func expect(_ byte: UInt8, _ what: String) throws(HeaderJSONError) {
      guard current == byte else {
        throw .syntax("expected \(what) but found \(describeCurrent())", offset: position)
      }
      position += 1
    }

    mutating func parseValue(depth: Int) throws(HeaderJSONError) -> JSONValue {
      guard let byte = current else {
        throw .syntax("expected a value but found end of header", offset: position)
      }
      switch byte {
      case UInt8(ascii: "{"): return try parseObject(depth: depth + 1)
      case UInt8(ascii: "["): return try parseArray(depth: depth + 1)
      case UInt8(ascii: "\""): return .string(try parseString())
      case UInt8(ascii: "t"):
        try parseLiteral("true")
        return .bool(true)
      case UInt8(ascii: "f"):
        try parseLiteral("false")
        return .bool(false)
      case UInt8(ascii: "n"):
        try parseLiteral("null")
        return .null
      case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
      default:
        throw .syntax("expected a value but found \(describeCurrent())", offset: position)
      }
    }

    mutating func parseLiteral(_ word: StaticString) throws(HeaderJSONError) {
      let start = position
      let utf8 = UnsafeBufferPointer(start: word.utf8Start, count: word.utf8CodeUnitCount)
      for expected in utf8 {
        guard current == expected else {
          throw .syntax("invalid literal (expected '\(word)')", offset: start)
        }
        position += 1
      }
    }

    mutating func parseObject(depth: Int) throws(HeaderJSONError) -> JSONValue {
      guard depth <= HeaderJSON.maxDepth else { throw .tooDeep(offset: position) }
      position += 1  // '{'
      var members: [JSONMember] = []
      var seen: Set<String> = []
      skipWhitespace()
      if current == UInt8(ascii: "}") {
        position += 1
        return .object(members)
      }
      while true {
        skipWhitespace()
        let keyOffset = position
        guard current == UInt8(ascii: "\"") else {
          throw .syntax("expected a string key but found \(describeCurrent())", offset: position)
        }
        let key = try parseString()
        guard seen.insert(key).inserted else {
          throw .duplicateKey(key, depth: depth, offset: keyOffset)
        }
        skipWhitespace()
        try expect(UInt8(ascii: ":"), "':'")
        skipWhitespace()
        let value = try parseValue(depth: depth)
        members.append(JSONMember(key: key, value: value))
        skipWhitespace()
        if current == UInt8(ascii: ",") {
          position += 1
          continue
        }
        try expect(UInt8(ascii: "}"), "',' or '}'")
        return .object(members)
      }
    }

    mutating func parseArray(depth: Int) throws(HeaderJSONError) -> JSONValue {
      guard depth <= HeaderJSON.maxDepth else { throw .tooDeep(offset: position) }
      position += 1  // '['
      var elements: [JSONValue] = []
      skipWhitespace()
      if current == UInt8(ascii: "]") {
        position += 1
        return .array(elements)
      }
      while true {
        skipWhitespace()
        elements.append(try parseValue(depth: depth))
        skipWhitespace()
        if current == UInt8(ascii: ",") {
          position += 1
          continue
        }
        try expect(UInt8(ascii: "]"), "',' or ']'")
        return .array(elements)
      }
    }

    /// Parses a number and keeps its text: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    mutating func parseNumber() throws(HeaderJSONError) -> JSONValue {
      let start = position
      if current == UInt8(ascii: "-") { position += 1 }
      guard let first = current, isDigit(first) else {
        throw .syntax("expected a digit in number", offset: position)
      }
      position += 1
      if first == UInt8(ascii: "0"), let next = current, isDigit(next) {
        throw .syntax("leading zero in number", offset: start)
      }
      skipDigits()
      if current == UInt8(ascii: ".") {
        position += 1
        guard let digit = current, isDigit(digit) else {
          throw .syntax("expected a digit after '.'", offset: position)
        }
        skipDigits()
      }
      if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
        position += 1
        if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { position += 1 }
        guard let digit = current, isDigit(digit) else {
          throw .syntax("expected a digit in exponent", offset: position)
        }
        skipDigits()
      }
      // The slice is ASCII digits and signs only, so decoding cannot fail or change it.
      return .number(String(decoding: bytes[start..<position], as: UTF8.self))
    }

    func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

    mutating func skipDigits() {
      while let byte = current, isDigit(byte) { position += 1 }
    }

    mutating func parseString() throws(HeaderJSONError) -> String {
      let start = position
      position += 1  // opening quote
      var utf8: [UInt8] = []
      while true {
        guard let byte = current else {
          throw .syntax("unterminated string", offset: start)
        }
        position += 1
        switch byte {
        case UInt8(ascii: "\""):
          return String(decoding: utf8, as: UTF8.self)
        case UInt8(ascii: "\\"):
          try parseEscape(into: &utf8)
        case 0x00..<0x20:
          throw .syntax(
            "raw control character 0x\(String(byte, radix: 16)) in string",
            offset: position - 1)
        default:
          utf8.append(byte)
        }
      }
    }

    mutating func parseEscape(into utf8: inout [UInt8]) throws(HeaderJSONError) {
      guard let byte = current else { throw .syntax("unterminated escape", offset: position) }
      let escapeOffset = position - 1
      position += 1
      switch byte {
      case UInt8(ascii: "\""): utf8.append(0x22)
      case UInt8(ascii: "\\"): utf8.append(0x5C)
      case UInt8(ascii: "/"): utf8.append(0x2F)
      case UInt8(ascii: "b"): utf8.append(0x08)
      case UInt8(ascii: "f"): utf8.append(0x0C)
      case UInt8(ascii: "n"): utf8.append(0x0A)
      case UInt8(ascii: "r"): utf8.append(0x0D)
      case UInt8(ascii: "t"): utf8.append(0x09)
      case UInt8(ascii: "u"):
        var code = UInt32(try parseHex4())
        if (0xD800..<0xDC00).contains(code) {
          // A high surrogate must be followed by an escaped low surrogate.
          guard current == UInt8(ascii: "\\") else {
            throw .syntax("lone UTF-16 surrogate in \\u escape", offset: escapeOffset)
          }
          position += 1
          guard current == UInt8(ascii: "u") else {
            throw .syntax("lone UTF-16 surrogate in \\u escape", offset: escapeOffset)
          }
          position += 1
          let low = UInt32(try parseHex4())
          guard (0xDC00..<0xE000).contains(low) else {
            throw .syntax("lone UTF-16 surrogate in \\u escape", offset: escapeOffset)
          }
          code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        } else if (0xDC00..<0xE000).contains(code) {
          throw .syntax("lone UTF-16 surrogate in \\u escape", offset: escapeOffset)
        }
        guard let scalar = Unicode.Scalar(code) else {
          throw .syntax("invalid \\u escape", offset: escapeOffset)
        }
        utf8.append(contentsOf: String(scalar).utf8)
      default:
        throw .syntax("invalid escape \(describeEscape(byte))", offset: escapeOffset)
      }
    }

    func describeEscape(_ byte: UInt8) -> String {
      if byte >= 0x21 && byte < 0x7F { return "'\\\(Character(Unicode.Scalar(byte)))'" }
      return "'\\' followed by byte 0x\(String(byte, radix: 16))"
    }

    mutating func parseHex4() throws(HeaderJSONError) -> UInt16 {
      var value: UInt16 = 0
      for _ in 0..<4 {
        guard let byte = current, let digit = hexValue(byte) else {
          throw .syntax("expected four hex digits in \\u escape", offset: position)
        }
        value = value << 4 | UInt16(digit)
        position += 1
      }
      return value
    }

    func hexValue(_ byte: UInt8) -> UInt8? {
      switch byte {
      case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
      case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
      case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
      default: return nil
      }
    }
  }
}
