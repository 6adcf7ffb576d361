import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn check` on PyTorch's own CPU results (`Fixtures/check`, written by
/// `Scripts/fixtures/make_check_fixtures.py` with torch 2.15: grouped-query heads, a boolean
/// bottom-right causal mask, a negative scale, float32 and float16 outputs, autograd's gradients).
/// PyTorch's float32 results are correct to float32 rounding, so they must verify; each planted
/// bug moves a value by far more than its bound (bounds are about 10⁻⁶ of the values here, the
/// plants 10⁻² or more), so it must fail, and the report must name the planted element.
@Suite("attn check (the executable)")
struct CheckCommandTests {
  static let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("_TestSupport/Fixtures/check")

  static func path(_ name: String) -> String { folder.appendingPathComponent(name).path }

  /// The problem's flags, as PyTorch was called.
  static let problem = [
    "check", "--query", path("q.npy"), "--key", path("k.npy"), "--value", path("v.npy"),
    "--attn-mask", path("mask.npy"), "--scale", "-0.3", "--enable-gqa",
  ]

  static func json(_ run: AttnCLI.Run) throws -> [String: Any] {
    try #require(
      JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any],
      "stdout is not a JSON object: \(run.stdout)")
  }

  static func tensorReport(_ run: AttnCLI.Run, _ name: String) throws -> [String: Any] {
    let tensors = try #require(try json(run)["tensors"] as? [String: Any])
    return try #require(tensors[name] as? [String: Any], "no \(name) in \(run.stdout)")
  }

  /// `name` read, changed by `plant`, written to `folder` as `planted_<name>`.
  static func planted(_ name: String, in folder: URL, _ plant: (inout Tensor) -> Void) throws
    -> String
  {
    var tensor = try NPY.read(contentsOf: path(name)).tensor
    plant(&tensor)
    let target = folder.appendingPathComponent("planted_\(name)").path
    try NPY.write(tensor, to: target)
    return target
  }

  @Test("PyTorch's float32 output, weights and gradients verify (negative scale, GQA, mask)")
  func pytorchVerifies() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        Self.problem + [
          "--output", Self.path("output.npy"), "--weights", Self.path("weights.npy"),
          "--grad-out", Self.path("do.npy"), "--dq", Self.path("dq.npy"), "--dk",
          Self.path("dk.npy"), "--dv", Self.path("dv.npy"), "--format", "json",
        ], in: folder)
      #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
      #expect(try Self.json(run)["verified"] as? Bool == true)
      for name in ["output", "weights"] {
        let report = try Self.tensorReport(run, name)
        // 1 × 4 heads × 24 queries: every row, under the default budget.
        #expect(report["rows_checked"] as? Int == 96)
        #expect((report["worst_ratio"] as? Double ?? 2) <= 1)
      }
      for name in ["dQ", "dK", "dV"] {
        #expect((try Self.tensorReport(run, name)["worst_ratio"] as? Double ?? 2) <= 1)
      }
    }
  }

  @Test("PyTorch's float16 output verifies with --precision float16, not as float32")
  func halfPrecision() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let inputs = [
        "check", "--query", Self.path("q16.npy"), "--key", Self.path("k16.npy"), "--value",
        Self.path("v16.npy"), "--attn-mask", Self.path("mask.npy"), "--scale", "-0.3",
        "--enable-gqa", "--output", Self.path("output16.npy"),
      ]
      let half = try AttnCLI.run(inputs + ["--precision", "float16"], in: folder)
      #expect(half.status == 0, "\(half.stdout) \(half.stderr)")
      // Rounded to 11 significant bits, the output is far outside float32's bounds.
      let single = try AttnCLI.run(inputs, in: folder)
      #expect(single.status == 1, "\(single.stdout)")
    }
  }

  @Test("One output element off fails, and the report names it")
  func oneElementOff() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let output = try Self.planted("output.npy", in: folder) { $0[0, 2, 5, 3] += 0.01 }
      let run = try AttnCLI.run(
        Self.problem + ["--output", output, "--format", "json"], in: folder)
      #expect(run.status == 1)
      let report = try Self.tensorReport(run, "output")
      #expect(report["worst_at"] as? [Int] == [0, 2, 5, 3])
      #expect((report["worst_ratio"] as? Double ?? 0) > 1)
      let text = try AttnCLI.run(Self.problem + ["--output", output], in: folder)
      #expect(text.status == 1)
      #expect(text.stdout.contains("output[0, 2, 5, 3]"), "\(text.stdout)")
      #expect(text.stdout.contains("NOT verified."))
    }
  }

  /// A float64 candidate read as `Float` saturates beyond its range: the report shows the
  /// value the file holds, not `Float.greatestFiniteMagnitude`.
  @Test("A float64 output element beyond float32's range fails, reported with its file value")
  func saturatedCandidate() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let tensor = try NPY.read(contentsOf: Self.path("output.npy")).tensor
      var values = tensor.scalars.map(Double.init)
      let flat = ((0 * 4 + 1) * 24 + 7) * 16 + 2  // [0, 1, 7, 2] of [1, 4, 24, 16]
      values[flat] = 1e300
      let target = folder.appendingPathComponent("output64.npy")
      try Data(
        BadInputFiles.npy(
          descr: "<f8", shape: tensor.shape,
          data: BadInputFiles.littleEndian(values.map(\.bitPattern)))
      ).write(to: target)
      let run = try AttnCLI.run(Self.problem + ["--output", target.path], in: folder)
      #expect(run.status == 1)
      #expect(run.stdout.contains("output[0, 1, 7, 2] = 1e+300"), "\(run.stdout)")
      let json = try AttnCLI.run(
        Self.problem + ["--output", target.path, "--format", "json"], in: folder)
      #expect(try Self.tensorReport(json, "output")["actual"] as? Double == 1e300)
    }
  }

  @Test("Two query rows swapped fail")
  func rowsSwapped() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let output = try Self.planted("output.npy", in: folder) { t in
        for c in 0..<16 {
          let a = t[0, 1, 3, c]
          t[0, 1, 3, c] = t[0, 1, 7, c]
          t[0, 1, 7, c] = a
        }
      }
      let run = try AttnCLI.run(
        Self.problem + ["--output", output, "--format", "json"], in: folder)
      #expect(run.status == 1)
      let row = try #require(try Self.tensorReport(run, "output")["worst_at"] as? [Int])
      #expect(Array(row.prefix(2)) == [0, 1] && [3, 7].contains(row[2]), "\(row)")
    }
  }

  @Test(
    "A problem stated wrongly fails PyTorch's output: scale missing, mask ignored, wrong alignment",
    arguments: [
      ["--scale", "-0.3"],  // stated rightly, for contrast: must pass
      [],  // scale missing (1/√D instead of −0.3)
      ["--scale", "0.3"],  // the scale's sign dropped
    ])
  func problemStatedWrongly(scale: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      let base = [
        "check", "--query", Self.path("q.npy"), "--key", Self.path("k.npy"), "--value",
        Self.path("v.npy"), "--enable-gqa", "--output", Self.path("output.npy"),
      ]
      let withMask = try AttnCLI.run(
        base + ["--attn-mask", Self.path("mask.npy")] + scale, in: folder)
      #expect(withMask.status == (scale == ["--scale", "-0.3"] ? 0 : 1), "\(withMask.stdout)")
      // The mask ignored, or the causal mask aligned top-left instead of bottom-right.
      for mask in [[], ["--is-causal"]] {
        let run = try AttnCLI.run(base + mask + ["--scale", "-0.3"], in: folder)
        #expect(run.status == 1, "\(mask): \(run.stdout)")
      }
      let aligned = try AttnCLI.run(
        base + ["--is-causal", "--causal-align", "bottom-right", "--scale", "-0.3"], in: folder)
      #expect(aligned.status == 0, "\(aligned.stdout)")
    }
  }

  @Test("A gradient element off fails, named; --dq without --grad-out is a usage error")
  func gradientOff() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let dk = try Self.planted("dk.npy", in: folder) { $0[0, 1, 17, 4] *= 1.01 }
      let run = try AttnCLI.run(
        Self.problem + ["--grad-out", Self.path("do.npy"), "--dk", dk, "--format", "json"],
        in: folder)
      #expect(run.status == 1)
      #expect(try Self.tensorReport(run, "dK")["worst_at"] as? [Int] == [0, 1, 17, 4])
      let usage = try AttnCLI.run(Self.problem + ["--dq", Self.path("dq.npy")], in: folder)
      #expect(usage.status == 64)
      #expect(usage.stderr.contains("--grad-out"))
      let nothing = try AttnCLI.run(Self.problem, in: folder)
      #expect(nothing.status == 64)
    }
  }

  @Test("--rows N samples N rows; a mis-shaped candidate is a one-line error")
  func sampledRowsAndShapes() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        Self.problem + [
          "--output", Self.path("output.npy"), "--rows", "10", "--seed", "3", "--format", "json",
        ], in: folder)
      #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
      #expect(try Self.tensorReport(run, "output")["rows_checked"] as? Int == 10)
      let wrong = try AttnCLI.run(Self.problem + ["--output", Self.path("dk.npy")], in: folder)
      #expect(wrong.status == 1)
      #expect(wrong.stderrLines.count == 1 && wrong.stderr.contains("shape"), "\(wrong.stderr)")
    }
  }
}
