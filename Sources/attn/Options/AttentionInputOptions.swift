import ArgumentParser
import AttentionKit
import AttentionVerification

/// The inputs of one attention call, as `attn dropout` and `attn backward` take them: Q, K, V
/// from `.npy` files or drawn from `--seed` (`--batch × --seq-len × --d-k`, Philox or PyTorch's
/// generator), the mask (`--mask`, `--bias`) and dropout (`--p`, `--eval`).
struct AttentionInputOptions: ParsableArguments {
  @Option(help: "Dropout probability on the attention weights, in [0, 1].")
  var p: Double = 0.1

  @Option(help: "Sequence length (Tq = Tk) of the random inputs.")
  var seqLen: Int = 4

  @Option(name: .customLong("d-k"), help: "Head dimension D (d_k) of the random inputs.")
  var headDim: Int = 8

  @Option(help: "Batch size of the random inputs.")
  var batch: Int = 1

  @Option(help: "Seed for the inputs and the dropout mask (with --rng torch: torch.manual_seed).")
  var seed: UInt64 = 42

  @Option(help: RandomSource.helpText)
  var rng: RandomSource = .philox

  @Flag(help: "Evaluation mode: no dropout (as training=False).")
  var eval = false

  @Option(
    help:
      "Mask: none, causal, or a .npy of 0/1 or booleans broadcastable to […, Tq, Tk] (0 = masked).")
  var mask: MaskChoice = .none

  @Option(
    help: "Additive float mask (.npy) broadcastable to […, Tq, Tk], added to the scaled scores.")
  var bias: String?

  @Option(help: "Queries Q […, Tq, D] (.npy); give --q, --k and --v together.")
  var q: String?

  @Option(help: "Keys K […, Tk, D] (.npy).")
  var k: String?

  @Option(help: "Values V […, Tk, Dv] (.npy).")
  var v: String?

  /// `--p`, with `-0` read as 0 (the same probability, printed as such).
  var probability: Double { p == 0 ? 0 : p }

  /// Whether Q, K and V come from files.
  var fromFiles: Bool { q != nil }

  /// Every file these options read, for `checkOutputs`.
  var paths: [String?] { [q, k, v, bias, mask.path] }

  func validate() throws {
    guard p >= 0, p <= 1 else { throw ValidationError("--p must be in [0, 1], got \(p)") }
    try FlagLimits.check("--seq-len", seqLen, in: 1...FlagLimits.sequenceLength)
    try FlagLimits.check("--d-k", headDim, in: 1...FlagLimits.dimension)
    try FlagLimits.check("--batch", batch, in: 1...FlagLimits.batch)
    let given = [q, k, v].compactMap { $0 }.count
    guard given == 0 || given == 3 else {
      throw ValidationError("give --q, --k and --v together (or none, for random inputs)")
    }
    if given == 3 && rng == .torch {
      throw ValidationError(
        "--rng torch draws Q, K and V; it cannot be combined with --q, --k, --v")
    }
  }

  /// The dropout of `--p` and `--eval`: `nil` in evaluation mode.
  func dropout() throws -> Dropout? {
    eval ? nil : try Dropout(probability: probability, seed: seed)
  }

  /// Q, K and V from the files, or drawn: Philox streams, or PyTorch's generator in the
  /// notebook's order (`torch.randn(batch, seqLen, d_k)` three times).
  func load(_ files: InputFiles, execution: ExecutionOptions) throws -> (Tensor, Tensor, Tensor) {
    if let q, let k, let v {
      return (try files.tensor(q), try files.tensor(k), try files.tensor(v))
    }
    let shape = [batch, seqLen, headDim]
    try MemoryGuard.check(
      [[3, batch, seqLen, headDim], [batch, seqLen, headDim]],
      for: "the random Q, K, V and the output (--batch × --seq-len × --d-k)",
      budget: execution.memoryBudget, budgetSource: execution.memoryBudgetSource)
    switch rng {
    case .philox:
      return (
        try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.queries),
        try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys),
        try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
      )
    case .torch:
      var generator = TorchGenerator(seed: seed)
      let queries = try generator.randn(shape: shape)
      let keys = try generator.randn(shape: shape)
      let values = try generator.randn(shape: shape)
      return (queries, keys, values)
    }
  }

  /// The mask of `--mask` and `--bias` (read here), and the bias tensor.
  func attentionMask(_ files: InputFiles) throws -> (mask: AttentionMask, bias: Tensor?) {
    let biasTensor = try bias.map(files.tensor)
    return (try mask.resolve(bias: biasTensor, inputs: files), biasTensor)
  }
}
