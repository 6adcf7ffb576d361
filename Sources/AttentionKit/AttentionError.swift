/// Every error AttentionKit throws. Each message is one line that says what is wrong and where,
/// written for the person running the program (the CLI prints it as is).
public enum AttentionError: Error, Equatable, CustomStringConvertible {
  /// Tensor shapes that do not fit together (Q, K, V, a mask, a weight).
  case shapeMismatch(String)
  /// An argument outside its allowed range.
  case invalidArgument(String)
  /// A file that cannot be read, parsed or written; `path` names it.
  case file(path: String, message: String)
  /// A request that would allocate more than the caller's memory budget.
  case memoryBudget(String)
  /// Values that are NaN or infinite where finite ones are required.
  case nonFinite(String)

  public var description: String {
    switch self {
    case .shapeMismatch(let message): return "shape mismatch: \(message)"
    case .invalidArgument(let message): return "invalid argument: \(message)"
    case .file(let path, let message): return "\(path): \(message)"
    case .memoryBudget(let message): return "memory budget exceeded: \(message)"
    case .nonFinite(let message): return "non-finite values: \(message)"
    }
  }
}
