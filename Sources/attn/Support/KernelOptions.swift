import ArgumentParser
import AttentionKit
import Foundation

/// Which attention kernel runs.
enum KernelChoice: String, ExpressibleByArgument, CaseIterable {
  /// Holds the whole `[…, Tq, Tk]` matrix; can return the weights.
  case materialized
  /// Online softmax over tiles; memory linear in the sequence, no weights returned.
  case tiled
}

/// `--kernel`, `--threads`, `--max-memory`: shared by the commands that run attention.
struct KernelOptions: ParsableArguments {
  @Option(help: "Attention kernel: materialized (returns the weights) or tiled (memory-lean).")
  var kernel: KernelChoice = .materialized

  @Option(help: "Threads for the kernels (default: every core). Results are identical for any N.")
  var threads: Int?

  @Option(
    help: ArgumentHelp(
      "Memory budget for the materialized weight matrix, e.g. 512M or 4G (default: ¼ of RAM).",
      valueName: "bytes"))
  var maxMemory: ByteCount?

  func validate() throws {
    if let threads, threads < 1 { throw ValidationError("--threads must be ≥ 1, got \(threads)") }
  }

  var memoryBudget: Int { maxMemory?.bytes ?? MemoryGuard.defaultBudget }

  var tiledConfiguration: TiledAttention.Configuration {
    TiledAttention.Configuration(threads: threads)
  }

  /// The relative-position module's kernel for these options.
  var moduleKernel: RelativePositionAttention.Kernel {
    kernel == .materialized ? .materialized : .tiled(tiledConfiguration)
  }

  /// Runs `body` with OpenBLAS on `--threads` threads (the materialized kernel's threads are
  /// OpenBLAS's own; the tiled kernel sets its own). A kernel's over-budget error gets the flags
  /// that avoid it (`explainingMemoryBudget`).
  func withBLASThreads<Result>(_ body: () throws -> Result) rethrows -> Result {
    let previous = BLAS.threadCount
    if let threads { BLAS.threadCount = threads }
    defer { BLAS.threadCount = previous }
    return try explainingMemoryBudget(body)
  }

  /// Runs the chosen kernel with these options.
  func attention(
    queries: Tensor, keys: Tensor, values: Tensor, mask: AttentionMask, scale: Float? = nil,
    dropout: Dropout?, relativePosition: RelativePositionBias? = nil
  ) throws -> AttentionResult {
    switch kernel {
    case .materialized:
      return try withBLASThreads {
        try MaterializedAttention.compute(
          queries: queries, keys: keys, values: values, mask: mask, scale: scale, dropout: dropout,
          relativePosition: relativePosition, memoryBudget: memoryBudget, threads: threads)
      }
    case .tiled:
      return try TiledAttention.compute(
        queries: queries, keys: keys, values: values, mask: mask, scale: scale, dropout: dropout,
        relativePosition: relativePosition, configuration: tiledConfiguration)
    }
  }
}

/// A byte count with an optional binary suffix: `1048576`, `512K`, `512M`, `4G`, `1T`.
struct ByteCount: ExpressibleByArgument, Equatable {
  var bytes: Int

  init?(argument: String) {
    let text = argument.trimmingCharacters(in: .whitespaces).uppercased()
      .replacingOccurrences(of: "IB", with: "").replacingOccurrences(of: "B", with: "")
    let suffixes: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    var digits = Substring(text)
    var multiplier = 1
    if let last = text.last, let factor = suffixes[last] {
      multiplier = factor
      digits = text.dropLast()
    }
    // At least one byte: "0.1" would otherwise become a budget of 0 that nothing fits.
    guard let value = Double(digits), value.isFinite, value * Double(multiplier) >= 1,
      value * Double(multiplier) < Double(Int.max)
    else { return nil }
    bytes = Int(value * Double(multiplier))
  }
}
