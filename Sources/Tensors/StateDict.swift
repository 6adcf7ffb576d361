/// Named tensors, as PyTorch's `state_dict()` holds a module's parameters: what a layer is loaded
/// from and saved to, whatever file format carried them (TensorIO reads safetensors into one).
///
/// Lookups throw `AttentionError.parameter` naming the tensor; a loader that knows the file adds
/// its path.
public struct StateDict: Equatable, Sendable {
  public var tensors: [String: Tensor]

  public init(_ tensors: [String: Tensor] = [:]) { self.tensors = tensors }

  /// The names, sorted by their UTF-8 bytes (safetensors' order).
  public var names: [String] { tensors.keys.sorted(by: Self.byteOrder) }

  /// Orders names by their UTF-8 bytes, as Rust's `String` ordering (the safetensors reference)
  /// does; Swift's own `<` compares canonical (NFC) forms, which orders non-NFC names differently.
  public static func byteOrder(_ a: String, _ b: String) -> Bool {
    a.utf8.lexicographicallyPrecedes(b.utf8)
  }

  public subscript(name: String) -> Tensor? {
    get { tensors[name] }
    set { tensors[name] = newValue }
  }

  /// The tensor called `name`, whatever its shape; throws, listing some names that exist, when
  /// there is none.
  public func tensor(named name: String) throws -> Tensor {
    if let found = tensors[name] { return found }
    let all = names
    let listed = all.prefix(8).map { quotedForMessage($0) }.joined(separator: ", ")
    let more = all.count > 8 ? " and \(all.count - 8) more" : ""
    let has = all.isEmpty ? "there are no tensors" : "there are \(listed)\(more)"
    throw AttentionError.parameter(name: name, message: "is missing (\(has))")
  }

  /// The tensor called `name`, which must have exactly `shape`, so that a wrong checkpoint is
  /// reported where it is loaded rather than as a shape mismatch deep inside a kernel.
  public func tensor(named name: String, shape: [Int]) throws -> Tensor {
    let found = try tensor(named: name)
    guard found.shape == shape else {
      throw AttentionError.parameter(
        name: name,
        message: "has shape \(shapeForMessage(found.shape)), expected \(shapeForMessage(shape))")
    }
    return found
  }

  /// Throws for the first name (in `names` order) that `expected` does not hold, as
  /// `load_state_dict(strict=True)` refuses unexpected keys.
  public func checkNoOthers(than expected: [String], module: String) throws {
    if let unexpected = names.first(where: { !expected.contains($0) }) {
      throw AttentionError.parameter(
        name: unexpected,
        message: "is unexpected (\(module) has \(expected.joined(separator: ", ")))")
    }
  }
}
