import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// Correct results that the checks once refused, run as a new user ran them: each must verify
/// (exit 0). They were refused because a bound used the signed scale (it collapsed for negative
/// scales), because the layer's weights had no absolute floor (true weights below float32's
/// smallest normal come out as 0), because dS's row sums were held to a fixed 1e-12 instead of the
/// float64 reference's own cancellation, and because a long tiled backward had no check in
/// memory linear in T. The library's tests (AttentionVerificationTests) prove the bounds sound on
/// a randomized corpus; these hold the executable to them.
@Suite("Correct results verify at the checks' edges (the executable)")
struct SoundChecksTests {
  static func writeNPY(_ tensor: Tensor, _ name: String, in folder: URL) throws {
    try NPY.write(tensor, to: folder.appendingPathComponent(name).path)
  }

  @Test(
    "attn sdpa with a negative scale verifies", arguments: [["--scale", "-1"], ["--scale=-1"]])
  func negativeScale(scale: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      for (name, stream) in [
        ("q.npy", RandomStream.queries), ("k.npy", RandomStream.keys),
        ("v.npy", RandomStream.values),
      ] {
        try Self.writeNPY(
          try Tensor.randomNormal(shape: [1, 2, 8, 16], seed: 0, stream: stream), name, in: folder)
      }
      let run = try AttnCLI.run(
        ["sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--out", "o.npy"]
          + scale, in: folder)
      #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
      #expect(run.stdout.contains("scale -1.0"))
      #expect(FileManager.default.fileExists(atPath: folder.appendingPathComponent("o.npy").path))
    }
  }

  @Test("attn mha on a sharply peaked nn.MultiheadAttention (input × 6.5) verifies")
  func peakedLayer() throws {
    let fixture = try #require(
      try MHAFixtures.cases().first { $0.name == "torch_float_mask_causal" })
    try AttnCLI.withTemporaryFolder { folder in
      var x = try NPY.read(contentsOf: MHAFixtures.path(fixture.files.input.file)).tensor
      x.scalars = x.scalars.map { $0 * 6.5 }
      try Self.writeNPY(x, "x.npy", in: folder)
      let run = try AttnCLI.run(
        [
          "mha", "--weights", MHAFixtures.path(fixture.files.safetensors.file), "--layout",
          "torch", "--prefix", fixture.prefix, "--heads", String(fixture.heads), "--input",
          "x.npy", "--out", "y.npy",
        ], in: folder)
      #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
    }
  }

  @Test("attn backward --eval with Q, K × 3 (score spread ≈ 30) verifies")
  func peakedBackward() throws {
    try AttnCLI.withTemporaryFolder { folder in
      for (name, stream, factor) in [
        ("q.npy", RandomStream.queries, Float(3)), ("k.npy", RandomStream.keys, 3),
        ("v.npy", RandomStream.values, 1),
      ] {
        var t = try Tensor.randomNormal(shape: [1, 2, 64, 16], seed: 1, stream: stream)
        t.scalars = t.scalars.map { $0 * factor }
        try Self.writeNPY(t, name, in: folder)
      }
      let run = try AttnCLI.run(
        ["backward", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--eval"], in: folder)
      #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
      #expect(run.stdout.contains("✓ every row of dS sums to 0"))
    }
  }

  @Test("attn backward past the float64 reference's limit: tiled verifies, others refuse first")
  func longBackward() throws {
    try AttnCLI.withTemporaryFolder { folder in
      // 4,160² scores > 2²⁴: checked on sampled rows and keys through the log-sum-exp.
      let args = ["backward", "--seq-len", "4160", "--d-k", "4", "--p", "0.1"]
      let tiled = try AttnCLI.run(args + ["--kernel", "tiled", "--format", "json"], in: folder)
      #expect(tiled.status == 0, "\(tiled.stdout) \(tiled.stderr)")
      #expect(tiled.stdout.contains("\"forward_matches_reference\" : true"), "\(tiled.stdout)")
      // The materialized kernel cannot be checked at this size: refused before any work.
      let refused = try AttnCLI.run(args + ["--kernel", "materialized"], in: folder)
      #expect(refused.status == 64, "\(refused.stderr)")
      #expect(refused.stderr.contains("--kernel tiled"))
    }
  }
}
