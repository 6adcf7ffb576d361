import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// How `attn relpos` gets its module and input: `--weights` or freshly initialized from the seed
/// (as the notebook, with `--rng torch`), `--input` checked against the flags, and `--grad-out`.
extension RelposCommand {
  /// `--grad-out`, which must hold `[B, T, d_model]` (the output's shape); `nil` without it.
  func loadGradient(files: InputFiles, shape: [Int]) throws -> Tensor? {
    guard let gradOut else { return nil }
    let dY = try files.tensor(gradOut)
    guard dY.shape == shape else {
      throw AttentionError.file(
        path: gradOut,
        message: "shape \(shapeForMessage(dY.shape)) is not the output's shape [B, T, d_model] = "
          + shapeForMessage(shape))
    }
    try inputSafety.check([(dY, gradOut)])
    try RelposGradientChecks.checkSize(batch: shape[0], length: shape[1], modelDim: shape[2])
    return dY
  }

  /// The module from `--weights` (d_model and M from its shapes, which explicit flags and the
  /// input must agree with), else freshly initialized from `--seed`.
  func loadModule(
    inputWidth: Int?, files: InputFiles, generator: inout TorchGenerator
  ) throws -> RelativePositionAttention {
    guard let weights else {
      let (d, m) = (modelDim ?? inputWidth ?? 64, maxDistance ?? 16)
      try MemoryGuard.check(
        [[3, d, d + 1], [2 * m + 1, d]],
        for: "the module's parameters (d_model \(d), --max-rel \(m))",
        budget: kernelOptions.memoryBudget, budgetSource: kernelOptions.memoryBudgetSource)
      if rng == .torch {
        return try RelativePositionAttention.torchInitialized(
          modelDim: d, maxDistance: m, generator: &generator)
      }
      return try RelativePositionAttention(modelDim: d, maxDistance: m, seed: seed)
    }
    let file = try files.safetensors(weights)
    try inputSafety.check(file)
    let (d, m) = try file.naming { try RelativePositionAttention.dimensions(in: file.stateDict) }
    if let modelDim, modelDim != d {
      throw ValidationError(
        "--d-model \(modelDim) conflicts with \(weights), whose tensors have d_model \(d)")
    }
    if let maxDistance, maxDistance != m {
      throw ValidationError(
        "--max-rel \(maxDistance) conflicts with \(weights), whose relative_embeddings.weight has "
          + "2M + 1 = \(2 * m + 1) rows (M = \(m))")
    }
    if rng == .torch && input == nil {
      // x must still be the notebook's: draw (and drop) the parameters it draws first.
      _ = try RelativePositionAttention.torchInitialized(
        modelDim: d, maxDistance: m, generator: &generator)
    }
    return try file.naming { try RelativePositionAttention(stateDict: file.stateDict) }
  }

  /// `--input` must be `[B, T, d_model]` and agree with explicit `--batch` and `--seq-len`.
  func checkInput(_ x: Tensor, modelDim d: Int) throws -> Tensor {
    let path = input ?? "input"
    guard x.rank == 3, x.shape[2] == d else {
      let origin = weights.map { " (from \($0))" } ?? ""
      throw AttentionError.file(
        path: path,
        message:
          "shape \(shapeForMessage(x.shape)) is not [B, T, d_model] with d_model \(d)\(origin)")
    }
    if let batch, batch != x.shape[0] {
      throw ValidationError(
        "--batch \(batch) conflicts with \(path), of shape \(shapeForMessage(x.shape))")
    }
    if let seqLen, seqLen != x.shape[1] {
      throw ValidationError(
        "--seq-len \(seqLen) conflicts with \(path), of shape \(shapeForMessage(x.shape))")
    }
    return x
  }
}
