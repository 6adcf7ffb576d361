import Tensors

/// What a `.npy` header says about the data after it — dtype, shape, element and byte counts —
/// read from a `ByteSource` and checked against the file's size before any data is read.
struct NPYLayout {
  let source: String
  let dtype: NPYDType
  let shape: [Int]
  let count: Int
  /// The data's size in the file: `count · itemSize`.
  let byteCount: Int

  /// Header lengths above this are refused when the file's size is unknown (a pipe); numpy's own
  /// reader stops at 10,000 bytes.
  static let maxStreamHeader = 1 << 20

  private static let magic: [UInt8] = [0x93] + Array("NUMPY".utf8)

  /// Reads and checks the magic, the version, the header and the data's size.
  init(reading source: ByteSource) throws {
    self.source = source.name
    func fail(_ message: String) -> AttentionError { .file(path: source.name, message: message) }
    let total = source.remaining

    let prefix = try source.bytes(8)
    guard prefix.count == 8, Array(prefix[0..<6]) == Self.magic else {
      throw fail("not an .npy file (it does not start with \\x93NUMPY)")
    }
    let version = (prefix[6], prefix[7])
    let lengthSize: Int
    switch version {
    case (1, 0): lengthSize = 2
    case (2, 0), (3, 0): lengthSize = 4
    default:
      throw fail("unsupported .npy version \(version.0).\(version.1) (1.0, 2.0 and 3.0 are read)")
    }
    let lengthBytes = try source.bytes(lengthSize)
    guard lengthBytes.count == lengthSize else {
      throw fail("file ends inside the header length (\(8 + lengthBytes.count) bytes)")
    }
    var headerLength = 0
    for i in 0..<lengthSize { headerLength |= Int(lengthBytes[i]) << (8 * i) }
    if let total {
      guard 8 + lengthSize + headerLength <= total else {
        throw fail("header length \(headerLength) runs past the end of the file (\(total) bytes)")
      }
    } else if headerLength > Self.maxStreamHeader {
      throw fail("header length \(headerLength) is over the \(Self.maxStreamHeader)-byte limit")
    }
    let headerBytes = try source.bytes(headerLength)
    guard headerBytes.count == headerLength else {
      throw fail(
        "header length \(headerLength) runs past the end of the file "
          + "(\(8 + lengthSize + headerBytes.count) bytes)")
    }
    let header: NPYHeader
    do {
      header = try NPYHeaderParser.parse(headerBytes)
    } catch {
      throw fail("invalid header: \(error.message)")
    }
    guard !header.fortranOrder else {
      throw fail(
        "Fortran-order arrays are not supported (save a C-order array: np.ascontiguousarray)")
    }
    guard let dtype = NPYDType(descr: header.descr) else {
      let kind = header.descr.hasPrefix(">") ? "big-endian dtype" : "unsupported dtype"
      let supported = NPYDType.allCases.map { "\"\($0.descr)\"" }.joined(separator: ", ")
      throw fail("\(kind) \(quotedForMessage(header.descr)) (supported: \(supported))")
    }
    let shapeText = shapeForMessage(header.shape, python: true)
    guard let count = try? Tensor.elementCount(of: header.shape) else {
      throw fail("shape \(shapeText) has more elements than memory can index")
    }
    let (byteCount, overflow) = count.multipliedReportingOverflow(by: dtype.itemSize)
    guard !overflow else {
      throw fail("shape \(shapeText) of \(dtype.descr) needs more bytes than memory can index")
    }
    if let available = source.remaining, available != byteCount {
      let relation = available < byteCount ? "truncated" : "too long"
      throw fail(
        "data \(relation): shape \(shapeText) of \(dtype.descr) needs \(byteCount) bytes"
          + " but the file has \(available) after the header")
    }
    self.dtype = dtype
    self.shape = header.shape
    self.count = count
    self.byteCount = byteCount
  }

  /// Refuses, before allocating, a tensor of `count` elements of `elementSize` bytes over
  /// `maxBytes` (default: physical memory), or one the system cannot allocate now.
  func checkBudget(elementSize: Int, maxBytes: Int?) throws {
    let (bytes, overflow) = count.multipliedReportingOverflow(by: elementSize)
    try checkReadBudget(
      overflow ? nil : bytes, maxBytes: maxBytes ?? physicalMemoryBytes(),
      what: "\(quotedForMessage(source)): its \(shapeForMessage(shape)) tensor")
  }

  /// The error for data that ends after `elements` of `count` elements.
  func truncated(_ elements: Int) -> AttentionError {
    .file(
      path: source,
      message: "data truncated: shape \(shapeForMessage(shape, python: true)) of \(dtype.descr)"
        + " needs \(byteCount) bytes but the file has \(elements * dtype.itemSize) after the header"
    )
  }

  /// Throws when a pipe holds more than the shape says (a regular file's size was checked).
  func checkEnd(of source: ByteSource) throws {
    guard try source.isAtEnd() else {
      throw AttentionError.file(
        path: self.source,
        message: "data too long: shape \(shapeForMessage(shape, python: true)) of \(dtype.descr)"
          + " needs \(byteCount) bytes but the file has more after the header")
    }
  }

  /// The data as `Float`s, read straight into the tensor's buffer, and the first `<f8` value
  /// that saturated (see `NPYDType.float64`).
  func readFloats(from source: ByteSource) throws -> (
    scalars: [Float], firstSaturated: SaturatedElement?
  ) {
    let size = dtype.itemSize
    let dtype = self.dtype
    let name = self.source
    var firstSaturated: SaturatedElement?
    let scalars = try readElements(
      count, stride: size, from: source, direct: dtype == .float32 && isLittleEndianHost,
      truncated: truncated
    ) { raw, out, first in
      func load<T: FixedWidthInteger>(_: T.Type, _ i: Int) -> T {
        T(littleEndian: raw.loadUnaligned(fromByteOffset: i * size, as: T.self))
      }
      switch dtype {
      case .float16: decodeFloats(raw, as: .f16, into: out)
      case .float32: decodeFloats(raw, as: .f32, into: out)
      case .float64:
        if let i = decodeFloats(raw, as: .f64, into: out), firstSaturated == nil {
          let bits = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
          firstSaturated = SaturatedElement(
            flatIndex: first + i, storedValue: Double(bitPattern: bits))
        }
      case .bool:
        for i in 0..<out.count {
          let byte = raw[i]
          guard byte <= 1 else {
            throw AttentionError.file(
              path: name, message: "bool element \(first + i) is stored as byte \(byte), not 0 or 1"
            )
          }
          out[i] = Float(byte)
        }
      case .int8: for i in 0..<out.count { out[i] = Float(load(Int8.self, i)) }
      case .uint8: for i in 0..<out.count { out[i] = Float(load(UInt8.self, i)) }
      case .int16: for i in 0..<out.count { out[i] = Float(load(Int16.self, i)) }
      case .uint16: for i in 0..<out.count { out[i] = Float(load(UInt16.self, i)) }
      case .int32: for i in 0..<out.count { out[i] = Float(load(Int32.self, i)) }
      case .uint32: for i in 0..<out.count { out[i] = Float(load(UInt32.self, i)) }
      case .int64: for i in 0..<out.count { out[i] = Float(load(Int64.self, i)) }
      case .uint64: for i in 0..<out.count { out[i] = Float(load(UInt64.self, i)) }
      }
    }
    return (scalars, firstSaturated)
  }
}

/// Whether this machine stores numbers little-endian, as `.npy` `<` and safetensors data are.
let isLittleEndianHost = 1.littleEndian == 1
