import AttentionKit
import Foundation
import Testing

/// Two attention calls at once, from two threads: a materialized call (which sets OpenBLAS to its
/// `threads`) and a tiled call (which sets it to 1), 50 rounds, released together each round.
///
/// What it checks:
/// - each round's outputs are bit for bit those of the same calls made alone beforehand, so a
///   call's result depends neither on another call running nor on the OpenBLAS thread count it
///   ends up with (see `checkConcurrentCalls` for why bit for bit holds at these shapes);
/// - after every round, and after all of them, `BLAS.threadCount` is the value set before the
///   first call, as the leases of `Sources/AttentionKit/BLAS/BLASThreads.swift` promise.
///
/// What would fail without the leases: OpenBLAS's thread count is one setting for the whole
/// process. If each call saved the setting, applied its own count and restored what it saved
/// (`let saved = BLAS.threadCount; BLAS.threadCount = n; defer { BLAS.threadCount = saved }`),
/// two overlapping calls would restore each other's counts: with the setting at 3, the
/// materialized call saves 3 and sets 2, the tiled call saves 2 and sets 1, the materialized call
/// ends and restores 3, the tiled call ends and restores 2, and the process is left at 2 (or, in
/// the other order, at 1) — the thread-count check fails in the first round whose calls overlap
/// that way. The results would still agree here, but only because these shapes give the same bits
/// on any OpenBLAS thread count.
///
/// The calls and checks run in a child process (an exit test): Swift Testing runs the other tests
/// of this process in parallel, and their attention calls hold leases too, so in this process the
/// setting changes under the test's feet (a value set while another test's lease is held is
/// undone when that lease ends) and the before/after comparison would fail for reasons that are
/// not bugs. The child runs nothing but this test's body; its issues are reported here.
@Suite("Concurrent attention calls")
struct ConcurrentCallsTests {
  @Test("two calls at once: the results of each alone, OpenBLAS's thread count restored")
  func concurrentCalls() async {
    await #expect(processExitsWith: .success) {
      try ConcurrentCallsTests.checkConcurrentCalls()
    }
  }

  /// One attention call, made the same way alone and concurrently.
  struct Call: Sendable {
    var queries: Tensor
    var keys: Tensor
    var values: Tensor
    var mask: AttentionMask
    var kernel: Attention.Kernel
    var threads: Int

    func run() throws -> AttentionResult {
      try Attention.scaledDotProduct(
        queries: queries, keys: keys, values: values, mask: mask, kernel: kernel,
        threads: threads)
    }
  }

  /// The body of the exit test, in the child process.
  static func checkConcurrentCalls() throws {
    // 3, neither the materialized call's 2 nor the tiled call's 1, so that a count left behind
    // by either call shows.
    let original = BLAS.threadCount
    defer { BLAS.threadCount = original }
    BLAS.threadCount = 3
    let preset = BLAS.threadCount

    // Materialized: QKᵀ and weights·V are 128·128·32 = 524 288 multiply-adds each, above the
    // 4 · 65 536 up to which OpenBLAS keeps a product on one thread (interface/gemm.c), so with
    // 2 threads OpenBLAS really splits them. Bit-for-bit agreement across OpenBLAS thread counts
    // holds only because every product's inner dimension (D = 32 for QKᵀ, Tk = 128 for
    // weights·V) is at most 512: OpenBLAS's single-threaded and threaded drivers can split a
    // longer inner dimension into different blocks, whose partial sums then round differently.
    // Measured with OpenBLAS 0.3.21 (Cooperlake kernels): inner dimensions 513, 600, 700, 769,
    // 1000 and 2000 give different bits on 1 and on 2 threads, 512 and below never did; a
    // materialized call with Tk = 1000 gives outputs up to 9e-8 apart for `threads: 1` and
    // `threads: 2`. With longer keys this test would have to compare the materialized outputs
    // with a tolerance.
    let materialized = Call(
      queries: try .randomNormal(shape: [1, 1, 128, 32], seed: 11, stream: RandomStream.queries),
      keys: try .randomNormal(shape: [1, 1, 128, 32], seed: 11, stream: RandomStream.keys),
      values: try .randomNormal(shape: [1, 1, 128, 32], seed: 11, stream: RandomStream.values),
      mask: .none, kernel: .materialized, threads: 2)
    // Tiled: causal, 32 × 32 tiles, two of its own threads; OpenBLAS on one thread inside.
    let tiled = Call(
      queries: try .randomNormal(shape: [1, 2, 64, 16], seed: 12, stream: RandomStream.queries),
      keys: try .randomNormal(shape: [1, 2, 64, 16], seed: 12, stream: RandomStream.keys),
      values: try .randomNormal(shape: [1, 2, 64, 16], seed: 12, stream: RandomStream.values),
      mask: .causal, kernel: .tiled(.init(queryBlock: 32, keyBlock: 32)), threads: 2)

    // Alone first. A concurrent materialized call may run on the tiled call's one OpenBLAS thread
    // (leases share the count of the first), so its result alone on 1 thread must be the same.
    let materializedAlone = try materialized.run()
    var oneThread = materialized
    oneThread.threads = 1
    #expect(
      bits(try oneThread.run()) == bits(materializedAlone),
      "materialized: 1 and 2 threads give different bits")
    let tiledAlone = try tiled.run()
    #expect(BLAS.threadCount == preset, "after the calls alone: \(BLAS.threadCount), set \(preset)")

    var materializedDiffers: [Int] = []
    var tiledDiffers: [Int] = []
    var countChanged: [(round: Int, count: Int)] = []
    var overlapping = 0
    for round in 0..<rounds {
      // Alternate which thread starts first.
      let (a, b) = round.isMultiple(of: 2) ? (materialized, tiled) : (tiled, materialized)
      let (first, second) = runTogether(a, b)
      let (m, t) = round.isMultiple(of: 2) ? (first, second) : (second, first)
      if bits(try m.result.get()) != bits(materializedAlone) { materializedDiffers.append(round) }
      if bits(try t.result.get()) != bits(tiledAlone) { tiledDiffers.append(round) }
      let count = BLAS.threadCount
      if count != preset {
        countChanged.append((round, count))
        BLAS.threadCount = preset  // so that each round is judged on its own
      }
      if max(first.start, second.start) < min(first.end, second.end) { overlapping += 1 }
    }
    #expect(
      materializedDiffers.isEmpty,
      "materialized output differs from the call alone in rounds \(materializedDiffers)")
    #expect(
      tiledDiffers.isEmpty, "tiled output differs from the call alone in rounds \(tiledDiffers)")
    #expect(
      countChanged.isEmpty,
      """
      BLAS.threadCount, set to \(preset), was another count after \(countChanged.count) of \
      \(rounds) rounds; the first (round, count): \
      \(countChanged.prefix(5).map { "(\($0.round), \($0.count))" })
      """)
    #expect(BLAS.threadCount == preset, "after all rounds: \(BLAS.threadCount), set \(preset)")
    // Without overlap the test proves nothing about concurrency; two threads released together
    // overlap in nearly every round, so none in 50 means the harness is broken.
    #expect(overlapping > 0, "the two calls never ran at the same time in \(rounds) rounds")
  }

  static let rounds = 50

  /// A call's result and when it ran (`DispatchTime` nanoseconds).
  struct Timed: Sendable {
    var result: Result<AttentionResult, any Error>
    var start: UInt64
    var end: UInt64
  }

  /// Runs `first` and `second` on two new threads released at the same moment; waits for both.
  static func runTogether(_ first: Call, _ second: Call) -> (Timed, Timed) {
    final class Slot: @unchecked Sendable {
      // Written by its thread before `done.leave()`, read after `done.wait()`.
      var timed: Timed?
    }
    let slots = [Slot(), Slot()]
    let ready = DispatchSemaphore(value: 0)
    let go = DispatchSemaphore(value: 0)
    let done = DispatchGroup()
    for (slot, call) in zip(slots, [first, second]) {
      done.enter()
      Thread {
        ready.signal()
        go.wait()
        let start = DispatchTime.now().uptimeNanoseconds
        let result = Result { try call.run() }
        slot.timed = Timed(result: result, start: start, end: DispatchTime.now().uptimeNanoseconds)
        done.leave()
      }.start()
    }
    ready.wait()
    ready.wait()
    go.signal()
    go.signal()
    done.wait()
    return (slots[0].timed!, slots[1].timed!)
  }

  /// Output and weights (when returned) as bit patterns.
  static func bits(_ result: AttentionResult) -> [UInt32] {
    result.output.scalars.map(\.bitPattern) + (result.weights?.scalars.map(\.bitPattern) ?? [])
  }
}
