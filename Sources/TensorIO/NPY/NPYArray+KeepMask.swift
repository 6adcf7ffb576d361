import Tensors

extension NPYArray {
  /// The array as a keep mask (1 = attend, 0 = masked), from booleans or from 0/1 values of any
  /// integer or floating-point dtype.
  ///
  /// Any other value is an `AttentionError.file` naming `source`, the first offending index and
  /// its value as the file holds it (`describeElement(atFlat:)`); where the values are 0 and
  /// large negative numbers (−∞, or below −10⁴, as `finfo(float32).min` in Hugging Face's
  /// masks), the message says that the array looks like an additive mask, which is added to the
  /// scores rather than read as keep/drop.
  public func keepMask(source: String) throws -> Tensor {
    guard let flat = tensor.scalars.firstIndex(where: { $0 != 0 && $0 != 1 }) else {
      return tensor
    }
    let index = tensor.multiIndex(ofFlat: flat).map(String.init).joined(separator: ", ")
    let looksAdditive = tensor.scalars.allSatisfy { $0 == 0 || $0 <= -1e4 }
    let shown = describeElement(atFlat: flat)
    throw AttentionError.file(
      path: source,
      message: "value \(shown) at [\(index)] is not 0 or 1: a keep mask holds 1 = attend, "
        + "0 = masked"
        + (looksAdditive
          ? "; its values, 0 and large negative numbers, look like an additive mask" : ""))
  }
}
