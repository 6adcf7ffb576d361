import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// Issue #23 ("fidelity, round three"), items 2, 3, 4, 6 and 8, through the executable: what a
/// user's files do to a run. The readers' side is in TensorIOTests' InputFidelityIOTests. No
/// expected number comes from the code under test: outputs are compared with the same problem
/// given another way (a `.npy` against a safetensors address, a boolean mask against `|b1`) or
/// with a value derived by hand (the mean of V).
@Suite("Input fidelity (#23 items 2, 3, 4, 6, 8; the executable)")
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

  // MARK: - Item 6

  @Test(
    "item 6: a float64 mask row of finfo(float64).min gives the mean of V, as in PyTorch",
    arguments: ["materialized", "tiled"])
  func item6Float64MaskRowSaturates(kernel: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeQKV(in: folder)
      // Row 1 adds −1.797·10³⁰⁸ to every score: in float64 each sum rounds to that same number
      // (a score is far below its half ulp, 2⁹⁷⁰), so softmax is uniform and the row is the mean
      // of V. Saturated to −3.4·10³⁸ it stays uniform (half ulp 2¹⁰³); as −∞ it would be zeros.
      var mask = [Double](repeating: 0, count: 24)
      for j in 0..<6 { mask[6 + j] = -Double.greatestFiniteMagnitude }
      let bytes = mask.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) }
      let header = #"{"m":{"dtype":"F64","shape":[4,6],"data_offsets":[0,192]}}"#
      try Self.write(
        [
          "m.npy": BadInputFiles.npy(descr: "<f8", shape: [4, 6], data: bytes),
          "m.safetensors": HandWrittenFiles.safetensors(header, data: bytes),
        ], in: folder)
      let v = try Self.qkv().v.scalars.map(Double.init)
      for (mask, out) in [("m.npy", "a.npy"), ("m.safetensors:m", "b.npy")] {
        let run = try AttnCLI.run(
          ["sdpa"] + Self.npyQKV + ["--attn-mask", mask, "--kernel", kernel, "--out", out],
          in: folder)
        #expect(run.status == 0, "\(mask): \(run.stderr)")
        let o = try Self.scalars(out, in: folder)
        for head in 0..<2 {
          for d in 0..<8 {
            let column = (0..<6).map { v[(head * 6 + $0) * 8 + d] }
            let mean = column.reduce(0, +) / 6
            // Weights 1/6 (rounded once) and a 6-term sum: γ₈ of Σ|w·v| bounds the float32 error.
            let bound = Float32Rounding.gamma(8) * column.map(abs).reduce(0, +) / 6
            let got = Double(o[(head * 4 + 1) * 8 + d])
            #expect(abs(got - mean) <= bound, "\(mask) head \(head) d \(d): \(got) vs \(mean)")
          }
        }
      }
    }
  }

  @Test("item 6: a message shows a float64 value beyond float32's range as the file holds it")
  func item6MessagesShowStoredValue() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let values: [Double] = [1e300] + [Double](repeating: 1, count: 15)
      try Self.write(
        [
          "keep.npy": BadInputFiles.npy(
            descr: "<f8", shape: [4, 4],
            data: values.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) })
        ], in: folder)
      let run = try AttnCLI.run(["dropout", "--mask", "keep.npy"], in: folder)
      Self.expectRuntimeError(run, ["keep.npy: value 1e+300 at [0, 0] is not 0 or 1"])
    }
  }

  // MARK: - Item 8

  static let integerQ = BadInputFiles.npy(
    descr: "<i4", shape: [1, 2, 4, 8],
    data: BadInputFiles.littleEndian([Int32](repeating: 1, count: 64)))
  static let booleanQ = BadInputFiles.npy(
    descr: "|b1", shape: [1, 2, 4, 8], data: [UInt8](repeating: 1, count: 64))

  @Test(
    "item 8: integer and boolean Q, K, V, x, dO and --bias are refused, as PyTorch does",
    arguments: [
      (
        ["sdpa", "--query", "qi.npy", "--key", "k.npy", "--value", "v.npy"], "qi.npy", "int32 (<i4)"
      ),
      (
        ["sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "qb.npy"], "qb.npy", "bool (|b1)"
      ),
      (
        ["sdpa", "--query", "b.safetensors:q", "--key", "k.npy", "--value", "v.npy"],
        #"b.safetensors: tensor "q""#, "BOOL"
      ),
      (
        ["check", "--query", "qi.npy", "--key", "k.npy", "--value", "v.npy", "--output", "q.npy"],
        "qi.npy", "int32"
      ),
      (["dropout", "--q", "qi.npy", "--k", "k.npy", "--v", "v.npy"], "qi.npy", "int32"),
      (["dropout", "--bias", "qb.npy"], "qb.npy", "bool (|b1)"),
      (["backward", "--grad-out", "qi.npy"], "qi.npy", "int32"),
      (["relpos", "--input", "qi.npy"], "qi.npy", "int32"),
    ] as [([String], String, String)])
  func item8IntegerValuesRefused(arguments: [String], file: String, dtype: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeQKV(in: folder)
      let q = try Tensor(shape: [1, 2, 4, 8], repeating: 1)
      try Self.write(
        [
          "qi.npy": Self.integerQ, "qb.npy": Self.booleanQ,
          "b.safetensors": try SafeTensors.encode(["q": q], dtype: .bool),
        ], in: folder)
      let run = try AttnCLI.run(arguments, in: folder)
      Self.expectRuntimeError(
        run, [file + ": ", "expected a floating-point tensor", "not \(dtype)"])
    }
  }

  @Test(
    "item 8: integer and boolean masks are still read (keep masks; --attn-mask booleans)",
    arguments: [
      ["dropout", "--mask", "mi.npy"], ["dropout", "--mask", "mb.npy"],
      ["relpos", "--mask", "mi.npy", "--seq-len", "4", "--batch", "1"],
      ["sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--attn-mask", "mb6.npy"],
    ])
  func item8MasksKept(arguments: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.writeQKV(in: folder)
      // Causal 0/1 patterns: [4, 4] for the exercises' 4 tokens, [4, 6] for Q, K, V here.
      let causal: [UInt8] = (0..<16).map { $0 % 4 <= $0 / 4 ? 1 : 0 }
      let causal6: [UInt8] = (0..<24).map { $0 % 6 <= $0 / 6 ? 1 : 0 }
      try Self.write(
        [
          "mi.npy": BadInputFiles.npy(
            descr: "<i8", shape: [4, 4], data: BadInputFiles.littleEndian(causal.map(Int64.init))),
          "mb.npy": BadInputFiles.npy(descr: "|b1", shape: [4, 4], data: causal),
          "mb6.npy": BadInputFiles.npy(descr: "|b1", shape: [4, 6], data: causal6),
        ], in: folder)
      let run = try AttnCLI.run(arguments, in: folder)
      #expect(run.status == 0, "\(run.stderr)")
    }
  }

  @Test("item 8: README lists exactly the dtypes the readers accept, floats only for values")
  func item8ReadmeListsDtypes() throws {
    let readme = try String(
      contentsOf: ReadmeExamples.root.appendingPathComponent("README.md"), encoding: .utf8)
    let start = try #require(
      readme.range(of: "\n## Input files\n"), "no '## Input files' in README")
    let rest = readme[start.upperBound...]
    let body = rest.range(of: "\n## ").map { rest[..<$0.lowerBound] } ?? rest
    // The code spans of `text`, with the `\|` that a Markdown table needs read as `|`.
    func codes(_ text: Substring) -> Set<String> {
      Set(
        text.split(separator: "`", omittingEmptySubsequences: false).enumerated()
          .filter { $0.offset % 2 == 1 }
          .map { $0.element.replacingOccurrences(of: #"\|"#, with: "|") })
    }
    let npy = Set(NPYDType.allCases.map(\.descr))
    let safetensors = Set(SafeTensorsDType.allCases.map(\.rawValue))
    let listed = codes(body)
    #expect(listed.intersection(npy.union(safetensors)) == npy.union(safetensors))
    // Nothing is listed that is not read: every dtype-looking code is a dtype of the readers.
    let dtypeLike = listed.filter {
      $0.wholeMatch(of: /[<|][a-z][0-9]|B?F[0-9]+(_[A-Z0-9]+)?|[IU][0-9]+|BOOL|C64/) != nil
    }
    #expect(dtypeLike.subtracting(npy.union(safetensors)).isEmpty, "\(dtypeLike)")
    // The row of values (Q, K, V) lists the floating-point types alone.
    let values = try #require(body.split(separator: "\n").first { $0.contains("Q, K, V") })
    let floats = Set(NPYDType.allCases.filter { !$0.isIntegral }.map(\.descr))
      .union(SafeTensorsDType.allCases.filter(\.isFloatingPoint).map(\.rawValue))
    #expect(codes(values).intersection(npy.union(safetensors)) == floats, "\(values)")
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
    // The child's own high-water mark, VmHWM of /proc/PID/status, read while it runs: wait4's
    // ru_maxrss would not do, as Linux carries the parent's (this test runner's, hundreds of
    // MiB) high-water mark into a child across exec. VmHWM only grows, so a read any time after
    // the peak sees it; the reads stop when the child has exited.
    var peak = 0
    var status: Int32 = 0
    while true {
      if let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
        let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
        let kib = line.split(separator: " ").dropFirst().first.flatMap({ Int($0) })
      {
        peak = max(peak, kib * 1024)
      }
      let waited = waitpid(pid, &status, WNOHANG)
      if waited == pid { break }
      guard waited == 0 || errno == EINTR else { throw AttnCLIError("waitpid: errno \(errno)") }
      usleep(500)
    }
    // The wait status: the exit code in bits 8–15, or the signal in bits 0–6.
    let code = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + status & 0x7F
    let stderr = (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? ""
    return (code, peak, stderr)
  }
}
