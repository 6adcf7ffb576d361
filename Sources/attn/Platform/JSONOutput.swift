import Foundation

/// Prints an `Encodable` value as pretty JSON with sorted keys (stable for scripts and diffs).
func printJSON<Value: Encodable>(_ value: Value) throws {
  let encoder = JSONEncoder()
  encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
  encoder.nonConformingFloatEncodingStrategy = .convertToString(
    positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
  let data = try encoder.encode(value)
  print(String(decoding: data, as: UTF8.self))
}
