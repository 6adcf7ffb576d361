import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// `attn`: the notebook's three exercises as subcommands, on OpenBLAS.
///
/// Exit codes: 0 success; 1 a runtime error (a bad file, a failed check); 64 a usage error (a bad
/// flag or value, swift-argument-parser's convention). Errors are one line on stderr.
@main
struct Attn: ParsableCommand {
  /// The release, as `attn --version` prints it (semantic versioning; CHANGELOG.md).
  static let version = "0.5.1"

  static let configuration = CommandConfiguration(
    commandName: "attn",
    abstract: "Attention from scratch on the CPU, on OpenBLAS.",
    discussion: """
      The notebook's three exercises, measured and checked:
        attn dropout     attention with a mask and dropout (exercise 1)
        attn complexity  time and memory against length (exercise 2)
        attn relpos      relative-position attention (exercise 3)
        attn sdpa        PyTorch's scaled_dot_product_attention on your tensors
        attn mha         a model's attention layer (PyTorch, BERT, Llama weights)
        attn backward    the gradients of attention, checked (exercise 4)
        attn bench       the tiled kernel against OpenBLAS's ceiling
      Exit codes: 0 success, 1 runtime error or failed check, 64 usage error.
      Shell completion: attn --generate-completion-script bash|zsh|fish.
      """,
    version: "attn \(version)",
    subcommands: [
      DropoutCommand.self, ComplexityCommand.self, RelposCommand.self, SdpaCommand.self,
      MhaCommand.self, BackwardCommand.self, CheckCommand.self, BenchCommand.self,
    ]
  )

  /// Parses, runs, and turns every error into one line and an exit code, instead of the
  /// library's default of printing the usage text after a usage error. A failed write to
  /// standard output is an error too (exit 1); one to standard error is not (nowhere to say so).
  static func main() {
    OpenBLASCore.upgradeIfNeeded()
    StandardStreams.prepare()
    SignalCleanup.install()
    let arguments = StandardStreams.separatingOutputs(Array(CommandLine.arguments.dropFirst()))
    var code = ExitCode.success
    do {
      var command = try parseAsRoot(arguments)
      try command.run()
    } catch {
      code = exitCode(for: error)
      if code == .success {
        // --help, --version: the parser's full text on stdout.
        print(fullMessage(for: error))
      } else {
        let message =
          message(for: error)
          .split(separator: "\n", omittingEmptySubsequences: true).first.map(String.init)
          ?? "failed"
        StandardStreams.writeError("attn: \(message)")
      }
    }
    switch StandardStreams.finishStandardOutput() {
    case .written: break
    case .readerLeft:
      removeTemporaryFiles()
      Foundation.exit(128 + SIGPIPE)
    case .failed(let failure):
      StandardStreams.writeError("attn: \(failure)")
      if code == .success { code = .failure }
    }
    Foundation.exit(code.rawValue)
  }
}
