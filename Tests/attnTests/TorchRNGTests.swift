import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn dropout --rng torch`: the notebook's exercise 1 as PyTorch computes it, checked against
/// the torch fixtures (`Tests/_TestSupport/Fixtures/torch`, written by
/// `Scripts/fixtures/make_torch_fixtures.py`).
@Suite("attn dropout --rng torch (the executable)")
struct TorchRNGTests {
  /// The float64 output of the notebook's exercise 1 in eval mode, computed by torch from the
  /// inputs `torch.manual_seed(42)` draws, and those inputs.
  struct NotebookExercise1 {
    static let folder = Fixtures.folder("torch")

    var q: [Float]
    var k: [Float]
    var v: [Float]
    var outputF32: [Float]
    var outputF64: [Double]
    var weightsF64: [Double]

    init() throws {
      let data = try Data(contentsOf: Self.folder.appendingPathComponent("manifest.json"))
      let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any]
      let entries = manifest?["exercise1"] as? [[String: Any]] ?? []
      guard let entry = entries.first(where: { $0["kernel"] as? String == "vectorized" }),
        let eval = entry["eval"] as? [String: Any]
      else { throw AttnCLIError("no vectorized exercise1 entry in the torch manifest") }
      func path(_ ref: Any?) throws -> String {
        guard let file = (ref as? [String: Any])?["file"] as? String else {
          throw AttnCLIError("exercise1: missing file reference")
        }
        return Self.folder.appendingPathComponent(file).path
      }
      func floats(_ ref: Any?) throws -> [Float] {
        try NPY.read(contentsOf: try path(ref)).tensor.scalars
      }
      q = try floats(entry["q"])
      k = try floats(entry["k"])
      v = try floats(entry["v"])
      outputF32 = try floats(eval["output_f32"])
      outputF64 = try CLIFixtureCase.doubles(atPath: try path(eval["output_f64"]))
      weightsF64 = try CLIFixtureCase.doubles(atPath: try path(eval["weights_f64"]))
    }
  }

  @Test("--eval --rng torch --seed 42 writes the notebook's output, to float32 rounding")
  func notebookOutput() throws {
    let fixture = try NotebookExercise1()
    let (run, output) = try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        ["dropout", "--eval", "--rng", "torch", "--seed", "42", "--out", "out.npy"], in: folder)
      let path = folder.appendingPathComponent("out.npy").path
      return (run, try? NPY.read(contentsOf: path))
    }
    #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    let observed = try #require(output, "no out.npy written").tensor
    #expect(observed.shape == [1, 4, 8])
    guard observed.count == fixture.outputF64.count else { return }

    // How far a float32 kernel may be from the exact output (the derivation of
    // _TestSupport's `AttentionTolerance`, here with Tq = Tk = 4, D = Dv = 8):
    // scores s = Q·Kᵀ/√8 are off by δ = γ_{D+1}·A + 4u·S, with A = max_ij Σ_c |q_ic·k_jc|/√8 and
    // S = max |s|; weights then by a relative ρ = 2δ(1 + 2δ) + γ_{Tk+6}; output element (i, c)
    // by (ρ + γ_Tk)·Σ_j w_ij·|v_jc|. That is about 10⁻⁶ here, while a wrong draw moves the
    // output by 10⁻¹.
    let (t, d) = (4, 8)
    let scale = 1 / Double(d).squareRoot()
    var a = 0.0
    var s = 0.0
    for i in 0..<t {
      for j in 0..<t {
        var absolute = 0.0
        var dot = 0.0
        for c in 0..<d {
          let product = Double(fixture.q[i * d + c]) * Double(fixture.k[j * d + c])
          absolute += abs(product)
          dot += product
        }
        a = max(a, absolute * scale)
        s = max(s, abs(dot * scale))
      }
    }
    let delta = gamma(d + 1) * a + 4 * 0x1p-24 * s
    let rho = 2 * delta * (1 + 2 * delta) + gamma(t + 6)
    var worstRatio = 0.0
    var worstVersusTorch32 = 0.0
    for i in 0..<t {
      for c in 0..<d {
        var magnitude = 0.0
        for j in 0..<t {
          magnitude += fixture.weightsF64[i * t + j] * Double(abs(fixture.v[j * d + c]))
        }
        let bound = (rho + gamma(t)) * magnitude
        let e = i * d + c
        let error = abs(Double(observed.scalars[e]) - fixture.outputF64[e])
        worstRatio = max(worstRatio, error.isNaN ? .infinity : error / bound)
        worstVersusTorch32 = max(
          worstVersusTorch32, abs(Double(observed.scalars[e]) - Double(fixture.outputF32[e])))
      }
    }
    let report =
      "output vs torch's float64: worst error / bound = \(worstRatio); "
      + "max |ours − torch float32| = \(worstVersusTorch32)"
    #expect(worstRatio <= 1, "\(report)")
  }

  @Test("Text mode: the eval run verifies and names the generator; training adds the Philox note")
  func textOutput() throws {
    let eval = try AttnCLI.withTemporaryFolder {
      try AttnCLI.run(["dropout", "--eval", "--rng", "torch"], in: $0)
    }
    #expect(eval.status == 0, "exit \(eval.status), stderr: \(eval.stderr)")
    let evalLines = eval.stdout.split(separator: "\n").map(String.init)
    #expect(evalLines.first?.contains("seed 42, torch rng") == true, "\(eval.stdout)")
    #expect(evalLines.contains("Solution verified!"), "\(eval.stdout)")
    #expect(!eval.stdout.contains("Philox"), "no dropout, so no note: \(eval.stdout)")

    let training = try AttnCLI.withTemporaryFolder {
      try AttnCLI.run(["dropout", "--rng", "torch"], in: $0)
    }
    #expect(training.status == 0, "exit \(training.status), stderr: \(training.stderr)")
    let notes = training.stdout.split(separator: "\n").filter { $0.hasPrefix("Note:") }
    #expect(notes.count == 1 && notes[0].contains("Philox4x32-10"), "\(training.stdout)")
  }

  @Test("JSON reports the generator; the default is philox")
  func json() throws {
    for (arguments, expected) in [([String](), "philox"), (["--rng", "torch"], "torch")] {
      let run = try AttnCLI.withTemporaryFolder {
        try AttnCLI.run(["dropout", "--format", "json"] + arguments, in: $0)
      }
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      let object = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
      #expect(object?["rng"] as? String == expected, "\(run.stdout)")
    }
  }

  @Test(
    "Usage errors exit 64 with one line",
    arguments: [
      ["dropout", "--rng", "mt"],
      ["dropout", "--rng", "torch", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy"],
      ["relpos", "--rng", "torch", "--weights", "w.safetensors", "--input", "x.npy"],
    ])
  func usageErrors(arguments: [String]) throws {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(arguments, in: $0) }
    #expect(run.status == 64, "exit \(run.status), stderr: \(run.stderr)")
    #expect(run.stderrLines.count == 1, "stderr: \(run.stderr)")
    #expect(run.stdout.isEmpty, "stdout: \(run.stdout)")
  }

  @Test("relpos --rng torch --seed 42 initializes, draws and computes as the notebook's cell")
  func notebookRelativePosition() throws {
    let folder = NotebookExercise1.folder
    func fixture(_ name: String) throws -> Tensor {
      try NPY.read(contentsOf: folder.appendingPathComponent("vectorized__relpos_\(name).npy").path)
        .tensor
    }
    let (run, saved, output, weights) = try AttnCLI.withTemporaryFolder { dir in
      let run = try AttnCLI.run(
        [
          "relpos", "--rng", "torch", "--seed", "42", "--out", "o.npy", "--weights-out", "a.npy",
          "--save-weights", "w.safetensors",
        ], in: dir)
      func path(_ name: String) -> String { dir.appendingPathComponent(name).path }
      return (
        run, try? SafeTensors.read(contentsOf: path("w.safetensors")),
        try? NPY.read(contentsOf: path("o.npy")).tensor,
        try? NPY.read(contentsOf: path("a.npy")).tensor
      )
    }
    #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    // The parameters are drawn, not computed: equal to PyTorch's to the bit.
    let file = try #require(saved, "no weights saved")
    for name in RelativePositionAttention.parameterNames {
      #expect(try file.tensor(named: name).scalars == fixture(name).scalars, "\(name) differs")
    }
    // The forward pass against torch's float64 result from the same parameters and x. The
    // worst-case float32 bound (projections γ₆₅·Σ|x·w|, scores γ₆₆·Σ|q·k| and |q·e| over √64,
    // at |x|, |w| of these draws) is about 1e-5 at this size; a wrong draw, a transposed
    // weight or an i − j index moves the output by 1e-2 or more.
    let expectedOutput = try CLIFixtureCase.doubles(
      atPath: folder.appendingPathComponent("vectorized__relpos_output_f64.npy").path)
    let expectedWeights = try CLIFixtureCase.doubles(
      atPath: folder.appendingPathComponent("vectorized__relpos_attention_f64.npy").path)
    let o = try #require(output, "no o.npy written")
    let a = try #require(weights, "no a.npy written")
    #expect(o.shape == [2, 20, 64] && a.shape == [2, 20, 20])
    let outputError = zip(o.scalars, expectedOutput).map { abs(Double($0) - $1) }.max() ?? .nan
    let weightError = zip(a.scalars, expectedWeights).map { abs(Double($0) - $1) }.max() ?? .nan
    #expect(outputError <= 1e-5, "max |output − torch| = \(outputError)")
    #expect(weightError <= 1e-5, "max |weights − torch| = \(weightError)")
  }

  @Test("--help documents --rng")
  func help() throws {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(["dropout", "--help"], in: $0) }
    #expect(run.status == 0)
    #expect(run.stdout.contains("--rng <rng>"), "\(run.stdout)")
    #expect(run.stdout.contains("torch.manual_seed"), "\(run.stdout)")
  }
}

/// `γₙ = n·u/(1 − n·u)`, `u = 2⁻²⁴`: the relative error bound of `n` float32 roundings.
private func gamma(_ n: Int) -> Double {
  let u = 0x1p-24
  return Double(n) * u / (1 - Double(n) * u)
}
