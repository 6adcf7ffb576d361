import AttentionKit
import Foundation
import TensorIO
import Testing

/// Issue 23, item 1, through the executable: `--p` and `--dropout-p` are read as float64, as
/// PyTorch takes `p`, so a kept weight is the float32 product of the weight and PyTorch's
/// `fl32(1/fl32(1 − p))`. At p = 0.9 that factor is exactly 10; the float32 `0.9` would give
/// 9.999998, a weight differing in its last bits. Exact comparisons: the weights before dropout
/// come from the same inputs through the same kernel (`--eval`, or `--dropout-p 0`), and dropout
/// is one float32 multiplication.
@Suite("Item 1: attn scales kept weights by PyTorch's float32 1/(1 − p)")
struct DropoutScaleCommandTests {
  static func weights(_ folder: URL, _ name: String) throws -> [Float] {
    try NPY.read(contentsOf: folder.appendingPathComponent(name).path).tensor.scalars
  }

  static func expectScaled(_ pre: [Float], _ post: [Float], by scale: Float, _ label: String) {
    #expect(pre.count == post.count && !pre.isEmpty, "\(label): \(pre.count) vs \(post.count)")
    var wrong: [String] = []
    var kept = 0
    for (e, (w, d)) in zip(pre, post).enumerated() where d != 0 {
      kept += 1
      if d.bitPattern != (w * scale).bitPattern { wrong.append("[\(e)] \(d) ≠ \(w) × \(scale)") }
    }
    #expect(kept > 0, "\(label): every weight dropped")
    #expect(wrong.isEmpty, "\(label): \(wrong.count) kept weights off: \(wrong.prefix(3))")
  }

  @Test("Item 1: attn dropout --p 0.9 and attn sdpa --dropout-p 0.9 scale kept weights by 10")
  func item1CommandsUsePyTorchsScale() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let shape = ["--seq-len", "32", "--batch", "2", "--seed", "5"]
      let runs = [
        (["dropout", "--eval"] + shape, "pre.npy"),
        (["dropout", "--p", "0.9"] + shape, "post.npy"),
      ]
      for (arguments, file) in runs {
        let run = try AttnCLI.run(arguments + ["--weights-out", file], in: folder)
        try #require(run.status == 0, "\(arguments): exit \(run.status), \(run.stderr)")
      }
      Self.expectScaled(
        try Self.weights(folder, "pre.npy"), try Self.weights(folder, "post.npy"), by: 10,
        "attn dropout --p 0.9")

      let q = try Tensor.randomNormal(shape: [1, 2, 16, 8], seed: 6, stream: 1)
      let k = try Tensor.randomNormal(shape: [1, 2, 24, 8], seed: 6, stream: 2)
      let v = try Tensor.randomNormal(shape: [1, 2, 24, 8], seed: 6, stream: 3)
      for (name, tensor) in [("q.npy", q), ("k.npy", k), ("v.npy", v)] {
        try Data(NPY.encode(tensor)).write(to: folder.appendingPathComponent(name))
      }
      let inputs = ["sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "v.npy"]
      for (p, file) in [("0", "sdpa-pre.npy"), ("0.9", "sdpa-post.npy")] {
        let run = try AttnCLI.run(
          inputs + ["--dropout-p", p, "--kernel", "materialized", "--weights-out", file],
          in: folder)
        try #require(run.status == 0, "sdpa --dropout-p \(p): exit \(run.status), \(run.stderr)")
      }
      Self.expectScaled(
        try Self.weights(folder, "sdpa-pre.npy"), try Self.weights(folder, "sdpa-post.npy"),
        by: 10, "attn sdpa --dropout-p 0.9")
    }
  }
}
