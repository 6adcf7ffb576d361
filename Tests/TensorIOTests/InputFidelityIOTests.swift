import Foundation
import TensorIO
import Tensors
import Testing
import _TestSupport

/// Issue #23 ("fidelity, round three"), item 6, in the readers. Every expected value is derived
/// by hand in the comments: bit patterns, ranges, the bytes of hand-written files.
@Suite("Input fidelity: TensorIO (#23 item 6)")
struct InputFidelityIOTests {
  /// `finfo(float64).min` = −1.7976931348623157e308, `1e300`, and `3.5e38` (just past float32's
  /// 3.4028234664e38) saturate to ±3.4028234664e38; the largest float32 itself, a NaN and ±∞ go
  /// through unchanged.
  static let wideValues: [Double] = [
    0.5, -Double.greatestFiniteMagnitude, 1e300, 3.5e38, Double(Float.greatestFiniteMagnitude),
    .nan, .infinity, -.infinity,
  ]
  static let saturated: [Float] = [
    0.5, -.greatestFiniteMagnitude, .greatestFiniteMagnitude, .greatestFiniteMagnitude,
    .greatestFiniteMagnitude, .nan, .infinity, -.infinity,
  ]

  static func float64Bytes(_ values: [Double]) -> [UInt8] {
    values.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) }
  }

  @Test("item 6: finite float64 values beyond float32's range saturate, in .npy and safetensors")
  func item6Float64Saturates() throws {
    let data = Self.float64Bytes(Self.wideValues)
    let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 4), }"
    let array = try NPY.decode(NPYTests.handWritten(dict, data: data), source: "m.npy")
    let header = #"{"m":{"dtype":"F64","shape":[2,4],"data_offsets":[0,64]}}"#
    let file = try SafeTensors.decode(
      HandWrittenFiles.safetensors(header, data: data), source: "m.safetensors")
    for scalars in [array.tensor.scalars, try file.tensor(named: "m").scalars] {
      #expect(scalars.map(\.bitPattern) == Self.saturated.map(\.bitPattern), "\(scalars)")
    }
    // The first saturated element, as the file holds it, for messages.
    #expect(
      array.firstSaturated
        == SaturatedElement(flatIndex: 1, storedValue: -Double.greatestFiniteMagnitude))
    #expect(array.describeElement(atFlat: 1) == "-1.7976931348623157e+308")
    #expect(array.describeElement(atFlat: 0) == "0.5")
    #expect(array.describeElement(atFlat: 6) == "inf")
  }

  @Test("item 6: a keep mask's message shows a saturated value as the file holds it")
  func item6MessagesShowStoredValue() throws {
    let data = Self.float64Bytes([1, 0, 1e300, 1])
    let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }"
    let array = try NPY.decode(NPYTests.handWritten(dict, data: data), source: "m.npy")
    let error = IOFixtures.fileError { _ = try array.keepMask(source: "m.npy") }
    #expect(error?.message.hasPrefix("value 1e+300 at [1, 0] is not 0 or 1") == true)
  }
}
