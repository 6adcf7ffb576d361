import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// `attn check`: verifies an attention result computed anywhere (PyTorch, a GPU kernel, your
/// own) against the float64 reference, with PyTorch SDPA's conventions.
struct CheckCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "check",
    abstract: "Verify an attention result from anywhere against the float64 reference.",
    discussion: """
      The problem as F.scaled_dot_product_attention states it (--query --key --value, \
      --attn-mask, --is-causal, --causal-align, --scale, --enable-gqa, --window; no dropout: \
      another generator's decisions cannot be reproduced), and the candidate: --output and/or \
      --weights, and gradients with --grad-out dO and --dq/--dk/--dv. Each tensor's rows are \
      compared element by element with the float64 reference within error bounds derived from \
      the candidate's arithmetic (--precision), all rows up to a budget or --rows N sampled by \
      --seed. Exit 0 verified, 1 not verified (the report names the worst row and element), 64 \
      usage.
      """)

  @OptionGroup var problem: SdpaInputOptions

  @Option(help: "The candidate output [B, H, Tq, Dv].")
  var output: String?

  @Option(help: "The candidate attention weights [B, H, Tq, Tk].")
  var weights: String?

  @Option(
    help: "The upstream gradient dO [B, H, Tq, Dv] the candidate gradients were computed for.")
  var gradOut: String?

  @Option(help: "The candidate dQ [B, H, Tq, D] (needs --grad-out).")
  var dq: String?

  @Option(help: "The candidate dK [B, Hkv, Tk, D] (needs --grad-out).")
  var dk: String?

  @Option(help: "The candidate dV [B, Hkv, Tk, Dv] (needs --grad-out).")
  var dv: String?

  @Option(help: "The arithmetic the candidate was computed in: float32, float16 or bfloat16.")
  var precision: Precision = .float32

  @Option(
    help: ArgumentHelp(
      "Rows compared: all, or N sampled by --seed (default: all up to a budget, else 64 sampled).",
      valueName: "all|N"))
  var rows: RowsChoice?

  @Option(help: "Seed of the sampled rows.")
  var seed: UInt64 = 0

  @OptionGroup var report: ReportFormatOptions

  @OptionGroup var execution: ExecutionOptions
  @OptionGroup var inputSafety: InputSafetyOptions

  enum Precision: String, ExpressibleByArgument, CaseIterable {
    case float32, float16, bfloat16

    var rounding: Rounding {
      switch self {
      case .float32: return .float32
      case .float16: return .float16
      case .bfloat16: return .bfloat16
      }
    }
  }

  enum RowsChoice: ExpressibleByArgument, Equatable {
    case all
    case sampled(Int)

    init?(argument: String) {
      if argument == "all" {
        self = .all
      } else if let count = Int(argument), count >= 1 {
        self = .sampled(count)
      } else {
        return nil
      }
    }
  }

  func validate() throws {
    let gradients = [dq, dk, dv].contains { $0 != nil }
    if output == nil && weights == nil && !gradients {
      throw ValidationError(
        "nothing to check: give the candidate --output, --weights, or --dq/--dk/--dv")
    }
    if gradients != (gradOut != nil) {
      throw ValidationError(
        gradOut == nil
          ? "--dq, --dk and --dv need --grad-out (the dO they were computed for)"
          : "--grad-out goes with the candidate gradients --dq, --dk, --dv")
    }
  }

  func run() throws {
    let files = InputFiles(execution)
    let (queries, keys, values, mask, terms, _) = try problem.load(files, safety: inputSafety)
    let attention = AttentionProblem(
      queries: queries, keys: keys, values: values, mask: mask, scale: problem.scale,
      terms: terms)
    let shape = try attention.shape()
    let rounding = precision.rounding
    var checks: [Check] = []
    if output != nil || weights != nil {
      let candidate = try output.map { try candidateTensor($0, files) }
      let candidateWeights = try weights.map { try candidateTensor($0, files) }
      let selection: RowSelection
      switch rows {
      case .all?: selection = .all
      case .sampled(let count)?: selection = .sampled(count: count, seed: seed)
      case nil: selection = .automatic(seed: seed)
      }
      checks += try Progress().during("checking against the float64 reference") {
        try check(
          output: candidate, weights: candidateWeights, against: attention, rows: selection,
          rounding: rounding)
      }
    }
    if let gradOut {
      checks += try gradientChecks(attention, shape: shape, gradOut: gradOut, files: files)
    }
    // A worst element that reading saturated is reported with its value in the file.
    let candidates = ["output": output, "weights": weights, "dQ": dq, "dK": dk, "dV": dv]
    for i in checks.indices {
      guard let name = checks[i].measurement?.tensor, let spec = candidates[name] ?? nil,
        let element = files.saturated[spec]
      else { continue }
      checks[i].measurement?.showStoredValue(element.storedValue, atFlat: element.flatIndex)
    }
    let run = CheckedRun(checks: checks)
    try run.finish(
      format: report.format,
      json: {
        CheckReport(
          verified: run.verified,
          scale: NullableNumber(SdpaInputOptions.reportedScale(shape, problem.scale)),
          precision: precision.rawValue,
          tensors: Dictionary(
            checks.compactMap { check in
              check.measurement.map {
                (
                  $0.tensor,
                  CheckReport.TensorReport(
                    rowsChecked: $0.rowsChecked, worstRatio: $0.worstRatio, worstAt: $0.worstAt,
                    actual: $0.actual, expected: $0.expected, bound: $0.bound,
                    verified: check.passed)
                )
              }
            }, uniquingKeysWith: { first, _ in first }),
          checks: checks.dictionary)
      },
      text: {
        print(
          "attn check: query \(shapeForMessage(shape.batchShape + [shape.queries, shape.headDim])), "
            + "keys \(shape.keys); scale \(shape.resolvedScale(problem.scale)); candidate in "
            + "\(precision.rawValue)")
      })
  }

  /// A candidate tensor: any float dtype, NaN and ±∞ allowed (they are compared, not refused).
  private func candidateTensor(_ spec: String, _ files: InputFiles) throws -> Tensor {
    // `input` refuses booleans and integers: a candidate holds floating-point values.
    try files.input(spec).tensor
  }

  /// The candidate gradients against the float64 reference backward of the whole problem (or
  /// one key/value group), finite differences included.
  private func gradientChecks(
    _ attention: AttentionProblem, shape: AttentionShape, gradOut: String, files: InputFiles
  ) throws -> [Check] {
    guard GradientChecks.canCheck(shape) else {
      throw AttentionError.invalidArgument(
        "the float64 reference backward cannot hold \(shape.groupSize) × \(shape.queries) × "
          + "\(shape.keys) scores (limit \(GradientChecks.referenceScoreLimit)); check the "
          + "gradients of a shorter sequence")
    }
    let dO = try candidateTensor(gradOut, files)
    guard dO.shape == shape.outputShape else {
      throw AttentionError.file(
        path: gradOut,
        message: "holds \(shapeForMessage(dO.shape)); dO must have the output's shape "
          + "\(shapeForMessage(shape.outputShape))")
    }
    let expected = [
      (dq, "dQ", attention.queries.shape), (dk, "dK", attention.keys.shape),
      (dv, "dV", attention.values.shape),
    ]
    var given: [String: Tensor] = [:]
    for case (let path?, let name, let wanted) in expected {
      let tensor = try candidateTensor(path, files)
      guard tensor.shape == wanted else {
        throw AttentionError.file(
          path: path,
          message: "holds \(shapeForMessage(tensor.shape)); \(name) must have the shape "
            + "\(shapeForMessage(wanted))")
      }
      given[name] = tensor
    }
    let checker = try Progress().during("computing the float64 reference backward") {
      try GradientChecks(
        queries: attention.queries, keys: attention.keys, values: attention.values,
        gradOutput: dO, mask: attention.mask, dropout: nil, needBiasGradient: false,
        seed: seed, scale: attention.scale, terms: attention.terms, rounding: precision.rounding)
    }
    let measurements = checker.measure(dQ: given["dQ"], dK: given["dK"], dV: given["dV"])
    return measurements.map { m in
      Check(
        name: "\(m.tensor.lowercased())_matches_reference",
        title: "\(m.tensor) rows match the float64 reference backward", measurement: m,
        note: checker.region.isWhole ? "" : " (\(checker.coverage))")
    }
  }
}

/// `attn check --format json`.
private struct CheckReport: Encodable {
  struct TensorReport: Encodable {
    var rowsChecked: Int
    var worstRatio: Double
    var worstAt: [Int]?
    var actual: Double?
    var expected: Double?
    var bound: Double?
    var verified: Bool
  }
  var verified: Bool
  /// `null` for D = 0 (see `SdpaInputOptions.reportedScale`).
  var scale: NullableNumber
  var precision: String
  var tensors: [String: TensorReport]
  var checks: [String: Bool]
}
