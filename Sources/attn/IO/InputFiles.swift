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

  /// A `.npy` file of floating-point values (`<f2`, `<f4`, `<f8`): Q, K, V, an input `x`, a
  /// gradient, an additive `--bias`. Booleans and integers are refused, as PyTorch refuses them
  /// where it computes; masks are read by `keepMask` and `mask`.
  func tensor(_ path: String) throws -> Tensor {
    if !FileManager.default.fileExists(atPath: path),
      let address = Self.safetensorsAddress(path),
      FileManager.default.fileExists(atPath: address.file)
    {
      throw AttentionError.file(
        path: path,
        message: "this flag reads a .npy file; a tensor inside a safetensors file "
          + "(FILE.safetensors:NAME) is read by attn sdpa and attn check (save it with "
          + "numpy.save to use it here)")
    }
    let array = try array(path)
    guard !array.dtype.isIntegral else {
      throw Self.notFloatingPoint(path, stored: "\(array.dtype) (\(array.dtype.descr))")
    }
    return array.tensor
  }

  /// How an input was stored, for outputs written "as the input".
  enum Storage: String {
    case float16, bfloat16, float32, float64, bool, integer

    var isFloatingPoint: Bool { self != .bool && self != .integer }
  }

  /// A floating-point input named as `PATH.npy` or `FILE.safetensors:NAME` (a tensor inside a
  /// safetensors file), with how it was stored; booleans and integers are refused, as `tensor`.
  func input(_ spec: String) throws -> (tensor: Tensor, storage: Storage) {
    let read = try anyDtype(spec)
    guard read.storage.isFloatingPoint else {
      throw Self.notFloatingPoint(spec, stored: read.dtype)
    }
    return (read.tensor, read.storage)
  }

  /// A mask named as `input` is, of any dtype it can be read in (`.npy` booleans, integers and
  /// floats; safetensors BOOL and floats): the caller decides by `storage` what it means.
  func mask(_ spec: String) throws -> (tensor: Tensor, storage: Storage) {
    let read = try anyDtype(spec)
    return (read.tensor, read.storage)
  }

  /// `spec` read whatever its dtype; `dtype` names the stored type for messages.
  private func anyDtype(_ spec: String) throws -> (tensor: Tensor, storage: Storage, dtype: String)
  {
    if let (file, name) = Self.safetensorsAddress(spec) {
      let (tensor, dtype) = try addressedTensor(file: file, name: name)
      let storage: Storage
      switch dtype {
      case .f16: storage = .float16
      case .bf16: storage = .bfloat16
      case .f32: storage = .float32
      case .f64: storage = .float64
      case .bool: storage = .bool
      }
      return (tensor, storage, dtype.rawValue)
    }
    let array = try array(spec)
    if let element = array.firstSaturated { saturated[spec] = element }
    let storage: Storage
    switch array.dtype {
    case .float16: storage = .float16
    case .float32: storage = .float32
    case .float64: storage = .float64
    case .bool: storage = .bool
    default: storage = .integer
    }
    return (array.tensor, storage, "\(array.dtype) (\(array.dtype.descr))")
  }

  /// The error for booleans or integers where floating-point values are read: `spec` a `.npy`
  /// path or a `FILE.safetensors:NAME` address; `stored` names the dtype ("int32 (<i4)").
  private static func notFloatingPoint(_ spec: String, stored: String) -> AttentionError {
    if let (file, name) = safetensorsAddress(spec) {
      return notFloatingPoint(file: file, tensor: name, stored: stored)
    }
    return .file(
      path: spec,
      message: "expected a floating-point tensor (<f2, <f4 or <f8), not \(stored): as in "
        + "PyTorch, integers and booleans are for masks only")
  }

  /// `notFloatingPoint` for the tensor `tensor` of the safetensors file `file`.
  private static func notFloatingPoint(file: String, tensor: String, stored: String)
    -> AttentionError
  {
    .file(
      path: file,
      message: "tensor \(quotedForMessage(tensor)): expected a floating-point tensor (F16, BF16, "
        + "F32 or F64), not \(stored): as in PyTorch, integers and booleans are for masks only")
  }

  /// `FILE.safetensors:NAME` split at the first `.safetensors:`; `nil` for a plain path.
  static func safetensorsAddress(_ spec: String) -> (file: String, name: String)? {
    guard let range = spec.range(of: ".safetensors:") else { return nil }
    return (String(spec[..<range.lowerBound]) + ".safetensors", String(spec[range.upperBound...]))
  }

  /// The tensors read from `FILE.safetensors:NAME` addresses, by file and name, so that an
  /// address given twice is read and counted once.
  private var addressed: [String: [String: (tensor: Tensor, dtype: SafeTensorsDType)]] = [:]
  /// Per `.npy` input read, its first `<f8` element beyond `Float`'s range (read saturated).
  private(set) var saturated: [String: SaturatedElement] = [:]
  /// Safetensors files that are not regular files (a FIFO), read whole.
  private var pipes: [String: SafeTensorsFile] = [:]

  /// The tensor `name` of the safetensors file at `file`. A regular file is read as `mha
  /// --prefix` reads one: the header, then only that tensor's bytes, so the file's other tensors
  /// cost no memory, count nothing against the budget and may have any dtype. A pipe can be
  /// read only once, so it is read whole, for every address into it.
  private func addressedTensor(file: String, name: String) throws -> (
    tensor: Tensor, dtype: SafeTensorsDType
  ) {
    if let found = addressed[file]?[name] { return found }
    var info = stat()
    let found: (tensor: Tensor, dtype: SafeTensorsDType)
    if stat(file, &info) == 0 && info.st_mode & S_IFMT == S_IFIFO {
      let whole = try pipes[file] ?? wholeFile(file)
      pipes[file] = whole
      let tensor = try whole.tensor(named: name)
      found = (tensor, whole.dtypes[name] ?? .f32)
    } else {
      found = try counting {
        try SafeTensors.readTensor(named: name, contentsOf: file, maxBytes: budget - used)
      }
      used += found.tensor.count * MemoryLayout<Float>.stride
    }
    addressed[file, default: [:]][name] = found
    return found
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

  /// A safetensors file of weights: every tensor, each floating point (F32, F16, BF16, F64).
  func safetensors(_ path: String) throws -> SafeTensorsFile {
    try Self.requireFloatingPoint(try wholeFile(path))
  }

  /// The tensors of a safetensors file of weights whose names start with `prefix` (one layer of
  /// a whole model's file), each floating point; the others are skipped, whatever their dtype,
  /// and not counted.
  func safetensors(_ path: String, prefix: String) throws -> SafeTensorsFile {
    let file = try counting {
      try SafeTensors.read(contentsOf: path, maxBytes: budget - used) { $0.hasPrefix(prefix) }
    }
    used += file.tensors.values.reduce(0) { $0 + $1.count * MemoryLayout<Float>.stride }
    return try Self.requireFloatingPoint(file)
  }

  /// Every tensor of a safetensors file, whatever its dtype.
  private func wholeFile(_ path: String) throws -> SafeTensorsFile {
    let file = try counting {
      try SafeTensors.read(contentsOf: path, maxBytes: budget - used)
    }
    used += file.tensors.values.reduce(0) { $0 + $1.count * MemoryLayout<Float>.stride }
    return file
  }

  /// `file`, when none of its tensors is BOOL: weights are floating point.
  private static func requireFloatingPoint(_ file: SafeTensorsFile) throws -> SafeTensorsFile {
    if let name = file.names.first(where: { file.dtypes[$0]?.isFloatingPoint == false }) {
      throw notFloatingPoint(
        file: file.source, tensor: name, stored: file.dtypes[name]?.rawValue ?? "")
    }
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

extension InputFiles.Storage {
  /// Refuses to write `tensor` (the command's `name`, such as "the output") to `path` in this
  /// type when rounding would turn a finite value into `±∞` — float16 beyond ±65504, bfloat16
  /// beyond about ±3.39·10³⁸ — rather than write an infinity nobody computed: a runtime error
  /// (exit 1) naming the tensor, the first such element and its value, raised while the outputs
  /// are encoded, before any is written. Other types hold every finite `Float`.
  func checkRepresentable(_ tensor: Tensor, named name: String, path: String) throws {
    let format: HalfPrecision.Format
    switch self {
    case .float16: format = .float16
    case .bfloat16: format = .bfloat16
    default: return
    }
    guard let flat = HalfPrecision.firstOverflow(in: tensor.scalars, to: format) else { return }
    let value = tensor.scalars[flat]
    let index = tensor.multiIndex(ofFlat: flat).map(String.init).joined(separator: ", ")
    let largest = String(format: "%g", format.greatestFiniteMagnitude)
    throw AttentionError.file(
      path: path,
      message: "value \(value) of \(name) at [\(index)] is beyond \(rawValue)'s range (largest "
        + "finite \(largest)) and would be written as \(value > 0 ? "inf" : "-inf"); pass "
        + "--out-dtype float32")
  }
}
