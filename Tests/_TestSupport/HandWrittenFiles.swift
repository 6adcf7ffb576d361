import AttentionKit
import Foundation

/// Tensor files written byte by byte, for what the encoders cannot write: any header text, any
/// dtype, data that does not match the header.
package enum HandWrittenFiles {
  /// A safetensors file from a header text and data, with the header padded with spaces to a
  /// multiple of 8 bytes (as the reference implementation pads it).
  package static func safetensors(_ header: String, data: [UInt8] = []) -> [UInt8] {
    var headerBytes = Array(header.utf8)
    headerBytes += [UInt8](repeating: 0x20, count: (8 - headerBytes.count % 8) % 8)
    let length = UInt64(headerBytes.count)
    return (0..<8).map { UInt8(truncatingIfNeeded: length >> (8 * UInt64($0))) } + headerBytes
      + data
  }
}

extension HandWrittenFiles {
  /// A whole model's safetensors file at `path`, as `FILE.safetensors:NAME` meets one: a `big`
  /// F32 tensor of `bigBytes` (a multiple of 4) written as a hole — a sparse file: it takes no
  /// disk, and memory only if a reader reads it — then tensors no attention input can be (BOOL
  /// `flags` holding a byte BOOL does not allow, an F8_E4M3 `fp8`, an I64 `position_ids`
  /// `[1, 2]`; left out when not `otherDtypes`), then `tensors` as F32 in the order of their
  /// names.
  package static func modelSafetensors(
    at path: String, around tensors: [String: Tensor], bigBytes: Int, otherDtypes: Bool = true
  ) throws {
    var entries = [
      #""big":{"dtype":"F32","shape":[\#(bigBytes / 4)],"data_offsets":[0,\#(bigBytes)]}"#
    ]
    var offset = bigBytes
    func add(_ name: String, _ dtype: String, _ shape: [Int], bytes: Int) {
      let dims = shape.map(String.init).joined(separator: ",")
      entries.append(
        #""\#(name)":{"dtype":"\#(dtype)","shape":[\#(dims)],"#
          + #""data_offsets":[\#(offset),\#(offset + bytes)]}"#)
      offset += bytes
    }
    var tail: [UInt8] = []
    if otherDtypes {
      add("flags", "BOOL", [3], bytes: 3)
      add("fp8", "F8_E4M3", [1], bytes: 1)
      add("position_ids", "I64", [1, 2], bytes: 16)
      tail = [1, 0, 7, 0x38] + [UInt8](repeating: 0, count: 16)
    }
    for name in tensors.keys.sorted() {
      let tensor = tensors[name]!
      add(name, "F32", tensor.shape, bytes: 4 * tensor.count)
      tail += tensor.scalars.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) }
    }
    let prefix = safetensors("{" + entries.joined(separator: ",") + "}")
    try Data(prefix).write(to: URL(fileURLWithPath: path))
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.truncate(atOffset: UInt64(prefix.count + bigBytes))
    try handle.seekToEnd()
    try handle.write(contentsOf: Data(tail))
  }
}
