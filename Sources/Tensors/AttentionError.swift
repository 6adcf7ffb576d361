/// Every error the library targets throw. Each description is one line that says what is wrong
/// and where, written for the person running the program (the CLI prints it as is).
///
/// Cases carry fields rather than only text where a caller acts on them: a memory-budget error
/// carries the bytes and the advice (`MemoryBudgetExceeded`), a parameter error the tensor's name
/// (a loader adds the file it came from).
public enum AttentionError: Error, Equatable, CustomStringConvertible {
  /// Tensor shapes that do not fit together (Q, K, V, a mask, a weight).
  case shapeMismatch(String)
  /// An argument outside its allowed range.
  case invalidArgument(String)
  /// A file that cannot be read, parsed or written; `path` names it.
  case file(path: String, message: String)
  /// A request that would allocate more than the caller's memory budget.
  case memoryBudget(MemoryBudgetExceeded)
  /// Values that are NaN or infinite where finite ones are required.
  case nonFinite(String)
  /// A named parameter (a `state_dict` entry) that is missing, unexpected or of the wrong shape.
  case parameter(name: String, message: String)
  /// An allocation the system refused (a memory limit), asked for before allocating.
  case outOfMemory(String)

  public var description: String {
    switch self {
    case .shapeMismatch(let message): return "shape mismatch: \(message)"
    case .invalidArgument(let message): return "invalid argument: \(message)"
    case .file(let path, let message): return "\(path): \(message)"
    case .memoryBudget(let exceeded): return "memory budget exceeded: \(exceeded)"
    case .nonFinite(let message): return "non-finite values: \(message)"
    case .parameter(let name, let message): return "tensor \(quotedForMessage(name)) \(message)"
    case .outOfMemory(let message): return "out of memory: \(message)"
    }
  }
}

/// What a memory-budget refusal knows: what would have been allocated, how many bytes, the
/// budget, and what to do instead. Thrown before anything is allocated.
public struct MemoryBudgetExceeded: Equatable, Sendable, CustomStringConvertible {
  /// What to do instead.
  public enum Advice: Equatable, Sendable {
    /// A kernel that holds `Tq·Tk` weights: the tiled kernel needs none.
    case useTiledKernel
    /// Anything else, in words ("choose smaller sizes").
    case other(String)
  }

  /// The buffers, in words: "the materialized kernel's [8, 4096, 4096] weights".
  public var what: String
  /// The bytes they need; `nil` when the count does not fit in an `Int`.
  public var neededBytes: Int?
  /// The budget in bytes.
  public var budgetBytes: Int
  /// How the budget was set, in the caller's words ("--max-memory"); `nil` when not said.
  public var budgetSource: String?
  public var advice: Advice

  public init(
    what: String, neededBytes: Int?, budgetBytes: Int, budgetSource: String? = nil,
    advice: Advice
  ) {
    self.what = what
    self.neededBytes = neededBytes
    self.budgetBytes = budgetBytes
    self.budgetSource = budgetSource
    self.advice = advice
  }

  public var description: String {
    let needed =
      neededBytes.map { formatBytes($0) + " needed" } ?? "more bytes than memory can index"
    let source = budgetSource.map { " (\($0))" } ?? ""
    let todo: String
    switch advice {
    case .useTiledKernel: todo = "use the tiled kernel"
    case .other(let text): todo = text
    }
    return
      "\(what): \(needed), over the budget of \(formatBytes(budgetBytes))\(source); \(todo)"
  }
}
