import Tensors

/// The safetensors element types AttentionKit reads; all become `Float` in the tensor.
public enum SafeTensorsDType: String, Sendable, Equatable, CaseIterable {
  /// Little-endian binary32, read as is.
  case f32 = "F32"
  /// Little-endian IEEE binary16, widened exactly.
  case f16 = "F16"
  /// Little-endian bfloat16 (the top half of a binary32), widened exactly.
  case bf16 = "BF16"
  /// Little-endian binary64, rounded to the nearest `Float`; finite values beyond `Float`'s
  /// range saturate to `±Float.greatestFiniteMagnitude`, never become ±inf.
  case f64 = "F64"
  /// One byte per element, 0 or 1 (PyTorch's `torch.bool`), read as 0.0 or 1.0: for masks.
  case bool = "BOOL"

  /// Whether the values are floating point (not booleans).
  public var isFloatingPoint: Bool { self != .bool }

  /// How a floating-point dtype is stored; `nil` for `BOOL`.
  var stored: StoredFloat? {
    switch self {
    case .f32: return .f32
    case .f16: return .f16
    case .bf16: return .bf16
    case .f64: return .f64
    case .bool: return nil
    }
  }

  /// Bytes per element.
  var itemSize: Int { stored?.size ?? 1 }

  /// The other dtypes of the safetensors reference implementation: valid, but not read here
  /// (a file holding them can still be read with those tensors skipped), with their element
  /// sizes in bytes (`nil`: packed below a byte).
  static let knownUnsupported: [String: Int?] = [
    "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "C64": 8,
    "F4": nil, "F6_E2M3": nil, "F6_E3M2": nil, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
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
  /// The names of the tensors a selective read skipped, in byte order.
  public var skippedNames: [String]

  public init(
    tensors: [String: Tensor], dtypes: [String: SafeTensorsDType] = [:],
    metadata: [String: String] = [:], source: String, skippedNames: [String] = []
  ) {
    self.tensors = tensors
    self.dtypes = dtypes
    self.metadata = metadata
    self.source = source
    self.skippedNames = skippedNames
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
      throw AttentionError.file(
        path: source, message: "tensor \(quotedForMessage(name)) \(message)")
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
/// Accepted: dtypes F32, F16, BF16, F64 and BOOL (converted to `Float`); any rank including
/// scalars (`[]`); unknown fields in a tensor entry are ignored, as the reference implementation
/// does.
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

  /// Reads the safetensors file (or pipe) at `path`, each tensor straight into its buffer.
  /// `maxBytes` bounds the tensors' `Float` bytes, checked before anything is allocated
  /// (default: the machine's physical memory).
  public static func read(contentsOf path: String, maxBytes: Int? = nil) throws -> SafeTensorsFile {
    try SafeTensorsDecoder(
      source: ByteSource(path: path), maxBytes: maxBytes ?? physicalMemoryBytes()
    ).decode()
  }

  /// Reads only the tensors whose names `selecting` accepts — one layer of a whole model's file
  /// — skipping the others' bytes (a seek in a regular file): neither their memory nor their
  /// dtype matters, though their entries must be valid and the file whole. `maxBytes` bounds
  /// the selected tensors alone.
  public static func read(
    contentsOf path: String, maxBytes: Int? = nil, selecting: @escaping (String) -> Bool
  ) throws -> SafeTensorsFile {
    var decoder = SafeTensorsDecoder(
      source: try ByteSource(path: path), maxBytes: maxBytes ?? physicalMemoryBytes())
    decoder.selects = selecting
    return try decoder.decode()
  }

  /// Reads the one tensor called `name` (what `FILE.safetensors:NAME` names): the header, then
  /// only that tensor's bytes, as `read(contentsOf:maxBytes:selecting:)` does, so the file's
  /// other tensors cost neither memory nor `maxBytes`, and may have any dtype of the reference
  /// implementation. A file without `name` is an `AttentionError.file` listing some that it has.
  public static func readTensor(
    named name: String, contentsOf path: String, maxBytes: Int? = nil
  ) throws -> (tensor: Tensor, dtype: SafeTensorsDType) {
    let file = try read(contentsOf: path, maxBytes: maxBytes) { $0 == name }
    guard let tensor = file.tensors[name], let dtype = file.dtypes[name] else {
      let others = file.skippedNames
      let listed = others.prefix(8).map { quotedForMessage($0) }.joined(separator: ", ")
      let more = others.count > 8 ? " and \(others.count - 8) more" : ""
      throw AttentionError.file(
        path: path,
        message: "tensor \(quotedForMessage(name)) is missing ("
          + (others.isEmpty ? "the file holds no tensors" : "the file holds \(listed)\(more)")
          + ")")
    }
    return (tensor, dtype)
  }

  /// Decodes the bytes of a safetensors file; `source` names it in error messages.
  public static func decode(_ bytes: [UInt8], source: String) throws -> SafeTensorsFile {
    try SafeTensorsDecoder(
      source: ByteSource(bytes: bytes, name: source), maxBytes: physicalMemoryBytes()
    ).decode()
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

  /// The bytes of a safetensors file holding `tensors` as F32 (or `dtype`: F16 and BF16 rounded
  /// to nearest even, BOOL 1 for every value but 0, as numpy's `astype`), laid out as the
  /// reference implementation lays out tensors of one dtype: contiguous, in byte order of their
  /// names, with compact JSON and the header padded with spaces to a multiple of 8 bytes (so the
  /// data is 8-byte aligned). Without metadata the result is byte-identical to
  /// `safetensors.numpy.save_file`; metadata is written in key order (the reference's is not
  /// deterministic) and omitted when empty.
  ///
  /// Throws `AttentionError.invalidArgument` for a tensor named `__metadata__`, a reserved key.
  public static func encode(
    _ tensors: [String: Tensor], metadata: [String: String] = [:],
    dtype: SafeTensorsDType = .f32
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
      let end = offset + tensor.count * dtype.itemSize
      let shape = tensor.shape.map(String.init).joined(separator: ",")
      parts.append(
        jsonQuoted(name) + ":{\"dtype\":\"\(dtype.rawValue)\",\"shape\":[\(shape)],"
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
      guard let tensor = tensors[name] else { continue }
      if let stored = dtype.stored {
        appendLittleEndian(tensor.scalars, as: stored, to: &out)
      } else {
        out += tensor.scalars.map { $0 != 0 ? 1 : 0 }
      }
    }
    return out
  }

}
