import ArgumentParser
import AttentionKit
import AttentionVerification

/// How results are printed.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
  case text, json
}

/// `--mask none|causal|PATH.npy`.
enum MaskChoice: ExpressibleByArgument, Equatable, CustomStringConvertible {
  case none
  case causal
  /// A `.npy` file of 0/1 or booleans broadcastable to `[…, Tq, Tk]`; 0 = masked.
  case file(String)

  init?(argument: String) {
    switch argument {
    case "none": self = .none
    case "causal": self = .causal
    case "": return nil
    default: self = .file(argument)
    }
  }

  var description: String {
    switch self {
    case .none: return "none"
    case .causal: return "causal"
    case .file(let path): return path
    }
  }

  static var allValueStrings: [String] { ["none", "causal", "PATH.npy"] }

  /// Loads the mask (a file is read here, as a keep mask: 0/1 or booleans); `bias` adds an
  /// additive float mask.
  func resolve(
    bias: Tensor? = nil, inputs: InputFiles, additiveFlag: String? = "--bias"
  ) throws -> AttentionMask {
    switch self {
    case .none: return AttentionMask(bias: bias)
    case .causal: return AttentionMask(bias: bias, isCausal: true)
    case .file(let path):
      return AttentionMask(keep: try inputs.keepMask(path, additiveFlag: additiveFlag), bias: bias)
    }
  }

  var path: String? {
    if case .file(let path) = self { return path }
    return nil
  }
}

/// `--format text|json`: how a subcommand prints its report; declared once, for every
/// subcommand whose report has these two forms (`complexity` adds csv, with its own flag).
struct ReportFormatOptions: ParsableArguments {
  @Option(help: "Output format: text or json.")
  var format: OutputFormat = .text
}
