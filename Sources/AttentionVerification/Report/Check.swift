import Foundation

/// One verification of a result: a stable name (for JSON and scripts), a sentence for people, the
/// verdict, the measured figure that decided it, and — for checks that compare a tensor element
/// by element — where the worst element is.
public struct Check: Sendable, Equatable {
  /// A stable identifier: `matches_reference`, `weights_sum_to_one`, …
  public var name: String
  /// What is checked, in words: "rows match the float64 reference kernel".
  public var title: String
  public var passed: Bool
  /// The figure that decided it, in words: "16 rows, worst error / bound = 0.056".
  public var detail: String
  /// For element-wise comparisons: the tensor, the rows checked, the worst ratio and its place.
  public var measurement: ErrorMeasurement?

  public init(
    name: String, title: String, passed: Bool, detail: String,
    measurement: ErrorMeasurement? = nil
  ) {
    self.name = name
    self.title = title
    self.passed = passed
    self.detail = detail
    self.measurement = measurement
  }

  /// A comparison of `measurement` (passed when its worst ratio is at most 1); `detail` is
  /// "N rows, worst error / bound = r at [i, j, …]" followed by `note`.
  public init(name: String, title: String, measurement: ErrorMeasurement, note: String = "") {
    self.init(
      name: name, title: title, passed: measurement.passed,
      detail: measurement.summary + note, measurement: measurement)
  }
}

/// Checks that failed: the error a command throws after reporting them.
public struct ChecksFailed: Error, CustomStringConvertible, Sendable {
  public var names: [String]
  public init(names: [String]) { self.names = names }
  public var description: String { "verification failed: \(names.joined(separator: ", "))" }
}

extension Array where Element == Check {
  public var allPassed: Bool { allSatisfy(\.passed) }

  /// `name → passed`, for JSON reports.
  public var dictionary: [String: Bool] {
    Dictionary(map { ($0.name, $0.passed) }, uniquingKeysWith: { $0 && $1 })
  }

  /// The checks as text lines, `✓`/`✗` first, the details aligned.
  public func report() -> String {
    let width = map(\.title.count).max() ?? 0
    return map { check in
      let mark = check.passed ? "✓" : "✗"
      let padding = String(repeating: " ", count: width - check.title.count)
      return "  \(mark) \(check.title)\(padding)  \(check.detail)"
    }.joined(separator: "\n")
  }

  /// Throws `ChecksFailed` naming the failed checks, if any.
  public func requireAllPassed() throws {
    let failed = filter { !$0.passed }.map(\.name)
    if !failed.isEmpty { throw ChecksFailed(names: failed) }
  }
}

/// Scientific notation with three significant digits, for error figures.
public func scientific(_ value: Double) -> String {
  value.isFinite ? String(format: "%.2e", value) : "\(value)"
}
