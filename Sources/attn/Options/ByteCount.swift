import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// A byte count with an optional binary suffix: `1048576`, `512K`, `512M`, `4G`, `1T`.
struct ByteCount: Equatable {
  var bytes: Int

  /// The accepted range: at least one byte (`0.1` would otherwise become a budget that nothing
  /// fits), at most 1 PiB (far beyond any machine, and far from overflowing a byte count).
  static let range = 1...(1 << 50)

  /// Parses `--max-memory`; a value out of range or not a number is a usage error that says what
  /// is accepted.
  static func parse(_ argument: String) throws -> ByteCount {
    let text = argument.trimmingCharacters(in: .whitespaces).uppercased()
      .replacingOccurrences(of: "IB", with: "").replacingOccurrences(of: "B", with: "")
    let suffixes: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    var digits = Substring(text)
    var multiplier = 1
    if let last = text.last, let factor = suffixes[last] {
      multiplier = factor
      digits = text.dropLast()
    }
    guard let value = Double(digits), value.isFinite,
      value * Double(multiplier) >= Double(range.lowerBound),
      value * Double(multiplier) <= Double(range.upperBound)
    else {
      throw ValidationError(
        "--max-memory must be a byte count from 1 byte to 1024T, such as 512M or 4G; "
          + "got \(quotedForMessage(argument))")
    }
    return ByteCount(bytes: Int(value * Double(multiplier)))
  }
}
