import Foundation

/// How values are written into the one-line error messages of every target: byte counts, names
/// and shapes read from files (escaped and capped, so that a hostile file cannot flood the
/// terminal), PyTorch's spelling of shapes, and the names of non-finite values.

/// Bytes in binary units for messages: "16.00 MiB".
public func formatBytes(_ bytes: Int) -> String {
  let units = ["B", "KiB", "MiB", "GiB", "TiB"]
  var value = Double(bytes)
  var unit = 0
  while value >= 1024 && unit < units.count - 1 {
    value /= 1024
    unit += 1
  }
  return unit == 0 ? "\(bytes) B" : String(format: "%.2f %@", value, units[unit])
}

/// A name as it appears in an error message: quoted, with every character that could change
/// how the terminal shows the line escaped as `\u{…}` — control characters (C0, DEL, C1: escape
/// sequences, carriage return, NUL) and the bidirectional controls (U+061C, U+200E–U+200F,
/// U+202A–U+202E, U+2066–U+2069: a name cannot reorder the rest of the message) — and cut to
/// `limit` characters when a hostile file makes it huge.
public func quotedForMessage(_ text: String, limit: Int = 80) -> String {
  var out = "\""
  var count = 0
  for scalar in text.unicodeScalars {
    if count == limit {
      out += "\"…"
      return out
    }
    count += 1
    switch scalar.value {
    case 0x22: out += "\\\""
    case 0x5C: out += "\\\\"
    case 0x0A: out += "\\n"
    case 0x0D: out += "\\r"
    case 0x09: out += "\\t"
    case 0x00...0x1F, 0x7F...0x9F, 0x061C, 0x200E...0x200F, 0x202A...0x202E, 0x2066...0x2069:
      out += "\\u{" + String(scalar.value, radix: 16) + "}"
    default: out.unicodeScalars.append(scalar)
    }
  }
  return out + "\""
}

/// A shape as it appears in an error message, `[2, 3]` or Python's `(2, 3)`; a hostile file's
/// shape with thousands of dimensions is shown by its first few and its rank.
public func shapeForMessage(_ shape: [Int], python: Bool = false) -> String {
  let limit = 8
  var items = shape.prefix(limit).map(String.init)
  if shape.count > limit { items.append("… (\(shape.count) dimensions)") }
  let body = items.joined(separator: ", ")
  guard python else { return "[\(body)]" }
  return shape.count == 1 ? "(\(body),)" : "(\(body))"
}

/// Formats a shape as PyTorch prints it: `torch.Size([1, 4, 8])`.
public func torchSizeDescription(_ shape: [Int]) -> String {
  "torch.Size([\(shape.map(String.init).joined(separator: ", "))])"
}

/// How a non-finite value is named in messages: `NaN`, `inf` or `-inf`.
public func nonFiniteName(_ value: Float) -> String {
  value.isNaN ? "NaN" : value > 0 ? "inf" : "-inf"
}
