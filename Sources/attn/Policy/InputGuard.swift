import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// The CLI's policy on hostile or unlucky inputs: non-finite values in files, non-finite results
/// from finite inputs, and buffers sized by flags that the memory budget cannot hold.
///
/// The library finds (`Tensor.firstNonFiniteIndex`) and measures; this file decides what is an
/// error. Every error here is one line naming the file (or the flags) and the first culprit, and
/// ends the run with exit code 1 before any output file is written.

/// `--allow-nonfinite`, for the commands that read tensors from files.
struct InputSafetyOptions: ParsableArguments {
  @Flag(
    help: """
      Accept NaN and ±inf in input files (then NaN propagates per row, as in PyTorch). Without \
      it the first one is an error naming the file and its index; -inf in --bias is always \
      accepted (it masks).
      """)
  var allowNonfinite = false

  /// Refuses a tensor read from `path` that holds NaN or ±∞, unless `--allow-nonfinite`.
  ///
  /// `allowingNegativeInfinity` is for additive masks (`--bias`), where `−∞` is how a score is
  /// masked; NaN and `+∞` are refused there too (`+∞` turns a row into `∞ − ∞ = NaN`).
  func check(_ tensor: Tensor, from path: String, allowingNegativeInfinity: Bool = false) throws {
    guard !allowNonfinite,
      let flat = tensor.firstNonFiniteFlatIndex(allowingNegativeInfinity: allowingNegativeInfinity)
    else { return }
    throw AttentionError.file(
      path: path,
      message: "\(Self.describe(tensor, at: flat)) (pass --allow-nonfinite to accept NaN and ±inf)")
  }

  /// `check(_:from:)` for every input read from a file (a `nil` path is a generated input, which
  /// is finite by construction), then for every additive mask, where `−∞` is allowed.
  func check(
    _ inputs: [(tensor: Tensor?, path: String?)], biases: [(tensor: Tensor?, path: String?)] = []
  ) throws {
    for case (let tensor?, let path?) in inputs { try check(tensor, from: path) }
    for case (let tensor?, let path?) in biases {
      try check(tensor, from: path, allowingNegativeInfinity: true)
    }
  }

  /// Refuses a safetensors file any of whose tensors holds NaN or ±∞, unless `--allow-nonfinite`;
  /// the message names the tensor and the index.
  func check(_ file: SafeTensorsFile) throws {
    guard !allowNonfinite else { return }
    for name in file.names {
      guard let tensor = file.tensors[name], let flat = tensor.firstNonFiniteFlatIndex() else {
        continue
      }
      throw AttentionError.file(
        path: file.source,
        message: "tensor \(quotedForMessage(name)): \(Self.describe(tensor, at: flat))"
          + " (pass --allow-nonfinite to accept NaN and ±inf)")
    }
  }

  /// "NaN at [0, 3, 5]".
  static func describe(_ tensor: Tensor, at flat: Int) -> String {
    let index = tensor.multiIndex(ofFlat: flat).map(String.init).joined(separator: ", ")
    return "\(nonFiniteName(tensor.scalars[flat])) at [\(index)]"
  }
}

/// Refuses a result tensor (`name`: "the output", "the attention weights") that holds NaN or ±∞
/// although every input is finite: float32 overflowed on the way (scores or sums beyond
/// ±3.4·10³⁸), and a silent NaN would pass for a result.
///
/// `inputs` are every tensor the result was computed from, `biases` the additive masks (whose
/// `−∞` masks and does not count as non-finite). When an input holds NaN or ±∞ (accepted with
/// `--allow-nonfinite`), a non-finite result is their propagation and is let through. The inputs
/// are scanned only when the result is non-finite, so the common case costs one pass.
func checkFiniteResult(
  _ result: Tensor?, name: String, inputs: [Tensor], biases: [Tensor?] = []
) throws {
  guard let result, let flat = result.firstNonFiniteFlatIndex() else { return }
  let propagated =
    inputs.contains { $0.firstNonFiniteFlatIndex() != nil }
    || biases.contains { $0?.firstNonFiniteFlatIndex(allowingNegativeInfinity: true) != nil }
  guard !propagated else { return }
  throw AttentionError.nonFinite(
    "\(name) has \(InputSafetyOptions.describe(result, at: flat)) although every input is"
      + " finite: float32 overflowed (inputs too large in magnitude); scale the inputs down")
}

/// Refusing, before allocating, buffers whose size comes from flags.
///
/// The materialized kernel compares its `B·H·Tq·Tk` weights with the budget itself; this is the
/// same comparison for everything else a flag can make huge (random inputs, a module's
/// parameters, a benchmark's shapes), so that a typo is a one-line error rather than an
/// allocation failure that kills the process, or a machine swapping for minutes.
enum MemoryGuard {
  /// Bytes of `Float` buffers with the given element counts, each a product of factors; `nil`
  /// when the total does not fit in an `Int` (which is over any budget).
  static func floatBytes(_ buffers: [[Int]]) -> Int? {
    var total = 0
    for factors in buffers {
      var count = MemoryLayout<Float>.stride
      for factor in factors {
        let (product, overflow) = count.multipliedReportingOverflow(by: max(factor, 0))
        guard !overflow else { return nil }
        count = product
      }
      let (sum, overflow) = total.addingReportingOverflow(count)
      guard !overflow else { return nil }
      total = sum
    }
    return total
  }

  /// Throws `AttentionError.memoryBudget` when `buffers` (as in `floatBytes`) need more than
  /// `budget` bytes. `what` says what they are and which flags sized them; `budgetSource` how
  /// the budget was set; `advice` what to do instead.
  static func check(
    _ buffers: [[Int]], for what: String, budget: Int, budgetSource: String,
    advice: String = "choose smaller sizes"
  ) throws {
    let bytes = floatBytes(buffers)
    if let bytes, bytes <= budget {
      // Within the budget, but the system may still refuse (a memory limit): ask it first.
      try checkAllocatable(bytes, for: what)
      return
    }
    throw AttentionError.memoryBudget(
      MemoryBudgetExceeded(
        what: what, neededBytes: bytes, budgetBytes: budget, budgetSource: budgetSource,
        advice: .other(advice)))
  }

  /// The default budget, as `--max-memory` documents it: a quarter of the physical memory, or
  /// less under a limit: half of what the address-space limit (`ulimit -v`) leaves free, half of
  /// a cgroup's `memory.max` (a container's limit).
  static var defaultBudget: Int {
    var budget = Int(ProcessInfo.processInfo.physicalMemory / 4)
    var limit = rlimit()
    if getrlimit(Int32(RLIMIT_AS.rawValue), &limit) == 0, limit.rlim_cur != rlim_t.max,
      limit.rlim_cur < UInt64(Int.max)
    {
      let used = ProcessMemory.status()?.virtual ?? 0
      budget = min(budget, max(0, Int(limit.rlim_cur) - used) / 2)
    }
    if let text = try? String(contentsOfFile: "/sys/fs/cgroup/memory.max", encoding: .utf8),
      let bytes = Int(text.trimmingCharacters(in: .whitespacesAndNewlines))
    {
      budget = min(budget, bytes / 2)
    }
    return max(budget, 1)
  }
}

/// Runs `body` and spells the kernels' advice to use the tiled kernel as the flags that do it.
func explainingMemoryBudget<Result>(_ body: () throws -> Result) rethrows -> Result {
  do {
    return try body()
  } catch AttentionError.memoryBudget(var exceeded) where exceeded.advice == .useTiledKernel {
    exceeded.advice = .other("use the tiled kernel (--kernel tiled) or raise --max-memory")
    throw AttentionError.memoryBudget(exceeded)
  }
}

extension BenchCase {
  /// Refuses a case whose buffers would not fit in the budget (`--max-memory`): Q, K, V and the
  /// output `[B, H, T, D]`, then the tiles of the tiled kernel, `[Bq, Bk]`, `[Bq, D]` per worker,
  /// and the operands of the sgemm ceiling per requested thread (blocks capped at `T`). The
  /// inputs are checked first, which also keeps the tile arithmetic from overflowing.
  func checkMemory(
    configuration: TiledAttention.Configuration, threads: Int, execution: ExecutionOptions
  ) throws {
    let budget = execution.memoryBudget
    let source = execution.memoryBudgetSource
    let what = "--batch \(batch) × --heads \(heads) × --seq-len \(length) × --d-k \(headDim)"
    try MemoryGuard.check(
      [[4, batch, heads, length, headDim]], for: "\(name): Q, K, V and the output of \(what)",
      budget: budget, budgetSource: source)
    // The blocks the kernel will use (fitted to the shape unless given).
    let (bq, bk) = TiledAttention.tile(
      queries: length, keys: length, headDim: headDim, batchCount: batch * heads,
      configuration: configuration)
    let tasks = batch * heads * ((length + bq - 1) / bq)
    let workers = max(1, min(threads, tasks))
    // The kernel's tiles are per worker; the ceiling's operands are per requested thread.
    // With relpos: the table E [2M + 1, D], the projections of x (3 more [B, T, D]), and each
    // thread's [Bq, ≤ min(2M + 1, 2T − 1)] slice of R = Q·Eᵀ.
    let relpos: [[Int]] =
      maxDistance.map { m in
        [
          [2 * m + 1, headDim], [4, batch, length, headDim],
          [workers, bq, min(2 * m + 1, 2 * length)],
        ]
      } ?? []
    try MemoryGuard.check(
      [
        [4, batch, heads, length, headDim], [workers, bq, bk], [workers, bq, headDim],
        [workers, 2, bq], [threads, bq, bk], [threads, 2, bq, headDim], [threads, bk, headDim],
      ] + relpos,
      for: "\(name): the inputs and the tiles of --query-block \(bq) × --key-block \(bk) on"
        + " \(threads) thread\(threads == 1 ? "" : "s")", budget: budget, budgetSource: source,
      advice: "choose smaller blocks or fewer threads")
  }
}
