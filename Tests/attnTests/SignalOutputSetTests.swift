import AttentionKit
import Foundation
import TensorIO
import Testing

/// Issue 23, item 7: a signal that arrives while `attn` writes several outputs ends the run with
/// the outputs as a set, all as they were or all new — never one replaced and the next old.
///
/// The real executable writes `--out o.npy` (2 MiB: Q `[1, 512, 8]`, V `[1, 1, 1024]`) and
/// `--weights-out w.npy` over two files that hold something else, and gets the signal at a random
/// moment of the write: the test waits for `o.npy`'s temporary file to appear (the write has
/// begun), then sleeps a random time between 10 µs and 5 ms, log-uniform (so that the signals
/// fall before, during and after the renames on a fast or a loaded machine alike), and sends the
/// signal. Then the run must have exited by itself with 128 + n (or 0, when the signal came after
/// it was done), both files must be byte for byte the old ones or both those of a completed run
/// (and the new ones when it exited 0), and no temporary file may be left. The timing only spreads
/// the signals over the write; nothing asserts on a duration. 10 signals of each kind, each run a
/// few tenths of a second. (Before the fix, about one run in eight ended with o.npy new and
/// w.npy old.)
@Suite("Item 7: a signal leaves the outputs all old or all new")
struct SignalOutputSetTests {
  static let runsPerSignal = 10
  static let arguments = [
    "sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--out", "o.npy",
    "--weights-out", "w.npy",
  ]
  static let old = (o: Data("the old o.npy".utf8), w: Data("the old w.npy".utf8))

  /// The two outputs as they are now.
  static func outputs(in folder: URL) throws -> (o: Data, w: Data) {
    (
      try Data(contentsOf: folder.appendingPathComponent("o.npy")),
      try Data(contentsOf: folder.appendingPathComponent("w.npy"))
    )
  }

  static func resetOutputs(in folder: URL) throws {
    try old.o.write(to: folder.appendingPathComponent("o.npy"))
    try old.w.write(to: folder.appendingPathComponent("w.npy"))
  }

  static func temporaryFiles(in folder: URL) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: folder.path).filter {
      $0.contains(".tmp-")
    }
  }

  /// Starts the run and returns once `o.npy`'s temporary file exists (or the run has ended).
  /// Polls as fast as the folder can be listed, for 30 s at most.
  static func startWriting(in folder: URL) throws -> AttnCLI.Child {
    let child = try AttnCLI.start(arguments, in: folder)
    let deadline = DispatchTime.now().uptimeNanoseconds + 30_000_000_000
    while child.process.isRunning && DispatchTime.now().uptimeNanoseconds < deadline {
      let names = try FileManager.default.contentsOfDirectory(atPath: folder.path)
      if names.contains(where: { $0.hasPrefix(".o.npy.tmp-") }) { break }
    }
    return child
  }

  @Test(
    "Item 7: SIGINT, SIGTERM or SIGHUP at random moments of the write leaves all old or all new",
    arguments: [SIGINT, SIGTERM, SIGHUP])
  func item7SignalLeavesTheSetWhole(signal: Int32) throws {
    try AttnCLI.withTemporaryFolder { folder in
      let q = try Tensor.randomNormal(shape: [1, 512, 8], seed: 7, stream: 1)
      let k = try Tensor.randomNormal(shape: [1, 1, 8], seed: 7, stream: 2)
      let v = try Tensor.randomNormal(shape: [1, 1, 1024], seed: 7, stream: 3)
      for (name, tensor) in [("q.npy", q), ("k.npy", k), ("v.npy", v)] {
        try Data(NPY.encode(tensor)).write(to: folder.appendingPathComponent(name))
      }

      // A run to completion: the new set.
      try Self.resetOutputs(in: folder)
      let reference = try Self.startWriting(in: folder)
      reference.process.waitUntilExit()
      defer { reference.cleanUp() }
      try #require(
        reference.process.terminationStatus == 0, "the run failed: \(reference.stderr())")
      let new = try Self.outputs(in: folder)
      try #require(new.o != Self.old.o && new.w != Self.old.w)

      var outcomes: [String: Int] = [:]
      for run in 0..<Self.runsPerSignal {
        try Self.resetOutputs(in: folder)
        let child = try Self.startWriting(in: folder)
        defer { child.cleanUp() }
        let delay = UInt32(10 * pow(500, Double.random(in: 0...1)))  // µs
        usleep(delay)
        kill(child.process.processIdentifier, signal)
        child.process.waitUntilExit()
        let status = child.process.terminationStatus
        let label = "signal \(signal), run \(run), after \(delay) µs"
        #expect(child.process.terminationReason == .exit, "\(label): killed, not handled")
        #expect(
          status == 0 || status == 128 + signal,
          "\(label): exit \(status), stderr: \(child.stderr())")
        let got = try Self.outputs(in: folder)
        let allOld = got.o == Self.old.o && got.w == Self.old.w
        let allNew = got.o == new.o && got.w == new.w
        let o = got.o == new.o ? "new" : got.o == Self.old.o ? "old" : "other"
        let w = got.w == new.w ? "new" : got.w == Self.old.w ? "old" : "other"
        #expect(allOld || allNew, "\(label), exit \(status): o.npy \(o), w.npy \(w)")
        #expect(status != 0 || allNew, "\(label): exit 0 with o.npy \(o), w.npy \(w)")
        #expect(try Self.temporaryFiles(in: folder).isEmpty, "\(label): temporary files left")
        outcomes[(allOld ? "old" : allNew ? "new" : "mixed") + ", exit \(status)", default: 0] += 1
      }
      // The signals reached runs in progress (not only finished ones): the check was exercised.
      let interrupted = outcomes.filter { $0.key.hasSuffix("exit \(128 + signal)") }
      #expect(!interrupted.isEmpty, "signal \(signal): no run was interrupted: \(outcomes)")
    }
  }
}
