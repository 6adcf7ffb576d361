import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn` and `attn dropout`, run as the built executable: help text, the default run's report,
/// JSON, exit codes (0 success, 1 runtime error, 64 usage error) with one-line errors, and the
/// .npy outputs, checked against the numpy fixtures.
@Suite("attn dropout (the executable)")
struct CLITests {
  @Test("attn --help lists the dropout subcommand")
  func rootHelp() throws {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(["--help"], in: $0) }
    #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    #expect(run.stdout.contains("USAGE: attn <subcommand>"), "\(run.stdout)")
    #expect(run.stdout.contains("SUBCOMMANDS:"), "\(run.stdout)")
    let subcommands = run.stdout.components(separatedBy: "SUBCOMMANDS:").last ?? ""
    #expect(subcommands.contains("dropout"), "dropout missing from: \(subcommands)")
    #expect(run.stdout.contains("attn dropout"), "the discussion names the exercises")
  }

  @Test("attn dropout --help documents every flag")
  func dropoutHelp() throws {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(["dropout", "--help"], in: $0) }
    #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    #expect(run.stdout.contains("USAGE: attn dropout"), "\(run.stdout)")
    for flag in [
      "--p", "--seq-len", "--d-k", "--batch", "--seed", "--eval", "--mask", "--bias", "--q", "--k",
      "--v", "--out", "--weights-out", "--format",
    ] {
      #expect(
        run.stdout.contains(flag + " ") || run.stdout.contains(flag + "\n"), "\(flag) missing")
    }
    #expect(run.stdout.contains("0 = masked"), "the mask convention is stated")
  }

  @Test("Default run: the notebook's shapes and 'Solution verified!'")
  func defaultRun() throws {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(["dropout"], in: $0) }
    #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    let lines = run.stdout.split(separator: "\n").map(String.init)
    for expected in [
      "Output shape: torch.Size([1, 4, 8])", "Attention shape: torch.Size([1, 4, 4])",
      "Solution verified!",
    ] {
      #expect(lines.contains(expected), "no line \"\(expected)\" in:\n\(run.stdout)")
    }
    #expect(run.stderr.isEmpty, "stderr: \(run.stderr)")
    #expect(!run.stdout.contains("\u{1B}["), "no colour codes when stdout is not a terminal")
  }

  static func json(_ arguments: [String]) throws -> [String: Any] {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(arguments, in: $0) }
    try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    let object = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8))
    return try #require(object as? [String: Any], "not a JSON object: \(run.stdout)")
  }

  @Test("--format json has the documented keys and values")
  func jsonFormat() throws {
    let report = try Self.json(["dropout", "--format", "json"])
    for key in [
      "output_shape", "weights_shape", "p", "seed", "dropped_fraction", "checks", "verified",
    ] {
      #expect(report[key] != nil, "key \(key) missing from \(report.keys.sorted())")
    }
    #expect(report["output_shape"] as? [Int] == [1, 4, 8])
    #expect(report["weights_shape"] as? [Int] == [1, 4, 4])
    #expect(report["p"] as? Double == 0.1, "p printed as \(report["p"] ?? "nil")")
    #expect(report["seed"] as? Int == 42)
    #expect(report["verified"] as? Bool == true)
    let checks = try #require(report["checks"] as? [String: Bool])
    #expect(!checks.isEmpty && checks.values.allSatisfy { $0 }, "checks: \(checks)")
    #expect(checks["dropped_share"] == true && checks["matches_reference"] == true, "\(checks)")
    let dropped = try #require(report["dropped_fraction"] as? Double)
    #expect(dropped >= 0 && dropped <= 1, "dropped_fraction \(dropped)")
  }

  @Test("--eval drops nothing: dropped_fraction 0")
  func evalMode() throws {
    let report = try Self.json(["dropout", "--eval", "--format", "json"])
    #expect(report["dropped_fraction"] as? Double == 0, "\(report["dropped_fraction"] ?? "nil")")
    #expect(report["verified"] as? Bool == true)
    let checks = try #require(report["checks"] as? [String: Bool])
    #expect(checks["dropped_share"] == nil, "no dropout checks in eval mode: \(checks)")
  }

  /// A usage error: exit 64, nothing on stdout, one line on stderr that names `mention`.
  static func expectUsageError(
    _ arguments: [String], mentions mention: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(arguments, in: $0) }
    #expect(run.status == 64, "\(arguments): exit \(run.status)", sourceLocation: sourceLocation)
    #expect(
      run.stderrLines.count == 1, "\(arguments): stderr should be one line: \(run.stderr)",
      sourceLocation: sourceLocation)
    #expect(
      run.stderr.hasPrefix("attn: ") && run.stderr.contains(mention),
      "\(arguments): stderr \(run.stderr) should name \(mention)", sourceLocation: sourceLocation)
    #expect(
      run.stdout.isEmpty, "\(arguments): stdout \(run.stdout)", sourceLocation: sourceLocation)
  }

  @Test("A bad flag exits 64 with one line on stderr")
  func badFlag() throws {
    try Self.expectUsageError(["dropout", "--no-such-flag"], mentions: "--no-such-flag")
    try Self.expectUsageError(["dropout", "--seq-len", "four"], mentions: "four")
    try Self.expectUsageError(["dropout", "--format", "xml"], mentions: "xml")
    try Self.expectUsageError(["no-such-command"], mentions: "no-such-command")
  }

  @Test("--p outside [0, 1] exits 64", arguments: ["2", "-0.5", "1.0001", "nan"])
  func badProbability(p: String) throws {
    try Self.expectUsageError(["dropout", "--p=\(p)"], mentions: "--p")
  }

  @Test("--q without --k and --v exits 64")
  func partialInputs() throws {
    try Self.expectUsageError(["dropout", "--q", "q.npy"], mentions: "--q, --k and --v")
    try Self.expectUsageError(["dropout", "--q", "q.npy", "--k", "k.npy"], mentions: "--v")
  }

  @Test("A missing input file exits 1 with one line naming the file")
  func missingFile() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let missing = folder.appendingPathComponent("missing-q.npy").path
      let tiny = try CLIFixtureCase(named: "plain_tiny")
      let run = try AttnCLI.run(
        ["dropout", "--q", missing, "--k", tiny.k, "--v", tiny.v], in: folder)
      #expect(run.status == 1, "exit \(run.status)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderr)")
      #expect(run.stderr.contains(missing), "stderr \(run.stderr) should name \(missing)")
      let mask = try AttnCLI.run(["dropout", "--mask", "no-mask.npy"], in: folder)
      #expect(mask.status == 1 && mask.stderrLines.count == 1, "\(mask.status): \(mask.stderr)")
      #expect(mask.stderr.contains("no-mask.npy"), "\(mask.stderr)")
    }
  }

  @Test("--out writes a [1, 4, 8] float32 .npy that NPY.read reads back")
  func outWritesNpy() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let out = folder.appendingPathComponent("out.npy").path
      let weights = folder.appendingPathComponent("weights.npy").path
      let run = try AttnCLI.run(["dropout", "--out", out, "--weights-out", weights], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      let output = try NPY.read(contentsOf: out)
      #expect(output.dtype == .float32 && output.tensor.shape == [1, 4, 8])
      #expect(output.tensor.scalars.allSatisfy { $0.isFinite })
      let w = try NPY.read(contentsOf: weights)
      #expect(w.dtype == .float32 && w.tensor.shape == [1, 4, 4])
      #expect(w.tensor.scalars.allSatisfy { $0 >= 0 && $0.isFinite })
      #expect(try AttnCLI.contents(of: folder) == ["out.npy", "weights.npy"], "no stray files")
    }
  }

  /// `--eval` on the `plain_tiny` fixture inputs: output and weights against numpy's float64
  /// values, with the tolerance derived in _TestSupport/Tolerance.swift
  /// (`AttentionTolerance`): `u = 2⁻²⁴`; score error `δ = γ_{D+1}·A + 4u·S` with
  /// `A = scale·max Σ_c |q_c·k_jc|` and `S` the case's max |score|; weights within
  /// `ρ·w + λ`, `ρ = 2δ(1 + 2δ) + γ_{Tk+6}`; outputs within
  /// `(ρ + γ_Tk)·Σ_j w_j·|v_jc| + Tk·λ·max|v|`.
  @Test("--out with fixture inputs and --eval equals numpy's output")
  func outMatchesFixture() throws {
    let tiny = try CLIFixtureCase(named: "plain_tiny")
    try AttnCLI.withTemporaryFolder { folder in
      let out = folder.appendingPathComponent("out.npy").path
      let weightsOut = folder.appendingPathComponent("w.npy").path
      let run = try AttnCLI.run(
        [
          "dropout", "--q", tiny.q, "--k", tiny.k, "--v", tiny.v, "--eval", "--out", out,
          "--weights-out", weightsOut,
        ], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      let output = try NPY.read(contentsOf: out).tensor
      let weights = try NPY.read(contentsOf: weightsOut).tensor
      let expectedOutput = try CLIFixtureCase.doubles(atPath: tiny.expectedOutput)
      let expectedWeights = try CLIFixtureCase.doubles(atPath: tiny.expectedWeights)
      let (q, k, v) = (
        try NPY.read(contentsOf: tiny.q).tensor, try NPY.read(contentsOf: tiny.k).tensor,
        try NPY.read(contentsOf: tiny.v).tensor
      )
      #expect(output.shape == [1, 4, 8] && weights.shape == [1, 4, 4])
      try #require(output.count == expectedOutput.count && weights.count == expectedWeights.count)

      let (tq, tk, d, dv) = (q.shape[1], k.shape[1], q.shape[2], v.shape[2])
      let u = 0x1p-24
      func gamma(_ n: Int) -> Double { Double(n) * u / (1 - Double(n) * u) }
      var a = 0.0
      for i in 0..<tq {
        for j in 0..<tk {
          var sum = 0.0
          for c in 0..<d { sum += abs(Double(q.scalars[i * d + c]) * Double(k.scalars[j * d + c])) }
          a = max(a, sum * tiny.scale)
        }
      }
      let delta = gamma(d + 1) * a + 4 * u * tiny.maxAbsScore
      let rho = 2 * delta * (1 + 2 * delta) + gamma(tk + 6)
      let lambda = Double(Float.leastNormalMagnitude)
      let maxV = v.scalars.map { Double(abs($0)) }.max() ?? 0
      for e in 0..<weights.count {
        let error = abs(Double(weights.scalars[e]) - expectedWeights[e])
        let tolerance = rho * expectedWeights[e] + lambda
        #expect(
          error <= tolerance,
          """
          weights[\(e)]: expected \(expectedWeights[e]), observed \(weights.scalars[e]), \
          error \(error), tolerance \(tolerance)
          """)
      }
      for e in 0..<output.count {
        let (i, c) = (e / dv, e % dv)
        var magnitude = 0.0
        for j in 0..<tk {
          magnitude += expectedWeights[i * tk + j] * Double(abs(v.scalars[j * dv + c]))
        }
        let tolerance = (rho + gamma(tk)) * magnitude + Double(tk) * lambda * maxV
        let error = abs(Double(output.scalars[e]) - expectedOutput[e])
        #expect(
          error <= tolerance,
          """
          output[\(e)]: expected \(expectedOutput[e]), observed \(output.scalars[e]), \
          error \(error), tolerance \(tolerance)
          """)
      }
    }
  }

  @Test("--out into a folder that does not exist exits 1 and leaves no file")
  func outMissingFolder() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let out = folder.appendingPathComponent("no-such-folder/out.npy").path
      let run = try AttnCLI.run(["dropout", "--out", out], in: folder)
      #expect(run.status == 1, "exit \(run.status)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderr)")
      #expect(run.stderr.contains(out), "stderr \(run.stderr) should name \(out)")
      #expect(!FileManager.default.fileExists(atPath: out))
      let entries = try AttnCLI.contents(of: folder)
      #expect(entries.isEmpty, "left behind: \(entries)")
    }
  }

  @Test("--out equal to an input path is refused and the input is unchanged")
  func outOverwritesInput() throws {
    let tiny = try CLIFixtureCase(named: "plain_tiny")
    try AttnCLI.withTemporaryFolder { folder in
      let q = folder.appendingPathComponent("q.npy")
      try FileManager.default.copyItem(at: URL(fileURLWithPath: tiny.q), to: q)
      let before = try Data(contentsOf: q)
      // The same file, also through another spelling of its path.
      for out in [q.path, folder.appendingPathComponent("./sub/../q.npy").path, "q.npy"] {
        if out.contains("sub") {
          try FileManager.default.createDirectory(
            at: folder.appendingPathComponent("sub"), withIntermediateDirectories: true)
        }
        let run = try AttnCLI.run(
          ["dropout", "--q", q.path, "--k", tiny.k, "--v", tiny.v, "--out", out], in: folder)
        #expect(run.status != 0, "--out \(out): exit \(run.status)")
        #expect(run.stderrLines.count == 1, "--out \(out): stderr \(run.stderr)")
        #expect(run.stderr.contains("also an input"), "--out \(out): stderr \(run.stderr)")
        #expect(try Data(contentsOf: q) == before, "--out \(out): the input file changed")
      }
      let entries = try AttnCLI.contents(of: folder).filter { $0 != "sub" }
      #expect(entries == ["q.npy"], "left behind: \(entries)")
    }
  }

  @Test("--out and --weights-out naming the same file is refused")
  func sameOutputTwice() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let path = folder.appendingPathComponent("same.npy").path
      let run = try AttnCLI.run(["dropout", "--out", path, "--weights-out", path], in: folder)
      #expect(run.status != 0, "exit \(run.status)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderr)")
      #expect(!FileManager.default.fileExists(atPath: path))
    }
  }
}
