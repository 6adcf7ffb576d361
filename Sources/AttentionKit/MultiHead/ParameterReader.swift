import Tensors

/// Reads a layer's tensors under a prefix, remembering which names it used; messages name the
/// `owner` whose expectations a tensor misses ("the llama layout", "qwen3's config").
struct ParameterReader {
  let stateDict: StateDict
  let prefix: String
  let owner: String
  var used: Set<String> = []
  /// Names accepted and not read (a buffer older checkpoints carry).
  var ignored: Set<String> = []

  init(stateDict: StateDict, prefix: String, owner: String) {
    self.stateDict = stateDict
    self.prefix = prefix
    self.owner = owner
  }

  mutating func tensor(_ name: String, _ shape: [Int]) throws -> Tensor {
    used.insert(prefix + name)
    guard let found = stateDict[prefix + name] else {
      throw AttentionError.parameter(
        name: prefix + name,
        message: "is missing (\(owner) expects \(shapeForMessage(shape)))")
    }
    guard found.shape == shape else {
      throw AttentionError.parameter(
        name: prefix + name,
        message:
          "has shape \(shapeForMessage(found.shape)), \(owner) expects \(shapeForMessage(shape))"
      )
    }
    return found
  }

  mutating func linear(_ name: String, out: Int, in width: Int, bias: Bool) throws -> Linear {
    try Linear(
      weight: tensor(name + ".weight", [out, width]),
      bias: bias ? tensor(name + ".bias", [out]) : nil)
  }

  /// `shape[1]` of a `[rows·n, n]`-shaped tensor (the layer's width `E`), checked for rank 2.
  func width(of name: String, rows: Int) throws -> Int {
    let found = try present(name)
    guard found.rank == 2, found.shape[1] > 0, found.shape[0] == rows * found.shape[1] || rows == 1
    else {
      let expected = rows == 1 ? "[out, E]" : "[\(rows)·E, E]"
      throw AttentionError.parameter(
        name: prefix + name,
        message:
          "has shape \(shapeForMessage(found.shape)), \(owner) expects \(expected)"
      )
    }
    return found.shape[1]
  }

  func rows(of name: String) throws -> Int {
    let found = try present(name)
    guard found.rank == 2 else {
      throw AttentionError.parameter(
        name: prefix + name,
        message:
          "has shape \(shapeForMessage(found.shape)), \(owner) expects [out, E]"
      )
    }
    return found.shape[0]
  }

  private func present(_ name: String) throws -> Tensor {
    guard let found = stateDict[prefix + name] else {
      throw AttentionError.parameter(
        name: prefix + name, message: "is missing (\(owner) needs it)")
    }
    return found
  }

  mutating func ignore(_ name: String) { ignored.insert(prefix + name) }

  /// Throws for the first of `names` (all under the prefix) that the layout does not use.
  func checkNoOthers(among names: [String]) throws {
    if let unexpected = names.first(where: { !used.contains($0) && !ignored.contains($0) }) {
      throw AttentionError.parameter(
        name: unexpected,
        message:
          "is unexpected under the prefix \(quotedForMessage(prefix)) (\(owner) has \(used.sorted(by: StateDict.byteOrder).map { String($0.dropFirst(prefix.count)) }.joined(separator: ", ")))"
      )
    }
  }
}
