import Foundation
import TensorIO
import Tensors
import Testing
import _TestSupport

/// Issue #23 ("fidelity, round three"), items 2, 3, 4 and 6, in the readers and writers; the
/// command-line side of each item is in attnTests' InputFidelityTests. Every expected value is
/// derived by hand in the comments: bit patterns, ranges, the bytes of hand-written files.
@Suite("Input fidelity: TensorIO (#23 items 2, 3, 4, 6)")
struct InputFidelityIOTests {
  @Test(
    "item 2: readTensor reads one tensor of a file whose others are I64, BOOL, F8 and 1 GiB")
  func item2ReadsOnlyTheNamedTensor() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    let path = folder.path("model.safetensors")
    let q = try Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6])
    try HandWrittenFiles.modelSafetensors(at: path, around: ["q": q], bigBytes: 1 << 30)
    // A budget of q's 6 floats: the 1 GiB neighbour would be 2^28 times over it.
    let (tensor, dtype) = try SafeTensors.readTensor(named: "q", contentsOf: path, maxBytes: 24)
    #expect(tensor.shape == [2, 3] && tensor.scalars == [1, 2, 3, 4, 5, 6] && dtype == .f32)
    // One float less and q itself is over the budget.
    #expect(throws: AttentionError.self) {
      try SafeTensors.readTensor(named: "q", contentsOf: path, maxBytes: 23)
    }
    // The neighbours are skipped, not ignored: a name that is not there lists them.
    let error = IOFixtures.fileError {
      _ = try SafeTensors.readTensor(named: "k", contentsOf: path, maxBytes: 24)
    }
    #expect(
      error?.message
        == #"tensor "k" is missing (the file holds "big", "flags", "fp8", "position_ids", "q")"#)
  }

  @Test("item 3: BOOL tensors read as 0 and 1 (True = 1), and other bytes are refused")
  func item3BooleanSafetensors() throws {
    let header = #"{"m":{"dtype":"BOOL","shape":[2,3],"data_offsets":[0,6]}}"#
    let file = try SafeTensors.decode(
      HandWrittenFiles.safetensors(header, data: [1, 0, 1, 0, 0, 1]), source: "m.safetensors")
    #expect(file.dtypes["m"] == .bool)
    #expect(try file.tensor(named: "m", shape: [2, 3]).scalars == [1, 0, 1, 0, 0, 1])
    // What PyTorch's save_file writes for a bool tensor: the same header, and the encoder's.
    let mask = try Tensor(shape: [2, 3], scalars: [1, 0, 1, 0, 0, 1])
    #expect(
      try SafeTensors.encode(["m": mask], dtype: .bool)
        == HandWrittenFiles.safetensors(header, data: [1, 0, 1, 0, 0, 1]))
    let error = IOFixtures.fileError {
      _ = try SafeTensors.decode(
        HandWrittenFiles.safetensors(header, data: [1, 0, 2, 0, 0, 1]), source: "m.safetensors")
    }
    #expect(error?.message == #"tensor "m": bool element 2 is stored as byte 2, not 0 or 1"#)
  }

  /// float16's largest finite value is 65504 = (2 − 2⁻¹⁰)·2¹⁵; the next step would be 65536, so
  /// values from the midpoint 65520 up round to ∞ (65520 itself ties to the even exponent: ∞).
  /// bfloat16's is 0x7F7F (1.9921875·2¹²⁷); `Float` values from its midpoint with the next,
  /// 0x7F7F8000 (a tie, to the even 0x7F80: ∞), up to `greatestFiniteMagnitude` round to ∞.
  @Test(
    "item 4: firstOverflow finds the first finite value a 16-bit format rounds to ±inf",
    arguments: [
      (HalfPrecision.Format.float16, [65504, 65519.996, -65519.996, 1e-10], nil),
      (.float16, [1, 65520, -1e6], 1),
      (.float16, [.infinity, .nan, -.infinity, 2, -65520], 4),
      (.bfloat16, [Float(bitPattern: 0x7F7F_7FFF), -Float(bitPattern: 0x7F7F_7FFF)], nil),
      (.bfloat16, [1, Float(bitPattern: 0x7F7F_8000)], 1),
      (.bfloat16, [.infinity, -.greatestFiniteMagnitude], 1),
    ] as [(HalfPrecision.Format, [Float], Int?)])
  func item4HalfPrecisionOverflow(format: HalfPrecision.Format, values: [Float], first: Int?) {
    #expect(HalfPrecision.firstOverflow(in: values, to: format) == first)
    // The rule is the encoder's own: the element found is the first finite one it makes infinite.
    for (i, value) in values.enumerated() where value.isFinite && i <= first ?? values.count {
      let written = format.float(fromBits: format.bits(from: value))
      #expect(written.isInfinite == (i == first), "\(value) → \(written)")
    }
  }

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
