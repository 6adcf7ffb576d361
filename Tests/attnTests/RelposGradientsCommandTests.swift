import AttentionKit
import AttentionVerification
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn relpos --grad-out` from the command line: the fixture modules of `Fixtures/relpos_grad`
/// (weights as safetensors, x, dY and the keep mask as `.npy`) reach the backward pass, the
/// gradient checks are printed and decide the exit code, and `--dx-out` and `--grads-out` write
/// numpy's gradients (within the float32 bounds of `RelativePosition64.gradients(unit: 2⁻²⁴)`,
/// derived in `RelativePositionBackwardTests`; errors measured are about 1% of them, while a
/// mis-wired flag — another mask, dY or module — moves gradients by O(1)). Errors are one line
/// and leave no output file.
@Suite("attn relpos --grad-out (the executable)")
struct RelposGradientsCommandTests {
  /// Writes the case's module as `w.safetensors` into `folder` and returns the arguments that
  /// run it on its x, dY and mask (read in place).
  static func arguments(_ c: LoadedRelposGradCase, in folder: URL) throws -> [String] {
    let weights = folder.appendingPathComponent("w.safetensors")
    try Data(SafeTensors.encode(c.module.stateDict.tensors)).write(to: weights)
    var arguments = [
      "relpos", "--weights", weights.path, "--input", RelposGradFixtures.path(c.spec.x.file),
      "--grad-out", RelposGradFixtures.path(c.spec.gradOutput.file),
    ]
    if c.spec.causal { arguments += ["--mask", "causal"] }
    if let keep = c.spec.keep { arguments += ["--mask", RelposGradFixtures.path(keep.file)] }
    return arguments
  }

  @Test(
    "Each fixture module: the checks pass and the files hold numpy's gradients",
    arguments: try RelposGradFixtures.cases())
  func writesNumpyGradients(spec: RelposGradCase) throws {
    let c = try LoadedRelposGradCase(spec)
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        Self.arguments(c, in: folder) + [
          "--dx-out", "dx.npy", "--grads-out", "grads.safetensors", "--threads", "2",
        ], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      #expect(run.stdout.contains("Gradient checks:"))
      for title in [
        "gradients equal the float64 reference", "float64 central differences",
      ] {
        #expect(run.stdout.contains("✓ \(title)"), "no passed check '\(title)' in\n\(run.stdout)")
      }
      #expect(run.stdout.contains("implemented successfully!"))
      let bounds = try RelativePosition64(module: c.module, x: c.x, mask: c.mask)
        .gradients(gradOutput: c.gradOutput.scalars.map(Double.init), unit: 0x1p-24).bounds
      let dx = try NPY.read(contentsOf: folder.appendingPathComponent("dx.npy").path).tensor
      #expect(dx.shape == spec.x.shape)
      let expectedDX = try #require(c.expected["x"])
      let dxBound = try #require(bounds["x"])
      expectClose(
        dx.scalars, expectedDX, shape: dx.shape,
        tolerance: { dxBound[$0] + 1e-12 * abs(expectedDX[$0]) }, "\(spec.name) dx")
      let file = try SafeTensors.read(
        contentsOf: folder.appendingPathComponent("grads.safetensors").path)
      #expect(Set(file.tensors.keys) == Set(RelativePositionAttention.parameterNames))
      #expect(file.dtypes.values.allSatisfy { $0 == .f32 })
      for name in RelativePositionAttention.parameterNames {
        let tensor = try #require(file.tensors[name])
        let expected = try #require(c.expected[name])
        let bound = try #require(bounds[name])
        #expect(tensor.shape == spec.parameters[name]?.shape)
        expectClose(
          tensor.scalars, expected, shape: tensor.shape,
          tolerance: { bound[$0] + 1e-12 * abs(expected[$0]) }, "\(spec.name) \(name)")
      }
    }
  }

  @Test("--format json reports the gradient checks and shapes")
  func json() throws {
    let c = try LoadedRelposGradCase(try #require(try RelposGradFixtures.cases().first))
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(Self.arguments(c, in: folder) + ["--format", "json"], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let json = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
      let checks = json?["gradient_checks"] as? [String: Bool] ?? [:]
      #expect(
        checks == [
          "gradients_match_reference": true, "finite_differences": true,
        ])
      #expect(json?["verified"] as? Bool == true)
      let shapes = json?["gradient_shapes"] as? [String: [Int]] ?? [:]
      let (b, t, d, m) = (c.spec.batch, c.spec.length, c.spec.dModel, c.spec.maxRel)
      #expect(shapes["x"] == [b, t, d])
      #expect(shapes["W_q.weight"] == [d, d])
      #expect(shapes["W_v.bias"] == [d])
      #expect(shapes["relative_embeddings.weight"] == [2 * m + 1, d])
      #expect((json?["gradient_workspace_bytes"] as? Int ?? 0) > 0)
    }
  }

  @Test(
    "--dx-out and --grads-out without --grad-out are usage errors",
    arguments: [["--dx-out", "dx.npy"], ["--grads-out", "g.safetensors"]])
  func outputsNeedGradient(flags: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(["relpos", "--seq-len", "4", "--d-model", "8"] + flags, in: folder)
      #expect(run.status == 64)
      #expect(run.stderrLines.count == 1, "\(run.stderr)")
      #expect(run.stderr.contains(flags[0]) && run.stderr.contains("--grad-out"))
      #expect(try AttnCLI.contents(of: folder).isEmpty)
    }
  }

  @Test("A --grad-out of the wrong shape: exit 1, one line naming the file and the shape")
  func wrongShape() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let dY = try Tensor.randomNormal(shape: [2, 5, 7], seed: 1, stream: 1)
      try Data(NPY.encode(dY)).write(to: folder.appendingPathComponent("dy.npy"))
      let run = try AttnCLI.run(
        [
          "relpos", "--seq-len", "5", "--d-model", "8", "--grad-out", "dy.npy", "--dx-out",
          "dx.npy", "--grads-out", "g.safetensors", "--out", "y.npy",
        ], in: folder)
      #expect(run.status == 1)
      #expect(run.stderrLines.count == 1, "\(run.stderr)")
      #expect(run.stderr.contains("dy.npy") && run.stderr.contains("[2, 5, 8]"), "\(run.stderr)")
      #expect(try AttnCLI.contents(of: folder) == ["dy.npy"])
    }
  }

  @Test("A backward over --max-memory: exit 1, one line, no files")
  func memoryBudget() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let dY = try Tensor.randomNormal(shape: [2, 20, 64], seed: 1, stream: 1)
      try Data(NPY.encode(dY)).write(to: folder.appendingPathComponent("dy.npy"))
      // The forward fits in 70 KB; the backward's Q, K, V and their gradients, 60 KiB, and
      // the attention kernel's workspace do not.
      let run = try AttnCLI.run(
        [
          "relpos", "--grad-out", "dy.npy", "--dx-out", "dx.npy", "--out", "y.npy",
          "--max-memory", "70KB", "--threads", "2",
        ], in: folder)
      #expect(run.status == 1)
      #expect(run.stderrLines.count == 1, "\(run.stderr)")
      #expect(run.stderr.contains("backward") && run.stderr.contains("--max-memory"))
      #expect(try AttnCLI.contents(of: folder) == ["dy.npy"])
    }
  }
}
