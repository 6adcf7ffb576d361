import Tensors

/// Stream identifiers (counter word 3), so that one seed gives independent numbers for each use.
public enum RandomStream {
  public static let dropout: UInt32 = 0
  public static let queries: UInt32 = 1
  public static let keys: UInt32 = 2
  public static let values: UInt32 = 3
  public static let input: UInt32 = 4
  /// The upstream gradient `dO` of a backward pass drawn at random.
  public static let gradOutput: UInt32 = 5
  /// Parameters of layers (`Linear`, `Embedding`) use `parameters + k` for their k-th tensor.
  public static let parameters: UInt32 = 16
  /// Sampling rows to verify (the CLI's checks).
  public static let sampling: UInt32 = 1024
}
