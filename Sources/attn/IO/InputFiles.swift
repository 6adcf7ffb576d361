import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// Reads a command's input files, each straight into its tensor, counting their bytes against
/// the memory budget (`--max-memory`) before anything is allocated: a file's declared shape, not
/// its contents, decides, so an oversized file or an endless pipe is refused from its header.
final class InputFiles {
  let budget: Int
  let budgetSource: String
  /// Bytes of the tensors read so far.
  private(set) var used = 0

  init(budget: Int, budgetSource: String) {
    self.budget = budget
    self.budgetSource = budgetSource
  }

  convenience init(_ execution: ExecutionOptions) {
    self.init(budget: execution.memoryBudget, budgetSource: execution.memoryBudgetSource)
  }

  /// A `.npy` file as a `Float` tensor (float16/32/64, booleans or integers).
  func tensor(_ path: String) throws -> Tensor {
    try array(path).tensor
  }

  /// How an input was stored, for outputs written "as the input".
  enum Storage: String {
    case float16, bfloat16, float32, float64, bool, integer
  }

  /// An input named as `PATH.npy` or `FILE.safetensors:NAME` (a tensor inside a safetensors
  /// file), with how it was stored.
  func input(_ spec: String) throws -> (tensor: Tensor, storage: Storage) {
    if let (file, name) = Self.safetensorsAddress(spec) {
      let contents = try safetensorsFile(file)
      let tensor = try contents.tensor(named: name)
      let storage: Storage
      switch contents.dtypes[name] {
      case .f16?: storage = .float16
      case .bf16?: storage = .bfloat16
      case .f64?: storage = .float64
      default: storage = .float32
      }
      return (tensor, storage)
    }
    let array = try array(spec)
    let storage: Storage
    switch array.dtype {
    case .float16: storage = .float16
    case .float32: storage = .float32
    case .float64: storage = .float64
    case .bool: storage = .bool
    default: storage = .integer
    }
    return (array.tensor, storage)
  }

  /// `FILE.safetensors:NAME` split at the first `.safetensors:`; `nil` for a plain path.
  static func safetensorsAddress(_ spec: String) -> (file: String, name: String)? {
    guard let range = spec.range(of: ".safetensors:") else { return nil }
    return (String(spec[..<range.lowerBound]) + ".safetensors", String(spec[range.upperBound...]))
  }

  /// Safetensors files already read, so that Q, K and V from one file read it once.
  private var files: [String: SafeTensorsFile] = [:]

  private func safetensorsFile(_ path: String) throws -> SafeTensorsFile {
    if let file = files[path] { return file }
    let file = try safetensors(path)
    files[path] = file
    return file
  }

  /// A `.npy` keep mask: booleans or 0/1 of any dtype (`NPYArray.keepMask`); an additive mask
  /// given here is refused with the flag that takes it.
  func keepMask(_ path: String, additiveFlag: String?) throws -> Tensor {
    do {
      return try array(path).keepMask(source: path)
    } catch AttentionError.file(let path, let message) where message.contains("not 0 or 1") {
      let advice =
        additiveFlag.map { "pass an additive mask with \($0)" }
        ?? "this command takes keep masks only"
      throw AttentionError.file(path: path, message: message + " (\(advice))")
    }
  }

  /// A safetensors file's tensors.
  func safetensors(_ path: String) throws -> SafeTensorsFile {
    let file = try counting {
      try SafeTensors.read(contentsOf: path, maxBytes: budget - used)
    }
    used += file.tensors.values.reduce(0) { $0 + $1.count * MemoryLayout<Float>.stride }
    return file
  }

  /// The tensors of a safetensors file whose names start with `prefix` (one layer of a whole
  /// model's file); the others are skipped, whatever their dtype, and not counted.
  func safetensors(_ path: String, prefix: String) throws -> SafeTensorsFile {
    let file = try counting {
      try SafeTensors.read(contentsOf: path, maxBytes: budget - used) { $0.hasPrefix(prefix) }
    }
    used += file.tensors.values.reduce(0) { $0 + $1.count * MemoryLayout<Float>.stride }
    return file
  }

  private func array(_ path: String) throws -> NPYArray {
    let array = try counting { try NPY.read(contentsOf: path, maxBytes: budget - used) }
    used += array.tensor.count * MemoryLayout<Float>.stride
    return array
  }

  /// Runs a read, saying in its over-budget error how the budget was set and what was read.
  private func counting<Result>(_ read: () throws -> Result) throws -> Result {
    do {
      return try read()
    } catch AttentionError.memoryBudget(var exceeded) {
      exceeded.budgetBytes = budget
      exceeded.budgetSource =
        used > 0
        ? "\(budgetSource), \(formatBytes(used)) of it taken by other inputs" : budgetSource
      exceeded.advice = .other("use smaller inputs or raise --max-memory")
      throw AttentionError.memoryBudget(exceeded)
    }
  }
}
