import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn mha` on the layers of `Fixtures/mha`: the flags a user would type reach the layer. The
/// numbers themselves are held to float32 bounds in AttentionKitTests (MultiHeadAttentionTests);
/// here the written output must be within 1e-5 of the fixture relative to its largest magnitude
/// — errors measured are about 3e-7, while a mis-wired flag (prefix, theta, offset, a mask, the
/// layout) moves outputs by O(1).
@Suite("attn mha (the executable)")
struct MhaCommandTests {
  /// The command line for a fixture case, reading its files in place.
  static func arguments(_ fixture: MHACase) -> [String] {
    var arguments = [
      "mha", "--weights", MHAFixtures.path(fixture.files.safetensors.file), "--layout",
      fixture.layout, "--heads", String(fixture.heads), "--input",
      MHAFixtures.path(fixture.files.input.file),
    ]
    if !fixture.prefix.isEmpty { arguments += ["--prefix", fixture.prefix] }
    if let rope = fixture.rope {
      arguments += [
        "--rope-theta", String(rope.theta), "--rope-layout", rope.layout, "--position-offset",
        String(rope.offset),
      ]
    }
    if fixture.isCausal { arguments.append("--is-causal") }
    if let padding = fixture.keyPaddingMask {
      arguments += ["--key-padding-mask", MHAFixtures.path(padding.file)]
    }
    if let mask = fixture.attnMask { arguments += ["--attn-mask", MHAFixtures.path(mask.file)] }
    return arguments
  }

  static func worst(_ output: [Float], _ expected: [Double]) -> Double {
    let scale = expected.map(abs).max() ?? 1
    return zip(output, expected).map { abs(Double($0) - $1) }.max().map { $0 / scale } ?? 0
  }

  @Test(
    "each fixture layer, run from its flags, writes the numpy output",
    arguments: try MHAFixtures.cases())
  func matchesFixture(_ fixture: MHACase) throws {
    try AttnCLI.withTemporaryFolder { folder in
      var arguments = Self.arguments(fixture) + ["--out", "y.npy", "--weights-out", "w.npy"]
      if fixture.files.expectedAverageWeights != nil { arguments.append("--average-heads") }
      let run = try AttnCLI.run(arguments, in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      #expect(run.stdout.contains("Verified."))
      let output = try NPY.read(contentsOf: folder.appendingPathComponent("y.npy").path).tensor
      let expected = try MHAFixtures.doubles(fixture.files.expectedOutput)
      #expect(output.shape == fixture.files.expectedOutput.shape)
      #expect(Self.worst(output.scalars, expected) <= 1e-5)
      let weights = try NPY.read(contentsOf: folder.appendingPathComponent("w.npy").path).tensor
      let weightsRef = fixture.files.expectedAverageWeights ?? fixture.files.expectedWeights!
      #expect(weights.shape == weightsRef.shape)
      #expect(Self.worst(weights.scalars, try MHAFixtures.doubles(weightsRef)) <= 1e-5)
    }
  }

  @Test("--decode runs token by token and agrees with the full pass")
  func decode() throws {
    let fixture = try #require(try MHAFixtures.cases().first { $0.name == "llama_gqa4_offset1000" })
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        Self.arguments(fixture) + ["--decode", "--format", "json", "--threads", "2"], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let json = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
      let checks = json?["checks"] as? [String: Bool] ?? [:]
      #expect(checks["decode_matches_full"] == true)
      #expect(checks["decode_matches_reference"] == true)
      let latency = json?["decode_milliseconds"] as? [String: Double] ?? [:]
      #expect((latency["median"] ?? 0) > 0)
    }
  }

  @Test(
    "--decode --kv-cache: checked on the stored keys and values, the cache's effect reported",
    arguments: ["float16", "bfloat16", "q8"])
  func decodeCompactCache(storage: String) throws {
    let fixture = try #require(try MHAFixtures.cases().first { $0.name == "llama_gqa4_offset1000" })
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        Self.arguments(fixture) + [
          "--decode", "--kv-cache", storage, "--format", "json", "--threads", "2",
        ], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let json = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
      let checks = json?["checks"] as? [String: Bool] ?? [:]
      #expect(checks["decode_matches_reference"] == true)
      #expect(checks["decode_matches_full"] == nil)
      #expect(json?["kv_cache"] as? String == storage)
      let effect = json?["kv_cache_effect"] as? [String: Double] ?? [:]
      #expect((effect["max"] ?? 0) > 0 && (effect["rms"] ?? 0) > 0)
      #expect((effect["rms"] ?? .infinity) < (effect["output_rms"] ?? 0))
      #expect(json?["verified"] as? Bool == true)
    }
  }

  @Test("--kv-cache without --decode is a usage error")
  func kvCacheNeedsDecode() throws {
    let fixture = try #require(try MHAFixtures.cases().first { $0.name == "llama_gqa4_offset1000" })
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(Self.arguments(fixture) + ["--kv-cache", "q8"], in: folder)
      #expect(run.status != 0)
      #expect(run.stderr.contains("--kv-cache sets the cache of --decode"))
    }
  }

  @Test("--heatmap draws one panel per head, labelled with --tokens")
  func heatmap() throws {
    let fixture = try #require(try MHAFixtures.cases().first { $0.name == "bert_kpm" })
    let tokens = (0..<fixture.seq).map { "tok\($0)" }.joined(separator: ",")
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        Self.arguments(fixture) + [
          "--heatmap", "heads.svg", "--heatmap-batch", "1", "--tokens", tokens,
        ], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let svg = try String(contentsOf: folder.appendingPathComponent("heads.svg"), encoding: .utf8)
      #expect(svg.components(separatedBy: "class=\"panel\"").count - 1 == fixture.heads)
      #expect(svg.contains(">tok8<"))
      // Batch element 1 pads keys 6–8: those cells are crossed out as masked.
      #expect(svg.contains("cell masked"))
    }
  }

  @Test("bad layers and flags are one-line errors, and nothing is written")
  func errors() throws {
    let fixture = try #require(try MHAFixtures.cases().first { $0.name == "bert_kpm" })
    let base = Self.arguments(fixture)
    let cases: [([String], Int32, String)] = [
      (
        base.map { $0 == fixture.prefix ? "encoder.layer.9.attention." : $0 }, 1,
        "no tensor name starts with the prefix"
      ),
      (base.map { $0 == "bert" ? "torch" : $0 }, 1, "in_proj_weight\" is missing"),
      (base.map { $0 == "4" ? "5" : $0 }, 1, "5 heads do not divide E = 32"),
      (base + ["--heatmap", "h.svg", "--tokens", "a,b"], 64, "--tokens gives 2 tokens"),
      (base + ["--layer-norm-eps=-1"], 64, "--layer-norm-eps must be ≥ 0"),
      (base + ["--average-heads"], 64, "--average-heads goes with --weights-out"),
    ]
    for (arguments, status, message) in cases {
      try AttnCLI.withTemporaryFolder { folder in
        let run = try AttnCLI.run(arguments + ["--out", "y.npy"], in: folder)
        #expect(run.status == status, "\(arguments): \(run.stderr)")
        #expect(run.stderrLines.count == 1, "\(run.stderr)")
        #expect(run.stderr.contains(message), "\(run.stderr)")
        #expect(try AttnCLI.contents(of: folder).isEmpty)
      }
    }
  }
}
