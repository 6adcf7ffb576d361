import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// Issue #23 ("fidelity, round three"), items 2, 3 and 4, through the executable: what a
/// user's files do to a run. The readers' side is in TensorIOTests' InputFidelityIOTests. No
/// expected number comes from the code under test: outputs are compared with the same problem
/// given another way (a `.npy` against a safetensors address, a boolean mask against `|b1`) or
/// with a value derived by hand (the mean of V).
@Suite("Input fidelity (#23 items 2, 3, 4; the executable)")
struct InputFidelityTests {
  /// Q `[1, 2, 4, 8]`, K and V `[1, 2, 6, 8]`: Tq = 4, Tk = 6.
  static func qkv() throws -> (q: Tensor, k: Tensor, v: Tensor) {
    (
      try Tensor.randomNormal(shape: [1, 2, 4, 8], seed: 23, stream: RandomStream.queries),
      try Tensor.randomNormal(shape: [1, 2, 6, 8], seed: 23, stream: RandomStream.keys),
      try Tensor.randomNormal(shape: [1, 2, 6, 8], seed: 23, stream: RandomStream.values)
    )
  }

  static func write(_ files: [String: [UInt8]], in folder: URL) throws {
    for (name, bytes) in files {
      try Data(bytes).write(to: folder.appendingPathComponent(name))
    }
  }

  /// q.npy, k.npy, v.npy.
  static func writeQKV(in folder: URL) throws {
    let (q, k, v) = try qkv()
    try write(["q.npy": NPY.encode(q), "k.npy": NPY.encode(k), "v.npy": NPY.encode(v)], in: folder)
  }

  static let npyQKV = ["--query", "q.npy", "--key", "k.npy", "--value", "v.npy"]

  static func scalars(_ name: String, in folder: URL) throws -> [Float] {
    try NPY.read(contentsOf: folder.appendingPathComponent(name).path).tensor.scalars
  }

  /// The one-line error of a failed run: status 1, one line on stderr holding every fragment.
  static func expectRuntimeError(
    _ run: AttnCLI.Run, _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation
  ) {
    #expect(run.status == 1, "stderr: \(run.stderr)", sourceLocation: sourceLocation)
    #expect(run.stderrLines.count == 1, "stderr: \(run.stderr)", sourceLocation: sourceLocation)
    for fragment in fragments {
      #expect(
        run.stderr.contains(fragment), "no \(fragment) in: \(run.stderr)",
        sourceLocation: sourceLocation)
    }
  }

  // MARK: - Item 2

  @Test(
    "item 2: FILE.safetensors:NAME reads only NAME, whatever else the file holds")
  func item2SafetensorsAddressReadsOnlyName() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeQKV(in: folder)
      let (q, k, v) = try Self.qkv()
      try HandWrittenFiles.modelSafetensors(
        at: folder.appendingPathComponent("model.safetensors").path,
        around: ["q": q, "k": k, "v": v], bigBytes: 1 << 30)
      let npy = try AttnCLI.run(["sdpa"] + Self.npyQKV + ["--out", "a.npy"], in: folder)
      // Q, K, V take 1 KiB: a 1 MiB budget is a thousandth of the neighbour alone.
      let addressed = try AttnCLI.run(
        [
          "sdpa", "--query", "model.safetensors:q", "--key", "model.safetensors:k", "--value",
          "model.safetensors:v", "--max-memory", "1M", "--out", "b.npy",
        ], in: folder)
      #expect(npy.status == 0 && addressed.status == 0, "\(npy.stderr) \(addressed.stderr)")
      #expect(try Self.scalars("a.npy", in: folder) == Self.scalars("b.npy", in: folder))
      // A name the file does not hold is still an error, listing what it holds.
      let missing = try AttnCLI.run(
        ["sdpa", "--query", "model.safetensors:x"] + Self.npyQKV.dropFirst(2), in: folder)
      Self.expectRuntimeError(
        missing, ["model.safetensors", #"tensor "x" is missing"#, #""position_ids""#])
    }
  }

  @Test("item 2: FILE.safetensors:NAME costs no resident memory for the file's other tensors")
  func item2SafetensorsAddressCostsNoMemory() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let (q, k, v) = try Self.qkv()
      let path = folder.appendingPathComponent("model.safetensors").path
      // An F32 neighbour of 256 MiB and nothing else: a whole-file read could decode it all.
      let big = 256 << 20
      try HandWrittenFiles.modelSafetensors(
        at: path, around: ["q": q, "k": k, "v": v], bigBytes: big, otherDtypes: false)
      let (status, peak, stderr) = try PeakMemory.run(
        ["sdpa", "--query", path + ":q", "--key", path + ":k", "--value", path + ":v"],
        in: folder)
      #expect(status == 0, "\(stderr)")
      // attn's own peak is about 30 MiB here; reading the neighbour would add 256 MiB.
      #expect(peak < big / 2, "peak resident memory \(formatBytes(peak))")
    }
  }

  // MARK: - Item 3

  @Test(
    "item 3: a BOOL safetensors --attn-mask is True = attend, as a |b1 .npy",
    arguments: ["materialized", "tiled"])
  func item3BooleanSafetensorsMask(kernel: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeQKV(in: folder)
      // Query 1 sees no key (a zero row, as PyTorch ≥ 2.5); query 2 does not see key 4.
      var keep = try Tensor(shape: [4, 6], repeating: 1)
      for j in 0..<6 { keep[1, j] = 0 }
      keep[2, 4] = 0
      try Self.write(
        [
          "m.safetensors": try SafeTensors.encode(["m": keep], dtype: .bool),
          "m.npy": BadInputFiles.npy(
            descr: "|b1", shape: [4, 6], data: keep.scalars.map { $0 == 1 ? 1 : 0 }),
        ], in: folder)
      for (mask, out) in [("m.safetensors:m", "a.npy"), ("m.npy", "b.npy")] {
        let run = try AttnCLI.run(
          ["sdpa"] + Self.npyQKV + ["--attn-mask", mask, "--kernel", kernel, "--out", out],
          in: folder)
        #expect(run.status == 0, "\(mask): \(run.stderr)")
        #expect(run.stdout.contains("boolean mask"), "\(run.stdout)")
      }
      let (a, b) = (try Self.scalars("a.npy", in: folder), try Self.scalars("b.npy", in: folder))
      #expect(a == b)
      for head in 0..<2 {
        let row = (head * 4 + 1) * 8
        #expect(a[row..<(row + 8)].allSatisfy { $0 == 0 }, "head \(head): \(a[row..<(row + 8)])")
      }
    }
  }

  // MARK: - Item 4

  /// V whose column 3 is `value` at every key: the output's column 3 is a weighted mean of it,
  /// `value` to float32 rounding, in every row — finite in float32, beyond a 16-bit format.
  static func writeLargeV(_ value: Float, in folder: URL) throws {
    var (_, _, v) = try qkv()
    for key in 0..<12 { v.scalars[key * 8 + 3] = value }
    try write(["vbig.npy": NPY.encode(v)], in: folder)
  }

  @Test(
    "item 4: an output beyond float16's or bfloat16's range fails the run; nothing is written",
    arguments: [
      (Float(70_000), ["--out-dtype", "float16", "--out", "o.npy"], "o.npy", "float16"),
      (
        Float(70_000), ["--out-dtype", "float16", "--out", "o.safetensors"], "o.safetensors",
        "float16"
      ),
      // 0x7F7FC000 ≈ 3.3977e38 is past bfloat16's midpoint 0x7F7F8000 with its largest, 0x7F7F.
      (
        Float(bitPattern: 0x7F7F_C000), ["--out-dtype", "input", "--out", "o.safetensors"],
        "o.safetensors", "bfloat16"
      ),
    ] as [(Float, [String], String, String)])
  func item4HalfPrecisionOverflowFails(
    value: Float, flags: [String], path: String, format: String
  ) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeQKV(in: folder)
      try Self.writeLargeV(value, in: folder)
      let (q, _, _) = try Self.qkv()
      // For --out-dtype input: Q in the format (bfloat16 through safetensors, numpy has none).
      try Self.write(
        [
          "q16.safetensors": try SafeTensors.encode(
            ["q": q], dtype: format == "float16" ? .f16 : .bf16)
        ],
        in: folder)
      try Data("old".utf8).write(to: folder.appendingPathComponent("w.npy"))
      let before = try AttnCLI.contents(of: folder)
      let problem = [
        "sdpa", "--query", "q16.safetensors:q", "--key", "k.npy", "--value", "vbig.npy",
      ]
      let run = try AttnCLI.run(problem + flags + ["--weights-out", "w.npy"], in: folder)
      Self.expectRuntimeError(
        run, [path + ": ", "of the output at [0, 0, 0, 3]", "beyond \(format)'s range", "inf"])
      #expect(run.stdout.isEmpty, "\(run.stdout)")
      // Neither output is written (w.npy stays "old"), and no temporary file is left.
      #expect(try AttnCLI.contents(of: folder) == before)
      #expect(
        try String(contentsOf: folder.appendingPathComponent("w.npy"), encoding: .utf8) == "old")
      // The same values in float32 are written: the conversion alone was refused.
      let single = try AttnCLI.run(
        problem + ["--out-dtype", "float32", "--out", "s.npy"], in: folder)
      #expect(single.status == 0, "\(single.stderr)")
      let written = try Self.scalars("s.npy", in: folder)
      #expect(written.allSatisfy(\.isFinite) && written[3] > Float(65504), "\(written[3])")
    }
  }
}

/// Running `attn` as a child of this process alone, for its peak resident memory: `wait4`'s
/// `ru_maxrss` is that child's own (Foundation's `Process` does not report it, and
/// `RUSAGE_CHILDREN` would mix in every child of the tests running alongside).
enum PeakMemory {
  /// Runs `attn arguments…` with stdout to /dev/null and stderr to a file in `folder`; returns
  /// the exit status (128 + n for signal n), the peak resident bytes and stderr. Paths in
  /// `arguments` must be absolute: the child starts in this process's folder.
  static func run(_ arguments: [String], in folder: URL) throws -> (
    status: Int32, peakBytes: Int, stderr: String
  ) {
    let executable = try AttnCLI.executable().path
    let errorPath = folder.appendingPathComponent(".peak-memory-stderr").path
    defer { try? FileManager.default.removeItem(atPath: errorPath) }
    let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { for pointer in argv { free(pointer) } }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 2, errorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    var pid = pid_t()
    let spawned = posix_spawn(&pid, executable, &actions, nil, argv, environ)
    guard spawned == 0 else { throw AttnCLIError("posix_spawn \(executable): error \(spawned)") }
    var status: Int32 = 0
    var usage = rusage()
    while wait4(pid, &status, 0, &usage) < 0 {
      guard errno == EINTR else { throw AttnCLIError("wait4: errno \(errno)") }
    }
    // The wait status: the exit code in bits 8–15, or the signal in bits 0–6.
    let code = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + status & 0x7F
    let stderr = (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? ""
    // Linux reports ru_maxrss in KiB.
    return (code, Int(usage.ru_maxrss) * 1024, stderr)
  }
}
