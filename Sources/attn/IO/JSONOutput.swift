import Foundation

/// Prints an `Encodable` value as pretty JSON with sorted keys (stable for scripts and diffs).
/// Swift's camelCase property names become the snake_case keys the reports document.
func printJSON<Value: Encodable>(_ value: Value) throws {
  let encoder = JSONEncoder()
  encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
  encoder.keyEncodingStrategy = .convertToSnakeCase
  encoder.nonConformingFloatEncodingStrategy = .convertToString(
    positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
  let data = try encoder.encode(value)
  print(String(decoding: data, as: UTF8.self))
}

/// A number a JSON report always carries: `null` where there is none (or it is not finite),
/// rather than leaving the key out as an optional would.
struct NullableNumber: Encodable {
  var value: Double?

  init(_ value: Double?) { self.value = value }

  func encode(to encoder: any Encoder) throws {
    var container = encoder.singleValueContainer()
    if let value, value.isFinite { try container.encode(value) } else { try container.encodeNil() }
  }
}
