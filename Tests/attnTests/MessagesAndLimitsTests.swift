import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// Issue #23 items 9 ("messages that point the wrong way") and 10 ("small ones"), through the
/// executable: each message names what is wrong, and each small limit is a usage error (64).
@Suite("Messages and limits (#23 items 9 and 10)")
struct MessagesAndLimitsTests {
  static let mha = Fixtures.folder("mha")

  static func mhaFile(_ name: String) -> String { mha.appendingPathComponent(name).path }

  /// The llama fixture's layer, arguments without `--heads`/`--kv-heads`/`--prefix`.
  static let llama = [
    "mha", "--weights", mhaFile("mha__llama_gqa4_offset0__weights.safetensors"), "--input",
    mhaFile("mha__llama_gqa4_offset0__input.npy"), "--layout", "llama",
  ]

  static func qkv(in folder: URL, length: Int = 5, headDim: Int = 4) throws {
    for (name, stream) in [
      ("q", RandomStream.queries), ("k", RandomStream.keys), ("v", RandomStream.values),
    ] {
      let tensor = try Tensor.randomNormal(shape: [1, 2, length, headDim], seed: 9, stream: stream)
      try Data(NPY.encode(tensor)).write(to: folder.appendingPathComponent("\(name).npy"))
    }
  }

  static func expect(
    _ run: AttnCLI.Run, status: Int32, _ fragments: [String],
    sourceLocation: SourceLocation = #_sourceLocation
  ) {
    #expect(run.status == status, "stderr: \(run.stderr)", sourceLocation: sourceLocation)
    #expect(run.stderrLines.count == 1, "stderr: \(run.stderr)", sourceLocation: sourceLocation)
    for fragment in fragments {
      #expect(
        run.stderr.contains(fragment), "no \(fragment) in: \(run.stderr)",
        sourceLocation: sourceLocation)
    }
  }

  // MARK: - Item 9

  @Test("item 9: --heads 8 --kv-heads 3 blames the flags, not a tensor's shape")
  func item9KeyValueHeadsNotADivisor() throws {
    let run = try AttnCLI.withTemporaryFolder {
      try AttnCLI.run(
        Self.llama + ["--prefix", "model.layers.0.self_attn.", "--heads", "8", "--kv-heads", "3"],
        in: $0)
    }
    Self.expect(run, status: 64, ["--heads 8", "multiple of --kv-heads 3"])
  }

  @Test("item 9: a --prefix above several layers says so and suggests one layer's prefix")
  func item9PrefixOverSeveralLayers() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let layer = try SafeTensors.read(
        contentsOf: Self.mhaFile("mha__llama_gqa4_offset0__weights.safetensors")
      ).tensors
      var model: [String: Tensor] = [:]
      for (name, tensor) in layer {
        for index in 0..<3 {
          model[name.replacingOccurrences(of: "layers.0.", with: "layers.\(index).")] = tensor
        }
      }
      try Data(SafeTensors.encode(model)).write(to: folder.appendingPathComponent("m.safetensors"))
      var arguments = Self.llama
      arguments[2] = "m.safetensors"
      let run = try AttnCLI.run(
        arguments + ["--prefix", "model.layers.", "--heads", "8", "--kv-heads", "2"], in: folder)
      Self.expect(
        run, status: 1,
        [
          "holds 3 layers' tensors", "model.layers.0., …, model.layers.2.",
          "--prefix model.layers.0.self_attn.",
        ])
      // The suggested prefix runs.
      let fixed = try AttnCLI.run(
        arguments + ["--prefix", "model.layers.0.self_attn.", "--heads", "8", "--kv-heads", "2"],
        in: folder)
      #expect(fixed.status == 0, "\(fixed.stderr)")
    }
  }

  @Test("item 9: --kernel auto over the budget states the bytes the weights need")
  func item9AutoBudgetStatesTheBytes() throws {
    try AttnCLI.withTemporaryFolder { folder in
      // Q, K, V [1, 2, 20, 1]: 480 bytes in all, within the budget; the [1, 2, 20, 20] float32
      // weights need 3200 bytes (3.12 KiB), over it.
      try Self.qkv(in: folder, length: 20, headDim: 1)
      let run = try AttnCLI.run(
        [
          "sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--kernel", "auto",
          "--weights-out", "w.npy", "--max-memory", "1000",
        ], in: folder)
      Self.expect(
        run, status: 1, ["the weights for w.npy: 3.12 KiB needed", "over the budget of 1000 B"])
      #expect(!run.stderr.contains("more bytes than memory can index"))
      #expect(!FileManager.default.fileExists(atPath: folder.appendingPathComponent("w.npy").path))
    }
  }

  @Test("item 9: FILE.safetensors:NAME given to a .npy-only flag says what the flag reads")
  func item9SafetensorsAddressToANpyFlag() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let q = try Tensor.randomNormal(shape: [1, 4, 8], seed: 1, stream: 0)
      try Data(SafeTensors.encode(["q": q])).write(
        to: folder.appendingPathComponent("t.safetensors"))
      try Data(NPY.encode(q)).write(to: folder.appendingPathComponent("q.npy"))
      let run = try AttnCLI.run(
        ["dropout", "--q", "t.safetensors:q", "--k", "q.npy", "--v", "q.npy"], in: folder)
      Self.expect(run, status: 1, ["t.safetensors:q", "this flag reads a .npy file", "attn sdpa"])
      #expect(!run.stderr.contains("no such file"))
    }
  }

  @Test("item 9: relpos --grads-out and --save-weights refuse a .npy name (they write safetensors)")
  func item9SafetensorsOutputsRefuseNpyNames() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let dY = try Tensor.randomNormal(shape: [1, 4, 8], seed: 2, stream: 0)
      try Data(NPY.encode(dY)).write(to: folder.appendingPathComponent("dy.npy"))
      let base = ["relpos", "--seq-len", "4", "--d-model", "8", "--batch", "1"]
      for (flag, extra) in [
        ("--grads-out", ["--grad-out", "dy.npy"]), ("--save-weights", [String]()),
      ] {
        let run = try AttnCLI.run(base + extra + [flag, "g.npy"], in: folder)
        Self.expect(run, status: 64, [flag, "name it .safetensors"])
      }
      #expect(try AttnCLI.contents(of: folder) == ["dy.npy"])
    }
  }

  // MARK: - Item 10

  @Test("item 10: JSON gives scale null for D = 0, a number otherwise")
  func item10ScaleIsNullForZeroHeadDim() throws {
    try AttnCLI.withTemporaryFolder { folder in
      for (d, expectNull) in [(0, true), (4, false)] {
        try Self.qkv(in: folder, headDim: d)
        let run = try AttnCLI.run(
          ["sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--format", "json"],
          in: folder)
        try #require(run.status == 0, "D = \(d): \(run.stderr)")
        let json = try #require(
          JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        if expectNull {
          #expect(json["scale"] is NSNull, "D = 0: scale is \(String(describing: json["scale"]))")
        } else {
          #expect((json["scale"] as? Double) == 0.5, "D = 4: scale 1/√4")
        }
      }
    }
  }

  @Test(
    "item 10: bench refuses an empty --cases, --heads over 65536, --causal-align without --causal",
    arguments: [
      (["--cases", ""], "--cases names no case"),
      (["--heads", "65537"], "--heads must be in 1…65536"),
      (["--kv-heads", "65537"], "--kv-heads must be in 1…65536"),
      (["--seq-len", "64", "--causal-align", "bottom-right"], "--causal-align goes with --causal"),
    ])
  func item10BenchLimits(arguments: [String], message: String) throws {
    let run = try AttnCLI.withTemporaryFolder { try AttnCLI.run(["bench"] + arguments, in: $0) }
    Self.expect(run, status: 64, [message])
  }

  @Test(
    "item 10: --d-k and --seq-len beyond their limits are usage errors in dropout and backward",
    arguments: ["dropout", "backward"])
  func item10SizeFlagsAreUsageErrors(command: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      Self.expect(
        try AttnCLI.run([command, "--d-k", "65537"], in: folder), status: 64,
        ["--d-k must be in 1…65536"])
      Self.expect(
        try AttnCLI.run([command, "--seq-len", "1048577"], in: folder), status: 64,
        ["--seq-len must be in 1…1048576"])
    }
  }

  @Test("item 10: mha --decode says that it makes the full pass causal (torch and bert layouts)")
  func item10DecodeSaysCausal() throws {
    let name = "mha__torch_float_mask_causal__"
    let base = [
      "mha", "--weights", Self.mhaFile(name + "weights.safetensors"), "--input",
      Self.mhaFile(name + "input.npy"), "--layout", "torch", "--prefix", "attn.", "--heads", "4",
    ]
    try AttnCLI.withTemporaryFolder { folder in
      let decoded = try AttnCLI.run(base + ["--decode"], in: folder)
      try #require(decoded.status == 0, "\(decoded.stderr)")
      #expect(decoded.stdout.contains("causal (as --decode: a token cannot see later ones)"))
      let plain = try AttnCLI.run(base, in: folder)
      try #require(plain.status == 0, "\(plain.stderr)")
      let masks = plain.stdout.split(separator: "\n").first { $0.contains("→ output") } ?? ""
      #expect(masks.hasSuffix("no mask"), "no causal mask without --decode: \(masks)")
    }
  }
}
