extension Tensor {
  /// The elements whose index along `axis` lies in `range`: `x[..., range, ...]` in numpy. A
  /// dimension of extent 1 (a broadcast dimension of a mask) is kept whole, so that slicing a
  /// mask meant for `[Tq, Tk]` scores by the rows and keys of a decoding step also works on
  /// `[1, Tk]` and `[Tq, 1]` masks.
  public func slice(axis: Int, _ range: Range<Int>) throws -> Tensor {
    guard axis >= 0, axis < rank else {
      throw AttentionError.invalidArgument(
        "axis \(axis) is outside a tensor of shape \(shapeForMessage(shape))")
    }
    let extent = shape[axis]
    if extent == 1 { return self }
    guard range.lowerBound >= 0, range.upperBound <= extent else {
      throw AttentionError.invalidArgument(
        "rows \(range.lowerBound)..<\(range.upperBound) are outside axis \(axis) of shape \(shapeForMessage(shape))"
      )
    }
    let inner = shape[(axis + 1)...].reduce(1, *)
    let outer = shape[..<axis].reduce(1, *)
    var newShape = shape
    newShape[axis] = range.count
    var result = [Float]()
    result.reserveCapacity(outer * range.count * inner)
    for o in 0..<outer {
      let start = (o * extent + range.lowerBound) * inner
      result.append(contentsOf: scalars[start..<(start + range.count * inner)])
    }
    return Tensor(validShape: newShape, scalars: result)
  }
}
