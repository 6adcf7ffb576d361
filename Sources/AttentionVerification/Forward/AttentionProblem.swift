import AttentionKit

/// An attention problem as PyTorch's `scaled_dot_product_attention` states it: what a result
/// computed anywhere (this library, PyTorch, a GPU kernel) is checked against.
///
/// Shapes: Q `[…, H, Tq, D]`, K `[…, Hkv, Tk, D]`, V `[…, Hkv, Tk, Dv]` (`H` a multiple of `Hkv`:
/// grouped-query heads), a mask broadcastable to `[…, H, Tq, Tk]`. `scale` defaults to `1/√D`;
/// `dropout`'s decisions are AttentionKit's (seed, row, key) ones, so a candidate with dropout
/// is checkable only if it drew the same decisions.
public struct AttentionProblem: Sendable {
  public var queries: Tensor
  public var keys: Tensor
  public var values: Tensor
  public var mask: AttentionMask
  public var scale: Float?
  public var dropout: Dropout?
  /// Soft-capping, ALiBi or T5 biases, sinks (`ScoreTerms`).
  public var terms: ScoreTerms

  public init(
    queries: Tensor, keys: Tensor, values: Tensor, mask: AttentionMask = .none,
    scale: Float? = nil, dropout: Dropout? = nil, terms: ScoreTerms = .none
  ) {
    self.terms = terms
    self.queries = queries
    self.keys = keys
    self.values = values
    self.mask = mask
    self.scale = scale
    self.dropout = dropout
  }

  /// The validated shapes (throws on a mismatch, as the kernels do).
  public func shape() throws -> AttentionShape {
    try AttentionShape(queries: queries, keys: keys, values: values)
  }

  /// The float64 reference kernel of this problem.
  public func reference() throws -> ReferenceAttention {
    try ReferenceAttention(
      queries: queries, keys: keys, values: values, mask: mask, scale: scale, dropout: dropout,
      terms: terms)
  }
}

/// Checks a forward result computed anywhere against the float64 reference: `output`
/// `[…, Tq, Dv]` and/or `weights` `[…, Tq, Tk]` (after dropout), each on the rows `rows` selects,
/// within the float32 error bounds of `ReferenceAttention.row` in the arithmetic `rounding`.
///
/// The checks are sound (a result within `rounding`'s error of the exact one passes, whatever the
/// scale's sign, however peaked the rows) and sharp (a missing scale, an ignored or transposed
/// mask, a wrong causal alignment, swapped rows or one element off by a few bounds fail).
public func check(
  output: Tensor?, weights: Tensor? = nil, against problem: AttentionProblem,
  rows: RowSelection = .automatic(seed: 0), rounding: Rounding = .float32
) throws -> [Check] {
  try ForwardChecks(problem: problem, rows: rows, rounding: rounding)
    .check(output: output, weights: weights)
}
