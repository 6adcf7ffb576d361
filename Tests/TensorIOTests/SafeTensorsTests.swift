import Foundation
import TensorIO
import Tensors
import Testing
import _TestSupport

extension IOFixtures {
  /// `count` little-endian F32 values 1, 2, 3, …
  static func f32Data(_ count: Int) -> [UInt8] {
    (0..<count).flatMap { withUnsafeBytes(of: Float($0 + 1).bitPattern.littleEndian, Array.init) }
  }
}

@Suite("SafeTensors")
struct SafeTensorsTests {
  static let validFixtures = [
    "f32.safetensors", "f16.safetensors", "f64.safetensors", "bf16.safetensors",
    "mixed.safetensors",
  ]

  @Test("every valid fixture in expected.json is listed here")
  func fixtureListIsComplete() throws {
    #expect(Set(try IOFixtures.expected().safetensorsFiles.keys) == Set(Self.validFixtures))
  }

  @Test("reads reference-written files to numpy's float32 values", arguments: validFixtures)
  func readsReferenceFiles(name: String) throws {
    let expected = try #require(try IOFixtures.expected().safetensorsFiles[name])
    let file = try SafeTensors.read(contentsOf: IOFixtures.path(name))
    #expect(file.source == IOFixtures.path(name))
    #expect(file.metadata == expected.metadata)
    #expect(Set(file.tensors.keys) == Set(expected.tensors.keys))
    for (tensorName, want) in expected.tensors {
      let tensor = try file.tensor(named: tensorName, shape: want.shape)
      #expect(file.dtypes[tensorName]?.rawValue == want.dtype)
      #expect(
        tensor.scalars.map(\.bitPattern) == want.bits, "\(name) \(tensorName): \(tensor.scalars)")
    }
  }

  @Test("encodes F32 byte for byte as the reference implementation does")
  func encodeMatchesReference() throws {
    let bytes = try IOFixtures.bytes("f32.safetensors")
    let file = try SafeTensors.decode(bytes, source: "f32.safetensors")
    #expect(try SafeTensors.encode(file.tensors, metadata: file.metadata) == bytes)
  }

  @Test("write then read gives the same tensors, bits and metadata")
  func roundTrip() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    let tensors: [String: Tensors.Tensor] = [
      "z.last": try IOFixtures.patterned([2, 3, 4]),
      "a.first": try IOFixtures.patterned([7]),
      "scalar": try IOFixtures.patterned([]),
      "empty": try IOFixtures.patterned([0, 5]),
      "naïve \"quoted\"\n\\name\u{1}": try IOFixtures.patterned([3, 1]),
      // Not NFC: in byte order before "naïve", in String `<` order last.
      "e\u{301}": try IOFixtures.patterned([1]),
    ]
    let metadata = ["format": "pt", "note": "tab\there \"q\" é 😀", "": "empty key", "\u{7}": ""]
    let path = folder.path("model.safetensors")
    try SafeTensors.write(tensors, metadata: metadata, to: path)
    let back = try SafeTensors.read(contentsOf: path)
    #expect(back.metadata == metadata)
    #expect(Set(back.tensors.keys) == Set(tensors.keys))
    for (name, tensor) in tensors {
      let read = try back.tensor(named: name, shape: tensor.shape)
      #expect(read.scalars.map(\.bitPattern) == tensor.scalars.map(\.bitPattern), "\(name)")
      #expect(back.dtypes[name] == .f32)
    }
    let byteOrder = [
      "a.first", "empty", "e\u{301}", "naïve \"quoted\"\n\\name\u{1}", "scalar", "z.last",
    ]
    #expect(back.names.elementsEqual(byteOrder) { Array($0.utf8) == Array($1.utf8) })
    #expect(try folder.contents() == ["model.safetensors"], "temporary file left behind")

    // The header is padded to a multiple of 8 bytes, so the data section is 8-byte aligned.
    let bytes = try SafeTensors.encode(tensors, metadata: metadata)
    let headerLength = bytes[0..<8].reversed().reduce(0) { $0 << 8 | Int($1) }
    #expect(headerLength % 8 == 0)
  }

  @Test("a selective read decodes the chosen tensors and skips the rest, whatever their dtype")
  func selectiveRead() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    // A whole model's file: an I64 buffer (position ids) beside the layer's F32 weights.
    let weight = try IOFixtures.patterned([2, 3])
    let json =
      #"{"embeddings.position_ids":{"dtype":"I64","shape":[1,4],"data_offsets":[0,32]},"#
      + #""layer.0.w":{"dtype":"F32","shape":[2,3],"data_offsets":[32,56]}}"#
    var header = Array(json.utf8)
    header += [UInt8](repeating: 0x20, count: (8 - header.count % 8) % 8)
    var bytes = (0..<8).map { UInt8(truncatingIfNeeded: header.count >> (8 * $0)) } + header
    bytes += (0..<4).flatMap { i in (0..<8).map { UInt8(truncatingIfNeeded: i >> (8 * $0)) } }
    for value in weight.scalars {
      bytes += (0..<4).map { UInt8(truncatingIfNeeded: value.bitPattern >> (8 * UInt32($0))) }
    }
    let path = folder.path("model.safetensors")
    try Data(bytes).write(to: URL(fileURLWithPath: path))

    // Reading everything refuses the integer tensor, naming it.
    #expect(throws: AttentionError.self) { try SafeTensors.read(contentsOf: path) }
    let layer = try SafeTensors.read(contentsOf: path) { $0.hasPrefix("layer.0.") }
    #expect(layer.names == ["layer.0.w"])
    #expect(
      layer.tensors["layer.0.w"]?.scalars.map(\.bitPattern) == weight.scalars.map(\.bitPattern))
    #expect(layer.skippedNames == ["embeddings.position_ids"])
    // The budget counts the selected tensors only (6 floats = 24 bytes).
    _ = try SafeTensors.read(contentsOf: path, maxBytes: 24) { $0.hasPrefix("layer.0.") }
    #expect(throws: AttentionError.self) {
      try SafeTensors.read(contentsOf: path, maxBytes: 23) { $0.hasPrefix("layer.0.") }
    }
    // A truncated file is still an error when the missing bytes belong to a skipped tensor.
    try Data(bytes.prefix(8 + header.count + 16)).write(to: URL(fileURLWithPath: path))
    #expect(throws: AttentionError.self) {
      try SafeTensors.read(contentsOf: path) { $0.hasPrefix("layer.0.") }
    }
  }

  @Test("a file with no tensors round-trips")
  func emptyFile() throws {
    let bytes = try SafeTensors.encode([:])
    #expect(bytes == HandWrittenFiles.safetensors("{}"))
    let file = try SafeTensors.decode(bytes, source: "e")
    #expect(file.tensors.isEmpty && file.metadata.isEmpty)
  }

  @Test(
    "malformed files fail with a message that names the file and the tensor",
    arguments: [
      ("bad_short.safetensors", nil, "too short"),
      ("bad_header_length.safetensors", nil, "runs past the end of the file"),
      ("bad_header_huge.safetensors", nil, "header length 9223372036854775808 runs past"),
      ("bad_not_utf8.safetensors", nil, "not valid UTF-8"),
      ("bad_not_json.safetensors", nil, "not valid JSON"),
      ("bad_not_object.safetensors", nil, "not a JSON object"),
      ("bad_unknown_dtype.safetensors", "w", "unknown dtype \"Q7\""),
      ("bad_unsupported_dtype.safetensors", "w", "dtype \"I32\" is not supported"),
      ("bad_offsets_range.safetensors", "w", "run past the end of the data section (24 bytes)"),
      ("bad_offsets_reversed.safetensors", "w", "begin after they end"),
      ("bad_overlap.safetensors", "b", "overlap tensor \"a\""),
      ("bad_gap.safetensors", "b", "unused"),
      ("bad_tail.safetensors", nil, "bytes 16..<24 of the data section belong to no tensor"),
      ("bad_duplicate.safetensors", "w", "appears twice"),
      ("bad_size_mismatch.safetensors", "w", "needs 16 bytes but data_offsets [0, 24] hold 24"),
      ("bad_negative_dim.safetensors", "w", "negative dimension -2"),
      ("bad_fractional_dim.safetensors", "w", "dimension \"2.5\" is not an integer"),
      ("bad_huge_dim.safetensors", "w", "is too large"),
      ("bad_overflow_shape.safetensors", "w", "more elements than memory can index"),
      ("bad_missing_field.safetensors", "w", "missing \"data_offsets\""),
      ("bad_metadata.safetensors", nil, "value for \"format\" is a number, not a string"),
      ("bad_deep.safetensors", nil, "nested deeper than 64 levels"),
      ("no_such_file.safetensors", nil, "cannot open: no such file"),
    ] as [(String, String?, String)])
  func malformed(name: String, tensor: String?, fragment: String) throws {
    let path = IOFixtures.path(name)
    let error = IOFixtures.fileError { _ = try SafeTensors.read(contentsOf: path) }
    #expect(error?.path == path)
    let message = error?.message ?? "none"
    #expect(message.contains(fragment), "message: \(message)")
    if let tensor {
      #expect(message.contains("tensor \"\(tensor)\""), "message: \(message)")
    }
  }

  @Test("tensor(named:shape:) names the tensor and the file when it is missing or misshapen")
  func namedTensorErrors() throws {
    let file = try SafeTensors.read(contentsOf: IOFixtures.path("f32.safetensors"))
    #expect(try file.tensor(named: "attn.k.weight", shape: [3]).scalars == [0.5, -1.25, 3])

    let missing = IOFixtures.fileError { _ = try file.tensor(named: "attn.v.weight", shape: [3]) }
    #expect(missing?.path == IOFixtures.path("f32.safetensors"))
    #expect(missing?.message.contains("tensor \"attn.v.weight\" is missing") == true)
    #expect(
      missing?.message.contains("\"attn.k.weight\", \"attn.q.weight\"") == true,
      "lists what the file has: \(missing?.message ?? "none")")

    let misshapen = IOFixtures.fileError {
      _ = try file.tensor(named: "attn.q.weight", shape: [3, 2])
    }
    #expect(misshapen?.message == "tensor \"attn.q.weight\" has shape [2, 3], expected [3, 2]")
  }

  @Test(
    "headers the strict JSON parser accepts",
    arguments: [
      // Whitespace everywhere JSON allows it, unknown fields ignored, escapes decoded.
      "\t{ \"w\" :\n{\"shape\" : [ 2 ] , \"dtype\":\"F32\", \"data_offsets\":[0,8],"
        + " \"extra\": [true, false, null, -1.5e-3, {\"k\": \"\\u00e9\"}]}}\r\n",
      "{\"\\u0077\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
      "{\"__metadata__\":{},\"w\":{\"dtype\":\"F32\",\"shape\":[2,-0],\"data_offsets\":[0,0]},"
        + "\"v\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
    ])
  func acceptedHeaders(header: String) throws {
    let file = try SafeTensors.decode(
      HandWrittenFiles.safetensors(header, data: IOFixtures.f32Data(2)), source: "m")
    #expect(file.tensors["w"] != nil)
  }

  @Test("names and metadata with escapes decode to the right strings")
  func escapes() throws {
    let header =
      "{\"__metadata__\":{\"k\\n\":\"\\\"\\\\\\/\\b\\f\\r\\t\\ud83d\\ude00\"},"
      + "\"a\\u00e9\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}"
    let file = try SafeTensors.decode(
      HandWrittenFiles.safetensors(header, data: IOFixtures.f32Data(1)), source: "m")
    #expect(file.metadata == ["k\n": "\"\\/\u{8}\u{c}\r\t😀"])
    #expect(file.tensors["aé"]?.scalars == [1])
  }

  @Test(
    "headers the strict JSON parser refuses",
    arguments: [
      (
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],}}", "expected a string key"
      ),
      ("{\"w\":{\"dtype\":\"F32\",\"shape\":[02],\"data_offsets\":[0,8]}}", "leading zero"),
      ("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}} x", "unexpected 'x'"),
      (
        "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
        "duplicate key \"dtype\""
      ),
      (
        "{\"\\u00e9\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
          + "\"e\\u0301\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
        "appears twice"
      ),
      ("{\"__metadata__\":{},\"__metadata__\":{}}", "\"__metadata__\" appears twice"),
      ("{\"w\\ud800\":{}}", "lone UTF-16 surrogate"),
      ("{\"w\\udc00\":{}}", "lone UTF-16 surrogate"),
      ("{\"w\\x\":{}}", "invalid escape"),
      ("{\"w\u{1}\":{}}", "raw control character"),
      ("{\"w\":tru}", "invalid literal"),
      ("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e0],\"data_offsets\":[0,4]}}", "not an integer"),
      (
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}",
        "dimension is a string"
      ),
      (
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}",
        "not two non-negative integers"
      ),
      (
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}",
        "not two non-negative integers"
      ),
      (
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,99999999999999999999]}}",
        "not two non-negative integers"
      ),
      ("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "belong to no tensor"),
      ("{\"w\":[]}", "entry is an array, not an object"),
      ("{\"__metadata__\":\"x\"}", "\"__metadata__\" is a string, not an object"),
      ("", "expected a value but found end of header"),
      ("\"w\"", "header is a string, not a JSON object"),
    ])
  func refusedHeaders(header: String, fragment: String) throws {
    let error = IOFixtures.fileError {
      _ = try SafeTensors.decode(
        HandWrittenFiles.safetensors(header, data: IOFixtures.f32Data(2)), source: "m")
    }
    #expect(error?.path == "m")
    #expect(error?.message.contains(fragment) == true, "message: \(error?.message ?? "none")")
  }

  @Test("nesting is accepted up to 64 levels and refused beyond")
  func depthLimit() throws {
    func header(arrays: Int) -> String {
      "{\"__metadata__\":{\"k\":" + String(repeating: "[", count: arrays)
        + String(repeating: "]", count: arrays) + "}}"
    }
    // The outer object and the metadata object are two levels.
    let atLimit = IOFixtures.fileError {
      _ = try SafeTensors.decode(HandWrittenFiles.safetensors(header(arrays: 62)), source: "m")
    }
    #expect(
      atLimit?.message.contains("is an array, not a string") == true, "\(atLimit?.message ?? "")")
    let beyond = IOFixtures.fileError {
      _ = try SafeTensors.decode(HandWrittenFiles.safetensors(header(arrays: 63)), source: "m")
    }
    #expect(
      beyond?.message.contains("nested deeper than 64 levels") == true, "\(beyond?.message ?? "")")
    // Far beyond: must not overflow the stack.
    let deep = IOFixtures.fileError {
      _ = try SafeTensors.decode(HandWrittenFiles.safetensors(header(arrays: 100_000)), source: "m")
    }
    #expect(deep?.message.contains("nested deeper") == true)
  }

  @Test("a huge tensor name or shape is cut short in messages")
  func longNamesAreCut() throws {
    let name = String(repeating: "n", count: 10_000)
    let header = "{\"\(name)\":{\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,8]}}"
    let error = IOFixtures.fileError {
      _ = try SafeTensors.decode(
        HandWrittenFiles.safetensors(header, data: IOFixtures.f32Data(2)), source: "m")
    }
    #expect((error?.message.count ?? .max) < 200)

    let ones = [String](repeating: "1", count: 10_000).joined(separator: ",")
    let rank = "{\"w\":{\"dtype\":\"F32\",\"shape\":[\(ones)],\"data_offsets\":[0,8]}}"
    let shape = IOFixtures.fileError {
      _ = try SafeTensors.decode(
        HandWrittenFiles.safetensors(rank, data: IOFixtures.f32Data(2)), source: "m")
    }
    #expect(shape?.message.contains("(10000 dimensions)") == true, "\(shape?.message ?? "none")")
    #expect((shape?.message.count ?? .max) < 200)
  }

  @Test("every truncation of a valid file is refused, none traps")
  func everyTruncationFails() throws {
    for name in ["f32.safetensors", "mixed.safetensors"] {
      let bytes = try IOFixtures.bytes(name)
      for length in 0..<bytes.count {
        #expect(throws: AttentionError.self, "\(name) cut to \(length) bytes") {
          _ = try SafeTensors.decode(Array(bytes[0..<length]), source: name)
        }
      }
    }
  }

  @Test("random byte corruptions decode or throw, never trap")
  func corruptionsNeverTrap() throws {
    let bytes = try IOFixtures.bytes("mixed.safetensors")
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    func next() -> UInt64 {  // xorshift64: deterministic, so a failure reproduces
      state ^= state << 13
      state ^= state >> 7
      state ^= state << 17
      return state
    }
    var refused = 0
    for _ in 0..<5_000 {
      var corrupted = bytes
      for _ in 0..<(1 + Int(next() % 3)) {
        let index = Int(next() % UInt64(corrupted.count))
        corrupted[index] = UInt8(truncatingIfNeeded: next())
      }
      do { _ = try SafeTensors.decode(corrupted, source: "c") } catch { refused += 1 }
    }
    #expect(refused > 0)
  }

  @Test("writing into a missing folder fails, names the file and creates nothing")
  func writeIntoMissingFolder() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    let target = folder.path("no/such/folder/m.safetensors")
    let error = IOFixtures.fileError {
      try SafeTensors.write(["w": try IOFixtures.patterned([2])], to: target)
    }
    #expect(error?.path == target)
    #expect(error?.message.contains("does not exist") == true, "\(error?.message ?? "none")")
    #expect(try folder.contents() == [])
  }

  @Test("a write that fails leaves the existing file unchanged")
  func failedWriteKeepsExistingFile() throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    let target = folder.path("m.safetensors")
    try SafeTensors.write(
      ["w": try IOFixtures.patterned([2, 2])], metadata: ["v": "1"], to: target)
    let before = try Data(contentsOf: URL(fileURLWithPath: target))

    // A reserved name makes the encoding fail before anything is written.
    let reserved = IOFixtures.fileError {
      try SafeTensors.write(["__metadata__": try IOFixtures.patterned([1])], to: target)
    }
    #expect(reserved?.path == target)
    #expect(reserved?.message.contains("__metadata__") == true)
    #expect(try Data(contentsOf: URL(fileURLWithPath: target)) == before)

    // The rename fails (the target is now a non-empty folder): the temporary file must go.
    let blocked = folder.path("blocked.safetensors")
    try FileManager.default.createDirectory(atPath: blocked, withIntermediateDirectories: false)
    try Data("x".utf8).write(to: URL(fileURLWithPath: blocked + "/inside"))
    let renameError = IOFixtures.fileError {
      try SafeTensors.write(["w": try IOFixtures.patterned([2])], to: blocked)
    }
    #expect(renameError?.path == blocked)
    #expect(try folder.contents() == ["blocked.safetensors", "m.safetensors"])
    #expect(try Data(contentsOf: URL(fileURLWithPath: target)) == before)
  }
}

@Suite("SafeTensors half precision")
struct SafeTensorsHalfPrecisionTests {
  @Test("F16 conversion equals Float16's for all 65536 bit patterns")
  func f16Exhaustive() {
    var mismatches: [UInt16] = []
    for bits in UInt16.min...UInt16.max {
      let ours = HalfPrecision.float(fromF16Bits: bits)
      let reference = Float(Float16(bitPattern: bits))
      let same =
        reference.isNaN
        ? ours.isNaN && ours.sign == reference.sign
        : ours.bitPattern == reference.bitPattern
      if !same { mismatches.append(bits) }
    }
    #expect(mismatches.count == 0, "first mismatches: \(mismatches.prefix(5))")
  }

  @Test(
    "F16 edge values",
    arguments: [
      (UInt16(0x0000), Float(0)), (0x8000, -0.0), (0x3C00, 1), (0xC000, -2), (0x7BFF, 65504),
      (0x0400, 0x1p-14), (0x0001, 0x1p-24), (0x03FF, 1023 * 0x1p-24), (0x8001, -0x1p-24),
      (0x7C00, .infinity), (0xFC00, -.infinity), (0x3555, 0.333251953125),
    ] as [(UInt16, Float)])
  func f16Values(bits: UInt16, value: Float) {
    #expect(HalfPrecision.float(fromF16Bits: bits).bitPattern == value.bitPattern)
  }

  @Test("F16 NaNs stay NaN and keep their payload")
  func f16NaN() {
    #expect(HalfPrecision.float(fromF16Bits: 0x7E00).bitPattern == 0x7FC0_0000)
    #expect(HalfPrecision.float(fromF16Bits: 0x7C01).bitPattern == 0x7F80_2000)
    #expect(HalfPrecision.float(fromF16Bits: 0xFE00).bitPattern == 0xFFC0_0000)
  }

  @Test(
    "BF16 edge values",
    arguments: [
      (UInt16(0x3F80), Float(1)), (0xC020, -2.5), (0x8000, -0.0), (0x0001, 0x1p-133),
      (0x7F7F, 0x1.FEp127), (0x7F80, .infinity), (0xFF80, -.infinity), (0x3F81, 1.0078125),
    ] as [(UInt16, Float)])
  func bf16Values(bits: UInt16, value: Float) {
    #expect(HalfPrecision.float(fromBF16Bits: bits).bitPattern == value.bitPattern)
  }

  @Test("BF16 widening is exact: rounding back to BF16 gives the same bits")
  func bf16Exhaustive() {
    var mismatches: [UInt16] = []
    for bits in UInt16.min...UInt16.max {
      let value = HalfPrecision.float(fromBF16Bits: bits)
      if value.isNaN {
        if !(bits & 0x7F80 == 0x7F80 && bits & 0x7F != 0) { mismatches.append(bits) }
        continue
      }
      // The low 16 bits of an exactly widened value are zero, and the top 16 are the input.
      if value.bitPattern & 0xFFFF != 0 || UInt16(value.bitPattern >> 16) != bits {
        mismatches.append(bits)
      }
    }
    #expect(mismatches.count == 0, "first mismatches: \(mismatches.prefix(5))")
  }
}
