/// A dense, row-major tensor of `Float` with value semantics.
///
/// Just what the kernels need: a shape, a flat buffer, and a few views. The last dimension is
/// contiguous; a tensor of shape `[B, H, T, D]` stores element `(b, h, t, d)` at
/// `((b·H + h)·T + t)·D + d`.
public struct Tensor: Equatable, Sendable {
  /// The extent of each dimension, outermost first. A scalar has shape `[]`.
  public private(set) var shape: [Int]
  /// The elements in row-major order; `scalars.count == shape.product`.
  public var scalars: [Float]

  /// A tensor of `shape` filled with `value`.
  public init(shape: [Int], repeating value: Float = 0) throws {
    let count = try Tensor.elementCount(of: shape)
    let (bytes, overflow) = count.multipliedReportingOverflow(by: MemoryLayout<Float>.stride)
    try checkAllocatable(
      overflow ? .max : bytes, for: "a tensor of shape \(shapeForMessage(shape))")
    self.shape = shape
    self.scalars = [Float](repeating: value, count: count)
  }

  /// A tensor of `shape` whose elements `initialize` writes, every one of them, through a
  /// pointer to the row-major buffer: the buffer is not filled first, which saves a pass over
  /// the memory for a kernel that overwrites all of its output (and the page faults of that pass
  /// while the kernel's other threads wait). Elements it leaves unwritten are unspecified.
  package init(
    shape: [Int], overwritingWith initialize: (UnsafeMutablePointer<Float>) throws -> Void
  ) throws {
    let count = try Tensor.elementCount(of: shape)
    let (bytes, overflow) = count.multipliedReportingOverflow(by: MemoryLayout<Float>.stride)
    try checkAllocatable(
      overflow ? .max : bytes, for: "a tensor of shape \(shapeForMessage(shape))")
    self.shape = shape
    // Capacity at least 1, so that the pointer exists for an empty tensor too.
    self.scalars = try [Float](unsafeUninitializedCapacity: max(count, 1)) { buffer, written in
      try initialize(buffer.baseAddress!)
      written = count
    }
  }

  /// A tensor of `shape` holding `scalars` in row-major order.
  public init(shape: [Int], scalars: [Float]) throws {
    let count = try Tensor.elementCount(of: shape)
    guard count == scalars.count else {
      throw AttentionError.shapeMismatch(
        "shape \(shapeForMessage(shape)) holds \(count) elements but \(scalars.count) were given")
    }
    self.shape = shape
    self.scalars = scalars
  }

  /// Internal initializer for shapes already validated by the caller.
  package init(validShape shape: [Int], scalars: [Float]) {
    self.shape = shape
    self.scalars = scalars
  }

  public var rank: Int { shape.count }
  public var count: Int { scalars.count }

  /// The product of all dimensions but the last two (the batch of matrices), 1 for rank < 3.
  public var batchCount: Int { shape.dropLast(2).reduce(1, *) }
  /// The leading (batch) dimensions: all but the last two.
  public var batchShape: [Int] { Array(shape.dropLast(2)) }

  /// The element at a full multi-index.
  public subscript(_ index: Int...) -> Float {
    get { scalars[flatIndex(index)] }
    set { scalars[flatIndex(index)] = newValue }
  }

  private func flatIndex(_ index: [Int]) -> Int {
    precondition(index.count == shape.count, "index rank \(index.count) ≠ tensor rank \(rank)")
    var flat = 0
    for (i, extent) in zip(index, shape) {
      precondition(
        i >= 0 && i < extent, "index \(index) out of bounds for shape \(shapeForMessage(shape))")
      flat = flat * extent + i
    }
    return flat
  }

  /// The same elements under another shape with the same element count.
  public func reshaped(_ newShape: [Int]) throws -> Tensor {
    try Tensor(shape: newShape, scalars: scalars)
  }

  /// The number of elements of `shape`, rejecting negative dimensions and overflow.
  public static func elementCount(of shape: [Int]) throws -> Int {
    var count = 1
    for extent in shape {
      guard extent >= 0 else {
        throw AttentionError.invalidArgument(
          "negative dimension \(extent) in shape \(shapeForMessage(shape))")
      }
      let (product, overflow) = count.multipliedReportingOverflow(by: extent)
      guard !overflow else {
        throw AttentionError.invalidArgument(
          "shape \(shapeForMessage(shape)) has more elements than memory can index")
      }
      count = product
    }
    return count
  }
}

extension Tensor: CustomStringConvertible {
  public var description: String { "Tensor(shape: \(shapeForMessage(shape)))" }
}
