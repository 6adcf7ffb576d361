import ArgumentParser
import Foundation

/// A byte count with an optional binary suffix: `1048576`, `512K`, `512M`, `4G`, `1T`.
struct ByteCount: ExpressibleByArgument, Equatable {
  var bytes: Int

  init?(argument: String) {
    let text = argument.trimmingCharacters(in: .whitespaces).uppercased()
      .replacingOccurrences(of: "IB", with: "").replacingOccurrences(of: "B", with: "")
    let suffixes: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    var digits = Substring(text)
    var multiplier = 1
    if let last = text.last, let factor = suffixes[last] {
      multiplier = factor
      digits = text.dropLast()
    }
    // At least one byte: "0.1" would otherwise become a budget of 0 that nothing fits.
    guard let value = Double(digits), value.isFinite, value * Double(multiplier) >= 1,
      value * Double(multiplier) < Double(Int.max)
    else { return nil }
    bytes = Int(value * Double(multiplier))
  }
}
