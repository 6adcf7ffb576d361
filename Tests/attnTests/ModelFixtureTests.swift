import AttentionKit
import AttentionVerification
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn mha --model DIR --layer L` (and `--layout torch` for `nn.MultiheadAttention`) on models
/// transformers saved (`make_model_fixtures.py`): for every family the command verifies, and the
/// output it writes equals the module's float64 output within the float32 bounds of our float64
/// layer (`MultiHeadReference`, built on the same files; the two float64 computations agree to
/// ~10⁻¹⁵, far below them); the config reader's heads, scale, soft-cap, window and causality
/// are the manifest's; `--decode` matches transformers' cache too.
@Suite("attn mha --model on checkpoints saved by transformers (the executable)")
struct ModelFixtureTests {
  static func cases() throws -> [ModelCase] { try ModelFixtures.cases() }

  /// The layer and its mask as the library reads them from the case's files.
  static func layer(_ c: ModelCase) throws -> (MultiHeadAttention, AttentionMask, ModelLayerPlan?) {
    let folder = ModelFixtures.path(c.modelDir)
    if c.isTorchModule {
      let file = try SafeTensors.read(contentsOf: folder + "/model.safetensors")
      return (
        try MultiHeadAttention(
          stateDict: file.stateDict, layout: .torch, options: .init(heads: c.attention.heads)),
        .none, nil
      )
    }
    let model = try ModelFolder(path: folder)
    let plan = try ModelLayerPlan(
      config: ModelConfig(json: model.config), layer: c.layer!,
      stack: c.stack.flatMap(ModelLayerPlan.Stack.init(rawValue:)), names: model.names)
    let tensors = try model.read(names: plan.tensorNames(in: model.names))
    return (try plan.build(tensors.stateDict), plan.mask, plan)
  }

  @Test("each case verifies and writes the module's float64 output", arguments: try cases())
  func matchesTransformers(spec: ModelCase) throws {
    let path = ModelFixtures.path
    let (layer, mask, plan) = try Self.layer(spec)
    if let plan {
      #expect(plan.heads == spec.attention.heads && plan.keyValueHeads == spec.attention.kvHeads)
      #expect(plan.headDim == spec.attention.headDim)
      #expect(abs(plan.exactScale - spec.attention.scale) <= 1e-15 * spec.attention.scale)
      #expect(plan.softcap.map(Double.init) == spec.attention.softcap)
      #expect(plan.window == spec.attention.window && plan.isCausal == spec.attention.causal)
    }
    let x = try NPY.read(contentsOf: path(spec.x.file)).tensor
    let padding = try spec.keyPaddingMask.map { try NPY.read(contentsOf: path($0.file)).tensor }
    let expected = try ModelFixtures.doubles(spec.expected)
    let reference = try MultiHeadReference(
      layer: layer, input: x, keyPaddingMask: padding, attentionMask: mask)
    let (b, t, e) = (x.shape[0], x.shape[1], x.shape[2])
    let rows = reference.rows((0..<(b * t)).map { (batch: $0 / t, token: $0 % t) })
    var arguments =
      spec.isTorchModule
      ? [
        "mha", "--weights", path(spec.modelDir) + "/model.safetensors", "--layout", "torch",
        "--heads", "\(spec.attention.heads)",
      ] : ["mha", "--model", path(spec.modelDir), "--layer", spec.layerArgument!]
    arguments += ["--input", path(spec.x.file), "--out", "y.npy", "--format", "json"]
    if let padding = spec.keyPaddingMask {
      arguments += ["--key-padding-mask", path(padding.file)]
    }
    if spec.decode != nil { arguments.append("--decode") }
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(arguments, in: folder)
      try #require(run.status == 0, "\(spec.name): \(run.stderr)")
      #expect(run.stdout.contains("\"verified\" : true"), "\(spec.name)")
      let y = try NPY.read(contentsOf: folder.appendingPathComponent("y.npy").path).tensor
      var (worst, ratio) = (0.0, 0.0)
      for (r, row) in rows.enumerated() {
        for c in 0..<e {
          let error = abs(Double(y.scalars[r * e + c]) - expected[r * e + c])
          worst = max(worst, error)
          ratio = max(ratio, error / (row.bound[c] + 1e-12 * abs(expected[r * e + c])))
        }
      }
      #expect(ratio <= 1, "\(spec.name): worst |attn − float64| / bound = \(ratio)")
      print(
        "OK \(spec.name): attn worst |error| \(sci(worst)), PyTorch float32's "
          + "\(sci(spec.torchFloat32.maxAbsError)), error/bound \(sci(ratio))")
    }
    if let decode = spec.decode {
      // transformers' cache gives the full pass's output; ours decodes to it within the bounds.
      let stepped = try layer.decode(x, keyPaddingMask: padding, attentionMask: mask)
      let reference = try ModelFixtures.doubles(decode.output)
      for (r, row) in rows.enumerated() {
        for c in 0..<e {
          #expect(
            abs(Double(stepped.output.scalars[r * e + c]) - reference[r * e + c]) <= row.bound[c],
            "\(spec.name) decode row \(r)")
        }
      }
    }
  }

  @Test("a folder without a config, an unknown layer and --layer without --model are refused")
  func errors() throws {
    let llama = ModelFixtures.path("llama")
    let x = ModelFixtures.path("cases/llama__layer1__x.npy")
    for (arguments, message) in [
      (["--model", "/nonexistent", "--layer", "0"], "not a folder"),
      (["--model", llama, "--layer", "9"], "layers 0…"),
      (["--model", llama, "--layer", "decoder.x"], "--layer takes"),
      (["--weights", llama + "/model.safetensors", "--layer", "1"], "--layer goes with --model"),
      (["--model", llama, "--layer", "1", "--layout", "llama"], "drop --weights"),
    ] {
      try AttnCLI.withTemporaryFolder { folder in
        let run = try AttnCLI.run(["mha"] + arguments + ["--input", x], in: folder)
        #expect(run.status != 0, "\(arguments)")
        #expect(run.stderrLines.count == 1, "\(arguments): \(run.stderr)")
        #expect(run.stderr.contains(message), "\(arguments): \(run.stderr)")
      }
    }
  }
}
