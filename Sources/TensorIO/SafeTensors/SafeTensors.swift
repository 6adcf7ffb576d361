import Tensors

/// The safetensors element types AttentionKit reads; all become `Float` in the tensor.
public enum SafeTensorsDType: String, Sendable, Equatable, CaseIterable {
  /// Little-endian binary32, read as is.
  case f32 = "F32"
  /// Little-endian IEEE binary16, widened exactly.
  case f16 = "F16"
  /// Little-endian bfloat16 (the top half of a binary32), widened exactly.
  case bf16 = "BF16"
  /// Little-endian binary64, rounded to the nearest `Float` (beyond `Float`'s range: ±inf).
  case f64 = "F64"

  var stored: StoredFloat {
    switch self {
    case .f32: return .f32
    case .f16: return .f16
    case .bf16: return .bf16
    case .f64: return .f64
    }
  }

  /// The other dtypes of the safetensors reference implementation: valid, but not read here.
  static let knownUnsupported: Set<String> = [
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "C64", "F4", "F6_E2M3",
    "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0",
  ]
}

/// The content of a safetensors file: named tensors (as `Float`), the dtype each was stored in,
/// the free-form string metadata, and where it came from (for error messages).
public struct SafeTensorsFile: Equatable, Sendable {
  public var tensors: [String: Tensor]
  public var dtypes: [String: SafeTensorsDType]
  public var metadata: [String: String]
  /// The path (or other name) the file was read from; error messages start with it.
  public var source: String

  public init(
    tensors: [String: Tensor], dtypes: [String: SafeTensorsDType] = [:],
    metadata: [String: String] = [:], source: String
  ) {
    self.tensors = tensors
    self.dtypes = dtypes
    self.metadata = metadata
    self.source = source
  }

  /// The tensor names in byte order (the order `SafeTensors.encode` lays them out).
  public var names: [String] { stateDict.names }

  /// The tensors as a layer loads them (`RelativePositionAttention(stateDict:)`).
  public var stateDict: StateDict { StateDict(tensors) }

  /// The tensor called `name`, which must have exactly `shape`; errors as `StateDict`'s, as an
  /// `AttentionError.file` naming this file.
  public func tensor(named name: String, shape: [Int]) throws -> Tensor {
    try naming { try stateDict.tensor(named: name, shape: shape) }
  }

  /// The tensor called `name`, whatever its shape; throws when the file has no such tensor.
  public func tensor(named name: String) throws -> Tensor {
    try naming { try stateDict.tensor(named: name) }
  }

  /// Runs `body`, turning a parameter error into a file error that names this file.
  public func naming<Result>(_ body: () throws -> Result) throws -> Result {
    do {
      return try body()
    } catch AttentionError.parameter(let name, let message) {
      throw AttentionError.file(path: source, message: "tensor \(quotedForMessage(name)) \(message)")
    }
  }
}

/// Reading and writing safetensors files (Hugging Face's format for weights).
///
/// The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data
/// section. The JSON is an object mapping each tensor name to
/// `{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`, with byte offsets relative
/// to the start of the data section, and may hold a `"__metadata__"` object of strings to strings.
///
/// Accepted: dtypes F32, F16, BF16 and F64 (converted to `Float`); any rank including scalars
/// (`[]`); unknown fields in a tensor entry are ignored, as the reference implementation does.
///
/// Rejected, each with an `AttentionError.file` naming the file (and the tensor where there is
/// one): a header length past the end of the file or over 100 MB (the reference's limit); a header
/// that is not UTF-8, not JSON, or not an object; a name given twice (names equal under Unicode
/// canonical equivalence count as the same, since they would be one `String` key); other dtypes;
/// dimensions that are negative, fractional or too large, and shapes whose byte size overflows;
/// `data_offsets` that are not two non-negative integers, begin after they end, run past the data
/// section, or hold a different number of bytes than the shape needs; tensors that overlap, leave
/// unused bytes between them, or do not reach the end of the data section (like the reference,
/// which requires the tensors to tile the data section exactly); metadata values that are not
/// strings. All sizes are checked against the file's size before anything is allocated.
public enum SafeTensors {
  /// Header lengths above this are refused before reading the header (the reference's limit).
  public static let maxHeaderLength = 100_000_000

  /// Reads the safetensors file at `path`.
  public static func read(contentsOf path: String) throws -> SafeTensorsFile {
    try decode(readFileBytes(atPath: path), source: path)
  }

  /// Decodes the bytes of a safetensors file; `source` names it in error messages.
  public static func decode(_ bytes: [UInt8], source: String) throws -> SafeTensorsFile {
    func fail(_ message: String) -> AttentionError { .file(path: source, message: message) }
    func fail(_ name: String, _ message: String) -> AttentionError {
      .file(path: source, message: "tensor \(quotedForMessage(name)): \(message)")
    }

    guard bytes.count >= 8 else {
      throw fail("file is \(bytes.count) bytes, too short for the 8-byte header length")
    }
    var declared: UInt64 = 0
    for i in 0..<8 { declared |= UInt64(bytes[i]) << (8 * UInt64(i)) }
    guard declared <= UInt64(bytes.count - 8) else {
      throw fail("header length \(declared) runs past the end of the file (\(bytes.count) bytes)")
    }
    let headerLength = Int(declared)  // ≤ bytes.count - 8, so it fits
    guard headerLength <= maxHeaderLength else {
      throw fail("header length \(headerLength) is over the \(maxHeaderLength)-byte limit")
    }
    let dataStart = 8 + headerLength
    let dataSize = bytes.count - dataStart
    let headerBytes = Array(bytes[8..<dataStart])
    guard String(validating: headerBytes, as: UTF8.self) != nil else {
      throw fail("header is not valid UTF-8")
    }

    let root: JSONValue
    do {
      root = try HeaderJSON.parse(headerBytes)
    } catch {
      if case .duplicateKey(let key, depth: 1, _) = error {
        throw key == "__metadata__"
          ? fail("\"__metadata__\" appears twice in the header")
          : fail(key, "appears twice in the header")
      }
      throw fail("header is not valid JSON: \(error)")
    }
    guard case .object(let members) = root else {
      throw fail("header is \(root.kindName), not a JSON object")
    }

    struct Entry {
      var name: String
      var dtype: SafeTensorsDType
      var shape: [Int]
      var count: Int
      var begin: Int
      var end: Int
    }
    var entries: [Entry] = []
    var metadata: [String: String] = [:]
    for member in members {
      let name = member.key
      if name == "__metadata__" {
        guard case .object(let pairs) = member.value else {
          throw fail("\"__metadata__\" is \(member.value.kindName), not an object")
        }
        for pair in pairs {
          guard case .string(let text) = pair.value else {
            throw fail(
              "\"__metadata__\" value for \(quotedForMessage(pair.key)) is"
                + " \(pair.value.kindName), not a string")
          }
          metadata[pair.key] = text
        }
        continue
      }

      guard case .object(let fields) = member.value else {
        throw fail(name, "entry is \(member.value.kindName), not an object")
      }
      func field(_ key: String) throws -> JSONValue {
        guard let found = fields.first(where: { $0.key == key }) else {
          throw fail(name, "missing \"\(key)\"")
        }
        return found.value
      }

      guard case .string(let dtypeName) = try field("dtype") else {
        throw fail(name, "\"dtype\" is not a string")
      }
      guard let dtype = SafeTensorsDType(rawValue: dtypeName) else {
        let supported = SafeTensorsDType.allCases.map(\.rawValue).joined(separator: ", ")
        let what =
          SafeTensorsDType.knownUnsupported.contains(dtypeName)
          ? "dtype \(quotedForMessage(dtypeName)) is not supported"
          : "unknown dtype \(quotedForMessage(dtypeName))"
        throw fail(name, "\(what) (supported: \(supported))")
      }

      guard case .array(let dims) = try field("shape") else {
        throw fail(name, "\"shape\" is not an array")
      }
      var shape: [Int] = []
      shape.reserveCapacity(dims.count)
      for dim in dims {
        guard let extent = dim.intValue else {
          if case .number(let text) = dim {
            let isInteger = !text.contains(where: { $0 == "." || $0 == "e" || $0 == "E" })
            throw fail(
              name,
              isInteger
                ? "dimension \(quotedForMessage(text)) is too large"
                : "dimension \(quotedForMessage(text)) is not an integer")
          }
          throw fail(name, "dimension is \(dim.kindName), not an integer")
        }
        guard extent >= 0 else { throw fail(name, "negative dimension \(extent) in shape") }
        shape.append(extent)
      }
      guard let count = try? Tensor.elementCount(of: shape) else {
        throw fail(name, "shape \(shapeForMessage(shape)) has more elements than memory can index")
      }
      let (byteCount, overflow) = count.multipliedReportingOverflow(by: dtype.stored.size)
      guard !overflow else {
        throw fail(
          name,
          "shape \(shapeForMessage(shape)) of \(dtype.rawValue) needs more bytes than memory"
            + " can index")
      }

      guard case .array(let offsets) = try field("data_offsets"), offsets.count == 2,
        let begin = offsets[0].intValue, let end = offsets[1].intValue, begin >= 0, end >= 0
      else {
        throw fail(name, "\"data_offsets\" is not two non-negative integers")
      }
      guard begin <= end else {
        throw fail(name, "data_offsets [\(begin), \(end)] begin after they end")
      }
      guard end <= dataSize else {
        throw fail(
          name,
          "data_offsets [\(begin), \(end)] run past the end of the data section"
            + " (\(dataSize) bytes)")
      }
      guard end - begin == byteCount else {
        throw fail(
          name,
          "shape \(shapeForMessage(shape)) of \(dtype.rawValue) needs \(byteCount) bytes but"
            + " data_offsets [\(begin), \(end)] hold \(end - begin)")
      }
      entries.append(
        Entry(name: name, dtype: dtype, shape: shape, count: count, begin: begin, end: end))
    }

    // The tensors must tile the data section: sorted by position, each starts where the previous
    // one ended. Overlap would alias two tensors; gaps and a short tail mean a corrupt file.
    let sorted = entries.sorted { ($0.begin, $0.end) < ($1.begin, $1.end) }
    var position = 0
    var previous: String?
    for entry in sorted {
      if entry.begin < position, let previous {
        throw fail(
          entry.name,
          "data_offsets [\(entry.begin), \(entry.end)] overlap tensor"
            + " \(quotedForMessage(previous)), which ends at \(position)")
      }
      if entry.begin > position {
        throw fail(
          entry.name,
          "data_offsets [\(entry.begin), \(entry.end)] leave bytes"
            + " \(position)..<\(entry.begin) of the data section unused")
      }
      position = entry.end
      previous = entry.name
    }
    guard position == dataSize else {
      throw fail("bytes \(position)..<\(dataSize) of the data section belong to no tensor")
    }

    var tensors: [String: Tensor] = [:]
    var dtypes: [String: SafeTensorsDType] = [:]
    for entry in entries {
      guard
        let scalars = decodeFloats(
          bytes, offset: dataStart + entry.begin, count: entry.count, as: entry.dtype.stored)
      else { throw fail(entry.name, "internal error: data range out of bounds") }
      tensors[entry.name] = Tensor(validShape: entry.shape, scalars: scalars)
      dtypes[entry.name] = entry.dtype
    }
    return SafeTensorsFile(tensors: tensors, dtypes: dtypes, metadata: metadata, source: source)
  }

  /// Writes `tensors` as F32 with `metadata` to `path` (see `encode`), atomically (see
  /// `writeAtomically`).
  public static func write(
    _ tensors: [String: Tensor], metadata: [String: String] = [:], to path: String
  ) throws {
    let bytes: [UInt8]
    do {
      bytes = try encode(tensors, metadata: metadata)
    } catch let error as AttentionError {
      if case .invalidArgument(let message) = error {
        throw AttentionError.file(path: path, message: "cannot write: \(message)")
      }
      throw error
    }
    try writeAtomically(bytes, to: path)
  }

  /// The bytes of a safetensors file holding `tensors` as F32, laid out as the reference
  /// implementation lays out tensors of one dtype: contiguous, in byte order of their names,
  /// with compact JSON and the header padded with spaces to a multiple of 8 bytes (so the data is
  /// 8-byte aligned). Without metadata the result is byte-identical to
  /// `safetensors.numpy.save_file`; metadata is written in key order (the reference's is not
  /// deterministic) and omitted when empty.
  ///
  /// Throws `AttentionError.invalidArgument` for a tensor named `__metadata__`, a reserved key.
  public static func encode(
    _ tensors: [String: Tensor], metadata: [String: String] = [:]
  ) throws -> [UInt8] {
    guard tensors["__metadata__"] == nil else {
      throw AttentionError.invalidArgument(
        "a tensor cannot be named \"__metadata__\", the key safetensors reserves for metadata")
    }
    var parts: [String] = []
    if !metadata.isEmpty {
      let pairs = metadata.keys.sorted(by: StateDict.byteOrder).map { key in
        jsonQuoted(key) + ":" + jsonQuoted(metadata[key] ?? "")
      }
      parts.append("\"__metadata__\":{" + pairs.joined(separator: ",") + "}")
    }
    let names = tensors.keys.sorted(by: StateDict.byteOrder)
    var offset = 0
    for name in names {
      guard let tensor = tensors[name] else { continue }
      let end = offset + tensor.count * 4
      let shape = tensor.shape.map(String.init).joined(separator: ",")
      parts.append(
        jsonQuoted(name) + ":{\"dtype\":\"F32\",\"shape\":[\(shape)],"
          + "\"data_offsets\":[\(offset),\(end)]}")
      offset = end
    }
    var header = Array(("{" + parts.joined(separator: ",") + "}").utf8)
    header += [UInt8](repeating: 0x20, count: (8 - header.count % 8) % 8)

    var out: [UInt8] = []
    out.reserveCapacity(8 + header.count + offset)
    let length = UInt64(header.count)
    for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: length >> (8 * UInt64(i)))) }
    out += header
    for name in names {
      if let tensor = tensors[name] { appendLittleEndian(tensor.scalars, to: &out) }
    }
    return out
  }

}
