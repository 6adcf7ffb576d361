import AttentionKit
import Foundation

/// One verification the CLI performs on a result: a name for JSON, a sentence for people, and the
/// measured figure that decided it.
struct Check: Sendable {
  var name: String
  var title: String
  var passed: Bool
  var detail: String
}

/// Failing checks end the run with exit code 1 after the report is printed.
struct ChecksFailed: Error, CustomStringConvertible {
  var names: [String]
  var description: String { "verification failed: \(names.joined(separator: ", "))" }
}

extension Array where Element == Check {
  var allPassed: Bool { allSatisfy(\.passed) }
  var dictionary: [String: Bool] {
    Dictionary(map { ($0.name, $0.passed) }, uniquingKeysWith: { $0 && $1 })
  }

  /// The checks as text lines, `✓`/`✗` first.
  func report() -> String {
    let width = map(\.title.count).max() ?? 0
    return map { check in
      let mark = check.passed ? "✓" : "✗"
      let padding = String(repeating: " ", count: width - check.title.count)
      return "  \(mark) \(check.title)\(padding)  \(check.detail)"
    }.joined(separator: "\n")
  }
}

/// Scientific notation with three significant digits, for error figures.
func sci(_ value: Double) -> String {
  value.isFinite ? String(format: "%.2e", value) : "\(value)"
}
