import Tensors

/// The steps of reading a safetensors file, each a method: the header length, the header's JSON,
/// one entry per tensor, the check that the entries tile the data section, and the data, read in
/// file order straight into each tensor's buffer. Every size is checked against the file's size
/// (when known: a pipe's is not) and the caller's limit before anything is allocated; every error
/// is an `AttentionError.file` naming the source (and the tensor where there is one).
struct SafeTensorsDecoder {
  let source: ByteSource
  /// The most bytes the tensors may take as `Float`s.
  let maxBytes: Int
  /// Which tensors to decode; the others are checked as entries (any dtype of the reference
  /// implementation, offsets, tiling) and skipped, never allocated.
  var selects: (String) -> Bool = { _ in true }

  /// One tensor's header entry, checked against the data section's size.
  struct Entry {
    var name: String
    /// `nil` for a tensor that is skipped in a dtype not read here.
    var dtype: SafeTensorsDType?
    /// Whether the tensor is decoded (else skipped).
    var selected: Bool
    var shape: [Int]
    var count: Int
    var begin: Int
    var end: Int
  }

  func decode() throws -> SafeTensorsFile {
    let headerBytes = try header()
    let members = try parse(headerBytes)
    // A regular file's data section is what follows the header; a pipe's is known only from
    // the entries, and must then end where the last tensor ends.
    let knownSize = source.remaining
    var entries: [Entry] = []
    var metadata: [String: String] = [:]
    for member in members {
      if member.key == "__metadata__" {
        metadata = try self.metadata(member.value)
      } else {
        entries.append(try entry(member, dataSize: knownSize ?? Int.max))
      }
    }
    let dataSize = knownSize ?? entries.map(\.end).max() ?? 0
    try checkTiling(entries, dataSize: dataSize)
    try checkBudget(entries.filter(\.selected))
    var tensors: [String: Tensor] = [:]
    var dtypes: [String: SafeTensorsDType] = [:]
    // Tiled, so file order is offset order and each tensor starts where the last one ended.
    for entry in entries.sorted(by: { $0.begin < $1.begin }) {
      guard entry.selected, let dtype = entry.dtype else {
        let length = entry.end - entry.begin
        let skipped = try source.skip(length)
        guard skipped == length else {
          throw fail(entry.name, "the file ends after \(skipped) of its \(length) bytes")
        }
        continue
      }
      tensors[entry.name] = Tensor(validShape: entry.shape, scalars: try read(entry, dtype))
      dtypes[entry.name] = dtype
    }
    guard try source.isAtEnd() else {
      throw fail("the data section holds more bytes than its \(dataSize) that belong to tensors")
    }
    return SafeTensorsFile(
      tensors: tensors, dtypes: dtypes, metadata: metadata, source: source.name,
      skippedNames: entries.filter { !$0.selected }.map(\.name).sorted(by: StateDict.byteOrder))
  }

  private func fail(_ message: String) -> AttentionError {
    .file(path: source.name, message: message)
  }

  private func fail(_ name: String, _ message: String) -> AttentionError {
    .file(path: source.name, message: "tensor \(quotedForMessage(name)): \(message)")
  }

  /// The 8-byte little-endian header length, checked against the file and the limit; returns
  /// the header's bytes (valid UTF-8).
  private func header() throws -> [UInt8] {
    let fileSize = source.remaining
    let prefix = try source.bytes(8)
    guard prefix.count == 8 else {
      throw fail("file is \(prefix.count) bytes, too short for the 8-byte header length")
    }
    var declared: UInt64 = 0
    for i in 0..<8 { declared |= UInt64(prefix[i]) << (8 * UInt64(i)) }
    if let fileSize {
      guard declared <= UInt64(fileSize - 8) else {
        throw fail("header length \(declared) runs past the end of the file (\(fileSize) bytes)")
      }
    }
    guard declared <= UInt64(SafeTensors.maxHeaderLength) else {
      throw fail(
        "header length \(declared) is over the \(SafeTensors.maxHeaderLength)-byte limit")
    }
    let headerLength = Int(declared)
    let headerBytes = try source.bytes(headerLength)
    guard headerBytes.count == headerLength else {
      throw fail(
        "header length \(headerLength) runs past the end of the file"
          + " (\(8 + headerBytes.count) bytes)")
    }
    guard String(validating: headerBytes, as: UTF8.self) != nil else {
      throw fail("header is not valid UTF-8")
    }
    return headerBytes
  }

  /// Refuses, before allocating, tensors whose `Float`s would exceed `maxBytes`.
  private func checkBudget(_ entries: [Entry]) throws {
    var total = 0
    var overflow = false
    for entry in entries {
      let (bytes, o1) = entry.count.multipliedReportingOverflow(by: MemoryLayout<Float>.stride)
      let (sum, o2) = total.addingReportingOverflow(bytes)
      overflow = overflow || o1 || o2
      total = sum
    }
    try checkReadBudget(
      overflow ? nil : total, maxBytes: maxBytes,
      what: "\(quotedForMessage(source.name)): its \(entries.count) tensors")
  }

  /// One tensor's data as `Float`s, read from the current position straight into its buffer;
  /// BOOL bytes other than 0 and 1 are an error naming the tensor and the element.
  private func read(_ entry: Entry, _ dtype: SafeTensorsDType) throws -> [Float] {
    let size = dtype.itemSize
    return try readElements(
      entry.count, stride: size, from: source, direct: dtype == .f32 && isLittleEndianHost,
      truncated: { read in
        fail(
          entry.name, "the file ends after \(read * size) of its \(entry.end - entry.begin) bytes")
      }
    ) { raw, out, first in
      guard let stored = dtype.stored else {
        for i in 0..<out.count {
          let byte = raw[i]
          guard byte <= 1 else {
            throw fail(
              entry.name, "bool element \(first + i) is stored as byte \(byte), not 0 or 1")
          }
          out[i] = Float(byte)
        }
        return
      }
      decodeFloats(raw, as: stored, into: out)
    }
  }

  /// The header's top-level members; a name given twice is an error naming it.
  private func parse(_ headerBytes: [UInt8]) throws -> [JSONMember] {
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
    return members
  }

  /// `__metadata__`: an object of strings to strings.
  private func metadata(_ value: JSONValue) throws -> [String: String] {
    guard case .object(let pairs) = value else {
      throw fail("\"__metadata__\" is \(value.kindName), not an object")
    }
    var metadata: [String: String] = [:]
    for pair in pairs {
      guard case .string(let text) = pair.value else {
        throw fail(
          "\"__metadata__\" value for \(quotedForMessage(pair.key)) is"
            + " \(pair.value.kindName), not a string")
      }
      metadata[pair.key] = text
    }
    return metadata
  }

  /// One tensor's entry: its dtype, shape and data offsets, each checked.
  private func entry(_ member: JSONMember, dataSize: Int) throws -> Entry {
    let name = member.key
    guard case .object(let fields) = member.value else {
      throw fail(name, "entry is \(member.value.kindName), not an object")
    }
    func field(_ key: String) throws -> JSONValue {
      guard let found = fields.first(where: { $0.key == key }) else {
        throw fail(name, "missing \"\(key)\"")
      }
      return found.value
    }
    let selected = selects(name)
    let (dtype, dtypeName, size) = try self.dtype(try field("dtype"), name: name, read: selected)
    let shape = try self.shape(try field("shape"), name: name)
    guard let count = try? Tensor.elementCount(of: shape) else {
      throw fail(name, "shape \(shapeForMessage(shape)) has more elements than memory can index")
    }
    let (begin, end) = try offsets(try field("data_offsets"), name: name, dataSize: dataSize)
    // Sub-byte dtypes (F4, F6) of skipped tensors pack elements; their size is not checked.
    if let size {
      let (byteCount, overflow) = count.multipliedReportingOverflow(by: size)
      guard !overflow else {
        throw fail(
          name,
          "shape \(shapeForMessage(shape)) of \(dtypeName) needs more bytes than memory can index")
      }
      guard end - begin == byteCount else {
        throw fail(
          name,
          "shape \(shapeForMessage(shape)) of \(dtypeName) needs \(byteCount) bytes but"
            + " data_offsets [\(begin), \(end)] hold \(end - begin)")
      }
    }
    return Entry(
      name: name, dtype: dtype, selected: selected, shape: shape, count: count, begin: begin,
      end: end)
  }

  /// The entry's dtype, its name and its element size in bytes (`nil`: packed below a byte). A
  /// tensor that is not `read` may have any dtype of the reference implementation (`nil` here).
  private func dtype(_ value: JSONValue, name: String, read: Bool) throws -> (
    SafeTensorsDType?, String, Int?
  ) {
    guard case .string(let dtypeName) = value else {
      throw fail(name, "\"dtype\" is not a string")
    }
    if let dtype = SafeTensorsDType(rawValue: dtypeName) {
      return (dtype, dtypeName, dtype.itemSize)
    }
    if !read, let size = SafeTensorsDType.knownUnsupported[dtypeName] {
      return (nil, dtypeName, size)
    }
    let supported = SafeTensorsDType.allCases.map(\.rawValue).joined(separator: ", ")
    let what =
      SafeTensorsDType.knownUnsupported[dtypeName] != nil
      ? "dtype \(quotedForMessage(dtypeName)) is not supported"
      : "unknown dtype \(quotedForMessage(dtypeName))"
    throw fail(name, "\(what) (supported: \(supported))")
  }

  private func shape(_ value: JSONValue, name: String) throws -> [Int] {
    guard case .array(let dims) = value else {
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
    return shape
  }

  private func offsets(_ value: JSONValue, name: String, dataSize: Int) throws -> (Int, Int) {
    guard case .array(let offsets) = value, offsets.count == 2,
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
    return (begin, end)
  }

  /// The tensors must tile the data section: sorted by position, each starts where the previous
  /// one ended. Overlap would alias two tensors; gaps and a short tail mean a corrupt file.
  private func checkTiling(_ entries: [Entry], dataSize: Int) throws {
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
  }
}
