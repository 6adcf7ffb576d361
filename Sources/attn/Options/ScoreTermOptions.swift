import ArgumentParser
import AttentionKit

/// `--softcap`, `--alibi`, `--alibi-slopes`, `--t5-bias` (`--t5-max-distance`,
/// `--t5-bidirectional`) and `--sinks`: the `ScoreTerms` of `attn sdpa` and `attn check`, in the
/// layouts of the models' own tensors (one value per query head; T5's
/// `relative_attention_bias.weight` `[buckets, H]`).
struct ScoreTermOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "Logit soft-capping: scores c·tanh(scale·q·k / c), as Gemma 2's attn_logit_softcapping.",
      valueName: "c"),
    transform: { try parseFloat($0, flag: "--softcap") })
  var softcap: Float?

  @Flag(help: "ALiBi with BLOOM's slopes for the query heads: + slope_h·(j − i).")
  var alibi = false

  @Option(
    help: ArgumentHelp(
      "ALiBi with these slopes, one per query head ([H]; .npy or FILE.safetensors:NAME).",
      valueName: "S.npy"))
  var alibiSlopes: String?

  @Option(
    help: ArgumentHelp(
      "T5's relative bias table [buckets, H] (relative_attention_bias.weight): + "
        + "table[bucket(j − i), h].", valueName: "T.npy"))
  var t5Bias: String?

  @Option(help: "T5's max_distance: distances beyond it share the last bucket.")
  var t5MaxDistance = 128

  @Flag(help: "T5's bidirectional buckets (encoders): keys after the query get their own.")
  var t5Bidirectional = false

  @Option(
    help: ArgumentHelp(
      "Attention sinks, one logit per query head ([H]), in the softmax's denominator only "
        + "(gpt-oss).", valueName: "S.npy"))
  var sinks: String?

  /// The files these options read, for `checkOutputs`.
  var paths: [String?] { [alibiSlopes, t5Bias, sinks] }

  func validate() throws {
    if let softcap, !(softcap.isFinite && softcap > 0) {
      throw ValidationError("--softcap must be a positive number, got \(softcap)")
    }
    if alibi && alibiSlopes != nil {
      throw ValidationError("--alibi uses BLOOM's slopes, --alibi-slopes yours: give one")
    }
    if t5Bias == nil && (t5Bidirectional || t5MaxDistance != 128) {
      throw ValidationError("--t5-max-distance and --t5-bidirectional go with --t5-bias")
    }
    try FlagLimits.check("--t5-max-distance", t5MaxDistance, in: 1...FlagLimits.sequenceLength)
  }

  /// The terms, their files read (each a float tensor of the documented shape).
  func load(_ files: InputFiles, heads: Int) throws -> ScoreTerms {
    func vector(_ path: String, _ what: String) throws -> [Float] {
      let tensor = try files.input(path).tensor
      guard tensor.shape == [heads] else {
        throw AttentionError.file(
          path: path,
          message: "holds \(shapeForMessage(tensor.shape)); \(what) are [H] = [\(heads)], one per "
            + "query head")
      }
      return tensor.scalars
    }
    var terms = ScoreTerms(softcap: softcap)
    if alibi { terms.positionBiases.append(.alibi(slopes: PositionBias.bloomSlopes(heads: heads))) }
    if let alibiSlopes {
      terms.positionBiases.append(.alibi(slopes: try vector(alibiSlopes, "ALiBi slopes")))
    }
    if let t5Bias {
      let table = try files.input(t5Bias).tensor
      guard table.rank == 2, table.shape[1] == heads else {
        throw AttentionError.file(
          path: t5Bias,
          message: "holds \(shapeForMessage(table.shape)); a T5 bias table is [buckets, H] with "
            + "H = \(heads) (relative_attention_bias.weight)")
      }
      let exact = table.shape[0] / (t5Bidirectional ? 4 : 2)
      guard t5MaxDistance > exact else {
        throw ValidationError(
          "--t5-max-distance \(t5MaxDistance) must exceed the \(exact) exact buckets of \(t5Bias)")
      }
      terms.positionBiases.append(
        .t5(table: table, maxDistance: t5MaxDistance, bidirectional: t5Bidirectional))
    }
    if let sinks { terms.sinks = try vector(sinks, "sinks") }
    return terms
  }

  /// "soft-cap 30, ALiBi (BLOOM's slopes), sinks" or nil without terms.
  func description(_ terms: ScoreTerms) -> String? {
    var parts: [String] = []
    if let softcap { parts.append("soft-cap \(softcap)") }
    for bias in terms.positionBiases {
      switch bias {
      case .alibi: parts.append(alibi ? "ALiBi (BLOOM's slopes)" : "ALiBi (given slopes)")
      case .t5(let table, let distance, let bidirectional):
        parts.append(
          "T5 bias (\(table.shape[0]) buckets, max distance \(distance)"
            + (bidirectional ? ", bidirectional)" : ")"))
      }
    }
    if terms.sinks != nil { parts.append("sinks") }
    return parts.isEmpty ? nil : parts.joined(separator: ", ")
  }
}
