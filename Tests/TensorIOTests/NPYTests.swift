import Foundation
import TensorIO
import Tensors
import Testing
import _TestSupport

/// Fixtures written by Scripts/fixtures/make_io_fixtures.py (numpy and the safetensors reference
/// library), found next to this file rather than as bundle resources.
enum IOFixtures {
  static let folder = Fixtures.folder("io")

  static func path(_ name: String) -> String { folder.appendingPathComponent(name).path }

  static func bytes(_ name: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: folder.appendingPathComponent(name)))
  }

  /// One tensor as numpy sees it: shape, stored dtype, and float32 bits after numpy's conversion.
  struct ExpectedTensor: Decodable {
    var dtype: String
    var shape: [Int]
    var bits: [UInt32]
  }

  struct SafeTensorsFile: Decodable {
    var metadata: [String: String]
    var tensors: [String: ExpectedTensor]
  }

  struct Expected: Decodable {
    var npy: [String: ExpectedTensor]
    var safetensorsFiles: [String: SafeTensorsFile]

    enum CodingKeys: String, CodingKey {
      case npy
      case safetensorsFiles = "safetensors_files"
    }
  }

  static func expected() throws -> Expected {
    let data = try Data(contentsOf: folder.appendingPathComponent("expected.json"))
    return try JSONDecoder().decode(Expected.self, from: data)
  }

  /// A fresh empty folder under the system's temporary folder, removed by `remove()`.
  struct ScratchFolder {
    let url: URL

    init() throws {
      url = FileManager.default.temporaryDirectory
        .appendingPathComponent("attn-io-tests-\(UUID().uuidString)")
      try FileManager.default.createDirectory(at: url, withIntermediateDirectories: false)
    }

    func path(_ name: String) -> String { url.appendingPathComponent(name).path }

    func contents() throws -> [String] {
      try FileManager.default.contentsOfDirectory(atPath: url.path).sorted()
    }

    func remove() { try? FileManager.default.removeItem(at: url) }
  }

  /// The `AttentionError.file` that `body` throws, or nil (recorded as a failure) for anything
  /// else. It also checks the error is one line that starts with the path.
  static func fileError(
    _ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation
  )
    -> (path: String, message: String)?
  {
    do {
      try body()
      Issue.record("expected an error, but none was thrown", sourceLocation: sourceLocation)
    } catch let error as AttentionError {
      guard case .file(let path, let message) = error else {
        Issue.record("expected AttentionError.file, got \(error)", sourceLocation: sourceLocation)
        return nil
      }
      #expect(
        !error.description.contains("\n"), "not one line: \(error)",
        sourceLocation: sourceLocation)
      #expect(error.description.hasPrefix(path + ": "), sourceLocation: sourceLocation)
      return (path, message)
    } catch {
      Issue.record("expected AttentionError.file, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
  }

  /// Values that exercise the bit-exact paths: signed zeros, NaN, infinities, a subnormal.
  static let specialFloats: [Float] = [
    0, -0.0, 1, -1.5, .nan, .infinity, -.infinity, .leastNonzeroMagnitude, .greatestFiniteMagnitude,
    1e-3,
  ]

  static func patterned(_ shape: [Int]) throws -> Tensors.Tensor {
    let count = try Tensors.Tensor.elementCount(of: shape)
    let scalars = (0..<count).map { specialFloats[$0 % specialFloats.count] * Float($0 / 10 + 1) }
    return try Tensors.Tensor(shape: shape, scalars: scalars)
  }
}

@Suite("NPY")
struct NPYTests {
  static let validFixtures = [
    "f4_2x3.npy", "f4_2x3x4.npy", "f8_2x6.npy", "b1_2x2.npy", "scalar_f4.npy", "vector_f4.npy",
    "empty_f4.npy", "rank15_f4.npy", "aligned_f4.npy", "v2_f4.npy", "v3_f4.npy",
    "f4_double_quotes.npy", "i8_2x3.npy", "u1_2x2.npy", "i4_4.npy", "f2_2x3.npy",
  ]

  @Test("every valid fixture in expected.json is listed here")
  func fixtureListIsComplete() throws {
    #expect(Set(try IOFixtures.expected().npy.keys) == Set(Self.validFixtures))
  }

  @Test("reads numpy-written files to numpy's float32 values", arguments: validFixtures)
  func readsNumpyFiles(name: String) throws {
    let expected = try #require(try IOFixtures.expected().npy[name])
    let array = try NPY.read(contentsOf: IOFixtures.path(name))
    #expect(array.dtype.descr == expected.dtype)
    #expect(array.tensor.shape == expected.shape)
    let bits = array.tensor.scalars.map(\.bitPattern)
    #expect(bits == expected.bits, "\(name): got \(array.tensor.scalars)")
  }

  @Test(
    "encodes float32 tensors byte for byte as np.save does",
    arguments: [
      "f4_2x3.npy", "f4_2x3x4.npy", "scalar_f4.npy", "vector_f4.npy", "empty_f4.npy",
      "rank15_f4.npy", "aligned_f4.npy",
    ])
  func encodeMatchesNumpy(name: String) throws {
    let fileBytes = try IOFixtures.bytes(name)
    let tensor = try NPY.decode(fileBytes, source: name).tensor
    let encoded = NPY.encode(tensor)
    #expect(encoded == fileBytes)
    // numpy aligns the data to 64 bytes; the header length is at bytes 8–9.
    #expect((10 + Int(encoded[8]) + Int(encoded[9]) << 8) % 64 == 0)
  }

  @Test(
    "write then read gives the same shape and bits",
    arguments: [[], [0], [5], [2, 3], [2, 3, 4], [1, 1, 1, 1, 1], [3, 0, 2], [40, 30]])
  func roundTrip(shape: [Int]) throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    let tensor = try IOFixtures.patterned(shape)
    try NPY.write(tensor, to: folder.path("t.npy"))
    let back = try NPY.read(contentsOf: folder.path("t.npy"))
    #expect(back.dtype == .float32)
    #expect(back.tensor.shape == shape)
    #expect(back.tensor.scalars.map(\.bitPattern) == tensor.scalars.map(\.bitPattern))
    #expect(try folder.contents() == ["t.npy"], "temporary file left behind")
  }

  @Test(
    "malformed files fail with a message that names the file",
    arguments: [
      ("bad_fortran.npy", "Fortran"),
      ("bad_big_endian.npy", "big-endian dtype \">f4\""),
      ("bad_complex64.npy", "unsupported dtype \"<c8\""),
      ("bad_truncated.npy", "truncated"),
      ("bad_magic.npy", "not an .npy file"),
      ("bad_version.npy", "version 4.0"),
      ("bad_header_length.npy", "header length 65535 runs past the end"),
      ("bad_shape_mismatch.npy", "too long"),
      ("bad_bool_byte.npy", "bool element 1 is stored as byte 2"),
      ("bad_negative_dim.npy", "negative dimension -1"),
      ("bad_overflow_dim.npy", "more elements than memory can index"),
      ("bad_missing_key.npy", "missing key 'fortran_order'"),
      ("bad_header_syntax.npy", "invalid header"),
      ("no_such_file.npy", "cannot open: no such file"),
    ])
  func malformed(name: String, fragment: String) throws {
    let path = IOFixtures.path(name)
    let error = IOFixtures.fileError { _ = try NPY.read(contentsOf: path) }
    #expect(error?.path == path)
    #expect(error?.message.contains(fragment) == true, "message: \(error?.message ?? "none")")
  }

  /// A v1.0 file with a hand-written header dict and the given data.
  static func handWritten(_ dict: String, data: [UInt8]) -> [UInt8] {
    let header = Array(dict.utf8)
    let padding = 64 - (10 + header.count + 1) % 64
    let length = header.count + padding + 1
    return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(length & 0xFF), UInt8(length >> 8)]
      + header + [UInt8](repeating: 0x20, count: padding) + [0x0A] + data
  }

  static let two: [UInt8] = [0, 0, 0x80, 0x3F, 0, 0, 0, 0x40]  // 1.0, 2.0 as <f4

  @Test(
    "header dicts numpy could have written are accepted",
    arguments: [
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
      "{'shape': (2,), 'fortran_order': False, 'descr': '<f4'}",
      "{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(2L,)}",
      "{'descr': '<f4',\n 'fortran_order': False,\n 'shape': ( 2 , ) ,}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }",
    ])
  func acceptedHeaders(dict: String) throws {
    let array = try NPY.decode(Self.handWritten(dict, data: Self.two), source: "mem.npy")
    #expect(array.tensor.scalars == [1, 2])
    #expect(array.tensor.count == 2)
  }

  @Test(
    "header dicts outside what numpy writes are refused",
    arguments: [
      ("{'descr': '<f4', 'fortran_order': False, 'shape': (2), }", "'shape' is not a tuple"),
      ("{'descr': '<f4', 'fortran_order': False, 'shape': [2], }", "expected a string"),
      ("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }", "expected a string"),
      ("{'descr': '<f4', 'fortran_order': Falsey, 'shape': (2,), }", "expected False"),
      ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 'y'}", "unexpected key"),
      ("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", "twice"),
      ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}", "expected a string"),
      ("{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,)}", "expected an integer"),
      (
        "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
        "too large"
      ),
      ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x", "unexpected text"),
      ("{'descr': '<f\\x34', 'fortran_order': False, 'shape': (2,)}", "unsupported character"),
      ("{'descr': '<c8', 'fortran_order': False, 'shape': (2,)}", "unsupported dtype"),
    ])
  func refusedHeaders(dict: String, fragment: String) throws {
    let error = IOFixtures.fileError {
      _ = try NPY.decode(Self.handWritten(dict, data: Self.two), source: "m")
    }
    #expect(error?.path == "m")
    #expect(error?.message.contains(fragment) == true, "message: \(error?.message ?? "none")")
  }

  @Test("f8 values convert to Float by rounding to nearest, as numpy does, and saturate")
  func float64Rounding() throws {
    let values: [Double] = [0.1, 16_777_217, 0x1p-150, 3 * 0x1p-151, 1e300, -1e-40]
    var data: [UInt8] = []
    for value in values {
      data += withUnsafeBytes(of: value.bitPattern.littleEndian, Array.init)
    }
    let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (6,), }"
    let array = try NPY.decode(Self.handWritten(dict, data: data), source: "m")
    #expect(array.dtype == .float64)
    #expect(array.tensor.scalars[0] == Float(0.1))
    #expect(array.tensor.scalars[1] == 16_777_216)
    #expect(array.tensor.scalars[2] == 0)
    #expect(array.tensor.scalars[3] == .leastNonzeroMagnitude)
    // numpy gives inf; attn saturates finite values (InputFidelityIOTests has the details).
    #expect(array.tensor.scalars[4] == .greatestFiniteMagnitude)
    #expect(array.firstSaturated == SaturatedElement(flatIndex: 4, storedValue: 1e300))
    #expect(array.tensor.scalars[5].isSubnormal && array.tensor.scalars[5] < 0)
  }

  @Test("a header too long for version 1.0 is written as version 2.0, as numpy does")
  func version2WhenHeaderIsLong() throws {
    // 22000 dimensions of 1 make a header over 65535 bytes.
    let tensor = try Tensors.Tensor(shape: [Int](repeating: 1, count: 22_000), scalars: [2.5])
    let bytes = NPY.encode(tensor)
    #expect(bytes[6] == 2 && bytes[7] == 0)
    let headerLength = bytes[8..<12].reversed().reduce(0) { $0 << 8 | Int($1) }
    #expect(headerLength > 65535)
    #expect((12 + headerLength) % 64 == 0)
    #expect(try NPY.decode(bytes, source: "v2") == NPYArray(tensor: tensor, dtype: .float32))
  }

  @Test("a hostile shape with thousands of dimensions or digits stays short in messages")
  func longShapesAreCut() throws {
    let ones = [String](repeating: "1", count: 10_000).joined(separator: ", ")
    let manyDims = "{'descr': '<f4', 'fortran_order': False, 'shape': (\(ones)), }"
    let dims = IOFixtures.fileError {
      _ = try NPY.decode(Self.handWritten(manyDims, data: []), source: "m")
    }
    #expect(dims?.message.contains("(10000 dimensions)") == true, "\(dims?.message ?? "none")")
    #expect((dims?.message.count ?? .max) < 200)

    let digits = String(repeating: "9", count: 5_000)
    let negative = "{'descr': '<f4', 'fortran_order': False, 'shape': (-\(digits),), }"
    let error = IOFixtures.fileError {
      _ = try NPY.decode(Self.handWritten(negative, data: []), source: "m")
    }
    #expect(error?.message.contains("negative dimension -999") == true)
    #expect((error?.message.count ?? .max) < 200)
  }

  @Test("every truncation of a valid file is refused, none traps")
  func everyTruncationFails() throws {
    for name in ["f4_2x3.npy", "v2_f4.npy", "b1_2x2.npy"] {
      let bytes = try IOFixtures.bytes(name)
      for length in 0..<bytes.count {
        #expect(throws: AttentionError.self, "\(name) cut to \(length) bytes") {
          _ = try NPY.decode(Array(bytes[0..<length]), source: name)
        }
      }
    }
  }

  @Test("single-byte corruptions of the preamble and header decode or throw, never trap")
  func corruptionsNeverTrap() throws {
    let bytes = try IOFixtures.bytes("f4_2x3.npy")
    var refused = 0
    for index in 0..<(bytes.count - 24) {
      for value: UInt8 in [0x00, 0x01, 0x27, 0x28, 0x29, 0x2C, 0x2D, 0x30, 0x39, 0x7F, 0xFF] {
        var corrupted = bytes
        corrupted[index] = value
        do { _ = try NPY.decode(corrupted, source: "c") } catch { refused += 1 }
      }
    }
    #expect(refused > 0)
  }

  @Test("writing into a missing folder fails, names the file and creates nothing")
  func writeIntoMissingFolder() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    let target = folder.path("missing/t.npy")
    let error = IOFixtures.fileError { try NPY.write(try IOFixtures.patterned([2]), to: target) }
    #expect(error?.path == target)
    #expect(error?.message.contains("does not exist") == true, "\(error?.message ?? "none")")
    #expect(try folder.contents() == [])
  }

  @Test("a failed write leaves the existing file unchanged and no temporary file")
  func failedWriteKeepsExistingFile() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    // The target is a non-empty folder: the temporary file is written in full, then the rename
    // fails, which is the latest point a write can fail.
    let target = folder.path("target.npy")
    try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: false)
    try Data("keep".utf8).write(to: URL(fileURLWithPath: target + "/inside"))
    let error = IOFixtures.fileError { try NPY.write(try IOFixtures.patterned([3]), to: target) }
    #expect(error?.path == target)
    #expect(try folder.contents() == ["target.npy"])
    #expect(try String(contentsOfFile: target + "/inside", encoding: .utf8) == "keep")

    // A regular file whose path is used as a folder: the file itself must not change.
    let file = folder.path("existing.npy")
    try NPY.write(try IOFixtures.patterned([2, 2]), to: file)
    let before = try Data(contentsOf: URL(fileURLWithPath: file))
    let nested = IOFixtures.fileError {
      try NPY.write(try IOFixtures.patterned([1]), to: file + "/child.npy")
    }
    #expect(nested?.message.contains("is not a folder") == true, "\(nested?.message ?? "none")")
    #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == before)
    #expect(try folder.contents() == ["existing.npy", "target.npy"])
  }

  @Test("a successful write replaces the old file whole")
  func overwriteReplaces() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    let target = folder.path("w.npy")
    try NPY.write(try IOFixtures.patterned([40, 30]), to: target)
    let small = try IOFixtures.patterned([3])
    try NPY.write(small, to: target)
    #expect(try NPY.read(contentsOf: target).tensor == small)
    #expect(try Data(contentsOf: URL(fileURLWithPath: target)).count == NPY.encode(small).count)
    #expect(try folder.contents() == ["w.npy"])
  }

  @Test("a path naming a folder cannot be written")
  func writeToFolderPath() throws {
    let error = IOFixtures.fileError { try writeAtomically([1, 2, 3], to: "/tmp/") }
    #expect(error?.message.contains("names a folder") == true, "\(error?.message ?? "none")")
  }
}
