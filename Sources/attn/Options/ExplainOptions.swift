import ArgumentParser

/// `--explain`, `--explain-batch`, `--precision`: the step-by-step walk through one batch element
/// that `attn dropout`, `attn relpos` and `attn backward` print (with `VisualizationOptions` the
/// first two add `--heatmap`).
///
/// An `--explain-batch` beyond the inputs is a usage error (exit 64) whenever it is found: in
/// `validate()` when the flags fix the shapes, after reading the input files otherwise.
struct ExplainOptions: ParsableArguments {
  @Flag(
    help: ArgumentHelp(
      "Walk through the computation step by step for one batch element: every intermediate "
        + "matrix, its shape, and what the step does."))
  var explain = false

  @Option(
    help: ArgumentHelp(
      "The batch element --explain shows: a flat index over the leading dimensions "
        + "(b·H + h for [B, H, T, D] inputs). Default 0.", valueName: "n"))
  var explainBatch: Int?

  @Option(help: "Decimals of the matrices --explain prints, 0 to 9.")
  var precision = 4

  static let maxPrecision = 9

  func validate() throws {
    guard (0...Self.maxPrecision).contains(precision) else {
      throw ValidationError("--precision must be in 0...\(Self.maxPrecision), got \(precision)")
    }
    if let explainBatch {
      guard explain else { throw ValidationError("--explain-batch needs --explain") }
      guard explainBatch >= 0 else {
        throw ValidationError("--explain-batch must be ≥ 0, got \(explainBatch)")
      }
    }
  }

  /// The batch element `--explain` shows.
  var batch: Int { explainBatch ?? 0 }

  /// `--explain`'s batch element, for JSON reports; `nil` without `--explain`.
  var reportedBatch: Int? { explain ? batch : nil }

  /// `--explain-batch` within the inputs' `batchCount` elements (a usage error otherwise).
  func checkBatch(batchCount: Int) throws {
    guard explain else { return }
    if batchCount == 0 {
      throw ValidationError("--explain has nothing to show: the inputs hold no batch elements")
    }
    if batch >= batchCount {
      throw ValidationError(
        "--explain-batch \(batch) is out of range: the inputs hold \(batchCount) batch "
          + "element\(batchCount == 1 ? "" : "s") (0…\(batchCount - 1))")
    }
  }
}
