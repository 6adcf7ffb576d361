import ArgumentParser
import AttentionKit
import AttentionVerification

/// `--rng philox|torch`: which generator draws the random inputs.
///
/// - `philox`: AttentionKit's counter-based Philox4x32-10, one stream per tensor (the default;
///   the numbers do not depend on the order or the sizes of the draws).
/// - `torch`: PyTorch's CPU generator (`TorchGenerator`, its vectorized kernel: what PyTorch
///   computes on x86-64 machines with AVX2): `--seed` is the `torch.manual_seed` value and
///   tensors are drawn in the notebook's order, so the inputs are the notebook's, bit for bit.
///
/// Dropout masks come from Philox in both cases (see `note(training:)`).
enum RandomSource: String, ExpressibleByArgument, CaseIterable, Sendable {
  case philox
  case torch

  static var helpText: ArgumentHelp {
    ArgumentHelp(
      "Generator of the random inputs: philox, or torch (PyTorch's CPU generator after "
        + "torch.manual_seed(--seed): the notebook's numbers).")
  }

  /// The line text output prints under the header, if any: with `torch` in training mode, the
  /// dropout mask is not the one PyTorch would draw.
  func note(training: Bool) -> String? {
    guard self == .torch, training else { return nil }
    return "Note: Q, K, V are PyTorch's (--rng torch); the dropout mask comes from "
      + "Philox4x32-10 with the same seed, not from PyTorch's generator."
  }
}
