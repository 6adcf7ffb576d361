import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// `attn relpos`: exercise 3, self-attention with learned relative-position embeddings.
struct RelposCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "relpos",
    abstract: "Exercise 3: self-attention with learned relative positions.",
    discussion: """
      Projects x [B, T, dModel] to Q, K, V (nn.Linear layout: x·Wᵀ + b), scores each query i \
      against each key j as (q_i·k_j + q_i·E[clip(j − i, −M, M) + M]) / √dModel, with E a \
      learned table of 2M + 1 embeddings, then applies the mask (0 = masked), softmax and V. \
      The relative position is j − i, as the notebook's code computes it (its docstring says \
      i − j). The position term comes from R = Q·Eᵀ ([T, 2M + 1]), never from the notebook's \
      [T, T, dModel] gather.
      Weights are PyTorch-default initialized from --seed, or loaded from a safetensors file \
      with the PyTorch state_dict names (W_q.weight, W_q.bias, W_k.*, W_v.*, \
      relative_embeddings.weight); dModel and M are then read from its shapes. x is standard \
      normal from --seed, or loaded from --input.
      Then it verifies the result: projections and sampled rows against float64, rows sum to 1, \
      and the output equals weights·V.
      With --grad-out dY.npy ([B, T, dModel], the gradient of a loss with respect to the output) \
      it also runs the backward pass: dx and the gradient of every parameter (--dx-out, \
      --grads-out under the state_dict names), every product by sgemm, and checks them against \
      a float64 reference, by float64 central differences of Σ dY∘Y on sampled entries, and that \
      every row of dS sums to 0.
      """
  )

  @Option(
    name: .customLong("d-model"),
    help: "Model width D = d_model (default 64, or from --weights or --input).")
  var modelDim: Int?

  @Option(
    name: .customLong("max-rel"),
    help: "Largest relative distance M; the table has 2M + 1 rows (default 16, or from --weights).")
  var maxDistance: Int?

  @Option(help: "Sequence length T of the random input (default 20).")
  var seqLen: Int?

  @Option(help: "Batch size B of the random input (default 2).")
  var batch: Int?

  @Option(help: "Seed for the weights and the input (with --rng torch: torch.manual_seed).")
  var seed: UInt64 = 42

  @Option(help: RandomSource.helpText)
  var rng: RandomSource = .philox

  @Option(help: "Input x [B, T, d_model] (.npy) instead of a random one.")
  var input: String?

  @Option(help: "Load the module's weights from a .safetensors file (PyTorch state_dict names).")
  var weights: String?

  @Option(help: "Save the module's weights as .safetensors (F32, PyTorch state_dict names).")
  var saveWeights: String?

  @Option(
    help:
      "Mask: none, causal, or a .npy of 0/1 or booleans broadcastable to [B, T, T] (0 = masked).")
  var mask: MaskChoice = .none

  @Option(help: "Write the output [B, T, d_model] as float32 .npy.")
  var out: String?

  @Option(help: "Write the attention weights [B, T, T] as float32 .npy.")
  var weightsOut: String?

  @Option(
    help: ArgumentHelp(
      "Upstream gradient dY [B, T, d_model] (.npy): run the backward pass and check it.",
      valueName: "dY.npy"))
  var gradOut: String?

  @Option(help: "With --grad-out: write dx [B, T, d_model] as float32 .npy.")
  var dxOut: String?

  @Option(
    help: "With --grad-out: write the parameter gradients as .safetensors (F32, state_dict names).")
  var gradsOut: String?

  @OptionGroup var report: ReportFormatOptions

  @OptionGroup var kernelOptions: KernelOptions

  @OptionGroup var inputSafety: InputSafetyOptions

  @OptionGroup var visualization: VisualizationOptions

  func validate() throws {
    if rng == .torch && weights != nil && input != nil {
      throw ValidationError(
        "--rng torch draws the weights and x; with --weights and --input nothing is drawn")
    }
    try FlagLimits.check("--d-model", modelDim, in: 1...FlagLimits.dimension)
    try FlagLimits.check("--max-rel", maxDistance, in: 0...FlagLimits.maxDistance)
    try FlagLimits.check("--seq-len", seqLen, in: 1...FlagLimits.sequenceLength)
    try FlagLimits.check("--batch", batch, in: 1...FlagLimits.batch)
    if kernelOptions.kernel.isTiled && weightsOut != nil {
      throw ValidationError(
        "--weights-out needs --kernel materialized: the tiled kernel never holds the weights")
    }
    for (flag, path) in [("--grads-out", gradsOut), ("--save-weights", saveWeights)] {
      if let path, path.lowercased().hasSuffix(".npy") {
        throw ValidationError(
          "\(flag) writes a safetensors file (one tensor per parameter name), not \(path); "
            + "name it .safetensors")
      }
    }
    if gradOut == nil {
      for (flag, path) in [("--dx-out", dxOut), ("--grads-out", gradsOut)] where path != nil {
        throw ValidationError("\(flag) writes gradients: it needs --grad-out dY.npy")
      }
    }
    try visualization.check(
      kernel: kernelOptions.kernel, batchCount: input == nil ? batch ?? 2 : nil,
      queries: seqLen ?? 20, keys: seqLen ?? 20)
    try checkOutputs(
      [out, weightsOut, saveWeights, dxOut, gradsOut]
        + visualization.heatmapPaths(positionFigure: true),
      against: [input, weights, mask.path, gradOut])
  }

  func run() throws {
    let files = InputFiles(kernelOptions.execution)
    let x = try input.map(files.tensor)
    try inputSafety.check([(x, input)])
    // With --rng torch the module is initialized and x drawn as the notebook's cell does after
    // torch.manual_seed: W_q, W_k, W_v, the embedding table, then x.
    var generator = TorchGenerator(seed: seed)
    let module = try loadModule(inputWidth: x?.shape.last, files: files, generator: &generator)
    let d = module.modelDim
    if x == nil {
      try MemoryGuard.check(
        [[5, batch ?? 2, seqLen ?? 20, d]],
        for: "the random x, its Q, K, V and the output (--batch × --seq-len × d_model \(d))",
        budget: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource)
    }
    let inputs: Tensor
    if let x {
      inputs = try checkInput(x, modelDim: d)
    } else if rng == .torch {
      inputs = try generator.randn(shape: [batch ?? 2, seqLen ?? 20, d])
    } else {
      inputs = try Tensor.randomNormal(
        shape: [batch ?? 2, seqLen ?? 20, d], seed: seed, stream: RandomStream.input)
    }
    let attentionMask = try mask.resolve(inputs: files, additiveFlag: nil)
    let gradient = try loadGradient(files: files, shape: inputs.shape)
    // --explain-batch and --heatmap against the input's shape, before the kernel runs.
    try visualization.prepare(
      batchCount: inputs.shape[0], queries: inputs.shape[1], keys: inputs.shape[1])
    try inputSafety.check([(attentionMask.keep, mask.path)])

    // The materialized kernel refuses weights over the budget (--max-memory) instead of thrashing.
    let result = try explainingMemoryBudget {
      try Progress().during("running the \(kernelOptions.kernel.flagName) kernel") {
        try module(
          inputs, mask: attentionMask, kernel: kernelOptions.kernel,
          threads: kernelOptions.threads, memoryBudget: kernelOptions.memoryBudget)
      }
    }
    try checkFiniteResult(
      result.output, name: "the output",
      inputs: [inputs] + Array(module.stateDict.tensors.values)
        + [attentionMask.keep].compactMap { $0 })

    let reference = try ReferenceAttention(
      queries: result.queries, keys: result.keys, values: result.values, mask: attentionMask,
      terms: ScoreTerms(relativePosition: module.positionBias))
    let sampled = RowSample.rows(shape: reference.shape, seed: seed)
    let checks: [Check] = Progress().during("checking against the float64 reference") {
      [
        RelativePositionChecks.projectionCheck(
          module: module, x: inputs, result: result, rows: sampled)
      ]
        + ForwardChecks(reference: reference, dropout: nil, sampledRows: sampled)
        .run(result: result.attention, preDropout: result.weights)
    }

    // --grad-out: the backward pass and its checks, after the forward's.
    var backward: (gradients: RelativePositionGradients, checks: [Check])? = nil
    if let gradient {
      backward = try runBackward(
        module: module, inputs: inputs, mask: attentionMask, gradient: gradient)
    }

    let visuals = try visualization.relpos(
      module: module, result: result, mask: attentionMask, maskName: mask.description,
      weightsPath: weights, seed: seed, memoryBudget: kernelOptions.memoryBudget)
    if let weightsOut, result.weights == nil {
      throw AttentionError.invalidArgument(
        "the kernel returned no weights to write to \(weightsOut)")
    }
    var outputs: [(path: String?, bytes: () throws -> [UInt8])] = [
      (out, { NPY.encode(result.output) }),
      (
        saveWeights,
        { try SafeTensors.encode(module.stateDict.tensors, metadata: ["format": "pt"]) }
      ),
    ]
    if let gradients = backward?.gradients {
      outputs.append((dxOut, { NPY.encode(gradients.dx) }))
      outputs.append(
        (
          gradsOut,
          { try SafeTensors.encode(gradients.parameters.tensors, metadata: ["format": "pt"]) }
        ))
    }
    outputs += npyOutputs([(weightsOut, result.weights)])
    outputs += try visuals.heatmapOutputs(weights: result.weights)
    let run = CheckedRun(
      groups: [("Checks", checks), ("Gradient checks", backward?.checks ?? [])], outputs: outputs,
      verdict: .init(
        passed: "Relative position attention implemented successfully!",
        failed: "Relative position attention NOT verified."))

    let (b, t) = (inputs.shape[0], inputs.shape[1])
    try run.finish(
      format: report.format,
      json: {
        RelposReport(
          inputShape: inputs.shape, outputShape: result.output.shape, weightsShape: [b, t, t],
          dModel: d, maxRel: module.maxDistance, seed: seed, rng: rng.rawValue,
          weights: weights ?? "random", input: input ?? "random", mask: mask.description,
          kernel: kernelOptions.kernel.flagName, workspaceBytes: result.workspaceBytes,
          gatherBytes: Self.gatherBytes(t: t, d: d),
          checks: checks.dictionary, verified: run.verified,
          gradientChecks: backward?.checks.dictionary,
          gradientShapes: backward.map { Self.gradientShapes($0.gradients) },
          gradientWorkspaceBytes: backward?.gradients.workspaceBytes,
          explainBatch: visuals.batch, steps: visuals.steps)
      },
      text: {
        try printText(
          module: module, inputs: inputs, result: result,
          gradients: backward?.gradients, explanation: visuals.explanation)
      })
  }

}
