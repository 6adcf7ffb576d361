import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// `--kernel materialized|tiled|auto`: the library's one kernel enum, `Attention.Kernel`, by
/// the names every subcommand that runs attention takes (`tiled` with the default blocks, `auto`
/// for `.automatic`: materialized when the weights are asked for and fit the memory budget,
/// else tiled).
extension Attention.Kernel: ExpressibleByArgument {
  public init?(argument: String) {
    switch argument {
    case "materialized": self = .materialized
    case "tiled": self = .tiled(.default)
    case "auto": self = .automatic
    default: return nil
    }
  }

  public static var allValueStrings: [String] { ["materialized", "tiled", "auto"] }

  public var defaultValueDescription: String { flagName }

  /// How `--kernel` spells this kernel, and how reports name it.
  var flagName: String { self == .automatic ? "auto" : name }
}

/// `--threads` and `--max-memory`: how much of the machine a subcommand may use.
struct ExecutionOptions: ParsableArguments {
  @Option(help: "Threads for the kernels (default: every core). Results are identical for any N.")
  var threads: Int?

  @Option(
    help: ArgumentHelp(
      "Memory budget, e.g. 512M or 4G (default: ¼ of RAM); larger work is refused first.",
      valueName: "bytes"),
    transform: ByteCount.parse)
  var maxMemory: ByteCount?

  func validate() throws {
    if let threads, !(1...Self.threadLimit).contains(threads) {
      throw ValidationError("--threads must be in 1…\(Self.threadLimit), got \(threads)")
    }
  }

  /// More threads than this only multiply per-thread buffers.
  static let threadLimit = 1024

  /// `--threads`, or every core.
  var resolvedThreads: Int { threads ?? ProcessInfo.processInfo.activeProcessorCount }

  var memoryBudget: Int { maxMemory?.bytes ?? MemoryGuard.defaultBudget }

  /// How `memoryBudget` was set, for messages.
  var memoryBudgetSource: String {
    maxMemory == nil ? "a quarter of RAM; --max-memory sets it" : "--max-memory"
  }
}

/// `--kernel`, `--threads`, `--max-memory`: shared by the commands that run attention.
struct KernelOptions: ParsableArguments {
  @Option(
    help: """
      Attention kernel: materialized (returns the weights), tiled (memory-lean), or auto \
      (materialized when the weights are needed and fit --max-memory).
      """)
  var kernel: Attention.Kernel = .materialized

  @OptionGroup var execution: ExecutionOptions

  var threads: Int? { execution.threads }
  var memoryBudget: Int { execution.memoryBudget }
  var memoryBudgetSource: String { execution.memoryBudgetSource }

  /// Runs the chosen kernel through the library's entry point with these options.
  func attention(
    queries: Tensor, keys: Tensor, values: Tensor, mask: AttentionMask, scale: Float? = nil,
    dropout: Dropout?
  ) throws -> AttentionResult {
    try explainingMemoryBudget {
      try Progress().during("running the \(kernel.flagName) kernel") {
        try Attention.scaledDotProduct(
          queries: queries, keys: keys, values: values, mask: mask, scale: scale, dropout: dropout,
          kernel: kernel, needWeights: !kernel.isTiled, threads: threads,
          memoryBudget: memoryBudget)
      }
    }
  }
}
