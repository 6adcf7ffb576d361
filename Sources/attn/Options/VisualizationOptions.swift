import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// `--explain` (`ExplainOptions`) and `--heatmap`: seeing what `attn dropout` and `attn relpos`
/// compute, shared by both commands.
///
/// Both need the weight matrix, so both are usage errors with the tiled kernel. An out-of-range
/// `--explain-batch` or a heatmap too large to draw is a usage error (exit 64) whenever it is
/// found: in `validate()` when the flags fix the shapes, after reading the input files otherwise
/// (as `attn relpos` treats `--batch` against `--input`). The heatmap is written only when the
/// run's checks pass, atomically, so a failing run leaves no new file.
struct VisualizationOptions: ParsableArguments {
  @OptionGroup var explanation: ExplainOptions

  @Option(
    help: ArgumentHelp(
      "Write an SVG heatmap of the attention weights (one panel per batch element, up to 8); "
        + "relpos also writes the position term to the path with -position before .svg.",
      valueName: "path.svg"))
  var heatmap: String?

  /// Panels of one heatmap: the first batch elements (or heads), four to a row.
  static let maxPanels = 8
  /// A heatmap draws one cell per weight; beyond this many queries or keys it would be
  /// megabytes of unreadable cells.
  static let maxHeatmapSide = 128

  func validate() throws {
    if let heatmap, heatmap.isEmpty { throw ValidationError("--heatmap needs a file path") }
  }

  var explain: Bool { explanation.explain }
  /// The batch element `--explain` shows.
  var batch: Int { explanation.batch }
  var precision: Int { explanation.precision }

  /// The usage checks that need the kernel and, when the flags fix them before any file is
  /// read, the batch count and the number of queries and keys.
  func check(kernel: Attention.Kernel, batchCount: Int?, queries: Int?, keys: Int?) throws {
    if kernel.isTiled {
      for (flag, used) in [("--heatmap", heatmap != nil), ("--explain", explain)] where used {
        throw ValidationError(
          "\(flag) needs --kernel materialized: the tiled kernel never holds the weights")
      }
    }
    if let batchCount, let queries, let keys {
      try checkShape(batchCount: batchCount, queries: queries, keys: keys)
    }
  }

  /// `--explain-batch` within the inputs and the heatmap within `maxHeatmapSide` (usage
  /// errors), then the heatmap's folder present and the path not a folder (an error on that
  /// path, exit 1), so that a run fails before its work rather than after it.
  func prepare(batchCount: Int, queries: Int, keys: Int) throws {
    try checkShape(batchCount: batchCount, queries: queries, keys: keys)
    for path in heatmapPaths(positionFigure: false).compactMap({ $0 }) { try checkWritable(path) }
  }

  private func checkShape(batchCount: Int, queries: Int, keys: Int) throws {
    try explanation.checkBatch(batchCount: batchCount)
    if heatmap != nil && max(queries, keys) > Self.maxHeatmapSide {
      throw ValidationError(
        "--heatmap draws one cell per weight, for at most \(Self.maxHeatmapSide) queries and "
          + "keys; these inputs have \(queries) × \(keys)")
    }
  }

  /// The files `--heatmap` writes: its path, and with `positionFigure` the position term's
  /// (optional, to join the other outputs in `checkOutputs`).
  func heatmapPaths(positionFigure: Bool) -> [String?] {
    guard let heatmap else { return [] }
    return positionFigure ? [heatmap, Self.positionFigurePath(heatmap)] : [heatmap]
  }

  /// `attn.svg` → `attn-position.svg`; a path without `.svg` gets `-position.svg` appended.
  static func positionFigurePath(_ path: String) -> String {
    if path.lowercased().hasSuffix(".svg") {
      return String(path.dropLast(4)) + "-position" + String(path.suffix(4))
    }
    return path + "-position.svg"
  }
}
