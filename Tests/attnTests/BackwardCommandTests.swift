import AttentionKit
import AttentionVerification
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn backward` from the command line: its checks, its outputs and its errors. The numbers
/// are held to the numpy fixtures in AttentionKitTests (BackwardTests); here the files it writes
/// must be the gradients of the inputs it was given — compared with `ReferenceGradients` (float64,
/// computed here from the same files) within the bounds that type derives — and every way to
/// misuse it must be one line and no file.
@Suite("attn backward (the executable)")
struct BackwardCommandTests {
  /// Q, K, V [2, 3, 6, 4], a bias [6, 6] with a fully masked row, and dO [2, 3, 6, 4].
  static func writeInputs(in folder: URL) throws -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let q = try Tensor.randomNormal(shape: [2, 3, 6, 4], seed: 9, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: [2, 3, 6, 4], seed: 9, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: [2, 3, 6, 4], seed: 9, stream: RandomStream.values)
    let dO = try Tensor.randomNormal(shape: [2, 3, 6, 4], seed: 9, stream: RandomStream.input)
    var bias = try Tensor.randomNormal(shape: [6, 6], seed: 9, stream: 7)
    for j in 0..<6 { bias[2, j] = -.infinity }
    for (name, tensor) in [("q", q), ("k", k), ("v", v), ("do", dO), ("bias", bias)] {
      try Data(NPY.encode(tensor)).write(to: folder.appendingPathComponent("\(name).npy"))
    }
    return (q, k, v, dO, bias)
  }

  static let files = ["--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--grad-out", "do.npy"]

  @Test("default run: checks, finite differences, verified", arguments: ["materialized", "tiled"])
  func defaultRun(kernel: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        ["backward", "--kernel", kernel, "--mask", "causal", "--format", "json"], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let json = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
      let checks = json?["checks"] as? [String: Bool] ?? [:]
      #expect(
        checks == [
          "matches_reference": true, "ds_rows_sum_to_zero": true, "finite_differences": true,
        ])
      #expect(json?["verified"] as? Bool == true)
      #expect(json?["kernel"] as? String == kernel)
    }
  }

  @Test("the written gradients are those of the given files, within the float32 bounds")
  func outputs() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let (q, k, v, dO, bias) = try Self.writeInputs(in: folder)
      let run = try AttnCLI.run(
        ["backward"] + Self.files + [
          "--bias", "bias.npy", "--p", "0.25", "--seed", "3", "--kernel", "tiled",
          "--dq-out", "dq.npy", "--dk-out", "dk.npy", "--dv-out", "dv.npy", "--dbias-out",
          "db.npy",
        ], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      #expect(run.stdout.contains("Gradients verified!"))
      let reference = try ReferenceGradients(
        queries: q, keys: k, values: v, gradOutput: dO, mask: .bias(bias),
        dropout: Dropout(probability: 0.25, seed: 3), needBiasGradient: true)
      func read(_ name: String) throws -> Tensor {
        try NPY.read(contentsOf: folder.appendingPathComponent(name).path).tensor
      }
      let pairs: [(String, [Double], [Double])] = [
        ("dq.npy", reference.dQ, reference.bounds.dQ),
        ("dk.npy", reference.dK, reference.bounds.dK),
        ("dv.npy", reference.dV, reference.bounds.dV),
        ("db.npy", reference.dBias!, reference.bounds.dBias!),
      ]
      for (name, expected, bounds) in pairs {
        let written = try read(name)
        #expect(written.count == expected.count, "\(name)")
        for e in expected.indices {
          #expect(abs(Double(written.scalars[e]) - expected[e]) <= bounds[e], "\(name)[\(e)]")
        }
      }
      // The fully masked row 2 of the bias takes no gradient.
      let dBias = try read("db.npy")
      #expect(dBias.scalars[12..<18].allSatisfy { $0 == 0 })
    }
  }

  @Test("--explain walks through the backward steps; dS rows sum to 0")
  func explain() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        ["backward", "--explain", "--p", "0.3", "--format", "json"], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let json = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
      let steps = json?["steps"] as? [[String: Any]] ?? []
      #expect(
        steps.compactMap { $0["name"] as? String } == [
          "weights", "dropout_mask", "grad_output", "grad_values", "grad_weights", "delta",
          "grad_scores", "grad_queries", "grad_keys",
        ])
      let sums = steps.first { $0["name"] as? String == "grad_scores" }?["row_sums"] as? [Double]
      #expect(sums?.count == 4)
      #expect(sums?.allSatisfy { abs($0) < 1e-6 } == true)
    }
  }

  @Test("misuse is one line, a documented exit code, and no file")
  func errors() throws {
    try AttnCLI.withTemporaryFolder { folder in
      _ = try Self.writeInputs(in: folder)
      var wrong = try Tensor(shape: [2, 3, 6, 5])
      wrong[0, 0, 0, 0] = 1
      try Data(NPY.encode(wrong)).write(to: folder.appendingPathComponent("wrong.npy"))
      let cases: [([String], Int32, String)] = [
        (["backward", "--dbias-out", "db.npy"], 64, "--dbias-out needs --bias"),
        (
          ["backward", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--grad-out", "wrong.npy"],
          1, "dO must have the output's shape [2, 3, 6, 4]"
        ),
        (["backward", "--explain-batch", "1"], 64, "--explain-batch needs --explain"),
        (
          ["backward", "--explain", "--explain-batch", "3"], 64, "--explain-batch 3 is out of range"
        ),
        (["backward", "--grad-out", "q.npy", "--dq-out", "q.npy"], 64, "q.npy"),
      ]
      for (arguments, status, message) in cases {
        let before = try AttnCLI.contents(of: folder)
        let run = try AttnCLI.run(arguments + ["--dk-out", "dk.npy"], in: folder)
        #expect(run.status == status, "\(arguments): \(run.stderr)")
        #expect(run.stderrLines.count == 1, "\(run.stderr)")
        #expect(run.stderr.contains(message), "\(run.stderr)")
        #expect(try AttnCLI.contents(of: folder) == before)
      }
    }
  }
}
