import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `attn sdpa`: PyTorch's conventions on the command line. These tests hold flags against their
/// equivalents (a boolean mask against the same mask as −∞/0 floats, `--causal-align
/// bottom-right` against its explicit mask, a safetensors address against the same `.npy`), so
/// no expected number comes from the code under test; the numbers themselves are checked against
/// numpy's float64 values in AttentionKitTests (SDPATests).
@Suite("attn sdpa (the executable)")
struct SdpaCommandTests {
  /// Q [1, 4, 5, 8], K and V [1, 2, 9, 8] (grouped: 4 query heads on 2), a boolean mask [5, 9]
  /// with a fully masked row, the same mask as floats (0 / −∞), and Q, K, V in one safetensors.
  static func writeInputs(in folder: URL) throws {
    let q = try Tensor.randomNormal(shape: [1, 4, 5, 8], seed: 3, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: [1, 2, 9, 8], seed: 3, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: [1, 2, 9, 8], seed: 3, stream: RandomStream.values)
    var keep = try Tensor(shape: [5, 9], repeating: 1)
    for j in 0..<9 { keep[1, j] = 0 }
    keep[3, 2] = 0
    var additive = keep
    additive.scalars = keep.scalars.map { $0 == 0 ? -.infinity : 0 }
    // Bottom-right causal for Tq 5, Tk 9: query i sees keys j ≤ i + 4.
    var lowerRight = try Tensor(shape: [5, 9])
    for i in 0..<5 { for j in 0..<9 where j <= i + 4 { lowerRight[i, j] = 1 } }
    let files: [(String, [UInt8])] = [
      ("q.npy", NPY.encode(q)), ("k.npy", NPY.encode(k)), ("v.npy", NPY.encode(v)),
      ("q16.npy", NPY.encode(q, dtype: .float16)),
      ("mask_bool.npy", boolNPY(keep)), ("mask_float.npy", NPY.encode(additive)),
      ("mask_lower_right.npy", boolNPY(lowerRight)),
      ("mask_int.npy", NPY.encode(keep, dtype: .float32).withDescr("<f4", replacedBy: "<i4")),
      ("qkv.safetensors", try SafeTensors.encode(["q": q, "k": k, "v": v])),
    ]
    for (name, bytes) in files {
      try Data(bytes).write(to: folder.appendingPathComponent(name))
    }
  }

  /// A `|b1` `.npy` of a 0/1 tensor.
  static func boolNPY(_ tensor: Tensor) -> [UInt8] {
    let header = NPY.encode(try! Tensor(shape: tensor.shape)).prefix { $0 != 0x0A }
    let text = String(decoding: header.dropFirst(10), as: UTF8.self)
      .replacingOccurrences(of: "'<f4'", with: "'|b1'")
    var dict = Array(text.utf8)
    // Keep numpy's padding rule: the header ends on a multiple of 64 bytes, then a newline.
    while (10 + dict.count + 1) % 64 != 0 { dict.append(0x20) }
    let length = dict.count + 1
    return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(length & 0xFF), UInt8(length >> 8)]
      + dict + [0x0A] + tensor.scalars.map { $0 != 0 ? 1 : 0 }
  }

  static let qkv = ["--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--enable-gqa"]

  static func output(_ name: String, in folder: URL) throws -> [Float] {
    try NPY.read(contentsOf: folder.appendingPathComponent(name).path).tensor.scalars
  }

  @Test(
    "a boolean mask (True = attend) and the same mask as floats (added) give the same output",
    arguments: ["materialized", "tiled"])
  func booleanAndFloatMasks(kernel: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeInputs(in: folder)
      for (mask, out) in [("mask_bool.npy", "a.npy"), ("mask_float.npy", "b.npy")] {
        let run = try AttnCLI.run(
          ["sdpa"] + Self.qkv + ["--attn-mask", mask, "--kernel", kernel, "--out", out],
          in: folder)
        #expect(run.status == 0, "\(mask): \(run.stderr)")
        #expect(run.stdout.contains("Verified."))
      }
      let (a, b) = (try Self.output("a.npy", in: folder), try Self.output("b.npy", in: folder))
      #expect(a == b)
      // Row 1 of every head sees no key: zeros, as PyTorch ≥ 2.5.
      for head in 0..<4 {
        let row = (head * 5 + 1) * 8
        #expect(a[row..<(row + 8)].allSatisfy { $0 == 0 }, "head \(head)")
      }
    }
  }

  @Test("--is-causal --causal-align bottom-right equals its explicit boolean mask")
  func bottomRight() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeInputs(in: folder)
      let flags = try AttnCLI.run(
        ["sdpa"] + Self.qkv + ["--is-causal", "--causal-align", "bottom-right", "--out", "a.npy"],
        in: folder)
      let mask = try AttnCLI.run(
        ["sdpa"] + Self.qkv + ["--attn-mask", "mask_lower_right.npy", "--out", "b.npy"],
        in: folder)
      #expect(flags.status == 0 && mask.status == 0, "\(flags.stderr) \(mask.stderr)")
      #expect(try Self.output("a.npy", in: folder) == Self.output("b.npy", in: folder))
      let topLeft = try AttnCLI.run(
        ["sdpa"] + Self.qkv + ["--is-causal", "--out", "c.npy"], in: folder)
      #expect(topLeft.status == 0)
      #expect(try Self.output("a.npy", in: folder) != Self.output("c.npy", in: folder))
    }
  }

  @Test("a safetensors address reads the same tensors as the .npy files")
  func safetensorsAddress() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeInputs(in: folder)
      let npy = try AttnCLI.run(["sdpa"] + Self.qkv + ["--out", "a.npy"], in: folder)
      let st = try AttnCLI.run(
        [
          "sdpa", "--query", "qkv.safetensors:q", "--key", "qkv.safetensors:k", "--value",
          "qkv.safetensors:v", "--enable-gqa", "--out", "b.npy",
        ], in: folder)
      #expect(npy.status == 0 && st.status == 0, "\(npy.stderr) \(st.stderr)")
      #expect(try Self.output("a.npy", in: folder) == Self.output("b.npy", in: folder))
    }
  }

  /// float16 output: the float32 output rounded to nearest even (numpy's `astype`), which the
  /// reader widens exactly; so the float16 file equals the float32 file rounded here.
  @Test("--out-dtype input writes float16 for a float16 query, and bfloat16 only as safetensors")
  func outputTypes() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeInputs(in: folder)
      let half = try AttnCLI.run(
        [
          "sdpa", "--query", "q16.npy", "--key", "k.npy", "--value", "v.npy", "--enable-gqa",
          "--out", "h.npy", "--out-dtype", "input",
        ], in: folder)
      #expect(half.status == 0, "\(half.stderr)")
      let array = try NPY.read(contentsOf: folder.appendingPathComponent("h.npy").path)
      #expect(array.dtype == .float16)
      let single = try AttnCLI.run(
        [
          "sdpa", "--query", "q16.npy", "--key", "k.npy", "--value", "v.npy", "--enable-gqa",
          "--out", "s.npy",
        ], in: folder)
      #expect(single.status == 0)
      let rounded = try Self.output("s.npy", in: folder).map {
        HalfPrecision.float(fromF16Bits: HalfPrecision.f16Bits(from: $0))
      }
      #expect(array.tensor.scalars == rounded)
    }
  }

  @Test(
    "PyTorch's errors: GQA without --enable-gqa, a mask with --is-causal, an integer mask",
    arguments: [
      (["--query", "q.npy", "--key", "k.npy", "--value", "v.npy"], 1, "--enable-gqa"),
      (qkv + ["--is-causal", "--attn-mask", "mask_bool.npy"], 64, "is_causal"),
      (qkv + ["--attn-mask", "mask_int.npy"], 1, "boolean"),
      (qkv + ["--window", "0"], 64, "--window"),
    ] as [([String], Int32, String)])
  func errors(arguments: [String], status: Int32, mention: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeInputs(in: folder)
      let run = try AttnCLI.run(["sdpa"] + arguments, in: folder)
      #expect(run.status == status, "\(run.stderr)")
      #expect(run.stderrLines.count == 1 && run.stderr.contains(mention), "\(run.stderr)")
    }
  }
}

extension [UInt8] {
  /// The same bytes with the header's dtype string replaced (same length), for odd dtypes.
  fileprivate func withDescr(_ old: String, replacedBy new: String) -> [UInt8] {
    let pattern = Array("'\(old)'".utf8)
    guard
      let start = indices.first(where: { i in
        i + pattern.count <= count && Array(self[i..<(i + pattern.count)]) == pattern
      })
    else { return self }
    var bytes = self
    bytes.replaceSubrange((start + 1)..<(start + 1 + new.utf8.count), with: Array(new.utf8))
    return bytes
  }

}
