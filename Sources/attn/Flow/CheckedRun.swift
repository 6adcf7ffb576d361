import AttentionKit
import AttentionVerification
import TensorIO

/// The end every checked subcommand shares, in this order: its outputs are written only when
/// every check passed (all staged, then renamed together: `writeOutputs`), the report is printed
/// as text or JSON, and a failed check ends the run with exit 1 (`ChecksFailed`), after the
/// report has said which check failed and where.
///
/// A subcommand parses, loads, calls the libraries and then hands its checks, its files and its
/// two report forms to `finish`; it never writes a file or decides the exit code itself.
struct CheckedRun {
  /// The checks, in the groups the text report lists them under ("Checks", "Gradient checks").
  var groups: [(title: String, checks: [Check])]
  /// The files to write when every check passed; a `nil` path is skipped.
  var outputs: [(path: String?, bytes: () throws -> [UInt8])] = []
  /// The text report's last line, verified or not.
  var verdict = Verdict.plain

  struct Verdict {
    var passed: String
    var failed: String
    static let plain = Verdict(passed: "Verified.", failed: "NOT verified.")
  }

  init(
    checks: [Check], outputs: [(path: String?, bytes: () throws -> [UInt8])] = [],
    verdict: Verdict = .plain
  ) {
    self.init(groups: [("Checks", checks)], outputs: outputs, verdict: verdict)
  }

  init(
    groups: [(title: String, checks: [Check])],
    outputs: [(path: String?, bytes: () throws -> [UInt8])] = [], verdict: Verdict = .plain
  ) {
    self.groups = groups
    self.outputs = outputs
    self.verdict = verdict
  }

  var checks: [Check] { groups.flatMap(\.checks) }
  var verified: Bool { checks.allPassed }

  /// Writes the outputs if verified, prints `json` or (`text`, then the checks and the verdict),
  /// and throws `ChecksFailed` when a check failed. `text` prints what the run computed; the
  /// checks follow it.
  func finish<Report: Encodable>(
    format: OutputFormat, json: () throws -> Report, text: () throws -> Void
  ) throws {
    if verified { try writeOutputs(outputs) }
    switch format {
    case .json: try printJSON(json())
    case .text:
      try text()
      for group in groups where !group.checks.isEmpty {
        print("\n\(group.title):")
        print(group.checks.report())
        for check in group.checks where !check.passed {
          if let worst = check.measurement?.worstDescription { print("  worst: \(worst)") }
        }
      }
      print("\n" + (verified ? verdict.passed : verdict.failed))
    }
    try checks.requireAllPassed()
  }
}

/// `CheckedRun`'s outputs for tensors saved as float32 `.npy`; a `nil` tensor is skipped.
func npyOutputs(_ files: [(path: String?, tensor: Tensor?)]) -> [(
  path: String?, bytes: () throws -> [UInt8]
)] {
  files.map { file in
    (path: file.tensor == nil ? nil : file.path, bytes: { NPY.encode(file.tensor!) })
  }
}
