import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

@testable import attn

/// The reliability work beyond the bad-input battery (BadInputTests has the cases that fit its
/// pattern, in `reliabilityCases`): keep masks of every dtype and additive masks, outputs that
/// are streams and devices, closed and full standard streams, bounded reads from files and pipes,
/// signals, concurrent runs, permissions, long names, escaped names, fully masked rows, and a few
/// small fixes. Shell redirections run through `/bin/sh -c` (`ReliabilityShell`).
@Suite("Reliability: masks, streams, budgets, signals, concurrency, names")
struct ReliabilityTests {
  static let qkv = ["--q", "q.npy", "--k", "k.npy", "--v", "v.npy"]

  // MARK: - 1. Keep masks and additive masks

  @Test(
    "an additive mask given to --mask is named as one, with the flag that takes it",
    arguments: ["mask_hf.npy", "mask_neginf.npy"])
  func additiveMaskAsKeepMask(file: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let run = try AttnCLI.run(["dropout"] + Self.qkv + ["--mask", file], in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderr)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderr)")
      for fragment in [file, "at [0, 1]", "look like an additive mask", "--bias"] {
        #expect(run.stderr.contains(fragment), "stderr \(run.stderr) should name \(fragment)")
      }
    }
  }

  @Test("a mask holding a 2 is not called additive")
  func otherValuesAreNotAdditive() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let run = try AttnCLI.run(["dropout", "--mask", "mask_two.npy"], in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderr)")
      #expect(run.stderr.contains("value 2.0 at [2, 3] is not 0 or 1"), "stderr: \(run.stderr)")
      #expect(!run.stderr.contains("additive mask,"), "stderr: \(run.stderr)")
      #expect(!run.stderr.contains("look like"), "stderr: \(run.stderr)")
    }
  }

  /// The same causal 0/1 pattern stored as booleans, integers and floats gives the same output,
  /// bit for bit.
  @Test("keep masks of every dtype run and give the bool mask's output")
  func keepMaskDtypes() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      func output(mask: String) throws -> [UInt32] {
        let name = "o_" + mask
        let run = try AttnCLI.run(
          ["dropout"] + Self.qkv + ["--mask", mask, "--out", name], in: folder)
        #expect(run.status == 0, "\(mask): exit \(run.status), stderr: \(run.stderr)")
        return try NPY.read(contentsOf: folder.appendingPathComponent(name).path)
          .tensor.scalars.map(\.bitPattern)
      }
      let expected = try output(mask: "mask_b1.npy")
      #expect(expected.count == 32)
      for mask in [
        "mask_u1.npy", "mask_i1.npy", "mask_i4.npy", "mask_i8.npy", "mask_f2.npy", "mask_f4.npy",
        "mask_f8.npy",
      ] {
        #expect(try output(mask: mask) == expected, "\(mask) differs from mask_b1.npy")
      }
    }
  }

  /// Hugging Face's additive mask (0 and float32's lowest) and 0/−inf, given to --bias without
  /// --allow-nonfinite, mask what the keep mask masks.
  @Test(
    "an additive mask given to --bias gives the keep mask's output",
    arguments: ["mask_hf.npy", "mask_neginf.npy"])
  func additiveMaskAsBias(file: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let keep = try AttnCLI.run(
        ["dropout"] + Self.qkv + ["--mask", "mask_b1.npy", "--out", "keep.npy"], in: folder)
      #expect(keep.status == 0, "exit \(keep.status), stderr: \(keep.stderr)")
      let bias = try AttnCLI.run(
        ["dropout"] + Self.qkv + ["--bias", file, "--out", "bias.npy"], in: folder)
      #expect(bias.status == 0, "exit \(bias.status), stderr: \(bias.stderr)")
      #expect(bias.stdout.contains("Solution verified"), "stdout: \(bias.stdout)")
      let a = try NPY.read(contentsOf: folder.appendingPathComponent("keep.npy").path).tensor
      let b = try NPY.read(contentsOf: folder.appendingPathComponent("bias.npy").path).tensor
      try #require(a.shape == [1, 4, 8] && b.shape == [1, 4, 8])
      let difference = zip(a.scalars, b.scalars).map { abs($0 - $1) }.max() ?? .nan
      #expect(difference <= 1e-6, "largest difference \(difference)")
    }
  }

  // MARK: - 2. Outputs that are not regular files

  @Test(
    "--out naming standard output puts the .npy on stdout and the report on stderr",
    arguments: [["--out", "-"], ["--out", "/dev/stdout"], ["--out=-"], ["--out=/dev/fd/1"]])
  func outputToStandardOutput(flags: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let before = try BadInputFiles.snapshot(folder)
      let run = try ReliabilityShell.attn(["dropout"] + flags, in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrText.contains("Solution verified"), "stderr: \(run.stderrText)")
      let array = try NPY.decode([UInt8](run.stdout), source: "stdout")
      #expect(array.tensor.shape == [1, 4, 8])
      #expect(try BadInputFiles.snapshot(folder) == before, "the folder changed")
    }
  }

  @Test("--out /dev/null is written through; /dev/null stays a character device")
  func outputToDevNull() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let before = try BadInputFiles.snapshot(folder)
      let run = try AttnCLI.run(["dropout", "--out", "/dev/null"], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      #expect(ReliabilityShell.isCharacterDevice("/dev/null"))
      #expect(try BadInputFiles.snapshot(folder) == before, "the folder changed")
    }
  }

  @Test("a symbolic link to /dev/null as --out stays that link")
  func outputThroughLinkToDevNull() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let link = folder.appendingPathComponent("null.npy").path
      try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "/dev/null")
      let before = try BadInputFiles.snapshot(folder)
      let run = try AttnCLI.run(["dropout", "--out", "null.npy"], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      #expect(try FileManager.default.destinationOfSymbolicLink(atPath: link) == "/dev/null")
      #expect(ReliabilityShell.isCharacterDevice("/dev/null"))
      #expect(try BadInputFiles.snapshot(folder) == before, "the folder changed")
    }
  }

  /// OutputTarget follows a symbolic link to `/dev/stdout` to descriptor 1; the report must then
  /// move to stderr as it does for `--out /dev/stdout`, or the two mix on stdout.
  @Test("a symbolic link to /dev/stdout as --out keeps the report off stdout")
  func outputThroughLinkToStandardOutput() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      try FileManager.default.createSymbolicLink(
        atPath: folder.appendingPathComponent("stdout.npy").path,
        withDestinationPath: "/dev/stdout")
      let before = try BadInputFiles.snapshot(folder)
      let run = try ReliabilityShell.attn(["dropout", "--out", "stdout.npy"], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrText.contains("Solution verified"), "stderr: \(run.stderrText)")
      #expect(throws: Never.self) {
        let array = try NPY.decode([UInt8](run.stdout), source: "stdout")
        #expect(array.tensor.shape == [1, 4, 8])
      }
      #expect(try BadInputFiles.snapshot(folder) == before, "the folder changed")
    }
  }

  // (A FIFO without a reader as --out is in the battery, `reliabilityCases`.)

  // MARK: - 3. Standard error closed or full

  @Test(
    "an error with standard error closed or full exits with its code, no crash",
    arguments: [
      ("dropout --p 2", Int32(64)),
      ("dropout --q nofile.npy --k k.npy --v v.npy", Int32(1)),
    ], ["2>&-", "2>/dev/full"])
  func errorWithoutStandardError(command: (String, Int32), redirection: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let before = try BadInputFiles.snapshot(folder)
      let run = try ReliabilityShell.run(
        "\"$ATTN\" \(command.0) \(redirection)", in: folder)
      #expect(run.status == command.1, "exit \(run.status)")
      #expect(run.stdout.isEmpty, "stdout: \(String(decoding: run.stdout, as: UTF8.self))")
      #expect(try BadInputFiles.snapshot(folder) == before, "the folder changed")
    }
  }

  // MARK: - 4. Standard output failing

  @Test("a report to a full standard output is exit 1, one line saying so")
  func reportToFullStandardOutput() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try ReliabilityShell.run(
        "\"$ATTN\" relpos --format json > /dev/full", in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderrText)")
      #expect(run.stderrText.contains("standard output"), "stderr: \(run.stderrText)")
    }
  }

  @Test("a report to a closed standard output is exit 1, one line saying so")
  func reportToClosedStandardOutput() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try ReliabilityShell.run("\"$ATTN\" dropout >&-", in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderrText)")
      #expect(
        run.stderrText.contains("standard output is closed"), "stderr: \(run.stderrText)")
    }
  }

  /// With descriptor 1 closed, the first file opened would take it and receive the report.
  @Test("with standard output closed, the report does not go into --out")
  func closedStandardOutputSparesTheOutput() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let reference = try AttnCLI.run(["dropout", "--out", "ref.npy"], in: folder)
      #expect(reference.status == 0, "exit \(reference.status), stderr: \(reference.stderr)")
      let run = try ReliabilityShell.run("\"$ATTN\" dropout --out o.npy >&-", in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(
        run.stderrText.contains("standard output is closed"), "stderr: \(run.stderrText)")
      let written = try Data(contentsOf: folder.appendingPathComponent("o.npy"))
      let expected = try Data(contentsOf: folder.appendingPathComponent("ref.npy"))
      #expect(throws: Never.self) { try NPY.decode([UInt8](written), source: "o.npy") }
      #expect(written == expected, "o.npy is not the output")
    }
  }

  // MARK: - 5. Bounded reads

  @Test("a .npy over --max-memory through a pipe is refused, naming it")
  func pipeOverBudget() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: ["big.npy"])
      let run = try ReliabilityShell.run(
        "cat big.npy | \"$ATTN\" dropout --q /dev/stdin --k k.npy --v v.npy --max-memory 1M",
        in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderrText)")
      for fragment in ["memory budget exceeded", "/dev/stdin"] {
        #expect(run.stderrText.contains(fragment), "stderr \(run.stderrText): \(fragment)")
      }
    }
  }

  /// A valid header declaring 10¹² float32 elements, then 100 MB of zeros: refused from the
  /// header, before the data is read or anything allocated.
  @Test(
    "an endless pipe behind a huge shape is refused from its header",
    arguments: [[], ["--max-memory", "64M"]])
  func endlessPipe(flags: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let header = BadInputFiles.npy(descr: "<f4", shape: [1_000_000, 1_000_000], data: [])
      try Data(header).write(to: folder.appendingPathComponent("huge.header"))
      let run = try ReliabilityShell.run(
        "{ cat huge.header; head -c 100000000 /dev/zero; } | \"$ATTN\" dropout --q /dev/stdin"
          + " --k k.npy --v v.npy " + flags.joined(separator: " "),
        in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderrText)")
      #expect(run.stderrText.contains("memory budget exceeded"), "stderr: \(run.stderrText)")
      #expect(run.stderrText.contains("/dev/stdin"), "stderr: \(run.stderrText)")
    }
  }

  @Test("a pipe with bytes after the data is 'data too long'")
  func pipeWithTrailingBytes() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let run = try ReliabilityShell.run(
        "{ cat k.npy; printf trailing; } | \"$ATTN\" dropout --q q.npy --k /dev/stdin --v v.npy",
        in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderrText)")
      #expect(run.stderrText.contains("data too long"), "stderr: \(run.stderrText)")
      #expect(run.stderrText.contains("/dev/stdin"), "stderr: \(run.stderrText)")
    }
  }

  /// Under a 4 GB address-space limit, sizes from flags that the budget (given as 100G, or the
  /// default, which the limit lowers) lets through are refused before allocating: exit 1 and
  /// one line, never a trap (134) or a segmentation fault (139).
  @Test(
    "allocations over ulimit -v are one-line errors, not crashes",
    arguments: [
      "dropout --seq-len 4096 --d-k 65536 --batch 4 --max-memory 100G",
      "dropout --seq-len 4096 --d-k 65536 --batch 4",
      "dropout --seq-len 30000 --batch 2 --max-memory 100G",
      "dropout --seq-len 30000 --batch 2 --kernel tiled --d-k 65536 --max-memory 100G",
      "dropout --seq-len 30000 --batch 2 --eval --max-memory 100G",
      "relpos --seq-len 30000 --batch 2 --max-memory 100G",
      "relpos --d-model 65536 --max-memory 100G",
    ])
  func addressSpaceLimit(command: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try ReliabilityShell.run(
        "ulimit -v 4000000 && exec \"$ATTN\" \(command)", in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderrText)")
      #expect(
        run.stderrText.contains("out of memory") || run.stderrText.contains("memory budget"),
        "stderr: \(run.stderrText)")
    }
  }

  // (`bench --threads 1000 … --max-memory 64M` and a 4 MB file over `--max-memory 1M` are in the
  // battery.)

  // MARK: - 6. Signals

  /// Runs `attn dropout --seq-len 512 --batch 2 --eval --out o.npy --weights-out w.fifo` (eval:
  /// no dropout checks, a faster run; the writing is the same) in `folder`
  /// (made by `BadInputFiles.create`) with a reader on the FIFO that never reads, and calls
  /// `body` once attn has staged o.npy's temporary file and is blocked writing 2 MiB of weights
  /// into the FIFO's 64 KiB buffer; `body` gets the child and a function that closes the reader.
  /// The wait is a poll with a 20 s ceiling, not a measurement. Afterwards the child has exited.
  static func withWriterBlockedOnFIFO(
    in folder: URL, _ body: (ReliabilityShell.Child, _ closeReader: () -> Void) throws -> Void
  ) throws {
    let reader = open(folder.appendingPathComponent("w.fifo").path, O_RDONLY | O_NONBLOCK)
    try #require(reader >= 0, "cannot open w.fifo for reading: errno \(errno)")
    var readerOpen = true
    func closeReader() {
      if readerOpen { close(reader) }
      readerOpen = false
    }
    defer { closeReader() }
    let child = try ReliabilityShell.start(
      [
        "dropout", "--seq-len", "512", "--batch", "2", "--eval", "--out", "o.npy", "--weights-out",
        "w.fifo",
      ], in: folder)
    defer {
      if child.process.isRunning { child.process.terminate() }
      child.process.waitUntilExit()
      child.cleanUp()
    }
    // Staged: the temporary file exists, and the FIFO has data (attn writes it after staging).
    var blocked = false
    for _ in 0..<2000 {
      guard child.process.isRunning else { break }
      let names = try FileManager.default.contentsOfDirectory(atPath: folder.path)
      var request = pollfd(fd: reader, events: Int16(POLLIN), revents: 0)
      if names.contains(where: { $0.hasPrefix(".o.npy.tmp-") }), poll(&request, 1, 0) == 1 {
        blocked = true
        break
      }
      usleep(10_000)
    }
    guard blocked else {
      Issue.record("attn did not block writing w.fifo; stderr: \(child.stderr())")
      return
    }
    try body(child, closeReader)
  }

  @Test(
    "a signal while writing removes the temporary files and exits 128 + n",
    arguments: [SIGINT, SIGTERM, SIGHUP])
  func signalRemovesTemporaryFiles(signal: Int32) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let before = try BadInputFiles.snapshot(folder)
      try Self.withWriterBlockedOnFIFO(in: folder) { child, _ in
        kill(child.process.processIdentifier, signal)
        child.process.waitUntilExit()
        #expect(child.process.terminationReason == .exit, "killed by the signal, not handled")
        #expect(
          child.process.terminationStatus == 128 + signal,
          "exit \(child.process.terminationStatus), stderr: \(child.stderr())")
      }
      #expect(try BadInputFiles.snapshot(folder) == before, "the folder changed")
    }
  }

  /// The reader of a FIFO output goes away mid-write (EPIPE, or SIGPIPE): the run fails, and
  /// o.npy's staged temporary file must go with it, as on any other failure.
  @Test("a FIFO reader leaving mid-write leaves no temporary file")
  func readerLeavesMidWrite() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let before = try BadInputFiles.snapshot(folder)
      try Self.withWriterBlockedOnFIFO(in: folder) { child, closeReader in
        closeReader()
        child.process.waitUntilExit()
        #expect(
          child.process.terminationStatus != 0,
          "exit \(child.process.terminationStatus), stderr: \(child.stderr())")
      }
      let after = try BadInputFiles.snapshot(folder)
      let changed = Set(before.keys).union(after.keys).filter { before[$0] != after[$0] }
      #expect(changed.isEmpty, "files created, changed or removed: \(changed.sorted())")
    }
  }

  // MARK: - 7. Concurrent runs

  /// Eight runs with different seeds (different dropout masks) write o.npy and w.npy at once;
  /// whichever finishes last, o.npy must be w.npy · V: both files from one run.
  @Test("concurrent runs replace their outputs as a set")
  func concurrentRuns() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let values = try NPY.readDoubles(contentsOf: folder.appendingPathComponent("v.npy").path)
      try #require(values.shape == [1, 4, 8])
      func arguments(seed: Int, out: String, weights: String) -> [String] {
        ["dropout"] + Self.qkv + [
          "--p", "0.5", "--seed", "\(seed)", "--out", out, "--weights-out", weights,
        ]
      }
      func read(_ name: String) throws -> [Double] {
        try NPY.readDoubles(contentsOf: folder.appendingPathComponent(name).path).values
      }
      // The check can tell runs apart: two seeds' outputs do not match each other's weights.
      for seed in [1, 2] {
        let run = try AttnCLI.run(
          arguments(seed: seed, out: "o\(seed).npy", weights: "w\(seed).npy"), in: folder)
        try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      }
      let (o1, w1, w2) = (try read("o1.npy"), try read("w1.npy"), try read("w2.npy"))
      #expect(Self.mismatch(output: o1, weights: w1, values: values.values) == nil)
      #expect(Self.mismatch(output: o1, weights: w2, values: values.values) != nil)
      for name in ["o1.npy", "w1.npy", "o2.npy", "w2.npy"] {
        try FileManager.default.removeItem(at: folder.appendingPathComponent(name))
      }
      let before = try BadInputFiles.snapshot(folder)

      for round in 0..<3 {
        let children = try (0..<8).map { index in
          try ReliabilityShell.start(
            arguments(seed: 100 * round + index + 3, out: "o.npy", weights: "w.npy"), in: folder)
        }
        for child in children {
          child.process.waitUntilExit()
          #expect(
            child.process.terminationStatus == 0,
            "round \(round): exit \(child.process.terminationStatus), stderr: \(child.stderr())")
          child.cleanUp()
        }
        let output = try read("o.npy")
        let weights = try read("w.npy")
        let mismatch = Self.mismatch(output: output, weights: weights, values: values.values)
        #expect(mismatch == nil, "round \(round): o.npy is not w.npy · V: \(mismatch ?? "")")
        var after = try BadInputFiles.snapshot(folder)
        #expect(after.removeValue(forKey: "o.npy") != nil)
        #expect(after.removeValue(forKey: "w.npy") != nil)
        #expect(after == before, "round \(round): files left: \(after.keys.sorted())")
      }
    }
  }

  /// Where `output` [4, 8] differs from `weights` [4, 4] · `values` [4, 8] by more than 1e-5
  /// of the sum of the magnitudes of the products (in Double); `nil` when it nowhere does.
  static func mismatch(output: [Double], weights: [Double], values: [Double]) -> String? {
    guard output.count == 32, weights.count == 16, values.count == 32 else {
      return "sizes \(output.count), \(weights.count), \(values.count)"
    }
    for row in 0..<4 {
      for column in 0..<8 {
        let products = (0..<4).map { weights[4 * row + $0] * values[8 * $0 + column] }
        let expected = products.reduce(0, +)
        let scale = max(products.map(abs).reduce(0, +), 1e-30)
        if abs(output[8 * row + column] - expected) > 1e-5 * scale {
          return "[\(row), \(column)]: \(output[8 * row + column]) ≠ \(expected)"
        }
      }
    }
    return nil
  }

  // MARK: - 8. Permissions and owner

  @Test("a replaced output keeps its permission bits", arguments: [0o600, 0o640, 0o604])
  func keepsMode(mode: Int) throws {
    try AttnCLI.withTemporaryFolder { folder in
      let path = folder.appendingPathComponent("o.npy").path
      try Data(NPY.encode(try Tensor(shape: [1]))).write(to: URL(fileURLWithPath: path))
      try #require(chmod(path, mode_t(mode)) == 0)
      let run = try AttnCLI.run(["dropout", "--out", "o.npy"], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      var info = stat()
      try #require(stat(path, &info) == 0)
      #expect(
        Int(info.st_mode & 0o7777) == mode, "mode \(String(info.st_mode & 0o7777, radix: 8))")
      #expect(try NPY.read(contentsOf: path).tensor.shape == [1, 4, 8], "not replaced")
    }
  }

  // Only root may give a file to another user, so only root can set the scene (and only root's
  // attn can hand the owner on).
  @Test(
    "a replaced output keeps its owner (root)",
    .enabled(if: geteuid() == 0, "chown to another user needs root"))
  func keepsOwner() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let path = folder.appendingPathComponent("o.npy").path
      try Data(NPY.encode(try Tensor(shape: [1]))).write(to: URL(fileURLWithPath: path))
      try #require(chown(path, 65534, 65534) == 0)
      try #require(chmod(path, 0o640) == 0)
      let run = try AttnCLI.run(["dropout", "--out", "o.npy"], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      var info = stat()
      try #require(stat(path, &info) == 0)
      #expect(info.st_uid == 65534 && info.st_gid == 65534, "owner \(info.st_uid):\(info.st_gid)")
      #expect(info.st_mode & 0o7777 == 0o640, "mode \(String(info.st_mode & 0o7777, radix: 8))")
      #expect(try NPY.read(contentsOf: path).tensor.shape == [1, 4, 8], "not replaced")
    }
  }

  // MARK: - 9. Long names

  /// Names of 229 to 255 bytes (the limit), ASCII, and 255 bytes of two-byte characters (the
  /// temporary name must be cut at a character boundary).
  static let longNames: [String] =
    (229...255).map { String(repeating: "n", count: $0 - 4) + ".npy" }
    + ["x" + String(repeating: "é", count: 125) + ".npy"]

  @Test("an output name up to 255 bytes is written", arguments: longNames)
  func longOutputName(name: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let before = try BadInputFiles.snapshot(folder)
      let run = try AttnCLI.run(["dropout", "--out", name], in: folder)
      #expect(run.status == 0, "\(name.utf8.count) bytes: exit \(run.status), \(run.stderr)")
      var after = try BadInputFiles.snapshot(folder)
      #expect(after.removeValue(forKey: name) != nil, "\(name.utf8.count) bytes: not written")
      #expect(after == before, "\(name.utf8.count) bytes: left \(after.keys.sorted())")
    }
  }

  // MARK: - 10. Names and shapes from files in messages

  @Test("a tensor name with ESC, CR and NUL is shown escaped")
  func escapedTensorName() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let run = try ReliabilityShell.attn(
        ["relpos", "--weights", "w_escape.safetensors"], in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      for byte: UInt8 in [0x1B, 0x0D, 0x00] {
        #expect(!run.stderr.contains(byte), "raw byte \(byte) on stderr: \(run.stderrText)")
      }
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderrText)")
      for fragment in [#"\u{1b}[31m"#, #"\r"#, #"\u{0}"#] {
        #expect(run.stderrText.contains(fragment), "stderr \(run.stderrText): \(fragment)")
      }
    }
  }

  @Test("a bidirectional control in a .npy header's descr is shown escaped")
  func escapedDescr() throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let bytes = try Data(contentsOf: folder.appendingPathComponent("descr_bidi.npy"))
      #expect(bytes[6] == 3, "not a version 3.0 header")
      let run = try ReliabilityShell.attn(
        ["dropout", "--q", "descr_bidi.npy", "--k", "k.npy", "--v", "v.npy"], in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderrText)")
      let rightToLeftOverride: [UInt8] = [0xE2, 0x80, 0xAE]
      #expect(
        run.stderr.range(of: Data(rightToLeftOverride)) == nil, "raw U+202E on stderr")
      #expect(run.stderrText.contains(#"\u{202e}"#), "stderr: \(run.stderrText)")
    }
  }

  @Test(
    "a rank-30,000 array gives a short error line wherever it goes",
    arguments: [
      ["dropout", "--q", "rank30000.npy", "--k", "k.npy", "--v", "v.npy"],
      ["dropout", "--q", "q.npy", "--k", "rank30000.npy", "--v", "v.npy"],
      ["dropout", "--mask", "rank30000.npy"],
      ["dropout", "--bias", "rank30000.npy"],
      ["relpos", "--input", "rank30000.npy"],
      ["relpos", "--mask", "rank30000.npy"],
    ])
  func hugeRank(arguments: [String]) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: arguments)
      let bytes = try Data(contentsOf: folder.appendingPathComponent("rank30000.npy"))
      #expect(bytes[6] == 2, "not a version 2.0 header")
      let run = try AttnCLI.run(arguments, in: folder)
      #expect(run.status == 1, "exit \(run.status), stderr: \(run.stderr.prefix(300))")
      #expect(run.stderrLines.count == 1, "stderr: \(run.stderr.prefix(300))")
      #expect(
        run.stderr.utf8.count < 1000,
        "\(run.stderr.utf8.count) bytes: \(run.stderr.prefix(300))…")
    }
  }

  // MARK: - 11. Fully masked query rows

  @Test(
    "a query row masked by −inf in --bias gives a zero output row",
    arguments: ["materialized", "tiled"])
  func negativeInfinityRow(kernel: String) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try BadInputFiles.create(in: folder, naming: [])
      let run = try AttnCLI.run(
        ["dropout"] + Self.qkv + [
          "--bias", "bias_row_neginf.npy", "--kernel", kernel, "--out", "o.npy",
        ], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      #expect(run.stdout.contains("Solution verified"), "stdout: \(run.stdout)")
      let output = try NPY.read(contentsOf: folder.appendingPathComponent("o.npy").path).tensor
      try #require(output.shape == [1, 4, 8])
      let row2 = Array(output.scalars[16..<24])
      #expect(row2.allSatisfy { $0 == 0 }, "row 2: \(row2)")
      #expect(output.scalars.allSatisfy { $0.isFinite }, "\(output.scalars)")
    }
  }

  // MARK: - 12. Small fixes

  @Test("--p=-0 is printed as p = 0.0")
  func negativeZeroProbability() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(["dropout", "--p=-0"], in: folder)
      #expect(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
      let first = run.stdout.split(separator: "\n").first.map(String.init) ?? ""
      #expect(first.contains("p = 0.0"), "first line: \(first)")
      #expect(!first.contains("-0"), "first line: \(first)")
    }
  }

  // (`--explain` on an empty batch, `--max-memory 0` and `2000T`, `--repeats 100000` are in the
  // battery.)

  @Test(
    "ATTN_KEEP_OPENBLAS_CORE: unset, empty and 0 mean no; anything else yes",
    arguments: [
      (nil, false), ("", false), ("0", false), ("1", true), ("yes", true), ("true", true),
    ] as [(String?, Bool)])
  func keepsOpenBLASCore(value: String?, keeps: Bool) {
    var environment = ["PATH": "/usr/bin"]
    environment["ATTN_KEEP_OPENBLAS_CORE"] = value
    #expect(OpenBLASCore.keepsCore(environment) == keeps)
  }
}

/// Running `attn` through `/bin/sh -c` for the redirections a test needs (`2>&-`, `> /dev/full`,
/// pipes, `ulimit`), or as a child the test signals or runs alongside others. Output goes to
/// files in a folder of its own, never the folder the test compares.
enum ReliabilityShell {
  struct Result {
    var status: Int32
    var stdout: Data
    var stderr: Data

    var stderrText: String { String(decoding: stderr, as: UTF8.self) }
    var stderrLines: [Substring] { stderrText.split(separator: "\n") }
  }

  typealias Child = AttnCLI.Child

  /// Starts `attn arguments…` in `folder`.
  static func start(_ arguments: [String], in folder: URL) throws -> Child {
    try AttnCLI.start(arguments, in: folder)
  }

  /// Runs `script` with `/bin/sh -c` in `folder` and waits for it.
  static func run(_ script: String, in folder: URL) throws -> Result {
    let child = try AttnCLI.start(
      executable: URL(fileURLWithPath: "/bin/sh"), ["-c", script], in: folder)
    defer { child.cleanUp() }
    child.process.waitUntilExit()
    // A child killed by signal n (attn exec'd by the shell) is reported as a shell does: 128 + n.
    let killed = child.process.terminationReason == .uncaughtSignal
    return Result(
      status: (killed ? 128 : 0) + child.process.terminationStatus,
      stdout: child.stdout(), stderr: child.stderrData())
  }

  /// Runs `attn arguments…` (quoted for the shell) followed by `redirections`.
  static func attn(_ arguments: [String], _ redirections: String = "", in folder: URL) throws
    -> Result
  {
    let quoted = arguments.map { "'" + $0.replacingOccurrences(of: "'", with: #"'\''"#) + "'" }
    return try run(
      (["\"$ATTN\""] + quoted).joined(separator: " ") + " " + redirections, in: folder)
  }

  static func isCharacterDevice(_ path: String) -> Bool {
    var info = stat()
    return stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFCHR
  }
}
