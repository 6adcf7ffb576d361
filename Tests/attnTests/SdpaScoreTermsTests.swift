import AttentionKit
import AttentionVerification
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn sdpa --softcap/--alibi/--alibi-slopes/--t5-bias/--sinks` on the score-term fixtures
/// (numpy float64, `make_score_terms_fixtures.py`): every case `attn sdpa` can state (PyTorch
/// forbids an attn_mask with is_causal, so causal cases with a mask are left out) verifies, and
/// the written output equals numpy's within the float32 bound of `ReferenceAttention.row` around
/// the exact value (numpy's float64 is exact to ~1e-15).
@Suite("attn sdpa with score terms (the executable)")
struct SdpaScoreTermsTests {
  static func expressible() throws -> [ScoreTermsCase] {
    try ScoreTermsFixtures.cases().filter { !($0.causal && !$0.masks.isEmpty) }
  }

  static func arguments(_ spec: ScoreTermsCase) throws -> [String] {
    let path = ScoreTermsFixtures.path
    var arguments = [
      "sdpa", "--query", path(spec.q.file), "--key", path(spec.k.file), "--value",
      path(spec.v.file), "--out", "o.npy", "--format", "json",
    ]
    if spec.kvHeads != spec.heads { arguments.append("--enable-gqa") }
    if let scale = spec.scale { arguments += ["--scale", "\(scale)"] }
    if spec.causal { arguments += ["--is-causal", "--causal-align", spec.alignment] }
    if let window = spec.window { arguments += ["--window", "\(window)"] }
    for mask in spec.masks { arguments += ["--attn-mask", path(mask.file)] }
    if let softcap = spec.softcap { arguments += ["--softcap", "\(softcap)"] }
    if let alibi = spec.alibi {
      arguments += alibi.bloom ? ["--alibi"] : ["--alibi-slopes", path(alibi.slopes.file)]
    }
    if let t5 = spec.t5 {
      arguments += [
        "--t5-bias", path(t5.table.file), "--t5-max-distance", "\(t5.maxDistance)",
      ]
      if t5.bidirectional { arguments.append("--t5-bidirectional") }
    }
    if let sinks = spec.sinks { arguments += ["--sinks", path(sinks.file)] }
    return arguments
  }

  @Test("each expressible case verifies and writes numpy's output", arguments: try expressible())
  func matchesNumpy(spec: ScoreTermsCase) throws {
    let c = try LoadedScoreTermsCase(spec)
    let terms = c.scoreTerms
    let reference = try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask, scale: c.scale,
      terms: terms)
    let shape = reference.shape
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(try Self.arguments(spec), in: folder)
      try #require(run.status == 0, "\(spec.name): \(run.stderr)")
      #expect(run.stdout.contains("\"verified\" : true"))
      let output = try NPY.read(contentsOf: folder.appendingPathComponent("o.npy").path).tensor
      let dv = shape.valueDim
      var worst = 0.0
      for row in 0..<(shape.batchCount * shape.queries) {
        let bounds = reference.row(batch: row / shape.queries, query: row % shape.queries)
        for e in 0..<dv {
          let difference = abs(
            Double(output.scalars[row * dv + e]) - c.expectedOutput[row * dv + e])
          worst = max(worst, difference / (bounds.outputBounds[e] + 1e-12))
        }
      }
      #expect(worst <= 1, "\(spec.name): worst |attn − numpy| / bound = \(worst)")
    }
  }

  @Test("a case's terms left out fail the check against the candidate from numpy")
  func checkNamesMissingTerms() throws {
    // attn check with the output numpy computed, but without the sinks: not verified.
    let spec = try #require(try Self.expressible().first { $0.name == "all_four_causal" })
    try AttnCLI.withTemporaryFolder { folder in
      let c = try LoadedScoreTermsCase(spec)
      let expected = try Tensor(
        shape: [spec.batch, spec.heads, spec.queries, spec.valueDim],
        scalars: c.expectedOutput.map { Float($0) })
      try Data(NPY.encode(expected)).write(to: folder.appendingPathComponent("numpy.npy"))
      var arguments = try Self.arguments(spec)
      arguments[0] = "check"
      let out = arguments.firstIndex(of: "--out")!
      arguments.replaceSubrange(out...(out + 1), with: ["--output", "numpy.npy"])
      let verified = try AttnCLI.run(arguments, in: folder)
      #expect(verified.status == 0, "with every term: \(verified.stderr)")
      let sinks = arguments.firstIndex(of: "--sinks")!
      arguments.removeSubrange(sinks...(sinks + 1))
      let failed = try AttnCLI.run(arguments, in: folder)
      #expect(failed.status == 1, "without the sinks: \(failed.stdout)")
    }
  }
}
