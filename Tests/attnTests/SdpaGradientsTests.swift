import AttentionKit
import AttentionVerification
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn sdpa --grad-out` on the score-term fixtures: the gradients it writes — dQ, dK, dV,
/// d(sinks), d(T5 table), d(attn_mask) — against numpy's float64 (`make_score_terms_fixtures.py`,
/// cross-checked with torch's autograd), within the bounds our float64 reference derives on the
/// same inputs (`GradientBounds`; numpy's own rounding, ~10⁻¹⁵, is far below them), on both
/// kernels; and the flags' misuse refused with one line.
@Suite("attn sdpa --grad-out (the executable)")
struct SdpaGradientsTests {
  static func cases() throws -> [ScoreTermsCase] { try SdpaScoreTermsTests.expressible() }

  @Test("each expressible case writes numpy's gradients", arguments: try cases())
  func matchesNumpy(spec: ScoreTermsCase) throws {
    let c = try LoadedScoreTermsCase(spec)
    let terms = c.scoreTerms
    let floatMask = c.mask.bias != nil
    let reference = try ReferenceGradients(
      queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOut, mask: c.mask,
      scale: c.scale, terms: terms, needBiasGradient: floatMask)
    let b = reference.bounds
    var expected: [(String, [Double]?, [Double]?)] = [
      ("dq", c.expectedDQ, b.dQ), ("dk", c.expectedDK, b.dK), ("dv", c.expectedDV, b.dV),
      ("dsinks", c.expectedDSinks, b.dSinks), ("dt5", c.expectedDT5Table, b.dT5Tables.first),
    ]
    if floatMask { expected.append(("dmask", c.expectedDBias, b.dBias)) }
    for kernel in ["materialized", "tiled"] {
      try AttnCLI.withTemporaryFolder { folder in
        var arguments =
          try SdpaScoreTermsTests.arguments(spec) + [
            "--kernel", kernel, "--grad-out", ScoreTermsFixtures.path(spec.gradients.gradOut.file),
          ]
        for (name, values, _) in expected where values != nil {
          arguments += ["--\(name)-out", "\(name).npy"]
        }
        let run = try AttnCLI.run(arguments, in: folder)
        try #require(run.status == 0, "\(spec.name), \(kernel): \(run.stderr)")
        #expect(run.stdout.contains("\"verified\" : true"), "\(spec.name), \(kernel)")
        for (name, values, bounds) in expected {
          guard let values, let bounds else { continue }
          let written = try NPY.read(
            contentsOf: folder.appendingPathComponent("\(name).npy").path
          ).tensor
          expectClose(
            written.scalars, values, shape: written.shape, tolerance: { bounds[$0] },
            "\(spec.name), \(kernel), \(name)")
        }
      }
    }
  }

  @Test("misused gradient flags get one line and a non-zero exit")
  func misuse() throws {
    let spec = try #require(try Self.cases().first { $0.name == "alibi_bloom_h8" })
    let path = ScoreTermsFixtures.path
    let base = try SdpaScoreTermsTests.arguments(spec)
    let wrongShape = path(spec.q.file)  // [B, H, Tq, D] with D ≠ Dv.
    let cases: [([String], String)] = [
      (["--dq-out", "dq.npy"], "needs --grad-out"),
      (["--grad-out", path(spec.gradients.gradOut.file), "--dsinks-out", "s.npy"], "--sinks"),
      (["--grad-out", path(spec.gradients.gradOut.file), "--dt5-out", "t.npy"], "--t5-bias"),
      (["--grad-out", path(spec.gradients.gradOut.file), "--dmask-out", "m.npy"], "float"),
      (["--grad-out", wrongShape], "output's shape"),
    ]
    for (extra, message) in cases {
      try AttnCLI.withTemporaryFolder { folder in
        let run = try AttnCLI.run(base + extra, in: folder)
        #expect(run.status != 0, "\(extra)")
        #expect(run.stderr.contains(message), "\(extra): \(run.stderr)")
        #expect(
          !FileManager.default.fileExists(atPath: folder.appendingPathComponent("o.npy").path),
          "\(extra): an output was written")
      }
    }
  }

  @Test("attn check verifies sdpa's gradients with the terms, and refuses them without sinks")
  func checkWithTerms() throws {
    let spec = try #require(try Self.cases().first { $0.name == "all_four_causal" })
    let path = ScoreTermsFixtures.path
    try AttnCLI.withTemporaryFolder { folder in
      let sdpa =
        try SdpaScoreTermsTests.arguments(spec) + [
          "--grad-out", path(spec.gradients.gradOut.file), "--dq-out", "dq.npy", "--dk-out",
          "dk.npy", "--dv-out", "dv.npy",
        ]
      let written = try AttnCLI.run(sdpa, in: folder)
      try #require(written.status == 0, "\(written.stderr)")
      // attn check takes the problem's flags (sdpa's, without its outputs) and the candidates.
      var problem: [String] = []
      var skip = false
      for argument in try SdpaScoreTermsTests.arguments(spec).dropFirst() {
        if skip {
          skip = false
          continue
        }
        if ["--out", "--format"].contains(argument) {
          skip = true
          continue
        }
        problem.append(argument)
      }
      let candidates = [
        "--output", "o.npy", "--grad-out", path(spec.gradients.gradOut.file), "--dq", "dq.npy",
        "--dk", "dk.npy", "--dv", "dv.npy",
      ]
      let check = try AttnCLI.run(["check"] + problem + candidates, in: folder)
      #expect(check.status == 0, "\(check.stdout)\n\(check.stderr)")
      var withoutSinks: [String] = []
      var dropNext = false
      for argument in problem {
        if dropNext {
          dropNext = false
          continue
        }
        if argument == "--sinks" {
          dropNext = true
          continue
        }
        withoutSinks.append(argument)
      }
      let wrong = try AttnCLI.run(["check"] + withoutSinks + candidates, in: folder)
      #expect(wrong.status != 0)
      #expect(wrong.stdout.contains("NOT verified"))
    }
  }

  /// `--kv-dtype`: verified against the reference on the stored K and V (a q8 cache moves the
  /// output by ~10⁻², far beyond the float32 bounds, so a check on the given K and V would
  /// fail), with the storage's effect reported; refused with dropout or a backward pass.
  @Test("--kv-dtype stores K and V compactly, checked on the stored values")
  func kvDtype() throws {
    let spec = try #require(try Self.cases().first { $0.name == "all_four_causal" })
    try AttnCLI.withTemporaryFolder { folder in
      for dtype in ["float16", "bfloat16", "q8"] {
        let run = try AttnCLI.run(
          try SdpaScoreTermsTests.arguments(spec) + ["--kv-dtype", dtype], in: folder)
        try #require(run.status == 0, "\(dtype): \(run.stderr)")
        let json = try #require(
          JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        #expect(json["verified"] as? Bool == true, "\(dtype)")
        let storage = try #require(json["kv_storage"] as? [String: Any])
        #expect(storage["kv_dtype"] as? String == dtype)
        let effect = try #require(storage["effect"] as? [String: Double])
        #expect((effect["max"] ?? 0) > 0 && (effect["rms"] ?? 0) > 0, "\(dtype): \(effect)")
      }
      let refused = try AttnCLI.run(
        try SdpaScoreTermsTests.arguments(spec) + ["--kv-dtype", "q8", "--dropout-p", "0.1"],
        in: folder)
      #expect(refused.status != 0 && refused.stderr.contains("--kv-dtype"), "\(refused.stderr)")
    }
  }
}
