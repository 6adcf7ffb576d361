import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// The bad-input battery: `attn` run on wrong flags, missing and unreadable files, every malformed
/// `.npy` and safetensors fixture, mismatched shapes, NaN and ±inf, outputs that cannot be written
/// and sizes over the memory budget. Each case must exit with the documented code (64 a usage
/// error, 1 a runtime error), print exactly one line on stderr (`attn: …`) that names the problem,
/// and leave the folder it ran in exactly as it was: no new file, no changed file, no temporary.
@Suite("Bad inputs: documented exit code, one line on stderr, no file touched")
struct BadInputTests {
  /// One bad invocation. Paths are relative: the executable runs in a folder holding
  /// `BadInputFiles` and the fixtures the arguments name.
  struct Case: Sendable, CustomTestStringConvertible {
    var arguments: [String]
    /// 64 (usage) or 1 (runtime).
    var status: Int32
    /// Fragments the stderr line must contain (the file, the flag, the reason).
    var mentions: [String]
    /// A failed check prints its report on stdout before the error; other errors print nothing.
    var printsReport = false

    var testDescription: String { arguments.joined(separator: " ") }
  }

  static func usage(_ arguments: [String], _ mentions: String...) -> Case {
    Case(arguments: arguments, status: 64, mentions: mentions)
  }

  static func runtime(_ arguments: [String], _ mentions: String...) -> Case {
    Case(arguments: arguments, status: 1, mentions: mentions)
  }

  static let qkv = ["--q", "q.npy", "--k", "k.npy", "--v", "v.npy"]

  /// Flags out of range, conflicting or unknown.
  static let flagCases: [Case] = [
    usage(["dropout", "--p", "1.5"], "--p"),
    usage(["dropout", "--p", "nan"], "--p"),
    usage(["dropout", "--seq-len", "0"], "--seq-len"),
    usage(["dropout", "--d-k=-3"], "--d-k"),
    usage(["dropout", "--batch", "0"], "--batch"),
    usage(["dropout", "--seq-len", "four"], "four"),
    usage(["dropout", "--threads", "0"], "--threads"),
    usage(["dropout", "--max-memory", "lots"], "--max-memory"),
    usage(["dropout", "--max-memory", "0.1"], "--max-memory"),
    usage(["dropout", "--kernel", "fast"], "fast"),
    usage(["dropout", "--mask", ""], "--mask"),
    usage(["dropout", "--no-such-flag"], "--no-such-flag"),
    usage(["dropout", "--q", "q.npy"], "--q, --k and --v"),
    usage(["dropout", "--kernel", "tiled", "--weights-out", "w.npy"], "--weights-out"),
    usage(["dropout"] + qkv + ["--out", "q.npy"], "also an input"),
    usage(["dropout"] + qkv + ["--out", "./adir/../k.npy"], "also an input"),
    usage(["dropout"] + qkv + ["--out", "v_link.npy"], "also an input"),
    usage(["dropout"] + qkv + ["--out", "v_hard.npy"], "also an input"),
    usage(["dropout", "--out", "o.npy", "--weights-out", "o.npy"], "two outputs"),
    usage(["relpos", "--d-model", "0"], "--d-model"),
    usage(["relpos", "--max-rel=-1"], "--max-rel"),
    usage(["relpos", "--seq-len", "0"], "--seq-len"),
    usage(["relpos", "--kernel", "tiled", "--weights-out", "w.npy"], "--weights-out"),
    usage(
      ["relpos", "--weights", "w.safetensors", "--save-weights", "w.safetensors"], "also an input"),
    usage(["relpos", "--save-weights", "w.npy"], "--save-weights", "name it .safetensors"),
    usage(["relpos", "--weights", "w.safetensors", "--d-model", "16"], "--d-model 16 conflicts"),
    usage(["relpos", "--weights", "w.safetensors", "--max-rel", "5"], "--max-rel 5 conflicts"),
    usage(["relpos", "--input", "x.npy", "--batch", "3"], "--batch 3 conflicts"),
    usage(["bench", "--repeats", "0"], "--repeats"),
    usage(["bench", "--p", "1"], "--p"),
    usage(["bench", "--cases", "nope"], "nope"),
    usage(["bench", "--query-block", "0"], "--query-block must be in 1…"),
    // #23 items 5 and 10: limits that keep derived sizes in range are usage errors.
    usage(["bench", "--cases", ""], "--cases names no case"),
    usage(["bench", "--heads", "65537"], "--heads must be in 1…65536"),
    usage(["bench", "--seq-len", "64", "--causal-align", "bottom-right"], "--causal-align"),
    usage(["dropout", "--d-k", "65537"], "--d-k must be in 1…65536"),
    usage(["backward", "--seq-len", "1048577"], "--seq-len must be in 1…1048576"),
    usage(["relpos", "--batch", "1048577"], "--batch must be in 1…1048576"),
    usage(["dropout", "--seed", "-1"], "--seed"),
    // #23 item 9: a .npy-only flag named FILE.safetensors:NAME says what it reads.
    runtime(
      ["dropout", "--q", "w.safetensors:x", "--k", "k.npy", "--v", "v.npy"], "reads a .npy file"),
    usage(["complexity", "--min-len", "0"], "--min-len"),
    usage(["complexity", "--threads", "0"], "--threads"),
    usage(["complexity", "--max-memory", "lots"], "--max-memory"),
    usage(["no-such-command"], "no-such-command"),
  ]

  /// Inputs that are missing or cannot be read as files. (The tests run as root, for whom
  /// `chmod 000` changes nothing; these are the unreadable inputs root meets.)
  static let unreadableCases: [Case] = [
    runtime(
      ["dropout", "--q", "missing.npy", "--k", "k.npy", "--v", "v.npy"],
      "missing.npy", "no such file"),
    runtime(["dropout", "--q", "adir", "--k", "k.npy", "--v", "v.npy"], "adir", "folder"),
    runtime(
      ["dropout", "--q", "loop.npy", "--k", "k.npy", "--v", "v.npy"],
      "loop.npy", "cannot open"),
    runtime(
      ["dropout", "--q", "q.npy/x.npy", "--k", "k.npy", "--v", "v.npy"],
      "q.npy/x.npy", "cannot open"),
    runtime(
      ["dropout", "--q", "/dev/zero", "--k", "k.npy", "--v", "v.npy"],
      "/dev/zero", "device"),
    runtime(["dropout", "--mask", "missing-mask.npy"], "missing-mask.npy"),
    runtime(["relpos", "--weights", "missing.safetensors"], "missing.safetensors"),
    runtime(["relpos", "--input", "adir"], "adir", "folder"),
  ]

  /// Every malformed `.npy` fixture as Q, and a few as mask and bias; the reasons are those of
  /// NPYTests.
  static let npyCases: [Case] =
    [
      ("bad_fortran.npy", "Fortran"),
      ("bad_big_endian.npy", "big-endian"),
      ("bad_complex64.npy", "unsupported dtype"),
      ("bad_truncated.npy", "truncated"),
      ("bad_magic.npy", "not an .npy file"),
      ("bad_version.npy", "version 4.0"),
      ("bad_header_length.npy", "runs past the end"),
      ("bad_shape_mismatch.npy", "too long"),
      ("bad_bool_byte.npy", "bool element"),
      ("bad_negative_dim.npy", "negative dimension"),
      ("bad_overflow_dim.npy", "more elements than memory can index"),
      ("bad_missing_key.npy", "missing key"),
      ("bad_header_syntax.npy", "invalid header"),
    ].map { file, reason in
      runtime(["dropout", "--q", file, "--k", "k.npy", "--v", "v.npy"], file, reason)
    } + [
      runtime(["dropout", "--mask", "bad_magic.npy"], "bad_magic.npy", "not an .npy file"),
      runtime(["dropout", "--bias", "bad_truncated.npy"], "bad_truncated.npy", "truncated"),
      runtime(["relpos", "--input", "bad_negative_dim.npy"], "bad_negative_dim.npy", "negative"),
    ]

  /// Every malformed safetensors fixture as relpos weights; the reasons are those of
  /// SafeTensorsTests.
  static let safetensorsCases: [Case] = [
    ("bad_short.safetensors", "too short"),
    ("bad_header_length.safetensors", "runs past the end of the file"),
    ("bad_header_huge.safetensors", "runs past"),
    ("bad_not_utf8.safetensors", "not valid UTF-8"),
    ("bad_not_json.safetensors", "not valid JSON"),
    ("bad_not_object.safetensors", "not a JSON object"),
    ("bad_unknown_dtype.safetensors", "unknown dtype"),
    ("bad_unsupported_dtype.safetensors", "is not supported"),
    ("bad_offsets_range.safetensors", "run past the end of the data section"),
    ("bad_offsets_reversed.safetensors", "begin after they end"),
    ("bad_overlap.safetensors", "overlap"),
    ("bad_gap.safetensors", "unused"),
    ("bad_tail.safetensors", "belong to no tensor"),
    ("bad_duplicate.safetensors", "appears twice"),
    ("bad_size_mismatch.safetensors", "needs 16 bytes"),
    ("bad_negative_dim.safetensors", "negative dimension"),
    ("bad_fractional_dim.safetensors", "not an integer"),
    ("bad_huge_dim.safetensors", "too large"),
    ("bad_overflow_shape.safetensors", "more elements than memory can index"),
    ("bad_missing_field.safetensors", "missing \"data_offsets\""),
    ("bad_metadata.safetensors", "not a string"),
    ("bad_deep.safetensors", "nested deeper"),
  ].map { file, reason in runtime(["relpos", "--weights", file], file, reason) }

  /// Tensors that read fine but do not fit together or hold NaN or ±inf.
  static let contentCases: [Case] = [
    runtime(["dropout", "--q", "q.npy", "--k", "k6.npy", "--v", "v.npy"], "shape mismatch"),
    runtime(["dropout", "--mask", "mask3.npy"], "mask", "does not broadcast"),
    runtime(["dropout", "--bias", "mask3.npy"], "bias", "does not broadcast"),
    runtime(["relpos", "--input", "x_rank2.npy"], "x_rank2.npy", "[B, T, d_model]"),
    runtime(["relpos", "--input", "x16.npy", "--weights", "w.safetensors"], "x16.npy", "d_model"),
    runtime(
      ["relpos", "--weights", "w_missing.safetensors"], "w_missing.safetensors",
      "W_v.bias"),
    runtime(
      ["dropout", "--q", "q_nan.npy", "--k", "k.npy", "--v", "v.npy"],
      "q_nan.npy: NaN at [0, 3, 5]"),
    runtime(
      ["dropout", "--q", "q.npy", "--k", "k_inf.npy", "--v", "v.npy"],
      "k_inf.npy: inf at [0, 1, 2]"),
    runtime(
      ["dropout", "--q", "q.npy", "--k", "k.npy", "--v", "v_neginf.npy"],
      "v_neginf.npy: -inf at [0, 2, 7]"),
    runtime(
      ["dropout", "--mask", "mask_nan.npy"], "mask_nan.npy: value NaN at [1, 2] is not 0 or 1"),
    runtime(["dropout", "--bias", "bias_nan.npy"], "bias_nan.npy: NaN at [2, 1]"),
    runtime(["dropout", "--bias", "bias_posinf.npy"], "bias_posinf.npy: inf at [0, 2, 3]"),
    runtime(["relpos", "--input", "x_nan.npy"], "x_nan.npy: NaN at [1, 2, 3]"),
    runtime(
      ["relpos", "--weights", "w_nan.safetensors"],
      "w_nan.safetensors: tensor \"W_q.weight\": NaN at [3, 4]"),
    // Finite inputs whose scores overflow float32: an error, not a silent NaN.
    runtime(
      ["dropout", "--q", "q_huge.npy", "--k", "k_huge.npy", "--v", "v.npy", "--out", "o.npy"],
      "the output has", "although every input is finite"),
    // A failed check: NaN in the last value row under a causal mask. The float64 reference (as
    // PyTorch's math path) multiplies every row's zero weight for that key by NaN; the tiled
    // kernel skips the key blocks above the diagonal, so the first 512 rows stay finite — a real
    // disagreement, which the check reports. The report is printed, no output is written.
    Case(
      arguments: [
        "dropout", "--q", "q1024.npy", "--k", "q1024.npy", "--v", "v1024_nan.npy", "--mask",
        "causal", "--kernel", "tiled", "--allow-nonfinite", "--eval", "--out", "o.npy",
      ],
      status: 1, mentions: ["verification failed"], printsReport: true),
  ]

  /// Outputs that cannot be written, and sizes over the memory budget.
  static let outputAndMemoryCases: [Case] = [
    runtime(["dropout", "--out", "nofolder/o.npy"], "nofolder/o.npy", "does not exist"),
    runtime(["dropout", "--out", "adir"], "adir", "folder"),
    // The first output could be written, the second cannot: neither is.
    runtime(["dropout", "--out", "o.npy", "--weights-out", "nofolder/w.npy"], "nofolder/w.npy"),
    runtime(
      ["relpos", "--out", "o.npy", "--save-weights", "nofolder/w.safetensors"],
      "nofolder/w.safetensors"),
    runtime(
      [
        "complexity", "--min-len", "16", "--max-len", "16", "--repeats", "1",
        "--plot", "nofolder/p.svg",
      ], "nofolder/p.svg"),
    runtime(
      ["dropout", "--batch", "1000", "--seq-len", "100000", "--d-k", "1000"],
      "memory budget exceeded", "--batch"),
    runtime(
      ["dropout", "--seq-len", "2048", "--max-memory", "1M"],
      "memory budget exceeded", "--kernel tiled"),
    runtime(["relpos", "--d-model", "65536"], "memory budget exceeded", "d_model 65536"),
    runtime(
      ["relpos", "--seq-len", "100000", "--batch", "100000"],
      "memory budget exceeded", "--batch"),
    runtime(["relpos", "--max-memory", "1K"], "memory budget exceeded", "--max-memory"),
    runtime(
      ["bench", "--seq-len", "1000000", "--batch", "1000"],
      "memory budget exceeded", "--seq-len"),
    runtime(
      ["bench", "--seq-len", "65536", "--query-block", "65536", "--key-block", "65536"],
      "memory budget exceeded", "--query-block"),
  ]

  /// The reliability work's cases that fit the battery (ReliabilityTests has the others): keep
  /// masks holding other values than 0 and 1 (an additive mask named as such), a FIFO without a
  /// reader as an output, inputs and threads over `--max-memory`, names and shapes from files
  /// escaped and capped, flags out of their documented ranges.
  static let reliabilityCases: [Case] = [
    runtime(
      ["dropout", "--mask", "mask_hf.npy"], "mask_hf.npy", "value -3.4028235e+38 at [0, 1]",
      "1 = attend, 0 = masked", "look like an additive mask", "(pass an additive mask with --bias)"
    ),
    runtime(
      ["dropout", "--mask", "mask_neginf.npy"], "mask_neginf.npy", "value -inf at [0, 1]",
      "look like an additive mask", "(pass an additive mask with --bias)"),
    runtime(
      ["relpos", "--mask", "mask_hf.npy"], "mask_hf.npy", "look like an additive mask",
      "(this command takes keep masks only)"),
    runtime(
      ["dropout", "--mask", "mask_two.npy"], "mask_two.npy", "value 2.0 at [2, 3] is not 0 or 1",
      "1 = attend, 0 = masked", "(pass an additive mask with --bias)"),
    runtime(["dropout", "--out", "w.fifo"], "w.fifo", "no reader"),
    // The regular output is staged, then the FIFO fails: o.npy is not written either.
    runtime(["dropout", "--out", "o.npy", "--weights-out", "w.fifo"], "w.fifo", "no reader"),
    runtime(
      ["dropout", "--q", "big.npy", "--k", "k.npy", "--v", "v.npy", "--max-memory", "1M"],
      "memory budget exceeded", "big.npy", "--max-memory"),
    runtime(
      ["bench", "--threads", "1000", "--cases", "attention", "--max-memory", "64M"],
      "memory budget exceeded", "1000 threads"),
    runtime(
      ["relpos", "--weights", "w_escape.safetensors"], "w_escape.safetensors",
      #"\u{1b}[31m"#, "is unexpected"),
    runtime(
      ["dropout", "--q", "descr_bidi.npy", "--k", "k.npy", "--v", "v.npy"], "descr_bidi.npy",
      "unsupported dtype", #"\u{202e}"#),
    runtime(
      ["dropout", "--q", "rank30000.npy", "--k", "k.npy", "--v", "v.npy"], "30000 dimensions"),
    usage(["dropout", "--max-memory", "0"], "--max-memory", "from 1 byte to 1024T"),
    usage(["dropout", "--max-memory", "2000T"], "--max-memory", "from 1 byte to 1024T"),
    usage(["bench", "--repeats", "100000"], "--repeats", "1…10000", "100000"),
    usage(["complexity", "--repeats", "100000"], "--repeats", "1…10000", "100000"),
    usage(
      ["dropout", "--explain", "--q", "q0.npy", "--k", "k0.npy", "--v", "v0.npy"],
      "--explain", "no batch elements"),
  ]

  static let allCases =
    flagCases + unreadableCases + npyCases + safetensorsCases + contentCases
    + outputAndMemoryCases + reliabilityCases

  @Test("the battery has the documented breadth")
  func breadth() {
    #expect(Self.allCases.count >= 30, "\(Self.allCases.count) cases")
    let commands = Set(Self.allCases.map { $0.arguments[0] })
    #expect(commands.isSuperset(of: ["dropout", "relpos", "bench", "complexity"]), "\(commands)")
    let fixtures = try? FileManager.default.contentsOfDirectory(atPath: BadInputFiles.io.path)
    let named = Set(Self.allCases.flatMap(\.arguments))
    for bad in (fixtures ?? []).filter({ $0.hasPrefix("bad_") }) {
      #expect(named.contains(bad), "the malformed fixture \(bad) is in no case")
    }
  }

  @Test(
    "exits with the documented code, one line on stderr, every file as it was",
    arguments: allCases)
  func badInput(_ badCase: Case) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: badCase.arguments)
      let before = try BadInputFiles.snapshot(folder)
      let run = try AttnCLI.run(badCase.arguments, in: folder)
      #expect(run.status == badCase.status, "exit \(run.status), stderr: \(run.stderr)")
      #expect(run.stderrLines.count == 1, "stderr is not one line: \(run.stderr)")
      #expect(run.stderr.hasPrefix("attn: "), "stderr: \(run.stderr)")
      for mention in badCase.mentions {
        #expect(run.stderr.contains(mention), "stderr \(run.stderr) should name \(mention)")
      }
      if !badCase.printsReport {
        #expect(run.stdout.isEmpty, "stdout: \(run.stdout)")
      }
      let after = try BadInputFiles.snapshot(folder)
      let changed = Set(before.keys).union(after.keys).filter { before[$0] != after[$0] }
      #expect(changed.isEmpty, "files created, changed or removed: \(changed.sorted())")
      var info = stat()
      #expect(stat("/dev/null", &info) == 0 && info.st_mode & S_IFMT == S_IFCHR, "/dev/null")
    }
  }

  @Test("the battery's good files run: each case fails only by what it changes")
  func control() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      for arguments in [
        ["dropout"] + Self.qkv + ["--mask", "mask4.npy", "--bias", "bias_neginf.npy"],
        ["relpos", "--input", "x.npy", "--weights", "w.safetensors"],
        ["dropout", "--out", "o.npy", "--weights-out", "w.npy"],
      ] {
        let run = try AttnCLI.run(arguments, in: folder)
        #expect(run.status == 0, "\(arguments): exit \(run.status), stderr: \(run.stderr)")
      }
      #expect(FileManager.default.fileExists(atPath: folder.appendingPathComponent("o.npy").path))
    }
  }

  @Test(
    "empty batches run without trapping",
    arguments: [
      ["dropout", "--q", "q0.npy", "--k", "k0.npy", "--v", "v0.npy"],
      ["dropout", "--q", "q0.npy", "--k", "k0.npy", "--v", "v0.npy", "--kernel", "tiled"],
      ["relpos", "--input", "x0.npy", "--d-model", "8"],
      // D = 0: every score is 0, the output the mean of V (as PyTorch), verified.
      ["dropout", "--q", "q_d0.npy", "--k", "k_d0.npy", "--v", "v.npy", "--eval"],
    ])
  func emptyBatch(arguments: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: arguments)
      let run = try AttnCLI.run(arguments, in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      #expect(run.stderr.isEmpty, "stderr: \(run.stderr)")
    }
  }

  /// With `--allow-nonfinite`, NaN in query row 3 makes output row 3 NaN and leaves the other
  /// rows as they are without it (dropout decisions do not depend on the values).
  @Test("--allow-nonfinite lets NaN through; it propagates to its own row only")
  func allowNonfinite() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let nan = try AttnCLI.run(
        [
          "dropout", "--q", "q_nan.npy", "--k", "k.npy", "--v", "v.npy", "--allow-nonfinite",
          "--out", "nan.npy",
        ], in: folder)
      #expect(nan.status == 0, "exit \(nan.status), stderr: \(nan.stderr)")
      let clean = try AttnCLI.run(["dropout"] + Self.qkv + ["--out", "clean.npy"], in: folder)
      #expect(clean.status == 0, "exit \(clean.status), stderr: \(clean.stderr)")
      let a = try NPY.read(contentsOf: folder.appendingPathComponent("nan.npy").path).tensor
      let b = try NPY.read(contentsOf: folder.appendingPathComponent("clean.npy").path).tensor
      try #require(a.shape == [1, 4, 8] && b.shape == [1, 4, 8])
      let row3 = Array(a.scalars[24..<32])
      #expect(row3.allSatisfy { $0.isNaN }, "row 3: \(row3)")
      #expect(
        a.scalars[0..<24].map(\.bitPattern) == b.scalars[0..<24].map(\.bitPattern),
        "rows 0–2 differ from the run without NaN")
    }
  }
}

/// The files the battery runs on, written into each test's folder: small valid tensors, the same
/// with one NaN or ±inf at a known index, shapes that do not fit, keep masks of every dtype and
/// additive masks, a header with a bidirectional control, a rank-30,000 array, a weights file
/// with a control-character tensor name, a folder, a FIFO, a symbolic-link loop, a symbolic and
/// a hard link to `v.npy`, and the malformed fixtures of AttentionKitTests and the 4 MB
/// `big.npy` when a case names them.
enum BadInputFiles {
  static let io = Fixtures.folder("io")

  static func tensor(_ shape: [Int], stream: UInt32, set: [([Int], Float)] = []) throws -> Tensor {
    var t = try Tensor.randomNormal(shape: shape, seed: 7, stream: stream)
    for (index, value) in set {
      let flat = zip(index, shape).reduce(0) { $0 * $1.1 + $1.0 }
      t.scalars[flat] = value
    }
    return t
  }

  static func scaled(_ t: Tensor, by factor: Float) throws -> Tensor {
    try Tensor(shape: t.shape, scalars: t.scalars.map { $0 * factor })
  }

  static func create(in folder: URL, naming arguments: [String]) throws {
    let q = try tensor([1, 4, 8], stream: 1)
    let k = try tensor([1, 4, 8], stream: 2)
    let v = try tensor([1, 4, 8], stream: 3)
    let x = try tensor([2, 5, 8], stream: 4)
    var mask4 = try Tensor(shape: [4, 4], repeating: 1)
    mask4[0, 1] = 0
    var maskNaN = mask4
    maskNaN[1, 2] = .nan
    var biasNegInf = try Tensor(shape: [1, 4, 4], repeating: 0)
    biasNegInf[0, 0, 1] = -.infinity
    var biasPosInf = biasNegInf
    biasPosInf[0, 2, 3] = .infinity
    var biasNaN = try Tensor(shape: [4, 4], repeating: 0)
    biasNaN[2, 1] = .nan
    let npy: [String: Tensor] = [
      "q.npy": q, "k.npy": k, "v.npy": v, "x.npy": x,
      "k6.npy": try tensor([1, 4, 6], stream: 5),
      "q0.npy": try Tensor(shape: [0, 4, 8]), "k0.npy": try Tensor(shape: [0, 4, 8]),
      "v0.npy": try Tensor(shape: [0, 4, 8]), "x0.npy": try Tensor(shape: [0, 5, 8]),
      "q_d0.npy": try Tensor(shape: [1, 4, 0]), "k_d0.npy": try Tensor(shape: [1, 4, 0]),
      "q1024.npy": try tensor([1, 1024, 8], stream: 6),
      "v1024_nan.npy": try tensor([1, 1024, 8], stream: 7, set: [([0, 1023, 0], .nan)]),
      "q_nan.npy": try tensor([1, 4, 8], stream: 1, set: [([0, 3, 5], .nan)]),
      "k_inf.npy": try tensor([1, 4, 8], stream: 2, set: [([0, 1, 2], .infinity)]),
      "v_neginf.npy": try tensor([1, 4, 8], stream: 3, set: [([0, 2, 7], -.infinity)]),
      "q_huge.npy": try scaled(q, by: 1e20), "k_huge.npy": try scaled(k, by: 1e20),
      "mask3.npy": try Tensor(shape: [3, 3], repeating: 1), "mask4.npy": mask4,
      "mask_nan.npy": maskNaN, "bias_neginf.npy": biasNegInf, "bias_posinf.npy": biasPosInf,
      "bias_nan.npy": biasNaN,
      "x_nan.npy": try tensor([2, 5, 8], stream: 4, set: [([1, 2, 3], .nan)]),
      "x_rank2.npy": try tensor([5, 8], stream: 4), "x16.npy": try tensor([2, 5, 16], stream: 4),
    ]
    for (name, tensor) in npy {
      try Data(NPY.encode(tensor)).write(to: folder.appendingPathComponent(name))
    }
    for (name, bytes) in try reliabilityNPY(naming: arguments) {
      try Data(bytes).write(to: folder.appendingPathComponent(name))
    }

    let weights = try RelativePositionAttention(modelDim: 8, maxDistance: 2, seed: 7)
      .stateDict.tensors
    var withNaN = weights
    withNaN["W_q.weight"]?[3, 4] = .nan
    var missing = weights
    missing["W_v.bias"] = nil
    // An extra tensor whose name holds an escape sequence, a carriage return and a NUL.
    var withEscapes = weights
    withEscapes["evil\u{1B}[31m\r\u{0}name"] = try Tensor(shape: [1], repeating: 1)
    for (name, tensors) in [
      "w.safetensors": weights, "w_nan.safetensors": withNaN, "w_missing.safetensors": missing,
      "w_escape.safetensors": withEscapes,
    ] {
      try Data(SafeTensors.encode(tensors)).write(to: folder.appendingPathComponent(name))
    }

    let manager = FileManager.default
    try manager.createDirectory(
      at: folder.appendingPathComponent("adir"), withIntermediateDirectories: false)
    try manager.createSymbolicLink(
      atPath: folder.appendingPathComponent("loop.npy").path, withDestinationPath: "loop.npy")
    try manager.createSymbolicLink(
      atPath: folder.appendingPathComponent("v_link.npy").path, withDestinationPath: "v.npy")
    try manager.linkItem(
      at: folder.appendingPathComponent("v.npy"), to: folder.appendingPathComponent("v_hard.npy"))
    guard mkfifo(folder.appendingPathComponent("w.fifo").path, 0o644) == 0 else {
      throw AttnCLIError("mkfifo w.fifo: errno \(errno)")
    }
    for name in Set(arguments) where name.hasPrefix("bad_") {
      try manager.copyItem(
        at: io.appendingPathComponent(name), to: folder.appendingPathComponent(name))
    }
  }

  /// Every entry under `folder`, hidden ones included (a temporary file left behind is hidden):
  /// each by its permission bits and owner, then regular files by content, symbolic links by
  /// destination, folders by name, and other files (the FIFO) by type, never opened (reading a
  /// FIFO would wait for a writer).
  static func snapshot(_ folder: URL) throws -> [String: Data] {
    let manager = FileManager.default
    var entries: [String: Data] = [:]
    var pending = [""]
    while let relative = pending.popLast() {
      let url = relative.isEmpty ? folder : folder.appendingPathComponent(relative)
      for name in try manager.contentsOfDirectory(atPath: url.path) {
        let path = relative.isEmpty ? name : relative + "/" + name
        let full = folder.appendingPathComponent(path)
        var info = stat()
        guard lstat(full.path, &info) == 0 else {
          throw AttnCLIError("cannot stat \(full.path): errno \(errno)")
        }
        let owner =
          "mode \(String(info.st_mode & 0o7777, radix: 8)), owner \(info.st_uid):\(info.st_gid); "
        var entry = Data(owner.utf8)
        switch info.st_mode & S_IFMT {
        case S_IFLNK:
          entry += Data(("link:" + (try manager.destinationOfSymbolicLink(atPath: full.path))).utf8)
        case S_IFDIR:
          entry += Data("folder".utf8)
          pending.append(path)
        case S_IFREG:
          entry += try Data(contentsOf: full)
        default:
          entry += Data("special file of type \(String(info.st_mode & S_IFMT, radix: 8))".utf8)
        }
        entries[path] = entry
      }
    }
    return entries
  }

  /// The `.npy` files of the reliability cases, as bytes: keep masks of every dtype holding the
  /// same causal 0/1 pattern (hand-written where `NPY.encode`, which writes `<f4`, cannot),
  /// one holding a 2, additive masks (0 and float32's lowest, as Hugging Face writes them; 0 and
  /// −inf), a bias masking all of query row 2, a version 3.0 header whose `descr` holds U+202E,
  /// a rank-30,000 array (a version 2.0 header), and, when named, `big.npy` of 4 MiB.
  static func reliabilityNPY(naming arguments: [String]) throws -> [String: [UInt8]] {
    let causal: [UInt8] = (0..<16).map { $0 % 4 <= $0 / 4 ? 1 : 0 }
    var two = causal.map(Int64.init)
    two[2 * 4 + 3] = 2
    let additive = causal.map { $0 == 1 ? Float(0) : -Float.greatestFiniteMagnitude }
    let negativeInfinity = causal.map { $0 == 1 ? Float(0) : -Float.infinity }
    var rowMasked = try Tensor(shape: [1, 4, 4], repeating: 0)
    for key in 0..<4 { rowMasked[0, 2, key] = -.infinity }
    var files: [String: [UInt8]] = [
      "mask_b1.npy": npy(descr: "|b1", shape: [4, 4], data: causal),
      "mask_u1.npy": npy(descr: "|u1", shape: [4, 4], data: causal),
      "mask_i1.npy": npy(descr: "|i1", shape: [4, 4], data: causal),
      "mask_i4.npy": npy(descr: "<i4", shape: [4, 4], data: littleEndian(causal.map(Int32.init))),
      "mask_i8.npy": npy(descr: "<i8", shape: [4, 4], data: littleEndian(causal.map(Int64.init))),
      "mask_f2.npy": npy(
        descr: "<f2", shape: [4, 4], data: littleEndian(causal.map { UInt16($0) * 0x3C00 })),
      "mask_f4.npy": NPY.encode(try Tensor(shape: [4, 4], scalars: causal.map(Float.init))),
      "mask_f8.npy": npy(
        descr: "<f8", shape: [4, 4], data: littleEndian(causal.map { Double($0).bitPattern })),
      "mask_two.npy": npy(descr: "<i8", shape: [4, 4], data: littleEndian(two)),
      "mask_hf.npy": NPY.encode(try Tensor(shape: [4, 4], scalars: additive)),
      "mask_neginf.npy": NPY.encode(try Tensor(shape: [4, 4], scalars: negativeInfinity)),
      "bias_row_neginf.npy": NPY.encode(rowMasked),
      "descr_bidi.npy": npy(
        descr: "<f\u{202E}4", shape: [2], data: littleEndian([Float(1), 2].map(\.bitPattern)),
        version: 3),
      "rank30000.npy": NPY.encode(try Tensor(shape: [Int](repeating: 1, count: 30_000))),
    ]
    if arguments.contains("big.npy") {
      files["big.npy"] = NPY.encode(try Tensor(shape: [1, 1024, 1024]))
    }
    return files
  }

  /// A `.npy` file written by hand: the header dict with `descr` and `shape` (C order), padded
  /// with spaces and a newline so the data starts at a multiple of 64 bytes, after the magic,
  /// `version`.0 and the header length (2 bytes in version 1.0, 4 in 2.0 and 3.0; 3.0 declares
  /// the header UTF-8). See `NPYTests.handWritten`.
  static func npy(descr: String, shape: [Int], data: [UInt8], version: UInt8 = 1) -> [UInt8] {
    let tuple =
      shape.count == 1
      ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
    let header = Array("{'descr': '\(descr)', 'fortran_order': False, 'shape': \(tuple), }".utf8)
    let prefix = version == 1 ? 10 : 12
    let padding = (64 - (prefix + header.count + 1) % 64) % 64
    let length = header.count + padding + 1
    let lengthBytes = (0..<(prefix - 8)).map { UInt8(truncatingIfNeeded: length >> (8 * $0)) }
    return [0x93] + Array("NUMPY".utf8) + [version, 0] + lengthBytes + header
      + [UInt8](repeating: 0x20, count: padding) + [0x0A] + data
  }

  /// `values` as little-endian bytes.
  static func littleEndian<T: FixedWidthInteger>(_ values: [T]) -> [UInt8] {
    values.flatMap { value in
      (0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
    }
  }
}
